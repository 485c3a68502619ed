"""Predict tab: drop one image → top-5 classes and a Grad-CAM overlay; drop many → a table and a CSV.

Prediction runs in this (the page's) process through `PredictorCache`, so it answers while the worker is busy
training. "Latest finished run" is resolved at every request, so a newer model is used as soon as it lands; the
answer always names the run that gave it.
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from shared.training.checkpoint import CheckpointError
from shared.data.images import ImageError, load_rgb
from shared.analysis.predict import NoModelError, write_predictions_csv

from .. import predict_view as view
from .. import runs_view
from ..guard import FileRefused, UploadError
from . import client_file, feedback, predict_folder, user_error

log = logging.getLogger(__name__)

HELP = ("Drop a photo (or paste one, or use the webcam) to see what the model thinks it is and where it looked. "
        "Several photos at once go into a table you can download as CSV.")
LATEST = "latest"
LATEST_LABEL = "Latest finished run (switches automatically)"
BEST = "best"
BEST_LABEL = "Best finished run (highest validation accuracy on the latest run's dataset and classes)"


@dataclass
class PredictUI:
    model: gr.Dropdown
    model_info: gr.Markdown
    image: gr.Image
    label: gr.Label
    cam: gr.Image
    answer: gr.Markdown
    files: gr.File
    many_btn: gr.Button
    table: gr.Dataframe
    csv: gr.File
    state: gr.State
    answered: gr.State  # the run id of the last answer, for the model line
    choices: gr.State  # the model list; the selector follows it (see wire)
    folder: predict_folder.FolderUI  # a folder classified by the worker
    threshold: gr.Slider | None = None  # "not sure" below it; 0 = the run's calibrated threshold
    verdict: gr.Markdown | None = None  # the answer or "Not sure — closest: X", redrawn when the slider moves
    feedback: feedback.FeedbackUI | None = None  # "Wrong — it is X" into the dataset's inbox (ui/tabs/feedback.py)
    distance: gr.State | None = None  # {"run", "distance"} of the last picture answered (distance None: not checked)


def model_choices(lab) -> list[tuple[str, str]]:
    now = time.time()
    return [(LATEST_LABEL, LATEST), (BEST_LABEL, BEST)] + [(runs_view.run_choice_label(r, now), r["run_id"]) for r in lab.succeeded_runs()]


def build(lab) -> PredictUI:
    gr.Markdown(HELP, elem_classes="help")
    choices = model_choices(lab)
    with gr.Row(equal_height=True):
        # allow_custom_value: API clients may name a run that finished after this page was built (Gradio would
        # refuse a value outside the build-time choices); `_predictor` checks every value
        model = gr.Dropdown(choices=choices, value=LATEST, allow_custom_value=True, label="Model",
                            elem_id="predict-model", scale=2)
        model_info = gr.Markdown(model_info_text(lab, LATEST), elem_id="predict-model-info")
    with gr.Row(equal_height=False):
        image = gr.Image(type="filepath", sources=["upload", "clipboard", "webcam"], label="Image",
                         elem_id="predict-image", height=320)
        with gr.Column():
            label = gr.Label(num_top_classes=5, label="Top 5", elem_id="predict-label")
            verdict = gr.Markdown(elem_id="predict-verdict")
            answer = gr.Markdown(elem_id="predict-info")
            threshold = gr.Slider(0, 1, value=0, step=0.01, label="Answer only above this confidence",
                                  info="0 = the model's own threshold, chosen on validation for 95% precision; "
                                       "below it the answer is \"not sure\"", elem_id="predict-threshold")
        # JPEG: the overlay is a photo; Pillow encodes it ~100x faster than PNG (BENCHMARKS.md, item 4)
        cam = gr.Image(label="Where the model looked (heat-map)", interactive=False, elem_id="predict-cam",
                       height=320, format="jpeg")
    with gr.Accordion("Many images at once", open=False, elem_id="predict-many"):
        with gr.Row(equal_height=False):
            files = gr.File(file_count="multiple", file_types=["image"], label="Images", elem_id="predict-files",
                            height=140)
            with gr.Column():
                many_btn = gr.Button("Classify all", variant="primary", elem_id="predict-many-btn")
                csv = gr.File(label="Predictions as CSV", interactive=False, elem_id="predict-csv", height=90)
        table = gr.Dataframe(headers=view.TABLE_COLUMNS, value=pd.DataFrame(columns=view.TABLE_COLUMNS),
                             interactive=False,
                             elem_id="predict-table", max_height=360)
        folder = predict_folder.build(lab)
    fb = feedback.build()
    state = gr.State({})
    # the same list as the selector's: the browser fires a State's `change` when the page loads
    return PredictUI(model, model_info, image, label, cam, answer, files, many_btn, table, csv, state, gr.State(),
                     gr.State(choices), folder, threshold=threshold, verdict=verdict, feedback=fb,
                     distance=gr.State())


# --- helpers ------------------------------------------------------------------------------------------------

MODEL_HINT = "pick \"latest\" or a finished run's id (the Predict tab's list, or /run_status)"


def _predictor(lab, model: str | None):
    if model is not None and (not isinstance(model, str) or len(model) > 120):
        raise user_error(f"No such model — {MODEL_HINT}.", title="Model not available")
    try:
        return lab.predictors.get(model or LATEST)
    except CheckpointError as exc:  # damaged, or carrying code (never run: weights_only=True)
        raise user_error(str(exc), title="Model refused") from None
    except NoModelError as exc:
        if (model or LATEST) in (LATEST, BEST):
            raise user_error("No model yet: no run has finished. Train one on the Train tab, then come back — "
                           "this page picks it up by itself.", title="No model yet") from None
        raise user_error(str(exc), title="Model not available") from None


def _describe_run(lab, run_id: str, model: str) -> str:
    try:
        record = lab.record(run_id)
    except Exception:  # noqa: BLE001 - a missing record still names the run
        record = {"run_id": run_id}
    why = view.best_reason(lab.store.best_succeeded(), run_id) if model == BEST else None
    return view.answered_by(record, run_id, model == LATEST, why=why)


def model_info_text(lab, model: str | None, run_id: str | None = None) -> str:
    """The "now answering with" line: the run `model` resolves to now, or `run_id` when a run has just answered."""
    model = model or LATEST
    if model == BEST and run_id is None:
        choice = lab.store.best_succeeded()
        run_id = choice.run_id if choice else None
    run_id = run_id or (lab.store.latest_succeeded() if model == LATEST else model)
    if run_id is None:
        return "No finished run yet — train one on the **Train** tab."
    try:
        record = lab.record(run_id)
    except Exception:  # noqa: BLE001 - a deleted run: say so
        return f"Run `{run_id}` is no longer available — pick another."
    if model == BEST:
        return f"{view.answering_with(record)} Chosen as {view.best_reason(lab.store.best_succeeded(), run_id)}."
    return view.answering_with(record)


def _load(data: bytes, name: str):
    buffer = io.BytesIO(data)
    buffer.name = name  # ImageError messages then name the user's file, not a temporary path
    try:
        return load_rgb(buffer)
    except ImageError as exc:
        raise user_error(str(exc), title="Not a usable image") from None


_CSV_ROOT: tempfile.TemporaryDirectory | None = None
_CSV_LOCK = threading.Lock()  # two batches may finish at once
CSV_MAX_AGE_S = 86400


def _csv_folder() -> Path:
    """A new folder for one CSV (its download keeps the name predictions.csv) inside one folder for the page's
    life, which is removed at exit; folders older than a day are pruned, so a page left running does not fill
    the disk. Gradio serves the CSV from its own cache copy, which it cleans up itself (`delete_cache`)."""
    global _CSV_ROOT
    with _CSV_LOCK:
        if _CSV_ROOT is None:
            _CSV_ROOT = tempfile.TemporaryDirectory(prefix="resnet-lab-predictions-")
        root = Path(_CSV_ROOT.name)
        cutoff = time.time() - CSV_MAX_AGE_S
        for old in root.iterdir():
            if old.stat().st_mtime < cutoff:
                shutil.rmtree(old, ignore_errors=True)
        return Path(tempfile.mkdtemp(dir=root))


def _display_size(image, side: int = 320):
    """The overlay is at the model's input size (often 128 px or less): enlarge it so it can be read."""
    from PIL import Image

    if min(image.size) >= side:
        return image
    scale = side / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.BICUBIC)


