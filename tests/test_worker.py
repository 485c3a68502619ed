"""The worker end to end: real redis-server, real `python -m worker` processes, runs submitted by the page's client.

Tiny runs (tests/tiny.py at 32 px, a few dozen generated images, one torch thread) keep each test to seconds of
training; most of the time is a worker starting (importing torch), so the tests that use a worker as it is share
one (`served`). A worker killed with SIGKILL mid-run: tests/test_reliability.py, three times in one run.
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from shared.training.config import TrainConfig
from shared.runs.registry import RunRegistry
from shared.runs.store import FINISHED, RunStore
from shared.settings import Settings
from tests.imagegen import make_image_folder
from tests.procs import Processes, wait_for
from tests.tiny import TINY_TRAIN
from ui.client import TRAIN_TASK, QueueClient

pytestmark = pytest.mark.timeout(300)

TINY = dict(TINY_TRAIN, epochs=2, val_ratio=0.2, test_ratio=0.2)
LEASE_SECONDS = 3  # the workers here give up a dead worker's run after 3 s (production: 30 s)
SIGTERM_EPOCHS = 10  # the tiny model's epochs take a fraction of a second here
STATUS_FIELDS = ("status", "created", "started", "finished", "error", "worker", "best", "task_id")


class Lab:
    def __init__(self, root: Path, redis_url: str):
        self.models = root / "models"
        self.data = make_image_folder(root / "data", classes=3, per_class=10, size=40)
        self.redis_url = redis_url
        self.client = QueueClient(Settings(models_dir=self.models, redis_url=redis_url, visibility_timeout=3600))
        self.store: RunStore = self.client.store
        self.registry: RunRegistry = self.client.registry

    def config(self, data_dir: Path | None = None, **changes) -> TrainConfig:
        return TrainConfig(data_dir=str(data_dir or self.data), **{**TINY, **changes})

    def worker_env(self) -> dict:
        # the worker reads predict_batch's and evaluate's paths only inside its own data roots
        return {"RESNET_LAB_LEASE_SECONDS": LEASE_SECONDS, "RESNET_LAB_VISIBILITY_TIMEOUT": 3600,
                "RESNET_LAB_DATA_ROOTS": self.data}


@pytest.fixture
def lab(tmp_path, redis_url) -> Lab:
    return Lab(tmp_path, redis_url)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A Lab with one worker (`.worker`) for the tests that use a worker as it is: started once for the module (a
    start costs seconds of CPU), on a Redis of its own that no test flushes. Each test names its runs by id, waits
    for its own tasks to end and so leaves the worker idle."""
    from shared.launch.services import start_redis

    root = tmp_path_factory.mktemp("served")
    server = start_redis(root / "redis", appendonly=False)
    procs = Processes(root / "logs")
    try:
        lab = Lab(root, server.url)
        lab.worker = procs.worker(server.url, lab.models, **lab.worker_env())
        yield lab
    finally:
        procs.close()
        server.stop()


def wait_finished(lab: Lab, run_id: str, timeout: float = 120.0, worker=None) -> dict:
    def finished():
        if worker is not None and not worker.alive():
            raise AssertionError(f"the worker died:\n{worker.log()[-3000:]}")
        record = lab.registry.get(run_id)
        return record if record and record["status"] in FINISHED else None

    try:
        return wait_for(finished, timeout, f"run {run_id} to finish")
    except AssertionError:
        if worker is not None:
            print(worker.log()[-3000:])
        raise


def assert_store_and_registry_agree(lab: Lab, run_id: str) -> dict:
    on_disk, in_redis = lab.store.status(run_id), lab.registry.get(run_id)
    for field in STATUS_FIELDS:
        assert on_disk.get(field) == in_redis.get(field), f"{field}: status.json {on_disk.get(field)!r} " \
                                                           f"!= registry {in_redis.get(field)!r}"
    return on_disk


def epochs_of(records: list[dict]) -> list[int]:
    return [r["epoch"] for r in records]


