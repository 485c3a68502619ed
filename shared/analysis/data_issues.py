"""Find bad data with a finished run: likely label errors, near-duplicates and outliers of a dataset.

`find_data_issues(run_dir, data_dir)` runs the run's best checkpoint over every image of the dataset (its current
labels, overrides applied: `shared.data.overrides`) with the evaluation's own feature extraction, then:

- **label**: out-of-sample class probabilities from a cross-validated linear probe (scikit-learn
  `LogisticRegression` under `cross_val_predict`) on the frozen penultimate features, so no image is judged by a
  probe that saw its own label; cleanlab's confident learning (`find_label_issues`) picks the suspects and
  `get_label_quality_scores` ranks them. The suggested label is the probe's most likely class.
- **near_duplicate**: pairs of images among each other's nearest neighbours (cosine, scikit-learn
  `NearestNeighbors`) in feature space or by 16x16 colour thumbnail, whose thumbnails are nearly the same picture.
  The features alone find every pair the model cannot tell apart, which for a classifier includes distinct photos
  of one class, and how close a copy's features are depends on the model (0.6-0.98 cosine for a tiny one at 64 px,
  some copies not among the 10 nearest); the thumbnail (area-averaged, so resizing and JPEG re-compression barely
  change it) finds those and keeps only copies. Within a class they inflate the test
  score when split apart; across classes one label is wrong.
- **outlier**: cleanlab's `OutOfDistribution` (mean distance to the k nearest neighbours in feature space); the
  least typical `outlier_fraction` of the images.

Rows: {file, given, suggested, score, kind, other}; score in [0, 1], higher is more suspect (1 - label quality;
cosine similarity of the thumbnails; 1 - typicality). The report is `<run>/data_issues.json` (`ISSUES_FILE`).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from shared.fsutil import write_atomic

logger = logging.getLogger(__name__)

ISSUES_FILE = "data_issues.json"
ISSUES_VERSION = 1
KINDS = ("label", "near_duplicate", "outlier")
# thumbnail side for the near-duplicate check: small enough that a 0.5x copy and its JPEG re-compression agree
THUMB_SIDE = 16
# a candidate pair is a near-duplicate when its thumbnails' cosine similarity reaches this: resized 0.5-0.9x + JPEG
# 50-90 copies of 64 px generated scenes measured >= 0.91, distinct scenes <= 0.68; among 80,000 random pairs of
# flower photos the highest was 0.93 (two fields under a sky: same layout). bench/bench_data_issues.py
THUMB_SIMILARITY = 0.88
NEIGHBOURS = 10  # neighbours per image (by features, by thumbnail) checked as candidate copies


def find_data_issues(run_dir: str | os.PathLike, data_dir: str | os.PathLike | None = None, *,
                     batch_size: int = 64, device: str = "cpu", folds: int = 5, outlier_fraction: float = 0.01,
                     progress: Callable[[int, int], None] | None = None,
                     data_roots: Sequence[Path] | None = None, save: bool = True) -> dict:
    """The data issues of `data_dir` (default: the run's own dataset) judged with the run's best checkpoint.

    Returns the report (also written to `<run_dir>/data_issues.json` when `save`). The dataset's class folders
    must be the model's classes.
    """
    import torch

    from shared.analysis.evaluation import _predict_items
    from shared.data.check import check_dataset
    from shared.data.overrides import apply_to_files
    from shared.training.checkpoint import load_model_from_run

    started = time.perf_counter()
    run_dir = Path(run_dir)
    model, meta = load_model_from_run(run_dir, "best")
    classes = list(meta["classes"])
    if data_dir is None:
        data_dir = json.loads((run_dir / "split.json").read_text(encoding="utf-8"))["root"]
    report = check_dataset(data_dir, decode=False, link_roots=data_roots)
    if list(report["classes"]) != classes:
        raise ValueError(f"{report['root']} has classes {', '.join(report['classes'])} but the run was trained on "
                         f"{', '.join(classes)} — find issues with a run trained on this dataset")
    root = Path(report["root"])
    labels, overrides = apply_to_files(root, classes, report["hashes"])
    items = [(path, classes.index(labels[path])) for path in sorted(labels)]
    total = len(items)
    tell = progress or (lambda done, total: None)
    torch_device = torch.device(device)
    model.to(torch_device)
    out = _predict_items(model, meta, root, items, batch_size, torch_device, lambda done: tell(done, total))
    paths, y = out["paths"], np.asarray(out["labels"], dtype=np.int64)
    features = np.asarray(out["features"], dtype=np.float32)
    timings = {"features_s": round(time.perf_counter() - started, 2)}

    t0 = time.perf_counter()
    probs, notes = cross_validated_probs(features, y, len(classes), folds)
    label_rows, quality = label_issues(paths, y, probs, classes)
    timings["label_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    thumbs = thumbnails(root, paths)
    dup_rows = near_duplicates(paths, y, features, thumbs, classes)
    timings["duplicates_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    out_rows = outliers(paths, y, features, classes, probs, outlier_fraction)
    timings["outliers_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - started, 2)

    result = {"schema_version": ISSUES_VERSION, "run_id": run_dir.name, "data_dir": str(root), "classes": classes,
              "n": len(paths), "created": round(time.time(), 3), "model": meta.get("model_name"),
              "overrides_sha256": overrides["sha256"], "notes": notes,
              "skipped": out["skipped"], "counts": {"label": len(label_rows), "near_duplicate": len(dup_rows),
                                                    "outlier": len(out_rows)},
              "rows": label_rows + dup_rows + out_rows,
              # every image's label quality (probe's probability of its given label), for ranking and benchmarks
              "quality": {p: round(float(q), 6) for p, q in zip(paths, quality)},
              "timings": timings}
    if save:
        write_atomic(run_dir / ISSUES_FILE, json.dumps(result, indent=1, allow_nan=False))
    logger.info("data issues of %s with %s: %s in %.1f s", root, run_dir.name, result["counts"], timings["total_s"])
    return result


def cross_validated_probs(features: np.ndarray, y: np.ndarray, n_classes: int, folds: int = 5
                          ) -> tuple[np.ndarray, list[str]]:
    """(N, C) out-of-sample probabilities from a standardised logistic-regression probe, and notes."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    notes = []
    present, counts = np.unique(y, return_counts=True)
    if len(present) < 2:
        raise ValueError("finding label issues needs images of at least 2 classes")
    k = int(min(folds, counts.min()))
    if k < 2:
        raise ValueError(f"a class has only {counts.min()} image(s): cross-validation needs at least 2 per class")
    if k < folds:
        notes.append(f"{k}-fold cross-validation (the smallest class has {counts.min()} images)")
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    cv = StratifiedKFold(n_splits=k, shuffle=True, random_state=0)
    part = cross_val_predict(probe, features, y, cv=cv, method="predict_proba")
    probs = np.zeros((len(y), n_classes))
    probs[:, present] = part  # columns of the classes the probe saw; a class without images keeps 0
    return probs, notes


def label_issues(paths: Sequence[str], y: np.ndarray, probs: np.ndarray, classes: Sequence[str]
                 ) -> tuple[list[dict], np.ndarray]:
    """(rows of likely label errors, most suspect first; every image's label quality score)."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    quality = get_label_quality_scores(y, probs, method="self_confidence")
    present = np.unique(y)
    # n_jobs=1: by default cleanlab forks a multiprocessing pool, and a fork of a process whose torch (OpenMP)
    # threads are running can hang the child for good (seen once in the worker); one process is fast enough here
    if len(present) < probs.shape[1]:  # cleanlab wants every class in the labels: judge on those present
        sub = probs[:, present] / np.clip(probs[:, present].sum(1, keepdims=True), 1e-12, None)
        index = find_label_issues(np.searchsorted(present, y), sub, return_indices_ranked_by="self_confidence",
                                  n_jobs=1)
    else:
        index = find_label_issues(y, probs, return_indices_ranked_by="self_confidence", n_jobs=1)
    rows = [{"file": paths[i], "given": classes[int(y[i])], "suggested": classes[int(probs[i].argmax())],
             "score": round(1.0 - float(quality[i]), 6), "kind": "label", "other": None} for i in index]
    return rows, quality


def thumbnails(root: Path, paths: Sequence[str], side: int = THUMB_SIDE) -> np.ndarray:
    """(N, side*side*3) unit-length colour thumbnails (area-averaged, each channel zero-mean); zeros for an
    unreadable file."""
    from PIL import Image

    from shared.data.images import load_rgb

    def one(rel: str) -> np.ndarray:
        try:
            img = load_rgb(root / rel).resize((side, side), Image.BOX)
        except Exception as exc:  # unreadable files were already skipped by the features; be safe anyway
            logger.warning("thumbnail of %s: %s", rel, exc)
            return np.zeros(side * side * 3, np.float32)
        # each channel's own mean removed: only the picture's layout counts, not its colour cast (with one mean
        # for all channels, any two yellow close-ups of the flower photos scored 0.93-0.96)
        v = np.asarray(img, dtype=np.float32).reshape(-1, 3)
        v = (v - v.mean(0)).reshape(-1)
        norm = float(np.linalg.norm(v))
        return v / norm if norm > 0 else v

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 2)) as pool:
        return np.stack(list(pool.map(one, paths))) if paths else np.zeros((0, side * side * 3), np.float32)


def near_duplicate_pairs(features: np.ndarray, thumbs: np.ndarray, *, thumb_similarity: float = THUMB_SIMILARITY,
                         neighbours: int = NEIGHBOURS) -> list[tuple[int, int, float]]:
    """(i, j, thumbnail similarity) with i < j for every near-identical pair of thumbnails among each image's
    nearest neighbours by features and by thumbnail."""
    from sklearn.neighbors import NearestNeighbors

    n = len(features)
    if n < 2:
        return []
    k = min(neighbours + 1, n)
    candidates = set()
    for space in (features, thumbs):
        found = NearestNeighbors(n_neighbors=k, metric="cosine").fit(space).kneighbors(space, return_distance=False)
        candidates.update((min(i, int(j)), max(i, int(j))) for i in range(n) for j in found[i] if int(j) != i)
    pairs = [(a, b, float(thumbs[a] @ thumbs[b])) for a, b in candidates]
    return sorted((p for p in pairs if p[2] >= thumb_similarity), key=lambda t: (-t[2], t[0], t[1]))


def near_duplicates(paths: Sequence[str], y: np.ndarray, features: np.ndarray, thumbs: np.ndarray,
                    classes: Sequence[str]) -> list[dict]:
    """Rows for near-duplicate pairs, most similar first (`suggested` is the other copy's class: when it differs,
    one of the two labels is wrong)."""
    rows = []
    for a, b, sim in near_duplicate_pairs(features, thumbs):
        rows.append({"file": paths[b], "given": classes[int(y[b])], "suggested": classes[int(y[a])],
                     "score": round(min(sim, 1.0), 6), "kind": "near_duplicate", "other": paths[a]})
    # by similarity alone: on the flower photos the pairs above 0.95 were mostly real copies, and cross-class pairs
    # first would put lower, often false, pairs (two fields under a sky) above them
    rows.sort(key=lambda r: (-r["score"], r["file"]))
    return rows


def outliers(paths: Sequence[str], y: np.ndarray, features: np.ndarray, classes: Sequence[str],
             probs: np.ndarray, fraction: float = 0.01) -> list[dict]:
    """The least typical `fraction` of the images (at least one) by cleanlab's OutOfDistribution kNN score."""
    from cleanlab.outlier import OutOfDistribution

    n = len(paths)
    if n < 3 or fraction <= 0:
        return []
    k = min(NEIGHBOURS, n - 1)
    scores = OutOfDistribution(params={"k": k}).fit_score(features=features, verbose=False)
    count = max(1, int(round(fraction * n)))
    order = np.argsort(scores, kind="stable")[:count]
    return [{"file": paths[i], "given": classes[int(y[i])], "suggested": classes[int(probs[i].argmax())],
             "score": round(1.0 - float(scores[i]), 6), "kind": "outlier", "other": None} for i in order]


def load_data_issues(run_dir: str | os.PathLike) -> dict | None:
    """The run's saved report; None when there is none. ValueError for a file from another version."""
    path = Path(run_dir) / ISSUES_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{Path(run_dir).name}/{ISSUES_FILE} is unreadable ({exc}) — find the issues again") from None
    if not isinstance(data, dict) or data.get("schema_version") != ISSUES_VERSION or not isinstance(
            data.get("rows"), list):
        raise ValueError(f"{Path(run_dir).name}/{ISSUES_FILE} is not a version-{ISSUES_VERSION} report — find the "
                         "issues again")
    return data


def format_rows(rows: Sequence[dict], limit: int | None = None) -> str:
    """The ranked list as aligned text (what `resnet-lab data issues` prints)."""
    shown = list(rows)[:limit] if limit else list(rows)
    width = max([4] + [len(r["file"]) for r in shown])
    lines = [f"{'file':{width}}  {'given':12} {'suggested':12} {'score':>6}  kind"]
    for r in shown:
        other = f" (copy of {r['other']})" if r.get("other") else ""
        lines.append(f"{r['file']:{width}}  {r['given'][:12]:12} {r['suggested'][:12]:12} {r['score']:6.3f}  "
                     f"{r['kind']}{other}")
    return "\n".join(lines)


def write_rows_csv(rows: Sequence[dict], path: str | os.PathLike) -> Path:
    import csv
    import io

    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["file", "given", "suggested", "score", "kind", "other"])
    writer.writeheader()
    for r in rows:
        writer.writerow({k: r.get(k) if r.get(k) is not None else "" for k in writer.fieldnames})
    return write_atomic(Path(path), buffer.getvalue())
