"""Evaluate a run's best checkpoint: metrics (scikit-learn), curves, calibration, t-SNE, Grad-CAM, galleries.

`evaluate_run(run_dir)` writes one folder per evaluated set and returns what it wrote to `eval.json`:

    <run_dir>/eval/                 the run's own test split (the default, what the page shows)
    <run_dir>/eval-<split>/         another split of the run's split.json, e.g. eval-val/
    <run_dir>/eval-folder-<name>/   every image of another folder (class sub-folders), <name> from its folder name

`compute_metrics(y_true, probs, classes)` is the pure part (arrays in, JSON-ready dict out). eval.json's layout is
`shared.analysis.eval_result.EvalResult` (its readers load it with `load_eval_result`). It is strict JSON (no NaN): a number
that is undefined (recall of a class with no images, ROC of a class absent from the set) is left out or null, and
`notes` says why. `figures="basic"` or `"none"` (env RESNET_LAB_EVAL_FIGURES) skips the costly figures, e.g. for
tests that do not look at them; eval.json records which were skipped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shared.fsutil import write_atomic

logger = logging.getLogger(__name__)

# Curves are stored for drawing, not for re-computing AUC (that uses every point): this many points at most.
MAX_CURVE_POINTS = 200
# Equal-width confidence bins for ECE and the reliability diagram (15, as in Guo et al. 2017, arXiv:1706.04599).
CALIBRATION_BINS = 15
# t-SNE above this many points gets a seeded random subset (time grows ~N log N; 5,000 stays well under a minute).
TSNE_MAX_POINTS = 5000
# How many images the error galleries show.
TOP_LOSSES = 16
CAM_ERRORS = 6
CLASS_SAMPLES = 6


# --- pure metrics ------------------------------------------------------------------------------------------------

def compute_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str],
                    paths: Sequence[str] | None = None) -> dict:
    """Every number of eval.json that depends only on labels and probabilities.

    y_true: (N,) class indices; probs: (N, C) probabilities (rows sum to 1); classes: C names; paths (optional):
    N image paths, listed per off-diagonal confusion cell. Averages (macro, weighted) follow scikit-learn's
    default: over the classes present in y_true or predicted, zero_division=0.
    """
    from sklearn import metrics as skm

    classes = list(classes)
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true, dtype=np.int64).reshape(-1)
    n, c = len(y_true), len(classes)
    if probs.shape != (n, c):
        raise ValueError(f"expected probabilities of shape ({n}, {c}) for {n} labels and {c} classes, "
                         f"got {probs.shape}")
    if n == 0:
        raise ValueError("no samples to evaluate")
    if y_true.min() < 0 or y_true.max() >= c:
        raise ValueError(f"labels must be in 0..{c - 1}, got {y_true.min()}..{y_true.max()}")
    y_pred = probs.argmax(1)
    labels = list(range(c))
    notes: list[str] = []
    absent = [classes[k] for k in labels if not np.any(y_true == k)]
    if absent:
        notes.append(f"no images of {', '.join(absent)} in this set: their recall, ROC and PR are undefined "
                     f"and left out; averages cover the classes present or predicted")

    p, r, f1, support = skm.precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=np.nan)
    per_class = [{"class": classes[k], "precision": _num(p[k]), "recall": _num(r[k]), "f1": _num(f1[k]),
                  "support": int(support[k])} for k in labels]
    averages = {}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        averages[avg] = {"precision": _num(ap), "recall": _num(ar), "f1": _num(af)}

    k_top = min(5, c)
    counts = skm.confusion_matrix(y_true, y_pred, labels=labels)
    row_sums = counts.sum(1, keepdims=True)
    normalized = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=np.float64), where=row_sums > 0)
    true_prob = probs[np.arange(n), y_true]
    return {
        "n": int(n),
        "classes": classes,
        "accuracy": _num(skm.accuracy_score(y_true, y_pred)),
        # mean recall over the classes with images (= balanced_accuracy_score, without its warning about the others)
        "balanced_accuracy": _num(np.mean(r[support > 0])),
        "loss": _num(float(np.mean(-np.log(np.clip(true_prob, 1e-12, 1.0))))),
        "top_k": k_top,
        "top_k_accuracy": _top_k_accuracy(y_true, probs, k_top),
        "per_class": per_class,
        "macro": averages["macro"],
        "weighted": averages["weighted"],
        "confusion": {"counts": counts.tolist(), "normalized": _round(normalized, 4)},
        "confused_pairs": confused_pairs(y_true, y_pred, probs, classes, paths),
        "roc": roc_curves(y_true, probs, classes, notes),
        "pr": pr_curves(y_true, probs, classes, notes),
        "calibration": calibration(y_true, probs),
        "notes": notes,
    }


def _top_k_accuracy(y_true: np.ndarray, probs: np.ndarray, k: int) -> float:
    from sklearn.metrics import top_k_accuracy_score

    if k >= probs.shape[1]:
        return 1.0  # every class is in the top k (scikit-learn refuses the 2-class case with 2-D scores)
    return _num(top_k_accuracy_score(y_true, probs, k=k, labels=list(range(probs.shape[1]))))


def confused_pairs(y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, classes: Sequence[str],
                   paths: Sequence[str] | None = None) -> list[dict]:
    """Every off-diagonal confusion cell with a count, most frequent first; images most confident first."""
    pairs = []
    wrong = np.nonzero(y_true != y_pred)[0]
    cells: dict[tuple[int, int], list[int]] = {}
    for i in wrong:
        cells.setdefault((int(y_true[i]), int(y_pred[i])), []).append(int(i))
    for (t, pr), idx in cells.items():
        idx.sort(key=lambda i: -probs[i, pr])
        pairs.append({"true": classes[t], "pred": classes[pr], "count": len(idx),
                      "images": [paths[i] for i in idx] if paths is not None else []})
    pairs.sort(key=lambda d: (-d["count"], d["true"], d["pred"]))
    return pairs


def roc_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], notes: list[str]) -> dict:
    """One-vs-rest ROC per class with AUC; micro (all class decisions pooled) and macro (mean over classes) averages.

    macro.auc is the mean of the per-class AUCs (= roc_auc_score(average="macro") over the classes with a curve);
    macro's curve is the mean TPR of those classes on a common FPR grid.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    onehot = _onehot(y_true, len(classes))
    per_class, valid = {}, []
    for k, name in enumerate(classes):
        positives = int(onehot[:, k].sum())
        if positives == 0 or positives == len(y_true):
            continue  # undefined without both positives and negatives (the note about absent classes covers it)
        fpr, tpr, _ = roc_curve(onehot[:, k], probs[:, k])
        per_class[name] = {"fpr": _down(fpr), "tpr": _down(tpr), "auc": _num(roc_auc_score(onehot[:, k], probs[:, k]))}
        valid.append(k)
    if len(per_class) < len(classes):
        missing = [c for c in classes if c not in per_class]
        notes.append(f"no ROC for {', '.join(missing)}: the set has no images of it, or only images of it")
    fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    result = {"per_class": per_class,
              "micro": {"fpr": _down(fpr), "tpr": _down(tpr), "auc": _num(roc_auc_score(onehot.ravel(), probs.ravel()))},
              "macro": None}
    if valid:
        grid = np.linspace(0.0, 1.0, MAX_CURVE_POINTS)
        mean_tpr = np.mean([np.interp(grid, *_full_roc(onehot[:, k], probs[:, k])) for k in valid], axis=0)
        mean_tpr[0] = 0.0
        result["macro"] = {"fpr": _round(grid, 4), "tpr": _round(mean_tpr, 4),
                           "auc": _num(np.mean([per_class[classes[k]]["auc"] for k in valid]))}
    return result


