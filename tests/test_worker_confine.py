"""The worker trusts nothing in Redis (issue 13, item 6): a real `python -m worker` on a Redis with a password gets
hostile task messages sent by name, as anyone holding the Redis password could send them.

`predict_batch` only lists and reads images inside the worker's own data roots (RESNET_LAB_DATA_ROOTS), `evaluate`
only reads folders there and only writes where a split name says, and `celery inspect conf` shows neither the
page login nor the Redis password.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest
from celery import Celery

from shared.runs.store import RunStore
from shared.launch.services import start_redis
from tests.imagegen import make_image_folder
from tests.procs import REPO, Processes

pytestmark = pytest.mark.timeout(300)

PASSWORD = "Zq9x:xYq7@wv7Kp/k2Jm"  # URL-special characters on purpose; each piece distinctive
AUTH_SECRET = "s3cret-AUTH-9f2"
OUTSIDE_MESSAGE = "is outside the data folders"


class Stack:
    """Redis with a password, one trained run, a worker whose data root holds the dataset and links out of it."""

    def __init__(self, root: Path):
        self.data_root = root / "data"
        self.dataset = make_image_folder(self.data_root / "shapes", classes=3, per_class=8, size=40)
        # the same classes outside the root: evaluating it would succeed, so only the confinement can refuse it
        self.outside = make_image_folder(root / "outside", classes=3, per_class=2, size=40)
        self.models = root / "models"
        self.run_id = self._train()
        os.symlink(self.outside, self.data_root / "escape")
        self.link = self.dataset / "class_0" / "link.jpg"
        os.symlink(self.outside / "class_1" / "class_1_000.jpg", self.link)
        self.redis = start_redis(root / "redis", password=PASSWORD, appendonly=False)
        self.procs = Processes(root / "logs")
        self.worker = self.procs.worker(self.redis.url, self.models, RESNET_LAB_DATA_ROOTS=self.data_root,
                                        RESNET_LAB_AUTH=f"tester:{AUTH_SECRET}")
        # the attacker's own Celery app: the broker and a task name are all it needs
        self.app = Celery("attacker", broker=self.redis.url, backend=self.redis.url)
        self.app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

    def _train(self) -> str:
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RESNET_LAB_MODELS_DIR": str(self.models),
               "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "shared.cli", "train", "--data-dir", str(self.dataset),
                               "--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
                               "--augment", "none", "--device", "cpu", "--no-amp", "--skip-eval"],
                              capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
        assert done.returncode == 0, done.stderr[-3000:]
        [run_id] = RunStore(self.models).ids()
        return run_id

    def send(self, name: str, *args, **kwargs):
        """Send a task by name and wait for its end; returns the AsyncResult (state SUCCESS or FAILURE)."""
        result = self.app.send_task(name, args=list(args), kwargs=kwargs)
        result.get(timeout=120, propagate=False)
        assert self.worker.alive(), self.worker.log()[-3000:]
        return result

    def run_files(self) -> list[str]:
        return sorted(p.name for p in (self.models / self.run_id).iterdir())

    def close(self) -> None:
        self.procs.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("confine"))
    yield s
    s.close()


def test_inspect_conf_shows_neither_the_login_nor_the_redis_password(stack):
    # first: the solo pool answers control commands only between tasks
    replies = stack.app.control.inspect(timeout=10).conf()
    assert replies, "the worker did not answer `inspect conf`"
    dump = json.dumps(replies)
    assert "broker_url" in dump, "expected the worker's configuration in the reply"
    for secret in (AUTH_SECRET, PASSWORD, quote(PASSWORD, safe=""), *re.split(r"[:@/]", PASSWORD)):
        assert secret not in dump, f"`celery inspect conf` shows {secret!r}"
    assert "resnet_lab_settings" not in dump


def test_predict_batch_lists_and_reads_nothing_outside_the_data_roots(stack):
    before = stack.run_files()
    hostile = [[str(stack.outside)], [str(stack.data_root / "escape")], ["../outside"],
               [str(stack.outside / "class_0" / "class_0_000.jpg")], ["/"], ["/etc/passwd"],
               [str(stack.dataset), str(stack.outside)]]
    for sources in hostile:
        result = stack.send("resnet_lab.predict_batch", stack.run_id, sources)
        assert result.state == "FAILURE", (sources, result.state, result.result)
        assert OUTSIDE_MESSAGE in str(result.result), (sources, result.result)
    assert stack.run_files() == before, "a refused batch wrote into the run folder"

    # inside the root it works; the link out of it gets an error row instead of being read
    result = stack.send("resnet_lab.predict_batch", stack.run_id, [str(stack.dataset)])
    assert result.state == "SUCCESS", (result.state, result.result, stack.worker.log()[-3000:])
    with open(result.result["path"], newline="") as fh:
        rows = list(csv.reader(fh))[1:]
    assert len(rows) == 3 * 8 + 1
    assert not [r for r in rows if str(stack.outside) in ",".join(r)], "a file outside the root was listed"
    [link_row] = [r for r in rows if r[0].endswith("link.jpg")]
    assert "not inside the data folders" in link_row[1] and len(link_row) == 2, link_row


def test_evaluate_reads_no_folder_outside_the_data_roots_and_writes_only_where_a_split_says(stack):
    before = stack.run_files()
    for data_dir in (str(stack.outside), str(stack.data_root / "escape"), "../outside", "/etc"):
        result = stack.send("resnet_lab.evaluate", stack.run_id, data_dir=data_dir)
        assert result.state == "FAILURE", (data_dir, result.state, result.result)
        assert OUTSIDE_MESSAGE in str(result.result), (data_dir, result.result)
    for split in ("../../escape", "train/../../x", ["test"]):
        result = stack.send("resnet_lab.evaluate", stack.run_id, split=split)
        assert result.state == "FAILURE" and "split must be one of train, val, test" in str(result.result), split
    assert stack.run_files() == before, "a refused evaluation wrote into the run folder"


def test_predict_batch_refuses_odd_arguments(stack):
    for args, expected in (((stack.run_id, str(stack.dataset)), "sources must be a non-empty list"),
                           ((stack.run_id, []), "sources must be a non-empty list"),
                           ((stack.run_id, [str(stack.dataset)], 10**9), "top_k must be a whole number between"),
                           ((stack.run_id, [str(stack.dataset)], 5, 0), "chunk must be a whole number between")):
        result = stack.send("resnet_lab.predict_batch", *args)
        assert result.state == "FAILURE" and expected in str(result.result), (args, result.result)
