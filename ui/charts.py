"""Charts drawn here as SVG, with a legend of our own beside them: the Runs tab's loss/accuracy curves and its
sweep view. Pure functions (no gradio), unit-tested.

Why not Gradio's LinePlot: in Gradio 6.31 its Vega legend and colour scale are built from the first data only
(series that appear later were drawn uncoloured and left out — the Accuracy chart "lost" a run whose first epoch
came after the others'), the legend is cut after two or three entries, a single point draws no line, the y axis
labels are clipped, and it cannot tell train from validation except by colour. Here every series is drawn with
markers (one epoch shows), train dashed with squares and validation solid with dots, colours come from the run id,
and the legend is HTML that wraps instead of cutting.
"""

from __future__ import annotations

import hashlib
import html
import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

# distinguishable on white, none too pale (tab10, then darker/other hues)
PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
           "#756bb1", "#636363", "#a55194", "#6b6ecf", "#b5a000", "#0b7a75")
WIDTH, HEIGHT = 560, 300
TRAIN_DASH = "6 4"


def _hash(text: str) -> int:
    return int(hashlib.sha1(text.encode()).hexdigest()[:8], 16)


def run_colours(run_ids: Iterable[str]) -> dict[str, str]:
    """A colour per run (or per model, in the sweep) derived from its id, the same in every chart and refresh.
    Two drawn together whose ids hash to one colour: the one with the larger id takes the next free one (taken
    in id order, so the same set always gets the same colours)."""
    taken: set[str] = set()
    out: dict[str, str] = {}
    for run_id in sorted(set(run_ids)):
        i = _hash(run_id) % len(PALETTE)
        for step in range(len(PALETTE)):
            colour = PALETTE[(i + step) % len(PALETTE)]
            if colour not in taken:
                break
        taken.add(colour)
        out[run_id] = colour
    return out


# --- axes -----------------------------------------------------------------------------------------------------

def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """Round tick values covering lo..hi (1, 2, 2.5 or 5 times a power of ten apart)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return []
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 0.1
    raw = (hi - lo) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first = math.floor(lo / step + 1e-9) * step
    ticks, t = [], first
    while t <= hi + step * 1e-6:
        ticks.append(round(t, 12))
        t += step
    if ticks[-1] < hi - step * 1e-6:
        ticks.append(round(t, 12))
    return ticks


def tick_label(value: float, step: float) -> str:
    """A tick's text with as many decimals as its step needs (0.25 → '0.25', 0.5 → '0.5', 2 → '2')."""
    if step >= 1 and float(value).is_integer():
        return str(int(value))
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    if abs(step * 10 ** decimals - round(step * 10 ** decimals)) > 1e-6:  # 0.25, 2.5
        decimals += 1
    text = f"{value:.{decimals}f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


@dataclass
class Series:
    """One line: `name` is shown in full (tooltips, data attributes); `run_id` picks its colour."""
    name: str
    run_id: str
    points: list[tuple[float, float]]
    dashed: bool = False  # training: dashed line, square markers; validation: solid, dots
    colour: str = ""
    short: str = ""  # what each point's tooltip calls it (the series' own tooltip has the full name)


@dataclass
class Frame:
    x0: float
    x1: float
    y0: float
    y1: float
    left: float = 56.0
    right: float = 14.0
    top: float = 12.0
    bottom: float = 40.0
    log_x: bool = False
    parts: list[str] = field(default_factory=list)

    def sx(self, x: float) -> float:
        if self.log_x:
            x, a, b = math.log10(x), math.log10(self.x0), math.log10(self.x1)
        else:
            a, b = self.x0, self.x1
        return self.left + (x - a) / ((b - a) or 1.0) * (WIDTH - self.left - self.right)

    def sy(self, y: float) -> float:
        y = min(max(y, self.y0), self.y1)  # a spike past the axis top is drawn at the edge (the note says so)
        return HEIGHT - self.bottom - (y - self.y0) / ((self.y1 - self.y0) or 1.0) * (HEIGHT - self.top - self.bottom)


