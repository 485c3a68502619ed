"""Faults against real processes (issue 8): workers killed mid-epoch, Redis and the page restarted, a full or
read-only models folder, and 20 concurrent predictions while a run trains.

Everything is tiny (tests/tiny.py's model at 32 px, a few dozen generated 40 px images, batch 8, one torch thread)
and loopback-only; every process a test starts is stopped in a finalizer. Latency figures from the load test are
printed (run with `-s` to see them).
"""

from __future__ import annotations

import hashlib
import os
import signal
import statistics
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shared.training.checkpoint import load_checkpoint, load_model_from_run, save_checkpoint
from shared.training.config import TrainConfig
from shared.runs.registry import PREFIX, RunRegistry
from shared.runs.store import FINISHED, RunStore
from shared.launch.services import start_redis
from shared.settings import Settings
from tests.imagegen import make_image, make_image_folder
from tests.procs import Processes, wait_for
from tests.tiny import TINY_MODEL, TINY_TRAIN, train_tiny
from ui.client import TRAIN_TASK, QueueClient

pytestmark = pytest.mark.timeout(420)

TINY = dict(TINY_TRAIN, val_ratio=0.2, test_ratio=0.2)
# workers here take over a dead worker's run after 3 s (production: 30 s) and never redeliver by timeout
WORKER_ENV = {"RESNET_LAB_LEASE_SECONDS": 3, "RESNET_LAB_VISIBILITY_TIMEOUT": 3600}
PASSWORD = "s3cret pass/word"  # a space and a slash: the URL must quote it


def epochs_of(records) -> list[int]:
    return [r["epoch"] for r in records]


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def folder_digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): sha256(p) for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def in_epoch(registry: RunRegistry, run_id: str, epoch: int) -> bool:
    progress = registry.progress(run_id) or {}
    return progress.get("phase") == "training" and progress.get("epoch") == epoch and bool(progress.get("batch"))


def wait_finished(registry: RunRegistry, run_id: str, timeout: float, *watch) -> dict:
    def finished():
        for proc in watch:
            assert proc.alive(), f"{proc.name} died:\n{proc.log()[-3000:]}"
        record = registry.get(run_id)
        return record if record and record["status"] in FINISHED else None

    try:
        return wait_for(finished, timeout, f"run {run_id} to finish", interval=0.2)
    except AssertionError:
        for proc in watch:
            print(f"--- {proc.name} log ---\n{proc.log()[-4000:]}")
        raise


def assert_intact_run(store: RunStore, registry: RunRegistry, run_id: str, epochs: int) -> None:
    """Succeeded; each epoch exactly once on disk and in the registry; best.pt a safe, loadable checkpoint."""
    status, record = store.status(run_id), registry.get(run_id)
    assert status["status"] == record["status"] == "succeeded", (status, record)
    assert epochs_of(store.metrics(run_id)) == list(range(1, epochs + 1))
    assert epochs_of(registry.progress(run_id)["history"]) == list(range(1, epochs + 1))
    run_dir = store.path(run_id)
    best = load_checkpoint(run_dir / "best.pt")  # weights_only=True inside
    assert best["epoch"] == status["best"]["best_epoch"] and best["val_acc"] == status["best"]["best_val_acc"]
    load_model_from_run(run_dir)  # the weights fit the architecture
    leftovers = [p.name for p in run_dir.iterdir() if ".tmp" in p.name]
    assert not leftovers, f"temporary files left behind: {leftovers}"


@pytest.fixture
def procs(tmp_path):
    processes = Processes(tmp_path / "logs")
    yield processes
    processes.close()


# --- 1. workers as on four machines, whichever trains killed with SIGKILL mid-epoch, three times in one run --------

