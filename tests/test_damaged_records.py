"""Damaged run records never stop anything, and a run deleted while a worker starts it leaves no ghost.

What a power loss during a write (by an older version: writes are now fsynced, see tests/test_fsutil.py), a full
disk or a hand edit can leave in a run folder: an empty or garbled status.json or config.json, garbage lines in
metrics.jsonl, an empty eval.json. Each is listed as DAMAGED (folder and fix named) or skipped, never fatal: not
for `resnet-lab up`, the page's Runs list, Results, Predict "latest" or the Redis-down fallback.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from shared.training.config import TrainConfig
from shared.training.engine import fit
from shared.runs.registry import PREFIX, RunRegistry
from shared.runs.store import DAMAGED, RunDamaged, RunNotFound, RunStore, read_metrics
from shared.launch.services import find_free_port
from shared.settings import Settings
from tests.imagegen import make_image_folder
from tests.procs import wait_for
from tests.tiny import TINY_TRAIN
from tests.test_up import Up, marked_processes, marker  # noqa: F401 - marker is a fixture

REPO = Path(__file__).resolve().parents[1]
TINY = dict(TINY_TRAIN, test_ratio=0.0, epochs=1)
EMPTY_ID = "20240101-000000-resnet18-e0e0e0"     # status.json empty (a power cut mid-write)
GARBLED_ID = "20240101-000001-resnet18-bad000"   # status.json binary garbage
WRONG_ID = "20240101-000002-resnet18-bad001"     # status.json valid JSON, but no run status
NOCONF_ID = "20240101-000003-resnet18-bad002"    # status.json fine (failed), config.json garbled


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes", classes=2, per_class=8, size=40)


@pytest.fixture(scope="module")
def good_run(data, tmp_path_factory) -> tuple[Path, str]:
    """(a models folder holding one tiny succeeded run, its id): trained once, copied by `models`."""
    models = tmp_path_factory.mktemp("trained") / "models"
    store = RunStore(models)
    config = TrainConfig(data_dir=str(data), **TINY)
    run_id = store.create(config)
    best = fit(config, store.path(run_id), cache_dir=models.parent / "cache")
    store.set_status(run_id, "succeeded", best=best)
    return models, run_id


def damage(models: Path, good_id: str) -> None:
    """The damaged folders next to the good run, and garbage in the good run's metrics and eval.json."""
    store = RunStore(models)
    config = json.loads((store.path(good_id) / "config.json").read_text())
    for run_id, status_bytes in ((EMPTY_ID, b""), (GARBLED_ID, b"\x00\xff\xfe garbage"),
                                 (WRONG_ID, b'{"status": "exploded"}'), (NOCONF_ID, None)):
        folder = models / run_id
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
        (folder / "status.json").write_bytes(status_bytes if status_bytes is not None else json.dumps(
            {"run_id": NOCONF_ID, "status": "failed", "created": 1.0, "started": None, "finished": 2.0,
             "error": "boom", "worker": None, "best": None}).encode())
    (models / NOCONF_ID / "config.json").write_text('{"model": "resnet18", "lr": ')
    with open(store.path(good_id) / "metrics.jsonl", "ab") as fh:
        fh.write(b'[1, 2]\n"text"\n\x00\xff\n{"epoch": "two"}\n{"epoch": 2, "train_lo')
    (store.path(good_id) / "eval").mkdir(exist_ok=True)
    (store.path(good_id) / "eval" / "eval.json").write_bytes(b"")


@pytest.fixture
def models(good_run, tmp_path) -> Path:
    source, good_id = good_run
    models = tmp_path / "models"
    shutil.copytree(source, models)
    damage(models, good_id)
    return models


# --- the store, the registry, the page's lists -------------------------------------------------------------------

def test_the_store_lists_damaged_runs_as_damaged_and_keeps_everything_else_working(models, good_run):
    _, good_id = good_run
    store = RunStore(models)
    listed = {r["run_id"]: r for r in store.list()}
    assert set(listed) == {good_id, EMPTY_ID, GARBLED_ID, WRONG_ID, NOCONF_ID}
    assert listed[good_id]["status"] == "succeeded" and listed[NOCONF_ID]["status"] == "failed"
    for run_id, problem in ((EMPTY_ID, "is empty or not JSON"), (GARBLED_ID, "is empty or not JSON"),
                            (WRONG_ID, "holds no valid status")):
        record = listed[run_id]
        assert record["status"] == DAMAGED, record
        assert f"status.json {problem}" in record["error"]
        assert f"delete the folder {models / run_id} or restore its status.json" in record["error"]
        with pytest.raises(RunDamaged, match="delete the folder"):
            store.status(run_id)
    assert store.latest_succeeded() == good_id

    with pytest.raises(RunDamaged, match=f"config.json is empty or not JSON — delete the folder {models / NOCONF_ID}"):
        store.config(NOCONF_ID)
    assert store.display_config(NOCONF_ID) == {}
    assert [r["epoch"] for r in read_metrics(store.path(good_id))] == [1]  # the garbage lines are skipped

    with pytest.raises(RunDamaged):  # a status change never overwrites what it cannot read
        store.set_status(EMPTY_ID, "running")
    store.delete(EMPTY_ID)  # deleting is the advertised fix
    assert not (models / EMPTY_ID).exists() and EMPTY_ID not in store.ids()


