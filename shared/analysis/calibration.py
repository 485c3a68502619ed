"""An honest "not sure": temperature scaling and a confidence threshold, both fitted on the validation split.

Temperature scaling (Guo et al. 2017, arXiv:1706.04599) divides the logits by one scalar T fitted to minimise the
validation NLL: the argmax, so the accuracy, is unchanged, while the confidences stop being over-confident. The
threshold is the lowest confidence at which the answers given on validation are still right at least
`target_precision` of the time; below it the model answers "not sure — closest: X".

`<run_dir>/calibration.json` has one schema (`Calibration`), read by the predictor and the export bundle alike.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from shared.analysis.metrics import calibration as reliability
from shared.fsutil import write_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE_NAME = "calibration.json"
DEFAULT_TARGET_PRECISION = 0.95
# T is searched as exp(log_t) within these bounds: beyond them the logits are either all-equal or one-hot
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


class CalibrationError(ValueError):
    """calibration.json is unreadable or not of this schema; the message names the file and the field."""


@dataclass(frozen=True)
class Calibration:
    schema_version: int
    temperature: float
    threshold: float
    target_precision: float
    ece_before: float
    ece_after: float
    val_accuracy: float
    n_val: int

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "calibration.json") -> "Calibration":
        if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
            raise CalibrationError(f"{where}: expected schema_version {SCHEMA_VERSION}, got "
                                   f"{data.get('schema_version') if isinstance(data, dict) else type(data).__name__}")
        values = {}
        for name in ("temperature", "threshold", "target_precision", "ece_before", "ece_after", "val_accuracy"):
            v = data.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise CalibrationError(f"{where}: {name} must be a number, got {v!r}")
            values[name] = float(v)
        n_val = data.get("n_val")
        if isinstance(n_val, bool) or not isinstance(n_val, int) or n_val < 1:
            raise CalibrationError(f"{where}: n_val must be a positive whole number, got {n_val!r}")
        if not MIN_TEMPERATURE <= values["temperature"] <= MAX_TEMPERATURE:
            raise CalibrationError(f"{where}: temperature {values['temperature']} is outside "
                                   f"[{MIN_TEMPERATURE}, {MAX_TEMPERATURE}]")
        if not 0 <= values["threshold"] <= 1:
            raise CalibrationError(f"{where}: threshold {values['threshold']} is outside [0, 1]")
        return cls(schema_version=SCHEMA_VERSION, n_val=n_val, **values)


def fit_temperature(logits: torch.Tensor, labels: torch.Tensor, max_iter: int = 100) -> float:
    """The T minimising the NLL of softmax(logits / T) on (logits, labels), by LBFGS on log T."""
    logits = logits.detach().double()
    labels = labels.detach().long()
    log_t = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([log_t], lr=0.1, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(logits / log_t.exp(), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    t = float(log_t.detach().exp())
    if not math.isfinite(t):
        return 1.0
    return min(max(t, MIN_TEMPERATURE), MAX_TEMPERATURE)


def choose_threshold(confidence: np.ndarray, correct: np.ndarray, target_precision: float) -> float:
    """The lowest confidence t such that the answers with confidence >= t are right >= target_precision of the
    time (the most answers at that precision). When even the most confident answer is wrong more often than that,
    1.0: every answer is "not sure"."""
    order = np.argsort(-confidence, kind="stable")
    conf, hit = confidence[order], correct[order].astype(np.float64)
    precision = np.cumsum(hit) / np.arange(1, len(hit) + 1)
    # a threshold t keeps every answer with confidence >= t, so only the last of tied confidences is a cut point
    last_of_tie = np.append(conf[1:] != conf[:-1], True)
    ok = np.flatnonzero((precision >= target_precision) & last_of_tie)
    if len(ok) == 0:
        return 1.0
    return float(conf[ok[-1]])


def calibrate(logits: torch.Tensor, labels: torch.Tensor,
              target_precision: float = DEFAULT_TARGET_PRECISION) -> Calibration:
    """Temperature, threshold and ECE before/after from validation logits (N, C) and labels (N,)."""
    if not 0 < target_precision <= 1:
        raise ValueError(f"target precision must be in (0, 1], got {target_precision}")
    if len(labels) == 0:
        raise ValueError("no validation images to calibrate on")
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    y = labels.numpy()
    before = torch.softmax(logits, 1).double().numpy()
    # with no validation error the NLL keeps falling as T → 0 (every answer pushed to 100%): nothing to fit,
    # so T stays 1 rather than erasing the confidence differences the threshold is chosen from
    errors = int((before.argmax(1) != y).sum())
    t = fit_temperature(logits, labels) if errors else 1.0
    if not errors:
        log.info("no validation errors: temperature left at 1 (temperature scaling needs some errors to fit)")
    after = torch.softmax(logits / t, 1).double().numpy()
    correct = after.argmax(1) == y
    threshold = choose_threshold(after.max(1), correct, target_precision)
    return Calibration(schema_version=SCHEMA_VERSION, temperature=round(t, 6), threshold=round(threshold, 6),
                       target_precision=float(target_precision), ece_before=float(reliability(y, before)["ece"]),
                       ece_after=float(reliability(y, after)["ece"]), val_accuracy=float(correct.mean()),
                       n_val=int(len(y)))


def write_calibration(run_dir: Path, calibration: Calibration) -> Path:
    return write_atomic(Path(run_dir) / FILE_NAME, json.dumps(calibration.to_dict(), indent=1, allow_nan=False))


def read_calibration(run_dir: Path) -> Calibration | None:
    """The run's calibration, or None for a run trained before calibration existed (no file).

    A file that is there but damaged raises CalibrationError naming it: the caller decides what to say."""
    path = Path(run_dir) / FILE_NAME
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CalibrationError(f"{path}: not readable JSON ({exc})") from None
    return Calibration.from_dict(data, where=str(path))


@dataclass(frozen=True)
class Verdict:
    """One prediction's answer: the class, or "not sure" with the closest class, because the confidence is below
    the threshold or the image is unlike the training images (its feature distance beyond the run's limit)."""

    sure: bool
    closest: str
    confidence: float
    threshold: float | None
    distance: float | None = None  # None: not checked (a run without a feature distance)
    distance_threshold: float | None = None

    @property
    def confident(self) -> bool:
        return self.threshold is None or self.confidence >= self.threshold

    @property
    def familiar(self) -> bool | None:
        if self.distance is None or self.distance_threshold is None:
            return None
        return self.distance <= self.distance_threshold

    @property
    def text(self) -> str:
        return self.closest if self.sure else f"not sure — closest: {self.closest}"


def verdict(top: list[dict], threshold: float | None, distance: float | None = None,
            distance_threshold: float | None = None) -> Verdict:
    """`top` as Predictor returns it (best first); threshold None: any confidence is enough (uncalibrated run);
    distance or distance_threshold None: the image is not checked for being unlike the training images."""
    best = top[0]
    p = float(best["probability"])
    # `not <=`: a NaN distance (features that overflowed) is unfamiliar, as `familiar` says
    unfamiliar = distance is not None and distance_threshold is not None and not distance <= distance_threshold
    return Verdict(sure=(threshold is None or p >= threshold) and not unfamiliar, closest=best["class"],
                   confidence=p, threshold=threshold, distance=distance, distance_threshold=distance_threshold)
