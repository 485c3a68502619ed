"""The page's pure parts: ui/formatting.py (text primitives), the tabs' view modules (ui/runs_view.py,
train_view.py, data_view.py, results_view.py: the Results tab's views of a typed evaluation), and ui/paths.py (path
confinement and safe .zip extraction, with evil zips)."""

from __future__ import annotations

import io
import os
import stat
import struct
import zipfile
from pathlib import Path

import pytest

from shared.analysis.eval_result import ClassScores, EvalResult
from tests.evalfake import fake_eval
from tests.imagegen import make_image_folder
from ui import data_view, runs_view, train_view
from ui import formatting as fmt
from ui import results_view as view
from ui.paths import PathError, confine_dataset_path, discover_datasets, extract_zip, safe_folder_name


# --- formatting (ui/formatting.py) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seconds, text", [(None, "—"), (-1, "—"), (0, "0s"), (44.6, "45s"), (61, "1m 01s"),
                                           (3599, "59m 59s"), (3600, "1h 00m"), (90061, "1d 01h")])
def test_fmt_duration(seconds, text):
    assert fmt.fmt_duration(seconds) == text


@pytest.mark.parametrize("lr, text", [(1e-3, "1e-3"), (3e-4, "3e-4"), (0.01, "1e-2"), (0.1, "0.1"), (2.5e-4, "2.5e-4"),
                                      (None, "—")])
def test_fmt_lr(lr, text):
    assert fmt.fmt_lr(lr) == text


def test_fmt_ago_and_pct():
    assert fmt.fmt_ago(100.0, now=110.0) == "just now"
    assert fmt.fmt_ago(0.0, now=110.0) == "—"
    assert fmt.fmt_ago(1000.0, now=1000.0 + 7200) == "2 h ago"
    assert fmt.fmt_ago(1.0, now=1.0 + 86400) == "1 day ago"
    assert fmt.fmt_pct(0.9312) == "93.1%"
    assert fmt.fmt_pct(None) == "—"
    assert fmt.fmt_pct(float("nan")) == "—"


def test_markdown_and_html_escape_user_text():
    assert "<script>" not in fmt.md_escape("<script>alert(1)</script>")
    # a code span shows its text as written: no backslashes, no entities; backticks cannot close it early
    assert fmt.md_code("/data/my_photos & more") == "`/data/my_photos & more`"
    assert fmt.md_code("a`b") == "``a`b``" and fmt.md_code("`x") == "`` `x ``"


# --- runs view (ui/runs_view.py) -----------------------------------------------------------------------------------

def _record(status="running", **progress):
    return {"run_id": "20240101-120000-resnet18-abc123", "status": status, "started": 1000.0,
            "finished": 1300.0 if status in ("succeeded", "failed", "cancelled") else None, "worker": "celery@box",
            "config": {"model": "resnet18", "lr": 1e-3, "batch_size": 32, "epochs": 4},
            "progress": progress or None}


def test_progress_mid_epoch_and_after_an_epoch():
    mid = _record(epoch=2, epochs=4, batch=5, num_batches=10, eta_s=125, phase="training",
                  history=[{"epoch": 1, "val_acc": 0.5}])
    assert runs_view.progress_fraction(mid) == pytest.approx((1 + 0.5) / 4)
    assert runs_view.progress_text(mid) == "38% · epoch 2/4 · 2m 05s left"
    end_of_epoch = _record(epoch=2, epochs=4, batch=10, num_batches=10, phase="training",
                           history=[{"epoch": 1}, {"epoch": 2}])
    assert runs_view.progress_fraction(end_of_epoch) == pytest.approx(0.5)
    assert runs_view.progress_fraction(_record("succeeded")) == 1.0
    assert runs_view.progress_text(_record("queued")) == "waiting for a worker"
    preparing = _record(phase="preparing data", info={"decoded": 10, "total": 40}, epoch=0)
    assert runs_view.progress_text(preparing) == "preparing data 10/40"
    assert runs_view.progress_fraction(_record("running")) is None


