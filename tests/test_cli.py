"""The `resnet-lab` command as a user runs it: a real process, real files, readable errors.

Each user-facing behaviour (exit code, one-line error without traceback, output) has a real-process test here;
cases that only differ in their input call the command's entry function (`shared.cli.main`) in this process, which
spares a start-up (~6 s of CPU importing torch) each. The module's run is the tiny test model's (tests/tiny.py),
and its evaluations draw no figures (RESNET_LAB_EVAL_FIGURES=none): tests/test_evaluation.py looks at figures.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from shared.analysis.predict import Predictor
from shared.cli import main
from shared.runs.store import RunStore
from tests.imagegen import COLOURS, make_image, make_image_folder
from tests.tiny import TINY_CLI

CLI = Path(sys.executable).with_name("resnet-lab")


def run_cli(*args, models_dir: Path, timeout=300, plugins: bool = True) -> subprocess.CompletedProcess:
    """`resnet-lab *args` in a process of its own. plugins=False: without the tiny test model's plugin, for a
    command that never builds a model (loading the plugin imports torch: ~6 s of CPU)."""
    env = {**os.environ, "RESNET_LAB_MODELS_DIR": str(models_dir), "OMP_NUM_THREADS": "1",
           "RESNET_LAB_EVAL_FIGURES": "none"}
    if not plugins:
        env.pop("RESNET_LAB_MODEL_PLUGINS", None)
    return subprocess.run([str(CLI), *map(str, args)], capture_output=True, text=True, env=env, timeout=timeout)


def main_in_process(capsys, *args, models_dir: Path) -> tuple[int, str, str]:
    """`resnet-lab *args` through its entry function in this process: (exit code, stdout, stderr)."""
    code = main(["--models-dir", str(models_dir), *map(str, args)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    data = make_image_folder(root / "data", classes=3, per_class=16, size=48, corrupt=2)
    models = root / "models"
    result = run_cli("train", "--data-dir", data, *TINY_CLI, "--epochs", 2, "--lr", 3e-3, models_dir=models)
    assert result.returncode == 0, result.stderr
    return root, data, models, result


def test_train_writes_a_complete_succeeded_run(trained):
    _, _, models, result = trained
    store = RunStore(models)
    (run_id,) = store.ids()
    status = store.status(run_id)
    assert status["status"] == "succeeded" and status["best"]["epochs_run"] == 2
    for name in ("config.json", "split.json", "metrics.jsonl", "best.pt", "last.pt", "eval/eval.json"):
        assert (store.path(run_id) / name).is_file(), name  # eval/: train evaluates its best checkpoint
    assert "epoch 2:" in result.stderr and run_id in result.stdout


def test_predict_latest_prints_top_classes_and_writes_csv(trained, tmp_path):
    root, data, models, _ = trained
    image = next((data / "class_1").glob("*.jpg"))
    broken = tmp_path / "notes.jpg"
    broken.write_text("not an image")
    out = tmp_path / "predictions.csv"
    result = run_cli("predict", "latest", image, broken, "--top-k", 2, "--csv", out, models_dir=models)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"{image}: ") and lines[0].count("%") == 2
    assert lines[1].startswith(f"{broken}: skipped:")
    rows = list(csv.DictReader(out.open()))
    assert rows[0]["class_1"] in {"class_0", "class_1", "class_2"} and rows[1]["error"]


def test_predict_threshold_answers_not_sure_below_it(trained, capsys):
    _, data, models, _ = trained
    image = next((data / "class_2").glob("*.jpg"))
    # label smoothing keeps the tiny model's confidence below 100%: at threshold 1 nothing is sure (in this
    # process: the output of a real predict is test_predict_latest_prints_top_classes_and_writes_csv's)
    code, out, err = main_in_process(capsys, "predict", "latest", image, "--threshold", 1, models_dir=models)
    assert code == 0, err
    assert out.startswith(f"{image}: not sure — closest: class_"), out
    # refused by the argument parser, before anything is imported: a real process costs little
    result = run_cli("predict", "latest", image, "--threshold", 1.5, models_dir=models, plugins=False)
    assert result.returncode == 2 and "between 0 and 1" in result.stderr


def test_runs_list_shows_the_run(trained):
    _, _, models, _ = trained
    result = run_cli("runs", "list", models_dir=models, plugins=False)  # listing reads folders, builds no model
    assert result.returncode == 0 and "succeeded" in result.stdout


USER_ERROR_CASES = [
    (["train", "--data-dir", "/nonexistent/folder", "--weights", "none"], "/nonexistent/folder"),
    (["train", "--data-dir", ".", "--model", "vgg16"], "model must be one of"),
    (["predict", "latest", "x.jpg"], "no finished run"),
    (["evaluate", "../etc"], "invalid run id"),
]


def test_a_user_error_prints_one_line_without_traceback(tmp_path):
    # the real process: exit code 2, one line on stderr, no traceback (the other inputs: the test below)
    args, expected = USER_ERROR_CASES[0]
    result = run_cli(*args, models_dir=tmp_path / "models")
    assert result.returncode == 2
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("args, expected", USER_ERROR_CASES)
def test_user_errors_print_one_line_without_traceback(tmp_path, capsys, args, expected):
    # in this process: an exception main() does not turn into a message fails the test with its traceback
    code, out, err = main_in_process(capsys, *args, models_dir=tmp_path / "models")
    assert code == 2 and out == ""
    assert expected in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_every_user_error_type_names_the_module_that_defines_it():
    # shared.cli looks its user errors up by module (so that an error needs no torch import): a class that moves
    # or is renamed must move in that table too, or its errors would print a traceback
    import importlib

    from shared.cli import USER_ERRORS

    for module, name in USER_ERRORS:
        error = getattr(importlib.import_module(module), name)
        assert issubclass(error, Exception) and error.__module__ == module, (module, name)


def test_predictor_accepts_paths_bytes_and_pil_images(trained):
    _, data, models, _ = trained
    store = RunStore(models)
    predictor = Predictor(store.path(store.latest_succeeded()))
    path = next((data / "class_0").glob("*.jpg"))
    by_path = predictor.predict(path, top_k=3)
    by_bytes = predictor.predict(path.read_bytes(), top_k=3)
    by_pil = predictor.predict(Image.open(path), top_k=3)
    assert by_path == by_bytes == by_pil
    assert abs(sum(t["probability"] for t in by_path) - 1) < 1e-5
    png = io.BytesIO()
    Image.open(path).convert("L").save(png, format="PNG")  # grayscale input still works
    assert len(predictor.predict(png.getvalue(), top_k=5)) == 3


def test_predictor_explains_with_the_default_heat_map_and_states_its_resolution(trained):
    _, data, models, _ = trained
    store = RunStore(models)
    predictor = Predictor(store.path(store.latest_succeeded()))
    top, overlay, caption = predictor.explain(next((data / "class_1").glob("*.jpg")))
    assert len(top) == 3 and overlay.size == (32, 32)
    assert caption == "LayerCAM heat-map 4×4 over 32×32 input"  # layer2 of a ResNet: 1/8 of the input


def test_model_beats_chance_on_fresh_images(trained, tmp_path):
    _, _, models, _ = trained
    store = RunStore(models)
    predictor = Predictor(store.path(store.latest_succeeded()))
    from tests.imagegen import PATTERNS

    correct = 0
    for label in range(3):
        for seed in range(5):
            path = make_image(tmp_path / f"{label}_{seed}.jpg", 48, colour=COLOURS[label], pattern=PATTERNS[label],
                              seed=1000 + seed)
            correct += predictor.predict(path, top_k=1)[0]["class"] == f"class_{label}"
    assert correct / 15 > 0.5


def test_train_help_names_every_flag_with_its_real_default(tmp_path):
    result = run_cli("train", "--help", models_dir=tmp_path)
    assert result.returncode == 0, result.stderr
    text = " ".join(result.stdout.split())  # argparse wraps lines
    assert "--data-dir DATA_DIR dataset folder with one sub-folder per class (required)" in text
    assert "MISSING" not in text and "object at 0x" not in text
    assert "(default resnet18)" in text and "(default 128)" in text


def test_evaluate_and_report_the_latest_run(trained, capsys):
    _, _, models, _ = trained
    (run_id,) = RunStore(models).ids()
    result = run_cli("evaluate", "latest", "--split", "val", models_dir=models)
    assert result.returncode == 0, result.stderr
    assert '"accuracy"' in result.stdout
    from shared.analysis.eval_result import load_eval_result

    evaluated = load_eval_result(models / run_id, folder="eval-val")  # another split than training's own test
    assert evaluated is not None and evaluated.split == "val"
    code, out, err = main_in_process(capsys, "report", "latest", models_dir=models)  # what it prints: one path
    assert code == 0, err
    report = Path(out.strip())
    assert report == models / run_id / "report.html" and "<html" in report.read_text()[:500].lower()


def test_download_without_network_says_what_to_do_and_leaves_nothing(tmp_path):
    # a proxy that refuses at once stands for "no network", and keeps the test off the real one
    port = __import__("tests.test_download", fromlist=["_free_port"])._free_port()
    proxy = f"http://127.0.0.1:{port}"
    env = {**os.environ, "http_proxy": proxy, "https_proxy": proxy, "HTTP_PROXY": proxy, "HTTPS_PROXY": proxy,
           "no_proxy": "", "NO_PROXY": ""}
    env.pop("RESNET_LAB_MODEL_PLUGINS", None)  # a download builds no model: without the plugin, no torch import
    dest = tmp_path / "data"
    result = subprocess.run([str(CLI), "data", "download", "flowers", "--dest", str(dest)], capture_output=True,
                            text=True, env=env, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
    assert "tar xzf flower_photos.tgz" in result.stderr and "browser" in result.stderr, result.stderr
    assert not dest.exists() or list(dest.iterdir()) == []


@pytest.mark.slow  # two CLI processes: a range test, then a run with its rate for a 6-second budget
def test_lr_find_then_train_with_lr_auto_for_a_time_budget(tmp_path):
    from tests.tiny import TINY_CLI

    data = make_image_folder(tmp_path / "data", classes=2, per_class=10, size=40)
    models = tmp_path / "models"
    flags = [f for f in TINY_CLI if f not in ("--epochs", "1")]
    found = run_cli("lr-find", "--data-dir", data, *flags, "--plot", tmp_path / "lr.png", models_dir=models)
    assert found.returncode == 0, found.stderr
    assert 1e-5 <= float(found.stdout) <= 1 and (tmp_path / "lr.png").stat().st_size > 0
    trained = run_cli("train", "--data-dir", data, *flags, "--lr", "auto", "--time-budget", 0.1, "--skip-eval",
                      models_dir=models)
    assert trained.returncode == 0, trained.stderr
    assert "learning rate: " in trained.stderr and "(range test, " in trained.stderr
    store = RunStore(models)
    (run_id,) = store.ids()
    best = store.status(run_id)["best"]
    assert best["budget"]["budget_s"] == 6 and best["epochs_run"] == best["budget"]["planned_epochs"]
    assert f"{store.config(run_id).lr:.2g}" in trained.stderr  # the run trained at the rate the test suggested
