"""Keeping strangers out (issue 8), against real processes: the page binds loopback and refuses to go wider without
a login, checkpoints cannot run code, the file route serves only the models store and the data roots, uploads
are capped, and Redis with a password works end to end.

Only JSON task messages: tests/test_worker.py::test_pickled_message_is_refused sends a pickled message to a real
worker and checks it is refused without being unpickled; here only the settings behind it are pinned.
"""

from __future__ import annotations

import http.client
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis

from shared.training.config import TrainConfig
from shared.runs.store import FINISHED, RunStore, write_json_atomic
from shared.launch.services import start_redis
from shared.settings import Settings
from tests.imagegen import make_image, make_image_folder
from tests.procs import REPO, Processes, wait_for
from tests.tiny import TINY_TRAIN, tiny_form

pytestmark = pytest.mark.timeout(300)

USER, SECRET = "tester", "a-long-page-secret"
REDIS_PASSWORD = "r3dis:pass@word"  # URL-special characters on purpose
UPLOAD_MB = 1
TINY = dict(TINY_TRAIN, val_ratio=0.2, test_ratio=0.2)


class _Exploit:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class Secure:
    """Redis with a password, a worker, and the page with a login, a 1 MB upload cap and links out of its roots."""

    def __init__(self, root: Path):
        self.root = root
        self.models = root / "models"
        self.data_root = root / "data"
        self.data = make_image_folder(self.data_root / "shapes", classes=3, per_class=10, size=40)
        os.symlink("/etc/passwd", self.data_root / "passwd.jpg")  # a link inside a root pointing out of it
        self.models.mkdir()
        os.symlink("/etc", self.models / "etc")
        self.procs = Processes(root / "logs")
        self.redis = start_redis(root / "redis", password=REDIS_PASSWORD, appendonly=False)
        self.worker = self.procs.worker(self.redis.url, self.models, RESNET_LAB_LEASE_SECONDS=3)
        self.page = self.procs.page(self.models, self.data_root, redis_url=self.redis.url,
                                    RESNET_LAB_AUTH=f"{USER}:{SECRET}", RESNET_LAB_MAX_UPLOAD_MB=UPLOAD_MB)
        self.port = int(self.page.url.rsplit(":", 1)[1])
        self._cookies: str | None = None

    def request(self, method: str, path: str, *, body: bytes | None = None, headers: dict | None = None,
                login: bool = True) -> tuple[int, bytes]:
        """One raw HTTP request; the path is sent exactly as given (no `..` clean-up, unlike most clients)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            all_headers = dict(headers or {})
            if login:
                all_headers["Cookie"] = self.cookies()
            conn.request(method, path, body=body, headers=all_headers)
            response = conn.getresponse()
            return response.status, response.read()
        finally:
            conn.close()

    def cookies(self) -> str:
        if self._cookies is None:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
            conn.request("POST", "/login", body=f"username={USER}&password={SECRET}",
                         headers={"Content-Type": "application/x-www-form-urlencoded"})
            response = conn.getresponse()
            response.read()
            assert response.status == 200, response.status
            self._cookies = "; ".join(v.split(";", 1)[0] for k, v in response.getheaders() if k.lower() == "set-cookie")
            conn.close()
        return self._cookies

    def close(self) -> None:
        self.procs.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    s = Secure(tmp_path_factory.mktemp("secure"))
    yield s
    s.close()


# --- binding -----------------------------------------------------------------------------------------------------

def test_the_page_refuses_to_bind_beyond_loopback_without_credentials(tmp_path):
    env = {**os.environ, "RESNET_LAB_HOST": "0.0.0.0", "RESNET_LAB_MODELS_DIR": str(tmp_path / "models"),
           "RESNET_LAB_DATA_ROOTS": str(tmp_path / "data"), "RESNET_LAB_PORT": "1"}
    env.pop("RESNET_LAB_AUTH", None)
    env.pop("RESNET_LAB_MODEL_PLUGINS", None)  # the tiny test model's plugin would import torch (~6 s) first
    done = subprocess.run([sys.executable, "-m", "ui"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0
    assert "refusing to serve on 0.0.0.0" in done.stderr and "RESNET_LAB_AUTH=user:password" in done.stderr
    assert "ssh -L" in done.stderr  # the other way: keep loopback and tunnel
    env["RESNET_LAB_AUTH"] = "just-a-password"  # malformed credentials are refused too, not ignored
    done = subprocess.run([sys.executable, "-m", "ui"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode != 0 and "user:password" in done.stderr


def listening_addresses(port: int) -> set[str]:
    """Local addresses with a socket listening on `port` (from /proc/net/tcp and tcp6)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, _remote, state = line.split()[1:4]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


