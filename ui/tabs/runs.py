"""Runs tab: every run in one table (filtered by tag, dataset, model or status; 50 a page), refreshed by a timer;
loss/accuracy curves of the selected runs (plus the pinned baseline) with a legend naming each in full; a table
comparing them (only the settings that differ); a sweep view; tags, notes and a baseline; CSV export; cancel,
delete (with its files) and clone-into-the-Train-form.

The timer handler sends only what changed: the table page when a row on it changed, the charts when a plotted run
gained an epoch, the banner when Redis went away or came back. Everything else is left out of its answer.
"""

from __future__ import annotations

import logging
import math
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from shared.runs import compare
from shared.runs.annotations import AnnotationError, Annotations
from shared.runs.store import STATUSES, RunNotFound

from .. import formatting as fmt
from .. import runs_view as view
from ..runs_data import ALL, MAX_CURVES, View, comparison, curves, history_of, look, sweep_html, test_scores
from ..client import QueueUnavailable
from . import train as train_tab
from . import run_ids_arg, shown, user_error

log = logging.getLogger(__name__)

HELP = ("All runs, newest first, refreshed every 2 seconds. Click rows (or use the selector) to compare their "
        "curves and settings, tag them, pin a baseline, then cancel, delete or clone them into the Train form.")
PAGE_SIZE = 50  # rows of the runs table per page (500 runs would otherwise be resent whole at every change)
TABLE_COLUMNS = [*view.RUN_COLUMNS, "Tags"]


@dataclass
class RunsUI:
    table: gr.Dataframe
    select: gr.Dropdown
    cancel_btn: gr.Button
    delete_btn: gr.Button
    clone_btn: gr.Button
    confirm_row: gr.Row
    confirm_text: gr.Markdown
    confirm_btn: gr.Button
    abort_btn: gr.Button
    message: gr.Markdown
    curves_note: gr.Markdown
    split: gr.Radio
    loss_plot: gr.HTML
    acc_plot: gr.HTML
    detail: gr.Markdown
    state: gr.State
    choices: gr.State  # the selector's choices; the selector follows it (see wire)
    tag: gr.Dropdown
    dataset: gr.Dropdown
    model: gr.Dropdown
    status: gr.Dropdown
    page: gr.Number
    page_info: gr.Markdown
    filter_choices: gr.State  # the filters' choices; the filters follow it (see wire)
    tags_box: gr.Textbox
    note_box: gr.Textbox
    annotate_btn: gr.Button
    baseline_btn: gr.Button
    unpin_btn: gr.Button
    compare_note: gr.Markdown
    compare_table: gr.Dataframe
    sweep: gr.HTML
    export_btn: gr.Button
    export_file: gr.File
    sweep_box: gr.Accordion
    sweep_open: gr.State  # the sweep is drawn (and refreshed) only while its accordion is open


def _filter(label: str, elem_id: str, choices: list | None = None) -> gr.Dropdown:
    return gr.Dropdown(choices=[("all", ALL), *(choices or [])], value=ALL, label=label, elem_id=elem_id,
                       min_width=140, scale=1)


