"""Train tab, "Find learning rate": the learning-rate range test (`shared.training.lr_find`) for the form's
settings, run by a worker (the `resnet_lab.lr_find` task), never in the page's process.

The button sends the task and returns at once; a timer of its own, on only while a test is pending, polls the
result: `<models>/lr-find/<job>.json` (one schema: `load_result`) and its plot `<job>.png`, which the file route
serves (ui/guard.py). "Use it" puts the suggestion into the form's learning rates. The form's values are checked
here as for queueing runs (`train.lr_find_config`), and again by the worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import gradio as gr

from shared.training.config import ConfigError, TrainConfig
from shared.training.lr_result import load_result, result_paths

from .. import formatting as fmt
from ..train_view import form_params
from ..client import EvaluationPending, QueueUnavailable
from . import shown, user_error

POLL_S = 1.5
NO_JOB = "no range test {} — press Find learning rate to start one"


@dataclass(eq=False)  # hashable by identity: it sits among components in TrainUI
class LrFindUI:
    button: gr.Button
    note: gr.Markdown
    plot: gr.Image
    use_btn: gr.Button
    job: gr.State
    suggestion: gr.State
    timer: gr.Timer


def build() -> LrFindUI:
    """The button, its note, and the plot with "Use it" (hidden until a result is in)."""
    button = gr.Button("Find learning rate", size="sm", elem_id="lr-find-btn")
    note = gr.Markdown(elem_id="lr-find-note", elem_classes="help")
    # no label: it would sit on the plot's legend; the axes and the note say what it is
    plot = gr.Image(label="Loss against learning rate", show_label=False, type="filepath", interactive=False,
                    visible=False, height=260, elem_id="lr-find-plot")
    use_btn = gr.Button("Use it", size="sm", visible=False, elem_id="lr-find-use")
    return LrFindUI(button, note, plot, use_btn, gr.State(None), gr.State(None), gr.Timer(POLL_S, active=False))


# --- the job -------------------------------------------------------------------------------------------------

def start(lab, config: TrainConfig) -> str:
    """Send the range test; its job id at once."""
    try:
        return lab.client().submit_lr_find(config)
    except QueueUnavailable as exc:
        raise user_error(str(exc), title="Queue unavailable") from None
    except EvaluationPending as exc:
        raise user_error(str(exc), title="Already running") from None


def job_status(lab, job) -> dict:
    """Where range test `job` is: {"status": "queued"}, {"status": "running", "phase", "done", "total"},
    {"status": "failed", "error"} or {"status": "done", "plot", + the saved result}. One message for an id that is
    malformed, never sent by this page, or forgotten."""
    try:
        json_path, plot_path = result_paths(lab.settings.models_dir, job)
        record = load_result(json_path)
    except ConfigError:
        raise user_error(NO_JOB.format(shown(job)), title="Unknown range test") from None
    except ValueError as exc:
        raise user_error(str(exc), title="Unusable result") from None
    if record is not None:
        return {"status": "done", **record, "plot": str(plot_path) if plot_path.is_file() else None}
    try:
        task = lab.client().lr_find_task(job)
        state = task.state if task is not None else None
    except QueueUnavailable as exc:
        raise user_error(str(exc), title="Queue unavailable") from None
    if state is None:
        raise user_error(NO_JOB.format(shown(job)), title="Unknown range test")
    if state == "FAILURE":
        return {"status": "failed", "error": str(task.result)[:500]}
    if state == "SUCCESS":  # its files were pruned since (the newest ones are kept)
        return {"status": "failed", "error": "its result was removed (only the newest are kept) — run it again"}
    if state in ("STARTED", "PROGRESS"):
        info = task.info if isinstance(task.info, dict) else {}
        return {"status": "running", **{k: info.get(k) for k in ("phase", "done", "total")}}
    return {"status": "queued"}


def status_text(status: dict) -> str:
    if status["status"] == "queued":
        return "Range test queued — waiting for a worker (one busy training takes it after its current run)…"
    if status["status"] == "running":
        steps = (f": step {status['done']} of {status['total']}" if status.get("phase") == "range test"
                 else ": preparing the images")
        return f"Running the range test{steps}…"
    if status["status"] == "failed":
        return f"⚠ The range test failed: {fmt.md_escape(status['error'])}"
    share = status["steps"] / max(status["steps_per_epoch"], 1)
    epochs = f"{share:.2f} of an epoch" if share < 1 else f"{share:.3g} epochs: a small dataset"
    return (f"Suggested learning rate: **{fmt.fmt_lr(rounded(status['suggestion']))}** (at the lowest smoothed "
            f"loss) — {status['steps']} steps ({epochs}) of {fmt.md_escape(status['model'])} at batch "
            f"{status['batch_size']}, {status['image_size']} px, in {status['seconds']:.0f} s.")


def rounded(lr: float) -> float:
    """Two significant digits: the test's resolution is far coarser."""
    return float(f"{lr:.2g}")


