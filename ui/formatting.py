"""Text primitives every tab uses: durations, ages, percentages, learning rates, plurals, one-line errors and
Markdown that is safe for user text. Pure, no gradio. What each tab shows is built from these in its own view
module: ui/runs_view.py, ui/train_view.py, ui/data_view.py, ui/predict_view.py, ui/results_view.py.
"""

from __future__ import annotations

import html
import math
import re
import time
from typing import Any

DASH = "—"


# --- numbers ------------------------------------------------------------------------------------------------

def fmt_duration(seconds: float | None) -> str:
    """45s, 3m 07s, 1h 05m, 2d 03h; a dash for unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return DASH
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    m, s = divmod(s, 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    if h < 24:
        return f"{h}h {m:02d}m"
    d, h = divmod(h, 24)
    return f"{d}d {h:02d}h"


def fmt_ago(timestamp: float | None, now: float | None = None) -> str:
    """'just now', '5 min ago', '3 h ago', '2 days ago'."""
    if not timestamp:
        return DASH
    delta = max(0.0, (now if now is not None else time.time()) - timestamp)
    if delta < 45:
        return "just now"
    if delta < 3600:
        return f"{max(1, round(delta / 60))} min ago"
    if delta < 86400:
        return f"{round(delta / 3600)} h ago"
    days = round(delta / 86400)
    return f"{days} day{'s' if days != 1 else ''} ago"


def fmt_pct(value: float | None, digits: int = 1) -> str:
    if value is None or not isinstance(value, (int, float)) or not math.isfinite(value):
        return DASH
    return f"{100 * value:.{digits}f}%"


def fmt_lr(lr: float | None) -> str:
    """Learning rates the way people write them: 1e-3, 3e-4, 0.01 → 1e-2, 0.1."""
    if lr is None:
        return DASH
    lr = float(lr)
    if lr >= 0.1 or lr <= 0:
        return f"{lr:g}"
    exponent = math.floor(math.log10(lr))
    mantissa = lr / 10 ** exponent
    if abs(mantissa - round(mantissa)) < 1e-9:
        return f"{int(round(mantissa))}e{exponent}"
    return f"{mantissa:.3g}e{exponent}"


def plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- text ---------------------------------------------------------------------------------------------------

def first_line(text: Any, limit: int = 300) -> str:
    """The first line of a (possibly multi-line) error, at most `limit` characters."""
    text = str(text or "").strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def md_escape(text: Any) -> str:
    """Text safe to put inside Markdown (file names come from users)."""
    text = html.escape(str(text), quote=False)
    for ch in "\\`*_[]|<>#":
        text = text.replace(ch, "\\" + ch)
    return text


def md_code(text: Any) -> str:
    """`text` as a Markdown code span, shown exactly as written. Inside a code span Markdown undoes no escapes, so
    md_escape there showed `my\\_data` and `&amp;`; a fence longer than any run of backticks in the text keeps
    it closed (file names come from users)."""
    text = " ".join(str(text).splitlines())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{fence}{pad}{text}{pad}{fence}"
