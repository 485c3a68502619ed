"""The files users really drop (issue 8), pushed through `resnet-lab data check`, `train` and `predict`, the page's
Predict tab and dataset picker: each gets a specific message or is handled correctly, nothing crashes, and a run
on a folder holding them finishes and lists what it skipped.

The corpus is generated here (tests/imagegen.py for the broken files); a 50 MB file is a sparse file, and the
decompression bomb is a 100-byte PNG header claiming 30000x30000 pixels.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.imagegen import (make_image, make_image_folder, write_bomb_png, write_exif_rotated_jpeg,
                            write_text_as_image, write_truncated_jpeg, write_zero_byte)
from tests.procs import REPO
from tests.tiny import TINY_CLI, tiny_form

pytestmark = pytest.mark.timeout(300)

NON_ASCII = "été photo ñ 1.jpg"  # spaces and non-ASCII letters

# file (relative to the dataset) → a piece of the message it must get; these are skipped, never trained on
BAD = {
    "class_0/empty.jpg": "empty file (0 bytes)",
    "class_0/truncated.jpg": "truncated image",
    "class_0/notes.jpg": "not an image — it contains text",
    "class_1/login page.png": "it is an HTML page",
    "class_1/bomb.png": "decompression bomb",
    "class_1/drawing.png": "it is an SVG",
    "class_2/huge.jpg": "nothing but zero bytes",
    "class_2/loop_a.jpg": "Too many levels of symbolic links",
    "class_2/loop_b.jpg": "Too many levels of symbolic links",
}
# odd but valid: decoded (EXIF applied, 16-bit scaled, CMYK/palette/alpha converted, first frame) and trained on
ODD = ["class_0/deep16.png", "class_0/cmyk.jpg", "class_1/palette_alpha.png", "class_1/animated.gif",
       "class_2/rotated.jpg", "class_2/one_pixel.png", f"class_2/{NON_ASCII}"]
# not images at all by name, or folders that are not followed: listed under `ignored`
IGNORED = {"class_1/drawing.svg": "not an image file (.svg)", "class_2/loop_dir/": "symlinked folder not followed"}


def write_corpus(root: Path) -> Path:
    """3 learnable classes of 12 images each plus every kind of bad and odd file."""
    make_image_folder(root, classes=3, per_class=12, size=40)
    write_zero_byte(root / "class_0/empty.jpg")
    write_truncated_jpeg(root / "class_0/truncated.jpg")
    write_text_as_image(root / "class_0/notes.jpg", "text")
    write_text_as_image(root / "class_1/login page.png", "html")
    write_bomb_png(root / "class_1/bomb.png")
    write_text_as_image(root / "class_1/drawing.png", "svg")
    write_text_as_image(root / "class_1/drawing.svg", "svg")
    with open(root / "class_2/huge.jpg", "wb") as fh:  # 50 MB of nothing, allocated lazily
        fh.truncate(50 * 1024 * 1024)
    os.symlink("loop_b.jpg", root / "class_2/loop_a.jpg")
    os.symlink("loop_a.jpg", root / "class_2/loop_b.jpg")
    os.symlink(".", root / "class_2/loop_dir")

    deep = (np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)
    Image.fromarray(deep).save(root / "class_0/deep16.png")
    make_image(root / "class_0/cmyk.jpg", 40, colour=(220, 40, 40), mode="CMYK")
    palette = Image.open(make_image(root / "class_1/palette_alpha.png", 40, colour=(40, 180, 60), pattern="vstripes"))
    palette.convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(root / "class_1/palette_alpha.png",
                                                                         transparency=0)
    frames = [Image.fromarray(np.full((40, 40, 3), c, np.uint8)) for c in ((40, 180, 60), (200, 0, 0))]
    frames[0].save(root / "class_1/animated.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    write_exif_rotated_jpeg(root / "class_2/rotated.jpg")
    Image.new("RGB", (1, 1), (50, 80, 220)).save(root / "class_2/one_pixel.png")
    make_image(root / "class_2" / NON_ASCII, 40, colour=(50, 80, 220), pattern="checker")
    return root


def cli(*args: str, models: Path, timeout: float = 180, plugins: bool = True) -> subprocess.CompletedProcess:
    """`python -m shared.cli *args`. plugins=False: without the tiny test model's plugin, for a command that builds
    no model (loading the plugin imports torch: ~6 s of CPU a process)."""
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "RESNET_LAB_MODELS_DIR": str(models),
           "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    if not plugins:
        env.pop("RESNET_LAB_MODEL_PLUGINS", None)
    return subprocess.run([sys.executable, "-m", "shared.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def no_crash(done: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.returncode in (0, 1, 2), (done.returncode, done.stderr[-3000:])


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("bad") / "data")


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory):
    """One tiny `resnet-lab train` on the corpus: (models dir, run id, CLI result)."""
    models = tmp_path_factory.mktemp("models")
    done = cli("train", "--data-dir", str(corpus), *TINY_CLI, "--skip-eval", models=models)
    no_crash(done)
    assert done.returncode == 0, done.stderr[-3000:]
    [run_id] = [p.name for p in models.iterdir() if (p / "status.json").is_file()]
    return models, run_id, done


def test_data_check_names_every_bad_file_with_its_problem(corpus, tmp_path):
    done = cli("data", "check", str(corpus), "--json", models=tmp_path, plugins=False)
    no_crash(done)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    reasons = {u["path"]: u["reason"] for u in report["unreadable"]}
    assert set(reasons) == set(BAD), reasons
    for path, expected in BAD.items():
        assert expected in reasons[path], (path, reasons[path])
    ignored = {i["path"]: i["reason"] for i in report["ignored"]}
    for path, expected in IGNORED.items():
        assert ignored.get(path) == expected, (path, ignored)
    assert set(ODD) <= set(report["hashes"]), "odd but valid images must be usable"
    assert report["counts"] == {"class_0": 14, "class_1": 14, "class_2": 15}

    text = cli("data", "check", str(corpus), models=tmp_path, plugins=False)
    no_crash(text)
    assert f"Unreadable (skipped) ({len(BAD)})" in text.stdout and "class_1/bomb.png: refused" in text.stdout


@pytest.mark.slow
def test_an_empty_class_folder_is_refused_by_name(tmp_path, capsys):
    from shared.cli import main

    data = tmp_path / "data"
    make_image_folder(data, classes=2, per_class=4, size=40)
    (data / "empty_class").mkdir()
    done = cli("data", "check", str(data), models=tmp_path / "models", plugins=False)
    no_crash(done)
    assert done.returncode == 2, done.stderr
    assert "empty_class" in done.stderr and "add images" in done.stderr and "or remove the folder" in done.stderr
    # train reads the folder the same way; through the CLI's entry function in this process (`train` imports
    # torch before it reads the folder: ~6 s a process; the real process's exit code is the check's above)
    code = main(["--models-dir", str(tmp_path / "models"), "train", "--data-dir", str(data), "--epochs", "1",
                 "--weights", "none", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "empty_class" in err and "add images" in err and "or remove the folder" in err
    assert not (tmp_path / "models").exists() or list((tmp_path / "models").iterdir()) == []  # no run was made


@pytest.mark.slow
def test_training_on_the_corpus_finishes_and_lists_what_it_skipped(trained, corpus):
    models, run_id, done = trained
    status = json.loads((models / run_id / "status.json").read_text())
    assert status["status"] == "succeeded", status
    split = json.loads((models / run_id / "split.json").read_text())
    assert {s["path"] for s in split["skipped"]} == set(BAD)
    assert set(ODD) <= {f["path"] for f in split["files"]}
    # the user sees what was left out, with the reason, without opening split.json
    output = done.stdout + done.stderr
    assert f"skipped {len(BAD)} unreadable files (not trained on)" in output, output[-3000:]
    for path, reason in BAD.items():
        assert f"  {path}: " in output and reason in output, path
    assert status["best"]["skipped_files"] == len(BAD)


@pytest.mark.slow
def test_predict_cli_gives_each_bad_file_its_own_message(trained, corpus):
    models, run_id, _ = trained
    # files one by one, and a folder (class_2) whose images, bad ones included, are each answered
    named = [p for p in list(BAD) + ODD if not p.startswith("class_2/")] + ["class_1/drawing.svg"]
    done = cli("predict", run_id, *(str(corpus / p) for p in named), str(corpus / "class_2"), "--top-k", "2",
               models=models)
    no_crash(done)
    assert done.returncode == 0, done.stderr
    lines = dict(line.split(": ", 1) for line in done.stdout.splitlines())
    for path, expected in {**BAD, "class_1/drawing.svg": "it is an SVG"}.items():
        answer = lines[str(corpus / path)]
        assert answer.startswith("skipped:") and expected in answer, (path, answer)
    for path in ODD:
        # an answer (a class, or "not sure" and the closest: the tiny model's calibration), not an error
        assert lines[str(corpus / path)].startswith(("class_", "not sure — closest: class_")), (path, lines[str(corpus / path)])
    class_2 = [line for line in lines if line.startswith(str(corpus / "class_2"))]
    assert len(class_2) == 12 + 3 + 3, class_2  # generated + odd + bad (the looping folder is not entered)


# --- the page ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def page(session_page, tmp_path_factory):
    """The session's page (tests/procs.py SharedStack) with the corpus in a data-root folder of this module's own,
    next to links that point out of it; an outside folder; the stack's finished run answers predictions."""
    stack = session_page
    data_root = stack.folder("bad-input")
    corpus = write_corpus(data_root / "data")
    outside = make_image_folder(tmp_path_factory.mktemp("page") / "outside", classes=2, per_class=3, size=40)
    for name, target in (("escape", outside), ("etc", Path("/etc"))):
        os.symlink(target, data_root / name)
    (data_root / "a_file.txt").write_text("not a folder")
    return stack, corpus, outside