@pytest.mark.slow
def test_the_page_listens_on_loopback_only_and_asks_for_the_login(secure):
    assert Settings.from_env({}).host == "127.0.0.1"
    assert listening_addresses(secure.port) == {"0100007F"}, "only 127.0.0.1 may listen"
    status, _ = secure.request("GET", "/gradio_api/info", login=False)
    assert status == 401
    status, _ = secure.request("POST", "/login", body=f"username={USER}&password=wrong".encode(), login=False,
                               headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert status == 400
    assert secure.request("GET", "/gradio_api/info")[0] == 200


@pytest.mark.slow
def test_with_a_login_any_host_name_is_answered_but_other_pages_are_still_refused(secure):
    # served beyond loopback behind a login, the page's name is the operator's choice (RESNET_LAB_ALLOWED_HOSTS
    # narrows it); another web page's requests are refused whatever the login cookie says
    assert secure.request("GET", "/gradio_api/info", headers={"Host": "lab.example.com"})[0] == 200
    boundary = "resnetlabboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.jpg\"\r\n\r\nx\r\n"
            f"--{boundary}--\r\n").encode()
    status, _ = secure.request("POST", "/gradio_api/upload", body=body, headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Origin": "http://evil.example"})
    assert status == 403


# --- files -------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_the_file_route_serves_only_the_models_store_and_the_data_roots(secure):
    models = str(secure.models)
    refused = [
        "/etc/passwd",
        f"{models}/../../../../../../etc/passwd",                     # sent as is: no client-side clean-up
        f"{models}/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/%2e%2e/etc/passwd",  # percent-encoded dots
        "..%2f..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        str(secure.data_root / "passwd.jpg"),                          # a link in a data root pointing out
        f"{models}/etc/passwd",                                          # a link in the models store
        str(REPO / "pyproject.toml"),                                    # the app's own files
        f"{models}/",                                                    # folders are never listed
    ]
    for path in refused:
        status, body = secure.request("GET", f"/gradio_api/file={path}")
        assert status in (403, 404), (path, status)
        assert b"root:" not in body, path
    # what the page is there to serve still works
    image = next((secure.data / "class_0").iterdir())
    assert secure.request("GET", f"/gradio_api/file={image}")[0] == 200


@pytest.mark.slow
def test_the_file_route_does_not_fetch_loopback_urls(secure):
    # `file=http://...` makes Gradio fetch a URL for the caller: it must not reach services on this machine
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.settimeout(2.0)
        port = listener.getsockname()[1]
        status, _ = secure.request("GET", f"/gradio_api/file=http://127.0.0.1:{port}/secret")
        assert status >= 400
        with pytest.raises(socket.timeout):
            listener.accept()


@pytest.mark.slow
def test_uploads_over_the_cap_are_refused(secure, tmp_path):
    boundary = "resnetlabboundary"
    big = os.urandom(UPLOAD_MB * 1_000_000 + 200_000)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
    status, text = secure.request("POST", "/gradio_api/upload", body=body,
                                  headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 413, (status, text[:300])
    small = make_image(tmp_path / "small.jpg", 40)
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"small.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + small.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    status, _ = secure.request("POST", "/gradio_api/upload", body=body,
                               headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert status == 200


# --- Redis with a password ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_redis_with_a_password_works_end_to_end(secure):
    client = secure.page.client()
    params = tiny_form(secure.data)
    [run_id] = client.predict(params, api_name="/submit_runs")

    def finished():
        assert secure.worker.alive(), secure.worker.log()[-3000:]
        runs = {r["run_id"]: r for r in client.predict(api_name="/run_status")}
        return runs[run_id] if runs[run_id]["status"] in FINISHED else None

    run = wait_for(finished, 150, "the run to finish", interval=0.5)
    assert run["status"] == "succeeded", (run, secure.worker.log()[-3000:])
    assert RunStore(secure.models).status(run_id)["status"] == "succeeded"

    no_password = redis.Redis(host="127.0.0.1", port=secure.redis.port)
    with pytest.raises(redis.AuthenticationError):
        no_password.get("x")
    wrong = redis.Redis(host="127.0.0.1", port=secure.redis.port, password="wrong")
    with pytest.raises(redis.AuthenticationError):
        wrong.ping()
    assert REDIS_PASSWORD not in secure.worker.log() and REDIS_PASSWORD not in secure.page.log()


def test_task_messages_are_json_only():
    from ui.client import QueueClient
    from worker.celery_app import create_app

    settings = Settings(redis_url="redis://127.0.0.1:1/0")
    app = create_app(settings)
    assert app.conf.accept_content == ["json"] and app.conf.task_serializer == "json"
    assert app.conf.result_accept_content == ["json"] and app.conf.result_serializer == "json"
    page = QueueClient(settings).celery
    assert page.conf.task_serializer == "json" and page.conf.accept_content == ["json"]


# --- checkpoints -------------------------------------------------------------------------------------------------

def plant_evil_run(models: Path, marker: Path) -> str:
    """A run folder that looks finished but whose best.pt carries a code-running pickle (torch's zip format)."""
    import torch

    store = RunStore(models)
    run_id = store.create(TrainConfig(data_dir=str(models), **TINY))
    torch.save({"model": _Exploit(marker), "classes": ["a", "b"], "image_size": 32}, store.path(run_id) / "best.pt")
    status = store.status(run_id)
    write_json_atomic(store.path(run_id) / "status.json",
                      {**status, "status": "succeeded", "finished": time.time() + 3600})
    return run_id


def test_a_malicious_checkpoint_is_refused_by_the_predictor_and_the_cli(tmp_path, capsys):
    from shared.analysis.predict import Predictor
    from shared.cli import main
    from shared.training.checkpoint import CheckpointError

    marker = tmp_path / "pwned"
    run_id = plant_evil_run(tmp_path / "models", marker)
    with pytest.raises(CheckpointError, match="refusing to load"):
        Predictor(tmp_path / "models" / run_id)
    image = make_image(tmp_path / "x.jpg", 40)
    # `resnet-lab predict` through its entry function in this process (a pickle that ran would run here just the
    # same; a real process's exit code and one-line errors are tests/test_cli.py's)
    code = main(["--models-dir", str(tmp_path / "models"), "predict", "latest", str(image)])
    err = capsys.readouterr().err
    assert code == 2 and "refusing to load" in err and "Traceback" not in err, err
    assert not marker.exists(), "the checkpoint's pickle ran"


@pytest.mark.slow
def test_a_malicious_checkpoint_is_refused_by_the_page(secure, tmp_path):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    marker = tmp_path / "pwned"
    run_id = plant_evil_run(secure.models, marker)
    try:
        image = make_image(tmp_path / "x.jpg", 40)
        client = secure.page.client()
        for model in (run_id, "latest"):  # picked by id, and as the newest finished run
            with pytest.raises(AppError, match="refusing to load"):
                client.predict(handle_file(str(image)), model, api_name="/predict")
        assert not marker.exists(), "the checkpoint's pickle ran in the page"
        assert secure.page.alive()
    finally:
        RunStore(secure.models).delete(run_id)
