"""The evaluation's figures: charts from its numbers, and photo grids (heat-maps, top losses, samples) drawn with the model."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np


# How many images the error galleries show.
TOP_LOSSES = 16
CAM_ERRORS = 6
CLASS_SAMPLES = 6


class FigureContext:
    """What the image figures need: the model, how to load an image as the model sees it, where to save."""

    def __init__(self, run_dir: Path, out_dir: Path, model, meta: dict, root: Path, device):
        from shared.data.transforms import eval_transform
        from shared.training.models import get_spec

        self.run_dir, self.out_dir, self.model, self.root, self.device = run_dir, out_dir, model, root, device
        self.classes = list(meta["classes"])
        self.spec = get_spec(meta["model_name"])
        self.mean = np.asarray(meta["mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(meta["std"], dtype=np.float32).reshape(3, 1, 1)
        self.transform = eval_transform(int(meta["image_size"]), meta["mean"], meta["std"])
        self.figures: dict[str, str] = {}
        self.cam_seconds = 0.0
        self.cam_caption = ""  # "LayerCAM (layer2+layer3+layer4), heat-map 16×16 over 128×128 input"

    def tensor(self, rel: str):
        return load_tensor(self.root, rel, self.transform)

    def view(self, tensor):
        """The normalised input tensor back as a PIL image: exactly the pixels the model saw."""
        from PIL import Image

        arr = tensor.detach().cpu().numpy() * self.std + self.mean
        return Image.fromarray((np.clip(arr, 0, 1) * 255 + 0.5).astype(np.uint8).transpose(1, 2, 0))

    def save(self, name: str, fig, dpi: int | None = None) -> None:
        from shared.analysis.plots import DPI, save_figure

        path = self.out_dir / f"{name}.png"
        save_figure(fig, path, dpi=dpi or DPI)
        self.figures[name] = path.relative_to(self.run_dir).as_posix()

    def cams(self, rels: list[str], targets: list[int]) -> list[np.ndarray]:
        """Heat-maps (the default method of `explain.create_cam`) of the images `rels` for the classes `targets`;
        `cam_caption` then names the method and the map's resolution."""
        import torch

        from shared.analysis.explain import create_cam

        t0 = time.perf_counter()
        cam = create_cam(self.model, self.spec)
        out: list[np.ndarray] = []
        for start in range(0, len(rels), 16):
            batch = torch.stack([self.tensor(r) for r in rels[start:start + 16]])
            maps, _ = cam.batch(batch, targets[start:start + 16])
            out.extend(maps)
            self.cam_caption = f"{cam.label}, {cam.resolution(batch.shape[-2:])}"
        self.cam_seconds += time.perf_counter() - t0
        return out


def render_figures(ctx: FigureContext, y: np.ndarray, probs: np.ndarray, losses: np.ndarray, paths: list[str],
                    result: dict, cam_per_class: int, after_cams: Callable[[], None], skip: set[str]) -> None:
    """Draw every figure not in `skip` (the figure level's names: CHART_FIGURES, COSTLY_FIGURES) into ctx."""
    from shared.analysis import plots
    from shared.analysis.eval_result import COSTLY_FIGURES
    from shared.runs.store import read_metrics

    classes = ctx.classes
    charts = {
        "curves": lambda: plots.plot_curves(records),
        "confusion": lambda: plots.plot_confusion(result["confusion"]["counts"], classes, normalize=False),
        "confusion_normalized": lambda: plots.plot_confusion(result["confusion"]["counts"], classes, normalize=True),
        "roc": lambda: plots.plot_roc(result["roc"], classes),
        "pr": lambda: plots.plot_pr(result["pr"], classes),
        "reliability": lambda: plots.plot_reliability(result["calibration"]),
        "tsne": lambda: plots.plot_tsne(result["tsne"], classes),
        "class_counts": lambda: plots.plot_class_counts(
            {row["class"]: row["support"] for row in result["per_class"]}, title="Images per class in this set"),
    }
    records = read_metrics(ctx.run_dir) if "curves" not in skip else []
    for name, draw in charts.items():
        if name not in skip and (name != "curves" or records):
            ctx.save(name, draw())
    if set(COSTLY_FIGURES) <= skip:
        after_cams()
        return
    _render_image_figures(ctx, y, probs, losses, paths, cam_per_class, after_cams)


def _render_image_figures(ctx: FigureContext, y: np.ndarray, probs: np.ndarray, losses: np.ndarray,
                          paths: list[str], cam_per_class: int, after_cams: Callable[[], None]) -> None:
    """The figures that load images again and run the model: Grad-CAM, top losses, class samples, activations."""
    from shared.analysis import plots

    classes = ctx.classes
    pred = probs.argmax(1)
    rng = np.random.default_rng(0)
    samples = _cam_samples(y, cam_per_class, rng)
    errors = [int(i) for i in np.argsort(-probs[np.arange(len(y)), pred]) if pred[i] != y[i]][:CAM_ERRORS]
    if samples:
        _cam_sample_figure(ctx, samples, y, pred, probs, paths)
    if errors:
        _cam_error_figure(ctx, errors, y, pred, probs, paths)
    after_cams()
    _top_loss_figure(ctx, losses, y, pred, probs, paths)
    _class_sample_figure(ctx, y, pred, paths, rng)
    if samples:
        from shared.analysis.explain import top_channels

        i = samples[0]
        x = ctx.tensor(paths[i])
        info = top_channels(ctx.model, ctx.spec, x, top=8)
        ctx.save("activations", plots.plot_activations(
            info, ctx.view(x), title=f"Strongest feature maps for {paths[i]} ({classes[y[i]]})"))