@pytest.mark.slow
def test_worker_killed_mid_epoch_three_times_still_finishes_each_epoch_once(tmp_path, redis_url, procs, monkeypatch):
    """Four workers started at once (their imports overlap), each with its own node name and image cache as on
    four machines. Whichever trains the run is killed; an idle one takes it over (its recovery scan re-sends the
    run once the lease has expired), three times; the last one finishes. (This is also the two-machines test: a
    killed worker's run resumed by a survivor that was idling, which removes the dead one's half-written file.)"""
    from worker.recovery import RecoveryScanner, lease_seconds

    # with the production settings a dead worker's run is re-sent at most lease + scan interval after its last
    # renewal; the workers below use a 3 s lease, so that each takeover costs the test seconds, not a minute
    monkeypatch.delenv("RESNET_LAB_LEASE_SECONDS", raising=False)
    assert lease_seconds() + RecoveryScanner(None, None, None).interval <= 45

    data = make_image_folder(tmp_path / "data", classes=3, per_class=40, size=40)
    models = tmp_path / "models"
    client = QueueClient(Settings(models_dir=models, redis_url=redis_url, visibility_timeout=3600))
    names = ("machine-1", "machine-2", "machine-3", "machine-4")
    workers = {name: procs.worker(redis_url, models, args=["--hostname", f"worker@{name}"], wait=False,
                                  RESNET_LAB_CACHE_DIR=tmp_path / f"cache-{name}", **WORKER_ENV)
               for name in names}
    for worker in workers.values():
        procs.wait_ready(worker)
    [run_id] = client.submit([TrainConfig(data_dir=str(data), epochs=3, **TINY)])

    def training_in(epoch: int) -> bool:
        for worker in workers.values():
            assert worker.alive(), f"a worker died by itself:\n{worker.log()[-3000:]}"
        return in_epoch(client.registry, run_id, epoch)

    for k in (1, 2, 3):
        wait_for(lambda: training_in(k), 120, f"the run to train in epoch {k}")
        record = client.registry.get(run_id)
        assert record["attempt"] == k, record
        # the re-send mutex (at least 30 s, so that the workers scanning at once send one message) has done its job
        # once the re-sent task trains: without this the kills would be 30 s apart
        client.registry.r.delete(f"{PREFIX}:recover:{run_id}")
        trainer = record["worker"]
        workers.pop(trainer.split("@")[1]).kill9()
        killed = time.monotonic()
        assert epochs_of(client.store.metrics(run_id)) == list(range(1, k)), f"the kill must land inside epoch {k}"
        assert client.registry.get(run_id)["status"] == "running"
        # each killed worker's message stays un-acknowledged (visibility 3600 s): only the lease brings the run back
        assert client.registry.r.hlen("unacked") == k
        if k > 1:  # the checkpoint of the last finished epoch survived the kill
            assert load_checkpoint(client.store.path(run_id) / "best.pt")["epoch"] <= k - 1
        if k == 2:  # and, as if the killed worker had been on another machine, a half-written checkpoint of its
            orphan = client.store.path(run_id) / ".last.pt.tmp1-000000-abcdef"
            orphan.write_bytes(b"half")
            os.utime(orphan, (time.time() - 40, time.time() - 40))

        def resumed():
            now = client.registry.get(run_id)
            return now["status"] == "running" and now["attempt"] == k + 1 and now["worker"] != trainer

        wait_for(resumed, 60, f"an idle worker to resume the run after kill {k}", interval=0.2)
        print(f"\nkill {k}: {client.registry.get(run_id)['worker']} resumed the run "
              f"{time.monotonic() - killed:.1f} s after {trainer} was killed")

    [(name, last)] = workers.items()
    record = wait_finished(client.registry, run_id, 180, last)
    assert record["status"] == "succeeded" and record["worker"] == f"worker@{name}", record
    assert record["attempt"] == 4 and record["task_id"] == f"{run_id}~r3" and record["crashes"] == 1, record
    assert_intact_run(client.store, client.registry, run_id, epochs=3)  # the half-written file removed too
    assert client.store.ids() == [run_id] and client.registry.ids() == [run_id], "the run must not be duplicated"
    on_disk, in_redis = client.store.status(run_id), client.registry.get(run_id)
    for field in ("status", "started", "finished", "error", "worker", "best", "task_id"):
        assert on_disk.get(field) == in_redis.get(field), (field, on_disk.get(field), in_redis.get(field))
    assert "resuming" in last.log()
    for name in names:  # every worker that trained decoded the images into its own cache
        assert any((tmp_path / f"cache-{name}").iterdir()), name

    # a late duplicate delivery (e.g. an original message after its visibility timeout) changes nothing
    result = client.celery.send_task(TRAIN_TASK, args=[run_id]).get(timeout=60)
    assert result == {"run_id": run_id, "status": "skipped", "reason": "it is already succeeded"}
    assert epochs_of(client.store.metrics(run_id)) == [1, 2, 3]


