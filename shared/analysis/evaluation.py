"""Evaluate a run's best checkpoint: metrics (scikit-learn), curves, calibration, t-SNE, Grad-CAM, galleries.

`evaluate_run(run_dir)` writes one folder per evaluated set and returns what it wrote to `eval.json`:

    <run_dir>/eval/                 the run's own test split (the default, what the page shows)
    <run_dir>/eval-<split>/         another split of the run's split.json, e.g. eval-val/
    <run_dir>/eval-folder-<name>/   every image of another folder (class sub-folders), <name> from its folder name

The numbers come from `shared.analysis.metrics` (pure: arrays in, JSON-ready dict out), the pictures from
`shared.analysis.figures`. eval.json's layout is `shared.analysis.eval_result.EvalResult` (its readers load it with
`load_eval_result`). `figures="basic"` or `"none"` (env RESNET_LAB_EVAL_FIGURES) skips the costly figures, e.g. for
tests that do not look at them; eval.json records which were skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shared.analysis.figures import FigureContext, load_tensor, render_figures
from shared.analysis.metrics import compute_metrics, json_list, json_number
from shared.fsutil import write_atomic

logger = logging.getLogger(__name__)

# t-SNE above this many points gets a seeded random subset (time grows ~N log N; 5,000 stays well under a minute).
TSNE_MAX_POINTS = 5000


def eval_dir_for(run_dir: Path, split: str = "test", data_dir: str | os.PathLike | None = None) -> Path:
    """Where evaluate_run writes: eval/ (test split), eval-<split>/ (another split), eval-folder-<name>/ (a folder)."""
    run_dir = Path(run_dir)
    if data_dir is not None:
        name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(data_dir).expanduser().resolve().name).strip("._") or "data"
        return run_dir / f"eval-folder-{name}"
    return run_dir / ("eval" if split == "test" else f"eval-{split}")


def evaluate_run(run_dir: str | os.PathLike, *, split: str = "test", data_dir: str | os.PathLike | None = None,
                 batch_size: int = 64, device: str = "cpu", cam_samples_per_class: int = 2,
                 progress: Callable[[int, int], None] | None = None, figures: str = "all",
                 data_roots: Sequence[Path] | None = None) -> dict:
    """Run the best checkpoint over a split (or a folder with the same classes) and write eval.json + figures.

    figures: "all"; "basic" (charts only: no t-SNE, Grad-CAM or image galleries); "none" (eval.json only).
    progress(done, total) counts images, then three more steps: t-SNE, Grad-CAM, figures.
    Unreadable images are skipped and listed under `skipped`. Returns eval.json's contents (`EvalResult.to_dict()`).
    `data_roots` (the worker's): links in `data_dir` that lead outside them are not read (see `scan_dataset`).
    """
    import torch

    from shared.training.checkpoint import load_model_from_run
    from shared.analysis.eval_result import EvalResult, skipped_figures_for

    skipped_figures = skipped_figures_for(figures)  # refuses an unknown level before any work
    started = time.perf_counter()
    run_dir = Path(run_dir)
    out_dir = eval_dir_for(run_dir, split, data_dir)
    model, meta = load_model_from_run(run_dir, "best")
    classes = list(meta["classes"])
    root, items, source = _collect_items(run_dir, split, data_dir, classes, data_roots)
    total = len(items) + 3
    report = progress or (lambda done, total: None)

    torch_device = torch.device(device)
    model.to(torch_device)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    calibration = _calibration_or_none(run_dir)
    tta = bool((meta.get("config") or {}).get("tta", False))
    outputs = _predict_items(model, meta, root, items, batch_size, torch_device,
                             lambda done: report(done, total), tta=tta,
                             temperature=calibration.temperature if calibration else 1.0)
    timings["inference_s"] = round(time.perf_counter() - t0, 2)
    if not outputs["labels"]:
        raise ValueError(f"none of the {len(items)} images in {source} could be read — see the log for the errors")

    y = np.asarray(outputs["labels"])
    probs = np.asarray(outputs["probs"])
    paths = outputs["paths"]
    result = {"run_id": run_dir.name, "split": split if data_dir is None else "folder", "source": source,
              "model": meta.get("model_name"), "image_size": int(meta["image_size"]),
              **compute_metrics(y, probs, classes, paths),
              "skipped": outputs["skipped"]}
    result["notes"] = list(result.get("notes", []))
    if calibration:
        result["notes"].append(f"probabilities are temperature-scaled (T = {calibration.temperature:.3f}, fitted on "
                               f"the validation split), as in prediction")
    if tta:
        result["notes"].append("flip test-time augmentation: each image and its mirror averaged")
    if outputs["skipped"]:
        result["notes"].append(f"{len(outputs['skipped'])} unreadable image(s) skipped (see 'skipped')")
    # per image, for the page's confusion-matrix click-through (a cell's images with their confidence)
    result["predictions"] = {"path": list(paths), "label": y.tolist(), "pred": probs.argmax(1).tolist(),
                             "confidence": json_list(probs.max(1), 4)}
    losses = np.asarray(outputs["losses"])
    result["losses"] = {"mean": json_number(losses.mean()), "max": json_number(losses.max())}

    t0 = time.perf_counter()
    result["tsne"] = None
    if "tsne" not in skipped_figures:
        result["tsne"] = _tsne(np.asarray(outputs["features"]), y, probs.argmax(1), paths, result["notes"])
    timings["tsne_s"] = round(time.perf_counter() - t0, 2)
    report(len(items) + 1, total)

    out_dir.mkdir(exist_ok=True)  # not parents: a run folder deleted meanwhile must not come back
    t0 = time.perf_counter()
    context = FigureContext(run_dir, out_dir, model, meta, root, torch_device)
    render_figures(context, y, probs, losses, paths, result, cam_samples_per_class,
                    lambda: report(len(items) + 2, total), skip=set(skipped_figures))
    timings["cam_s"] = round(context.cam_seconds, 2)
    timings["figures_s"] = round(time.perf_counter() - t0 - context.cam_seconds, 2)
    report(total, total)
    result.update(figures=context.figures, figure_level=figures, skipped_figures=skipped_figures)
    timings["total_s"] = round(time.perf_counter() - started, 2)
    result["timings"] = timings
    # through the schema: a writer bug fails here, not later in every reader
    result = EvalResult.from_dict(result, where=f"the evaluation of {run_dir.name}").to_dict()
    _write_json(out_dir / "eval.json", result)
    logger.info("evaluated %s on %d images (%s): accuracy %.3f in %.1f s", run_dir.name, result["n"], source,
                result["accuracy"], timings["total_s"])
    return result


def _calibration_or_none(run_dir: Path):
    """The run's calibration; None for a run without one (or with a damaged file, said in the log)."""
    from shared.analysis.calibration import CalibrationError, read_calibration

    try:
        return read_calibration(run_dir)
    except CalibrationError as exc:
        logger.warning("evaluating with T = 1: %s", exc)
        return None


def _collect_items(run_dir: Path, split: str, data_dir, classes: list[str], data_roots: Sequence[Path] | None = None
                   ) -> tuple[Path, list[tuple[str, int]], str]:
    """(root, [(path relative to root, label)], description) for the run's split or another folder."""
    from shared.data.manifest import read_manifest
    from shared.data.scan import scan_dataset

    if data_dir is not None:
        scan = scan_dataset(data_dir, link_roots=data_roots)
        unknown = sorted(set(scan.classes) - set(classes))
        if unknown:
            raise ValueError(f"{scan.root} has class folders the model was not trained on: {', '.join(unknown)}; "
                             f"the model knows {', '.join(classes)} — evaluate a folder with the same class names "
                             f"(a subset is fine)")
        items = [(path, classes.index(scan.classes[label])) for path, label in scan.files]
        return scan.root, items, str(scan.root)
    manifest = read_manifest(run_dir / "split.json")
    if list(manifest["classes"]) != classes:
        raise ValueError(f"split.json lists classes {manifest['classes']} but the checkpoint has {classes} — "
                         f"the run folder is inconsistent; retrain or evaluate with --data-dir")
    root = Path(manifest["root"])
    if not root.is_dir():
        raise ValueError(f"the run's dataset folder {root} no longer exists — pass data_dir (--data-dir) to "
                         f"evaluate on a folder with the same classes")
    splits = sorted({f["split"] for f in manifest["files"]})
    items = [(f["path"], int(f["label"])) for f in manifest["files"] if f["split"] == split]
    if not items:
        raise ValueError(f"the run's {split!r} split has no images (splits with images: {', '.join(splits)}) — "
                         f"choose another split")
    return root, items, f"{split} split of {root}"


def _predict_items(model, meta: dict, root: Path, items: list[tuple[str, int]], batch_size: int, device,
                   on_progress: Callable[[int], None], *, tta: bool = False, temperature: float = 1.0) -> dict:
    """Probabilities, per-image losses and penultimate features for every readable image; logits divided by the
    run's `temperature` and flip-averaged with `tta`, as the predictor does."""
    import torch
    import torch.nn.functional as F

    from shared.analysis.explain import FeatureRecorder
    from shared.data.images import ImageError
    from shared.data.transforms import eval_transform

    transform = eval_transform(int(meta["image_size"]), meta["mean"], meta["std"])
    out: dict[str, list] = {"paths": [], "labels": [], "probs": [], "losses": [], "skipped": []}
    from shared.training.models import get_spec

    with FeatureRecorder(model, get_spec(meta["model_name"])) as recorder, torch.no_grad():
        for start in range(0, len(items), batch_size):
            tensors, labels = [], []
            for rel, label in items[start:start + batch_size]:
                try:
                    tensors.append(load_tensor(root, rel, transform))
                except (ImageError, OSError) as exc:
                    logger.warning("skipping %s: %s", rel, exc)
                    out["skipped"].append({"path": rel, "error": str(exc)})
                    continue
                out["paths"].append(rel)
                labels.append(label)
            if tensors:
                x = torch.stack(tensors).to(device)
                logits = model(x).float()
                if tta:  # as the run was validated: image and mirror averaged (features: the image's only)
                    recorder.paused = True
                    logits = (logits + model(x.flip(3)).float()) / 2
                    recorder.paused = False
                logits = logits / temperature
                target = torch.as_tensor(labels, device=logits.device)
                out["probs"].extend(logits.softmax(1).cpu().numpy())
                out["losses"].extend(F.cross_entropy(logits, target, reduction="none").cpu().numpy().tolist())
                out["labels"].extend(labels)
            on_progress(min(start + batch_size, len(items)))
    out["features"] = recorder.features()
    return out


def _tsne(features: np.ndarray, y: np.ndarray, pred: np.ndarray, paths: list[str], notes: list[str]) -> dict:
    from shared.analysis.explain import tsne_embed

    index = np.arange(len(y))
    if len(index) > TSNE_MAX_POINTS:
        index = np.sort(np.random.default_rng(0).choice(len(y), TSNE_MAX_POINTS, replace=False))
        notes.append(f"t-SNE shows a random {TSNE_MAX_POINTS} of {len(y)} images")
    t0 = time.perf_counter()
    emb = tsne_embed(features[index], seed=0)
    return {"x": json_list(emb[:, 0], 3), "y": json_list(emb[:, 1], 3), "label": y[index].tolist(),
            "pred": pred[index].tolist(), "path": [paths[i] for i in index],
            "seconds": round(time.perf_counter() - t0, 2)}


def _write_json(path: Path, data: dict) -> None:
    # allow_nan=False: the page and other tools parse this with strict JSON parsers
    write_atomic(path, json.dumps(data, indent=1, allow_nan=False))
