"""Results tab: everything the evaluation of one finished run found, from `<run>/eval/eval.json` and its figures.

Plots whose data are in eval.json (ROC, PR, calibration, t-SNE) are drawn interactively by the browser; the
confusion matrix is an HTML table (counts or normalised, switched without a round trip to the model); the
Grad-CAM and top-loss galleries show the PNGs the evaluation wrote. Layer activations are computed here, in
the page process, for an image the user picks.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd

from shared.images import ImageError, load_rgb
from shared.predict import NoModelError

from .. import formatting as fmt
from ..client import QueueUnavailable
from ..paths import PathError, confine_dataset_path
from . import park_plot_props, plot_props_step, user_error

log = logging.getLogger(__name__)

HELP = ("Pick a finished run to see how it does on images it never trained on: per-class scores, which classes "
        "it confuses, how confident it is, and where it looks.")
EMPTY_CURVE = pd.DataFrame(columns=["x", "y", "curve"])
EMPTY_TSNE = pd.DataFrame(columns=["x", "y", "true class", "predicted", "correct"])
# Gallery sections of eval.json, with the keys each may use for the image path and its caption parts.
CAM_KEYS = ("gradcam", "grad_cam", "cams", "cam")
TOP_LOSS_KEYS = ("top_losses", "top_loss", "toplosses", "worst")


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
    tsne: gr.ScatterPlot
    cams: gr.Gallery
    top_losses: gr.Gallery
    act_pick: gr.Dropdown
    act_image: gr.Image
    activations: gr.Image
    report_btn: gr.Button
    report_file: gr.DownloadButton
    checkpoint_file: gr.DownloadButton
    state: gr.State


def run_choices(lab) -> list[tuple[str, str]]:
    import time

    now = time.time()
    return [(fmt.run_choice_label(r, now), r["run_id"]) for r in lab.succeeded_runs()]


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
            tsne = gr.ScatterPlot(EMPTY_TSNE, x="x", y="y", color="true class", title="t-SNE of the test features",
                                  tooltip=["true class", "predicted", "correct"], height=320, elem_id="tsne",
                                  x_axis_labels_visible="hidden", x_title=" ", y_title=" ")
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
    state = gr.State({})
    return ResultsUI(run, refresh_btn, evaluate_btn, metrics, body, per_class, per_class_note, confusion_mode,
                     confusion, roc, pr, calibration, tsne, cams, top_losses, act_pick, act_image, activations,
                     report_btn, report_file, checkpoint_file, state)


# --- reading eval.json --------------------------------------------------------------------------------------

def load_eval(lab, run_id: str) -> dict | None:
    path = lab.store.path(run_id) / "eval" / "eval.json"
    try:
        report = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("unreadable %s: %s", path, exc)
        return None
    if not isinstance(report, dict):
        log.warning("unreadable %s: it holds a JSON %s, not an object", path, type(report).__name__)
        return None
    return report


def no_eval_text(lab, run_id: str) -> str:
    """Why a run shows no results: no eval.json yet, or one that cannot be read (see `load_eval`)."""
    if (lab.store.path(run_id) / "eval" / "eval.json").exists():
        return ("This run's evaluation file (eval/eval.json) is empty or damaged. Press **Evaluate again** to write "
                "it anew.")
    return "This run has no evaluation yet (it runs right after training). Press **Evaluate again** to queue one."


def _classes(report: dict, run_dir: Path) -> list[str]:
    classes = report.get("classes")
    if not classes:
        config = {}
        try:
            config = json.loads((run_dir / "config.json").read_text())
        except (OSError, ValueError):
            pass
        classes = config.get("classes") or []
    return [str(c) for c in classes]


def _matrix(report: dict, mode: str) -> list[list[float]]:
    conf = report.get("confusion") or {}
    if isinstance(conf, dict):
        matrix = conf.get(mode) or conf.get("normalised" if mode == "normalized" else mode)
        if matrix is None and mode == "normalized" and conf.get("counts"):
            counts = np.asarray(conf["counts"], dtype=float)
            matrix = (counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)).tolist()
        return matrix or []
    return conf if isinstance(conf, list) else []


def _gallery_items(report: dict, run_dir: Path, keys: tuple[str, ...], name_hint: str) -> list[tuple[str, str]]:
    """(image path, caption) from an eval.json list section, else from figures whose name matches the hint."""
    eval_dir = run_dir / "eval"
    for key in keys:
        section = report.get(key)
        if isinstance(section, list) and section:
            out = []
            for item in section:
                if isinstance(item, str):
                    item = {"image": item}
                path = item.get("image") or item.get("overlay") or item.get("cam") or item.get("path")
                if not path:
                    continue
                full = _inside(run_dir, eval_dir / path)
                if full is None:
                    continue
                out.append((str(full), _caption(item)))
            if out:
                return out
    figures = report.get("figures") or {}
    out = []
    for name, rel in sorted(figures.items()):
        if name_hint in name.lower():
            full = _inside(run_dir, eval_dir / rel) or _inside(run_dir, run_dir / rel)
            if full is not None:
                out.append((str(full), name.replace("_", " ")))
    return out


def _caption(item: dict) -> str:
    true, pred = item.get("true") or item.get("label"), item.get("pred") or item.get("predicted")
    parts = []
    if true is not None and pred is not None:
        parts.append(f"{true} → {pred}")
    prob = item.get("prob") or item.get("probability") or item.get("confidence")
    if isinstance(prob, (int, float)):
        parts.append(f"{100 * prob:.0f}%")
    loss = item.get("loss")
    if isinstance(loss, (int, float)):
        parts.append(f"loss {loss:.2f}")
    return " · ".join(parts)


def _inside(run_dir: Path, path: Path) -> Path | None:
    """`path` resolved, when it is a file inside the run folder (eval.json is data, not a licence to serve)."""
    try:
        resolved = path.resolve()
    except OSError:
        return None
    root = run_dir.resolve()
    return resolved if resolved.is_file() and root in resolved.parents else None


# --- handlers -----------------------------------------------------------------------------------------------

def _download(path: Path) -> gr.DownloadButton:
    return gr.DownloadButton(value=str(path), visible=True) if path.is_file() else gr.DownloadButton(visible=False)


PLOTS = ["roc", "pr", "calibration", "tsne"]
PLOT_KINDS = [gr.LinePlot, gr.LinePlot, gr.LinePlot, gr.ScatterPlot]


def show_run(lab, run_id: str | None, mode: str, state: dict | None = None):
    """All outputs for one run (15): metrics, body, per-class table and its note, confusion, roc, pr, calibration,
    tsne, galleries, test-image choices, checkpoint and report downloads, state (with the plots' captions parked)."""
    state = {**(state or {}), "run_id": run_id}
    hidden = (gr.Column(visible=False), None, "", "", EMPTY_CURVE, EMPTY_CURVE, EMPTY_CURVE, EMPTY_TSNE, [], [],
              gr.Dropdown(choices=[], value=None), gr.DownloadButton(visible=False), gr.DownloadButton(visible=False),
              state)
    if not run_id:
        return ("No finished run yet — train one on the **Train** tab; its results appear here.",) + hidden
    try:
        run_dir = lab.store.path(run_id)
    except Exception:  # noqa: BLE001 - an id typed into the dropdown
        raise user_error(f"no run {run_id!r}", title="Unknown run") from None
    report = load_eval(lab, run_id)
    if report is None:
        return ((no_eval_text(lab, run_id),) + hidden[:11]
                + (_download(run_dir / "best.pt"), gr.DownloadButton(visible=False), state))
    classes = _classes(report, run_dir)
    headers, rows = fmt.per_class_rows(report.get("per_class"))
    per_class = pd.DataFrame(rows, columns=headers) if rows else None
    confusion = fmt.confusion_html(_matrix(report, mode), classes, mode == "normalized")
    roc = fmt.roc_frames(report.get("roc") or {}, "fpr", "tpr")
    pr = fmt.roc_frames(report.get("pr") or {}, "recall", "precision")
    calibration = fmt.calibration_frame(report.get("calibration"))
    tsne = fmt.tsne_frame(report.get("tsne"), classes)
    cams = _gallery_items(report, run_dir, CAM_KEYS, "cam")
    losses = _gallery_items(report, run_dir, TOP_LOSS_KEYS, "loss")
    paths = list(dict.fromkeys((report.get("tsne") or {}).get("path") or []))
    picks = gr.Dropdown(choices=[(p, p) for p in paths[:500]], value=None)
    suffix, n = run_id.rsplit("-", 1)[-1], report.get("n") or len(tsne)
    park_plot_props(state, "roc", caption=f"run {suffix}: each class against the rest, with micro and macro averages")
    park_plot_props(state, "pr", caption=f"run {suffix}: average precision (AP) per class in the legend")
    park_plot_props(state, "calibration", caption=f"run {suffix}: points on the diagonal are calibrated; below it, "
                                                  "over-confident")
    park_plot_props(state, "tsne", caption=f"run {suffix}: {n} test images; hover a point for its predicted class")
    note = fmt.per_class_note(report.get("per_class"))
    return (fmt.metrics_markdown(report), gr.Column(visible=True), per_class, note, confusion, roc, pr, calibration,
            tsne, cams, losses, picks, _download(run_dir / "best.pt"), _download(run_dir / "report.html"), state)


def switch_confusion(lab, run_id: str | None, mode: str) -> str:
    if not run_id:
        return ""
    report = load_eval(lab, run_id)
    if report is None:
        return ""
    return fmt.confusion_html(_matrix(report, mode), _classes(report, lab.store.path(run_id)), mode == "normalized")


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
    gr.Info("Evaluation queued; press Refresh list when the worker is done.")
    return "Evaluation queued — the worker runs it after the current training step; reload this run when it is done."


def build_report(lab, run_id: str | None):
    if not run_id:
        raise user_error("Pick a finished run first.", title="No run")
    try:
        from shared.report import write_report
    except ImportError:
        raise user_error("The HTML report is not available in this version.", title="Not available") from None
    try:
        path = write_report(lab.store.path(run_id))
    except FileNotFoundError as exc:
        raise user_error(f"cannot build the report yet: {exc}", title="Report unavailable") from None
    gr.Info("Report ready — press Download report.html.")
    return gr.DownloadButton(value=str(path), visible=True)


def activations(lab, run_id: str | None, image: str | None):
    """One picture: a row per ResNet stage (conv1 … layer4) of its 8 strongest feature maps."""
    if not image:
        return None
    if not run_id:
        raise user_error("Pick a finished run first.", title="No run")
    from shared.explain import layer_activations

    try:
        predictor = lab.predictors.get(run_id)
    except NoModelError as exc:
        raise user_error(str(exc), title="Model not available") from None
    try:
        picture = load_rgb(image)
    except ImageError as exc:
        raise user_error(str(exc).replace(str(image), Path(image).name), title="Not a usable image") from None
    x = predictor.transform(picture).unsqueeze(0)
    with predictor._lock:  # the hooks must not interleave with a concurrent Grad-CAM on the same model
        maps = layer_activations(predictor.model, x, top=8)
    return activation_sheet(maps)


def activation_sheet(maps: dict[str, list[np.ndarray]], tile: int = 88, gap: int = 4, label_width: int = 120):
    """Feature maps as a grid: one labelled row per stage, each map scaled to [0, 1] on its own (viridis)."""
    from matplotlib import colormaps
    from PIL import Image, ImageDraw, ImageFont

    cmap = colormaps["viridis"]
    try:
        font = ImageFont.load_default(size=15)
    except TypeError:  # Pillow < 10.1: the bitmap font has one size
        font = ImageFont.load_default()
    columns = max((len(v) for v in maps.values()), default=1)
    width = label_width + columns * (tile + gap)
    sheet = Image.new("RGB", (width, max(1, len(maps)) * (tile + gap)), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (stage, stage_maps) in enumerate(maps.items()):
        top = row * (tile + gap)
        size = f"{stage_maps[0].shape[1]} x {stage_maps[0].shape[0]}" if stage_maps else ""
        draw.text((8, top + tile // 2 - 18), stage, fill=(30, 30, 30), font=font)
        draw.text((8, top + tile // 2 + 2), size, fill=(110, 110, 110), font=font)
        for col, m in enumerate(stage_maps):
            m = np.asarray(m, dtype=np.float32)
            lo, hi = float(m.min()), float(m.max())
            norm = (m - lo) / (hi - lo) if hi > lo else np.zeros_like(m)
            rgb = Image.fromarray((cmap(norm)[..., :3] * 255).astype(np.uint8)).resize((tile, tile), Image.NEAREST)
            sheet.paste(rgb, (label_width + col * (tile + gap), top))
    return sheet


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
    outputs = [ui.metrics, ui.body, ui.per_class, ui.per_class_note, ui.confusion, ui.roc, ui.pr, ui.calibration,
               ui.tsne, ui.cams, ui.top_losses, ui.act_pick, ui.checkpoint_file, ui.report_file, ui.state]
    show = dict(fn=partial(show_run, lab), inputs=[ui.run, ui.confusion_mode, ui.state], outputs=outputs,
                api_visibility="private")
    # the plots' captions after their data (see ui/tabs/__init__.py: why it takes two steps)
    props = dict(fn=lambda st: plot_props_step(st, PLOTS, PLOT_KINDS), inputs=ui.state,
                 outputs=[ui.roc, ui.pr, ui.calibration, ui.tsne, ui.state], api_visibility="private",
                 show_progress="hidden")
    gr.on([ui.run.input], trigger_mode="always_last", **show).then(**props)
    tab.select(partial(refresh, lab), ui.run, ui.run, api_visibility="private", show_progress="hidden").then(
        **show).then(**props)
    ui.refresh_btn.click(partial(refresh, lab), ui.run, ui.run, api_visibility="private").then(**show).then(**props)
    ui.confusion_mode.change(partial(switch_confusion, lab), [ui.run, ui.confusion_mode], ui.confusion,
                             api_visibility="private", queue=False, show_progress="hidden")
    ui.evaluate_btn.click(partial(evaluate_again, lab), ui.run, ui.metrics, api_visibility="private")
    ui.report_btn.click(partial(build_report, lab), ui.run, ui.report_file, api_visibility="private",
                        concurrency_limit=1)
    ui.act_image.change(partial(activations, lab), [ui.run, ui.act_image], ui.activations, api_visibility="private",
                        concurrency_limit=2)
    ui.act_pick.input(partial(pick_test_image, lab), [ui.run, ui.act_pick], ui.act_image, api_visibility="private")

    def run_results(run_id: str) -> dict:
        """A finished run's evaluation summary: accuracy, per_class, classes, confusion counts and the names of
        the figures (no images)."""
        report = load_eval(lab, run_id)
        if report is None:
            raise user_error(f"run {run_id!r}: " + no_eval_text(lab, run_id).replace("**", ""), title="No results")
        keep = ("accuracy", "top5_accuracy", "macro_f1", "balanced_accuracy", "loss", "split", "classes",
                "per_class", "num_images")
        out = {k: report[k] for k in keep if k in report}
        out["confusion"] = {"counts": _matrix(report, "counts")}
        out["figures"] = sorted((report.get("figures") or {}).keys())
        return out

    gr.api(run_results, api_name="run_results", concurrency_limit=None)