def build(lab) -> RunsUI:
    gr.Markdown(HELP, elem_classes="help")
    with gr.Row(elem_classes="toolbar"):
        tag = _filter("Tag", "filter-tag")
        dataset = _filter("Dataset", "filter-dataset")
        model = _filter("Model", "filter-model")
        status = _filter("Status", "filter-status", [(s, s) for s in (*STATUSES, "damaged")])
        page = gr.Number(value=1, minimum=1, precision=0, label="Page", elem_id="runs-page", min_width=90, scale=0)
        page_info = gr.Markdown(elem_id="runs-page-info")
    table = gr.Dataframe(headers=TABLE_COLUMNS, value=pd.DataFrame(columns=TABLE_COLUMNS), interactive=False,
                         elem_id="runs-table", max_height=420, wrap=False, label="Runs", show_label=False)
    with gr.Row(elem_classes="toolbar"):
        select = gr.Dropdown(choices=[], value=[], multiselect=True, label="Selected runs", elem_id="runs-select",
                             info="Curves, comparison, tags, cancel, delete and clone apply to these.", scale=4)
        cancel_btn = gr.Button("Cancel", elem_id="cancel-btn", scale=0, min_width=110)
        delete_btn = gr.Button("Delete…", variant="stop", elem_id="delete-btn", scale=0, min_width=110)
        clone_btn = gr.Button("Clone into Train form", elem_id="clone-btn", scale=0, min_width=230)
    with gr.Row(visible=False, elem_id="delete-confirm", elem_classes="toolbar") as confirm_row:
        confirm_text = gr.Markdown()
        confirm_btn = gr.Button("Yes, delete", variant="stop", elem_id="delete-confirm-btn", scale=0, min_width=160)
        abort_btn = gr.Button("Keep them", elem_id="delete-abort-btn", scale=0, min_width=140)
    message = gr.Markdown(elem_id="runs-message")
    detail = gr.Markdown(elem_id="run-detail")
    with gr.Accordion("Tags, note, baseline", open=False, elem_id="annotate"):
        with gr.Row(elem_classes="toolbar"):
            tags_box = gr.Textbox(label="Tags", elem_id="run-tags", scale=2, max_length=420,
                                  info="Comma or space separated; letters, digits, _ . + - (at most 12).")
            note_box = gr.Textbox(label="Note", elem_id="run-note", scale=3, lines=1, max_length=1000,
                                  info="Tags and note are saved to every selected run (in its folder).")
            annotate_btn = gr.Button("Save tags and note", elem_id="annotate-btn", scale=0, min_width=170)
        with gr.Row(elem_classes="toolbar"):
            baseline_btn = gr.Button("Pin first selected run as baseline", elem_id="baseline-btn", scale=0,
                                     min_width=280)
            unpin_btn = gr.Button("Unpin baseline", elem_id="unpin-btn", scale=0, min_width=160)
    with gr.Row(elem_classes="toolbar"):
        curves_note = gr.Markdown(elem_id="curves-note")
        split = gr.Radio([("Both", "both"), ("Validation", "val"), ("Training", "train")], value="both",
                         show_label=False, elem_id="curves-split", scale=0, min_width=340, container=False)
    loss_plot = gr.HTML(elem_id="curves-loss")
    acc_plot = gr.HTML(elem_id="curves-acc")
    compare_note = gr.Markdown(elem_id="compare-note")
    compare_table = gr.Dataframe(interactive=False, elem_id="compare-table", wrap=False, show_label=False,
                                 max_height=360)
    with gr.Accordion("Sweep: which setting won?", open=False, elem_id="sweep-box") as sweep_box:
        sweep = gr.HTML(elem_id="sweep")
    with gr.Row(elem_classes="toolbar"):
        export_btn = gr.Button("Export runs as CSV", elem_id="export-btn", scale=0, min_width=200)
        export_file = gr.File(label="Runs (CSV)", interactive=False, elem_id="runs-csv", height=80, visible=False)
    return RunsUI(table, select, cancel_btn, delete_btn, clone_btn, confirm_row, confirm_text, confirm_btn,
                  abort_btn, message, curves_note, split, loss_plot, acc_plot, detail, gr.State({}), gr.State([]),
                  tag, dataset, model, status, page, page_info, gr.State({}), tags_box, note_box, annotate_btn,
                  baseline_btn, unpin_btn, compare_note, compare_table, sweep, export_btn, export_file, sweep_box,
                  gr.State(False))


def banner_update(problem: str | None):
    text = view.banner_text(problem)
    return gr.Markdown(value=text, visible=bool(text))


# --- handlers -----------------------------------------------------------------------------------------------

def _changed(state: dict, key: str, value, force: bool) -> bool:
    """Whether `value` differs from what was last sent under `key` (kept as a hash: the state stays small)."""
    digest = hash(repr(value))
    if force or state.get(key) != digest:
        state[key] = digest
        return True
    return False


def _page(value, pages: int) -> int:
    try:
        page = int(value)
    except (TypeError, ValueError, OverflowError):
        page = 1
    return min(max(1, page), pages)