def test_only_worker_deaths_without_progress_count_as_a_crash_loop(redis_url):
    """Three kills in one run that moves on between them must not fail it as a run that kills its worker (an
    out-of-memory kill at the same place every time); three deaths with no epoch finished in between do."""
    from types import SimpleNamespace

    from shared.runs.registry import PREFIX
    from worker.recovery import MAX_CRASHES, resend_train

    registry = RunRegistry.from_url(redis_url)
    registry.put({"run_id": "r1", "status": "running", "created": time.time()})
    app = SimpleNamespace(send_task=lambda *args, **kwargs: None)

    def die_after(epochs: int) -> int:
        registry.set_progress("r1", {"history": [{"epoch": e} for e in range(1, epochs + 1)]})
        registry.r.delete(f"{PREFIX}:recover:r1")
        assert resend_train(app, registry, "r1", "test", crashed=True)
        return registry.get("r1")["crashes"]

    assert [die_after(0), die_after(1), die_after(2)] == [1, 1, 1]
    assert [die_after(2), die_after(2)] == [2, MAX_CRASHES]


# --- 2-4. one stack (Redis with AOF and a password, a worker, the page) restarted piece by piece -----------------

class Stack:
    """Redis (append-only, password), one worker and the page, with their folders; parts can be restarted."""

    def __init__(self, root: Path):
        self.root = root
        self.models = root / "models"
        self.data_root = root / "data"
        self.small = make_image_folder(self.data_root / "small", classes=3, per_class=12, size=40)
        self.bigger = make_image_folder(self.data_root / "bigger", classes=3, per_class=40, size=40, seed=1)
        self.procs = Processes(root / "logs")
        self.redis = start_redis(root / "redis", password=PASSWORD, appendonly=True)
        self.worker = self.procs.worker(self.redis.url, self.models, wait=False,
                                        **{**WORKER_ENV, "RESNET_LAB_LEASE_SECONDS": 5})
        self.page = self.procs.page(self.models, self.data_root, redis_url=self.redis.url)  # while the worker starts
        self.procs.wait_ready(self.worker)
        self.client = QueueClient(Settings(models_dir=self.models, redis_url=self.redis.url,
                                           visibility_timeout=3600))

    def config(self, data: Path, **changes) -> TrainConfig:
        return TrainConfig(data_dir=str(data), **{**TINY, "epochs": 2, **changes})

    def restart_redis(self) -> None:
        port = self.redis.port
        self.redis.stop()
        self.redis = start_redis(self.root / "redis", port=port, password=PASSWORD, appendonly=True)

    def close(self) -> None:
        self.procs.close()
        self.redis.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    s = Stack(tmp_path_factory.mktemp("stack"))
    yield s
    s.close()


def page_runs(page) -> dict[str, dict]:
    return {r["run_id"]: r for r in page.client().predict(api_name="/run_status")}


@pytest.mark.slow
def test_redis_restart_loses_no_queued_run_and_the_page_recovers_by_itself(stack):
    page = stack.page.client()
    params = dict(TINY, data_dir=str(stack.bigger), models=[TINY_MODEL], lrs=[1e-3], batch_sizes=[8], epochs=2)
    [running] = page.predict(params, api_name="/submit_runs")
    queued = page.predict({**params, "data_dir": "small", "lrs": [1e-3, 2e-3], "epochs": 1},
                          api_name="/submit_runs")
    registry = stack.client.registry
    wait_for(lambda: in_epoch(registry, running, 1), 120, "the first run to train")
    assert [registry.get(r)["status"] for r in queued] == ["queued", "queued"]

    port = stack.redis.port
    stack.redis.stop()  # SIGTERM: Redis writes its append-only file and exits
    with pytest.raises(Exception, match="Redis") as down:
        page.predict(api_name="/run_status")
    assert "***" in str(down.value) or PASSWORD not in str(down.value), "the page must not show the password"
    time.sleep(1.0)  # the worker trains on while Redis is away
    stack.redis = start_redis(stack.root / "redis", port=port, password=PASSWORD, appendonly=True)

    # the same page process answers again, without a reload, and still lists every run
    listed = wait_for(lambda: _try(lambda: page_runs(stack.page)), 30, "the page to reach Redis again", interval=0.5)
    assert {running, *queued} <= set(listed)
    for run_id, epochs in ((running, 2), (queued[0], 1), (queued[1], 1)):
        record = wait_finished(registry, run_id, 180, stack.worker)
        assert record["status"] == "succeeded", record
        assert_intact_run(stack.client.store, registry, run_id, epochs)
    assert {r["status"] for r in page_runs(stack.page).values()} == {"succeeded"}


def _try(fn):
    try:
        return fn()
    except Exception:  # noqa: BLE001 - polled until it works
        return None