# --- handlers -----------------------------------------------------------------------------------------------

def no_answer(ui: PredictUI) -> dict:
    """What the answer shows while there is none: no top-5, no CAM, no "answered by"."""
    return {ui.label: None, ui.cam: None, ui.answer: ""}


def _threshold(value: Any) -> float | None:
    """The page's threshold: None (0 or absent) = the run's own; a number in (0, 1] overrides it."""
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise user_error(f"The confidence threshold must be a number between 0 and 1, got {str(value)[:20]!r}.",
                         title="Check the threshold")
    return float(value)


def verdict_text(lab, top: dict | None, threshold: float | None, run_id: str | None,
                 distance: float | None = None) -> str:
    """The answer line for the top-5 shown (gr.Label's {class: probability}) by run `run_id`, at the slider's
    threshold (0: the run's own), and the picture's feature distance (a State the answer set: never the
    browser's; used only when the same run measured it). A private event after each answer and on every slider
    move, so the /predict API keeps its inputs and outputs."""
    if not top or not run_id or not isinstance(top, dict):
        return ""
    threshold = _threshold(threshold)
    predictor = _predictor(lab, run_id)
    ranked = sorted(({"class": str(k), "probability": float(v)} for k, v in top.items()),
                    key=lambda item: -item["probability"])
    measured = distance.get("distance") if isinstance(distance, dict) and distance.get("run") == run_id else None
    measured = float(measured) if isinstance(measured, (int, float)) and not isinstance(measured, bool) else None
    return view.verdict_line(predictor.verdict(ranked, threshold, measured), predictor.calibration_note)


