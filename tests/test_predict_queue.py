"""`resnet-lab predict RUN FILES... --queue`: the batch goes through the real Redis to a real worker, which reads
the files inside its data roots; the CLI prints and writes what a local `resnet-lab predict` does."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.runs.store import RunStore
from shared.training.config import TrainConfig
from tests.imagegen import make_image_folder
from tests.procs import REPO
from tests.tiny import TINY_MODEL

pytestmark = pytest.mark.timeout(400)


@pytest.fixture
def cli():
    """Factory: cli(models, *args, redis_url=None) starts `resnet-lab predict ARGS` and returns a function that waits
    for it (a CompletedProcess). Each one pays seconds of imports (torch; Celery for --queue), so the test starts
    them together; any still running at teardown is killed."""
    started: list[subprocess.Popen] = []

    def start(models: Path, *args, redis_url: str | None = None):
        env = {**os.environ, "RESNET_LAB_MODELS_DIR": str(models), "OMP_NUM_THREADS": "1",
               "CUDA_VISIBLE_DEVICES": ""}
        env.pop("REDIS_URL", None)
        if redis_url:
            env["REDIS_URL"] = redis_url
        proc = subprocess.Popen([sys.executable, "-m", "shared.cli", "predict", *map(str, args)], text=True, env=env,
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        started.append(proc)

        def done() -> subprocess.CompletedProcess:
            out, err = proc.communicate(timeout=300)
            return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

        return done

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _rows(path: Path) -> list[list[str]]:
    with open(path, newline="") as fh:
        return list(csv.reader(fh))


def _same_predictions(local: list[list[str]], queued: list[list[str]]) -> None:
    """Same files, errors and classes in the same order; probabilities equal up to float noise (the worker runs
    on one thread)."""
    assert len(local) == len(queued) and local[0] == queued[0]
    for a, b in zip(local[1:], queued[1:]):
        assert a[:2] == b[:2] and a[2::2] == b[2::2], (a, b)
        assert all(abs(float(x) - float(y)) < 1e-3 for x, y in zip(a[3::2], b[3::2])), (a, b)


def test_predict_queue_answers_through_a_worker_like_a_local_predict(tmp_path, redis_url, start_worker, cli):
    from shared.training.engine import fit

    root = (tmp_path / "data").resolve()
    data = make_image_folder(root / "shapes", classes=2, per_class=6, size=32)
    models = tmp_path / "models"
    store = RunStore(models)
    config = TrainConfig(data_dir=str(data), model=TINY_MODEL, weights="none", image_size=32, epochs=1, batch_size=4,
                         augment="none",
                         device="cpu", amp=False)
    run_id = store.create(config)
    store.set_status(run_id, "succeeded", best=fit(config, store.path(run_id)))
    broken = data / "class_0" / "broken.jpg"
    broken.write_text("not an image")
    outside = make_image_folder(tmp_path / "outside", classes=1, per_class=1, size=32)
    sources = [data / "class_1", broken]
    # all four start while the worker does: the queued ones wait for it in Redis
    local = cli(models, run_id, *sources, "--top-k", 2, "--csv", tmp_path / "local.csv")
    queued = cli(models, run_id, *sources, "--top-k", 2, "--csv", tmp_path / "queued.csv", "--queue",
                 redis_url=redis_url)
    refused = cli(models, run_id, outside, "--queue", redis_url=redis_url)
    unset = cli(models, run_id, data, "--queue")
    start_worker(models, RESNET_LAB_DATA_ROOTS=root)

    local, queued = local(), queued()
    assert local.returncode == 0, local.stderr[-3000:]
    assert queued.returncode == 0, queued.stderr[-3000:]
    assert "waiting for a worker" in queued.stderr and f"model: run {run_id} (tiny_resnet" in queued.stderr
    assert len(queued.stdout.splitlines()) == 7 and f"{broken}: skipped:" in queued.stdout
    _same_predictions(_rows(tmp_path / "local.csv"), _rows(tmp_path / "queued.csv"))
    assert [line.split(": ")[0] for line in queued.stdout.splitlines()] == \
        [line.split(": ")[0] for line in local.stdout.splitlines()]
    assert list(store.path(run_id).glob("predictions-*.csv")), "the worker keeps its table in the run folder"

    # the worker reads nothing outside its data roots: refused with its message, exit 2, no traceback
    refused = refused()
    assert refused.returncode == 2 and "outside the data folders" in refused.stderr, refused.stderr[-3000:]
    assert "Traceback" not in refused.stderr
    unset = unset()
    assert unset.returncode == 2 and "--queue needs REDIS_URL" in unset.stderr, unset.stderr[-3000:]



# --- the page's "Classify folder on the worker" (ui/tabs/predict_folder.py) --------------------------------------

def test_the_page_sends_a_folder_to_the_worker_and_offers_its_csv(session_page):
    import requests
    from gradio_client.exceptions import AppError

    from tests.imagegen import make_image

    stack = session_page
    folder = stack.folder("to-classify-on-the-worker")
    for i in range(5):
        make_image(folder / "nested" / f"photo_{i}.png", 40, seed=i)
    (folder / "broken.jpg").write_text("not an image")
    client = stack.page.client()

    # the stack's own run by id: other tests of this session may have finished newer ones
    status, csv_file = client.predict(str(folder), stack.run_id, api_name="/predict_folder")

    assert f"Classified 6 images of `{folder.name}` with run `{stack.run_id}`, 1 could not be read" in status, status
    rows = list(csv.reader(requests.get(csv_file["url"], timeout=10).text.splitlines()))
    assert len(rows) == 7 and rows[0][:2] == ["source", "error"], rows
    assert sorted(Path(r[0]).name for r in rows[1:]) == ["broken.jpg", *(f"photo_{i}.png" for i in range(5))]
    assert [r for r in rows[1:] if r[1]] == [r for r in rows[1:] if r[0].endswith("broken.jpg")], rows
    assert list((stack.models / stack.run_id).glob("predictions-*.csv")), "the worker writes it into the run"

    # outside the data folders, `..` out of them, or missing: one answer, and nothing is queued
    answers = set()
    probes = ["/etc", f"{stack.data_root}/../models", str(stack.data_root / "missing"), "../" * 8,
              str(stack.image()), "a\x00b"]
    for probe in probes:
        with pytest.raises(AppError) as refused:
            client.predict(probe, "latest", api_name="/predict_folder")
        message = str(refused.value)
        assert message.startswith(repr(probe)), message
        answers.add(message[len(repr(probe)):])
    assert len(answers) == 1, answers
    with pytest.raises(AppError, match="No such model"):
        client.predict(str(folder), "../models", api_name="/predict_folder")