@pytest.mark.slow
def test_page_restart_while_a_run_trains_brings_back_the_runs_and_their_curves(stack):
    # far more epochs than the restart takes (each a fraction of a second): cancelled below, whatever happens
    [run_id] = stack.client.submit([stack.config(stack.bigger, epochs=500, lr=5e-3)])
    try:
        wait_for(lambda: in_epoch(stack.client.registry, run_id, 2), 120, "the run to train in epoch 2")

        port = stack.page.url.rsplit(":", 1)[1]
        stack.page.stop()
        stack.page = stack.procs.page(stack.models, stack.data_root, redis_url=stack.redis.url, port=int(port))

        client = stack.page.client()
        listed = {r["run_id"]: r for r in client.predict(api_name="/run_status")}
        assert listed[run_id]["status"] == "running" and listed[run_id]["phase"] == "training", listed[run_id]
        curves = client.predict([run_id], api_name="/run_curves")[run_id]
        assert epochs_of(curves) == list(range(1, len(curves) + 1)) and len(curves) >= 1, curves
        assert all("val_acc" in r and "train_loss" in r for r in curves), curves
        # the curves keep growing through the new page
        seen = len(curves)
        wait_for(lambda: len(client.predict([run_id], api_name="/run_curves")[run_id]) > seen, 60,
                 "a new epoch on the restarted page's curves", interval=0.5)
    finally:
        stack.client.cancel(run_id)
    assert wait_finished(stack.client.registry, run_id, 60, stack.worker)["status"] == "cancelled"


@pytest.mark.slow
def test_twenty_concurrent_predictions_while_a_run_trains(stack, tmp_path):
    from gradio_client import handle_file

    if stack.client.store.latest_succeeded() is None:  # alone (-k): make the model to predict with first
        [first] = stack.client.submit([stack.config(stack.small, epochs=1)])
        assert wait_finished(stack.client.registry, first, 120, stack.worker)["status"] == "succeeded"
    [training] = stack.client.submit([stack.config(stack.bigger, epochs=30)])
    wait_for(lambda: in_epoch(stack.client.registry, training, 1), 120, "the run to train")
    images = [make_image(tmp_path / f"probe_{i}.jpg", 40, seed=i) for i in range(20)]
    client = stack.page.client()

    def one(path):
        start = time.perf_counter()
        label, _cam, answer = client.predict(handle_file(str(path)), "latest", api_name="/predict")
        return time.perf_counter() - start, label, answer

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=20) as pool:
        results = list(pool.map(one, images))
    wall = time.perf_counter() - started
    progress = stack.client.registry.progress(training)
    stack.client.cancel(training)

    latencies = sorted(r[0] for r in results)
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, round(0.95 * len(latencies)) - 1)]
    print(f"\n20 concurrent predictions (page queue limit 4) while a run trains on the same 2 cores: "
          f"p50 {p50:.2f} s, p95 {p95:.2f} s, max {latencies[-1]:.2f} s, wall {wall:.2f} s")
    for _, label, answer in (r for r in results):
        assert label["label"] in ("class_0", "class_1", "class_2") and len(label["confidences"]) == 3, label
        assert "Answered by" in answer
    assert progress["phase"] == "training", "the run must have been training during the burst"
    record = wait_finished(stack.client.registry, training, 60, stack.worker)
    assert record["status"] == "cancelled" and stack.worker.alive()


# --- 5. a full or read-only models folder ------------------------------------------------------------------------