def test_run_row_and_summary():
    record = _record("succeeded")
    record["best"] = {"best_val_acc": 0.875, "best_epoch": 3}
    row = runs_view.run_row(record, now=2000.0)
    assert row == ["20240101-120000-resnet18-abc123", "✔ succeeded", "resnet18", "1e-3", "32", "4", "100%",
                   "87.5% (ep 3)", "5m 00s", "box"]
    assert len(row) == len(runs_view.RUN_COLUMNS)
    summary = runs_view.run_summary(record)
    assert summary["best_val_acc"] == 0.875 and summary["progress"] == 1.0 and summary["duration_s"] == 300.0
    assert "history" not in str(summary)
    live = _record(epoch=2, epochs=4, batch=1, num_batches=10,
                   history=[{"epoch": 1, "val_acc": 0.4}, {"epoch": 2, "val_acc": 0.7}])
    assert runs_view.best_val_acc(live) == (0.7, 2)
    live["cancel_requested"] = True
    assert runs_view.run_row(live, now=1060.0)[1] == "■ cancelling"


def test_runs_that_ended_without_an_epoch_say_why_they_have_no_curves(tmp_path):
    """A run cancelled before it started showed "Waiting for the first epoch to finish…", which never happens."""
    from types import SimpleNamespace

    from ui import runs_data

    cancelled = {**_record("cancelled"), "started": None, "error": "cancelled before it started"}
    stopped = {**_record("cancelled"), "run_id": "20240101-120000-resnet18-def456",
               "error": "cancelled while running, after 0 finished epoch(s) (their checkpoint is kept)"}
    failed = {**_record("failed"), "run_id": "20240101-120000-resnet18-fed789",
              "error": "RuntimeError: CUDA out of memory\nTraceback (most recent call last): ..."}
    assert runs_view.no_curves_reason(cancelled) == ("**abc123 resnet18 lr 1e-3 bs 32** was cancelled before it "
                                                     "started, so it has no curves.")
    assert "cancelled before its first epoch finished" in runs_view.no_curves_reason(stopped)
    assert runs_view.no_curves_reason(failed).endswith(
        "failed before its first epoch: RuntimeError: CUDA out of memory")
    assert runs_view.no_curves_reason(_record("running")) is None
    assert runs_view.no_curves_reason(_record("queued")) is None

    lab = SimpleNamespace(store=SimpleNamespace(root=tmp_path))  # no metrics.jsonl anywhere: no epochs

    def curves(records, selected):
        return runs_data.curves(lab, runs_data.look(lab, records, "", "", "", ""), selected)

    note, loss, _ = curves([cancelled], [cancelled["run_id"]])
    assert "No epoch finished yet" in loss and "cancelled before it started" in note and "Waiting" not in note
    note, *_ = curves([failed, _record("running")], [failed["run_id"], _record()["run_id"]])
    assert note.startswith("Waiting for the first epoch") and "CUDA out of memory" in note
    trained = {**_record("succeeded"), "run_id": "20240101-120000-resnet18-aaa111",
               "progress": {"history": [{"epoch": 1, "val_loss": 1.0, "val_acc": 0.5}]}}
    note, loss, _ = curves([trained, cancelled], [trained["run_id"], cancelled["run_id"]])
    assert note.startswith("Curves of the 2 selected runs.") and "cancelled before it started" in note
    assert loss.count('class="series"') == 1 and loss.count("<li ") == 1  # the run with an epoch, named
    skewed = {**trained, "progress": {"history": [{"epoch": 2, "val_loss": 1.0, "val_acc": 0.8, "val_macro_f1": 0.55,
                                                   "val_recall": {"tulip": 0.9, "<b>rose</b>": 0.2}}]}}
    note, *_ = curves([skewed], [skewed["run_id"]])
    # lowest recall first (where a skewed dataset hurts), class names escaped
    assert note.endswith("val recall per class (epoch 2, macro F1 0.550): &lt;b&gt;rose&lt;/b&gt; 20% · tulip 90%"), note


def test_run_label_is_short_and_distinct():
    a = runs_view.run_label(_record())
    assert a == "abc123 resnet18 lr 1e-3 bs 32"
    assert runs_view.full_label(_record()).endswith("abc123 · resnet18 lr 1e-3 bs 32")


