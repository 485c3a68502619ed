"""The HTML report: self-contained (figures inlined, nothing fetched), complete, and escaping data it shows."""

from __future__ import annotations

import base64
import io
import json
import re

import pytest
from PIL import Image

from shared.analysis import plots
from shared.analysis.report import write_report
from tests.evalfake import fake_eval

EVIL = '<script>alert("x")</script>'


# (classes, figure name) -> PNG bytes: fake_eval's numbers depend only on the classes (seeded), so each figure is
# drawn once per class list (matplotlib: the module's main cost) and copied into the other tests' run folders
DRAWN: dict[tuple[tuple[str, ...], str], bytes] = {}


def fake_run(tmp_path, classes, **eval_fields):
    """A run folder as fit + evaluate_run leave it, built from arrays (no training): fast and fully controlled."""
    run_dir = tmp_path / "20260101-000000-resnet18-abcdef"
    (run_dir / "eval").mkdir(parents=True)
    (run_dir / "config.json").write_text(json.dumps({"model": "resnet18", "data_dir": f"/data/{EVIL}",
                                                     "lr": 0.01, "env": {"torch": "2.x"}, "classes": classes}))
    (run_dir / "status.json").write_text(json.dumps({"run_id": run_dir.name, "status": "succeeded",
                                                     "error": None, "created": "2026-01-01T00:00:00"}))
    records = [{"epoch": e, "train_loss": 1 / e, "train_acc": 0.5 + e / 10, "val_loss": 1.1 / e,
                "val_acc": 0.45 + e / 10, "lr": 0.01, "images_per_s": 50.0, "seconds": 2.0} for e in (1, 2, 3)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    result = fake_eval(classes, run_id=run_dir.name, skipped=[{"path": EVIL, "error": "bad"}], **eval_fields)
    figures = {}
    for name, draw in (("confusion", lambda: plots.plot_confusion(result["confusion"]["counts"], classes)),
                       ("roc", lambda: plots.plot_roc(result["roc"], classes)),
                       ("reliability", lambda: plots.plot_reliability(result["calibration"]))):
        path = run_dir / "eval" / f"{name}.png"
        drawn = DRAWN.get((tuple(classes), name))
        if drawn is None:
            plots.save_figure(draw(), path)
            DRAWN[(tuple(classes), name)] = path.read_bytes()
        else:
            path.write_bytes(drawn)
        figures[name] = f"eval/{name}.png"
    result["figures"] = figures
    (run_dir / "eval" / "eval.json").write_text(json.dumps(result, allow_nan=False))
    return run_dir, result


def inline_images(html: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)]


def test_report_is_self_contained_and_inlines_every_figure(tmp_path):
    run_dir, result = fake_run(tmp_path, ["cat", "dog", "bird"])
    path = write_report(run_dir)
    assert path == run_dir / "report.html"
    html = path.read_text(encoding="utf-8")
    assert not re.search(r"https?://", html), "the report must not reference anything online"
    targets = re.findall(r"""\b(?:src|href)\s*=\s*["']?([^"'\s>]*)""", html)
    assert targets and all(t.startswith(("data:", "#")) for t in targets), "only data: sources"
    assert "<link" not in html and "@import" not in html and "<script" not in html
    images = inline_images(html)
    assert len(images) == len(result["figures"]) + 1  # + training curves drawn from metrics.jsonl
    for png in images:
        with Image.open(io.BytesIO(png)) as img:
            img.load()
            assert img.format == "PNG" and img.width > 300
    for text in ("resnet18", "succeeded", "cat", "dog", "bird", "ROC AUC", "expected calibration error",
                 "Most confused pairs", "Per class"):
        assert text in html, text


def test_report_escapes_strings_from_data(tmp_path):
    run_dir, _ = fake_run(tmp_path, ["cat", EVIL, "b&b"])
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert EVIL not in html and "<script" not in html
    assert "&lt;script&gt;" in html and "b&amp;b" in html


def test_report_of_an_unevaluated_run_says_how_to_evaluate(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "resnet-lab evaluate" in html and "no metrics.jsonl" in html


def test_a_missing_figure_is_reported_not_fatal(tmp_path):
    run_dir, _ = fake_run(tmp_path, ["cat", "dog"])
    (run_dir / "eval" / "roc.png").unlink()
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "figure roc is missing" in html


def test_a_figure_path_outside_the_run_is_not_read(tmp_path):
    run_dir, result = fake_run(tmp_path, ["cat", "dog"])
    secret = tmp_path / "secret.png"
    plots.save_figure(plots.plot_curves([]), secret)
    result["figures"]["roc"] = "../secret.png"
    (run_dir / "eval" / "eval.json").write_text(json.dumps(result))
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "figure roc is missing" in html


def test_report_shows_the_typed_headline_and_the_figures_a_basic_evaluation_skipped(tmp_path):
    """A run evaluated with figures="basic": the report names what was skipped instead of silently lacking it, and
    shows balanced accuracy and macro F1 from the typed result."""
    run_dir, result = fake_run(tmp_path, ["cat", "dog"], figure_level="basic")
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "This evaluation drew basic figures and skipped: t-SNE, Grad-CAM samples" in html
    assert "balanced accuracy" in html and "macro precision / recall / F1" in html
    macro_f1 = f"{result['macro']['f1']:.4f}".rstrip("0").rstrip(".")
    assert macro_f1 in html


def test_an_unusable_evaluation_is_named_in_the_report_and_the_others_still_shown(tmp_path):
    run_dir, result = fake_run(tmp_path, ["cat", "dog"])
    (run_dir / "eval-val").mkdir()
    (run_dir / "eval-val" / "eval.json").write_text(json.dumps({**result, "schema_version": 99}))
    (run_dir / "eval-folder-x").mkdir()
    (run_dir / "eval-folder-x" / "eval.json").write_text("{not json")
    html = write_report(run_dir).read_text(encoding="utf-8")
    assert "Evaluation: eval</h2>" in html and "Per class" in html
    assert "has schema_version 99" in html and "evaluate the run again" in html
    assert "eval-folder-x" in html and "is not valid JSON" in html


def test_report_of_a_missing_run_folder_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_report(tmp_path / "nope")
