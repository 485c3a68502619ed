"""The one atomic write (`shared.fsutil`): durable (file and folder fsynced), all-or-nothing, and what a crash
leaves behind is cleaned up when the page or a worker starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared import fsutil
from shared.fsutil import atomic_open, remove_stale_temps, temp_path, write_atomic, write_json_atomic
from shared.runs.store import RunStore


@pytest.fixture
def fsyncs(monkeypatch):
    """Every os.fsync call as (what the descriptor pointed at, what the target file held at that moment)."""
    calls: list[str] = []
    real = os.fsync

    def recording(fd):
        calls.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    return calls


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_write_fsyncs_the_temp_file_then_the_folder_after_the_rename(tmp_path, fsyncs, monkeypatch):
    target = tmp_path / "status.json"
    renames = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (renames.append(len(fsyncs)), real_replace(a, b)))

    write_json_atomic(target, {"status": "queued"})

    assert json.loads(target.read_text()) == {"status": "queued"}
    assert len(fsyncs) == 2, fsyncs
    temp, folder = fsyncs
    assert Path(temp).parent == tmp_path and Path(temp).name.startswith(".status.json.tmp")
    assert folder == str(tmp_path)
    assert renames == [1], "the data is flushed before the rename, the folder after it"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads /proc/self/fd")
def test_every_writer_of_the_app_goes_through_the_durable_write(tmp_path, fsyncs):
    """The nine former hand-written atomic writes: each now flushes its file and its folder."""
    import torch
    from PIL import Image

    from shared.training.checkpoint import save_checkpoint
    from shared.data.manifest import write_manifest
    from shared.analysis.evaluation import _write_json
    from shared.analysis.plots import save_figure
    from shared.analysis.predict import write_predictions_csv
    from shared.analysis.report import write_report

    writers = {
        "ckpt/best.pt": lambda p: save_checkpoint({"model": {"w": torch.ones(2)}}, p),
        "split/split.json": lambda p: write_manifest({"classes": [], "files": []}, p),
        "eval/eval.json": lambda p: _write_json(p, {"accuracy": 1.0}),
        "fig/confusion.png": lambda p: save_figure(Image.new("RGB", (4, 4)), p),
        "csv/predictions.csv": lambda p: write_predictions_csv([{"source": "a.jpg", "error": "x", "top": []}], p),
        "report/report.html": lambda p: write_report(p.parent),
    }
    for name, write in writers.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        fsyncs.clear()
        write(path)
        assert path.is_file(), name
        assert [Path(p).name.split(".tmp")[0] for p in fsyncs] == [f".{path.name}", path.parent.name], (name, fsyncs)
        assert [p.name for p in path.parent.iterdir() if ".tmp" in p.name] == [], name


def test_the_old_file_survives_a_failure_mid_write(tmp_path):
    target = tmp_path / "status.json"
    write_atomic(target, '{"status": "succeeded"}')

    with pytest.raises(RuntimeError, match="power cut"):
        with atomic_open(target, "w") as fh:
            fh.write('{"status": "runn')  # half of the new content is in the temp file
            raise RuntimeError("power cut")

    assert target.read_text() == '{"status": "succeeded"}'
    assert [p.name for p in tmp_path.iterdir()] == ["status.json"], "the temp file is removed"
    with pytest.raises(ValueError, match="whole files"):
        with atomic_open(target, "a"):
            pass


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temps_and_half_deleted_runs_are_removed_at_start_and_nothing_else(tmp_path):
    models = tmp_path / "models"
    run = models / "20240101-000000-resnet18-abcdef"
    (run / "eval").mkdir(parents=True)
    (run / "status.json").write_text("{}")
    mine = temp_path(run / "status.json")           # a live writer: this process
    mine.write_text("half")
    dead = run / f".last.pt.tmp{_dead_pid()}-{fsutil._host_tag()}-a1b2c3"   # a writer of this machine that died
    dead.write_text("half")
    in_eval = run / "eval" / f".eval.json.tmp{_dead_pid()}-{fsutil._host_tag()}-0f0f0f"
    in_eval.write_text("half")
    elsewhere = run / ".best.pt.tmp1-000000-abcdef"  # another machine's writer: only the age tells
    elsewhere.write_text("half")
    old_elsewhere = run / ".metrics.jsonl.tmp1-000000-fedcba"
    old_elsewhere.write_text("half")
    hour_ago = time.time() - 3600
    os.utime(old_elsewhere, (hour_ago, hour_ago))
    trash = models / f"{fsutil.TRASH_PREFIX}20231231-000000-resnet18-123456-a1a1a1"
    (trash / "eval").mkdir(parents=True)
    (trash / "eval" / "x.png").write_bytes(b"x")
    keep = [run / "notes.tmp", run / ".hidden", run / "status.json", models / ".up.lock"]
    for path in keep[:2] + keep[3:]:
        path.write_text("user's")

    removed = RunStore(models).remove_leftovers()

    assert sorted(removed) == sorted([dead, in_eval, old_elsewhere, trash])
    for path in [mine, elsewhere, *keep]:
        assert path.exists(), path
    assert not trash.exists()
    assert remove_stale_temps([tmp_path / "missing"]) == []  # a folder that is gone is not an error


def test_the_worker_taking_over_a_run_removes_another_machines_temps_older_than_the_lease(tmp_path):
    models = tmp_path / "models"
    run = models / "20240101-000000-resnet18-abcdef"
    (run / "eval").mkdir(parents=True)
    dead_elsewhere = run / ".best.pt.tmp1-000000-abcdef"  # the killed worker's, on another machine, 40 s ago
    in_eval = run / "eval" / ".eval.json.tmp1-000000-fedcba"
    fresh = run / ".status.json.tmp1-000000-0a0a0a"       # someone writing right now (the page)
    for path in (dead_elsewhere, in_eval, fresh):
        path.write_text("half")
    forty_s_ago = time.time() - 40
    for path in (dead_elsewhere, in_eval):
        os.utime(path, (forty_s_ago, forty_s_ago))

    assert RunStore(models).remove_leftovers() == []  # at start, another machine's temp needs 15 minutes
    removed = RunStore(models).remove_run_leftovers(run.name, max_age=30)

    assert sorted(removed) == sorted([dead_elsewhere, in_eval])
    assert fresh.exists()