def predict(lab, ui: PredictUI, image: Any, model: str | None = LATEST):
    """One image → ({class: probability} top-5, Grad-CAM overlay, which run answered).

    A generator: the top-5 first, with the previous picture's CAM taken away in the same update (a CAM never
    stands next to another picture's label), then the CAM when Grad-CAM is done. A picture that cannot be read
    clears the previous answer before its error toast. API clients get the final value only (all four outputs);
    the page also gets the id of the run that answered (a State)."""
    if image is None:
        yield no_answer(ui)
        return
    try:
        data, name = client_file(lab, image)
        picture = _load(data, name)
        predictor = _predictor(lab, model)
    except gr.Error:
        yield no_answer(ui)
        raise
    (result,) = predictor.predict_many([picture], top_k=5)
    if result["error"]:  # the picture decoded above; its preprocessing can still refuse it
        yield no_answer(ui)
        raise user_error(result["error"], title="Not a usable image")
    top = result["top"]
    answer = {ui.label: view.top5_dict(top), ui.cam: None,
              ui.answer: _describe_run(lab, predictor.run_id, model or LATEST),
              ui.answered: predictor.run_id, ui.distance: {"run": predictor.run_id, "distance": result["distance"]}}
    yield answer
    overlay, caption = predictor.cam(picture, predictor.classes.index(top[0]["class"]))
    # the map's method and resolution beside it, in the answer text: the API's outputs keep their shapes
    yield {**answer, ui.cam: _display_size(overlay), ui.answer: f"{answer[ui.answer]}  \nHeat-map: {caption}."}


BATCH = 32  # files read and classified together by "Classify all"


def _predict_batch(lab, predictor, files: list[str]) -> list[dict]:
    """Results for some files, each read through the guard; an unreadable one gets its message in `error`."""
    names = [Path(str(f)).name for f in files]
    sources: list[Any] = []
    problems: dict[int, str] = {}
    for i, (path, name) in enumerate(zip(files, names)):
        try:
            sources.append(lab.files.read_path(path, name))
        except (FileRefused, UploadError) as exc:
            problems[i] = str(exc)
            sources.append(b"")
    results = predictor.predict_many(sources, top_k=5)
    for i, (result, name) in enumerate(zip(results, names)):
        result["source"] = name
        if i in problems:
            result["error"], result["top"] = problems[i], []
        elif result["error"]:
            result["error"] = str(result["error"]).replace("<uploaded bytes>", name)
    return results


def predict_many(lab, ui: PredictUI, files: list[str] | None, model: str | None = LATEST) -> dict:
    """Many images → table, CSV file, which run answered (and its id, a State for the model line)."""
    if not files:
        raise user_error("Add some images first.", title="No images")
    predictor = _predictor(lab, model)
    results = []
    for start in range(0, len(files), BATCH):  # a batch of files in memory at a time, never all of them
        results += _predict_batch(lab, predictor, files[start:start + BATCH])
    csv_path = write_predictions_csv(results, _csv_folder() / "predictions.csv")
    failed = sum(1 for r in results if r["error"])
    if failed:
        gr.Warning(f"{failed} of {len(results)} files could not be read as images; see the error column.")
    return {ui.table: pd.DataFrame(view.table_rows(results), columns=view.TABLE_COLUMNS), ui.csv: str(csv_path),
            ui.answer: _describe_run(lab, predictor.run_id, model or LATEST),
            ui.answered: predictor.run_id}


def answered_info(lab, run_id: str | None, model: str | None, state: dict | None):
    """After an answer, the model line names the run that gave it: the timer's last look at the runs can be a
    poll old, so while runs were finishing it could name another run than "Answered by" did."""
    state = dict(state or {})
    info = model_info_text(lab, model, run_id)
    state["info"] = info  # the timer then sends the line again only when the latest run changes
    return info, state