def tick(lab, ui: RunsUI, banner: gr.Markdown, selected: list[str] | None, split: str, tag: str | None,
         dataset: str | None, model: str | None, status: str | None, page, sweep_open: bool, active_tab: str,
         state: dict | None, force: bool = False) -> dict:
    """Timer handler: banner always; table page, choices, curves, comparison and sweep only on the Runs tab and
    only when changed. Choices go into States that the selector and filters follow (see `wire`). Outputs left out
    of the dict are not sent."""
    state = dict(state or {})
    out: dict = {ui.state: state}
    selected = list(selected or [])
    records, problem = lab.snapshot()
    if state.get("problem", "unset") != problem:
        out[banner] = banner_update(problem)
        state["problem"] = problem
    if active_tab != "runs" and not force:
        return out
    now = time.time()
    v = look(lab, records, tag, dataset, model, status)
    pages = max(1, math.ceil(len(v.filtered) / PAGE_SIZE))
    page = _page(page, pages)
    shown_runs = v.filtered[(page - 1) * PAGE_SIZE:page * PAGE_SIZE]
    rows = [view.run_row(r, now) + [_tags_cell(v, r["run_id"])] for r in shown_runs]
    if _changed(state, "rows", rows, force):
        out[ui.table] = pd.DataFrame(rows, columns=TABLE_COLUMNS)
    info = (f"{len(v.filtered)} of {len(records)} runs · page {page} of {pages}" if len(v.filtered) != len(records)
            else f"{len(records)} runs · page {page} of {pages}")
    if _changed(state, "page_info", info, force):
        out[ui.page_info] = info
    # the runs on the shown page and the selected ones (a selection survives a filter or another page): 500
    # choices would be sent whole at every change; labels without the status, so a status change sends none
    listed = {r["run_id"] for r in shown_runs} | set(selected)
    choices = [(view.run_label(r), r["run_id"]) for r in records if r["run_id"] in listed]
    if _changed(state, "choices", choices, force):
        out[ui.choices] = choices
    filters = {"tag": sorted({t for a in v.notes.values() for t in a.tags}),
               "dataset": sorted({compare.dataset_name(r) for r in records}),
               "model": sorted({str((r.get("config") or {}).get("model")) for r in records
                                if (r.get("config") or {}).get("model")})}
    if _changed(state, "filters", filters, force):
        out[ui.filter_choices] = filters
    note, loss, acc = curves(lab, v, selected, split or "both")
    if _changed(state, "curves", (note, loss, acc), force):
        out.update({ui.curves_note: note, ui.loss_plot: loss, ui.acc_plot: acc})
    compare_note, table = comparison(lab, v, selected, now)
    if _changed(state, "compare", (compare_note, None if table is None else table.to_dict("split")), force):
        out[ui.compare_note] = compare_note
        out[ui.compare_table] = gr.Dataframe(value=table if table is not None else pd.DataFrame(),
                                             visible=table is not None)
    sweep = sweep_html(v, selected) if sweep_open is True else ""
    if _changed(state, "sweep", sweep, force):
        out[ui.sweep] = sweep
    detail = view.detail_text(records, selected[:MAX_CURVES], now)
    if _changed(state, "detail", detail, force):
        out[ui.detail] = detail
    return out


def _tags_cell(v: View, run_id: str) -> str:
    a = v.notes.get(run_id) or Annotations()
    return " ".join((["📌 baseline"] if a.baseline else []) + list(a.tags))


def filters_update(filters: dict | None, tag: str | None, dataset: str | None, model: str | None):
    """The filters with their current choices (a value no longer offered falls back to "all")."""
    filters = filters or {}

    def one(name, value):
        options = list(filters.get(name) or [])
        return gr.Dropdown(choices=[("all", ALL), *((o, o) for o in options)],
                           value=value if value in options else ALL)

    return one("tag", tag), one("dataset", dataset), one("model", model)


def annotation_fields(lab, selected: list[str] | None):
    """The tag and note boxes show the first selected run's (empty when none is selected)."""
    selected = list(selected or [])
    if not selected:
        return "", ""
    try:
        a = lab.store.annotations(selected[0])
    except RunNotFound:
        return "", ""
    return " ".join(a.tags), a.note


def save_annotations(lab, run_ids: list[str] | None, tags: str | None, note: str | None) -> str:
    """Set the tags and note of the selected runs (each value checked: they come from the page)."""
    run_ids = run_ids_arg(run_ids, title="Nothing tagged")
    if not run_ids:
        raise user_error("Select one or more runs first (click their rows).", title="Nothing selected")
    if not isinstance(tags, (str, type(None))) or not isinstance(note, (str, type(None))):
        raise user_error("tags and note must be text", title="Not saved")
    done = []
    for run_id in run_ids:
        try:
            lab.store.annotate(run_id, tags=tags or "", note=note or "")
        except AnnotationError as exc:
            raise user_error(str(exc), title="Not saved") from None
        except RunNotFound:
            raise user_error(f"no run {shown(run_id)} — it may have been deleted", title="Not saved") from None
        done.append(run_id)
    return f"Saved tags and note of {fmt.plural(len(done), 'run')}."


