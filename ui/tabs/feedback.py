"""Predict tab: "Wrong — it is X" / "add to the dataset" (issue 16).

The photo on the Predict tab (an upload, a paste or a webcam shot) is copied into the inbox of the answering run's
dataset, `.resnet-lab/inbox/<class>/<sha256>.<ext>` (`shared.data.overrides.add_to_inbox`); nothing enters a class
folder until the user confirms it here, and then it is copied in with its content hash recorded. The class comes
from the page, so it is checked against the dataset's class folders (no `..`, `/`, empty or unknown names).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from shared.analysis.predict import NoModelError, resolve_run
from shared.data.overrides import add_to_inbox, confirm_inbox, list_inbox
from shared.data.scan import DatasetError, scan_dataset
from shared.runs.store import RunNotFound

from .. import formatting as fmt
from ..paths import PathError, confine_dataset_path
from . import client_file, user_error

log = logging.getLogger(__name__)

INBOX_COLUMNS = ["class", "file"]


@dataclass(eq=False)
class FeedbackUI:
    label: gr.Dropdown
    add_btn: gr.Button
    note: gr.Markdown
    inbox: gr.Dataframe
    waiting: gr.Dropdown
    confirm_btn: gr.Button


def build() -> FeedbackUI:
    with gr.Accordion("Wrong? Add this photo to the dataset", open=False, elem_id="feedback-panel"):
        gr.Markdown("Pick the right class and add the photo to the inbox of the model's dataset; it joins the class "
                    "folder only when you confirm it below (then the next run trains on it).", elem_classes="help")
        with gr.Row(elem_classes="toolbar"):
            label = gr.Dropdown(choices=[], value=None, label="It is", elem_id="feedback-label", scale=2)
            add_btn = gr.Button("Wrong — it is this: add to inbox", elem_id="feedback-add", scale=1)
        note = gr.Markdown(elem_id="feedback-note")
        inbox = gr.Dataframe(headers=INBOX_COLUMNS, interactive=False, label="Waiting in the inbox",
                             elem_id="feedback-inbox", max_height=220)
        with gr.Row(elem_classes="toolbar"):
            waiting = gr.Dropdown(choices=[], value=None, label="Photo to confirm", elem_id="feedback-waiting",
                                  scale=2)
            confirm_btn = gr.Button("Confirm: copy into its class folder", elem_id="feedback-confirm", scale=1)
    return FeedbackUI(label, add_btn, note, inbox, waiting, confirm_btn)


def _dataset(lab, model) -> tuple[str, Path]:
    """(run id, its dataset folder confined to the data roots) for the Predict tab's model choice."""
    if model is not None and (not isinstance(model, str) or len(model) > 120):
        raise user_error("No such model — pick one from the list.", title="Model not available")
    try:
        run_id = resolve_run(lab.store, model or "latest")
        data_dir = lab.store.config(run_id).data_dir
        return run_id, confine_dataset_path(data_dir, lab.settings.data_roots)
    except (NoModelError, RunNotFound):
        raise user_error("No finished run to add photos for — train one first.", title="No model") from None
    except PathError as exc:
        raise user_error(str(exc), title="Folder not allowed") from None
    except Exception:  # noqa: BLE001 - a damaged config.json
        raise user_error("cannot read the settings of the chosen run", title="Unknown run") from None


def _inbox_outputs(ui: FeedbackUI, root: Path) -> dict:
    waiting = list_inbox(root)
    return {ui.inbox: pd.DataFrame([[w["label"], w["file"]] for w in waiting], columns=INBOX_COLUMNS),
            ui.waiting: gr.Dropdown(choices=[f"{w['label']}/{w['file']}" for w in waiting], value=None)}


def refresh(lab, ui: FeedbackUI, model) -> dict:
    """The dataset's classes and inbox for the chosen model (nothing when there is no model yet)."""
    try:
        _, root = _dataset(lab, model)
        classes = scan_dataset(root, link_roots=lab.settings.data_roots).classes
    except (gr.Error, DatasetError):
        return {ui.label: gr.Dropdown(choices=[], value=None)}
    return {ui.label: gr.Dropdown(choices=classes, value=None), **_inbox_outputs(ui, root)}


def add(lab, ui: FeedbackUI, image: Any, model, label) -> dict:
    if image is None:
        raise user_error("Drop, paste or shoot a photo first.", title="No photo")
    run_id, root = _dataset(lab, model)
    data, name = client_file(lab, image)
    with tempfile.TemporaryDirectory(prefix="resnet-lab-inbox-") as tmp:
        source = Path(tmp) / ("photo" + Path(str(name)).suffix.lower()[:6])
        source.write_bytes(data)
        try:
            copy = add_to_inbox(root, label, source, link_roots=lab.settings.data_roots)
        except DatasetError as exc:  # OverrideError: the class or the photo, with what is accepted
            raise user_error(str(exc), title="Not added") from None
    log.info("added %s to the inbox of %s (run %s)", copy.name, root, run_id)
    return {ui.note: f"Added to the inbox as **{fmt.md_escape(copy.parent.name)}** ({fmt.md_code(copy.name)}); "
                     "confirm it below to copy it into the class folder.", **_inbox_outputs(ui, root)}


def confirm(lab, ui: FeedbackUI, model, waiting) -> dict:
    _, root = _dataset(lab, model)
    if not isinstance(waiting, str) or "/" not in waiting:
        raise user_error("Pick a photo waiting in the inbox.", title="Nothing picked")
    label, name = waiting.split("/", 1)
    try:
        entry = confirm_inbox(root, label, name, link_roots=lab.settings.data_roots)
    except DatasetError as exc:
        raise user_error(str(exc), title="Not added") from None
    return {ui.note: f"Copied into the dataset as {fmt.md_code(entry['path'])}; the next run trains on it.",
            **_inbox_outputs(ui, root)}


def wire(lab, ui: FeedbackUI, *, image: gr.Image, model: gr.Dropdown, tab: gr.Tab) -> None:
    outputs = {ui.label, ui.inbox, ui.waiting}
    private = dict(api_visibility="private")
    tab.select(partial(refresh, lab, ui), model, outputs, show_progress="hidden", **private)
    model.input(partial(refresh, lab, ui), model, outputs, show_progress="hidden", **private)
    # preprocess=False: the photo is read through lab.files (ui/guard.py), as the prediction reads it
    ui.add_btn.click(partial(add, lab, ui), [image, model, ui.label], {ui.note, ui.inbox, ui.waiting},
                     preprocess=False, concurrency_limit=1, **private)
    ui.confirm_btn.click(partial(confirm, lab, ui), [model, ui.waiting], {ui.note, ui.inbox, ui.waiting},
                         concurrency_limit=1, **private)
