"""Limits of the page's HTTP API (issue 13, items 5 and 10), against a real page and a real Redis.

`/submit_runs` takes `weights` only as a weights name or a file in the weights folder or the data roots (one
message for a missing file and a forbidden one, so the page is no existence oracle), refuses epochs, batch sizes,
image sizes and grids beyond their caps before anything is queued, and caps the runs waiting in total
(RESNET_LAB_MAX_QUEUED_RUNS). `/predict_many`'s CSV keeps file and class names that look like spreadsheet formulas
as text. No worker runs here: whatever is accepted stays queued, which is what the cap counts.
"""

from __future__ import annotations

import csv
import io
import json
import os
import urllib.request
from pathlib import Path

import pytest
import redis

from shared.runs.registry import RunRegistry
from shared.runs.store import RunStore
from tests.imagegen import make_image, make_image_folder
from tests.procs import Processes
from tests.tiny import tiny_form, train_tiny

pytestmark = pytest.mark.timeout(300)

MAX_QUEUED = 4
# class folders named like formulas: their names land in the CSV's class columns
FORMULA_CLASSES = ["=SUM(1+1)", "+cmd", "-2+3", "@A1"]
FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
RUN = tiny_form(".")  # data_dir: each test's own


class Lab:
    def __init__(self, root: Path, redis_url: str):
        self.root = root
        self.data_root = root / "data"
        self.dataset = make_image_folder(self.data_root / "formulas", classes=FORMULA_CLASSES, per_class=8, size=40)
        self.outside = root / "outside"
        self.outside.mkdir()
        (self.outside / "secret.pth").write_bytes(b"a file the page must not reveal")
        self.models = root / "models"
        self.weights = self.models / "weights"  # the default weights folder: <models>/weights
        self.weights.mkdir(parents=True)
        (self.weights / "mine.pth").write_bytes(b"the page never opens it; the worker loads it")
        os.symlink(self.outside / "secret.pth", self.weights / "link.pth")
        (self.data_root / "in_data.pth").write_bytes(b"weights kept with the data")
        train_tiny(self.models, self.dataset)  # a finished run on the formula-named classes, for /predict_many
        self.store = RunStore(self.models)
        self.registry = RunRegistry.from_url(redis_url)
        self.procs = Processes(root / "logs")
        self.page = self.procs.page(self.models, self.data_root, redis_url=redis_url,
                                    RESNET_LAB_MAX_QUEUED_RUNS=MAX_QUEUED)
        self.client = self.page.client()

    def submit(self, **params) -> list[str]:
        return self.client.predict({**RUN, "data_dir": str(self.dataset), **params}, api_name="/submit_runs")

    def refused(self, **params) -> str:
        """The message of a refused submission (and nothing was queued)."""
        from gradio_client.exceptions import AppError

        before = self.queued()
        with pytest.raises(AppError) as info:
            self.submit(**params)
        assert self.queued() == before, f"{params} queued runs although it was refused"
        return str(info.value)

    def queued(self) -> list[str]:
        return [s["run_id"] for s in self.store.list() if s["status"] == "queued"]

    def clear_queued(self) -> None:
        for run_id in self.queued():
            self.store.delete(run_id)
            self.registry.delete(run_id)

    def close(self) -> None:
        self.procs.close()


@pytest.fixture(scope="module")
def lab(redis_server, tmp_path_factory):
    client = redis.Redis.from_url(redis_server.url)
    client.flushall()
    client.close()
    lab = Lab(tmp_path_factory.mktemp("limits"), redis_server.url)
    yield lab
    lab.close()


# --- weights ---------------------------------------------------------------------------------------------------

def test_weights_files_outside_the_weights_folder_get_one_message_whether_they_exist_or_not(lab):
    messages = {}
    for weights in ("/etc/passwd", str(lab.outside / "secret.pth"), str(lab.outside / "missing.pth"),
                    "../" * 12 + "etc/passwd", "link.pth", "missing.pth", str(lab.models)):
        message = lab.refused(weights=weights)
        assert "no such weights name, nor a state-dict file in the weights folder" in message, message
        assert "DEFAULT" in message and "none" in message  # what to choose instead
        messages[weights] = message.replace(repr(weights), "<weights>")
    assert len(set(messages.values())) == 1, f"the messages tell existing and missing files apart: {messages}"
    # a weights name the model does not have is refused too (resnet18 has no V2)
    assert "do not exist for resnet18" in lab.refused(weights="IMAGENET1K_V2", models=["resnet18", "resnet50"])