def pin_baseline(lab, run_ids: list[str] | None) -> str:
    run_ids = run_ids_arg(run_ids, title="No baseline")
    if not run_ids:
        raise user_error("Select the run to pin first (click its row).", title="Nothing selected")
    try:
        lab.store.set_baseline(run_ids[0])
    except RunNotFound:
        raise user_error(f"no run {shown(run_ids[0])} — it may have been deleted", title="No baseline") from None
    return f"Pinned `{run_ids[0]}` as the baseline: it is drawn and compared with every selection."


def unpin_baseline(lab) -> str:
    lab.store.set_baseline(None)
    return "No baseline pinned."


_EXPORTS: tempfile.TemporaryDirectory | None = None
_EXPORTS_LOCK = threading.Lock()


def export_csv(lab, tag: str | None, dataset: str | None, model: str | None, status: str | None):
    """The listed (filtered) runs with their metrics as a CSV file, for the download box."""
    global _EXPORTS
    records, _ = lab.snapshot()
    v = look(lab, records, tag, dataset, model, status)
    now = time.time()
    rows = [compare.csv_row(r, test_scores(lab, r["run_id"]), v.notes[r["run_id"]].tags,
                            v.notes[r["run_id"]].note, r["run_id"] == v.baseline, now) for r in v.filtered]
    with _EXPORTS_LOCK:  # one folder for the page's life, removed at exit; Gradio serves its own cached copy
        if _EXPORTS is None:
            _EXPORTS = tempfile.TemporaryDirectory(prefix="resnet-lab-runs-")
        folder = Path(tempfile.mkdtemp(dir=_EXPORTS.name))
    return gr.File(value=str(compare.write_runs_csv(rows, folder / "runs.csv")), visible=True)


def select_update(choices: list | None, selected: list[str] | None):
    """The selector with new choices (a run came, went or changed status); the selection keeps the runs still
    listed."""
    choices = [tuple(c) for c in choices or []]
    known = {value for _, value in choices}
    return gr.Dropdown(choices=choices, value=[rid for rid in selected or [] if rid in known])


def on_row_select(selected: list[str] | None, evt: gr.SelectData):
    """Clicking a row toggles that run in the selection."""
    row = evt.row_value or []
    run_id = row[0] if row else None
    selected = list(selected or [])
    if not run_id:
        return gr.skip()
    if run_id in selected:
        selected.remove(run_id)
    else:
        selected.append(run_id)
    return gr.Dropdown(value=selected)


def cancel_runs(lab, run_ids: list[str] | None) -> str:
    run_ids = run_ids_arg(run_ids, title="Nothing cancelled")
    if not run_ids:
        raise user_error("Select one or more runs first (click their rows).", title="Nothing selected")
    try:
        client = lab.client()
    except QueueUnavailable as exc:
        raise user_error(str(exc), title="Queue unavailable") from None
    done, skipped = [], []
    for run_id in run_ids:
        try:
            record = client.run(run_id)
        except (RunNotFound, QueueUnavailable):
            skipped.append(f"`{run_id}` (not found)")
            continue
        if record.get("status") not in ("queued", "running"):
            skipped.append(f"`{run_id}` (already {record.get('status')})")
            continue
        try:
            client.cancel(run_id)
        except QueueUnavailable as exc:
            raise user_error(str(exc), title="Queue unavailable") from None
        except RunNotFound as exc:  # its folder is gone, or damaged (the message says what to do)
            skipped.append(f"`{run_id}` ({fmt.md_escape(exc)})")
            continue
        done.append(run_id)
    parts = []
    if done:
        parts.append(f"Cancel requested for {len(done)} run{'s' if len(done) != 1 else ''}: running ones stop "
                     "within one batch and keep their last finished epoch.")
    if skipped:
        parts.append("Not cancelled: " + ", ".join(skipped) + ".")
    return " ".join(parts)


