"""What the Runs tab shows, computed from the lab (no gradio here): epoch histories, tags and test scores read
from the run folders (cached by mtime), the filtered list, and the curves, comparison and sweep of the selected
runs plus the pinned baseline. `ui/tabs/runs.py` lays them out and sends what changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import pandas as pd

from shared.analysis.eval_result import EvalResultError, eval_file, load_eval_result
from shared.runs import compare
from shared.runs.annotations import ANNOTATIONS_FILE, Annotations, read_annotations
from shared.runs.store import read_metrics

from . import charts
from . import formatting as fmt
from . import runs_view as view

# Runs whose curves are drawn when nothing is selected: the newest few that have at least one epoch.
DEFAULT_CURVES = 4
MAX_CURVES = 16
ALL = ""  # a filter's "everything" value


@lru_cache(maxsize=256)
def _disk_metrics(path: str, mtime: float, size: int) -> tuple[dict, ...]:
    return tuple(read_metrics(Path(path)))


def history_of(lab, record: dict) -> list[dict]:
    """Epoch records of a run: the live history from Redis, else metrics.jsonl (cached by mtime)."""
    live = (record.get("progress") or {}).get("history")
    if live:
        return list(live)
    run_dir = lab.store.root / record["run_id"]
    try:
        st = (run_dir / "metrics.jsonl").stat()
    except OSError:
        return []
    return list(_disk_metrics(str(run_dir), st.st_mtime, st.st_size))


@lru_cache(maxsize=2048)
def _cached_annotations(path: str, mtime_ns: int, size: int) -> Annotations:
    return read_annotations(Path(path))


def annotations_of(lab, run_id: str) -> Annotations:
    """A run's tags/note/baseline (a stat per call; the file is read again only when it changed)."""
    run_dir = lab.store.root / run_id
    try:
        st = (run_dir / ANNOTATIONS_FILE).stat()
    except (OSError, ValueError):
        return Annotations()
    return _cached_annotations(str(run_dir), st.st_mtime_ns, st.st_size)


@lru_cache(maxsize=1024)
def _cached_test(path: str, mtime_ns: int) -> tuple[float | None, float | None]:
    try:
        result = load_eval_result(Path(path))
    except (EvalResultError, OSError, ValueError):
        return None, None
    return (result.accuracy, result.macro_f1) if result else (None, None)


def test_scores(lab, run_id: str) -> tuple[float | None, float | None]:
    """(test accuracy, test macro F1) from the run's eval.json, (None, None) before it is evaluated."""
    run_dir = lab.store.root / run_id
    try:
        st = eval_file(run_dir).stat()
    except (OSError, ValueError):
        return None, None
    return _cached_test(str(run_dir), st.st_mtime_ns)


@dataclass
class View:
    """One look at the runs: all records, their annotations, the baseline, the filtered ones."""
    records: list[dict]
    notes: dict[str, Annotations]
    baseline: str | None
    filtered: list[dict]


def criterion(value) -> str:
    """A filter value from the page: a short text, else no filter (it is only compared, never used as a path)."""
    return value if isinstance(value, str) and len(value) <= 200 else ALL


def look(lab, records: list[dict], tag: str | None, dataset: str | None, model: str | None,
         status: str | None) -> View:
    tag, dataset, model, status = map(criterion, (tag, dataset, model, status))
    notes = {r["run_id"]: annotations_of(lab, r["run_id"]) for r in records}
    baseline = next((rid for rid, a in notes.items() if a.baseline), None)
    filtered = [r for r in records if compare.matches(r, notes[r["run_id"]].tags, tag=tag, dataset=dataset,
                                                      model=model, status=status)]
    return View(records, notes, baseline, filtered)


def compared(v: View, selected: list[str]) -> list[dict]:
    """The runs compared: the selected ones (at most MAX_CURVES) and the baseline."""
    by_id = {r["run_id"]: r for r in v.records}
    chosen = [by_id[rid] for rid in selected if rid in by_id][:MAX_CURVES]
    if v.baseline and v.baseline in by_id and v.baseline not in selected:
        chosen.append(by_id[v.baseline])
    return chosen


def _curve_runs(v: View, selected: list[str]) -> list[dict]:
    if selected:
        return compared(v, selected)
    started = [r for r in v.records if r.get("status") in ("running", "succeeded") or r.get("started")]
    return started[:DEFAULT_CURVES]