@pytest.mark.slow
def test_predict_tab_answers_bad_uploads_with_a_message(page):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    stack, corpus, _ = page
    server = stack.page
    client = server.client()
    expected = {"class_0/notes.jpg": "it contains text", "class_1/login page.png": "HTML page",
                "class_1/bomb.png": "decompression bomb", "class_0/truncated.jpg": "truncated",
                "class_1/drawing.svg": "SVG", "class_0/empty.jpg": "empty file"}
    for path, message in expected.items():
        with pytest.raises(AppError, match=message):
            client.predict(handle_file(str(corpus / path)), stack.run_id, api_name="/predict")
    for path in ("class_0/cmyk.jpg", "class_0/deep16.png", "class_1/animated.gif", f"class_2/{NON_ASCII}"):
        label, _, answer = client.predict(handle_file(str(corpus / path)), stack.run_id, api_name="/predict")
        assert label["label"] in stack.CLASSES and "Answered by" in answer, (path, label)
    assert server.alive()


@pytest.mark.slow
def test_dataset_paths_outside_the_data_roots_are_refused(page):
    from gradio_client.exceptions import AppError

    stack, corpus, outside = page
    client = stack.page.client()
    params = tiny_form(corpus)
    refused = {
        f"{corpus}/{os.path.relpath(outside, corpus)}": "outside the data folders",   # ../ traversal
        "../" * 12 + "etc": "outside the data folders",
        str(corpus.parent / "escape"): "outside the data folders",   # a link out of the root
        str(corpus.parent / "etc"): "outside the data folders",
        str(outside): "outside the data folders",
        str(corpus.parent / "a_file.txt"): "is a file, not a folder",
        str(corpus / "class_0" / "cmyk.jpg"): "is a file, not a folder",
        str(corpus.parent / "missing"): "does not exist",
    }
    for path, message in refused.items():
        with pytest.raises(AppError, match=message):
            client.predict(path, api_name="/check_dataset")
        with pytest.raises(AppError, match=message):
            client.predict({**params, "data_dir": path}, api_name="/submit_runs")  # refused: nothing queued
    # inside the root it works (the check needs no Redis)
    result = client.predict(str(corpus), api_name="/check_dataset")
    assert "43 usable images" in result[0]


def test_cli_refuses_a_file_or_a_missing_folder_as_dataset(corpus, tmp_path):
    # the CLI runs as the local user, who may read any folder: it has no data roots to confine to, but it must
    # still refuse what is not a dataset folder with one line that says what to do (`train` reads the folder the
    # same way: see test_an_empty_class_folder_is_refused_by_name)
    for path, message in ((corpus / "class_0" / "cmyk.jpg", "is a file, not a folder"),
                          (corpus / "class_2" / "loop_dir" / "loop_dir" / "missing", "does not exist")):
        done = cli("data", "check", str(path), models=tmp_path / "models", plugins=False)
        no_crash(done)
        assert done.returncode == 2 and message in done.stderr, (path, done.stderr)