def ask_delete(ui: RunsUI, run_ids: list[str] | None) -> dict:
    if not run_ids:
        raise user_error("Select one or more runs first (click their rows).", title="Nothing selected")
    n = len(run_ids)
    text = (f"**Delete {n} run{'s' if n != 1 else ''} and all {'their' if n != 1 else 'its'} files** "
            "(checkpoints, metrics, figures)? This cannot be undone.")
    return {ui.confirm_row: gr.Row(visible=True), ui.confirm_text: text}


def delete_runs(lab, ui: RunsUI, run_ids: list[str] | None) -> dict:
    """Delete the selected runs with their folders (a running one is refused: cancel it first); the selection
    keeps the runs that were not deleted."""
    if not run_ids:
        return {ui.confirm_row: gr.Row(visible=False), ui.message: ""}
    try:
        client = lab.client()
    except QueueUnavailable as exc:
        raise user_error(str(exc), title="Queue unavailable") from None
    deleted, refused = [], []
    for run_id in run_ids:
        try:
            client.delete(run_id)
            deleted.append(run_id)
        except RunNotFound:
            # already gone from disk: drop a stale registry record too
            try:
                client.registry.delete(run_id)
            except Exception:  # noqa: BLE001 - best effort; the next resync settles it
                pass
            deleted.append(run_id)
        except ValueError as exc:  # running: cancel first
            refused.append(f"`{run_id}`: {fmt.md_escape(exc)}")
        except Exception as exc:  # noqa: BLE001 - Redis dropped mid-way: say so, the folder may be gone already
            log.warning("delete of %s failed: %s", run_id, exc)
            refused.append(f"`{run_id}`: could not reach the queue — try again")
    parts = []
    if deleted:
        parts.append(f"Deleted {len(deleted)} run{'s' if len(deleted) != 1 else ''}.")
    if refused:
        parts.append("Not deleted: " + "; ".join(refused))
    remaining = [rid for rid in run_ids if rid not in deleted]
    return {ui.confirm_row: gr.Row(visible=False), ui.message: " ".join(parts), ui.select: gr.Dropdown(value=remaining)}


def clone_run(lab, run_ids: list[str] | None, *, form: dict[str, gr.components.Component], data_dir: gr.Dropdown,
              tabs: gr.Tabs) -> dict:
    """Fill the Train form (`form`: its fields by name) from the first selected run's config, pick the run's
    dataset and switch to the Train tab."""
    if not run_ids:
        raise user_error("Select a run to clone (click its row).", title="Nothing selected")
    run_id = run_ids[0]
    try:
        config = lab.store.config(run_id).to_dict()
    except RunNotFound:
        config = (lab.record(run_id) or {}).get("config") or {}
    except Exception as exc:  # noqa: BLE001 - a damaged config.json: say which run
        raise user_error(f"cannot read the settings of run {run_id}: {exc}", title="Cannot clone") from None
    if not config:
        raise user_error(f"run {run_id} has no saved settings", title="Cannot clone")
    values = train_tab.config_to_form(config)
    out = {form[name]: value for name, value in values.items() if name in form}
    if config.get("data_dir"):
        out[data_dir] = config["data_dir"]
    gr.Info(f"The Train form now holds the settings of {run_id}; change what you like and queue.")
    return {**out, tabs: gr.Tabs(selected="train")}


# --- API ----------------------------------------------------------------------------------------------------

