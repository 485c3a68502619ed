"""Find and fix bad data on the Results tab (issue 16): a confusion cell's test images, and the data-issues view.

- **Confusion cell**: pick a true and a predicted class (or a row of the most-confused pairs) → that cell's test
  images, most confident first, each with its Grad-CAM for the predicted class and its confidence. The images come
  from eval.json's per-image `predictions`; the files are read from the run's dataset, confined to the data roots.
- **Data issues**: queue `find_data_issues` on a worker (label errors, near-duplicates, outliers of the run's
  dataset), list the report, look at one suspect (photo and Grad-CAM), relabel or exclude it (the dataset's
  overrides file: `shared.data.overrides`), undo, list the changes, and retrain with the fixes (the run's settings,
  queued as a new run, whose split applies the overrides).

Everything the page sends (classes, files, run ids) is checked here and again by `shared.data.overrides`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import pandas as pd

from shared.analysis.data_issues import load_data_issues
from shared.analysis.eval_result import EvalResultError, load_eval_result
from shared.analysis.predict import NoModelError
from shared.data.images import ImageError, load_rgb
from shared.data.overrides import add_change, list_changes, undo_last
from shared.data.scan import DatasetError
from shared.runs.store import RunNotFound

from .. import formatting as fmt
from ..client import EvaluationPending, QueueFull, QueueUnavailable
from ..paths import PathError, confine_dataset_path
from . import user_error

log = logging.getLogger(__name__)

MAX_CELL_IMAGES = 24  # Grad-CAMs drawn in the page process per click
MAX_ISSUE_ROWS = 200
ISSUE_COLUMNS = ["#", "kind", "file", "given", "suggested", "score", "copy of"]
PAIR_COLUMNS = ["true", "predicted", "count"]
CHANGE_COLUMNS = ["when", "change", "file", "to", "state"]


@dataclass(eq=False)  # hashable by identity: it sits among components in ResultsUI
class CleanupUI:
    pairs: gr.Dataframe
    cell_true: gr.Dropdown
    cell_pred: gr.Dropdown
    cell_btn: gr.Button
    cell_note: gr.Markdown
    cell_gallery: gr.Gallery
    issues_btn: gr.Button
    issues_load: gr.Button
    issues_note: gr.Markdown
    issues: gr.Dataframe
    pick: gr.Dropdown
    photo: gr.Image
    cam: gr.Image
    relabel_to: gr.Dropdown
    relabel_btn: gr.Button
    exclude_btn: gr.Button
    undo_btn: gr.Button
    changes: gr.Dataframe
    retrain_btn: gr.Button
    fix_note: gr.Markdown


def build_cells() -> dict:
    """The click-through under the confusion matrix (inside the Results body)."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=2):
            pairs = gr.Dataframe(headers=PAIR_COLUMNS, interactive=False, label="Most-confused pairs (click one)",
                                 elem_id="confused-pairs", max_height=300)
        with gr.Column(scale=3):
            with gr.Row(elem_classes="toolbar"):
                cell_true = gr.Dropdown(choices=[], value=None, label="True class", elem_id="cell-true")
                cell_pred = gr.Dropdown(choices=[], value=None, label="Predicted as", elem_id="cell-pred")
                cell_btn = gr.Button("Show this cell's images", elem_id="cell-btn", scale=0, min_width=220)
            cell_note = gr.Markdown(elem_id="cell-note", elem_classes="help")
    cell_gallery = gr.Gallery(label="Test images of the cell, most confident first (Grad-CAM of the prediction)",
                              columns=6, height="auto", elem_id="cell-gallery", object_fit="contain")
    return dict(pairs=pairs, cell_true=cell_true, cell_pred=cell_pred, cell_btn=cell_btn, cell_note=cell_note,
                cell_gallery=cell_gallery)


