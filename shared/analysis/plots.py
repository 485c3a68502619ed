"""Pure plotting functions: arrays/dicts in, matplotlib Figures out; `save_figure` writes a PNG and frees it.

Figures are built with `matplotlib.figure.Figure` directly, never through pyplot: pyplot keeps every figure in a
global registry until it is closed, which is how long-running servers leak (Gradio issue #11701). A Figure made
here is an ordinary object: `save_figure` renders it with the Agg canvas and clears it.

Colours: sequential data uses 'cividis'/'viridis' (perceptually uniform, readable with colour-vision deficiency);
categorical series use tab10 *and* a distinct marker or line style per series, so colour is never the only cue.
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from shared.fsutil import atomic_open

MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">", "h", "p")
LINESTYLES = ("-", "--", "-.", ":")
DPI = 110


def _figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _colour(k: int):
    from matplotlib import colormaps

    return colormaps["tab10"](k % 10)


def _style(k: int) -> dict:
    """Colour + marker + line style for series k: distinct even when colours repeat or cannot be told apart."""
    return {"color": _colour(k), "marker": MARKERS[k % len(MARKERS)], "linestyle": LINESTYLES[(k // 10) % 4]}


def _tick_labels(ax, classes: Sequence[str], axis: str) -> None:
    n = len(classes)
    size = 10 if n <= 10 else 8 if n <= 25 else 6
    ticks = range(n)
    if axis == "x":
        ax.set_xticks(ticks, classes, rotation=45 if n > 4 or max(map(len, classes), default=0) > 8 else 0,
                      ha="right" if n > 4 else "center", fontsize=size)
    else:
        ax.set_yticks(ticks, classes, fontsize=size)


# --- training ----------------------------------------------------------------------------------------------------

def plot_curves(history_records: Sequence[Mapping[str, Any]]) -> Figure:
    """Loss and accuracy per epoch, train and val (records from metrics.jsonl)."""
    fig = _figure(10, 4)
    ax_loss, ax_acc = fig.subplots(1, 2)
    epochs = [r.get("epoch", i + 1) for i, r in enumerate(history_records)]
    for ax, metric, label in ((ax_loss, "loss", "Loss (cross-entropy)"), (ax_acc, "acc", "Accuracy")):
        for k, part in enumerate(("train", "val")):
            pts = [(e, r.get(f"{part}_{metric}")) for e, r in zip(epochs, history_records)]
            pts = [(e, v) for e, v in pts if isinstance(v, (int, float)) and math.isfinite(v)]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, label=part, markersize=5, **_style(k))
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        if epochs:
            ax.xaxis.get_major_locator().set_params(integer=True)
    if not epochs:
        ax_loss.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax_loss.transAxes)
    ax_acc.set_ylim(-0.02, 1.02)
    fig.suptitle("Training curves")
    return fig


# --- evaluation --------------------------------------------------------------------------------------------------

def plot_confusion(counts, classes: Sequence[str], normalize: bool = False) -> Figure:
    """Confusion matrix (rows: true class, columns: predicted), counts or row-normalised fractions."""
    counts = np.asarray(counts, dtype=np.float64)
    n = len(classes)
    if counts.shape != (n, n):
        raise ValueError(f"expected a {n}x{n} matrix for {n} classes, got {counts.shape}")
    if normalize:
        rows = counts.sum(1, keepdims=True)
        values = np.divide(counts, rows, out=np.zeros_like(counts), where=rows > 0)
    else:
        values = counts
    side = min(4 + 0.45 * n, 16)
    fig = _figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="cividis", vmin=0, vmax=1 if normalize else max(values.max(), 1))
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class" if normalize else "images")
    if n <= 30:
        threshold = (1 if normalize else max(values.max(), 1)) * 0.6
        size = 10 if n <= 10 else 7
        for i in range(n):
            for j in range(n):
                text = f"{values[i, j]:.2f}" if normalize else f"{int(values[i, j])}"
                ax.text(j, i, text, ha="center", va="center", fontsize=size,
                        color="black" if values[i, j] > threshold else "white")
    _tick_labels(ax, classes, "x")
    _tick_labels(ax, classes, "y")
    ax.set_xlabel("Predicted class")
    ax.set_ylabel("True class")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else " (counts)"))
    return fig


def _curve_legend(ax, n_series: int, loc: str = "lower right") -> None:
    ax.legend(fontsize=9 if n_series <= 12 else 7, loc=loc if n_series <= 12 else "center left",
              bbox_to_anchor=None if n_series <= 12 else (1.02, 0.5), ncols=1 if n_series <= 24 else 2)


def plot_roc(roc: Mapping[str, Any], classes: Sequence[str]) -> Figure:
    """One-vs-rest ROC per class with AUC in the legend, plus micro and macro averages and the chance diagonal."""
    fig = _figure(7.5, 6)
    ax = fig.subplots()
    per_class = roc.get("per_class", {})
    for k, name in enumerate(classes):
        if name in per_class:
            c = per_class[name]
            ax.plot(c["fpr"], c["tpr"], label=f"{name} (AUC {_fmt(c['auc'])})", markevery=_every(c["fpr"]),
                    markersize=4, linewidth=1.4, **_style(k))
    for key, style in (("micro", ":"), ("macro", "--")):
        if roc.get(key):
            ax.plot(roc[key]["fpr"], roc[key]["tpr"], color="black", linestyle=style, linewidth=2.2,
                    label=f"{key}-average (AUC {_fmt(roc[key]['auc'])})")
    ax.plot([0, 1], [0, 1], color="grey", linewidth=1, linestyle="-", alpha=0.5, label="chance")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="False positive rate", ylabel="True positive rate",
           title="ROC curves (one class vs rest)")
    ax.grid(alpha=0.3)
    _curve_legend(ax, len(per_class) + 3)
    return fig


def plot_pr(pr: Mapping[str, Any], classes: Sequence[str]) -> Figure:
    """Precision-recall per class with average precision (AP) in the legend, plus the micro average."""
    fig = _figure(7.5, 6)
    ax = fig.subplots()
    per_class = pr.get("per_class", {})
    for k, name in enumerate(classes):
        if name in per_class:
            c = per_class[name]
            ax.step(c["recall"], c["precision"], where="post", label=f"{name} (AP {_fmt(c['ap'])})",
                    markevery=_every(c["recall"]), markersize=4, linewidth=1.4, **_style(k))
    if pr.get("micro"):
        m = pr["micro"]
        ax.step(m["recall"], m["precision"], where="post", color="black", linestyle=":", linewidth=2.2,
                label=f"micro-average (AP {_fmt(m['ap'])})")
    ax.set(xlim=(-0.01, 1.01), ylim=(-0.01, 1.02), xlabel="Recall", ylabel="Precision",
           title="Precision-recall curves (one class vs rest)")
    ax.grid(alpha=0.3)
    _curve_legend(ax, len(per_class) + 1, loc="lower left")
    return fig


def plot_reliability(calibration: Mapping[str, Any]) -> Figure:
    """Reliability diagram: accuracy vs confidence per bin (gap to the mean confidence hatched), with a count histogram."""
    bins = calibration.get("bins", [])
    fig = _figure(6.5, 6.5)
    ax, ax_hist = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    lo = np.array([b["lo"] for b in bins], dtype=float)
    hi = np.array([b["hi"] for b in bins], dtype=float)
    width = hi - lo
    filled = [i for i, b in enumerate(bins) if b.get("count")]
    acc = np.array([bins[i]["accuracy"] for i in filled], dtype=float)
    conf = np.array([bins[i]["confidence"] for i in filled], dtype=float)
    if filled:
        total = sum(b.get("count", 0) for b in bins)
        # a tall bar from one or two images is noise: bins with under 1% of the images (or < 5) are drawn faint
        faint = np.array([bins[i]["count"] < max(5, 0.01 * total) for i in filled])
        idx = np.asarray(filled)
        ax.bar(lo[idx[~faint]], acc[~faint], width=width[idx[~faint]], align="edge", color="#3b528b",
               edgecolor="white", label="accuracy in bin")
        if faint.any():
            ax.bar(lo[idx[faint]], acc[faint], width=width[idx[faint]], align="edge", color="#3b528b", alpha=0.3,
                   edgecolor="white", label="accuracy, bins with few images")
        # the gap is hatch only (no fill): an accuracy bar under it stays visible when the model is under-confident
        ax.bar(lo[filled], conf - acc, bottom=acc, width=width[filled], align="edge", facecolor="none",
               edgecolor="#e66101", hatch="//", linewidth=1.0, label="gap to mean confidence")
        ax.plot(lo[filled] + width[filled] / 2, conf, linestyle="none", marker="_", markersize=12,
                markeredgewidth=2, color="black", label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], color="black", linestyle="--", linewidth=1, label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), ylabel="Accuracy",
           title=f"Reliability diagram — ECE {_fmt(calibration.get('ece'), 3)}")
    ax.legend(loc="upper left", fontsize=9)
    ax.grid(alpha=0.3)
    counts = np.array([b.get("count", 0) for b in bins], dtype=float)
    if len(bins):
        hist = ax_hist.bar(lo, counts, width=width, align="edge", color="#5ec962", edgecolor="white")
        ax_hist.bar_label(hist, labels=[str(int(c)) if c else "" for c in counts], fontsize=7, padding=1)
        ax_hist.margins(y=0.2)
    ax_hist.set(xlabel="Confidence (top-1 probability)", ylabel="Images")
    ax_hist.grid(alpha=0.3)
    return fig


def plot_tsne(tsne: Mapping[str, Any], classes: Sequence[str]) -> Figure:
    """t-SNE scatter coloured (and shaped) by true class; misclassified points circled in black."""
    x = np.asarray(tsne.get("x", []), dtype=float)
    y = np.asarray(tsne.get("y", []), dtype=float)
    label = np.asarray(tsne.get("label", []), dtype=int)
    pred = np.asarray(tsne.get("pred", label), dtype=int)
    fig = _figure(8.5, 7)
    ax = fig.subplots()
    size = 14 if len(x) > 1500 else 24
    for k, name in enumerate(classes):
        mask = label == k
        if mask.any():
            style = _style(k)
            ax.scatter(x[mask], y[mask], s=size, c=[style["color"]], marker=style["marker"], alpha=0.75,
                       linewidths=0, label=f"{name} ({int(mask.sum())})")
    wrong = label != pred
    if wrong.any():
        ax.scatter(x[wrong], y[wrong], s=size * 3.2, facecolors="none", edgecolors="black", linewidths=0.9,
                   label=f"misclassified ({int(wrong.sum())})")
    ax.set(xticks=[], yticks=[], xlabel="t-SNE 1", ylabel="t-SNE 2",
           title="t-SNE of penultimate features (colour/shape = true class)")
    if ax.collections:
        n = len(ax.collections)
        ax.legend(fontsize=9 if n <= 12 else 7, markerscale=1.5, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return fig


def plot_class_counts(counts: Mapping[str, Any], title: str = "Images per class") -> Figure:
    """Horizontal bars per class. counts: {class: n}, or {split: {class: n}} for grouped bars (train/val/test)."""
    grouped = bool(counts) and all(isinstance(v, Mapping) for v in counts.values())
    groups = dict(counts) if grouped else {"images": dict(counts)}
    classes = list(dict.fromkeys(c for g in groups.values() for c in g))
    n = len(classes)
    fig = _figure(8, max(2.5, 0.35 * n * (1 + 0.3 * (len(groups) - 1)) + 1.2))
    ax = fig.subplots()
    height = 0.8 / len(groups)
    hatches = ("", "//", "..", "xx")
    for g, (name, values) in enumerate(groups.items()):
        pos = np.arange(n) + (g - (len(groups) - 1) / 2) * height
        vals = [int(values.get(c, 0)) for c in classes]
        bars = ax.barh(pos, vals, height=height, color=_colour(g), hatch=hatches[g % 4], edgecolor="white",
                       label=name if grouped else None)
        ax.bar_label(bars, fontsize=8, padding=2)
    ax.set_yticks(range(n), classes, fontsize=10 if n <= 20 else 7)
    ax.invert_yaxis()
    ax.set(xlabel="Images", title=title)
    ax.grid(axis="x", alpha=0.3)
    ax.margins(x=0.1)
    if grouped:
        ax.legend(loc="best")
    return fig


# --- images ------------------------------------------------------------------------------------------------------
# Photo grids are drawn with PIL, not matplotlib: a grid of 40 photos is 40 Axes to lay out and render, about
# 2 s per figure on a laptop CPU against a few tens of ms here, and the worker draws five of them after every run.

GRID_PAD = 6


@functools.lru_cache(maxsize=8)
def _font(size: int):
    """DejaVu Sans, the font of the matplotlib figures: it has ✓ ✗ and the letters of most class names."""
    from matplotlib import font_manager
    from PIL import ImageFont

    return ImageFont.truetype(font_manager.findfont("DejaVu Sans"), size)


def _fit_text(text: str, font, width: float) -> str:
    """`text` shortened with an ellipsis until it is at most `width` pixels wide."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap_text(text: str, font, width: float) -> list[str]:
    lines: list[str] = []
    for words in (paragraph.split() for paragraph in text.splitlines()):
        line = ""
        for word in words:
            candidate = f"{line} {word}".strip()
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(_fit_text(line, font, width))
    return lines


