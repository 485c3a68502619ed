"""Pure helpers that turn run records, metrics and reports into what the page shows: table rows, short texts,
long-form data frames for the plots. No gradio here, so all of it is unit-tested without a browser. The Results
tab's views of an evaluation are in ui/results_view.py.
"""

from __future__ import annotations

import html
import math
import re
import time
from typing import Any, Iterable, Mapping, Sequence

from shared.training.config import DEFAULT_MODEL

RUN_COLUMNS = ["Run", "Status", "Model", "LR", "Batch", "Epochs", "Progress", "Best val acc", "Duration", "Worker"]
# plain symbols that every system font has (emoji render as empty boxes in some browsers)
STATUS_ICONS = {"queued": "○ queued", "running": "▶ running", "succeeded": "✔ succeeded",
                "failed": "✖ failed", "cancelled": "■ cancelled", "damaged": "⚠ damaged"}
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


def parse_lrs(text: str) -> list[float]:
    """Extra learning rates typed as '3e-4, 0.002'; raises ValueError naming the bad item."""
    values = []
    for item in text.replace(";", ",").replace(" ", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"learning rate {item!r} is not a number — write e.g. 3e-4 or 0.0003") from None
        if not (0 < value < 10):
            raise ValueError(f"learning rate {item} must be a positive number below 10")
        values.append(value)
    return values


# --- runs ---------------------------------------------------------------------------------------------------

def progress_fraction(record: Mapping[str, Any]) -> float | None:
    """How far a run is, 0..1 (None when it has not started reporting)."""
    status = record.get("status")
    if status == "succeeded":
        return 1.0
    p = record.get("progress") or {}
    epochs = p.get("epochs") or (record.get("config") or {}).get("epochs")
    epoch = p.get("epoch")
    if not epochs or not epoch:
        history = p.get("history") or []
        return (len(history) / epochs) if epochs and history else None
    done_batches = (p.get("batch") or 0) / p["num_batches"] if p.get("num_batches") else 0.0
    # `epoch` is the 1-based epoch in progress; when it is the last recorded one it may be complete
    history = p.get("history") or []
    if history and history[-1].get("epoch") == epoch:
        done_batches = 0.0
        completed = epoch
    else:
        completed = epoch - 1
    return max(0.0, min(1.0, (completed + min(1.0, done_batches)) / epochs))


def progress_text(record: Mapping[str, Any]) -> str:
    status = record.get("status")
    p = record.get("progress") or {}
    if status == "queued":
        return "waiting for a worker"
    if status == "succeeded":
        return "100%"
    phase = p.get("phase") or ""
    frac = progress_fraction(record)
    if status == "running" and phase == "preparing data":
        info = p.get("info") or p
        total, done = info.get("total"), info.get("decoded")
        return f"preparing data {done}/{total}" if total else "preparing data"
    if status == "running" and phase.startswith("evaluat"):
        return "evaluating"
    if frac is None:
        return "starting" if status == "running" else DASH
    epochs = p.get("epochs") or (record.get("config") or {}).get("epochs")
    text = f"{100 * frac:.0f}%"
    if status == "running" and p.get("epoch") and epochs:
        text += f" · epoch {p['epoch']}/{epochs}"
        if p.get("eta_s"):
            text += f" · {fmt_duration(p['eta_s'])} left"
    return text


def best_val_acc(record: Mapping[str, Any]) -> tuple[float | None, int | None]:
    """(accuracy, epoch) of the best epoch so far, from the final `best` or the live history."""
    best = record.get("best") or {}
    if best.get("best_val_acc") is not None:
        return best["best_val_acc"], best.get("best_epoch")
    history = (record.get("progress") or {}).get("history") or []
    if not history:
        return None, None
    top = max(history, key=lambda r: r.get("val_acc") or 0.0)
    return top.get("val_acc"), top.get("epoch")


def run_duration(record: Mapping[str, Any], now: float | None = None) -> float | None:
    started = record.get("started")
    if not started:
        return None
    end = record.get("finished") or (now if now is not None else time.time())
    return max(0.0, end - started)


def run_row(record: Mapping[str, Any], now: float | None = None) -> list[str]:
    """One row of the Runs table, in RUN_COLUMNS order."""
    config = record.get("config") or {}
    acc, epoch = best_val_acc(record)
    acc_text = fmt_pct(acc) + (f" (ep {epoch})" if acc is not None and epoch else "")
    status = record.get("status") or "?"
    status_text = STATUS_ICONS.get(status, status)
    if status == "running" and record.get("cancel_requested"):
        status_text = "■ cancelling"
    return [
        record.get("run_id", "?"),
        status_text,
        config.get("model", DASH),
        fmt_lr(config.get("lr")),
        str(config.get("batch_size", DASH)),
        str(config.get("epochs", DASH)),
        progress_text(record),
        acc_text,
        fmt_duration(run_duration(record, now)),
        _host(record.get("worker")),
    ]