def _axes(frame: Frame, x_ticks: Sequence[tuple[float, str]], y_ticks: Sequence[float], x_title: str,
          y_title: str) -> list[str]:
    step = (y_ticks[1] - y_ticks[0]) if len(y_ticks) > 1 else 1.0
    out = [f'<g class="axis axis-y" aria-label="y axis: {_esc(y_title)}">']
    for t in y_ticks:
        y = frame.sy(t)
        out.append(f'<line x1="{frame.left}" x2="{WIDTH - frame.right}" y1="{y:.1f}" y2="{y:.1f}" class="grid"/>'
                   f'<text x="{frame.left - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">'
                   f'{_esc(tick_label(t, step))}</text>')
    out.append(f'<text class="title" transform="translate(13,{(HEIGHT - frame.bottom + frame.top) / 2:.0f}) '
               f'rotate(-90)" text-anchor="middle">{_esc(y_title)}</text></g>')
    out.append(f'<g class="axis axis-x" aria-label="x axis: {_esc(x_title)}">')
    base = HEIGHT - frame.bottom
    out.append(f'<line x1="{frame.left}" x2="{WIDTH - frame.right}" y1="{base}" y2="{base}" class="domain"/>')
    for value, label in x_ticks:
        x = frame.sx(value)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{base}" y2="{base + 4}" class="domain"/>'
                   f'<text x="{x:.1f}" y="{base + 16}" text-anchor="middle" class="tick">{_esc(label)}</text>')
    out.append(f'<text class="title" x="{(frame.left + WIDTH - frame.right) / 2:.0f}" y="{HEIGHT - 4}" '
               f'text-anchor="middle">{_esc(x_title)}</text></g>')
    return out


def _y_range(values: Sequence[float], y_lim: tuple[float | None, float | None] | None) -> tuple[float, float]:
    lo, hi = (y_lim or (None, None))
    lo = min(values) if lo is None else lo
    hi = max(values) if hi is None else hi
    if hi - lo < 1e-9:
        pad = abs(hi) * 0.1 or 0.1
        lo, hi = lo - pad, hi + pad
    return lo, hi


def _left_margin(labels: Iterable[str]) -> float:
    return 30 + 7 * max((len(t) for t in labels), default=3)  # room for the longest tick label, never clipped


def _svg(frame: Frame, body: list[str], label: str) -> str:
    return (f'<svg class="chart-svg" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{_esc(label)}" '
            f'preserveAspectRatio="xMidYMid meet">{"".join(body)}</svg>')


def _marker(x: float, y: float, square: bool, tip: str) -> str:
    """A point marker; its colours come from its series' group (fewer bytes per point)."""
    if square:
        return f'<rect class="point" x="{x - 3:.1f}" y="{y - 3:.1f}" width="6" height="6"><title>{_esc(tip)}</title></rect>'
    return f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="3.4"><title>{_esc(tip)}</title></circle>'


def line_chart(series: Sequence[Series], *, y_title: str, x_title: str = "epoch",
               y_lim: tuple[float | None, float | None] | None = None, fmt=lambda v: f"{v:.4g}") -> str:
    """An SVG line chart of `series` over whole-number x (epochs); empty string when there is nothing to draw."""
    drawn = [s for s in series if s.points]
    if not drawn:
        return ""
    xs = [x for s in drawn for x, _ in s.points]
    ys = [y for s in drawn for _, y in s.points]
    x0, x1 = min(xs), max(xs)
    if x1 == x0:  # one epoch: the point sits in the middle
        x0, x1 = x0 - 1, x1 + 1
    lo, hi = _y_range(ys, y_lim)
    y_ticks = nice_ticks(lo, hi)
    lo, hi = min(lo, y_ticks[0]), max(hi, y_ticks[-1])
    if y_lim and y_lim[1] is not None:
        hi = y_lim[1]
        y_ticks = [t for t in y_ticks if t <= hi + 1e-12]
    step = (y_ticks[1] - y_ticks[0]) if len(y_ticks) > 1 else 1.0
    frame = Frame(x0, x1, lo, hi, left=_left_margin(tick_label(t, step) for t in y_ticks))
    span = int(max(xs) - min(xs))
    x_step = max(1, math.ceil(span / 10))
    first = int(min(xs))
    x_ticks = [(float(e), str(e)) for e in range(first, int(max(xs)) + 1, x_step)]
    body = _axes(frame, x_ticks, y_ticks, x_title, y_title)
    for s in drawn:
        colour = s.colour or PALETTE[0]
        pts = sorted(s.points)
        coords = " ".join(f"{frame.sx(x):.1f},{frame.sy(y):.1f}" for x, y in pts)
        dash = f' stroke-dasharray="{TRAIN_DASH}"' if s.dashed else ""
        # markers inherit the group's colours: hollow squares for training, dots for validation
        fill = "white" if s.dashed else colour
        body.append(f'<g class="series" data-series="{_esc(s.name)}" data-run="{_esc(s.run_id)}" '
                    f'fill="{fill}" stroke="{colour}" stroke-width="1.6"><title>{_esc(s.name)}</title>'
                    f'<polyline class="line" points="{coords}" fill="none" stroke-width="2"{dash}/>')
        body += [_marker(frame.sx(x), frame.sy(y), s.dashed, f"{s.short or s.name}, {x_title} {x:g}: {fmt(y)}")
                 for x, y in pts]
        body.append("</g>")
    return _svg(frame, body, f"{y_title} by {x_title}")