def _as_pil(image, cell: int, resample):
    """PIL RGB copy of `image` (PIL, HxW or HxWx3 array) scaled to fit a cell x cell square, aspect kept."""
    from PIL import Image

    pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))
    pil = pil.convert("RGB")
    scale = cell / max(pil.size)
    size = (max(1, round(pil.width * scale)), max(1, round(pil.height * scale)))
    return pil.resize(size, resample) if size != pil.size else pil


def image_grid(images: Sequence[Any], titles: Sequence[str] | None = None, ncols: int = 4,
               suptitle: str | None = None, cell: int = 184, row_labels: Sequence[str] | None = None,
               pixelated: bool = False):
    """Images (PIL, HxW or HxWx3 uint8 arrays; None = empty cell) in a grid with a title over each: a PIL image.

    Titles may have several lines; each line is shortened to its cell's width. `row_labels` go left of each row.
    `pixelated` enlarges with nearest-neighbour (feature maps: each value stays one visible square).
    """
    from PIL import Image, ImageDraw

    pad, font, head_font = GRID_PAD, _font(12), _font(15)
    n = max(len(images), 1)
    ncols = max(1, min(ncols, n))
    nrows = math.ceil(n / ncols)
    line_h = 15
    lines = max((t.count("\n") + 1 for t in titles or [] if t), default=0)
    title_h = lines * line_h + (3 if lines else 0)
    label_w = max((math.ceil(font.getlength(label)) for label in row_labels or []), default=0)
    label_w += pad if label_w else 0
    width = label_w + pad + ncols * (cell + pad)
    head = _wrap_text(suptitle, head_font, width - 2 * pad) if suptitle else []
    head_h = len(head) * 19 + pad if head else 0
    canvas = Image.new("RGB", (width, head_h + pad + nrows * (title_h + cell + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(head):
        draw.text((width / 2, pad + i * 19), line, font=head_font, fill="black", anchor="ma")
    resample = Image.NEAREST if pixelated else Image.BICUBIC
    for i, image in enumerate(images):
        row, col = divmod(i, ncols)
        x0, y0 = label_w + pad + col * (cell + pad), head_h + pad + row * (title_h + cell + pad)
        if image is None:
            continue
        pil = _as_pil(image, cell, resample)
        canvas.paste(pil, (x0 + (cell - pil.width) // 2, y0 + title_h + (cell - pil.height) // 2))
        title = titles[i] if titles and i < len(titles) else ""
        for k, line in enumerate(title.splitlines() if title else []):
            draw.text((x0 + cell / 2, y0 + k * line_h), _fit_text(line, font, cell), font=font, fill="black",
                      anchor="ma")
    for row, label in enumerate(row_labels or []):
        draw.text((pad, head_h + pad + row * (title_h + cell + pad) + title_h + cell / 2), label, font=font,
                  fill="black", anchor="lm")
    if not len(images):
        draw.text((width / 2, head_h + pad + cell / 2), "no images", font=font, fill="black", anchor="mm")
    return canvas


def _colour_map(values, cmap: str = "viridis") -> np.ndarray:
    """A 2-D array as an RGB uint8 image through `cmap`, scaled to its own min..max."""
    from matplotlib import colormaps

    values = np.asarray(values, dtype=float)
    low, high = np.nanmin(values), np.nanmax(values)
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return (colormaps[cmap](scaled)[..., :3] * 255 + 0.5).astype(np.uint8)


def plot_activations(activations: Mapping[str, Any], image=None, title: str | None = None):
    """Feature maps per stage (a row per stage), strongest first, each on its own 'viridis' scale: a PIL image.

    activations: {stage: [maps]} from `explain.layer_activations`, or {stage: {"maps", "channels", "means"}}
    from `explain.top_channels` (then channel numbers appear in the titles).
    """
    rows = [(s, activations[s]["maps"], activations[s].get("channels")) if isinstance(activations[s], Mapping)
            else (s, list(activations[s]), None) for s in activations]
    per_row = max((len(maps) for _, maps, _ in rows), default=1)
    images: list[Any] = []
    titles: list[str] = []
    for stage, maps, channels in rows:
        if image is not None:
            images.append(np.asarray(image))
            titles.append("input")
        for c in range(per_row):
            if c < len(maps):
                m = np.asarray(maps[c], dtype=float)
                images.append(_colour_map(m))
                titles.append(f"{f'ch {channels[c]}' if channels else f'#{c + 1}'} · {m.shape[0]}x{m.shape[1]}")
            else:
                images.append(None)
                titles.append("")
    return image_grid(images, titles, ncols=per_row + (image is not None), cell=128, pixelated=True,
                      row_labels=[stage for stage, _, _ in rows],
                      suptitle=title or "Strongest feature maps per stage (mean activation)")


# --- saving ------------------------------------------------------------------------------------------------------

def save_figure(fig, path: str | os.PathLike, dpi: int = DPI) -> Path:
    """Render a Figure (or save a PIL image from `image_grid`) to PNG atomically (temp file + rename, so a reader
    never sees half a file), then free the figure."""
    path = Path(path)
    path.parent.mkdir(exist_ok=True)  # one level (a run's eval/): a run folder deleted meanwhile must not come back
    try:
        with atomic_open(path, "wb") as fh:
            if isinstance(fig, Figure):
                fig.savefig(fh, format="png", dpi=dpi)
            else:
                fig.save(fh, format="PNG")
    finally:
        if isinstance(fig, Figure):
            fig.clear()
    return path


def figure_png_bytes(fig: Figure, dpi: int = DPI) -> bytes:
    """The figure as PNG bytes (for inlining), then free it."""
    import io

    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        fig.clear()
    return buf.getvalue()


def _fmt(value, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _every(xs) -> int:
    return max(1, len(xs) // 12)
