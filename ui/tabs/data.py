"""Data tab: choose a dataset folder inside the data roots (or upload a .zip, or download the flowers set),
see its class counts and sample images at once, and run the full image check on demand."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import gradio as gr

from .. import data_view as view
from .. import formatting as fmt
from ..guard import FileRefused, UploadError
from ..paths import PathError, confine_dataset_path, discover_datasets, extract_zip, remove_stale_extractions
from . import user_error

log = logging.getLogger(__name__)

HELP = ("Pick a folder with **one sub-folder of images per class** (e.g. `flowers/daisy/*.jpg`). Folders are "
        "looked for in the data folders of this machine; you can also upload a .zip of class folders or "
        "download the flowers sample set.")
# Thumbnails in the sample grid: at most this many in all, a few per class.
SAMPLES_TOTAL = 40
SAMPLES_PER_CLASS = 4
THUMB_SIDE = 112
# What an uploaded .zip may expand to, as a multiple of the upload cap: images are compressed already, so a zip of
# them expands about 1x; more is a bomb, or a folder to copy in instead.
UPLOAD_EXPANSION = 2


@dataclass
class DataUI:
    data_dir: gr.Dropdown
    refresh_btn: gr.Button
    check_btn: gr.Button
    zip_upload: gr.File
    download_btn: gr.Button
    summary: gr.Markdown
    class_counts: gr.BarPlot
    problems: gr.Markdown
    sizes: gr.Markdown
    samples: gr.Gallery


def dataset_choices(lab) -> list[tuple[str, str]]:
    """(label, absolute path) for every dataset folder found under the data roots."""
    roots = [Path(r) for r in lab.settings.data_roots]
    out = []
    for path in discover_datasets(roots):
        root = next((r for r in roots if path == r.resolve() or r.resolve() in path.parents), None)
        label = str(path.relative_to(root.resolve())) if root and path != root.resolve() else path.name
        out.append((f"{label}   ({root or path.parent})", str(path)))
    return out


def build(lab) -> DataUI:
    remove_stale_extractions(lab.settings.upload_root)  # at page start: what crashed extractions left
    gr.Markdown(HELP, elem_classes="help")
    choices = dataset_choices(lab)
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            data_dir = gr.Dropdown(choices=choices, value=choices[0][1] if choices else None,
                                   allow_custom_value=True, label="Dataset folder", elem_id="data-dir",
                                   info="Choose a folder found in the data folders, or type a path inside them.")
            with gr.Row():
                check_btn = gr.Button("Check all images", variant="primary", elem_id="check-btn")
                refresh_btn = gr.Button("Refresh list", elem_id="refresh-data-btn")
        with gr.Column(scale=2):
            zip_upload = gr.File(label="…or upload a .zip of class folders", file_types=[".zip"],
                                 file_count="single", elem_id="zip-upload", height=110)
            download_btn = gr.Button("Download the flowers sample set (230 MB, 5 classes)", size="sm",
                                     elem_id="download-btn")
    summary = gr.Markdown(elem_id="data-summary")
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            # y from 0: with equal counts the automatic axis would span a single value and draw no bars
            class_counts = gr.BarPlot(x="class", y="images", title="Images per class", elem_id="class-counts",
                                      height=280, x_label_angle=-30, y_axis_format="d", y_lim=[0, None])
        with gr.Column(scale=2):
            problems = gr.Markdown(elem_id="data-problems")
            sizes = gr.Markdown(elem_id="data-sizes")
    samples = gr.Gallery(label="Samples per class", columns=8, height=300, elem_id="data-samples",
                         allow_preview=True, format="jpeg", object_fit="cover")
    return DataUI(data_dir, refresh_btn, check_btn, zip_upload, download_btn, summary, class_counts, problems,
                  sizes, samples)


# --- handlers -------------------------------------------------------------------------------------------------

def _confine(lab, path: str) -> Path:
    try:
        return confine_dataset_path(path, lab.settings.data_roots)
    except PathError as exc:
        raise user_error(str(exc), title="Folder not allowed") from None


def _samples(root: Path, scan) -> list[tuple]:
    """A few small thumbnails per class (decoded here, so the browser never fetches the originals)."""
    from shared.data.images import ImageError, load_rgb_resized

    per_class = max(1, min(SAMPLES_PER_CLASS, SAMPLES_TOTAL // max(1, len(scan.classes))))
    picked: dict[int, list[str]] = {}
    for path, label in scan.files:
        bucket = picked.setdefault(label, [])
        if len(bucket) < per_class:
            bucket.append(path)
    out = []
    for label in sorted(picked)[: SAMPLES_TOTAL]:
        for path in picked[label]:
            try:
                image = load_rgb_resized(root / path, THUMB_SIDE)
            except ImageError:
                continue
            out.append((image, scan.classes[label]))
    return out


def counts_plot(counts: dict[str, int]):
    # The data alone, not gr.BarPlot(value=..., y_lim=...): Gradio 6.31 applies such an update's y_lim but keeps
    # drawing the previous data, so picking another dataset left the old classes' bars on screen.
    return view.counts_frame(counts)


def _preview_outputs(ui: DataUI, summary: str, counts=None, samples=()) -> dict:
    """What the quick look shows: a summary, the counts (None: an empty plot), no check results yet, samples."""
    return {ui.summary: summary, ui.class_counts: counts, ui.problems: "", ui.sizes: "", ui.samples: list(samples)}


def preview(lab, ui: DataUI, path: str | None) -> dict:
    """Quick look when a folder is picked: class counts from file names and a few thumbnails (no full decode)."""
    if not path:
        if dataset_choices(lab):
            return _preview_outputs(ui, "Pick a dataset folder to see its classes.")
        return _preview_outputs(ui, view.no_dataset_text(lab.settings.data_roots))
    from shared.data.scan import DatasetError, scan_dataset

    root = _confine(lab, path)
    try:
        scan = scan_dataset(root, link_roots=lab.settings.data_roots)
    except DatasetError as exc:
        return _preview_outputs(ui, f"⚠ {fmt.md_escape(exc)}")
    counts = {name: 0 for name in scan.classes}
    for _, label in scan.files:
        counts[scan.classes[label]] += 1
    summary = view.scan_summary(len(scan.classes), len(scan.files), root)
    return _preview_outputs(ui, summary, counts_plot(counts), _samples(root, scan))


def check(lab, ui: DataUI, path: str | None, progress=gr.Progress()) -> dict:
    """The full check (every image decoded and hashed): counts, problems, sizes."""
    if not path:
        raise user_error("Pick a dataset folder first.", title="No dataset")
    from shared.data.check import check_dataset
    from shared.data.scan import DatasetError

    root = _confine(lab, path)
    progress(0, desc="decoding every image…")
    try:
        report = check_dataset(root, link_roots=lab.settings.data_roots)
    except DatasetError as exc:
        raise user_error(str(exc), title="Dataset not usable") from None
    sizes = view.size_stats_markdown(report.get("sizes"))
    return {ui.summary: view.check_summary(report, root), ui.class_counts: counts_plot(report["counts"]),
            ui.problems: view.problems_markdown(report), ui.sizes: ("**Image sizes**\n\n" + sizes) if sizes else ""}


def refresh(lab, current: str | None):
    choices = dataset_choices(lab)
    if not current and choices:
        current = choices[0][1]
    return gr.Dropdown(choices=choices, value=current)


def upload_zip(lab, file_path: str | None):
    """Extract an uploaded .zip into the first data root and select the dataset inside it."""
    if not file_path:
        return gr.skip()
    settings = lab.settings
    try:  # Gradio lets a payload naming a file in the models folder through (a static path): only uploads here
        file_path = str(lab.files.checked_path(file_path))
    except FileRefused as exc:
        raise user_error(str(exc), title="Upload the archive again") from None
    except UploadError as exc:
        raise user_error(str(exc), title="Archive refused") from None
    try:
        done = extract_zip(file_path, settings.upload_root, name=Path(file_path).name,
                           max_bytes=settings.max_upload_mb * UPLOAD_EXPANSION * 1_000_000,
                           max_total_bytes=int(settings.uploads_max_gb * 1e9) if settings.uploads_max_gb else None)
    except PathError as exc:
        raise user_error(str(exc), title="Archive refused") from None
    finally:
        _forget_upload(file_path)
    folder = done.folder
    gr.Info(f"Extracted {done.images} images into {folder}.")
    if done.skipped:
        gr.Warning(f"Left out {len(done.skipped)} file(s) that are not images, e.g. {done.skipped[0]}.")
    choices = dataset_choices(lab)
    if str(folder) not in [v for _, v in choices]:
        choices.append((f"{folder.name}   (uploaded)", str(folder)))
    return gr.Dropdown(choices=choices, value=str(folder))


def _forget_upload(file_path: str) -> None:
    """Delete the uploaded archive from Gradio's upload folder once it is extracted (or refused): otherwise every
    upload would stay on disk for a day, until Gradio's own cleanup."""
    from gradio.utils import get_upload_folder

    path = Path(file_path).resolve()
    if Path(get_upload_folder()).resolve() in path.parents:
        path.unlink(missing_ok=True)