def test_curve_series_per_split_and_epoch():
    record = _record()
    history = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "train_acc": 0.4, "val_acc": 0.5},
               {"epoch": 2, "train_loss": 0.8, "val_loss": float("nan")},
               {"epoch": 2, "train_loss": 0.7}]  # an epoch logged twice (a resumed run): its last value
    loss, acc, legend = runs_view.curve_series([(record, history)], "val")
    assert [(s.name.rsplit(" · ", 1)[1], s.points, s.dashed) for s in loss] == [("val", [(1.0, 1.2)], False)]
    loss, acc, legend = runs_view.curve_series([(record, history)])
    assert [(s.points, s.dashed) for s in loss] == [([(1.0, 1.0), (2.0, 0.7)], True), ([(1.0, 1.2)], False)]
    assert legend == [(record["run_id"], loss[0].colour, runs_view.full_label(record))]
    assert runs_view.curve_series([(record, [])]) == ([], [], [])


def test_robust_upper_ignores_ordinary_curves_and_clips_spikes():
    assert runs_view.robust_upper([1.0, 0.8, 0.6, 0.5]) is None
    assert runs_view.robust_upper([2e6, 0.9, 0.7, 0.6, 0.5, 0.5, 0.4, 0.4, 0.4, 0.3]) == pytest.approx(1.35)
    assert runs_view.robust_upper([5.0]) is None


def test_detail_and_banner_texts_escape_what_users_and_workers_wrote():
    failed = {**_record("failed"), "error": "ValueError: bad *stuff* <b>\nTraceback ..."}
    done = {**_record("succeeded"), "run_id": "20240101-120000-resnet18-def456",
            "best": {"best_val_acc": 0.5, "best_epoch": 2}}
    text = runs_view.detail_text([failed, done], [failed["run_id"], "gone", done["run_id"]], now=2000.0)
    first, second = text.split("\n\n")
    assert first.endswith("ValueError: bad \\*stuff\\* &lt;b&gt;") and "Traceback" not in first
    assert "best val accuracy 50.0% at epoch 2, took 5m 00s" in second
    assert runs_view.banner_text(None) == ""
    assert "cannot reach <redis>" not in runs_view.banner_text("cannot reach <redis>.")


# --- train view (ui/train_view.py) ---------------------------------------------------------------------------------

def test_parse_lrs():
    assert train_view.parse_lrs("3e-4, 0.002;1e-2 ") == [3e-4, 0.002, 1e-2]
    assert train_view.parse_lrs("") == []
    with pytest.raises(ValueError, match="'fast' is not a number"):
        train_view.parse_lrs("1e-3, fast")
    with pytest.raises(ValueError, match="positive"):
        train_view.parse_lrs("-1")


def test_grid_count_says_how_many_and_why():
    n, text = train_view.grid_count(["resnet18"], [1e-3, 3e-4], [32])
    assert n == 2 and "2 runs will be queued" in text and "1 model × 2 learning rates × 1 batch size" in text
    n, text = train_view.grid_count(["resnet18", "resnet34"], [1e-3], [16, 32])
    assert n == 4
    n, text = train_view.grid_count([], [1e-3], [])
    assert n == 0 and "a model" in text and "a batch size" in text


def test_ratio_note_warns_when_little_is_left_for_training():
    assert train_view.ratio_note(0.15, 0.15) == "Split: **70% train** / 15% validation / 15% test."
    assert "keep at least 10% for training" in train_view.ratio_note(0.45, 0.5)


# --- data view (ui/data_view.py) -----------------------------------------------------------------------------------

def test_problems_markdown_lists_findings():
    report = {"problems": ["2 files could not be decoded"], "unreadable": [{"path": "cat/x.jpg", "reason": "empty"}],
              "ignored": [{"path": "notes.txt", "reason": "not an image"}]}
    text = data_view.problems_markdown(report)
    assert "1 problem found" in text and "cat/x.jpg" in text and "notes.txt" in text
    assert "No problems" in data_view.problems_markdown({"problems": []})


def test_predict_table_rows_show_the_top_three_or_the_error():
    from ui import predict_view

    ok = {"source": "a.png", "error": None, "top": [{"class": "cat", "probability": 0.91234},
                                                   {"class": "dog", "probability": 0.05}]}
    bad = {"source": "b.png", "error": "not an image", "top": []}
    assert predict_view.table_rows([ok, bad]) == [["a.png", "cat", 0.9123, "dog", "", ""],
                                                  ["b.png", "", None, "", "", "not an image"]]
    assert len(predict_view.TABLE_COLUMNS) == 6
    unsure = {**ok, "sure": False}
    assert predict_view.table_rows([unsure])[0][1] == "not sure — closest: cat"


