"""What the Results tab shows of one `EvalResult` (shared/analysis/eval_result.py): the headline, the per-class table, the
confusion matrix as HTML, long-form frames for the plots, the gallery images. Pure functions, no gradio, so all of
it is unit-tested without a browser.
"""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Sequence

from shared.analysis.eval_result import FIGURE_TITLES, Calibration, ClassScores, EvalResult, Pr, Roc, Tsne

from .formatting import DASH, fmt_pct, md_escape

CURVE_COLUMNS = ["x", "y", "curve"]
TSNE_COLUMNS = ["x", "y", "true class", "predicted", "correct"]
AVERAGE_CURVES = {"micro": "micro avg", "macro": "macro avg"}  # eval.json's names → legend names
# The galleries: which figures each shows, in order, with their captions (short: one line under the figure).
CAM_FIGURES = {name: FIGURE_TITLES[name] for name in ("cam_samples", "cam_errors")}
TOP_LOSS_FIGURES = {"top_losses": FIGURE_TITLES["top_losses"]}


def metrics_markdown(result: EvalResult) -> str:
    """The headline: set, size, accuracy, top-k, macro F1, loss, ECE, then notes and what was skipped."""
    parts = [f"**Accuracy:** {fmt_pct(result.accuracy)}"]
    if result.top_k > 1:
        parts.append(f"**Top-{result.top_k} accuracy:** {fmt_pct(result.top_k_accuracy)}")
    parts.append(f"**Balanced accuracy:** {fmt_pct(result.balanced_accuracy)}")
    parts.append(f"**Macro F1:** {_num(result.macro_f1)}")
    parts.append(f"**Loss:** {_num(result.loss)}")
    parts.append(f"**Calibration error (ECE):** {_num(result.calibration.ece)}")
    lines = [f"Evaluated on the **{md_escape(result.split)}** split ({result.n} images):  " + " · ".join(parts)]
    lines += [f"- {md_escape(note)}" for note in result.notes[:5]]
    if result.skipped:
        lines.append(f"- {len(result.skipped)} unreadable image(s) were skipped.")
    if result.skipped_figures:
        lines.append(f"- {skipped_figures_text(result)}")
    return "\n".join(lines)


def skipped_figures_text(result: EvalResult) -> str:
    """Which figures the evaluation left out, and how to get them ('' when none were)."""
    if not result.skipped_figures:
        return ""
    titles = ", ".join(FIGURE_TITLES.get(name, name) for name in result.skipped_figures)
    return (f"This evaluation skipped these figures (figures = {result.figure_level}): {md_escape(titles)}. To draw "
            "them, run the worker with RESNET_LAB_EVAL_FIGURES=all and press **Evaluate again**.")


def _num(value: float | None) -> str:
    return f"{value:.3f}" if isinstance(value, (int, float)) and math.isfinite(value) else DASH


def per_class_rows(rows: Sequence[ClassScores]) -> tuple[list[str], list[list]]:
    """(headers, rows) for the per-class table; a dash where a score is undefined (per_class_note says why)."""
    headers = ["class", "precision", "recall", "f1", "support"]

    def cell(v):
        return DASH if v is None else round(v, 4)

    return headers, [[r.name, cell(r.precision), cell(r.recall), cell(r.f1), r.support] for r in rows]


def per_class_note(rows: Sequence[ClassScores]) -> str:
    """What the dashes in the per-class table mean (Markdown; '' when there are none)."""
    never = [r.name for r in rows if r.precision is None]
    absent = [r.name for r in rows if r.recall is None]
    notes = []
    if never:
        notes.append(f"{DASH} precision: never predicted ({md_escape(', '.join(never))}), so it is undefined; the "
                     "macro average counts it as 0 (scikit-learn's zero_division=0).")
    if absent:
        notes.append(f"{DASH} recall: no test images of {md_escape(', '.join(absent))}.")
    return "  \n".join(notes)


def confusion_html(result: EvalResult, mode: str) -> str:
    """The confusion matrix ("counts" or "normalized" by true class) as an HTML table, cells shaded by their share
    of the row."""
    normalized = mode == "normalized"
    matrix = result.confusion.normalized if normalized else result.confusion.counts
    classes = result.classes
    if not matrix or not classes:
        return "<p>No confusion matrix in this run's evaluation.</p>"
    head = "".join(f"<th title='predicted {html.escape(c)}'>{html.escape(_short(c))}</th>" for c in classes)
    body = []
    for name, row in zip(classes, matrix):
        total = sum(row) or 1
        cells = []
        for j, value in enumerate(row):
            share = value if normalized else value / total
            alpha = max(0.0, min(1.0, float(share)))
            text = f"{100 * value:.0f}%" if normalized else f"{int(value)}"
            colour = "#fff" if alpha > 0.55 else "inherit"
            cells.append(f"<td style='background: rgba(37, 99, 235, {alpha:.2f}); color: {colour}'"
                         f" title='true {html.escape(name)}, predicted {html.escape(classes[j])}'>{text}</td>")
        body.append(f"<tr><th title='true {html.escape(name)}'>{html.escape(_short(name))}</th>{''.join(cells)}</tr>")
    return ("<div class='confusion-wrap'><table class='confusion'><thead><tr><th class='corner'>true ↓ / "
            f"predicted →</th>{head}</tr></thead><tbody>{''.join(body)}</tbody></table></div>")


