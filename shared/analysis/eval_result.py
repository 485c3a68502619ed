"""The evaluation result, `<run>/eval*/eval.json`: one typed, versioned schema shared by its writer and its readers.

`shared.analysis.evaluation.evaluate_run` writes it (`EvalResult.to_dict()`); the page's Results tab, the HTML report and the
`/run_results` API read it through `load_eval_result(run_dir)` and only ever see an `EvalResult`, so no reader
guesses key names.

Versions:
- unversioned: written before eval.json had `schema_version` (every figure drawn). Same layout without
  `schema_version`, `balanced_accuracy`, `figure_level` and `skipped_figures`; `_upgrade_unversioned` converts it,
  the only place that knows the old layout.
- 1: as 2 without `predictions`; `_upgrade_v1` converts it (predictions None: the page asks to evaluate again for
  the confusion-matrix click-through).
- 2: this layout.
A newer version, or a file that does not match its version, is refused with `EvalResultError` saying to evaluate
the run again (the page's **Evaluate again**, or `resnet-lab evaluate RUN`), which rewrites it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2
EVAL_FILE = "eval.json"

# How many figures an evaluation draws (`evaluate_run(figures=...)`, env RESNET_LAB_EVAL_FIGURES):
#   all   every figure below; basic: the charts only (no t-SNE, no image galleries); none: eval.json only.
FIGURE_LEVELS = ("all", "basic", "none")
FigureLevel = Literal["all", "basic", "none"]
# Charts from numbers already in eval.json: cheap (~0.1-0.3 s each).
CHART_FIGURES = ("curves", "confusion", "confusion_normalized", "roc", "pr", "reliability", "class_counts")
# What "basic" leaves out: t-SNE (the embedding itself is the costliest step) and the figures that reload images and
# run the model again (Grad-CAM, galleries, feature maps).
COSTLY_FIGURES = ("tsne", "cam_samples", "cam_errors", "top_losses", "class_samples", "activations")
FIGURE_TITLES = {"curves": "training curves", "confusion": "confusion matrix",
                 "confusion_normalized": "normalised confusion matrix", "roc": "ROC curves", "pr": "precision-recall",
                 "reliability": "reliability diagram", "class_counts": "class counts", "tsne": "t-SNE",
                 "cam_samples": "Grad-CAM samples", "cam_errors": "Grad-CAM of errors", "top_losses": "top losses",
                 "class_samples": "samples per class", "activations": "layer activations"}


class EvalResultError(ValueError):
    """eval.json exists but cannot be used; the message names the file and says to evaluate again."""


def skipped_figures_for(level: str) -> list[str]:
    """The figures an evaluation at `level` does not draw."""
    if level not in FIGURE_LEVELS:
        raise ValueError(f"figures must be one of {', '.join(FIGURE_LEVELS)}, got {level!r}")
    return {"all": [], "basic": list(COSTLY_FIGURES), "none": [*CHART_FIGURES, *COSTLY_FIGURES]}[level]


# --- the schema ----------------------------------------------------------------------------------------------------
# Numbers that are undefined (recall of a class with no images, ...) are None: eval.json is strict JSON, no NaN.

@dataclass
class ClassScores:
    name: Annotated[str, Field(alias="class")]  # "class" in the file
    precision: float | None  # None: the class was never predicted
    recall: float | None  # None: no images of the class in the set
    f1: float | None
    support: int  # images of the class in the set


@dataclass
class Averages:
    precision: float | None
    recall: float | None
    f1: float | None


@dataclass
class Confusion:
    counts: list[list[int]]  # rows: true class, columns: predicted class
    normalized: list[list[float]]  # each row divided by its count (0 for a class with no images)


@dataclass
class ConfusedPair:
    true: str
    pred: str
    count: int
    images: list[str]  # paths relative to the dataset root, most confident first


@dataclass
class RocCurve:
    fpr: list[float]  # at most MAX_CURVE_POINTS points, for drawing
    tpr: list[float]
    auc: float | None  # from every point


@dataclass
class Roc:
    per_class: dict[str, RocCurve]  # only classes with both positives and negatives in the set
    micro: RocCurve
    macro: RocCurve | None  # None when no class has a curve


@dataclass
class PrCurve:
    precision: list[float]
    recall: list[float]
    ap: float | None  # average precision


@dataclass
class ClassPrCurve(PrCurve):
    prevalence: float | None  # share of the set in this class: the curve of a random guess


@dataclass
class Pr:
    per_class: dict[str, ClassPrCurve]  # only classes with images in the set
    micro: PrCurve


@dataclass
class CalibrationBin:
    lo: float
    hi: float
    count: int
    accuracy: float | None  # None for an empty bin
    confidence: float | None


@dataclass
class Calibration:
    ece: float | None
    n_bins: int
    bins: list[CalibrationBin]
    mean_confidence: float | None
    accuracy: float | None


@dataclass
class Losses:
    mean: float | None
    max: float | None


@dataclass
class Skipped:
    path: str
    error: str


@dataclass
class Tsne:
    x: list[float]
    y: list[float]
    label: list[int]  # true class index per point
    pred: list[int]
    path: list[str]
    seconds: float


@dataclass
class Predictions:
    """Every evaluated image's outcome, as columns (one entry per image, in `path` order)."""
    path: list[str]  # relative to the dataset root
    label: list[int]  # true class index
    pred: list[int]  # predicted class index
    confidence: list[float]  # probability of the predicted class

    def cell(self, true: int, pred: int) -> list[tuple[str, float]]:
        """(path, confidence) of the images of one confusion cell, most confident first."""
        rows = [(p, c) for p, t, q, c in zip(self.path, self.label, self.pred, self.confidence)
                if t == true and q == pred]
        return sorted(rows, key=lambda r: (-r[1], r[0]))