def _cam_samples(y: np.ndarray, per_class: int, rng) -> list[int]:
    chosen = []
    for k in np.unique(y):
        idx = np.nonzero(y == k)[0]
        chosen.extend(sorted(rng.choice(idx, min(per_class, len(idx)), replace=False).tolist()))
    return [int(i) for i in chosen]


def _short(name: str, width: int = 18) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def _cam_sample_figure(ctx, samples, y, pred, probs, paths) -> None:
    from shared.analysis import plots
    from shared.analysis.explain import overlay_cam

    cams = ctx.cams([paths[i] for i in samples], [int(pred[i]) for i in samples])
    images, titles = [], []
    for i, cam in zip(samples, cams):
        view = ctx.view(ctx.tensor(paths[i]))
        mark = "✓" if pred[i] == y[i] else "✗"
        images += [view, overlay_cam(view, cam)]
        titles += [f"{_short(ctx.classes[y[i]])}", f"{mark} map: {_short(ctx.classes[pred[i]])} "
                                                    f"{probs[i, pred[i]]:.2f}"]
    per_row = 2 * max(1, min(3, len(samples) // max(1, len(np.unique(y)))))
    ctx.save("cam_samples", plots.image_grid(
        images, titles, ncols=per_row,
        suptitle=f"Heat-map for the predicted class — true class on the left (✓ correct, ✗ wrong)\n"
                 f"{ctx.cam_caption}; outlined: at least half the peak, ring: the peak"))


def _cam_error_figure(ctx, errors, y, pred, probs, paths) -> None:
    from shared.analysis import plots
    from shared.analysis.explain import overlay_cam

    rels = [paths[i] for i in errors]
    cam_pred = ctx.cams(rels, [int(pred[i]) for i in errors])
    cam_true = ctx.cams(rels, [int(y[i]) for i in errors])
    images, titles = [], []
    for i, cp, ct in zip(errors, cam_pred, cam_true):
        view = ctx.view(ctx.tensor(paths[i]))
        images += [view, overlay_cam(view, cp), overlay_cam(view, ct)]
        titles += [f"true {_short(ctx.classes[y[i]])}",
                   f"map pred {_short(ctx.classes[pred[i]])} {probs[i, pred[i]]:.2f}",
                   f"map true {_short(ctx.classes[y[i]])} {probs[i, y[i]]:.2f}"]
    ctx.save("cam_errors", plots.image_grid(
        images, titles, ncols=3,
        suptitle=f"Most confident errors: heat-map for the predicted and the true class\n{ctx.cam_caption}"))


def _top_loss_figure(ctx, losses, y, pred, probs, paths) -> None:
    from shared.analysis import plots

    order = [int(i) for i in np.argsort(-losses)[:TOP_LOSSES]]
    images = [ctx.view(ctx.tensor(paths[i])) for i in order]
    titles = [f"{'✓' if pred[i] == y[i] else '✗'} true {_short(ctx.classes[y[i]], 14)}\n"
              f"pred {_short(ctx.classes[pred[i]], 14)} {probs[i, pred[i]]:.2f}\nloss {losses[i]:.2f}" for i in order]
    ctx.save("top_losses", plots.image_grid(images, titles, ncols=min(4, len(images)),
                                            suptitle="Top losses (highest cross-entropy first)"))


def _class_sample_figure(ctx, y, pred, paths, rng) -> None:
    from shared.analysis import plots

    picks = []
    for k in range(len(ctx.classes)):
        idx = np.nonzero(y == k)[0]
        picks.append(sorted(rng.choice(idx, min(CLASS_SAMPLES, len(idx)), replace=False).tolist()) if len(idx) else [])
    ncols = max(len(p) for p in picks)
    images, titles = [], []
    for k, pick in enumerate(picks):
        if not pick:
            continue  # a class absent from this set gets no empty row
        for col in range(ncols):
            if col < len(pick):
                i = pick[col]
                images.append(ctx.view(ctx.tensor(paths[i])))
                titles.append(_short(ctx.classes[k]) if pred[i] == y[i]
                              else f"{_short(ctx.classes[k], 12)} ✗ {_short(ctx.classes[pred[i]], 12)}")
            else:
                images.append(None)
                titles.append("")
    ctx.save("class_samples", plots.image_grid(
        images, titles, ncols=ncols,
        suptitle="Samples per class as the model sees them (resized, centre-cropped; ✗ = misclassified as)"))


def load_tensor(root: Path, rel: str, transform):
    from shared.data.images import load_rgb

    return transform(load_rgb(root / rel))