def test_the_registry_resync_and_the_redis_down_fallback_show_damaged_runs(models, good_run, redis_url):
    from ui.app import Lab

    _, good_id = good_run
    lab = Lab(Settings(models_dir=models, data_roots=(models,), redis_url=redis_url))
    records, problem = lab.snapshot()  # an empty registry: rebuilt from the folders at once
    assert problem is None
    by_id = {r["run_id"]: r for r in records}
    assert by_id[EMPTY_ID]["status"] == DAMAGED and str(models / EMPTY_ID) in by_id[EMPTY_ID]["error"]
    assert by_id[good_id]["status"] == "succeeded" and by_id[NOCONF_ID]["config"] is None
    assert [r["run_id"] for r in lab.succeeded_runs()] == [good_id]

    # restored from a backup: the DAMAGED record takes the folder's status again
    (models / EMPTY_ID / "status.json").write_text(json.dumps({"status": "cancelled", "created": 1.0}))
    by_id = {r["run_id"]: r for r in lab.snapshot()[0]}
    assert by_id[EMPTY_ID]["status"] == "cancelled" and lab.client().registry.get(EMPTY_ID)["status"] == "cancelled"

    down = Lab(Settings(models_dir=models, data_roots=(models,), redis_url=f"redis://127.0.0.1:{find_free_port()}/0"))
    records, problem = down.snapshot()
    assert "cannot reach Redis" in problem
    by_id = {r["run_id"]: r for r in records}
    assert by_id[GARBLED_ID]["status"] == DAMAGED and by_id[good_id]["status"] == "succeeded"
    assert by_id[NOCONF_ID]["config"] == {}


def test_the_cli_lists_damaged_runs(models, capsys):
    from shared.cli import main

    code = main(["--models-dir", str(models), "runs", "list"])  # an exception it let out fails the test here
    out, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err, err
    assert f"{EMPTY_ID:38} {DAMAGED}" in out


# --- the real page, started by `resnet-lab up` -------------------------------------------------------------------

@pytest.mark.slow  # `up` and a real page
@pytest.mark.timeout(300)
def test_up_and_the_page_start_over_damaged_runs_and_show_them(models, good_run, data, tmp_path, marker, redis_url):
    """Before: the page died at start with a JSONDecodeError from RunStore.list(), and `up` stopped everything."""
    from gradio_client import Client, handle_file

    _, good_id = good_run
    up = Up(tmp_path, marker, models_dir=models, stop_timeout=10, ui_cmd=[sys.executable, "-m", "ui"],
            env={"REDIS_URL": redis_url, "RESNET_LAB_DATA_ROOTS": str(data.parent),
                 "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False",
                 "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": str(REPO)})
    try:
        url = up.url
        up.wait_output("resnet-lab is up", timeout=240)
        assert "Traceback" not in up.output, up.output

        client = Client(url, verbose=False, download_files=False, analytics_enabled=False)

        def listed():
            records = client.predict(api_name="/run_status")
            return {r["run_id"]: r for r in records} if len(records) == 5 else None

        runs = wait_for(listed, 60, "all five runs listed", interval=0.5)
        for run_id in (EMPTY_ID, GARBLED_ID, WRONG_ID):
            assert runs[run_id]["status"] == DAMAGED, runs[run_id]
            assert f"delete the folder {models / run_id}" in runs[run_id]["error"]
        assert runs[good_id]["status"] == "succeeded" and runs[NOCONF_ID]["status"] == "failed"

        image = str(next((data / "class_0").iterdir()))
        label, _, answer = client.predict(handle_file(image), "latest", api_name="/predict")[:3]
        assert good_id in answer and "latest finished run" in answer, answer
        curves = client.predict([good_id], api_name="/run_curves")
        assert [r["epoch"] for r in curves[good_id]] == [1]
        with pytest.raises(Exception, match="eval.json is not valid JSON .* evaluate the run again"):
            client.predict(good_id, api_name="/run_results")
        with urllib.request.urlopen(url + "/gradio_api/info", timeout=10) as response:
            assert response.status == 200
        assert up.proc.poll() is None, up.output
    finally:
        up.stop(timeout=60)
    wait_for(lambda: not marked_processes(marker), 15, "up's children to stop")