def test_predict_answer_says_not_sure_below_the_threshold_and_refuses_a_bad_threshold():
    from types import SimpleNamespace

    from shared.analysis.calibration import verdict
    from ui import predict_view
    from ui.tabs import predict

    top = [{"class": "cat", "probability": 0.6}, {"class": "dog", "probability": 0.4}]
    assert predict_view.verdict_line(verdict(top, 0.5)) == "**cat** (60.0%)"
    line = predict_view.verdict_line(verdict(top, 0.8))
    assert line.startswith("**Not sure** — closest: cat (60.0%, below the 80.0%"), line
    assert "no calibration" in predict_view.verdict_line(verdict(top, None), "this run has no calibration")
    assert predict._threshold(0) is None and predict._threshold(0.7) == 0.7
    for bad in (1.5, -0.1, "0.5", True, float("nan")):
        with pytest.raises(Exception, match="between 0 and 1"):
            predict._threshold(bad)

    # the line the slider redraws: the shown top-5 of the run that answered, at the slider's threshold
    class Calibrated:
        threshold, calibration_note = 0.9, ""

        def verdict(self, top, threshold=None, distance=None):
            return verdict(top, self.threshold if threshold is None else threshold, distance,
                           12.0 if distance is not None else None)

    lab = SimpleNamespace(predictors=SimpleNamespace(get=lambda run: Calibrated()))
    shown = {"dog": 0.3, "cat": 0.7}
    assert predict.verdict_text(lab, shown, 0, "run-1").startswith("**Not sure** — closest: cat (70.0%, below the 90.0%")
    assert predict.verdict_text(lab, shown, 0.5, "run-1") == "**cat** (70.0%)"
    assert predict.verdict_text(lab, None, 0.5, "run-1") == ""
    # the picture's feature distance (the answer's State): beyond the run's limit, "not sure" at any threshold
    def measured(distance, run="run-1"):
        return {"run": run, "distance": distance}

    assert predict.verdict_text(lab, shown, 0.5, "run-1", measured(11.9)) == "**cat** (70.0%)"
    far = predict.verdict_text(lab, shown, 0.5, "run-1", measured(30.0))
    assert far == ("**Not sure** — closest: cat (70.0%), but this picture is unlike the images the model was "
                   "trained on (feature distance 30.0, above the 12.0 it answers up to)"), far
    assert predict.verdict_text(lab, shown, 0.5, "run-1", measured("30")) == "**cat** (70.0%)"  # numbers only
    # measured by another run (the answer's run changed since, e.g. "Classify all" with another model): not used
    assert predict.verdict_text(lab, shown, 0.5, "run-1", measured(30.0, run="run-2")) == "**cat** (70.0%)"
    assert not verdict(list(top), 0.0, float("nan"), 12.0).sure  # a NaN distance is not "familiar"


# --- results views (ui/results_view.py) ----------------------------------------------------------------------------

def typed(classes=("cat", "dog"), **fields) -> EvalResult:
    return EvalResult.from_dict(fake_eval(list(classes), **fields))


def test_confusion_html_escapes_class_names_and_switches_mode():
    result = typed(["<b>cat</b>", "dog"])
    result.confusion.counts, result.confusion.normalized = [[3, 1], [0, 4]], [[0.75, 0.25], [0.0, 1.0]]
    html = view.confusion_html(result, "counts")
    assert "<b>cat</b>" not in html and "&lt;b&gt;cat&lt;/b&gt;" in html
    assert ">3<" in html and ">4<" in html
    norm = view.confusion_html(result, "normalized")
    assert ">75%<" in norm and ">100%<" in norm
    result.classes = []
    assert "No confusion matrix" in view.confusion_html(result, "counts")


def test_undefined_per_class_scores_show_a_dash_and_say_why():
    """eval.json has null for the precision of a class never predicted (and the recall of a class with no test
    images); the table showed a blank cell. Now a dash, and a note that matches the macro average's zero_division=0."""
    rows = [ClassScores("circle", 0.33333, 1.0, 0.5, 2), ClassScores("square", None, 0.0, None, 2),
            ClassScores("stripe", None, None, None, 0)]
    headers, table = view.per_class_rows(rows)
    assert headers == ["class", "precision", "recall", "f1", "support"]
    assert table[0] == ["circle", 0.3333, 1.0, 0.5, 2]
    assert table[1] == ["square", fmt.DASH, 0.0, fmt.DASH, 2] and table[2] == ["stripe", fmt.DASH, fmt.DASH, fmt.DASH, 0]
    note = view.per_class_note(rows)
    assert "precision: never predicted (square, stripe)" in note and "counts it as 0" in note
    assert "recall: no test images of stripe" in note
    assert view.per_class_note(rows[:1]) == ""