# --- handlers ------------------------------------------------------------------------------------------------

def on_start(lab, ui: LrFindUI, config_of: Callable[[dict], TrainConfig], data_dir, **values) -> dict:
    job = start(lab, config_of(form_params(values, data_dir)))
    return {ui.job: job, ui.suggestion: None, ui.note: status_text({"status": "queued"}),
            ui.plot: gr.Image(value=None, visible=False), ui.use_btn: gr.Button(visible=False),
            ui.timer: gr.Timer(active=True)}


def on_tick(lab, ui: LrFindUI, job) -> dict:
    if not job:
        return {ui.timer: gr.Timer(active=False)}
    try:
        status = job_status(lab, job)
    except gr.Error as exc:
        return {ui.note: f"⚠ {fmt.md_escape(exc.message)}", ui.timer: gr.Timer(active=False)}
    out = {ui.note: status_text(status)}
    if status["status"] in ("done", "failed"):
        out[ui.timer] = gr.Timer(active=False)
    if status["status"] == "done":
        lr = fmt.fmt_lr(rounded(status["suggestion"]))
        out.update({ui.plot: gr.Image(value=status["plot"], visible=status["plot"] is not None),
                    ui.suggestion: lr, ui.use_btn: gr.Button(f"Use {lr} (replaces the ticked rates)", visible=True)})
    return out


def wire(lab, ui: LrFindUI, *, form: dict, data_dir: gr.Dropdown, config_of: Callable[[dict], TrainConfig]) -> None:
    """`form`: the Train form's fields by name; `config_of(params)`: the one config a range test runs on (checked
    as for queueing runs; raises gr.Error)."""
    private = dict(api_visibility="private")
    ui.button.click(partial(on_start, lab, ui, config_of), inputs=[data_dir], inputs_kwargs=dict(form),
                    outputs=[ui.job, ui.suggestion, ui.note, ui.plot, ui.use_btn, ui.timer], concurrency_limit=2,
                    **private)
    ui.timer.tick(partial(on_tick, lab, ui), ui.job, [ui.note, ui.plot, ui.suggestion, ui.use_btn, ui.timer],
                  show_progress="hidden", **private)
    ui.use_btn.click(lambda lr: ([], lr), ui.suggestion, [form["lrs"], form["lrs_custom"]], queue=False, **private)

    def find_lr(params: dict) -> dict:
        """Start a learning-rate range test on a worker and return at once: {"job", "status": "queued"}.

        params: as for /submit_runs, for one model at one batch size (the learning rates are ignored). Poll
        /lr_find_result with the job.
        """
        return {"job": start(lab, config_of(params)), "status": "queued"}

    def lr_find_result(job: str) -> dict:
        """Where a range test is: {"status": "queued" | "running" | "failed" (with "error") | "done"}; done adds
        "suggestion", "lrs", "losses", "steps", "steps_per_epoch", "seconds", the settings it ran with and "plot"
        (a PNG the page serves)."""
        return job_status(lab, job)

    gr.api(find_lr, api_name="find_lr", concurrency_limit=2)
    gr.api(lr_find_result, api_name="lr_find_result", concurrency_limit=4)