@pytest.mark.slow  # real worker processes
def test_three_queued_runs_succeed_with_live_progress(served):
    lab, worker = served, served.worker
    run_ids = lab.client.submit([lab.config(lr=lr) for lr in (1e-3, 2e-3, 3e-3)])
    # the idle worker may have taken the first one already; the solo worker takes one at a time
    statuses = [lab.registry.get(r)["status"] for r in run_ids]
    assert statuses[0] in ("queued", "running") and statuses[1:] == ["queued"] * 2, statuses

    live_progress, progress_state = set(), set()

    def all_finished_noting_live_progress() -> bool:
        assert worker.alive(), worker.log()[-3000:]
        for record in lab.client.list_runs():
            if record["run_id"] not in run_ids:  # the module's worker serves other tests' runs too
                continue
            progress = record["progress"] or {}
            if record["status"] == "running" and progress.get("phase") == "training" and progress.get("batch"):
                live_progress.add(record["run_id"])
                if lab.client.celery.AsyncResult(record["run_id"]).state == "PROGRESS":
                    progress_state.add(record["run_id"])
        return all(lab.registry.get(r)["status"] in FINISHED for r in run_ids)

    wait_for(all_finished_noting_live_progress, 180, "the three runs to finish", describe=lambda: worker.log()[-3000:])

    for run_id in run_ids:
        status = assert_store_and_registry_agree(lab, run_id)
        assert status["status"] == "succeeded", status
        assert status["worker"].startswith("celery@") and status["task_id"] == run_id
        assert 0 <= status["best"]["best_val_acc"] <= 1 and status["best"]["epochs_run"] == 2
        assert status["best"]["eval_split"] == "test" and 0 <= status["best"]["eval_accuracy"] <= 1
        # the worker's RESNET_LAB_EVAL_FIGURES (tests/conftest.py: none) reaches evaluate_run and is recorded
        evaluation = json.loads((lab.store.path(run_id) / "eval" / "eval.json").read_text())
        assert evaluation["figure_level"] == "none" and evaluation["figures"] == {}
        assert epochs_of(lab.store.metrics(run_id)) == [1, 2]
        progress = lab.registry.progress(run_id)
        assert progress["phase"] == "succeeded" and epochs_of(progress["history"]) == [1, 2]
        assert json.loads((lab.store.path(run_id) / "config.json").read_text())["env"]["torch_threads"] == 1
        assert lab.client.celery.AsyncResult(run_id).get(timeout=10)["status"] == "succeeded"
    assert live_progress, "no registry progress with phase 'training' and a batch counter was seen"
    assert progress_state, "the Celery task state was never PROGRESS while a run trained"

    # a background prediction over a folder (plus one missing file) with the new model
    task_id = lab.client.submit_predict_batch(run_ids[0], [str(lab.data), str(lab.data / "missing.jpg")])
    result = lab.client.celery.AsyncResult(task_id).get(timeout=60)
    assert result["count"] == 31 and result["errors"] == 1
    csv_path = Path(result["path"])
    assert csv_path.parent == lab.store.path(run_ids[0]) and csv_path.name.startswith("predictions-")
    rows = csv_path.read_text().splitlines()
    assert len(rows) == 32 and rows[0].startswith("source,error,class_1,probability_1")

    # re-evaluation of a finished run on another split leaves the run's training progress alone
    result = lab.client.celery.AsyncResult(lab.client.submit_evaluate(run_ids[0], split="val")).get(timeout=120)
    assert result["run_id"] == run_ids[0] and result["split"] == "val" and 0 <= result["accuracy"] <= 1
    assert result["figure_level"] == "none" and 0 <= result["macro_f1"] <= 1
    assert lab.registry.progress(run_ids[0])["phase"] == "succeeded"


@pytest.mark.slow  # real worker processes
def test_cancel_queued_and_running_runs(served, tmp_path):
    lab, worker = served, served.worker
    bigger = make_image_folder(tmp_path / "bigger", classes=3, per_class=24, size=40)
    running, queued = lab.client.submit([lab.config(bigger, epochs=20), lab.config()])

    wait_for(lambda: len(lab.store.metrics(running)) >= 1, 120, "the first epoch to finish")
    assert lab.client.cancel(queued)["status"] == "cancelled"
    cancelled_at = time.monotonic()
    lab.client.cancel(running)

    record = wait_finished(lab, running, timeout=30, worker=worker)
    assert time.monotonic() - cancelled_at < 10, "a running run must stop within a batch or so"
    assert record["status"] == "cancelled" and "cancelled while running" in record["error"]
    assert (lab.store.path(running) / "last.pt").is_file(), "the last finished epoch's checkpoint is kept"
    assert len(lab.store.metrics(running)) < 20
    assert_store_and_registry_agree(lab, running)

    # the queued run's message is delivered after the running one ends, and skipped
    wait_for(lambda: f"skipping run {queued}" in worker.log(), 30, "the cancelled run's message to be skipped")
    status = assert_store_and_registry_agree(lab, queued)
    assert status["status"] == "cancelled" and status["started"] is None
    assert not (lab.store.path(queued) / "metrics.jsonl").exists()
    assert not (lab.store.path(queued) / "split.json").exists(), "a cancelled queued run must never start"
    assert worker.alive()


