"""Comparing runs: the comparison table of chosen runs (only the settings that differ, plus the model; best
validation and test scores, time, speed; the best run marked), the filter of the runs list, and the runs table as
CSV. Pure functions over run records (status + `config`, as the registry and `RunStore` give them)."""

from __future__ import annotations

import csv
import math
import time
from dataclasses import fields
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from shared.fsutil import atomic_open
from shared.training.config import TrainConfig

# config.json keys that are not settings to compare (what `fit` adds, and the folder itself is shown as dataset)
NOT_SETTINGS = ("env", "split_hash", "classes", "data_dir")
# friendlier column names for the usual grid axes; other settings keep their config name
SETTING_NAMES = {"lr": "lr", "batch_size": "batch size", "image_size": "image size", "weight_decay": "weight decay"}
METRIC_COLUMNS = ["best val acc", "best epoch", "test acc", "test macro F1", "time (s)", "images/s"]
BEST_MARK = "★ best"
BASELINE_MARK = "📌 baseline"


def dataset_name(record: Mapping[str, Any]) -> str:
    """The dataset a run trained on, as its folder's name."""
    data_dir = (record.get("config") or {}).get("data_dir") or ""
    return Path(str(data_dir)).name or "?"


def best_val(record: Mapping[str, Any]) -> float | None:
    """The best validation accuracy: the final `best`, else the best epoch of the live history."""
    best = record.get("best") or {}
    if isinstance(best.get("best_val_acc"), (int, float)):
        return float(best["best_val_acc"])
    history = (record.get("progress") or {}).get("history") or []
    values = [h.get("val_acc") for h in history if isinstance(h.get("val_acc"), (int, float))]
    return max(values) if values else None


def best_epoch(record: Mapping[str, Any]) -> int | None:
    best = record.get("best") or {}
    if best.get("best_epoch"):
        return best["best_epoch"]
    history = (record.get("progress") or {}).get("history") or []
    scored = [h for h in history if isinstance(h.get("val_acc"), (int, float))]
    return max(scored, key=lambda h: h["val_acc"]).get("epoch") if scored else None


def images_per_s(record: Mapping[str, Any]) -> float | None:
    best = record.get("best") or {}
    value = best.get("images_per_s")
    if value is None:
        history = (record.get("progress") or {}).get("history") or []
        value = history[-1].get("images_per_s") if history else None
        value = value or (record.get("progress") or {}).get("images_per_s")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def duration_s(record: Mapping[str, Any], now: float | None = None) -> float | None:
    started = record.get("started")
    if not started:
        return None
    end = record.get("finished") or (time.time() if now is None else now)
    return max(0.0, end - started)


def differing_settings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Config keys whose values differ between the runs (in TrainConfig's field order, then any others); "model"
    is always shown apart."""
    keys: list[str] = [f.name for f in fields(TrainConfig) if f.name not in NOT_SETTINGS and f.name != "model"]
    for r in records:
        for key in r.get("config") or {}:
            if key not in keys and key not in NOT_SETTINGS and key != "model":
                keys.append(key)
    if len(records) < 2:
        return []
    return [k for k in keys if len({repr((r.get("config") or {}).get(k)) for r in records}) > 1]


def comparison(records: Sequence[Mapping[str, Any]], tests: Mapping[str, tuple[float | None, float | None]],
               baseline: str | None = None, now: float | None = None) -> tuple[list[str], list[list]]:
    """(columns, rows) of the comparison table: run, mark, model, dataset when it differs, the differing
    settings, then METRIC_COLUMNS. `tests` maps run id → (test accuracy, test macro F1) where evaluated. The
    run with the highest best validation accuracy is marked BEST_MARK, the baseline BASELINE_MARK. Numbers stay
    numbers (rounded), so the table sorts them as numbers."""
    settings = differing_settings(records)
    show_data = len({dataset_name(r) for r in records}) > 1
    columns = ["run", "mark", "model", *(["dataset"] if show_data else []),
               *(SETTING_NAMES.get(k, k) for k in settings), *METRIC_COLUMNS]
    scores = {r["run_id"]: best_val(r) for r in records}
    top = max((v for v in scores.values() if v is not None), default=None)
    rows = []
    for r in records:
        config = r.get("config") or {}
        run_id = r["run_id"]
        marks = [BEST_MARK] if top is not None and scores[run_id] == top else []
        if run_id == baseline:
            marks.append(BASELINE_MARK)
        test_acc, test_f1 = tests.get(run_id, (None, None))
        seconds, speed = duration_s(r, now), images_per_s(r)
        rows.append([run_id, " ".join(marks), config.get("model"), *([dataset_name(r)] if show_data else []),
                     *(_cell(config.get(k)) for k in settings),
                     _round(scores[run_id]), best_epoch(r), _round(test_acc), _round(test_f1),
                     None if seconds is None else round(seconds, 1), None if speed is None else round(speed, 1)])
    return columns, rows


def _round(value, digits: int = 4):
    return None if value is None else round(float(value), digits)


def _cell(value):
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


# --- the runs list's filter -------------------------------------------------------------------------------------

def matches(record: Mapping[str, Any], tags: Iterable[str], *, tag: str | None = None, dataset: str | None = None,
            model: str | None = None, status: str | None = None) -> bool:
    """Whether a run passes the filter (an empty criterion passes everything)."""
    return ((not tag or tag in tags) and (not dataset or dataset_name(record) == dataset)
            and (not model or (record.get("config") or {}).get("model") == model)
            and (not status or record.get("status") == status))


# --- CSV ------------------------------------------------------------------------------------------------------

CSV_COLUMNS = ["run_id", "status", "model", "dataset", "data_dir", "lr", "batch_size", "epochs", "image_size",
               "optimizer", "weights", "best_val_acc", "best_epoch", "test_acc", "test_macro_f1", "duration_s",
               "images_per_s", "tags", "note", "baseline", "created", "finished", "error"]
# a cell starting with one of these is a formula to spreadsheets (CSV injection): tags, notes and folder names are
# the user's, so such cells get a leading quote (OWASP's advice, as shared.analysis.predict does)
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_row(record: Mapping[str, Any], test: tuple[float | None, float | None], tags: Sequence[str], note: str,
            baseline: bool, now: float | None = None) -> list:
    config = record.get("config") or {}
    return [record.get("run_id"), record.get("status"), config.get("model"), dataset_name(record),
            config.get("data_dir"), config.get("lr"), config.get("batch_size"), config.get("epochs"),
            config.get("image_size"), config.get("optimizer"), config.get("weights"), best_val(record),
            best_epoch(record), test[0], test[1], duration_s(record, now), images_per_s(record), " ".join(tags),
            note, baseline, record.get("created"), record.get("finished"), record.get("error")]


def write_runs_csv(rows: Iterable[Sequence], path: Path) -> Path:
    """The runs table as CSV (CSV_COLUMNS), written atomically; text that would start a formula is quoted."""
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(CSV_COLUMNS)
        for row in rows:
            writer.writerow(["'" + c if isinstance(c, str) and c.startswith(_FORMULA_START) else
                             ("" if c is None else c) for c in row])
    return Path(path)
