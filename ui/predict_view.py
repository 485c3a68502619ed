"""Pure views for the Predict tab: the top-5 for gr.Label, the many-images table, and the lines that name the run
answering."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Mapping

from .formatting import fmt_ago, fmt_pct, md_escape
from .runs_view import best_val_acc, run_label

TABLE_COLUMNS = ["file", "prediction", "probability", "2nd", "3rd", "error"]


def top5_dict(top: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Predictor top-k list → {class: probability} for gr.Label."""
    return {item["class"]: float(item["probability"]) for item in top}


def table_rows(results: Iterable[Mapping[str, Any]]) -> list[list]:
    """One row per file of "Classify all", in TABLE_COLUMNS order: the top three classes, or the error."""
    rows = []
    for r in results:
        top = r["top"]
        prediction = top[0]["class"] if top else ""
        if top and r.get("sure") is False:
            prediction = f"not sure — closest: {prediction}"
        rows.append([r["source"], prediction, round(top[0]["probability"], 4) if top else None,
                     top[1]["class"] if len(top) > 1 else "", top[2]["class"] if len(top) > 2 else "",
                     r["error"] or ""])
    return rows


def verdict_line(verdict, calibration_note: str = "") -> str:
    """Above "Answered by": the answer, or **Not sure** with the closest class when below the threshold."""
    closest = md_escape(verdict.closest)
    if verdict.sure:
        line = f"**{closest}** ({fmt_pct(verdict.confidence)})"
    elif not verdict.confident:
        line = (f"**Not sure** — closest: {closest} ({fmt_pct(verdict.confidence)}, below the "
                f"{fmt_pct(verdict.threshold)} this model needs to answer)")
    else:  # confident, but the picture is unlike anything the model was trained on
        line = (f"**Not sure** — closest: {closest} ({fmt_pct(verdict.confidence)}), but this picture is unlike "
                f"the images the model was trained on (feature distance {verdict.distance:.1f}, above the "
                f"{verdict.distance_threshold:.1f} it answers up to)")
    return line + (f"  \n_{md_escape(calibration_note)}_" if calibration_note else "")


def answered_by(record: Mapping[str, Any], run_id: str, latest: bool, why: str | None = None) -> str:
    """Under an answer: which run gave it, and why it was chosen (the latest, the best, or picked)."""
    acc, _ = best_val_acc(record)
    when = fmt_ago(record.get("finished"))
    source = why or ("the latest finished run" if latest else "the run you picked")
    return (f"Answered by **{md_escape(run_label(record))}** (`{run_id}`, val accuracy "
            f"{fmt_pct(acc)}, finished {when}) — {source}.")


def answering_with(record: Mapping[str, Any]) -> str:
    """The model line: the run that answers now."""
    acc, _ = best_val_acc(record)
    return (f"Now answering with **{md_escape(run_label(record))}** (val accuracy {fmt_pct(acc)}, "
            f"finished {fmt_ago(record.get('finished'))}).")


def best_reason(choice, run_id: str) -> str:
    """Why "best finished run" is this run (`choice`: shared.runs.store.BestChoice or None)."""
    if choice is None or choice.run_id != run_id:
        return "the best finished run when the request came in"
    dataset = md_escape(Path(str(choice.data_dir or "?")).name)
    others = f"the {choice.pool} finished runs" if choice.pool != 1 else "the only finished run"
    return (f"the best finished run: highest validation accuracy of {others} on **{dataset}** with the same "
            "classes as the latest run")