def build_issues() -> dict:
    """The data-issues panel (inside the Results body)."""
    with gr.Accordion("Data issues: label errors, near-duplicates, outliers — relabel or exclude", open=False,
                      elem_id="issues-panel"):
        gr.Markdown("The run's frozen features judge every image of its dataset: cross-validated linear probes with "
                    "cleanlab's confident learning find likely label errors; near-identical pictures (resized or "
                    "re-compressed too) and atypical images are listed as well. Fixes go to an overrides file kept "
                    "with the dataset (`.resnet-lab/overrides.json`); the photos are never moved or deleted.",
                    elem_classes="help")
        with gr.Row(elem_classes="toolbar"):
            issues_btn = gr.Button("Find data issues (queued)", elem_id="issues-btn", scale=0, min_width=240)
            issues_load = gr.Button("Load the report", elem_id="issues-load", scale=0, min_width=180)
        issues_note = gr.Markdown(elem_id="issues-note")
        issues = gr.Dataframe(headers=ISSUE_COLUMNS, interactive=False, label="Suspects (click one)",
                              elem_id="issues-table", max_height=360)
        with gr.Row(equal_height=False):
            with gr.Column(scale=1):
                pick = gr.Dropdown(choices=[], value=None, label="Image", elem_id="issue-pick")
                relabel_to = gr.Dropdown(choices=[], value=None, label="It really is", elem_id="relabel-to")
                with gr.Row():
                    relabel_btn = gr.Button("Relabel", elem_id="relabel-btn", min_width=100)
                    exclude_btn = gr.Button("Exclude", elem_id="exclude-btn", min_width=100)
                    undo_btn = gr.Button("Undo last change", elem_id="undo-btn", min_width=140)
                retrain_btn = gr.Button("Retrain with these fixes", variant="primary", elem_id="retrain-btn")
                fix_note = gr.Markdown(elem_id="fix-note")
            photo = gr.Image(label="Photo", interactive=False, height=260, elem_id="issue-photo", scale=1)
            cam = gr.Image(label="Grad-CAM (layer 4) for the suggested class", interactive=False, height=260,
                           elem_id="issue-cam", scale=1)
        changes = gr.Dataframe(headers=CHANGE_COLUMNS, interactive=False, label="Changes to this dataset (newest "
                               "first)", elem_id="changes-table", max_height=260)
    return dict(issues_btn=issues_btn, issues_load=issues_load, issues_note=issues_note, issues=issues, pick=pick,
                photo=photo, cam=cam, relabel_to=relabel_to, relabel_btn=relabel_btn, exclude_btn=exclude_btn,
                undo_btn=undo_btn, changes=changes, retrain_btn=retrain_btn, fix_note=fix_note)


# --- shared checks --------------------------------------------------------------------------------------------

def _run_dir(lab, run_id) -> Path:
    if not isinstance(run_id, str) or not run_id or len(run_id) > 120:
        raise user_error("Pick a finished run first.", title="No run")
    try:
        return lab.store.path(run_id)
    except RunNotFound:
        raise user_error(f"no run {run_id[:80]!r}", title="Unknown run") from None


def _data_root(lab, run_id: str) -> Path:
    """The run's dataset folder, confined to the page's data roots."""
    try:
        data_dir = lab.store.config(run_id).data_dir
        return confine_dataset_path(data_dir, lab.settings.data_roots)
    except PathError as exc:
        raise user_error(str(exc), title="Folder not allowed") from None
    except Exception:  # noqa: BLE001 - missing or damaged config.json
        raise user_error(f"cannot read the settings of run {run_id}", title="Unknown run") from None


def _image_in(root: Path, rel: str):
    path = (root / rel).resolve()
    if root not in path.parents or not path.is_file():
        raise user_error(f"{rel} is not an image of this run's dataset", title="Not found")
    return load_rgb(path)


