"""One run lifecycle (shared/runs/lifecycle.py): the allowed status changes in one table, the folder first and
then the registry, under the folder's lock; the CLI, the worker and the page all change statuses through it."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from shared.runs.lifecycle import TransitionRefused, transition
from shared.runs.registry import RunRegistry
from shared.runs.store import STATUSES, RunNotFound, RunStore
from shared.training.config import TrainConfig
from tests.imagegen import make_image_folder
from tests.procs import REPO
from tests.tiny import TINY_MODEL

# the policy, written out again: a change to the table must be a change to this test too
ALLOWED = {
    ("queued", "running"), ("queued", "cancelled"), ("queued", "failed"),
    ("running", "running"), ("running", "queued"), ("running", "succeeded"), ("running", "failed"),
    ("running", "cancelled"),
    ("failed", "running"),
    ("cancelled", "running"), ("cancelled", "cancelled"),
}


@pytest.fixture
def runs(tmp_path, redis_url):
    store = RunStore(tmp_path / "models")
    registry = RunRegistry.from_url(redis_url)

    def make(status: str) -> str:
        run_id = store.create(TrainConfig(data_dir=str(tmp_path), model="resnet18", weights="none"))
        record = store.set_status(run_id, status) if status != "queued" else store.status(run_id)
        registry.put(record)
        return run_id

    return store, registry, make


@pytest.mark.parametrize("current", STATUSES)
@pytest.mark.parametrize("status", STATUSES)
def test_the_table_allows_these_changes_and_refuses_the_rest(runs, current, status):
    store, registry, make = runs
    run_id = make(current)
    before = (store.status(run_id), registry.get(run_id))
    if (current, status) in ALLOWED:
        record = transition(store, registry, run_id, status, error="why")
        assert record["status"] == status == store.status(run_id)["status"] == registry.get(run_id)["status"]
        assert registry.get(run_id)["error"] == "why"
    else:
        with pytest.raises(TransitionRefused, match=f"status is {current}: it cannot become {status}"):
            transition(store, registry, run_id, status, error="why")
        assert (store.status(run_id), registry.get(run_id)) == before, "a refused change wrote something"


def test_a_change_the_caller_did_not_expect_is_refused(runs):
    # the page cancels "before it started" only a run that is still queued
    store, registry, make = runs
    run_id = make("running")
    with pytest.raises(TransitionRefused, match="is running now, no longer queued"):
        transition(store, registry, run_id, "cancelled", expected=("queued",))
    assert store.status(run_id)["status"] == registry.get(run_id)["status"] == "running"


def test_a_deleted_run_changes_nowhere(runs):
    # the folder first: a run deleted from the page gets no registry record back from a late status change
    store, registry, make = runs
    run_id = make("queued")
    store.delete(run_id)
    registry.delete(run_id)
    with pytest.raises(RunNotFound):
        transition(store, registry, run_id, "running")
    assert registry.get(run_id) is None and not store.path(run_id).exists()


def test_without_a_registry_only_the_folder_changes(runs):
    store, registry, make = runs
    run_id = make("queued")
    transition(store, None, run_id, "running")
    assert store.status(run_id)["status"] == "running" and registry.get(run_id)["status"] == "queued"


def test_a_cancel_racing_a_start_has_one_winner_and_redis_agrees(runs):
    # the page's cancel and a worker's start at the same instant: under the folder's lock exactly one happens,
    # and the registry shows the folder's status (not the loser's, not the older write)
    store, registry, make = runs
    for _ in range(30):
        run_id = make("queued")
        barrier = threading.Barrier(2)
        won: list[str] = []

        def change(status: str) -> None:
            barrier.wait()
            try:
                transition(store, registry, run_id, status, expected=("queued",))
                won.append(status)
            except TransitionRefused:
                pass

        threads = [threading.Thread(target=change, args=(s,)) for s in ("running", "cancelled")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(won) == 1, won
        assert store.status(run_id)["status"] == registry.get(run_id)["status"] == won[0]


def _calls(path: Path) -> list[tuple[str, int, str]]:
    """(file, line, what) for each status write outside shared/runs/: set_status(...), or a registry write with a
    `status=` field."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = node.func.attr
            if name == "set_status" or (name in ("update", "put") and any(k.arg == "status" for k in node.keywords)):
                found.append((str(path.relative_to(REPO)), node.lineno, name))
    return found


def test_every_status_change_goes_through_the_lifecycle():
    allowed = {REPO / "shared" / "runs" / "store.py", REPO / "shared" / "runs" / "lifecycle.py"}
    sources = [p for d in ("shared", "ui", "worker") for p in (REPO / d).rglob("*.py") if p not in allowed]
    assert len(sources) > 30
    stray = [hit for p in sources for hit in _calls(p)]
    assert stray == [], f"status written past shared.runs.lifecycle: {stray}"


def _cli(models: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "RESNET_LAB_MODELS_DIR": str(models), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run([sys.executable, "-m", "shared.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300, env=env, cwd=REPO)


def test_the_cli_resumes_a_cancelled_run_and_refuses_to_retrain_a_succeeded_one(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", classes=2, per_class=6, size=32)
    models = tmp_path / "models"
    store = RunStore(models)
    run_id = store.create(TrainConfig(data_dir=str(data), model=TINY_MODEL, weights="none", image_size=32, epochs=1,
                                      batch_size=4, augment="none", amp=False, device="cpu"))
    store.set_status(run_id, "running")
    store.set_status(run_id, "cancelled", error="interrupted from the keyboard")  # what Ctrl-C leaves

    resumed = _cli(models, "train", "--resume", run_id, "--skip-eval")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert store.status(run_id)["status"] == "succeeded"

    # the refusal through the CLI's entry function in this process (a real process's exit code and one-line error
    # are tests/test_cli.py's): an exception main() let through would fail here with its traceback
    from shared.cli import main

    metrics = (models / run_id / "metrics.jsonl").read_bytes()
    code = main(["--models-dir", str(models), "train", "--resume", run_id, "--skip-eval"])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and "Traceback" not in err, err[-3000:]
    assert f"run {run_id}'s status is succeeded: it cannot become running" in err
    assert "start a new run instead" in err
    assert store.status(run_id)["status"] == "succeeded" and (models / run_id / "metrics.jsonl").read_bytes() == metrics