def refresh_models(lab, ui: PredictUI, model: str | None, active_tab: str, state: dict | None,
                   force: bool = False) -> dict:
    """Keep the model list and the "now answering with" line current (newer runs land while the page is open);
    only what changed is sent. The list goes to a State that the selector follows (see `wire`)."""
    state = dict(state or {})
    out: dict = {ui.state: state}
    if active_tab != "predict" and not force:
        return out
    choices = model_choices(lab)
    values = [v for _, v in choices]
    info = model_info_text(lab, model)
    if force or state.get("choices") != values:
        out[ui.choices] = choices
        state["choices"] = values
    if force or state.get("info") != info:
        out[ui.model_info] = state["info"] = info
    return out


def model_select_update(choices: list | None, model: str | None):
    """The model selector with a new list; the chosen model stays when still listed, else "latest"."""
    choices = [tuple(c) for c in choices or []]
    return gr.Dropdown(choices=choices, value=model if model in {value for _, value in choices} else LATEST)


def wire(lab, ui: PredictUI, *, timer: gr.Timer, active_tab: gr.State, tab: gr.Tab) -> None:
    # `upload`, not `change`: in Gradio 6.31 `upload` fires once per new picture (a file picked or dropped, a paste,
    # a webcam capture; checked in Chromium), while `change` fires twice when a file replaces the image — Grad-CAM
    # ran twice and a bad file got two identical toasts. always_last: a picture dropped while the previous one is
    # still being explained is answered next, not ignored.
    # preprocess=False: the handler reads the upload itself, so a text file named .jpg or a decompression bomb
    # gets shared.data.images' message instead of a PIL traceback inside Gradio's own preprocessing. It reads through
    # lab.files (ui/guard.py): Gradio checks a payload's path only when the payload carries `meta`.
    answered = dict(fn=partial(answered_info, lab), inputs=[ui.answered, ui.model, ui.state],
                    outputs=[ui.model_info, ui.state], api_visibility="private", show_progress="hidden")
    # outputs as lists, not sets: their order is the order of the API's answer
    verdict = dict(fn=partial(verdict_text, lab), inputs=[ui.label, ui.threshold, ui.answered, ui.distance],
                   outputs=ui.verdict,
                   api_visibility="private", show_progress="hidden")
    ui.image.upload(lambda: "", None, ui.verdict, api_visibility="private", queue=False, show_progress="hidden")
    ui.image.upload(partial(predict, lab, ui), [ui.image, ui.model],
                    [ui.label, ui.cam, ui.answer, ui.answered, ui.distance],
                    api_name="predict", preprocess=False, trigger_mode="always_last", concurrency_limit=4,
                    show_progress="minimal").success(**answered).success(**verdict)
    ui.threshold.change(**verdict)
    # removing the picture (its ✕, or switching to the webcam) takes its answer away too
    ui.image.clear(lambda: {**no_answer(ui), ui.verdict: ""}, None, {ui.label, ui.cam, ui.answer, ui.verdict},
                   api_visibility="private",
                   queue=False, show_progress="hidden")
    ui.many_btn.click(partial(predict_many, lab, ui), [ui.files, ui.model],
                      [ui.table, ui.csv, ui.answer, ui.answered], api_name="predict_many",
                      concurrency_limit=2).success(**answered)
    # holds a slot while the worker works, not the CPU: two at a time
    ui.folder.button.click(partial(predict_folder.classify_folder, lab, ui.folder, latest=LATEST, hint=MODEL_HINT,
                                   csv_folder=_csv_folder),
                           [ui.folder.folder, ui.model], [ui.folder.status, ui.folder.csv],
                           api_name="predict_folder", concurrency_limit=2)
    ui.model.input(partial(model_info_text, lab), ui.model, ui.model_info, api_visibility="private",
                   show_progress="hidden")
    # the list goes through a State, not straight to the selector the timer reads: see the Runs tab's wire (a
    # component both read and updated by a recurring event grows the page's memory in Gradio 6.31)
    models_outputs = {ui.choices, ui.model_info, ui.state}
    timer.tick(partial(refresh_models, lab, ui), [ui.model, active_tab, ui.state], models_outputs,
               api_visibility="private", show_progress="hidden", trigger_mode="once", concurrency_limit=None)
    tab.select(lambda m, st: refresh_models(lab, ui, m, "predict", st, force=True), [ui.model, ui.state],
               models_outputs, api_visibility="private", show_progress="hidden")
    ui.choices.change(model_select_update, [ui.choices, ui.model], ui.model, api_visibility="private",
                      show_progress="hidden")
    feedback.wire(lab, ui.feedback, image=ui.image, model=ui.model, tab=tab)
