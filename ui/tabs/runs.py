"""Runs tab: every run in one table, refreshed by a timer; live loss/accuracy curves of the selected runs on
one chart; cancel, delete (with its files) and clone-into-the-Train-form.

The timer handler sends only what changed: the table when a row changed, the plots when a selected run gained
an epoch, the banner when Redis went away or came back. Everything else answers `gr.skip()`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from shared.runs.store import RunNotFound, read_metrics

from .. import formatting as fmt
from .. import runs_view as view
from ..client import QueueUnavailable
from . import train as train_tab
from . import park_plot_props, plot_props_step, run_ids_arg, shown, user_error

log = logging.getLogger(__name__)

HELP = ("All runs, newest first, refreshed every 2 seconds. Click rows (or use the selector) to compare their "
        "curves, then cancel, delete or clone them into the Train form.")
# Runs whose curves are drawn when nothing is selected: the newest few that have at least one epoch.
DEFAULT_CURVES = 4
MAX_CURVES = 12


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
    loss_plot: gr.LinePlot
    acc_plot: gr.LinePlot
    detail: gr.Markdown
    state: gr.State
    choices: gr.State  # the selector's choices; the selector follows it (see wire)


def build(lab) -> RunsUI:
    gr.Markdown(HELP, elem_classes="help")
    table = gr.Dataframe(headers=view.RUN_COLUMNS, value=pd.DataFrame(columns=view.RUN_COLUMNS), interactive=False,
                         elem_id="runs-table", max_height=420, wrap=False, label="Runs", show_label=False)
    with gr.Row(elem_classes="toolbar"):
        select = gr.Dropdown(choices=[], value=[], multiselect=True, label="Selected runs", elem_id="runs-select",
                             info="Curves, cancel, delete and clone apply to these.", scale=4)
        cancel_btn = gr.Button("Cancel", elem_id="cancel-btn", scale=0, min_width=110)
        delete_btn = gr.Button("Delete…", variant="stop", elem_id="delete-btn", scale=0, min_width=110)
        clone_btn = gr.Button("Clone into Train form", elem_id="clone-btn", scale=0, min_width=230)
    with gr.Row(visible=False, elem_id="delete-confirm", elem_classes="toolbar") as confirm_row:
        confirm_text = gr.Markdown()
        confirm_btn = gr.Button("Yes, delete", variant="stop", elem_id="delete-confirm-btn", scale=0, min_width=160)
        abort_btn = gr.Button("Keep them", elem_id="delete-abort-btn", scale=0, min_width=140)
    message = gr.Markdown(elem_id="runs-message")
    detail = gr.Markdown(elem_id="run-detail")
    with gr.Row(elem_classes="toolbar"):
        curves_note = gr.Markdown(elem_id="curves-note")
        split = gr.Radio([("Both", "both"), ("Validation", "val"), ("Training", "train")], value="both",
                         show_label=False, elem_id="curves-split", scale=0, min_width=340, container=False)
    # epochs are categories up to view.CATEGORICAL_EPOCHS (whole-number ticks only), sorted by EPOCH_ORDER; a
    # category axis averages a run's points per epoch (y_aggregate), so an epoch logged twice is not summed
    axis = dict(x="epoch", y="value", color="run", x_title="epoch", x_axis_format="d", sort=view.EPOCH_ORDER,
                y_aggregate="mean", height=340, tooltip="all")
    with gr.Row(elem_id="curves"):
        loss_plot = gr.LinePlot(title="Loss", y_title="loss", elem_id="curves-loss", **axis)
        acc_plot = gr.LinePlot(title="Accuracy", y_title="accuracy", y_lim=[0, 1], elem_id="curves-acc", **axis)
    state = gr.State({})
    return RunsUI(table, select, cancel_btn, delete_btn, clone_btn, confirm_row, confirm_text, confirm_btn,
                  abort_btn, message, curves_note, split, loss_plot, acc_plot, detail, state, gr.State([]))


# --- data ---------------------------------------------------------------------------------------------------

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


def _curve_runs(records: list[dict], selected: list[str]) -> list[dict]:
    by_id = {r["run_id"]: r for r in records}
    if selected:
        return [by_id[rid] for rid in selected if rid in by_id][:MAX_CURVES]
    started = [r for r in records if r.get("status") in ("running", "succeeded") or r.get("started")]
    return started[:DEFAULT_CURVES]


def curves(lab, records: list[dict], selected: list[str], split: str = "both") -> tuple[str, Any, Any, tuple]:
    """(note, loss frame, accuracy frame, signature) for the selected runs (or the newest ones).

    The signature's first two items (split, runs) name the plotted series: the plots' caption is made of them."""
    chosen = _curve_runs(records, selected)
    histories = {}
    ended = []  # why finished runs without a single epoch will never have curves
    for record in chosen:
        histories[view.curve_label(record)] = history = history_of(lab, record)
        reason = None if history else view.no_curves_reason(record)
        if reason:
            ended.append(reason)
    sig = (split, tuple(histories)) + tuple((len(h), h[-1].get("epoch") if h else None) for h in histories.values())
    loss, acc = view.curves_frame(histories, split)
    which = {"val": " (validation)", "train": " (training)"}.get(split, "")
    if not records:
        note = "No runs yet — queue some on the **Train** tab."
    elif not chosen:
        note = "No run has started yet; curves appear after the first epoch."
    elif loss.empty and len(ended) == len(chosen):
        note = ""  # none of them will ever have curves: the reasons below say why
    elif loss.empty:
        note = "Waiting for the first epoch to finish…"
    elif selected:
        note = f"Curves of the {len(chosen)} selected run{'s' if len(chosen) != 1 else ''}{which}."
    else:
        note = (f"Curves of the {len(chosen)} newest run{'s' if len(chosen) != 1 else ''}{which} — select runs "
                "above to compare others.")
    recalls = [line for line in (view.recall_text(label, h) for label, h in histories.items()) if line]
    text = " ".join(part for part in (note, *ended) if part)
    return "\n\n".join(part for part in (text, *recalls) if part), loss, acc, sig


def banner_update(problem: str | None):
    text = view.banner_text(problem)
    return gr.Markdown(value=text, visible=bool(text))


# --- handlers -----------------------------------------------------------------------------------------------

def tick(lab, ui: RunsUI, banner: gr.Markdown, selected: list[str] | None, split: str, active_tab: str,
         state: dict | None, force: bool = False) -> dict:
    """Timer handler: banner always; table, selector choices, curves only on the Runs tab and only when changed.
    The choices go into a State that the selector follows (see `wire`). Outputs left out of the dict are not sent."""
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
    rows = [view.run_row(r, now) for r in records]
    if force or state.get("rows") != rows:
        out[ui.table] = pd.DataFrame(rows, columns=view.RUN_COLUMNS)
        state["rows"] = rows
    choices = [(f"{view.run_label(r)} ({r.get('status')})", r["run_id"]) for r in records]
    if force or state.get("choices") != choices:
        out[ui.choices] = choices
        state["choices"] = choices
    out.update(_curve_outputs(lab, ui, records, selected, split or "both", state, force))
    detail = view.detail_text(records, selected[:MAX_CURVES], now)
    if force or state.get("detail") != detail:
        out[ui.detail] = detail
        state["detail"] = detail
    return out


def _curve_outputs(lab, ui: RunsUI, records: list[dict], selected: list[str], split: str, state: dict,
                   force: bool) -> dict:
    """The curves' note and frames when they changed (their caption and axis are parked in `state`)."""
    note, loss, acc, sig = curves(lab, records, selected, split)
    if not force and state.get("curves") == (sig, note):
        return {}
    top = view.robust_upper(list(loss["value"]))
    if top is not None:
        worst = loss.loc[loss["value"].idxmax()]
        note += (f" The loss axis stops at {top:.2f}: {fmt.md_escape(worst['run'])} reached {worst['value']:.3g} "
                 f"at epoch {int(worst['epoch'])}.")
    state["curves"] = (sig, note)
    caption = view.curves_caption(sig[0], sig[1])
    park_plot_props(state, "loss", caption=caption, y_lim=[0, top] if top is not None else None)
    park_plot_props(state, "acc", caption=caption)
    loss, acc = view.epochs_as_categories(loss, acc)
    return {ui.curves_note: note, ui.loss_plot: loss, ui.acc_plot: acc}


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
    outputs = {ui.table, ui.choices, ui.curves_note, ui.loss_plot, ui.acc_plot, ui.detail, banner, ui.state}
    # after new curve data, the plots' caption / axis (see ui/tabs/__init__.py: why it takes two steps)
    plots = {"loss": ui.loss_plot, "acc": ui.acc_plot}
    props = dict(fn=lambda st: plot_props_step(st, plots, ui.state), inputs=ui.state,
                 outputs={*plots.values(), ui.state}, api_visibility="private", show_progress="hidden")
    timer.tick(partial(tick, lab, ui, banner), [ui.select, ui.split, active_tab, ui.state], outputs,
               api_visibility="private", show_progress="hidden", trigger_mode="once",
               concurrency_limit=None).then(**props)
    # The timer reads the selector, so it must not write it, not even gr.skip(): Gradio 6.31 keeps every session
    # copy of a component that an event both reads and updates (BENCHMARKS.md item 7: ~4 KB a tick for as long as
    # the page is open). The choices go to a State; the selector follows only when they change (a State's
    # `change` fires on a new value).
    ui.choices.change(select_update, [ui.choices, ui.select], ui.select, api_visibility="private",
                      show_progress="hidden")

    def refresh_now(selected, split, state):
        return tick(lab, ui, banner, selected, split, "runs", state, force=True)

    refresh = dict(fn=refresh_now, inputs=[ui.select, ui.split, ui.state], outputs=outputs,
                   api_visibility="private", show_progress="hidden")
    # .input, not .change: the timer itself rewrites the selector, which must not trigger another refresh
    gr.on([tab.select, ui.select.input, ui.split.input], trigger_mode="always_last", **refresh).then(**props)
    ui.table.select(on_row_select, ui.select, ui.select, api_visibility="private",
                    show_progress="hidden").then(**refresh).then(**props)
    ui.cancel_btn.click(partial(cancel_runs, lab), ui.select, ui.message, api_visibility="private").then(
        **refresh).then(**props)
    ui.delete_btn.click(partial(ask_delete, ui), ui.select, {ui.confirm_row, ui.confirm_text},
                        api_visibility="private")
    ui.abort_btn.click(lambda: gr.Row(visible=False), None, ui.confirm_row, api_visibility="private")
    ui.confirm_btn.click(partial(delete_runs, lab, ui), ui.select, {ui.confirm_row, ui.message, ui.select},
                         api_visibility="private").then(**refresh).then(**props)
    ui.clone_btn.click(partial(clone_run, lab, form=train_ui.fields, data_dir=data_dir, tabs=tabs), ui.select,
                       {*train_ui.fields.values(), data_dir, tabs}, api_visibility="private")

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