@dataclass
class EvalResult:
    """Everything one evaluation of one run found (the whole of eval.json)."""

    run_id: str
    split: str  # "test", "val", "train" or "folder"
    source: str  # what was evaluated, in words
    model: str | None
    image_size: int
    n: int  # images evaluated
    classes: list[str]
    accuracy: float | None
    balanced_accuracy: float | None  # mean recall over the classes with images
    loss: float | None  # mean cross-entropy
    top_k: int
    top_k_accuracy: float | None
    per_class: list[ClassScores]
    macro: Averages
    weighted: Averages
    confusion: Confusion
    confused_pairs: list[ConfusedPair]
    roc: Roc
    pr: Pr
    calibration: Calibration
    losses: Losses
    notes: list[str]
    skipped: list[Skipped]  # unreadable images
    tsne: Tsne | None  # None when the figure level skipped it
    figures: dict[str, str]  # figure name → PNG path relative to the run folder
    figure_level: FigureLevel
    skipped_figures: list[str]  # figures the level did not draw (not: figures with nothing to show)
    timings: dict[str, float]
    predictions: Predictions | None = None  # None: evaluated by a version before 2
    schema_version: int = SCHEMA_VERSION

    @property
    def macro_f1(self) -> float | None:
        return self.macro.f1

    def to_dict(self) -> dict:
        """The eval.json form (strict-JSON ready)."""
        return _adapter().dump_python(self, by_alias=True, mode="json")

    @classmethod
    def from_dict(cls, data: Any, where: str = "eval.json") -> "EvalResult":
        """Validate eval.json's contents, converting an unversioned file; EvalResultError says what is wrong."""
        from pydantic import ValidationError

        if not isinstance(data, dict):
            raise EvalResultError(f"{where} does not hold an evaluation (expected a JSON object) — {_AGAIN}")
        version = data.get("schema_version")
        if version is None:
            data = _upgrade_unversioned(data)
        elif version == 1:
            data = _upgrade_v1(data)
        elif version != SCHEMA_VERSION:
            raise EvalResultError(f"{where} has schema_version {version!r}; this resnet-lab reads version "
                                  f"{SCHEMA_VERSION}, 1 and unversioned files — {_AGAIN}")
        try:
            return _adapter().validate_python(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = ".".join(str(p) for p in first["loc"])
            raise EvalResultError(f"{where} does not match the evaluation format ({exc.error_count()} problem(s), "
                                  f"first: {field}: {first['msg']}) — {_AGAIN}") from None

    def figure_file(self, run_dir: str | os.PathLike, name: str) -> Path | None:
        """The PNG of figure `name`, when listed and a file inside the run folder (eval.json is data, not a licence
        to read files elsewhere); None otherwise."""
        rel = self.figures.get(name)
        if not rel:
            return None
        root = Path(run_dir).resolve()
        try:
            path = (root / rel).resolve()
        except (OSError, RuntimeError):  # a symlink loop
            return None
        return path if root in path.parents and path.is_file() else None

    def api_summary(self) -> dict:
        """What the `/run_results` API returns: the headline numbers and tables, no curves or images."""
        return {"schema_version": self.schema_version, "run_id": self.run_id, "split": self.split, "n": self.n,
                "accuracy": self.accuracy, "balanced_accuracy": self.balanced_accuracy, "macro_f1": self.macro_f1,
                "top_k": self.top_k, "top_k_accuracy": self.top_k_accuracy, "loss": self.loss,
                "ece": self.calibration.ece, "classes": list(self.classes),
                "per_class": [{"class": row.name, "precision": row.precision, "recall": row.recall, "f1": row.f1,
                               "support": row.support} for row in self.per_class],
                "confusion": {"counts": self.confusion.counts}, "figures": sorted(self.figures),
                "figure_level": self.figure_level, "skipped_figures": list(self.skipped_figures)}


_AGAIN = "evaluate the run again (Results tab: Evaluate again, or resnet-lab evaluate RUN) to rewrite it"


def _adapter():
    from pydantic import TypeAdapter

    global _ADAPTER
    if _ADAPTER is None:
        _ADAPTER = TypeAdapter(EvalResult)
    return _ADAPTER


_ADAPTER = None


def _upgrade_unversioned(data: dict) -> dict:
    """An eval.json written before `schema_version` existed, in the version-1 layout. Those evaluations drew every
    figure; balanced accuracy is the mean recall over the classes with images (recall is None for the others)."""
    data = dict(data)
    recalls = [row.get("recall") for row in data.get("per_class") or [] if isinstance(row, dict)]
    recalls = [r for r in recalls if isinstance(r, (int, float))]
    data.setdefault("balanced_accuracy", round(sum(recalls) / len(recalls), 6) if recalls else None)
    data.setdefault("figure_level", "all")
    data.setdefault("skipped_figures", [])
    return _upgrade_v1(data)


def _upgrade_v1(data: dict) -> dict:
    """A version-1 eval.json: the same without per-image `predictions`."""
    data = dict(data)
    data.setdefault("predictions", None)
    data["schema_version"] = SCHEMA_VERSION
    return data


def eval_file(run_dir: str | os.PathLike, folder: str = "eval") -> Path:
    """`<run_dir>/<folder>/eval.json`; folder is "eval" (the run's test split) or one of its "eval-*" siblings."""
    if (folder != "eval" and not folder.startswith("eval-")) or "/" in folder or "\\" in folder or ".." in folder:
        raise ValueError(f"expected an evaluation folder named eval or eval-*, got {folder!r}")
    return Path(run_dir) / folder / EVAL_FILE


def load_eval_result(run_dir: str | os.PathLike, folder: str = "eval") -> EvalResult | None:
    """The run's evaluation as an `EvalResult`; None when it has not been evaluated (no eval.json).

    Raises EvalResultError when eval.json is unreadable, not JSON, from a newer version or does not match.
    """
    path = eval_file(run_dir, folder)
    where = f"{Path(run_dir).name}/{folder}/{EVAL_FILE}"  # messages reach the page's API: no server paths
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise EvalResultError(f"cannot read {where}: {exc.strerror} — {_AGAIN}") from None
    try:
        data = json.loads(text)
    except ValueError as exc:  # UnicodeDecodeError included
        raise EvalResultError(f"{where} is not valid JSON ({exc}) — {_AGAIN}") from None
    return EvalResult.from_dict(data, where=where)