def _cams(lab, run_id: str, pictures: list, classes: list[int]) -> list:
    """Grad-CAM overlays (layer 4 of the run's best model) for PIL pictures, one target class each."""
    import torch

    from shared.analysis.explain import GradCAM, overlay_cam

    try:
        predictor = lab.predictors.get(run_id)
    except NoModelError as exc:
        raise user_error(str(exc), title="Model not available") from None
    out = []
    with predictor._lock:  # the hooks must not interleave with another request on the same model
        cam = GradCAM(predictor.model, predictor.spec)
        for start in range(0, len(pictures), 8):
            part = pictures[start:start + 8]
            batch = torch.stack([predictor.transform(p) for p in part])
            maps, _ = cam.batch(batch, classes[start:start + 8])
            out.extend(overlay_cam(p, m) for p, m in zip(part, maps))
    return out


# --- confusion cells ------------------------------------------------------------------------------------------

def cell_components(ui: CleanupUI) -> set:
    return {ui.pairs, ui.cell_true, ui.cell_pred, ui.cell_gallery, ui.cell_note}


def fill_cells(lab, ui: CleanupUI, run_id) -> dict:
    """The class choices and the most-confused pairs of the run's evaluation (empty without one)."""
    result = None
    if isinstance(run_id, str) and run_id:
        try:
            result = load_eval_result(lab.store.path(run_id))
        except (RunNotFound, EvalResultError):  # show_run says what is wrong
            result = None
    return cell_outputs(result, ui)


def cell_outputs(result, ui: CleanupUI) -> dict:
    """What the run's evaluation fills in: the class choices and the most-confused pairs."""
    classes = list(result.classes) if result is not None else []
    rows = [[p.true, p.pred, p.count] for p in (result.confused_pairs if result is not None else [])]
    return {ui.pairs: pd.DataFrame(rows, columns=PAIR_COLUMNS),
            ui.cell_true: gr.Dropdown(choices=classes, value=None),
            ui.cell_pred: gr.Dropdown(choices=classes, value=None), ui.cell_gallery: [], ui.cell_note: ""}


def show_cell(lab, run_id, true, pred) -> tuple[list, str]:
    """The test images of one confusion cell (true × predicted) with Grad-CAM and confidence."""
    run_dir = _run_dir(lab, run_id)
    try:
        result = load_eval_result(run_dir)
    except EvalResultError as exc:
        raise user_error(str(exc), title="Unusable evaluation") from None
    if result is None:
        raise user_error("This run has no evaluation yet.", title="No results")
    if true not in result.classes or pred not in result.classes:
        raise user_error(f"pick a true and a predicted class among: {', '.join(result.classes)}", title="Pick a cell")
    if result.predictions is None:
        return [], ("This evaluation predates per-image results — press **Evaluate again** to see the images of "
                    "each cell.")
    ti, pi = result.classes.index(true), result.classes.index(pred)
    cell = result.predictions.cell(ti, pi)
    if not cell:
        return [], f"No test image of **{fmt.md_escape(true)}** was predicted as **{fmt.md_escape(pred)}**."
    root = _data_root(lab, run_id)
    shown = cell[:MAX_CELL_IMAGES]
    pictures, captions = [], []
    for rel, confidence in shown:
        try:
            pictures.append(_image_in(root, rel))
        except ImageError as exc:
            log.warning("cell image %s: %s", rel, exc)
            continue
        captions.append(f"{rel} · {pred} {confidence:.0%}")
    overlays = _cams(lab, run_id, pictures, [pi] * len(pictures))
    more = f" (the {MAX_CELL_IMAGES} most confident shown)" if len(cell) > MAX_CELL_IMAGES else ""
    what = "correct" if ti == pi else "confused"
    return (list(zip(overlays, captions)),
            f"{len(cell)} test image(s) of **{fmt.md_escape(true)}** predicted as **{fmt.md_escape(pred)}** "
            f"({what}){more}.")


def pick_pair(evt: gr.SelectData, table):
    """A click on a most-confused pair selects its cell."""
    try:
        row = table.iloc[evt.index[0]]
        return str(row["true"]), str(row["predicted"])
    except (IndexError, KeyError, TypeError, AttributeError):
        return gr.skip(), gr.skip()