def test_roc_and_pr_frames_put_the_averages_first_with_short_labels():
    result = typed(["cat", "dog", "bird"])
    roc = view.roc_frame(result.roc)
    # short labels, averages first: a legend Vega cannot wrap loses its last entries ("macro (AUC …)" did)
    want = [f"micro avg {result.roc.micro.auc:.3f}", f"macro avg {result.roc.macro.auc:.3f}"] + \
        [f"{name} {result.roc.per_class[name].auc:.3f}" for name in ("cat", "dog", "bird")]
    assert list(dict.fromkeys(roc["curve"])) == want
    assert list(roc.columns) == ["x", "y", "curve"] and roc["x"].between(0, 1).all()
    pr = view.pr_frame(result.pr)
    assert list(dict.fromkeys(pr["curve"]))[0] == f"micro avg {result.pr.micro.ap:.3f}"
    assert len(set(pr["curve"])) == 4
    result.roc.macro = None
    assert "macro avg" not in " ".join(view.roc_frame(result.roc)["curve"])


def test_tsne_frame_names_classes_and_is_empty_when_skipped():
    result = typed(["cat", "dog"])
    result.tsne.x, result.tsne.y, result.tsne.label, result.tsne.pred = [0.0, 1.0], [1.0, 0.0], [0, 1], [0, 0]
    tsne = view.tsne_frame(result.tsne, result.classes)
    assert list(tsne["true class"]) == ["cat", "dog"] and list(tsne["correct"]) == ["yes", "no"]
    assert view.tsne_frame(None, ["cat"]).empty
    assert view.test_image_choices(typed(figure_level="basic")) == []


def test_metrics_markdown_shows_the_headline_numbers():
    result = typed(["a", "b", "c", "d"], notes=["t-SNE shows a random 5000 of 6000 images"])
    text = view.metrics_markdown(result)
    assert f"**Accuracy:** {100 * result.accuracy:.1f}%" in text
    assert f"Macro F1:** {result.macro.f1:.3f}" in text and f"Top-4 accuracy:** 100.0%" in text
    assert f"Balanced accuracy:** {100 * result.balanced_accuracy:.1f}%" in text
    assert f"(ECE):** {result.calibration.ece:.3f}" in text and "(60 images)" in text
    assert "t-SNE shows a random" in text and "skipped these figures" not in text


def test_metrics_markdown_says_which_figures_a_basic_evaluation_skipped():
    result = typed(figure_level="basic")
    text = view.metrics_markdown(result)
    assert "skipped these figures (figures = basic): t-SNE, Grad-CAM samples, Grad-CAM of errors, top losses" in text
    assert "RESNET_LAB_EVAL_FIGURES=all" in text
    assert not view.drew(result, view.CAM_FIGURES) and view.drew(typed(), view.CAM_FIGURES)


def test_calibration_frame_uses_filled_bins():
    result = typed()
    for b in result.calibration.bins:
        b.count, b.accuracy, b.confidence = 0, None, None
    assert view.calibration_frame(result.calibration).empty
    result.calibration.bins[8].count, result.calibration.bins[8].accuracy = 3, 0.5
    result.calibration.bins[8].confidence = 0.6
    frame = view.calibration_frame(result.calibration)
    assert frame.to_dict("records")[0] == {"x": 0.6, "y": 0.5, "curve": "model"}
    assert set(frame["curve"]) == {"model", "perfectly calibrated"}