def wire(lab, ui: RunsUI, *, timer: gr.Timer, banner: gr.Markdown, active_tab: gr.State, tab: gr.Tab,
         train_ui, data_dir: gr.Dropdown, tabs: gr.Tabs) -> None:
    outputs = {ui.table, ui.choices, ui.curves_note, ui.loss_plot, ui.acc_plot, ui.detail, banner, ui.state,
               ui.page_info, ui.filter_choices, ui.compare_note, ui.compare_table, ui.sweep}
    view_inputs = [ui.select, ui.split, ui.tag, ui.dataset, ui.model, ui.status, ui.page, ui.sweep_open]
    timer.tick(partial(tick, lab, ui, banner), [*view_inputs, active_tab, ui.state], outputs,
               api_visibility="private", show_progress="hidden", trigger_mode="once", concurrency_limit=None)
    # The timer reads the selector and the filters, so it must not write them, not even gr.skip(): Gradio 6.31
    # keeps every session copy of a component that an event both reads and updates (BENCHMARKS.md item 7: ~4 KB a
    # tick for as long as the page is open). Their choices go to States; they follow only when those change (a
    # State's `change` fires on a new value).
    ui.choices.change(select_update, [ui.choices, ui.select], ui.select, api_visibility="private",
                      show_progress="hidden")
    ui.filter_choices.change(filters_update, [ui.filter_choices, ui.tag, ui.dataset, ui.model],
                             [ui.tag, ui.dataset, ui.model], api_visibility="private", show_progress="hidden")

    def refresh_now(selected, split, tag, dataset, model, status, page, sweep_open, state):
        return tick(lab, ui, banner, selected, split, tag, dataset, model, status, page, sweep_open, "runs", state,
                    force=True)

    refresh = dict(fn=refresh_now, inputs=[*view_inputs, ui.state], outputs=outputs,
                   api_visibility="private", show_progress="hidden")
    fields = dict(fn=partial(annotation_fields, lab), inputs=ui.select, outputs=[ui.tags_box, ui.note_box],
                  api_visibility="private", show_progress="hidden")
    # .input, not .change: the timer itself rewrites the selector, which must not trigger another refresh
    gr.on([tab.select, ui.split.input, ui.tag.input, ui.dataset.input, ui.model.input, ui.status.input,
           ui.page.input], trigger_mode="always_last", **refresh)
    # the tag and note boxes first (a quick read), so they are filled before the user starts typing there
    ui.select.input(**fields).then(**refresh)
    ui.sweep_box.expand(lambda: True, None, ui.sweep_open, api_visibility="private", queue=False).then(**refresh)
    ui.sweep_box.collapse(lambda: False, None, ui.sweep_open, api_visibility="private", queue=False)
    ui.table.select(on_row_select, ui.select, ui.select, api_visibility="private",
                    show_progress="hidden").then(**fields).then(**refresh)
    ui.cancel_btn.click(partial(cancel_runs, lab), ui.select, ui.message, api_visibility="private").then(**refresh)
    ui.delete_btn.click(partial(ask_delete, ui), ui.select, {ui.confirm_row, ui.confirm_text},
                        api_visibility="private")
    ui.abort_btn.click(lambda: gr.Row(visible=False), None, ui.confirm_row, api_visibility="private")
    ui.confirm_btn.click(partial(delete_runs, lab, ui), ui.select, {ui.confirm_row, ui.message, ui.select},
                         api_visibility="private").then(**refresh)
    ui.clone_btn.click(partial(clone_run, lab, form=train_ui.fields, data_dir=data_dir, tabs=tabs), ui.select,
                       {*train_ui.fields.values(), data_dir, tabs}, api_visibility="private")
    ui.annotate_btn.click(partial(save_annotations, lab), [ui.select, ui.tags_box, ui.note_box], ui.message,
                          api_visibility="private").success(**refresh)
    ui.baseline_btn.click(partial(pin_baseline, lab), ui.select, ui.message, api_visibility="private").success(
        **refresh)
    ui.unpin_btn.click(partial(unpin_baseline, lab), None, ui.message, api_visibility="private").success(**refresh)
    ui.export_btn.click(partial(export_csv, lab), [ui.tag, ui.dataset, ui.model, ui.status], ui.export_file,
                        api_name="export_runs")

    def run_status() -> list[dict]:
        """All runs, newest first, as small dicts: run_id, status, model, lr, batch_size, epochs, progress (0..1),
        phase, epoch, best_val_acc, best_epoch, duration_s, worker, error, created, finished."""
        records, problem = lab.snapshot()
        if problem:
            raise user_error(problem, title="Queue unavailable")
        now = time.time()
        return [view.run_summary(r, now) for r in records]

    def run_curves(run_ids: list[str]) -> dict:
        """Epoch records (epoch, train_loss, train_acc, val_loss, val_acc, lr, ...) for each run id."""
        out = {}
        for run_id in run_ids_arg(run_ids):
            try:
                out[run_id] = history_of(lab, lab.record(run_id))
            except RunNotFound:
                raise user_error(f"no run {shown(run_id)} — run ids are listed by /run_status", title="Unknown run") \
                    from None
        return out

    def cancel(run_ids: list[str]) -> str:
        """Cancel queued or running runs; returns what was done."""
        return cancel_runs(lab, run_ids)

    gr.api(run_status, api_name="run_status", concurrency_limit=None)
    gr.api(run_curves, api_name="run_curves", concurrency_limit=None)
    gr.api(cancel, api_name="cancel_runs")