# --- data issues ------------------------------------------------------------------------------------------------

def queue_issues(lab, run_id) -> str:
    run_dir = _run_dir(lab, run_id)
    if not (run_dir / "best.pt").is_file():
        raise user_error("This run has no best checkpoint to judge the data with.", title="Not finished")
    root = _data_root(lab, run_id)
    try:
        lab.client().submit_data_issues(run_id, str(root))
    except QueueUnavailable as exc:
        raise user_error(str(exc), title="Queue unavailable") from None
    except EvaluationPending as exc:
        raise user_error(str(exc), title="Already queued") from None
    gr.Info("Data issues queued; press Load the report when the worker is done.")
    return "Queued — a worker judges every image of the dataset; press **Load the report** when it is done."


def _report(lab, run_id):
    run_dir = _run_dir(lab, run_id)
    try:
        return load_data_issues(run_dir)
    except ValueError as exc:
        raise user_error(str(exc), title="Unusable report") from None


def issue_rows(report: dict) -> pd.DataFrame:
    rows = [[i + 1, r["kind"].replace("_", "-"), r["file"], r["given"], r["suggested"], round(r["score"], 3),
             r.get("other") or ""] for i, r in enumerate(report["rows"][:MAX_ISSUE_ROWS])]
    return pd.DataFrame(rows, columns=ISSUE_COLUMNS)


def change_rows(root: Path) -> pd.DataFrame:
    try:
        changes = list_changes(root)
    except DatasetError as exc:
        raise user_error(str(exc), title="Overrides unreadable") from None
    rows = [[time.strftime("%Y-%m-%d %H:%M", time.localtime(c["time"])), c["action"], c["path"], c.get("label", ""),
             c["state"]] for c in changes]
    return pd.DataFrame(rows, columns=CHANGE_COLUMNS)


def load_issues(lab, ui: CleanupUI, run_id) -> dict:
    report = _report(lab, run_id)
    root = _data_root(lab, run_id)
    if report is None:
        return {ui.issues_note: "No data-issues report for this run yet — press **Find data issues**.",
                ui.issues: pd.DataFrame(columns=ISSUE_COLUMNS), ui.pick: gr.Dropdown(choices=[], value=None),
                ui.relabel_to: gr.Dropdown(choices=[], value=None), ui.changes: change_rows(root)}
    counts = report["counts"]
    files = list(dict.fromkeys(r["file"] for r in report["rows"][:MAX_ISSUE_ROWS]))
    note = (f"{report['n']} images judged: **{counts['label']}** likely label errors, **{counts['near_duplicate']}** "
            f"near-duplicate pairs, **{counts['outlier']}** outliers (report of "
            f"{time.strftime('%Y-%m-%d %H:%M', time.localtime(report['created']))}).")
    return {ui.issues_note: note, ui.issues: issue_rows(report), ui.pick: gr.Dropdown(choices=files, value=None),
            ui.relabel_to: gr.Dropdown(choices=list(report["classes"]), value=None), ui.changes: change_rows(root)}


def pick_issue(evt: gr.SelectData, table):
    try:
        return str(table.iloc[evt.index[0]]["file"])
    except (IndexError, KeyError, TypeError, AttributeError):
        return gr.skip()


def show_issue(lab, run_id, rel) -> tuple:
    """The suspect's photo, its Grad-CAM for the model's prediction, and the suggested label preselected."""
    if not rel:
        return None, None, gr.skip()
    report = _report(lab, run_id)
    rows = [r for r in (report or {}).get("rows", []) if r["file"] == rel]
    if not rows:
        raise user_error(f"{str(rel)[:80]!r} is not in this run's data-issues report", title="Not found")
    root = _data_root(lab, run_id)
    try:
        picture = _image_in(root, rel)
    except ImageError as exc:
        raise user_error(str(exc), title="Not a usable image") from None
    classes = list(report.get("classes") or [])
    target = classes.index(rows[0]["suggested"]) if rows[0]["suggested"] in classes else 0
    [overlay] = _cams(lab, run_id, [picture], [target])
    return picture, overlay, gr.Dropdown(value=rows[0]["suggested"])


