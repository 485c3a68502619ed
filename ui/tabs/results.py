"""Results tab: everything the evaluation of one finished run found, from `<run>/eval/eval.json` and its figures.

eval.json is read once per event, as a typed `EvalResult` (shared/analysis/eval_result.py), and shown by the pure views of
ui/results_view.py. Plots whose data are in eval.json (ROC, PR, calibration, t-SNE) are drawn interactively by the
browser; the confusion matrix is an HTML table (counts or normalised, switched without a round trip to the model);
the Grad-CAM and top-loss galleries show the PNGs the evaluation wrote, and are hidden (the headline says why) when
its figure level skipped them. Layer activations are computed here, in the page process, for an image the user
picks. Handlers with several outputs return dicts keyed by component.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from shared.analysis.eval_result import EvalResult, EvalResultError, load_eval_result
from shared.data.images import ImageError, load_rgb
from shared.analysis.predict import NoModelError
from shared.runs.store import RunNotFound

from .. import formatting as fmt
from .. import results_view as view
from .. import runs_view
from ..client import EvaluationPending, QueueUnavailable
from ..paths import PathError, confine_dataset_path
from . import cleanup, client_file, park_plot_props, plot_props_step, shown, user_error

log = logging.getLogger(__name__)

HELP = ("Pick a finished run to see how it does on images it never trained on: per-class scores, which classes "
        "it confuses, how confident it is, and where it looks.")
EMPTY_CURVE = pd.DataFrame(columns=view.CURVE_COLUMNS)
EMPTY_TSNE = pd.DataFrame(columns=view.TSNE_COLUMNS)


@dataclass
class ResultsUI:
    run: gr.Dropdown
    refresh_btn: gr.Button
    evaluate_btn: gr.Button
    metrics: gr.Markdown
    body: gr.Column
    per_class: gr.Dataframe
    per_class_note: gr.Markdown
    confusion_mode: gr.Radio
    confusion: gr.HTML
    roc: gr.LinePlot
    pr: gr.LinePlot
    calibration: gr.LinePlot
    tsne_panel: gr.Column
    tsne: gr.ScatterPlot
    cams: gr.Gallery
    top_losses: gr.Gallery
    act_pick: gr.Dropdown
    act_image: gr.Image
    activations: gr.Image
    report_btn: gr.Button
    report_file: gr.DownloadButton
    checkpoint_file: gr.DownloadButton
    export_format: gr.Dropdown
    export_btn: gr.Button
    export_file: gr.DownloadButton
    state: gr.State
    cleanup: cleanup.CleanupUI | None = None  # confusion-cell images and data issues (ui/tabs/cleanup.py)


def run_choices(lab) -> list[tuple[str, str]]:
    import time

    now = time.time()
    return [(runs_view.run_choice_label(r, now), r["run_id"]) for r in lab.succeeded_runs()]


def build(lab) -> ResultsUI:
    gr.Markdown(HELP, elem_classes="help")
    choices = run_choices(lab)
    with gr.Row(elem_classes="toolbar"):
        run = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None, label="Finished run",
                          elem_id="results-run", scale=4)
        refresh_btn = gr.Button("Refresh list", elem_id="results-refresh-btn", scale=0, min_width=140)
        evaluate_btn = gr.Button("Evaluate again", elem_id="results-eval-btn", scale=0, min_width=170)
    metrics = gr.Markdown(elem_id="results-metrics")
    with gr.Column(visible=False, elem_id="results-body") as body:
        with gr.Row(elem_classes="toolbar"):
            report_btn = gr.Button("Build HTML report", elem_id="report-btn", scale=0, min_width=220)
            report_file = gr.DownloadButton("Download report.html", visible=False, elem_id="report-download",
                                            scale=0, min_width=240)
            checkpoint_file = gr.DownloadButton("Download checkpoint (best.pt)", visible=False,
                                                elem_id="checkpoint-download", scale=0, min_width=300)
        with gr.Row(elem_classes="toolbar"):
            export_format = gr.Dropdown([("ONNX (predict.py needs only onnxruntime, numpy, Pillow)", "onnx"),
                                         ("TorchScript", "torchscript")], value="onnx", label="Export format",
                                        elem_id="export-format", scale=2)
            export_btn = gr.Button("Export model bundle (.zip)", elem_id="export-btn", scale=0, min_width=240)
            export_file = gr.DownloadButton("Download bundle", visible=False, elem_id="export-download", scale=0,
                                            min_width=240)
        with gr.Row(equal_height=False):
            with gr.Column(scale=2):
                per_class = gr.Dataframe(interactive=False, label="Per class", elem_id="per-class",
                                         max_height=380)
                per_class_note = gr.Markdown(elem_id="per-class-note", elem_classes="help")
            with gr.Column(scale=3):
                confusion_mode = gr.Radio([("Counts", "counts"), ("Normalised by true class", "normalized")],
                                          value="counts", label="Confusion matrix (rows: true class)",
                                          elem_id="confusion-mode")
                confusion = gr.HTML(elem_id="confusion")
        cells = cleanup.build_cells()
        with gr.Row():
            roc = gr.LinePlot(EMPTY_CURVE, x="x", y="y", color="curve", title="ROC, one class vs rest (AUC in legend)",
                              x_title="false positive rate", y_title="true positive rate", height=320,
                              elem_id="roc", x_lim=[0, 1], y_lim=[0, 1])
            pr = gr.LinePlot(EMPTY_CURVE, x="x", y="y", color="curve", title="Precision–recall (AP in legend)",
                             x_title="recall", y_title="precision", height=320, elem_id="pr", x_lim=[0, 1],
                             y_lim=[0, 1])
        with gr.Row():
            calibration = gr.LinePlot(EMPTY_CURVE, x="x", y="y", color="curve", title="Calibration (reliability)",
                                      x_title="confidence", y_title="accuracy", height=320, elem_id="calibration",
                                      x_lim=[0, 1], y_lim=[0, 1])
            # hidden through its panel when the evaluation skipped t-SNE: a plot update that sets the value and other
            # props at once is not applied (see ui/tabs/__init__.py)
            with gr.Column(elem_id="tsne-panel") as tsne_panel:
                tsne = gr.ScatterPlot(EMPTY_TSNE, x="x", y="y", color="true class",
                                      title="t-SNE of the test features", tooltip=["true class", "predicted", "correct"],
                                      height=320, elem_id="tsne", x_axis_labels_visible="hidden", x_title=" ",
                                      y_title=" ")
        with gr.Row():
            # the evaluation writes one grid figure per kind; one column shows each whole (click to enlarge). The
            # height grows with it: a fixed height scrolled a tall grid and cut it at the top and bottom
            cams = gr.Gallery(label="Grad-CAM: where the model looked (test images)", columns=1, height="fit-content",
                              elem_id="cam-gallery", object_fit="contain")
            top_losses = gr.Gallery(label="Hardest test images (highest loss first)", columns=1, height="fit-content",
                                    elem_id="toploss-gallery", object_fit="contain")
        with gr.Accordion("Layer activations for an image", open=False, elem_id="activations-panel"):
            gr.Markdown("Pick a test image (or drop your own) to see the strongest feature maps of each stage, from "
                        "edges in conv1 to object parts in layer4.", elem_classes="help")
            with gr.Row(equal_height=False):
                with gr.Column(scale=1):
                    act_pick = gr.Dropdown(choices=[], value=None, label="Test image", elem_id="act-pick")
                    act_image = gr.Image(type="filepath", sources=["upload", "clipboard"], label="Image",
                                         height=240, elem_id="act-image")
                activations = gr.Image(label="Strongest 8 feature maps per stage (brighter = stronger)",
                                       interactive=False, height=440, elem_id="activations", scale=3, format="png")
        issues = cleanup.build_issues()
    state = gr.State({})
    return ResultsUI(run=run, refresh_btn=refresh_btn, evaluate_btn=evaluate_btn, metrics=metrics, body=body,
                     per_class=per_class, per_class_note=per_class_note, confusion_mode=confusion_mode,
                     confusion=confusion, roc=roc, pr=pr, calibration=calibration, tsne_panel=tsne_panel, tsne=tsne,
                     cams=cams, top_losses=top_losses, act_pick=act_pick, act_image=act_image,
                     activations=activations, report_btn=report_btn, report_file=report_file,
                     checkpoint_file=checkpoint_file, export_format=export_format, export_btn=export_btn,
                     export_file=export_file, state=state, cleanup=cleanup.CleanupUI(**cells, **issues))


# --- reading eval.json --------------------------------------------------------------------------------------

NOT_EVALUATED = "no evaluation for run {}: the run does not exist or has not been evaluated yet"


def load_result(lab, run_id) -> EvalResult | None:
    """The run's evaluation; None when there is none yet. Raises user_error for an unknown run or an eval.json that
    cannot be used (its message says to evaluate again)."""
    if not isinstance(run_id, str) or len(run_id) > 120:
        raise user_error(NOT_EVALUATED.format(shown(run_id)), title="No results")
    try:
        return load_eval_result(lab.store.path(run_id))
    except RunNotFound:  # a hostile or mistyped id: the same answer as a run that does not exist
        raise user_error(NOT_EVALUATED.format(shown(run_id)), title="No results") from None
    except EvalResultError as exc:
        raise user_error(str(exc), title="Unusable evaluation") from None


def run_results(lab, run_id: str) -> dict:
    """A finished run's evaluation summary: accuracy, balanced accuracy, macro F1, top-k accuracy, loss, ECE,
    per-class table, classes, confusion counts, the names of the figures drawn and skipped (no images)."""
    result = load_result(lab, run_id)
    if result is None:
        raise user_error(NOT_EVALUATED.format(shown(run_id)), title="No results")
    return result.api_summary()


# --- handlers -----------------------------------------------------------------------------------------------

def _download(path: Path) -> gr.DownloadButton:
    return gr.DownloadButton(value=str(path), visible=True) if path.is_file() else gr.DownloadButton(visible=False)


def show_run(lab, ui: ResultsUI, run_id: str | None, mode: str, state: dict | None = None) -> dict:
    """Every output of the run's results, keyed by component (the plots' captions are parked in the state)."""
    state = {**(state or {}), "run_id": run_id}
    if not run_id:
        return _hidden(ui, state, "No finished run yet — train one on the **Train** tab; its results appear here.")
    try:
        run_dir = lab.store.path(run_id)
    except RunNotFound:  # an id typed into the dropdown
        raise user_error(f"no run {run_id!r}", title="Unknown run") from None
    try:
        result = load_eval_result(run_dir)
    except EvalResultError as exc:
        log.warning("%s", exc)
        return {**_hidden(ui, state, f"This run's evaluation cannot be shown: {fmt.md_escape(exc)}"),
                ui.checkpoint_file: _download(run_dir / "best.pt")}
    if result is None:
        text = ("This run has no evaluation yet (it runs right after training). Press **Evaluate again** to queue "
                "one.")
        return {**_hidden(ui, state, text), ui.checkpoint_file: _download(run_dir / "best.pt")}
    _park_captions(state, run_id, result)
    headers, rows = view.per_class_rows(result.per_class)
    return {
        ui.metrics: view.metrics_markdown(result),
        ui.body: gr.Column(visible=True),
        ui.per_class: pd.DataFrame(rows, columns=headers),
        ui.per_class_note: view.per_class_note(result.per_class),
        ui.confusion: view.confusion_html(result, mode),
        ui.roc: view.roc_frame(result.roc),
        ui.pr: view.pr_frame(result.pr),
        ui.calibration: view.calibration_frame(result.calibration),
        ui.tsne_panel: gr.Column(visible=result.tsne is not None),
        ui.tsne: view.tsne_frame(result.tsne, result.classes),
        ui.cams: gr.Gallery(view.gallery(result, run_dir, view.CAM_FIGURES),
                            visible=view.drew(result, view.CAM_FIGURES)),
        ui.top_losses: gr.Gallery(view.gallery(result, run_dir, view.TOP_LOSS_FIGURES),
                                  visible=view.drew(result, view.TOP_LOSS_FIGURES)),
        ui.act_pick: gr.Dropdown(choices=[(p, p) for p in view.test_image_choices(result)], value=None),
        ui.checkpoint_file: _download(run_dir / "best.pt"),
        ui.report_file: _download(run_dir / "report.html"),
        ui.export_file: gr.DownloadButton(visible=False),
        ui.state: state,
    }


def _hidden(ui: ResultsUI, state: dict, text: str) -> dict:
    """The outputs when there is nothing to show but `text`: the body hidden, its contents emptied."""
    return {ui.metrics: text, ui.body: gr.Column(visible=False), ui.per_class: None, ui.per_class_note: "",
            ui.confusion: "", ui.roc: EMPTY_CURVE, ui.pr: EMPTY_CURVE, ui.calibration: EMPTY_CURVE,
            ui.tsne: EMPTY_TSNE, ui.cams: [], ui.top_losses: [], ui.act_pick: gr.Dropdown(choices=[], value=None),
            ui.checkpoint_file: gr.DownloadButton(visible=False), ui.report_file: gr.DownloadButton(visible=False),
            ui.export_file: gr.DownloadButton(visible=False), ui.state: state}


def _park_captions(state: dict, run_id: str, result: EvalResult) -> None:
    suffix = run_id.rsplit("-", 1)[-1]
    park_plot_props(state, "roc", caption=f"run {suffix}: each class against the rest, with micro and macro averages")
    park_plot_props(state, "pr", caption=f"run {suffix}: average precision (AP) per class in the legend")
    park_plot_props(state, "calibration", caption=f"run {suffix}: points on the diagonal are calibrated; below it, "
                                                  "over-confident")
    park_plot_props(state, "tsne", caption=f"run {suffix}: {result.n} test images; hover a point for its predicted "
                                           "class")


def switch_confusion(lab, run_id: str | None, mode: str) -> str:
    if not run_id:
        return ""
    result = load_result(lab, run_id)
    return view.confusion_html(result, mode) if result is not None else ""


def refresh(lab, current: str | None):
    choices = run_choices(lab)
    values = [v for _, v in choices]
    return gr.Dropdown(choices=choices, value=current if current in values else (values[0] if values else None))


def evaluate_again(lab, run_id: str | None) -> str:
    if not run_id:
        raise user_error("Pick a finished run first.", title="No run")
    try:
        lab.client().submit_evaluate(run_id)
    except QueueUnavailable as exc:
        raise user_error(str(exc), title="Queue unavailable") from None
    except EvaluationPending as exc:
        raise user_error(str(exc), title="Already queued") from None
    gr.Info("Evaluation queued; press Refresh list when the worker is done.")
    return "Evaluation queued — the worker runs it after the current training step; reload this run when it is done."


def build_report(lab, run_id: str | None):
    if not run_id:
        raise user_error("Pick a finished run first.", title="No run")
    from shared.analysis.report import write_report

    try:
        path = write_report(lab.store.path(run_id))
    except FileNotFoundError as exc:
        raise user_error(f"cannot build the report yet: {exc}", title="Report unavailable") from None
    gr.Info("Report ready — press Download report.html.")
    return gr.DownloadButton(value=str(path), visible=True)


def export_bundle(lab, run_id: Any, fmt: Any):
    """Export the run's best model (shared/export) into `<run>/export/` and offer its zip for download. Both values
    come from the page's API: the run id is confined by the run store, the format checked against the list."""
    from shared.export import FORMATS, ExportError, default_bundle_dir, export_run, zip_bundle
    from shared.analysis.predict import resolve_run

    if not run_id:
        raise user_error("Pick a finished run first.", title="No run")
    if fmt not in FORMATS:
        raise user_error(f"unknown export format {shown(fmt)}; choose one of {', '.join(FORMATS)}",
                         title="Unknown format")
    try:
        if not isinstance(run_id, str) or len(run_id) > 120 or run_id == "latest":
            raise NoModelError(f"no run {shown(run_id)}")
        run_dir = lab.store.path(resolve_run(lab.store, run_id))
        bundle = export_run(run_dir, fmt, default_bundle_dir(run_dir, fmt))
    except NoModelError as exc:  # unknown, hostile, or not finished: one message
        raise user_error(str(exc), title="Model not available") from None
    except ExportError as exc:
        raise user_error(str(exc), title="Cannot export") from None
    path = zip_bundle(bundle)
    gr.Info(f"Bundle ready — press Download {path.name}.")
    return gr.DownloadButton(f"Download {path.name}", value=str(path), visible=True)


