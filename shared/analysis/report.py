"""One self-contained HTML report per run: config, training curves, evaluation metrics and every figure.

Images are inlined as base64 `data:` URIs and the style sheet is inline, so `report.html` opens offline, can be
mailed as one file, and references nothing outside itself. Every string that comes from data (class names, paths,
config values, error messages) goes through `html.escape`.
"""

from __future__ import annotations

import base64
import html
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from shared.analysis.eval_result import FIGURE_TITLES, EvalResult, EvalResultError, load_eval_result
from shared.fsutil import write_atomic

logger = logging.getLogger(__name__)

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 2rem auto; max-width: 1200px;
       padding: 0 1rem; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6rem; margin-bottom: .2rem; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .3rem; }
table { border-collapse: collapse; margin: .5rem 0 1rem; font-size: .9rem; }
th, td { border: 1px solid #d0d7de; padding: .25rem .6rem; text-align: left; vertical-align: top; }
th { background: #f6f8fa; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1rem 0; } figure img { max-width: 100%; border: 1px solid #eaeef2; }
figcaption { font-size: .85rem; color: #57606a; }
.muted { color: #57606a; } .note { background: #fff8c5; padding: .4rem .7rem; border-radius: 4px; }
pre { background: #f6f8fa; padding: .6rem; overflow-x: auto; font-size: .8rem; }
"""

# Figure order in the report (others follow alphabetically) and their captions.
FIGURE_CAPTIONS = {
    "curves": "Loss and accuracy per epoch, train and validation.",
    "confusion": "Confusion matrix, counts (rows: true class; columns: predicted class).",
    "confusion_normalized": "Confusion matrix, each row divided by the number of images of that class (= recall "
                            "on the diagonal).",
    "roc": "ROC curves, one class against the rest, with micro and macro averages.",
    "pr": "Precision-recall curves with average precision, and the micro average.",
    "reliability": "Reliability diagram: how often the model is right at each confidence level.",
    "tsne": "t-SNE of the penultimate-layer features; circled points are misclassified.",
    "class_counts": "Images per class in the evaluated set.",
    "cam_samples": "Heat-maps for a few images of every class (predicted class); the figure names the method and "
                   "the map's resolution.",
    "cam_errors": "The most confident errors, with heat-maps for the predicted and for the true class.",
    "top_losses": "The images with the highest loss.",
    "class_samples": "Images per class as the model sees them (resized and centre-cropped).",
    "activations": "The strongest feature maps of each stage (conv1 to layer4 on a ResNet) for one image.",
}


def write_report(run_dir: str | os.PathLike) -> Path:
    """Write `<run_dir>/report.html` (atomic) and return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist — pass a run folder under the models folder")
    text = build_report_html(run_dir)
    path = run_dir / "report.html"
    write_atomic(path, text)
    logger.info("wrote %s (%d kB)", path, len(text) // 1024)
    return path


def build_report_html(run_dir: Path) -> str:
    from shared.runs.store import read_metrics

    run_dir = Path(run_dir)
    config = _read_json(run_dir / "config.json") or {}
    status = _read_json(run_dir / "status.json") or {}
    records = read_metrics(run_dir)
    parts = [f"<h1>Run {_e(run_dir.name)}</h1>", _status_line(status),
             "<h2>Configuration</h2>", _config_table(config)]
    parts += ["<h2>Training</h2>", _training_section(records)]
    evals = _eval_dirs(run_dir)
    if not evals:
        parts.append('<p class="note">Not evaluated yet — run <code>resnet-lab evaluate '
                     f'{_e(run_dir.name)}</code>, then write the report again.</p>')
    for name, result in evals:
        parts.append(_eval_section(run_dir, name, result))
    body = "\n".join(parts)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>resnet-lab report — {_e(run_dir.name)}</title><style>{CSS}</style></head>\n"
            f"<body>\n{body}\n</body></html>\n")


# --- sections ----------------------------------------------------------------------------------------------------

def _status_line(status: dict) -> str:
    if not status:
        return '<p class="muted">no status.json</p>'
    fields = [("status", status.get("status")), ("created", _when(status.get("created"))),
              ("started", _when(status.get("started"))), ("finished", _when(status.get("finished"))),
              ("worker", status.get("worker"))]
    text = " · ".join(f"{_e(k)}: <b>{_e(v)}</b>" for k, v in fields if v not in (None, ""))
    out = f'<p class="muted">{text}</p>'
    if status.get("error"):
        out += f'<p class="note">error: {_e(status["error"])}</p>'
    return out


def _config_table(config: dict) -> str:
    if not config:
        return '<p class="muted">no config.json</p>'
    rows = []
    for key in sorted(config):
        value = config[key]
        if isinstance(value, (dict, list)) and key != "classes":
            cell = f"<pre>{_e(json.dumps(value, indent=1, sort_keys=True, default=str))}</pre>"
        elif isinstance(value, list):
            cell = _e(", ".join(map(str, value)))
        else:
            cell = _e(value)
        rows.append(f"<tr><th>{_e(key)}</th><td>{cell}</td></tr>")
    return "<table>" + "".join(rows) + "</table>"


def _training_section(records: list[dict]) -> str:
    from shared.analysis.plots import figure_png_bytes, plot_curves

    if not records:
        return '<p class="muted">no metrics.jsonl (no finished epoch)</p>'
    figure = _img(figure_png_bytes(plot_curves(records)), "training curves", FIGURE_CAPTIONS["curves"])
    cols = ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds"]
    if len({r.get("image_size") for r in records}) > 1:  # progressive resizing: the side each epoch trained at
        cols.insert(1, "image_size")
    return figure + _table(cols, [[r.get(c) for c in cols] for r in records])


def _eval_section(run_dir: Path, name: str, result: EvalResult | EvalResultError) -> str:
    if isinstance(result, EvalResultError):
        return f'<h2>Evaluation: {_e(name)}</h2><p class="note">{_e(result)}</p>'
    out = [f"<h2>Evaluation: {_e(name)}</h2>",
           f'<p class="muted">{_e(result.source)} · {_e(result.n)} images · model {_e(result.model)}'
           f' at {_e(result.image_size)} px</p>']
    for note in result.notes:
        out.append(f'<p class="note">{_e(note)}</p>')
    out.append(_headline(result))
    out.append("<h3>Per class</h3>" + _per_class_table(result))
    if result.confused_pairs:
        rows = [[p.true, p.pred, p.count, ", ".join(p.images[:5]) + (" …" if len(p.images) > 5 else "")]
                for p in result.confused_pairs[:15]]
        out.append("<h3>Most confused pairs</h3>" + _table(["true", "predicted as", "images", "examples"], rows))
    if result.skipped:
        out.append(f"<h3>Skipped images ({len(result.skipped)})</h3>" + _table(
            ["path", "error"], [[s.path, s.error] for s in result.skipped[:50]]))
    out.append("<h3>Figures</h3>")
    if result.skipped_figures:
        titles = ", ".join(FIGURE_TITLES.get(k, k) for k in result.skipped_figures)
        out.append(f'<p class="note">This evaluation drew {_e(result.figure_level)} figures and skipped: '
                   f"{_e(titles)}. Evaluate again with RESNET_LAB_EVAL_FIGURES=all to draw them.</p>")
    figures = result.figures
    order = [k for k in FIGURE_CAPTIONS if k in figures] + sorted(k for k in figures if k not in FIGURE_CAPTIONS)
    order = [k for k in order if k != "curves"]  # already shown under Training
    for key in order:
        out.append(_figure_from_file(run_dir, result, key))
    if result.timings:
        out.append('<p class="muted">timings: ' + _e(", ".join(f"{k} {v}" for k, v in result.timings.items()))
                   + "</p>")
    return "\n".join(out)


def _headline(result: EvalResult) -> str:
    roc = result.roc
    rows = [("accuracy", result.accuracy),
            ("balanced accuracy", result.balanced_accuracy),
            (f"top-{result.top_k} accuracy", result.top_k_accuracy),
            ("mean loss", result.losses.mean),
            ("macro precision / recall / F1", _triple(result.macro)),
            ("weighted precision / recall / F1", _triple(result.weighted)),
            ("ROC AUC micro / macro", f"{_f(roc.micro.auc)} / {_f(roc.macro.auc if roc.macro else None)}"),
            ("average precision (micro)", result.pr.micro.ap),
            ("expected calibration error", result.calibration.ece)]
    return "<table>" + "".join(f"<tr><th>{_e(k)}</th><td class='num'>{_e(_f(v))}</td></tr>" for k, v in rows) \
        + "</table>"


def _per_class_table(result: EvalResult) -> str:
    roc, pr = result.roc.per_class, result.pr.per_class
    rows = [[r.name, r.precision, r.recall, r.f1, r.support, roc[r.name].auc if r.name in roc else None,
             pr[r.name].ap if r.name in pr else None]
            for r in result.per_class]
    return _table(["class", "precision", "recall", "F1", "support", "ROC AUC", "AP"], rows)


# --- pieces ------------------------------------------------------------------------------------------------------

def _eval_dirs(run_dir: Path) -> list[tuple[str, EvalResult | EvalResultError]]:
    """(folder name, its evaluation or why it cannot be read) for eval/ and every eval-*/ with an eval.json."""
    dirs = sorted(p.name for p in run_dir.iterdir() if p.is_dir() and (p.name == "eval" or p.name.startswith("eval-")))
    dirs.sort(key=lambda name: (name != "eval", name))
    found: list[tuple[str, EvalResult | EvalResultError]] = []
    for name in dirs:
        try:
            result = load_eval_result(run_dir, name)
        except EvalResultError as exc:
            logger.warning("%s", exc)
            result = exc
        if result is not None:
            found.append((name, result))
    return found


def _figure_from_file(run_dir: Path, result: EvalResult, key: str) -> str:
    caption = FIGURE_CAPTIONS.get(key, key)
    path = result.figure_file(run_dir, key)
    if path is None:
        return f'<p class="note">figure {_e(key)} is missing ({_e(result.figures[key])})</p>'
    return _img(path.read_bytes(), key, caption)


def _img(png: bytes, alt: str, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{_e(alt)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _cell(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"<td class='num'>{_e(_f(value))}</td>"
    return f"<td>{_e('—' if value is None else value)}</td>"


def _triple(averages) -> str:
    return " / ".join(_f(v) for v in (averages.precision, averages.recall, averages.f1))


def _f(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if abs(value) < 1e-3 and value != 0 else f"{value:.4f}".rstrip("0").rstrip(".")


def _when(value: Any) -> Any:
    """status.json stores times as Unix seconds: show them as local date and time."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 1e9:
        from datetime import datetime

        return datetime.fromtimestamp(value).strftime("%Y-%m-%d %H:%M:%S")
    return value


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _read_json(path: Path) -> dict | None:
    """A JSON object file; None when missing, or (logged) when damaged: the report leaves its section out."""
    try:
        data = json.loads(Path(path).read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:  # ValueError: not JSON, not UTF-8
        logger.warning("cannot read %s: %s", path, exc)
        return None
    if not isinstance(data, dict):
        logger.warning("cannot read %s: it holds a JSON %s, not an object", path, type(data).__name__)
        return None
    return data
