"""The page end to end: `python -m ui` and `python -m worker` as real processes on a real Redis (the session's
stack, tests/procs.py SharedStack), driven through the page's named API with `gradio_client` — submit two tiny
runs, poll them to success, read their curves and results, predict an uploaded image (top-5 + CAM) while another
run trains, and get the right errors for bad uploads and paths. Plus the parts of the page process that need no
server (Redis down, resync, bind guard, no finished run yet).

Tiny runs (tests/tiny.py) at 32 px on 3 x 12 generated images with one torch thread.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.training.config import TrainConfig
from shared.runs.store import FINISHED, RunStore
from shared.launch.services import find_free_port
from shared.settings import Settings
from tests.imagegen import make_image_folder
from tests.procs import REPO, wait_for
from tests.tiny import TINY_MODEL, tiny_form

TINY = tiny_form("shapes", epochs=2, val_ratio=0.2, test_ratio=0.2)  # a dataset in the session stack's data root


# --- the page process without a server ------------------------------------------------------------------------

def _lab(tmp_path, redis_url):
    from ui.app import Lab

    data = make_image_folder(tmp_path / "data" / "ds", classes=2, per_class=3, size=16)
    settings = Settings(models_dir=tmp_path / "models", data_roots=(tmp_path / "data",), redis_url=redis_url)
    lab = Lab(settings)
    run_id = lab.store.create(TrainConfig(data_dir=str(data), weights="none"))
    return lab, run_id


def test_runs_come_from_the_run_folders_while_redis_is_down(tmp_path):
    lab, run_id = _lab(tmp_path, f"redis://127.0.0.1:{find_free_port()}/0")
    records, problem = lab.snapshot()
    assert [r["run_id"] for r in records] == [run_id]
    assert records[0]["config"]["model"] == "resnet18"
    assert "cannot reach Redis" in problem and "resnet-lab up" in problem


def test_no_redis_url_says_what_to_start(tmp_path):
    lab, run_id = _lab(tmp_path, None)
    records, problem = lab.snapshot()
    assert [r["run_id"] for r in records] == [run_id]
    assert "REDIS_URL is not set" in problem


def test_registry_is_rebuilt_after_redis_lost_its_data(tmp_path, redis_url):
    import redis

    lab, run_id = _lab(tmp_path, redis_url)
    records, problem = lab.snapshot()  # registry empty, one run on disk: resync at once
    assert problem is None and [r["run_id"] for r in records] == [run_id]
    assert lab.snapshot()[0][0]["run_id"] == run_id
    redis.Redis.from_url(redis_url).flushall()  # a restart without persistence
    lab._redis_was_down = True  # what a tick during the outage leaves behind
    assert [r["run_id"] for r in lab.snapshot()[0]] == [run_id]


def test_a_stale_running_record_takes_the_finished_status_of_its_folder(tmp_path, redis_url):
    """The worker wrote `succeeded` into the folder and died before copying it to Redis."""
    lab, run_id = _lab(tmp_path, redis_url)
    lab.snapshot()
    lab.client().registry.update(run_id, status="running", started=1.0)
    lab.store.set_status(run_id, "succeeded", best={"best_val_acc": 0.5, "best_epoch": 1})
    (record,), _ = lab.snapshot()
    assert record["status"] == "succeeded" and record["best"]["best_val_acc"] == 0.5
    assert lab.client().registry.get(run_id)["status"] == "succeeded"


def test_predict_before_any_run_finished_says_train_one_first(tmp_path):
    import gradio as gr

    from ui.tabs.predict import _predictor  # what /predict and "Classify all" ask for the model

    lab, _ = _lab(tmp_path, None)  # one queued run, none finished
    with pytest.raises(gr.Error, match="No model yet: no run has finished. Train one on the Train tab"):
        _predictor(lab, "latest")


def test_the_pages_feature_maps_are_the_evaluations_sheet(tmp_path):
    # one drawing for the feature-map sheet: the page's picture is plots.plot_activations of the same maps
    from shared.analysis.explain import top_channels
    from shared.analysis.plots import plot_activations
    from shared.data.images import load_rgb
    from shared.training.engine import fit
    from ui.app import Lab
    from ui.tabs.results import activations

    data = make_image_folder(tmp_path / "data" / "ds", classes=2, per_class=6, size=32)
    lab = Lab(Settings(models_dir=tmp_path / "models", data_roots=(tmp_path / "data",)))
    config = TrainConfig(data_dir=str(data), model=TINY_MODEL, weights="none", image_size=32, epochs=1, batch_size=4,
                         augment="none",
                         device="cpu", amp=False)
    run_id = lab.store.create(config)
    lab.store.set_status(run_id, "succeeded", best=fit(config, lab.store.path(run_id)))
    photo = next((data / "class_1").glob("*.jpg"))

    shown = activations(lab, run_id, {"path": str(photo)})
    predictor = lab.predictors.get(run_id)
    x = predictor.transform(load_rgb(photo)).unsqueeze(0)
    expected = plot_activations(top_channels(predictor.model, predictor.spec, x, top=8))
    assert shown.size == expected.size and np.array_equal(np.asarray(shown), np.asarray(expected))


def test_binding_beyond_loopback_needs_credentials():
    # `python -m ui --host 0.0.0.0` refusing to start: tests/test_security.py, as a real process
    from ui.__main__ import check_bind

    with pytest.raises(SystemExit, match="RESNET_LAB_AUTH=user:password"):
        check_bind(Settings(host="0.0.0.0"))
    check_bind(Settings(host="0.0.0.0", auth="me:secret"))  # with credentials it may
    with pytest.raises(SystemExit, match="user:password"):
        check_bind(Settings(host="0.0.0.0", auth="no-colon"))


def test_file_route_may_serve_only_the_models_folder_and_data_roots(tmp_path):
    from ui.__main__ import launch_kwargs

    settings = Settings(models_dir=tmp_path / "models", data_roots=(tmp_path / "a", tmp_path / "b"))
    kwargs = launch_kwargs(settings)
    assert kwargs["allowed_paths"] == [str(tmp_path / "models"), str(tmp_path / "a"), str(tmp_path / "b")]
    assert kwargs["server_name"] == "127.0.0.1" and kwargs["show_error"] is False and kwargs["share"] is False
    assert kwargs["max_file_size"] == 200 * 1024 * 1024


# --- the launched page + worker (the session's: tests/procs.py SharedStack) -------------------------------------
# The page and worker are shared with other modules, and the models folder holds the stack's own finished run
# and other tests' runs: each test here names the runs it looks at, and works in any order.

@pytest.fixture(scope="module")
def stack(session_page):
    return session_page


@pytest.fixture(scope="module")
def client(stack, tmp_path_factory):
    from gradio_client import Client

    return Client(stack.page.url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))


def _wait(client, run_ids, statuses, timeout, stack):
    last = {}

    def settled():
        last.update({r["run_id"]: r for r in client.predict(api_name="/run_status")})
        return dict(last) if all(last.get(rid, {}).get("status") in statuses for rid in run_ids) else None

    return wait_for(settled, timeout, f"runs {run_ids} to be {statuses}", interval=1.0,
                    describe=lambda: f"{[last.get(r) for r in run_ids]}\nworker log:\n{stack.worker.log()[-4000:]}")


def _image(stack) -> str:
    return str(stack.image("square"))


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_named_endpoints(client, stack):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for name in ("/predict", "/submit_runs", "/run_status", "/run_curves", "/run_results", "/predict_many",
                 "/cancel_runs"):
        assert name in endpoints
    assert stack.run_id in {r["run_id"] for r in client.predict(api_name="/run_status")}


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_paths_outside_the_data_roots_are_refused(client, stack):
    with pytest.raises(Exception, match="outside the data folders"):
        client.predict("/etc", api_name="/check_dataset")
    with pytest.raises(Exception, match="outside the data folders"):
        client.predict({**TINY, "data_dir": "../"}, api_name="/submit_runs")
    with pytest.raises(Exception, match="is a file, not a folder"):
        client.predict({**TINY, "data_dir": _image(stack)}, api_name="/submit_runs")
    summary, *_ = client.predict("shapes", api_name="/check_dataset")
    assert "3 classes, 36 usable images" in summary


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_runs_train_to_success_with_curves_and_results(client, stack):
    run_ids = client.predict({**TINY, "lrs": [1e-3, 3e-3]}, api_name="/submit_runs")
    assert len(run_ids) == 2
    queued = {r["run_id"]: r for r in client.predict(api_name="/run_status")}
    assert set(run_ids) <= set(queued) and {queued[r]["lr"] for r in run_ids} == {1e-3, 3e-3}
    runs = _wait(client, run_ids, FINISHED, 240, stack)
    assert all(runs[r]["status"] == "succeeded" for r in run_ids), [runs[r] for r in run_ids]
    assert all(runs[r]["progress"] == 1.0 and runs[r]["best_val_acc"] is not None for r in run_ids)
    curves = client.predict(run_ids, api_name="/run_curves")
    for rid in run_ids:
        assert [e["epoch"] for e in curves[rid]] == [1, 2]
        assert all(0 <= e["val_acc"] <= 1 and e["train_loss"] > 0 for e in curves[rid])
    results = client.predict(run_ids[0], api_name="/run_results")
    assert 0 <= results["accuracy"] <= 1
    assert results["classes"] == ["circle", "square", "stripe"]
    assert np.asarray(results["confusion"]["counts"]).shape == (3, 3)
    assert "confusion" in results["figures"] and "tsne" in results["skipped_figures"]  # the stack's worker: basic
    # what the README's HTTP API table promises, under the names it gives (macro F1 used to be missing)
    for key in ("macro_f1", "balanced_accuracy", "top_k_accuracy", "loss", "ece"):
        assert 0 <= results[key] <= (1 if key != "loss" else 100), key
    assert results["n"] == sum(row["support"] for row in results["per_class"]) and results["figure_level"] == "basic"
    for hostile in ("../../etc", "20990101-000000-resnet18-ffffff"):  # one answer for "missing" and "not allowed"
        with pytest.raises(Exception, match="no evaluation for run .*: the run does not exist or has not been"):
            client.predict(hostile, api_name="/run_results")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_predict_answers_while_a_run_trains_then_cancel(client, stack):
    from gradio_client import handle_file

    store = RunStore(stack.models)
    latest = store.latest_succeeded()  # the stack's run at least; newer ones when other tests trained some
    classes = json.loads((store.path(latest) / "split.json").read_text())["classes"]
    (long_run,) = client.predict({**TINY, "epochs": 200}, api_name="/submit_runs")
    _wait(client, [long_run], ("running",), 120, stack)
    wait_for(lambda: (store.path(long_run) / "metrics.jsonl").exists(), 60, "the long run's first epoch",
             interval=0.5)  # past data preparation: training for real while the page predicts
    started = time.monotonic()
    label, cam, answer = client.predict(handle_file(_image(stack)), api_name="/predict")
    elapsed = time.monotonic() - started
    assert {c["label"] for c in label["confidences"]} == set(classes)
    assert abs(sum(c["confidence"] for c in label["confidences"]) - 1) < 1e-3
    assert label["label"] == label["confidences"][0]["label"]
    overlay = Image.open(cam)
    assert overlay.size == (320, 320) and overlay.mode == "RGB"  # the 32 px CAM, enlarged for reading
    assert latest in answer and "latest finished run" in answer
    status = {r["run_id"]: r for r in client.predict(api_name="/run_status")}[long_run]
    assert status["status"] == "running", "the long run should still be training while the page predicted"
    assert elapsed < 30
    # many images at once: a table and a CSV
    table, csv_path, _ = client.predict([handle_file(_image(stack)), handle_file(_image(stack))],
                                        api_name="/predict_many")
    assert len(table["data"]) == 2 and Path(csv_path).read_text().startswith("source,error,class_1")
    message = client.predict([long_run], api_name="/cancel_runs")
    assert "Cancel requested for 1 run" in message
    runs = _wait(client, [long_run], FINISHED, 120, stack)
    assert runs[long_run]["status"] == "cancelled"


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_bad_uploads_get_clear_errors(client, stack, tmp_path):
    from gradio_client import handle_file

    text = tmp_path / "notes.jpg"
    text.write_text("this is not a picture\n" * 10)
    with pytest.raises(Exception, match="notes.jpg: not an image — it contains text"):
        client.predict(handle_file(str(text)), api_name="/predict")
    html = tmp_path / "page.png"
    html.write_text("<!doctype html><html><body>login</body></html>")
    with pytest.raises(Exception, match="HTML page"):
        client.predict(handle_file(str(html)), api_name="/predict")
    big = tmp_path / "big.png"  # ~1.9 MB of noise; the page was started with a 1 MB upload limit
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (800, 800, 3), dtype=np.uint8)).save(big)
    assert big.stat().st_size > 1024 * 1024
    with pytest.raises(Exception, match="exceeds the maximum file size"):
        client.predict(handle_file(str(big)), api_name="/predict")
    assert "Traceback" not in stack.page.log()[-200:]


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_file_route_refuses_files_outside(stack):
    import urllib.error

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"{stack.page.url}/gradio_api/file={path}", timeout=10) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code

    assert status("/etc/passwd") == 403
    assert status(str(REPO / "pyproject.toml")) == 403
    assert status(str(stack.page.log_path)) == 403
    assert status(_image(stack)) == 200  # the data roots are served (thumbnails, test images)
    run_dir = stack.models / stack.run_id
    assert status(str(run_dir / "best.pt")) == 200  # offered for download
    assert status(str(run_dir / "config.json")) == 403  # not shown by the page, so not served (ui/guard.py)