def _full_roc(y: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(y, score)
    return fpr, tpr


def pr_curves(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str], notes: list[str]) -> dict:
    """Precision-recall per class with average precision (AP); micro average over all class decisions."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    onehot = _onehot(y_true, len(classes))
    per_class = {}
    for k, name in enumerate(classes):
        if onehot[:, k].sum() == 0:
            continue  # recall is undefined without positives
        precision, recall, _ = precision_recall_curve(onehot[:, k], probs[:, k])
        per_class[name] = {"precision": _down(precision), "recall": _down(recall),
                           "ap": _num(average_precision_score(onehot[:, k], probs[:, k])),
                           "prevalence": _num(onehot[:, k].mean())}
    precision, recall, _ = precision_recall_curve(onehot.ravel(), probs.ravel())
    micro = {"precision": _down(precision), "recall": _down(recall),
             "ap": _num(average_precision_score(onehot, probs, average="micro"))}
    return {"per_class": per_class, "micro": micro}


def calibration(y_true: Sequence[int], probs: np.ndarray, n_bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error of the top-1 confidence, with the reliability-diagram bins.

    Bins are equal-width on (0, 1], right-closed: a confidence of exactly 0.6 falls in (0.533, 0.6].
    ECE = sum over bins of (bin count / N) * |bin accuracy - bin mean confidence|.
    """
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true)
    confidence = probs.max(1)
    correct = (probs.argmax(1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right-closed bins on the same edges that are reported (ceil(conf * n) would put 0.6 in (0.6, 0.7])
    which = np.digitize(confidence, edges[1:-1], right=True)
    bins, ece = [], 0.0
    for b in range(n_bins):
        mask = which == b
        count = int(mask.sum())
        entry = {"lo": _num(edges[b]), "hi": _num(edges[b + 1]), "count": count, "accuracy": None,
                 "confidence": None}
        if count:
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            entry.update(accuracy=_num(acc), confidence=_num(conf))
            ece += count / len(y_true) * abs(acc - conf)
        bins.append(entry)
    return {"ece": _num(ece), "n_bins": n_bins, "bins": bins,
            "mean_confidence": _num(confidence.mean()), "accuracy": _num(correct.mean())}


def _onehot(y: np.ndarray, c: int) -> np.ndarray:
    out = np.zeros((len(y), c), dtype=np.int64)
    out[np.arange(len(y)), y] = 1
    return out


def _num(x) -> float | None:
    """A JSON-safe float (None for NaN/inf), rounded to 6 digits."""
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def _round(a, digits: int) -> list:
    return np.round(np.nan_to_num(np.asarray(a, dtype=np.float64)), digits).tolist()


def _down(a: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> list[float]:
    """Evenly spaced subset of a curve's points (first and last kept), for drawing."""
    a = np.asarray(a, dtype=np.float64)
    if len(a) > max_points:
        a = a[np.unique(np.linspace(0, len(a) - 1, max_points).round().astype(int))]
    return _round(a, 4)


# --- the run -----------------------------------------------------------------------------------------------------

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
    outputs = _predict_items(model, meta, root, items, batch_size, torch_device,
                             lambda done: report(done, total))
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
    if outputs["skipped"]:
        result["notes"].append(f"{len(outputs['skipped'])} unreadable image(s) skipped (see 'skipped')")
    losses = np.asarray(outputs["losses"])
    result["losses"] = {"mean": _num(losses.mean()), "max": _num(losses.max())}

    t0 = time.perf_counter()
    result["tsne"] = None
    if "tsne" not in skipped_figures:
        result["tsne"] = _tsne(np.asarray(outputs["features"]), y, probs.argmax(1), paths, result["notes"])
    timings["tsne_s"] = round(time.perf_counter() - t0, 2)
    report(len(items) + 1, total)

    out_dir.mkdir(exist_ok=True)  # not parents: a run folder deleted meanwhile must not come back
    t0 = time.perf_counter()
    context = _FigureContext(run_dir, out_dir, model, meta, root, torch_device)
    _render_figures(context, y, probs, losses, paths, result, cam_samples_per_class,
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


def _collect_items(run_dir: Path, split: str, data_dir, classes: list[str], data_roots: Sequence[Path] | None = None
                   ) -> tuple[Path, list[tuple[str, int]], str]:
    """(root, [(path relative to root, label)], description) for the run's split or another folder."""
    from shared.data.datasets import read_manifest, scan_dataset

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


def _load_tensor(root: Path, rel: str, transform):
    from shared.data.images import load_rgb

    return transform(load_rgb(root / rel))


def _predict_items(model, meta: dict, root: Path, items: list[tuple[str, int]], batch_size: int, device,
                   on_progress: Callable[[int], None]) -> dict:
    """Probabilities, per-image losses and penultimate features for every readable image."""
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
                    tensors.append(_load_tensor(root, rel, transform))
                except (ImageError, OSError) as exc:
                    logger.warning("skipping %s: %s", rel, exc)
                    out["skipped"].append({"path": rel, "error": str(exc)})
                    continue
                out["paths"].append(rel)
                labels.append(label)
            if tensors:
                logits = model(torch.stack(tensors).to(device)).float()
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
    return {"x": _round(emb[:, 0], 3), "y": _round(emb[:, 1], 3), "label": y[index].tolist(),
            "pred": pred[index].tolist(), "path": [paths[i] for i in index],
            "seconds": round(time.perf_counter() - t0, 2)}


def _write_json(path: Path, data: dict) -> None:
    # allow_nan=False: the page and other tools parse this with strict JSON parsers
    write_atomic(path, json.dumps(data, indent=1, allow_nan=False))


# --- figures -----------------------------------------------------------------------------------------------------

class _FigureContext:
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

    def tensor(self, rel: str):
        return _load_tensor(self.root, rel, self.transform)

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
        import torch

        from shared.analysis.explain import GradCAM

        t0 = time.perf_counter()
        cam = GradCAM(self.model, self.spec)
        out: list[np.ndarray] = []
        for start in range(0, len(rels), 16):
            batch = torch.stack([self.tensor(r) for r in rels[start:start + 16]])
            maps, _ = cam.batch(batch, targets[start:start + 16])
            out.extend(maps)
        self.cam_seconds += time.perf_counter() - t0
        return out


def _render_figures(ctx: _FigureContext, y: np.ndarray, probs: np.ndarray, losses: np.ndarray, paths: list[str],
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


def _render_image_figures(ctx: _FigureContext, y: np.ndarray, probs: np.ndarray, losses: np.ndarray,
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
        titles += [f"{_short(ctx.classes[y[i]])}", f"{mark} CAM: {_short(ctx.classes[pred[i]])} "
                                                    f"{probs[i, pred[i]]:.2f}"]
    per_row = 2 * max(1, min(3, len(samples) // max(1, len(np.unique(y)))))
    ctx.save("cam_samples", plots.image_grid(
        images, titles, ncols=per_row,
        suptitle=f"Grad-CAM ({ctx.spec.cam_layer}) for the predicted class — true class on the left "
                 "(✓ correct, ✗ wrong)"))


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
                   f"CAM pred {_short(ctx.classes[pred[i]])} {probs[i, pred[i]]:.2f}",
                   f"CAM true {_short(ctx.classes[y[i]])} {probs[i, y[i]]:.2f}"]
    ctx.save("cam_errors", plots.image_grid(
        images, titles, ncols=3, suptitle="Most confident errors: Grad-CAM for the predicted and the true class"))


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
