"""One models folder, one Redis (shared.launch.identity): the pairing rule in-process, then real `python -m worker`,
`python -m ui` and `resnet-lab up` processes of a second stack refused on a folder paired with another Redis.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.procs import clean_env
import redis

from shared.launch.identity import IDENTITY_FILE, IDENTITY_KEY, IdentityMismatch, check_models_dir, claim_models_dir, \
    redis_address
from shared.launch.services import find_free_port, start_redis

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def client(redis_url):
    c = redis.Redis.from_url(redis_url, decode_responses=True)
    yield c
    c.close()


def pairing(models: Path) -> dict:
    return json.loads((models / IDENTITY_FILE).read_text())


def test_address_never_carries_the_password():
    assert redis_address("redis://:s3cret@host:6380/2") == "host:6380/2"
    assert redis_address("redis://user:pw@10.0.0.1/0") == "10.0.0.1:6379/0"
    assert redis_address("unix:///run/redis.sock?db=1") == "unix:/run/redis.sock/1"


def test_a_new_folder_is_paired_and_the_same_redis_is_accepted_again(tmp_path, client, redis_url):
    models = tmp_path / "models"
    token = check_models_dir(models, redis_url)
    assert client.get(IDENTITY_KEY) == token == pairing(models)["token"]
    assert pairing(models)["redis"] == redis_address(redis_url) and "@" not in pairing(models)["redis"]
    assert check_models_dir(models, redis_url) == token


def test_a_redis_that_came_back_empty_at_the_same_address_is_adopted(tmp_path, client, redis_url):
    models = tmp_path / "models"
    token = check_models_dir(models, redis_url)
    client.flushall()  # restarted without persistence
    assert check_models_dir(models, redis_url) == token
    assert client.get(IDENTITY_KEY) == token


def test_an_empty_redis_elsewhere_is_refused_naming_both_and_the_fix(tmp_path, client, redis_url):
    models = tmp_path / "models"
    claim_models_dir(models, client, "main-host:6379/0")
    client.flushall()
    with pytest.raises(IdentityMismatch) as refused:
        claim_models_dir(models, client, "other-host:6379/0")
    message = str(refused.value)
    assert "main-host:6379/0" in message and "other-host:6379/0" in message and "no identity" in message
    assert str(models / IDENTITY_FILE) in message and "RESNET_LAB_MODELS_DIR" in message
    assert client.get(IDENTITY_KEY) is None, "a refused start must not pair the other Redis"


def test_up_adopts_its_own_embedded_redis_on_a_new_port(tmp_path, client):
    models = tmp_path / "models"
    token = claim_models_dir(models, client, "127.0.0.1:40001/0", owns_redis=True)
    client.flushall()  # its append-only data was deleted
    assert claim_models_dir(models, client, "127.0.0.1:40002/0", owns_redis=True) == token
    assert pairing(models)["redis"] == "127.0.0.1:40002/0"  # its children (same address) agree from now on
    assert claim_models_dir(models, client, "127.0.0.1:40002/0") == token


def test_a_redis_with_another_identity_is_refused_even_by_up(tmp_path, client, redis_url):
    models = tmp_path / "models"
    claim_models_dir(models, client, redis_address(redis_url))
    client.set(IDENTITY_KEY, "f" * 32)  # paired with another folder
    for owns in (False, True):
        with pytest.raises(IdentityMismatch, match="identity ffffffff"):
            claim_models_dir(models, client, redis_address(redis_url), owns_redis=owns)


def test_a_damaged_pairing_file_says_what_to_do(tmp_path, client):
    models = tmp_path / "models"
    models.mkdir()
    (models / IDENTITY_FILE).write_text("{not json")
    with pytest.raises(IdentityMismatch, match="damaged.*delete it"):
        claim_models_dir(models, client, "h:1/0")


def test_processes_starting_at_once_on_a_new_folder_agree(tmp_path, redis_url):
    models = tmp_path / "models"
    tokens, errors = [], []

    def start():
        try:
            tokens.append(check_models_dir(models, redis_url))
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(set(tokens)) == 1 and len(tokens) == 8
    assert [p.name for p in models.iterdir()] == [IDENTITY_FILE], "no temporary file left behind"


# --- a second stack, as real processes --------------------------------------------------------------------------

def run_module(args: list[str], env: dict, timeout: float = 60) -> subprocess.CompletedProcess:
    base = clean_env()
    # no model plugin: loading the tiny model imports torch (seconds of CPU per process), and a refusal needs none
    base.pop("RESNET_LAB_MODEL_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**base, "CUDA_VISIBLE_DEVICES": "", "GRADIO_ANALYTICS_ENABLED": "False",
                               **{k: str(v) for k, v in env.items()}})


def test_a_second_stack_with_another_redis_is_refused_by_worker_page_and_up(tmp_path, redis_url):
    models = tmp_path / "models"
    first = check_models_dir(models, redis_url)  # the first stack started here
    other = start_redis(tmp_path / "other-redis", password="pw")
    try:
        env = {"REDIS_URL": other.url, "RESNET_LAB_MODELS_DIR": models, "RESNET_LAB_DATA_ROOTS": tmp_path / "data",
               "RESNET_LAB_PORT": find_free_port()}
        commands = (["worker"], ["worker", "--gpus", "0"], ["ui"], ["shared.cli", "up", "--gpus", "cpu"])
        with ThreadPoolExecutor(len(commands)) as pool:  # all four at once: each is a Python start
            finished = list(pool.map(lambda args: run_module(args, env), commands))
        for args, done in zip(commands, finished):
            message = done.stderr + done.stdout
            assert done.returncode != 0, (args, message)
            assert f"belongs to the Redis at {redis_address(redis_url)}" in message, (args, message)
            assert f"REDIS_URL points at 127.0.0.1:{other.port}/0" in message, (args, message)
            assert "delete" in message and "Traceback" not in message, (args, message)
            assert "pw@" not in message, "the password must not be shown"
        assert redis.Redis.from_url(other.url).get(IDENTITY_KEY) is None
        assert pairing(models)["token"] == first
    finally:
        other.stop()


def test_the_page_starts_without_checking_while_redis_is_down(tmp_path, caplog):
    from shared.settings import Settings
    from ui.__main__ import check_pairing

    settings = Settings(models_dir=tmp_path / "models", redis_url=f"redis://127.0.0.1:{find_free_port()}/0")
    check_pairing(settings)  # no exception: the page shows its "Redis is not reachable" banner instead
    assert "the page starts without checking" in caplog.text
    assert not (tmp_path / "models" / IDENTITY_FILE).exists()