@pytest.mark.slow  # real worker processes
def test_failing_runs_end_failed_and_the_worker_serves_on(served, tmp_path):
    lab, worker = served, served.worker
    # a dataset deleted after submission: the worker (idle, it starts the run at once) finds no folder
    doomed = tmp_path / "doomed"
    bad_weights = tmp_path / "weights.pt"
    bad_weights.write_bytes(b"this is not a state dict")
    no_data, bad_file = lab.client.submit([lab.config(doomed), lab.config(weights=str(bad_weights))])
    # as if three workers had died training it: queued as submit does, the crash count in its record before its
    # message goes out (the idle worker takes each message at once)
    killer = lab.store.create(lab.config())
    lab.registry.put({**lab.store.status(killer), "config": lab.config().to_dict(), "crashes": 3})
    lab.client.celery.send_task(TRAIN_TASK, args=[killer], task_id=killer)

    record = wait_finished(lab, no_data, worker=worker)
    assert record["status"] == "failed" and str(doomed) in record["error"] and "does not exist" in record["error"]
    record = wait_finished(lab, bad_file, worker=worker)
    assert record["status"] == "failed" and f"cannot load weights from {bad_weights}" in record["error"], record
    for run_id in (no_data, bad_file):
        assert_store_and_registry_agree(lab, run_id)
        assert lab.registry.progress(run_id)["phase"] == "failed"
    record = wait_finished(lab, killer, worker=worker)
    assert record["status"] == "failed" and "died 3 times" in record["error"] and record["started"] is None
    assert_store_and_registry_agree(lab, killer)
    assert lab.client.celery.AsyncResult(no_data).state == "FAILURE"

    submitted = time.monotonic()
    [good] = lab.client.submit([lab.config()])
    wait_for(lambda: lab.registry.get(good)["status"] != "queued", 10, "the next run to start")
    latency = time.monotonic() - submitted
    print(f"submit -> running on an idle worker: {latency * 1000:.0f} ms")
    assert latency < 3.0
    assert wait_finished(lab, good, worker=worker)["status"] == "succeeded"
    assert worker.alive()