def legend_html(entries: Sequence[tuple[str, str, str]], key: str = "") -> str:
    """Our legend: (run id, colour, full label) per run, wrapped, never cut; `key` explains the line styles."""
    items = "".join(f'<li data-run="{_esc(rid)}"><span class="swatch" style="background:{colour}"></span>'
                    f'<span class="legend-name">{_esc(label)}</span></li>' for rid, colour, label in entries)
    head = f'<div class="legend-key">{key}</div>' if key else ""
    return f'<div class="chart-legend">{head}<ul>{items}</ul></div>'


LINE_KEY = (f'<svg width="34" height="10"><line x1="0" x2="34" y1="5" y2="5" stroke="#555" stroke-width="2"/>'
            f'<circle cx="17" cy="5" r="3.4" fill="#555"/></svg> validation '
            f'<svg width="34" height="10"><line x1="0" x2="34" y1="5" y2="5" stroke="#555" stroke-width="2" '
            f'stroke-dasharray="{TRAIN_DASH}"/><rect x="14" y="2" width="6" height="6" fill="white" stroke="#555" '
            f'stroke-width="1.6"/></svg> training')


def chart_block(title: str, svg: str, legend: str, empty: str = "") -> str:
    """A titled chart with its legend beside it (the legend wraps under it on a narrow screen)."""
    inner = svg or f'<div class="chart-empty">{_esc(empty)}</div>'
    return (f'<div class="chart-block"><div class="chart-main"><div class="chart-title">{_esc(title)}</div>'
            f'{inner}</div>{legend if svg else ""}</div>')


# --- sweep ----------------------------------------------------------------------------------------------------

@dataclass
class Mark:
    """One run in the sweep view."""
    run_id: str
    label: str
    x: float
    y: float
    group: str  # colours the mark (the model)


def _log_ticks(lo: float, hi: float, base: float) -> list[tuple[float, str]]:
    a, b = math.floor(math.log(lo, base) + 1e-9), math.ceil(math.log(hi, base) - 1e-9)
    ticks = [(base ** k, f"1e{k}" if base == 10 else str(int(base ** k))) for k in range(a, b + 1)]
    if base == 10:  # also the 3s between decades, as lr grids usually are 1e-3, 3e-3, 1e-2
        ticks += [(3 * base ** k, f"3e{k}") for k in range(a, b) if lo <= 3 * base ** k <= hi]
    return sorted(ticks)


def scatter_chart(marks: Sequence[Mark], *, x_title: str, y_title: str, log_base: float,
                  colours: dict[str, str]) -> str:
    """Marks at (x, y) on a log x axis (base 10 for learning rates, 2 for batch sizes), y from 0 to 1, coloured by
    their group (`colours`: group → colour)."""
    marks = [m for m in marks if m.x and m.x > 0 and math.isfinite(m.y)]
    if not marks:
        return ""
    lo, hi = min(m.x for m in marks), max(m.x for m in marks)
    lo, hi = lo / (log_base ** 0.3), hi * (log_base ** 0.3)  # room around the outer marks
    y_ticks = nice_ticks(0.0, 1.0)
    frame = Frame(lo, hi, 0.0, 1.0, left=_left_margin(tick_label(t, 0.2) for t in y_ticks), log_x=True)
    body = _axes(frame, [t for t in _log_ticks(lo, hi, log_base) if lo <= t[0] <= hi], y_ticks, x_title, y_title)
    for m in marks:
        colour = colours.get(m.group, PALETTE[0])
        body.append(f'<g class="mark" data-run="{_esc(m.run_id)}" data-group="{_esc(m.group)}">'
                    f'<circle cx="{frame.sx(m.x):.1f}" cy="{frame.sy(m.y):.1f}" r="5" fill="{colour}" '
                    f'fill-opacity="0.8" stroke="white"><title>{_esc(m.label)}: {m.y:.1%}</title></circle></g>')
    return _svg(frame, body, f"{y_title} by {x_title}")