def curves(lab, v: View, selected: list[str], split: str = "both") -> tuple[str, str, str]:
    """(note, loss chart HTML, accuracy chart HTML) for the selected runs and the baseline (or the newest)."""
    chosen = _curve_runs(v, selected)
    runs, ended = [], []  # ended: why finished runs without a single epoch will never have curves
    for record in chosen:
        history = history_of(lab, record)
        runs.append((record, history))
        reason = None if history else view.no_curves_reason(record)
        if reason:
            ended.append(reason)
    loss, acc, legend = view.curve_series(runs, split)
    which = {"val": " (validation)", "train": " (training)"}.get(split, "")
    n = len(chosen)
    if not v.records:
        note = "No runs yet — queue some on the **Train** tab."
    elif not chosen:
        note = "No run has started yet; curves appear after the first epoch."
    elif not legend and len(ended) == n:
        note = ""  # none of them will ever have curves: the reasons below say why
    elif not legend:
        note = "Waiting for the first epoch to finish…"
    elif selected:
        note = f"Curves of the {n} selected run{'s' if n != 1 else ''}{which}."
        if v.baseline and v.baseline not in selected:
            note = f"Curves of the {n - 1} selected run{'s' if n != 2 else ''} and the baseline{which}."
        if len(selected) > MAX_CURVES:
            note += f" The first {MAX_CURVES} selected are drawn."
    else:
        note = (f"Curves of the {n} newest run{'s' if n != 1 else ''}{which} — select runs above to compare "
                "others.")
    top = view.robust_upper([y for s in loss for _, y in s.points])
    if top is not None:
        note += f" The loss axis stops at {top:.2f}: a spike above it is drawn at the top edge."
    key = charts.LINE_KEY if split == "both" else ""
    legend_html = charts.legend_html(legend, key)
    empty = "No epoch finished yet."
    loss_html = charts.chart_block("Loss", charts.line_chart(loss, y_title="loss", y_lim=(0, top) if top else None),
                                   legend_html, empty)
    acc_html = charts.chart_block("Accuracy", charts.line_chart(acc, y_title="accuracy", y_lim=(0, 1),
                                                                fmt=lambda y: f"{y:.1%}"), legend_html, empty)
    # per-class validation recall (lowest first), for runs that record it: where a skewed dataset hurts
    recalls = [line for line in (view.recall_text(view.full_label(r), h) for r, h in runs) if line]
    text = " ".join(part for part in (note, *ended) if part)
    return "\n\n".join(part for part in (text, *recalls) if part), loss_html, acc_html


def comparison(lab, v: View, selected: list[str], now: float) -> tuple[str, pd.DataFrame | None]:
    """(note, table) comparing the selected runs and the baseline; no table for fewer than two."""
    runs = compared(v, selected)
    if len(runs) < 2:
        return ("Select two or more runs (or one and pin a baseline) to compare their settings and scores.",
                None)
    columns, rows = compare.comparison(runs, {r["run_id"]: test_scores(lab, r["run_id"]) for r in runs},
                                       v.baseline, now)
    settings = [c for c in columns if c not in ("run", "mark", "model", "dataset", *compare.METRIC_COLUMNS)]
    differ = ", ".join(settings) if settings else "no setting (only the model, data or seed may differ)"
    note = (f"**Comparing {len(runs)} runs** — settings that differ: {fmt.md_escape(differ)}. "
            "Click a header to sort; ★ marks the highest best validation accuracy.")
    return note, pd.DataFrame(rows, columns=columns)


def sweep_html(v: View, selected: list[str]) -> str:
    """Validation accuracy against learning rate and batch size, one mark per run, coloured by model: of the
    compared runs, or of the listed (filtered) ones when fewer than two are selected."""
    runs = compared(v, selected) if len(selected) >= 2 else v.filtered
    marks_lr, marks_bs, models = [], [], []
    for r in runs:
        acc = compare.best_val(r)
        config = r.get("config") or {}
        if acc is None:
            continue
        model = str(config.get("model") or "?")
        label = view.run_label(r)
        if model not in models:
            models.append(model)
        if isinstance(config.get("lr"), (int, float)) and config["lr"] > 0:
            marks_lr.append(charts.Mark(r["run_id"], label, float(config["lr"]), acc, model))
        if isinstance(config.get("batch_size"), int) and config["batch_size"] > 0:
            marks_bs.append(charts.Mark(r["run_id"], label, float(config["batch_size"]), acc, model))
    if not marks_lr and not marks_bs:
        return '<div class="chart-empty">No run has a validation score yet.</div>'
    colours = charts.run_colours(models)
    legend = charts.legend_html([(m, colours[m], m) for m in models], "colour: model")
    lr = charts.scatter_chart(marks_lr, x_title="learning rate (log)", y_title="best val accuracy", log_base=10,
                              colours=colours)
    bs = charts.scatter_chart(marks_bs, x_title="batch size (log)", y_title="best val accuracy", log_base=2,
                              colours=colours)
    return (f'<div class="chart-block sweep"><div class="chart-main">{lr}</div><div class="chart-main">{bs}</div>'
            f'{legend}</div>')