def test_weights_files_in_the_weights_folder_or_the_data_roots_are_queued_with_their_full_path(lab):
    lab.clear_queued()
    try:
        for weights, expected in (("mine.pth", lab.weights / "mine.pth"),
                                  (str(lab.data_root / "in_data.pth"), lab.data_root / "in_data.pth")):
            [run_id] = lab.submit(weights=weights)
            config = json.loads((lab.models / run_id / "config.json").read_text())
            assert config["weights"] == str(expected.resolve())
        [run_id] = lab.submit(weights="default", models=["resnet18"])  # the tiny test model has no pretrained weights
        assert json.loads((lab.models / run_id / "config.json").read_text())["weights"] == "DEFAULT"
    finally:
        lab.clear_queued()


# --- sizes and counts ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    ({"epochs": 5000}, "epochs must be between 1 and 1000; got 5000"),
    ({"epochs": 2.5}, "epochs: expected a whole number, got '2.5'"),
    ({"epochs": "many"}, "epochs: expected a whole number"),
    ({"batch_sizes": [2048]}, "batch_size must be between 1 and 1024; got 2048"),
    ({"batch_sizes": [True]}, "batch_sizes: expected a whole number"),
    ({"image_size": 4096}, "image_size must be between 32 and 1024; got 4096"),
    ({"seed": 2**40}, "seed must be between 0 and 4294967295"),
    ({"lrs": [1e-3 * (i + 1) for i in range(200)]}, "lrs: expected at most 48 values, got 200"),
    ({"models": ["resnet18", "resnet34", "resnet50"], "lrs": [1e-4, 3e-4, 1e-3, 3e-3],
      "batch_sizes": [8, 16, 32, 64, 128]}, "60 runs at once is too many — at most 48"),
    ({"amp": "no"}, "amp must be true or false; got 'no'"),
    ({"device": "cuda:0; rm"}, "device must be auto, cpu, cuda or cuda:N"),
    ({"patience": 10**9}, "patience must be between 0 and 1000"),
])
def test_settings_beyond_their_caps_are_refused_before_queueing(lab, params, expected):
    message = lab.refused(**params)
    assert expected in message, message


def test_the_runs_waiting_in_total_are_capped(lab):
    lab.clear_queued()
    try:
        assert len(lab.submit(lrs=[1e-3, 2e-3, 3e-3])) == 3
        message = lab.refused(lrs=[4e-3, 5e-3])
        assert f"3 run(s) are queued or running and this adds 2: at most {MAX_QUEUED} may wait" in message, message
        assert "RESNET_LAB_MAX_QUEUED_RUNS" in message and "cancel queued runs" in message
        assert len(lab.submit(lrs=[4e-3])) == 1  # exactly up to the cap is fine
        assert "4 run(s) are queued" in lab.refused(lrs=[5e-3])
        lab.clear_queued()  # finished, cancelled or deleted runs free their places
        assert len(lab.submit(lrs=[5e-3])) == 1
    finally:
        lab.clear_queued()


# --- CSV injection -------------------------------------------------------------------------------------------------

def test_predictions_csv_keeps_formula_like_names_as_text(lab, tmp_path):
    from gradio_client import handle_file

    uploads = []
    for name in ("=HYPERLINK(1+1).png", "+SUM(1).png", "-1+1.png", "@A1.png"):
        uploads.append(handle_file(str(make_image(tmp_path / name, 40, colour=(220, 40, 40)))))
    _, csv_file, _ = lab.client.predict(uploads, "latest", api_name="/predict_many")
    with urllib.request.urlopen(csv_file["url"], timeout=30) as response:
        rows = list(csv.reader(io.StringIO(response.read().decode())))
    header, body = rows[0], rows[1:]
    assert len(body) == 4 and header[:3] == ["source", "error", "class_1"]
    cells = [cell for row in body for cell in row]
    assert not [c for c in cells if c.startswith(FORMULA_START)], f"formula cells in the CSV: {body}"
    classes = {cell for row in body for cell in row[2::2]}
    assert classes == {"'" + name for name in FORMULA_CLASSES}, classes  # the names survive, quoted
    sources = {row[0] for row in body}
    assert "'=HYPERLINK(1+1).png" in sources, sources