def _host(worker: str | None) -> str:
    """'celery@gpu-box' → 'gpu-box'; 'gpu0@box' stays (the prefix names the GPU)."""
    if not worker:
        return DASH
    name, _, host = worker.partition("@")
    return host if name == "celery" and host else worker


def run_summary(record: Mapping[str, Any], now: float | None = None) -> dict:
    """A small JSON-able dict per run for the `run_status` API (no history, no images)."""
    config = record.get("config") or {}
    acc, epoch = best_val_acc(record)
    p = record.get("progress") or {}
    frac = progress_fraction(record)
    return {
        "run_id": record.get("run_id"),
        "status": record.get("status"),
        "model": config.get("model"),
        "lr": config.get("lr"),
        "batch_size": config.get("batch_size"),
        "epochs": config.get("epochs"),
        "image_size": config.get("image_size"),
        "data_dir": config.get("data_dir"),
        "progress": None if frac is None else round(frac, 4),
        "phase": p.get("phase"),
        "epoch": p.get("epoch"),
        "best_val_acc": acc,
        "best_epoch": epoch,
        "duration_s": run_duration(record, now),
        "worker": record.get("worker"),
        "error": record.get("error"),
        "created": record.get("created"),
        "finished": record.get("finished"),
    }


def first_line(text: Any, limit: int = 300) -> str:
    """The first line of a (possibly multi-line) error, at most `limit` characters."""
    text = str(text or "").strip()
    line = text.splitlines()[0] if text else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


def no_curves_reason(record: Mapping[str, Any]) -> str | None:
    """Why a finished run that recorded no epoch has no curves (Markdown); None while it may still get some."""
    status, error = record.get("status"), str(record.get("error") or "")
    name = f"**{md_escape(run_label(record))}**"
    if status == "cancelled":
        if "before it started" in error or not record.get("started"):
            return f"{name} was cancelled before it started, so it has no curves."
        return f"{name} was cancelled before its first epoch finished, so it has no curves."
    if status == "failed":
        return f"{name} failed before its first epoch: {md_escape(first_line(error) or 'no error was recorded')}"
    if status == "succeeded":
        return f"{name} recorded no epochs."
    return None


def run_label(record_or_config: Mapping[str, Any]) -> str:
    """A short human label for a run in plot legends: '1a2b3c resnet18 lr 1e-3 bs 32' (id suffix first, so
    truncated legends still tell runs apart)."""
    config = record_or_config.get("config") or record_or_config
    run_id = record_or_config.get("run_id") or ""
    suffix = run_id.rsplit("-", 1)[-1] if run_id else ""
    parts = [suffix] if suffix else []
    parts += [str(config.get("model", "?")), f"lr {fmt_lr(config.get('lr'))}", f"bs {config.get('batch_size', '?')}"]
    return " ".join(parts)


def curve_label(record: Mapping[str, Any]) -> str:
    """The legend name of a run's curves, short enough not to be cut: '1a2b3c lr 1e-3' (+ 'r50', 'rx50_32x4d',
    'wr50_2' when not the default model). The id suffix ties it to the run's full label in the selector and the
    details."""
    config = record.get("config") or {}
    suffix = (record.get("run_id") or "").rsplit("-", 1)[-1]
    model = config.get("model")
    short = str(model).replace("wide_resnet", "wr").replace("resnext", "rx").replace("resnet", "r")
    extra = f" {short}" if model and model != DEFAULT_MODEL else ""
    return f"{suffix}{extra} lr {fmt_lr(config.get('lr'))}"


def run_choice_label(record: Mapping[str, Any], now: float | None = None) -> str:
    """Dropdown label: model, lr, accuracy, when; the value stays the run id."""
    acc, _ = best_val_acc(record)
    when = fmt_ago(record.get("finished") or record.get("created"), now)
    return f"{run_label(record)} — val {fmt_pct(acc)} — {when}"


def grid_count(models: Sequence[str], lrs: Sequence[float], batch_sizes: Sequence[int]) -> tuple[int, str]:
    """(runs, sentence) for the Train tab: how many runs a choice queues, and why."""
    n = len(models) * len(lrs) * len(batch_sizes)
    missing = [name for name, values in (("a model", models), ("a learning rate", lrs),
                                         ("a batch size", batch_sizes)) if not values]
    if missing:
        return 0, "Choose " + " and ".join(missing) + " to queue runs."
    detail = " × ".join([_plural(len(models), "model"), _plural(len(lrs), "learning rate"),
                         _plural(len(batch_sizes), "batch size")])
    return n, f"**{_plural(n, 'run')} will be queued** ({detail})"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


# --- data frames for plots ----------------------------------------------------------------------------------