def activations(lab, run_id: str | None, image: Any):
    """One picture (an image payload, read through the guard for client files): a row per ResNet stage (conv1 …
    layer4) of its 8 strongest feature maps."""
    if not image:
        return None
    if not run_id:
        raise user_error("Pick a finished run first.", title="No run")
    from shared.analysis.explain import top_channels
    from shared.analysis.plots import plot_activations

    data, name = client_file(lab, image)
    try:
        predictor = lab.predictors.get(run_id)
    except NoModelError as exc:
        raise user_error(str(exc), title="Model not available") from None
    buffer = io.BytesIO(data)
    buffer.name = name  # messages name the user's file
    try:
        picture = load_rgb(buffer)
    except ImageError as exc:
        raise user_error(str(exc), title="Not a usable image") from None
    x = predictor.transform(picture).unsqueeze(0)
    with predictor._lock:  # the hooks must not interleave with a concurrent Grad-CAM on the same model
        channels = top_channels(predictor.model, predictor.spec, x, top=8)
    # the same sheet as the evaluation's activations.png, minus the input image (shown beside it already)
    return plot_activations(channels)


def pick_test_image(lab, run_id: str | None, rel: str | None):
    """The file of a test image listed in eval.json, confined to the run's dataset inside the data roots."""
    if not run_id or not rel:
        return gr.skip()
    try:
        data_dir = lab.store.config(run_id).data_dir
        root = confine_dataset_path(data_dir, lab.settings.data_roots)
    except PathError as exc:
        raise user_error(str(exc), title="Folder not allowed") from None
    except Exception:  # noqa: BLE001 - missing or damaged config.json
        raise user_error(f"cannot read the settings of run {run_id}", title="Unknown run") from None
    path = (root / rel).resolve()
    if root not in path.parents or not path.is_file():
        raise user_error(f"{rel} is not an image of this run's dataset", title="Not found")
    return str(path)