def download(lab, progress=gr.Progress()):
    from shared.data.download import DownloadError, download_flowers

    progress(0, desc="downloading the flowers set (about 230 MB)…")
    try:
        folder = download_flowers(lab.settings.upload_root, progress=False)
    except DownloadError as exc:
        raise user_error(str(exc), title="Download failed") from None
    choices = dataset_choices(lab)
    return gr.Dropdown(choices=choices, value=str(folder))


def wire(lab, ui: DataUI) -> None:
    preview_outputs = {ui.summary, ui.class_counts, ui.problems, ui.sizes, ui.samples}
    # triggers=None: on page load and whenever the folder changes
    gr.on(None, partial(preview, lab, ui), ui.data_dir, preview_outputs, api_visibility="private",
          trigger_mode="always_last")
    # a list, not a set: its order is the order of the `check_dataset` API's answer
    ui.check_btn.click(partial(check, lab, ui), ui.data_dir, [ui.summary, ui.class_counts, ui.problems, ui.sizes],
                       api_name="check_dataset", concurrency_limit=1)
    ui.refresh_btn.click(partial(refresh, lab), ui.data_dir, ui.data_dir, api_visibility="private")
    ui.zip_upload.upload(partial(upload_zip, lab), ui.zip_upload, ui.data_dir, api_visibility="private",
                         concurrency_limit=1)
    ui.download_btn.click(partial(download, lab), None, ui.data_dir, api_visibility="private", concurrency_limit=1)