@pytest.fixture
def tmpfs(tmp_path):
    """mount(path, size_mb) → a fresh tmpfs there (root only); skips the test where mounting is not allowed."""
    mounted: list[Path] = []

    def mount(path: Path, size_mb: int) -> Path:
        path.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mb}m,mode=0755", "tmpfs", str(path)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({(done.stderr or done.stdout).strip()}); "
                        "test_checkpoint_never_half_written_on_enospc covers the atomic save in-process")
        mounted.append(path)
        return path

    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def remount(path: Path, options: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{options}", str(path)], check=True, capture_output=True)


def fill(path: Path, leave_bytes: int) -> Path:
    """A real (not sparse) file taking all free space of path's filesystem but `leave_bytes`."""
    st = os.statvfs(path)
    filler = path / ".filler"
    size = st.f_bavail * st.f_frsize - leave_bytes
    assert size > 0, "the tmpfs is too small for this test"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    try:
        os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    return filler


@pytest.mark.slow
def test_disk_full_fails_the_run_clearly_and_never_replaces_a_good_checkpoint(tmpfs, procs, tmp_path, redis_url,
                                                                             one_torch_thread, capsys):
    from shared.cli import main as cli_main

    models = tmpfs(tmp_path / "models", 400)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=12, size=40)
    client = QueueClient(Settings(models_dir=models, redis_url=redis_url, visibility_timeout=3600))
    # the decoded images outside the tmpfs, in the folder train_tiny uses: the worker finds them there
    worker = procs.worker(redis_url, models, wait=False, RESNET_LAB_CACHE_DIR=tmp_path / "tiny-cache", **WORKER_ENV)
    earlier = train_tiny(models, data, val_ratio=0.2, test_ratio=0.2)  # here, while the worker starts
    procs.wait_ready(worker)
    earlier_files = folder_digest(models / earlier)
    best_size = (models / earlier / "best.pt").stat().st_size
    last_size = (models / earlier / "last.pt").stat().st_size
    # room for epoch 1's best.pt + last.pt, not for epoch 2's next checkpoint next to them
    fill(models, leave_bytes=best_size + last_size + best_size // 2)

    [doomed] = client.submit([TrainConfig(data_dir=str(data), epochs=3, **TINY)])
    record = wait_finished(client.registry, doomed, 120, worker)
    assert record["status"] == "failed", record
    error = record["error"]
    assert "space" in error.lower() and str(models) in error and "enforce fail" not in error, error
    assert client.store.status(doomed)["status"] == "failed" and client.store.status(doomed)["error"] == error
    run_dir = models / doomed
    assert epochs_of(client.store.metrics(doomed)) == [1]
    assert load_checkpoint(run_dir / "best.pt")["epoch"] == 1, "epoch 1's best.pt must survive the failed save"
    assert load_checkpoint(run_dir / "last.pt")["epoch"] == 1
    assert not [p.name for p in run_dir.iterdir() if ".tmp" in p.name], "the half-written file must be removed"
    assert folder_digest(models / earlier) == earlier_files, "an earlier run was touched"
    assert worker.alive()

    # the same folder turned read-only (as Linux does after disk errors) under a queued run
    (models / ".filler").unlink()
    pending = client.store.create(TrainConfig(data_dir=str(data), epochs=1, **TINY))
    remount(models, "ro")
    try:
        client.registry.put({**client.store.status(pending), "config": client.store.config(pending).to_dict()})
        client.celery.send_task(TRAIN_TASK, args=[pending], task_id=pending)
        record = wait_finished(client.registry, pending, 60, worker)
        assert record["status"] == "failed" and "read-only" in record["error"].lower(), record
        assert folder_digest(models / earlier) == earlier_files
        # the CLI says the same in one line, without a traceback
        # (its main() in this process: `python -m shared.cli` only adds sys.exit; an exception it let out would
        # fail the test here)
        capsys.readouterr()
        code = cli_main(["--models-dir", str(models), "train", "--data-dir", str(data), "--epochs", "1",
                         "--weights", "none", "--image-size", "32", "--device", "cpu", "--skip-eval"])
        stderr = capsys.readouterr().err
        assert code == 2 and "read-only" in stderr.lower() and len(stderr.strip().splitlines()) == 1, stderr
        assert "Traceback" not in stderr, stderr
        # and so does the page's Train tab (its queue handler, in this process)
        import gradio as gr

        from ui.app import Lab
        from ui.tabs.train import queue_runs

        lab = Lab(Settings(models_dir=models, data_roots=(data.parent,), redis_url=redis_url))
        with pytest.raises(gr.Error, match="(?i)read-only"):
            queue_runs(lab, dict(TINY, data_dir=str(data), models=[TINY_MODEL], lrs=[1e-3], batch_sizes=[8],
                                 epochs=1))
    finally:
        remount(models, "rw")


def test_checkpoint_never_half_written_on_enospc(tmp_path, monkeypatch):
    """The same guarantee without a tmpfs (any user, any OS): a write failing with ENOSPC half-way keeps the old
    file and leaves no temporary file; the error names the file and says what to do."""
    import errno

    import torch

    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(3)}, "epoch": 1}, path)
    good = sha256(path)
    real_save = torch.save

    def save_half_then_fail(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        with open(f, "r+b") as fh:  # leave a torn file behind, as a full disk would
            fh.truncate(os.path.getsize(f) // 2)
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", save_half_then_fail)
    with pytest.raises(Exception, match="(?i)space") as failure:
        save_checkpoint({"model": {"w": torch.zeros(3)}, "epoch": 2}, path)
    assert str(path) in str(failure.value)
    assert sha256(path) == good and load_checkpoint(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]


# --- 6. a worker killed under `resnet-lab up`: restarted, the page stays, the run finishes -----------------------

def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _cmdline(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def _child_running(parent: int, module: str) -> int | None:
    """The pid of `parent`'s child `python -m <module>`, if any."""
    for pid in _children(parent):
        cmd = _cmdline(pid)
        if "-m" in cmd and cmd[cmd.index("-m") + 1:cmd.index("-m") + 2] == [module]:
            return pid
    return None


class PagePoller:
    """Asks the page for /run_status twice a second in a thread; every answer and every failure is kept."""

    def __init__(self, url: str):
        from gradio_client import Client

        self.client = Client(url, verbose=False, download_files=False, analytics_enabled=False)
        self.answers: list[tuple[float, list[dict]]] = []
        self.failures: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(0.5):
            try:
                self.answers.append((time.monotonic(), self.client.predict(api_name="/run_status")))
            except Exception as exc:  # noqa: BLE001 - every failure is a test failure, reported below
                self.failures.append(f"{time.monotonic():.1f}: {exc!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


@pytest.mark.slow
def test_worker_killed_under_up_is_restarted_while_the_page_answers_and_the_run_finishes(tmp_path):
    from tests.browser import UpApp

    data_root = tmp_path / "data"
    make_image_folder(data_root / "imgs", classes=3, per_class=40, size=40)
    # no evaluation figures (nobody looks at them here: ~5 s of CPU, more on busy cores)
    up = UpApp(tmp_path, data_root, extra_env={"RESNET_LAB_LEASE_SECONDS": "3", "CUDA_VISIBLE_DEVICES": "",
                                               "RESNET_LAB_EVAL_FIGURES": "none"}).start()
    poller = None
    try:
        up.wait_ready(timeout=180)
        wait_for(lambda: " ready." in up.log(0) or up.proc.poll() is not None, 120, "the worker under up",
                 interval=0.2)
        assert up.proc.poll() is None, up.log()
        page_pid, worker_pid = _child_running(up.proc.pid, "ui"), _child_running(up.proc.pid, "worker")
        assert page_pid and worker_pid, up.log()
        poller = PagePoller(up.url)
        [run_id] = poller.client.predict(dict(TINY, data_dir="imgs", models=[TINY_MODEL], lrs=[1e-3],
                                              batch_sizes=[8], epochs=3), api_name="/submit_runs")
        store = RunStore(up.models)
        # the embedded Redis has a fresh password each start: read its URL where the worker got it
        environ = Path(f"/proc/{worker_pid}/environ").read_bytes().split(b"\0")
        redis_url = next(v.split(b"=", 1)[1].decode() for v in environ if v.startswith(b"REDIS_URL="))
        registry = RunRegistry.from_url(redis_url)
        wait_for(lambda: in_epoch(registry, run_id, 2), 180, "the run to train in epoch 2")
        os.killpg(worker_pid, signal.SIGKILL)  # as the out-of-memory killer would
        assert epochs_of(store.metrics(run_id)) == [1], "the kill must land inside epoch 2"

        wait_for(lambda: store.status(run_id)["status"] in FINISHED or up.proc.poll() is not None, 240,
                 "the run to finish", interval=0.5)
        poller.stop()
        assert up.proc.poll() is None, up.log()
        assert f"worker (CPU) (pid {worker_pid}) was killed by SIGKILL" in up.log(0), up.log()
        assert "restarting it in 1 s" in up.log(0), up.log()
        assert store.status(run_id)["status"] == "succeeded", store.status(run_id)
        assert epochs_of(store.metrics(run_id)) == [1, 2, 3]
        new_worker = _child_running(up.proc.pid, "worker")
        assert new_worker and new_worker != worker_pid
        assert _child_running(up.proc.pid, "ui") == page_pid, "the page must be the same process"
        # the page answered throughout, and saw the run finish
        assert not poller.failures, poller.failures
        times = [t for t, _ in poller.answers]
        assert max(b - a for a, b in zip(times, times[1:])) < 15, "the page stopped answering for a while"
        assert poller.client.predict(api_name="/run_status")[0]["status"] == "succeeded"
    finally:
        if poller is not None:
            poller.stop()
        code = up.stop(timeout=30)
        up.kill_all()
    assert code == 0, up.log()