def wire(lab, ui: ResultsUI, *, tab: gr.Tab) -> None:
    outputs = {ui.metrics, ui.body, ui.per_class, ui.per_class_note, ui.confusion, ui.roc, ui.pr, ui.calibration,
               ui.tsne_panel, ui.tsne, ui.cams, ui.top_losses, ui.act_pick, ui.checkpoint_file, ui.report_file,
               ui.export_file, ui.state}
    show = dict(fn=partial(show_run, lab, ui), inputs=[ui.run, ui.confusion_mode, ui.state], outputs=outputs,
                api_visibility="private")
    # the plots' captions after their data (see ui/tabs/__init__.py: why it takes two steps)
    plots = {"roc": ui.roc, "pr": ui.pr, "calibration": ui.calibration, "tsne": ui.tsne}
    props = dict(fn=lambda st: plot_props_step(st, plots, ui.state), inputs=ui.state,
                 outputs={*plots.values(), ui.state}, api_visibility="private", show_progress="hidden")
    # the confusion cells' choices and most-confused pairs, after the rest (ui/tabs/cleanup.py)
    cells = dict(fn=partial(cleanup.fill_cells, lab, ui.cleanup), inputs=ui.run,
                 outputs=cleanup.cell_components(ui.cleanup), api_visibility="private", show_progress="hidden")
    gr.on([ui.run.input], trigger_mode="always_last", **show).then(**props).then(**cells)
    tab.select(partial(refresh, lab), ui.run, ui.run, api_visibility="private", show_progress="hidden").then(
        **show).then(**props).then(**cells)
    ui.refresh_btn.click(partial(refresh, lab), ui.run, ui.run, api_visibility="private").then(**show).then(
        **props).then(**cells)
    cleanup.wire(lab, ui.cleanup, ui.run)
    ui.confusion_mode.change(partial(switch_confusion, lab), [ui.run, ui.confusion_mode], ui.confusion,
                             api_visibility="private", queue=False, show_progress="hidden")
    ui.evaluate_btn.click(partial(evaluate_again, lab), ui.run, ui.metrics, api_visibility="private")
    ui.report_btn.click(partial(build_report, lab), ui.run, ui.report_file, api_visibility="private",
                        concurrency_limit=1)
    ui.export_btn.click(partial(export_bundle, lab), [ui.run, ui.export_format], ui.export_file,
                        api_name="export_run", concurrency_limit=1)
    # preprocess=False: Gradio's image preprocessing would open whatever path a payload without `meta` names;
    # the handler reads it through lab.files instead (ui/guard.py)
    ui.act_image.change(partial(activations, lab), [ui.run, ui.act_image], ui.activations, api_visibility="private",
                        concurrency_limit=2, preprocess=False)
    ui.act_pick.input(partial(pick_test_image, lab), [ui.run, ui.act_pick], ui.act_image, api_visibility="private")

    def run_results_api(run_id: str) -> dict:
        return run_results(lab, run_id)

    run_results_api.__doc__ = run_results.__doc__
    gr.api(run_results_api, api_name="run_results", concurrency_limit=None)
