"""What was removed stays removed, and what older versions wrote still loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from shared.runs.store import RunStore
from shared.training.config import TrainConfig
from tests.procs import REPO


def test_an_old_config_with_num_workers_still_loads(tmp_path):
    # num_workers did nothing (decoded images are cached; no loader processes): gone, but old runs open
    store = RunStore(tmp_path / "models")
    run_id = store.create(TrainConfig(data_dir=str(tmp_path), weights="none"))
    path = store.path(run_id) / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "num_workers": 4}))
    assert store.config(run_id) == TrainConfig(data_dir=str(tmp_path), weights="none")
    with pytest.raises(TypeError):
        TrainConfig(data_dir=str(tmp_path), num_workers=4)


def test_the_cli_offers_no_num_workers_flag():
    done = subprocess.run([sys.executable, "-m", "shared.cli", "train", "--help"], capture_output=True, text=True,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0 and "--data-dir" in done.stdout and "--num-workers" not in done.stdout