def curves_frame(histories: Mapping[str, Sequence[Mapping[str, Any]]], split: str = "both"):
    """Long-form frames (loss, accuracy) for the curves plots, columns epoch, value, run: one line per run and
    split; `split` "val" or "train" keeps one split (and the plain run label), "both" draws both."""
    import pandas as pd

    splits = ("train", "val") if split == "both" else (split,)
    loss_rows, acc_rows = [], []
    for label, records in histories.items():
        for r in records:
            epoch = r.get("epoch")
            if epoch is None:
                continue
            for part in splits:
                name = f"{label} · {part}" if split == "both" else label
                for key, rows in ((f"{part}_loss", loss_rows), (f"{part}_acc", acc_rows)):
                    value = r.get(key)
                    if isinstance(value, (int, float)) and math.isfinite(value):
                        rows.append({"epoch": int(epoch), "value": float(value), "run": name})
    columns = ["epoch", "value", "run"]
    return pd.DataFrame(loss_rows, columns=columns), pd.DataFrame(acc_rows, columns=columns)


# Epoch axes. Vega puts about one tick per 40 px and Gradio's LinePlot cannot ask for whole-number steps, so a
# numeric axis over epochs 1..2 gets ticks 1, 1.5, 2 — shown as "1, 2, 2" with the integer format. Up to this
# many epochs the epochs are categories instead (exactly one tick each; the plots sort them by EPOCH_ORDER).
# Beyond it the numeric axis steps by whole epochs by itself: Vega's step is >= 1 once (span / ticks) >= 0.71,
# true for 20+ epochs on plots up to ~1100 px wide.
CATEGORICAL_EPOCHS = 20
EPOCH_ORDER = [str(e) for e in range(1, CATEGORICAL_EPOCHS + 1)]


def epochs_as_categories(*frames):
    """The curves frames with `epoch` as text ("1", "2", …) when no epoch exceeds CATEGORICAL_EPOCHS, else as
    they are; a tuple either way."""
    top = max((int(f["epoch"].max()) for f in frames if not f.empty), default=0)
    if top > CATEGORICAL_EPOCHS:
        return frames
    return tuple(f.assign(epoch=f["epoch"].astype(int).astype(str)) for f in frames)


def robust_upper(values: Sequence[float], spike: float = 4.0) -> float | None:
    """An axis top that keeps one exploding epoch from flattening every other curve: None (automatic) unless
    the largest value is more than `spike` times the 90th percentile, else 1.5x that percentile."""
    finite = sorted(v for v in values if isinstance(v, (int, float)) and math.isfinite(v))
    if len(finite) < 3:
        return None
    p90 = finite[min(len(finite) - 1, int(0.9 * (len(finite) - 1) + 0.5))]
    if p90 <= 0 or finite[-1] <= spike * p90:
        return None
    return 1.5 * p90


def counts_frame(counts: Mapping[str, int]):
    import pandas as pd

    return pd.DataFrame({"class": list(counts), "images": [int(v) for v in counts.values()]})


def size_stats_markdown(sizes: Mapping[str, Any] | None) -> str:
    if not sizes:
        return ""
    rows = ["| | min | median | max |", "|---|---:|---:|---:|"]
    def num(v):
        return f"{v:g}" if isinstance(v, (int, float)) else DASH

    for key, label, unit in (("width", "width", " px"), ("height", "height", " px"), ("aspect", "aspect (w/h)", "")):
        s = sizes.get(key) or {}
        rows.append(f"| {label} | {num(s.get('min'))}{unit} | {num(s.get('median'))}{unit} | {num(s.get('max'))}{unit} |")
    return "\n".join(rows)


def problems_markdown(report: Mapping[str, Any], limit: int = 8) -> str:
    """The dataset check's findings as a short list, with examples of unreadable files."""
    lines = []
    problems = report.get("problems") or []
    if not problems:
        lines.append("✔ **No problems found.**")
    else:
        lines.append(f"**{_plural(len(problems), 'problem')} found:**")
        lines += [f"- {md_escape(p)}" for p in problems]
    unreadable = report.get("unreadable") or []
    if unreadable:
        lines.append("")
        lines.append(f"**Unreadable files (skipped):** {len(unreadable)}")
        lines += [f"- {md_code(u['path'])} — {md_escape(u['reason'])}" for u in unreadable[:limit]]
        if len(unreadable) > limit:
            lines.append(f"- … and {len(unreadable) - limit} more")
    ignored = report.get("ignored") or []
    if ignored:
        lines.append("")
        lines.append(f"Ignored {_plural(len(ignored), 'file')} that are not images, e.g. "
                     + ", ".join(f"{md_code(i['path'])}" for i in ignored[:3]))
    return "\n".join(lines)


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


# --- predictions ------------------------------------------------------------------------------------------

def top5_dict(top: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Predictor top-k list → {class: probability} for gr.Label."""
    return {item["class"]: float(item["probability"]) for item in top}
