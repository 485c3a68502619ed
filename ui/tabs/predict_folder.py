"""Predict tab, "A folder on the worker": a whole folder of the data roots classified by the worker (the
`resnet_lab.predict_batch` task, as `resnet-lab predict --queue` sends it), so a thousand photos never tie up the
page's CPU; the CSV it writes into the run folder comes back here as a download.

The page only confines the folder, names the run and waits; the worker confines the folder again (its own data
roots) and reads every file.
"""

from __future__ import annotations

import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from shared.data.paths import PathError, confine_path, roots_text

from .. import formatting as fmt
from ..client import QueueUnavailable
from . import user_error

POLL_S = 1.0
# a worker busy training takes the batch after its current run: wait about as long as a long run
WAIT_MAX_S = 4 * 3600
# what the worker names the CSV it writes into the run folder (worker/tasks.py predict_batch)
CSV_NAME = re.compile(r"predictions-\d{8}-\d{6}-\d{3}\.csv")


@dataclass
class FolderUI:
    folder: gr.Textbox
    button: gr.Button
    status: gr.Markdown
    csv: gr.File


def build(lab) -> FolderUI:
    with gr.Row(equal_height=False):
        folder = gr.Textbox(label="Or a folder in the data folders, classified by the worker (for many images)",
                            placeholder=f"e.g. {lab.settings.data_roots[0] / 'new-photos'}", max_length=4096,
                            elem_id="predict-folder", scale=2)
        with gr.Column():
            button = gr.Button("Classify folder on the worker", elem_id="predict-folder-btn")
            csv = gr.File(label="Folder predictions as CSV", interactive=False, elem_id="predict-folder-csv",
                          height=90)
    status = gr.Markdown(elem_id="predict-folder-status")
    return FolderUI(folder, button, status, csv)


def _run_id(lab, model: str | None, latest: str, hint: str) -> str:
    """The finished run `model` names ("latest" → the newest); one message for missing and not allowed."""
    if model in (None, "", latest):
        run_id = lab.store.latest_succeeded()
        if run_id is None:
            raise user_error("No model yet: no run has finished. Train one on the Train tab first.",
                             title="No model yet")
        return run_id
    if isinstance(model, str) and model in {r["run_id"] for r in lab.succeeded_runs()}:
        return model
    raise user_error(f"No such model — {hint}.", title="Model not available")


def _folder(lab, text) -> Path:
    """The folder `text` names inside the data roots; one message for outside, missing and not a folder."""
    if not isinstance(text, str) or not text.strip():
        raise user_error("Type the path of a folder inside the data folders.", title="No folder")
    try:
        folder = confine_path(text, lab.settings.data_roots)
    except PathError:
        folder = None
    if folder is None or not folder.is_dir():
        raise user_error(f"{text.strip()[:200]!r} is not a folder inside the data folders "
                         f"({roots_text(lab.settings.data_roots)}) — give a folder there that holds the images "
                         "(its sub-folders are read too).", title="Folder not available")
    return folder


def classify_folder(lab, ui: FolderUI, folder_text, model, *, latest: str, hint: str, csv_folder):
    """Send the folder to the worker, say how far it got while it works, then offer its CSV."""
    folder = _folder(lab, folder_text)
    run_id = _run_id(lab, model, latest, hint)
    try:
        task_id = lab.client().submit_predict_batch(run_id, [str(folder)])
    except QueueUnavailable as exc:
        raise user_error(str(exc), title="Queue not reachable") from None
    result = lab.client().celery.AsyncResult(task_id)
    yield {ui.status: f"Sent {fmt.md_code(folder.name)} to the queue (run `{run_id}`); waiting for a worker — one busy "
                      "training takes it after its current run.", ui.csv: None}
    said, deadline = None, time.monotonic() + WAIT_MAX_S
    while not result.ready():
        if time.monotonic() > deadline:
            raise user_error("No worker took the folder in 4 hours — is a worker running? The task stays queued; "
                             "its CSV will land in the run folder.", title="Still waiting")
        info = result.info if result.state == "PROGRESS" else None
        if isinstance(info, dict) and (info.get("done"), info.get("total")) != said:
            said = (info.get("done"), info.get("total"))
            yield {ui.status: f"The worker is classifying {fmt.md_code(folder.name)}: {said[0]} of {said[1]} images."}
        time.sleep(POLL_S)
    if result.failed():
        # the worker's own message names the problem (a folder outside its data roots, no image in it)
        raise user_error(str(result.result)[:500], title="The worker could not classify the folder")
    answer = result.result
    name = Path(str(answer.get("path", ""))).name
    if not CSV_NAME.fullmatch(name):
        raise user_error("The worker's answer names no predictions file — see the worker's log.",
                         title="No predictions")
    # the run folder is read through the store (confined), never through the path the answer carries
    source = lab.store.path(run_id) / name
    target = csv_folder() / "predictions.csv"
    shutil.copyfile(source, target)
    errors = f", {answer['errors']} could not be read (see the error column)" if answer.get("errors") else ""
    yield {ui.status: f"Classified {answer['count']} images of {fmt.md_code(folder.name)} with run `{run_id}`{errors}.",
           ui.csv: str(target)}
