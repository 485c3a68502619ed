"""Pure views of run records for the Runs tab: the table's rows, progress texts, the `run_status` summaries, the
curves' long-form frames and axes, and the short labels that name a run (also in the Results and Predict
dropdowns). No gradio here, so all of it is unit-tested without a browser.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any, Mapping, Sequence

from shared.runs.store import DAMAGED

from .formatting import DASH, first_line, fmt_ago, fmt_duration, fmt_lr, fmt_pct, md_escape

RUN_COLUMNS = ["Run", "Status", "Model", "LR", "Batch", "Epochs", "Progress", "Best val acc", "Duration", "Worker"]
# plain symbols that every system font has (emoji render as empty boxes in some browsers)
STATUS_ICONS = {"queued": "○ queued", "running": "▶ running", "succeeded": "✔ succeeded",
                "failed": "✖ failed", "cancelled": "■ cancelled", "damaged": "⚠ damaged"}


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


def run_choice_label(record: Mapping[str, Any], now: float | None = None) -> str:
    """Dropdown label: model, lr, accuracy, when; the value stays the run id."""
    acc, _ = best_val_acc(record)
    when = fmt_ago(record.get("finished") or record.get("created"), now)
    return f"{run_label(record)} — val {fmt_pct(acc)} — {when}"


def detail_text(records: list[dict], selected: list[str], now: float) -> str:
    """One Markdown line per selected run: its label, status and what it is doing or how it ended."""
    by_id = {r["run_id"]: r for r in records}
    lines = []
    for rid in selected:
        r = by_id.get(rid)
        if r is None:
            continue
        status = r.get("status")
        head = f"**{md_escape(run_label(r))}** — {STATUS_ICONS.get(status, status)}"
        if status in ("failed", DAMAGED) and r.get("error"):
            lines.append(f"{head}: {md_escape(first_line(r['error']))}")
        elif status == "running":
            p = r.get("progress") or {}
            speed = f", {p['images_per_s']:.0f} images/s" if p.get("images_per_s") else ""
            lines.append(f"{head}: {progress_text(r)}{speed} on {r.get('worker') or 'a worker'}")
        elif status == "cancelled":
            lines.append(f"{head}: {md_escape(r.get('error') or 'cancelled')}")
        elif status == "succeeded":
            acc, epoch = best_val_acc(r)
            lines.append(f"{head}: best val accuracy {fmt_pct(acc)} at epoch {epoch}, took "
                         f"{fmt_duration(run_duration(r, now))} — see **Results**")
        else:
            lines.append(head)
    return "\n\n".join(lines)


def recall_text(label: str, history: Sequence[Mapping[str, Any]], limit: int = 12) -> str:
    """The last epoch's per-class validation recall of one run (Markdown), lowest first: where a skewed dataset
    hurts. Empty for runs that did not record it."""
    last = history[-1] if history else {}
    recall = last.get("val_recall")
    if not isinstance(recall, Mapping) or not recall:
        return ""
    items = sorted(recall.items(), key=lambda kv: kv[1] if isinstance(kv[1], (int, float)) else 2.0)
    shown = " · ".join(f"{md_escape(str(name))} {fmt_pct(value, 0)}" for name, value in items[:limit])
    more = f" · … {len(items) - limit} more" if len(items) > limit else ""
    f1 = last.get("val_macro_f1")
    f1_text = f", macro F1 {f1:.3f}" if isinstance(f1, (int, float)) else ""
    return f"**{md_escape(label)}** — val recall per class (epoch {last.get('epoch')}{f1_text}): {shown}{more}"


def banner_text(problem: str | None) -> str:
    """The banner over the page while the run queue is unreachable; empty when it is reachable."""
    if not problem:
        return ""
    # our own message (the Redis URL has its password removed); its `code` spans are meant as code
    text = html.escape(problem.rstrip(". "), quote=False)
    return (f"⚠ **The run queue is unreachable** — {text}. Runs below are read from the run folders; live progress "
            "comes back by itself, no reload needed.")


# --- curves (drawn by ui/charts.py) ---------------------------------------------------------------------------

def full_label(record: Mapping[str, Any]) -> str:
    """A run named in full in the curves' legend and series: its whole id and its model, lr and batch size."""
    config = record.get("config") or {}
    return (f"{record.get('run_id', '?')} · {config.get('model', '?')} lr {fmt_lr(config.get('lr'))} "
            f"bs {config.get('batch_size', '?')}")


def curve_series(runs: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]], split: str = "both"):
    """(loss series, accuracy series, legend entries) for (record, epoch history) pairs: per run and split one
    `charts.Series` named '<full label> · val' / '· train' (training dashed), coloured by run id; the legend
    lists every run that has a point, as (run id, colour, full label)."""
    from .charts import Series, run_colours

    splits = ("train", "val") if split == "both" else (split,)
    colours = run_colours(r["run_id"] for r, _ in runs)
    loss, acc, legend = [], [], []
    for record, history in runs:
        rid, label = record["run_id"], full_label(record)
        drawn = False
        for part in splits:
            for key, out in ((f"{part}_loss", loss), (f"{part}_acc", acc)):
                points = [(float(h["epoch"]), float(h[key])) for h in history
                          if isinstance(h.get("epoch"), int) and isinstance(h.get(key), (int, float))
                          and math.isfinite(h[key])]
                if points:
                    out.append(Series(f"{label} · {part}", rid, _last_per_epoch(points), dashed=part == "train",
                                      colour=colours[rid], short=f"{rid.rsplit('-', 1)[-1]} {part}"))
                    drawn = True
        if drawn:
            legend.append((rid, colours[rid], label))
    return loss, acc, legend


def _last_per_epoch(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """One point per epoch (an epoch logged twice, by a resumed run, keeps its last value)."""
    return sorted(dict(points).items())


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