def _fix(lab, run_id, action: str, rel, label=None) -> tuple:
    root = _data_root(lab, run_id)
    try:
        if action == "undo":
            entry = undo_last(root)
            text = ("Nothing to undo." if entry is None
                    else f"Undone: {entry['action']} of {fmt.md_code(entry['path'])}.")
        else:
            entry = add_change(root, action, rel, label, link_roots=lab.settings.data_roots)
            to = f" → **{fmt.md_escape(entry['label'])}**" if action == "relabel" else ""
            done = {"relabel": "Relabelled", "exclude": "Excluded"}[action]
            text = (f"{done} {fmt.md_code(entry['path'])}{to}. New runs on this dataset use it; press "
                    "**Retrain with these fixes** when you are done.")
    except DatasetError as exc:  # OverrideError included: names the class or file and what is accepted
        raise user_error(str(exc), title="Change refused") from None
    return text, change_rows(root)


def retrain(lab, run_id) -> str:
    """Queue a new run with this run's settings; its split applies the dataset's overrides."""
    _run_dir(lab, run_id)
    try:
        config = lab.store.config(run_id)
    except Exception:  # noqa: BLE001 - a damaged config.json
        raise user_error(f"cannot read the settings of run {run_id}", title="Cannot retrain") from None
    _data_root(lab, run_id)
    try:
        [new_id] = lab.client().submit([config])
    except (QueueUnavailable, QueueFull) as exc:
        raise user_error(str(exc), title="Cannot queue") from None
    gr.Info(f"Queued run {new_id} with the settings of {run_id} and the dataset's fixes.")
    return f"Queued **{new_id}**: the settings of {run_id}, with this dataset's fixes applied to its split."


def wire(lab, ui: CleanupUI, run: gr.Dropdown) -> None:
    private = dict(api_visibility="private")
    ui.pairs.select(pick_pair, ui.pairs, [ui.cell_true, ui.cell_pred], **private).then(
        partial(show_cell, lab), [run, ui.cell_true, ui.cell_pred], [ui.cell_gallery, ui.cell_note],
        concurrency_limit=2, **private)
    ui.cell_btn.click(partial(show_cell, lab), [run, ui.cell_true, ui.cell_pred], [ui.cell_gallery, ui.cell_note],
                      concurrency_limit=2, **private)
    loaded = {ui.issues_note, ui.issues, ui.pick, ui.relabel_to, ui.changes}
    ui.issues_btn.click(partial(queue_issues, lab), run, ui.issues_note, **private)
    ui.issues_load.click(partial(load_issues, lab, ui), run, loaded, **private)
    ui.issues.select(pick_issue, ui.issues, ui.pick, **private).then(
        partial(show_issue, lab), [run, ui.pick], [ui.photo, ui.cam, ui.relabel_to], **private)
    ui.pick.input(partial(show_issue, lab), [run, ui.pick], [ui.photo, ui.cam, ui.relabel_to], **private)
    ui.relabel_btn.click(lambda r, f, to: _fix(lab, r, "relabel", f, to), [run, ui.pick, ui.relabel_to],
                         [ui.fix_note, ui.changes], concurrency_limit=1, **private)
    ui.exclude_btn.click(lambda r, f: _fix(lab, r, "exclude", f), [run, ui.pick], [ui.fix_note, ui.changes],
                         concurrency_limit=1, **private)
    ui.undo_btn.click(lambda r: _fix(lab, r, "undo", None), run, [ui.fix_note, ui.changes], concurrency_limit=1,
                      **private)
    ui.retrain_btn.click(partial(retrain, lab), run, ui.fix_note, concurrency_limit=1, **private)