def test_gallery_shows_only_figures_inside_the_run_folder(tmp_path):
    from PIL import Image

    run_dir = tmp_path / "run"
    (run_dir / "eval").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(run_dir / "eval" / "cam_samples.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "secret.png")
    result = typed(figures={"cam_samples": "eval/cam_samples.png", "cam_errors": "../secret.png",
                            "top_losses": "eval/missing.png"})
    assert view.gallery(result, run_dir, view.CAM_FIGURES) == [
        (str((run_dir / "eval" / "cam_samples.png").resolve()), view.CAM_FIGURES["cam_samples"])]
    assert view.gallery(result, run_dir, view.TOP_LOSS_FIGURES) == []


def test_predict_model_line_names_the_run_that_answered():
    """The timer last saw run A as the latest; B finished and answered: the model line follows the answer."""
    from types import SimpleNamespace

    from ui.tabs import predict

    runs = {rid: {"run_id": rid, "config": {"model": "resnet18", "lr": 1e-3, "batch_size": 32}, "finished": 1.0}
            for rid in ("20240101-120000-resnet18-aaaaaa", "20240101-130000-resnet18-bbbbbb")}
    lab = SimpleNamespace(store=SimpleNamespace(latest_succeeded=lambda: "20240101-120000-resnet18-aaaaaa"),
                          record=runs.__getitem__)
    assert "with **aaaaaa resnet18" in predict.model_info_text(lab, "latest")
    info, state = predict.answered_info(lab, "20240101-130000-resnet18-bbbbbb", "latest", {"info": "old line"})
    assert "with **bbbbbb resnet18" in info and state["info"] == info


def test_finetune_is_full_greyed_out_and_says_why_when_training_from_scratch():
    from ui.tabs import train

    radio, _ = train.on_weights(["resnet18"], "none")
    assert radio.value == "full" and radio.interactive is False and "no pretrained layers" in radio.info
    radio, _ = train.on_weights(["resnet18"], "DEFAULT")
    assert radio.interactive is True and not radio.info  # the user's choice is kept (no value sent)
    assert "value" not in train.finetune_state("DEFAULT")


# --- path confinement ----------------------------------------------------------------------------------------------

@pytest.fixture
def roots(tmp_path):
    data = tmp_path / "data"
    make_image_folder(data / "flowers", classes=2, per_class=2, size=16)
    outside = make_image_folder(tmp_path / "outside", classes=2, per_class=2, size=16)
    return data, outside


def test_confine_accepts_folders_inside(roots):
    data, _ = roots
    assert confine_dataset_path("flowers", [data]) == (data / "flowers").resolve()
    assert confine_dataset_path(str(data / "flowers"), [data]) == (data / "flowers").resolve()
    assert confine_dataset_path(str(data / "flowers" / ".." / "flowers"), [data]) == (data / "flowers").resolve()


def test_confine_refuses_escapes(roots, tmp_path):
    data, outside = roots
    with pytest.raises(PathError, match="outside the data folders"):
        confine_dataset_path(str(data / ".." / "outside"), [data])
    with pytest.raises(PathError, match="outside the data folders"):
        confine_dataset_path("../outside", [data])
    with pytest.raises(PathError, match="outside the data folders"):
        confine_dataset_path("/etc", [data])
    (data / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(PathError, match="outside the data folders"):
        confine_dataset_path("link", [data])


def test_confine_refuses_files_missing_and_empty(roots):
    data, _ = roots
    (data / "archive.zip").write_bytes(b"PK")
    with pytest.raises(PathError, match="is a file, not a folder — upload the .zip"):
        confine_dataset_path("archive.zip", [data])
    image = next((data / "flowers").rglob("*.png"), None) or next((data / "flowers").rglob("*.*"))
    with pytest.raises(PathError, match="is a file, not a folder"):
        confine_dataset_path(str(image), [data])
    with pytest.raises(PathError, match="does not exist"):
        confine_dataset_path("nope", [data])
    with pytest.raises(PathError, match="no dataset folder given"):
        confine_dataset_path("  ", [data])
    with pytest.raises(PathError, match="NUL"):
        confine_dataset_path("flow\x00ers", [data])


def test_confine_symlink_loop_is_refused_not_crashing(roots):
    data, _ = roots
    (data / "loop").symlink_to(data / "loop")
    with pytest.raises(PathError):
        confine_dataset_path("loop", [data])


def test_discover_datasets(roots, tmp_path):
    data, outside = roots
    make_image_folder(data / "nested" / "deeper" / "pets", classes=2, per_class=1, size=8)
    (data / "lonely" / "only").mkdir(parents=True)
    (data / ".hidden" / "a").mkdir(parents=True)
    (data / "escape").symlink_to(outside, target_is_directory=True)
    found = discover_datasets([data])
    assert (data / "flowers").resolve() in found
    assert (data / "nested" / "deeper" / "pets").resolve() in found
    assert not any("lonely" in str(p) or ".hidden" in str(p) for p in found)
    assert all(str(p).startswith(str(data.resolve())) for p in found)
    assert discover_datasets([tmp_path / "missing"]) == []


# --- zip extraction ------------------------------------------------------------------------------------------------

def _png_bytes(seed: int = 0) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (seed * 40 % 255, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def _zip(path: Path, entries: dict[str, bytes], symlinks: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
        for name, target in (symlinks or {}).items():
            info = zipfile.ZipInfo(name)
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
    return path


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_zip_extracts_images_and_unwraps_single_top_folder(tmp_path):
    dest = tmp_path / "data"
    z = _zip(tmp_path / "My Flowers!.zip", {"flowers/daisy/a.png": _png_bytes(1), "flowers/daisy/b.png": _png_bytes(2),
                                            "flowers/rose/c.PNG": _png_bytes(3), "flowers/README.html": b"<script>",
                                            "__MACOSX/flowers/._a.png": b"junk", "flowers/rose/.DS_Store": b"x"})
    done = extract_zip(z, dest)
    assert done.folder == (dest / "My_Flowers" / "flowers").resolve()
    assert sorted(p.name for p in done.folder.rglob("*") if p.is_file()) == ["a.png", "b.png", "c.PNG"]
    assert done.images == 3 and done.skipped == ["flowers/README.html"]
    assert not (dest / "My_Flowers" / "__MACOSX").exists()
    # a second upload of the same name gets its own folder
    again = extract_zip(z, dest)
    assert again.folder == (dest / "My_Flowers-2" / "flowers").resolve()
    assert _leftovers(dest) == ["My_Flowers", "My_Flowers-2"]


@pytest.mark.parametrize("name", ["../evil.png", "a/../../evil.png", "/tmp/evil.png", "C:/evil.png",
                                  "a\\..\\..\\evil.png"])
def test_zip_slip_is_refused(tmp_path, name):
    dest = tmp_path / "data"
    z = tmp_path / "evil.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ok/a.png", _png_bytes())
        info = zipfile.ZipInfo("placeholder")
        info.filename = name  # ZipInfo normalises separators in the constructor; set the raw name afterwards
        zf.writestr(info, _png_bytes())
    with pytest.raises(PathError, match="absolute path|climbs out"):
        extract_zip(z, dest)
    assert _leftovers(dest) == []
    assert not (tmp_path / "evil.png").exists() and not Path("/tmp/evil.png").exists()


def test_zip_with_symlink_is_refused(tmp_path):
    dest = tmp_path / "data"
    z = _zip(tmp_path / "link.zip", {"ds/a/x.png": _png_bytes()}, symlinks={"ds/b/passwd.png": "/etc/passwd"})
    with pytest.raises(PathError, match="is a link"):
        extract_zip(z, dest)
    assert _leftovers(dest) == []


def test_zip_caps_file_count_and_size(tmp_path):
    dest = tmp_path / "data"
    many = _zip(tmp_path / "many.zip", {f"ds/c{i % 2}/{i}.png": _png_bytes(i) for i in range(12)})
    with pytest.raises(PathError, match="more than 10 files"):
        extract_zip(many, dest, max_files=10)
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ds/a/zeros.png", b"\0" * 5_000_000)  # compresses to a few KB
        zf.writestr("ds/b/zeros.png", b"\0" * 5_000_000)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(PathError, match="expands to more than"):
        extract_zip(bomb, dest, max_bytes=8_000_000)
    assert _leftovers(dest) == []


def test_zip_entry_lying_about_its_size_is_refused(tmp_path):
    """A crafted archive declares 10 bytes for an entry that inflates to 1 MB: the cap is on what is written."""
    dest = tmp_path / "data"
    z = tmp_path / "liar.zip"
    with zipfile.ZipFile(z, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ds/a/big.png", b"\0" * 1_000_000)
        zf.writestr("ds/b/ok.png", _png_bytes())
    raw = bytearray(z.read_bytes())
    central = raw.find(b"PK\x01\x02")  # first central-directory record: ds/a/big.png
    struct.pack_into("<I", raw, central + 24, 10)  # its uncompressed size
    z.write_bytes(bytes(raw))
    with pytest.raises(PathError):
        extract_zip(z, dest)
    assert _leftovers(dest) == []


def test_not_a_zip_and_empty_zip(tmp_path):
    dest = tmp_path / "data"
    fake = tmp_path / "fake.zip"
    fake.write_text("hello")
    with pytest.raises(PathError, match="not a readable .zip"):
        extract_zip(fake, dest)
    only_text = _zip(tmp_path / "text.zip", {"notes.txt": b"hi", "page.html": b"<script>"})
    with pytest.raises(PathError, match="no image files"):
        extract_zip(only_text, dest)
    assert _leftovers(dest) == []


def test_duplicate_entries_are_refused(tmp_path):
    dest = tmp_path / "data"
    z = tmp_path / "dup.zip"
    with zipfile.ZipFile(z, "w") as zf:
        zf.writestr("ds/a/x.png", _png_bytes(1))
        with pytest.warns(UserWarning):
            zf.writestr("ds/a/x.png", _png_bytes(2))
    with pytest.raises(PathError, match="same file twice"):
        extract_zip(z, dest)
    assert _leftovers(dest) == []


def test_safe_folder_name():
    assert safe_folder_name("My Flowers (1).zip") == "My_Flowers_1"
    assert safe_folder_name("../../etc.zip") == "etc"
    assert safe_folder_name(".zip") == "dataset"
    assert safe_folder_name("...hidden.zip") == "hidden"


def test_extracted_files_are_not_executable(tmp_path):
    dest = tmp_path / "data"
    z = tmp_path / "x.zip"
    with zipfile.ZipFile(z, "w") as zf:
        info = zipfile.ZipInfo("ds/a/x.png")
        info.create_system = 3
        info.external_attr = (stat.S_IFREG | 0o4777) << 16  # setuid + world-writable in the archive
        zf.writestr(info, _png_bytes())
        zf.writestr("ds/b/y.png", _png_bytes(2))
    done = extract_zip(z, dest)
    mode = (done.folder / "a" / "x.png").stat().st_mode
    assert not mode & (stat.S_ISUID | stat.S_IXUSR | stat.S_IWOTH)
    assert os.access(done.folder / "a" / "x.png", os.R_OK)


def test_prediction_csv_folders_are_pruned_after_a_day():
    import time

    from ui.tabs import predict

    first = predict._csv_folder()
    (first / "predictions.csv").write_text("source,error\n")
    second = predict._csv_folder()
    assert first.parent == second.parent and first != second  # one folder per CSV: each download keeps its name
    day_ago = time.time() - predict.CSV_MAX_AGE_S - 60
    os.utime(first, (day_ago, day_ago))
    third = predict._csv_folder()
    assert not first.exists() and second.exists() and third.exists()


def test_the_page_deletes_its_cached_uploads_after_a_day(tmp_path):
    from shared.settings import Settings
    from ui.app import CACHE_CLEANUP, build_app

    demo = build_app(Settings(models_dir=tmp_path / "models", data_roots=(tmp_path,)))
    assert demo.delete_cache == CACHE_CLEANUP and CACHE_CLEANUP[1] <= 86400


def test_a_cloned_run_leaves_automatic_progressive_resizing_automatic():
    from shared.training.config import TrainConfig
    from ui.tabs.train import config_to_form

    automatic = TrainConfig(data_dir="x", time_budget=30, weights="none")  # resolved to 0.5
    assert config_to_form(automatic.to_dict())["progressive_resize"] == train_view.AUTOMATIC  # automatic again
    chosen = TrainConfig(data_dir="x", time_budget=30, weights="none", progressive_resize=0.25)
    assert config_to_form(chosen.to_dict())["progressive_resize"] == 0.25
    assert config_to_form(TrainConfig(data_dir="x", time_budget=30, progressive_resize=0.5).to_dict())[
        "progressive_resize"] == 0.5  # asked for with ImageNet weights, where automatic would be off


def test_the_form_leaves_automatic_progressive_resizing_to_the_config():
    assert "progressive_resize" not in train_view.form_params({"progressive_resize": train_view.AUTOMATIC}, "d")
    assert train_view.form_params({"progressive_resize": "0.3"}, "d")["progressive_resize"] == 0.3  # typed in
    assert train_view.form_params({"progressive_resize": 0.0}, "d")["progressive_resize"] == 0  # off, as chosen
    assert train_view.form_params({"progressive_resize": "half"}, "d")["progressive_resize"] == "half"  # refused later
