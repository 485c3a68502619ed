"""Evaluation metrics, pure: labels and probabilities in, a JSON-ready dict out (scikit-learn underneath).

Strict JSON (no NaN): a number that is undefined (recall of a class with no images, ROC of a class absent from the
set) is left out or null, and `notes` says why.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


# Curves are stored for drawing, not for re-computing AUC (that uses every point): this many points at most.
MAX_CURVE_POINTS = 200
# Equal-width confidence bins for ECE and the reliability diagram (15, as in Guo et al. 2017, arXiv:1706.04599).
CALIBRATION_BINS = 15


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
    per_class = [{"class": classes[k], "precision": json_number(p[k]), "recall": json_number(r[k]), "f1": json_number(f1[k]),
                  "support": int(support[k])} for k in labels]
    averages = {}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = skm.precision_recall_fscore_support(y_true, y_pred, average=avg, zero_division=0)
        averages[avg] = {"precision": json_number(ap), "recall": json_number(ar), "f1": json_number(af)}

    k_top = min(5, c)
    counts = skm.confusion_matrix(y_true, y_pred, labels=labels)
    row_sums = counts.sum(1, keepdims=True)
    normalized = np.divide(counts, row_sums, out=np.zeros(counts.shape, dtype=np.float64), where=row_sums > 0)
    true_prob = probs[np.arange(n), y_true]
    return {
        "n": int(n),
        "classes": classes,
        "accuracy": json_number(skm.accuracy_score(y_true, y_pred)),
        # mean recall over the classes with images (= balanced_accuracy_score, without its warning about the others)
        "balanced_accuracy": json_number(np.mean(r[support > 0])),
        "loss": json_number(float(np.mean(-np.log(np.clip(true_prob, 1e-12, 1.0))))),
        "top_k": k_top,
        "top_k_accuracy": _top_k_accuracy(y_true, probs, k_top),
        "per_class": per_class,
        "macro": averages["macro"],
        "weighted": averages["weighted"],
        "confusion": {"counts": counts.tolist(), "normalized": json_list(normalized, 4)},
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
    return json_number(top_k_accuracy_score(y_true, probs, k=k, labels=list(range(probs.shape[1]))))


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
        per_class[name] = {"fpr": _down(fpr), "tpr": _down(tpr), "auc": json_number(roc_auc_score(onehot[:, k], probs[:, k]))}
        valid.append(k)
    if len(per_class) < len(classes):
        missing = [c for c in classes if c not in per_class]
        notes.append(f"no ROC for {', '.join(missing)}: the set has no images of it, or only images of it")
    fpr, tpr, _ = roc_curve(onehot.ravel(), probs.ravel())
    result = {"per_class": per_class,
              "micro": {"fpr": _down(fpr), "tpr": _down(tpr), "auc": json_number(roc_auc_score(onehot.ravel(), probs.ravel()))},
              "macro": None}
    if valid:
        grid = np.linspace(0.0, 1.0, MAX_CURVE_POINTS)
        mean_tpr = np.mean([np.interp(grid, *_full_roc(onehot[:, k], probs[:, k])) for k in valid], axis=0)
        mean_tpr[0] = 0.0
        result["macro"] = {"fpr": json_list(grid, 4), "tpr": json_list(mean_tpr, 4),
                           "auc": json_number(np.mean([per_class[classes[k]]["auc"] for k in valid]))}
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
                           "ap": json_number(average_precision_score(onehot[:, k], probs[:, k])),
                           "prevalence": json_number(onehot[:, k].mean())}
    precision, recall, _ = precision_recall_curve(onehot.ravel(), probs.ravel())
    micro = {"precision": _down(precision), "recall": _down(recall),
             "ap": json_number(average_precision_score(onehot, probs, average="micro"))}
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
        entry = {"lo": json_number(edges[b]), "hi": json_number(edges[b + 1]), "count": count, "accuracy": None,
                 "confidence": None}
        if count:
            acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
            entry.update(accuracy=json_number(acc), confidence=json_number(conf))
            ece += count / len(y_true) * abs(acc - conf)
        bins.append(entry)
    return {"ece": json_number(ece), "n_bins": n_bins, "bins": bins,
            "mean_confidence": json_number(confidence.mean()), "accuracy": json_number(correct.mean())}


def _onehot(y: np.ndarray, c: int) -> np.ndarray:
    out = np.zeros((len(y), c), dtype=np.int64)
    out[np.arange(len(y)), y] = 1
    return out


def json_number(x) -> float | None:
    """A JSON-safe float (None for NaN/inf), rounded to 6 digits."""
    x = float(x)
    return round(x, 6) if math.isfinite(x) else None


def json_list(a, digits: int) -> list:
    return np.round(np.nan_to_num(np.asarray(a, dtype=np.float64)), digits).tolist()


def _down(a: np.ndarray, max_points: int = MAX_CURVE_POINTS) -> list[float]:
    """Evenly spaced subset of a curve's points (first and last kept), for drawing."""
    a = np.asarray(a, dtype=np.float64)
    if len(a) > max_points:
        a = a[np.unique(np.linspace(0, len(a) - 1, max_points).round().astype(int))]
    return json_list(a, 4)
