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
from urllib.parse import quote

import pytest
from celery import Celery

from tests.imagegen import make_image_folder
from tests.procs import SharedStack

pytestmark = pytest.mark.timeout(300)

PASSWORD = SharedStack.REDIS_PASSWORD
AUTH_SECRET = SharedStack.WORKER_AUTH.split(":", 1)[1]
OUTSIDE_MESSAGE = "is outside the data folders"


class Stack:
    """The session's worker (tests/procs.py SharedStack: Redis with a password, a page login in the worker's
    environment, a finished run), a dataset in a data-root folder of this module's own with links out of it, and
    the attacker's Celery app."""

    def __init__(self, stack: SharedStack):
        self.stack, self.worker, self.run_id, self.models = stack, stack.worker, stack.run_id, stack.models
        self.data_root = stack.folder("confine")
        self.dataset = make_image_folder(self.data_root / "shapes", classes=3, per_class=8, size=40)
        # the same classes outside the root: evaluating it would succeed, so only the confinement can refuse it
        self.outside = make_image_folder(stack.data_root.parent / "confine-outside", classes=3, per_class=2, size=40)
        os.symlink(self.outside, self.data_root / "escape")
        self.link = self.dataset / "class_0" / "link.jpg"
        os.symlink(self.outside / "class_1" / "class_1_000.jpg", self.link)
        # the attacker's own Celery app: the broker and a task name are all it needs
        self.app = Celery("attacker", broker=stack.redis_url, backend=stack.redis_url)
        self.app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")

    def send(self, name: str, *args, **kwargs):
        """Send a task by name and wait for its end; returns the AsyncResult (state SUCCESS or FAILURE)."""
        result = self.app.send_task(name, args=list(args), kwargs=kwargs)
        result.get(timeout=120, propagate=False)
        assert self.worker.alive(), self.worker.log()[-3000:]
        return result

    def run_files(self) -> list[str]:
        return sorted(p.name for p in (self.models / self.run_id).iterdir())


@pytest.fixture(scope="module")
def stack(session_stack):
    return Stack(session_stack)


def test_inspect_conf_shows_neither_the_login_nor_the_redis_password(stack):
    # first: the solo pool answers control commands only between tasks
    replies = stack.app.control.inspect(timeout=10, limit=1).conf()  # limit: done at the first reply
    assert replies, "the worker did not answer `inspect conf`"
    dump = json.dumps(replies)
    assert "broker_url" in dump, "expected the worker's configuration in the reply"
    for secret in (AUTH_SECRET, PASSWORD, quote(PASSWORD, safe=""), *re.split(r"[:@/]", PASSWORD)):
        assert secret not in dump, f"`celery inspect conf` shows {secret!r}"
    assert "resnet_lab_settings" not in dump


def test_predict_batch_lists_and_reads_nothing_outside_the_data_roots(stack):
    before = stack.run_files()
    hostile = [[str(stack.outside)], [str(stack.data_root / "escape")], ["../confine-outside"],
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
    for data_dir in (str(stack.outside), str(stack.data_root / "escape"), "../confine-outside", "/etc"):
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


def test_data_issues_reads_no_folder_outside_the_data_roots(stack):
    before = stack.run_files()
    for data_dir in (str(stack.outside), str(stack.data_root / "escape"), "../confine-outside", "/etc", 5):
        result = stack.send("resnet_lab.data_issues", stack.run_id, data_dir=data_dir)
        assert result.state == "FAILURE", (data_dir, result.state, result.result)
        assert OUTSIDE_MESSAGE in str(result.result) or "expected a path as text" in str(result.result), result.result
    for run_id in ("../models", "/etc", ""):
        result = stack.send("resnet_lab.data_issues", run_id, data_dir=str(stack.dataset))
        assert result.state == "FAILURE", (run_id, result.result)
    assert stack.run_files() == before, "a refused report was written into the run folder"


def test_lr_find_reads_no_folder_outside_the_data_roots_and_refuses_odd_settings(stack):
    from tests.tiny import TINY_TRAIN

    job = "0" * 32
    config = {**TINY_TRAIN, "data_dir": str(stack.dataset)}
    refused = [
        ({**config, "data_dir": data_dir}, OUTSIDE_MESSAGE)
        for data_dir in (str(stack.outside), str(stack.data_root / "escape"), "../confine-outside", "/etc")
    ] + [({**config, "batch_size": 10**9}, "batch_size must be between 1 and 1024"),
         ({**config, "image_size": 10**6}, "image_size must be between 32 and 1024"),
         ({**config, "model": "garbage"}, "model must be one of"),
         ({**config, "weights": "/etc/passwd"}, "no such weights name, nor a state-dict file"),
         ({**config, "shell": "rm -rf /"}, "unknown config field(s): shell"),
         ("not settings", "config must be a JSON object")]
    for bad, expected in refused:
        result = stack.send("resnet_lab.lr_find", job, bad)
        assert result.state == "FAILURE" and expected in str(result.result), (bad, result.result)
    for bad_job in ("../../etc/x", "", 5):
        result = stack.send("resnet_lab.lr_find", bad_job, config)
        assert result.state == "FAILURE" and "no range test" in str(result.result), (bad_job, result.result)
    assert not (stack.models / "lr-find" / f"{job}.json").exists(), "a refused range test wrote its result"