def _short(name: str, width: int = 14) -> str:
    return name if len(name) <= width else name[: width - 1] + "…"


def roc_frame(roc: Roc, max_points: int = 400):
    """Long-form frame (x = FPR, y = TPR, curve) of the ROC curves: averages first, then each class."""
    curves = [("micro", roc.micro.fpr, roc.micro.tpr, roc.micro.auc)]
    if roc.macro is not None:
        curves.append(("macro", roc.macro.fpr, roc.macro.tpr, roc.macro.auc))
    curves += [(name, c.fpr, c.tpr, c.auc) for name, c in roc.per_class.items()]
    return _curves_frame(curves, max_points)


def pr_frame(pr: Pr, max_points: int = 400):
    """Long-form frame (x = recall, y = precision, curve) of the precision-recall curves, micro average first."""
    curves = [("micro", pr.micro.recall, pr.micro.precision, pr.micro.ap)]
    curves += [(name, c.recall, c.precision, c.ap) for name, c in pr.per_class.items()]
    return _curves_frame(curves, max_points)


def _curves_frame(curves: list[tuple[str, list[float], list[float], float | None]], max_points: int):
    """Legend labels are short — "circle 0.987", "micro avg 0.986" — and the averages come first: Vega cannot wrap a
    legend below the plot, so whatever does not fit is cut at the right edge ("macro (AUC …)" was, with three
    classes); the plot titles say the number is the AUC / AP."""
    import pandas as pd

    rows = []
    for name, xs, ys, area in curves:
        if not xs or len(xs) != len(ys):
            continue
        step = max(1, len(xs) // max_points)
        name = AVERAGE_CURVES.get(name, name)
        label = f"{name} {area:.3f}" if isinstance(area, (int, float)) else name
        for x, y in list(zip(xs, ys))[::step] + ([(xs[-1], ys[-1])] if len(xs) % step else []):
            rows.append({"x": float(x), "y": float(y), "curve": label})
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def calibration_frame(calibration: Calibration):
    """Reliability diagram points (x = mean confidence, y = accuracy per filled bin) plus the diagonal."""
    import pandas as pd

    rows = [{"x": b.confidence, "y": b.accuracy, "curve": "model"} for b in calibration.bins
            if b.count and b.confidence is not None and b.accuracy is not None]
    if not rows:
        return pd.DataFrame(columns=CURVE_COLUMNS)
    rows += [{"x": 0.0, "y": 0.0, "curve": "perfectly calibrated"}, {"x": 1.0, "y": 1.0, "curve": "perfectly calibrated"}]
    return pd.DataFrame(rows, columns=CURVE_COLUMNS)


def tsne_frame(tsne: Tsne | None, classes: Sequence[str]):
    """Frame (x, y, true class, predicted, correct) of the t-SNE points; empty when the evaluation skipped it."""
    import pandas as pd

    if tsne is None or not tsne.x:
        return pd.DataFrame(columns=TSNE_COLUMNS)

    def name(i: int) -> str:
        return classes[i] if 0 <= i < len(classes) else str(i)

    labels, preds = [name(i) for i in tsne.label], [name(i) for i in tsne.pred]
    return pd.DataFrame({"x": tsne.x, "y": tsne.y, "true class": labels, "predicted": preds,
                         "correct": ["yes" if a == b else "no" for a, b in zip(labels, preds)]}, columns=TSNE_COLUMNS)


def gallery(result: EvalResult, run_dir: Path, figures: dict[str, str]) -> list[tuple[str, str]]:
    """(PNG path, caption) of each of `figures` the evaluation drew, confined to the run folder."""
    out = []
    for name, caption in figures.items():
        path = result.figure_file(run_dir, name)
        if path is not None:
            out.append((str(path), caption))
    return out


def drew(result: EvalResult, figures) -> bool:
    """Whether the evaluation was asked to draw any of `figures` (False: the figure level skipped them all)."""
    return any(name not in result.skipped_figures for name in figures)


def test_image_choices(result: EvalResult, limit: int = 500) -> list[str]:
    """The evaluated images the activations panel offers (those the t-SNE lists; none when it was skipped)."""
    return list(dict.fromkeys(result.tsne.path))[:limit] if result.tsne else []