# --- a delete racing the start of a run --------------------------------------------------------------------------

def _record(store: RunStore, run_id: str, **fields) -> dict:
    return {**store.status(run_id), "config": store.config(run_id).to_dict(), **fields}


@pytest.mark.timeout(240)
def test_the_recovery_scan_never_resends_a_deleted_run_and_removes_its_record(session_stack):
    """A real worker's recovery scan (the session's worker: it scans every 1.5 s). Before: the 'running' record a
    starting worker wrote back after the page's delete was re-sent every half minute, forever (the task skipped
    it: its folder was gone)."""
    worker = session_stack.worker
    store, registry = RunStore(session_stack.models), RunRegistry.from_url(session_stack.redis_url)
    config = TrainConfig(data_dir=str(session_stack.data_root / "no-such-data"), **TINY)
    ghost, lost, damaged, alive = (store.create(config) for _ in range(4))
    records = [
        # the record a worker wrote back while the page deleted the run: running, a task id, no lease
        _record(store, ghost, status="running", task_id=ghost, worker="celery@gone"),
        # queued an hour ago, its message lost, then deleted by hand
        _record(store, lost, created=time.time() - 3600),
        # running when the power went: its status.json is empty now
        _record(store, damaged, status="running", task_id=damaged, worker="celery@gone"),
        _record(store, alive)]
    store.delete(ghost)
    store.delete(lost)
    (store.path(damaged) / "status.json").write_bytes(b"")
    seen = len(worker.log())
    for record in records:  # the folders are as the scan must find them before the records appear
        registry.put(record)

    wait_for(lambda: registry.get(ghost) is None and registry.get(lost) is None
             and (registry.get(damaged) or {}).get("status") == DAMAGED, 60, "the scan to settle the three runs",
             interval=0.2)
    assert "delete the folder" in registry.get(damaged)["error"]
    for run_id in (ghost, lost, damaged):
        assert not registry.r.exists(f"{PREFIX}:recover:{run_id}"), f"{run_id} was re-sent"
    assert "re-queued run" not in worker.log()[seen:], worker.log()[-3000:]
    assert not store.path(ghost).exists() and not store.path(lost).exists()
    assert registry.get(alive)["status"] == "queued"  # a run whose folder is fine is left alone
    assert worker.alive()
    store.delete(damaged)  # what the message says to do; the shared stack keeps no damaged folder
    registry.delete(damaged)
    store.delete(alive)
    registry.delete(alive)


def test_a_delete_landing_between_the_two_writes_of_running_recreates_nothing(tmp_path, redis_url, data,
                                                                                monkeypatch):
    """The worker wrote 'running' into the folder; the page, which had read 'queued', deletes the run (folder,
    record, cancel flag); the worker then writes 'running' into Redis. Before: that record stayed 'running' for
    good (the task died with RunNotFound on its final status) and the scan re-sent it forever."""
    from worker import tasks
    from worker.recovery import recover_orphans

    models = tmp_path / "models"
    monkeypatch.setenv("RESNET_LAB_MODELS_DIR", str(models))
    store, registry = RunStore(models), RunRegistry.from_url(redis_url)
    run_id = store.create(TrainConfig(data_dir=str(data), **TINY))
    registry.put(_record(store, run_id))
    monkeypatch.setattr(tasks, "_services", lambda settings: (store, registry))
    real_update = registry.update

    def update(rid, **fields):
        if fields.get("status") == "running" and store.path(rid).exists():
            shutil.rmtree(store.path(rid))  # the page's delete (it checked the status before the worker wrote it)
            registry.delete(rid)
            registry.request_cancel(rid)
        return real_update(rid, **fields)

    monkeypatch.setattr(registry, "update", update)
    result = tasks.train.run(run_id)

    assert result["status"] == "skipped" and "folder is gone" in result["reason"], result
    assert registry.get(run_id) is None and registry.progress(run_id) is None
    assert not store.path(run_id).exists(), "nothing of the deleted run is recreated"

    class App:
        conf = type("conf", (), {"task_default_queue": "celery"})()
        sent: list = []

        def send_task(self, *args, **kwargs):
            self.sent.append((args, kwargs))

    registry.put({"run_id": run_id, "status": "running", "task_id": run_id, "created": time.time()})
    assert recover_orphans(App(), registry, store) == [] and App.sent == []
    assert registry.get(run_id) is None


def test_status_changes_on_a_deleted_run_fail_cleanly(tmp_path):
    store = RunStore(tmp_path / "models")
    run_id = store.create(TrainConfig(data_dir=str(tmp_path), **TINY))
    store.delete(run_id)
    with pytest.raises(RunNotFound):
        store.set_status(run_id, "running")
    assert not store.path(run_id).exists() and store.ids() == []
    with pytest.raises(RunNotFound):
        store.delete(run_id)