class _WritesMarker:
    """Unpickling this creates a file: proof that a worker decoded a pickled message."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.slow  # real worker processes
def test_pickled_message_is_refused(served, tmp_path):
    from celery import Celery

    lab, worker = served, served.worker
    run_id = lab.store.create(lab.config())  # in the run store only: no JSON message will ever be sent for it
    marker = tmp_path / "unpickled"
    evil = Celery("evil", broker=lab.redis_url)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle", "json"])
    evil.send_task(TRAIN_TASK, args=[run_id, _WritesMarker(marker)], serializer="pickle")

    wait_for(lambda: "ContentDisallowed" in worker.log() or "untrusted content" in worker.log(), 60,
             "the worker to log the refusal")
    [good] = lab.client.submit([lab.config()])
    assert wait_finished(lab, good, worker=worker)["status"] == "succeeded"
    assert not marker.exists(), "the worker unpickled the message"
    assert lab.store.status(run_id)["status"] == "queued"
    assert not (lab.store.path(run_id) / "metrics.jsonl").exists()
    assert worker.alive()


@pytest.mark.slow  # real worker processes
def test_sigterm_hands_the_running_run_back_and_the_next_worker_resumes_it(lab, start_worker):
    bigger = make_image_folder(lab.models.parent / "bigger", classes=3, per_class=24, size=40)
    # many short epochs: the run is still training when the SIGTERM comes, however busy the machine
    [run_id] = lab.client.submit([lab.config(bigger, epochs=SIGTERM_EPOCHS)])
    first = start_worker(lab.models, **lab.worker_env())
    wait_for(lambda: len(lab.store.metrics(run_id)) == 1, 120, "the first epoch to finish")

    stopping = time.monotonic()
    assert first.stop(timeout=30) == 0, first.log()[-3000:]
    assert time.monotonic() - stopping < 15, "a warm shutdown must not wait for the whole run"
    status = assert_store_and_registry_agree(lab, run_id)
    assert status["status"] == "queued" and lab.registry.progress(run_id)["phase"] == "queued"
    handed_back = epochs_of(lab.store.metrics(run_id))
    assert handed_back == list(range(1, len(handed_back) + 1)) and len(handed_back) < SIGTERM_EPOCHS, handed_back

    second = start_worker(lab.models, **lab.worker_env())
    assert wait_finished(lab, run_id, worker=second)["status"] == "succeeded"
    every_epoch = list(range(1, SIGTERM_EPOCHS + 1))
    assert epochs_of(lab.store.metrics(run_id)) == every_epoch
    assert epochs_of(lab.registry.progress(run_id)["history"]) == every_epoch
    assert "resuming" in second.log()


def test_find_orphans_reads_leases_and_queued_messages(lab):
    from worker.recovery import find_orphans, lease_key

    def record(status, **fields):
        run_id = lab.store.create(lab.config())
        lab.store.set_status(run_id, status)
        lab.registry.put({**lab.store.status(run_id), "created": time.time() - 60, **fields})
        return run_id

    dead = record("running", task_id="t1", worker="celery@gone")
    alive = record("running", task_id="t2")
    lab.registry.r.set(lease_key(alive), "someone", ex=30)
    by_cli = record("running")  # `resnet-lab train` in a terminal: no task, no lease, not ours to take
    lost = record("queued")
    sent = record("queued")
    lab.client.celery.send_task(TRAIN_TASK, args=[sent], task_id=sent)
    cancelled = record("queued")
    lab.registry.request_cancel(cancelled)
    record("succeeded", task_id="t3")

    assert sorted(find_orphans(lab.registry, queued_grace=30)) == sorted([
        (dead, "its worker celery@gone stopped renewing its lease", True),
        (lost, "no queued message refers to it", False)])
    assert [run_id for run_id, *_ in find_orphans(lab.registry, queued_grace=120)] == [dead]


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.slow  # real worker processes
def test_one_worker_process_per_gpu_and_sigterm_stops_them_all(lab, start_worker):
    # ids given explicitly, so no GPU is needed: each child only sees "its" device and trains on the CPU here
    env = {**lab.worker_env(), "RESNET_LAB_WORKER_THREADS": 2}  # --threads must win over it
    parent = start_worker(lab.models, args=["--gpus", "0,1", "--threads", "1"], ready=2, **env)
    log = parent.log()
    assert "gpu0@" in log and "gpu1@" in log
    children = _children(parent.proc.pid)
    assert len(children) == 2
    for pid in children:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert any(v in environ for v in (b"CUDA_VISIBLE_DEVICES=0", b"CUDA_VISIBLE_DEVICES=1"))

    # one child busy with a long run, so the other must take the next one (which fails at once: no data)
    [long_run] = lab.client.submit([lab.config(epochs=50)])
    wait_for(lambda: lab.registry.get(long_run)["status"] == "running", 60, "the long run to start")
    [no_data] = lab.client.submit([lab.config(lab.models.parent / "missing")])
    assert wait_finished(lab, no_data, worker=parent)["status"] == "failed"
    lab.client.cancel(long_run)
    assert wait_finished(lab, long_run, worker=parent)["status"] == "cancelled"
    workers = {lab.registry.get(r)["worker"] for r in (long_run, no_data)}
    assert {w.split("@")[0] for w in workers} == {"gpu0", "gpu1"}, workers
    assert json.loads((lab.store.path(long_run) / "config.json").read_text())["env"]["torch_threads"] == 1

    parent.proc.send_signal(signal.SIGTERM)  # to the parent only: it must pass it on
    assert parent.proc.wait(timeout=30) == 0, parent.log()[-3000:]
    wait_for(lambda: not any(_running(pid) for pid in children), 10, "the GPU workers to exit")


def test_failure_reasons_are_readable(tmp_path):
    import torch

    from shared.data.scan import DatasetError
    from worker.tasks import failure_reason

    config = TrainConfig(data_dir=str(tmp_path), batch_size=64)
    oom = failure_reason(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), config)
    assert oom == "out of GPU memory at batch size 64: lower the batch size (or the image size)"
    assert failure_reason(DatasetError("no class folders in /data — add some")) == "no class folders in /data — add some"
    assert failure_reason(KeyError("model")) == "KeyError: 'model'"
