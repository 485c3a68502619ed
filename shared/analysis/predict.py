"""Prediction: load a run's best model once, answer top-k for paths, bytes or PIL images."""

from __future__ import annotations

import csv
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from shared.analysis.calibration import CalibrationError, Verdict, read_calibration, verdict
from shared.training.checkpoint import load_model_from_run
from shared.training.models import get_spec
from shared.fsutil import atomic_open
from shared.data.images import ImageError, load_rgb
from shared.runs.store import RunNotFound, RunStore
from shared.data.transforms import eval_transform

log = logging.getLogger(__name__)


class NoModelError(LookupError):
    """No finished run to predict with; the message says how to get one."""


class Predictor:
    """One run's best model, in eval mode, ready to classify images.

    Probabilities are temperature-scaled and answers below the run's threshold are "not sure" when the run has a
    calibration.json; a run trained before calibration existed answers always (`calibration_note` says so)."""

    def __init__(self, run_dir: Path, device: str = "cpu"):
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.device = torch.device(device)
        self.model, self.meta = load_model_from_run(self.run_dir, "best")
        self.model.to(self.device)
        self.spec = get_spec(self.meta["model_name"])  # where its head, CAM layer and stages are
        self.classes: list[str] = list(self.meta["classes"])
        self.image_size: int = int(self.meta["image_size"])
        self.transform = eval_transform(self.image_size, self.meta["mean"], self.meta["std"])
        self.tta = bool((self.meta.get("config") or {}).get("tta", False))
        try:
            self.calibration = read_calibration(self.run_dir)
            self.calibration_note = "" if self.calibration else (
                "this run has no calibration (trained before it existed): every answer is given, none is "
                "\"not sure\"")
        except CalibrationError as exc:
            self.calibration = None
            self.calibration_note = f"calibration ignored, every answer is given: {exc}"
            log.warning("%s", self.calibration_note)
        self.temperature = self.calibration.temperature if self.calibration else 1.0
        self.threshold: float | None = self.calibration.threshold if self.calibration else None
        # one model instance serves concurrent page requests; Grad-CAM hooks must not interleave
        self._lock = threading.Lock()

    def preprocess(self, src: Any) -> torch.Tensor:
        return self.transform(load_rgb(src))

    @torch.inference_mode()
    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device)
        logits = self.model(x).float()
        if self.tta:  # as the run was validated and calibrated: image and mirror averaged
            logits = (logits + self.model(x.flip(3)).float()) / 2
        return torch.softmax(logits / self.temperature, dim=1).cpu()

    def verdict(self, top: list[dict], threshold: float | None = None) -> Verdict:
        """The answer for a top-k list: the class, or "not sure — closest: X" below `threshold` (default: the
        run's calibrated one; None for an uncalibrated run = always an answer)."""
        return verdict(top, self.threshold if threshold is None else threshold)

    def _top(self, probs: torch.Tensor, top_k: int) -> list[dict]:
        k = max(1, min(top_k, len(self.classes)))
        values, indices = probs.topk(k)
        return [{"class": self.classes[i], "probability": float(p)} for p, i in zip(values.tolist(), indices.tolist())]

    def predict(self, src: Any, top_k: int = 5) -> list[dict]:
        """Top-k [{class, probability}] for one image (path, bytes, file object or PIL image)."""
        x = self.preprocess(src).unsqueeze(0)
        with self._lock:
            probs = self.probabilities(x)[0]
        return self._top(probs, top_k)

    def predict_many(self, sources: Sequence[Any], top_k: int = 5, batch_size: int = 32) -> list[dict]:
        """[{source, top, error}] per input, in order; unreadable files get an error instead of stopping the batch."""
        results: list[dict] = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            tensors, slots = [], []
            for src in chunk:
                entry = {"source": str(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>",
                         "top": [], "error": None, "sure": None}
                try:
                    tensors.append(self.preprocess(src))
                    slots.append(entry)
                except ImageError as exc:
                    entry["error"] = str(exc)
                results.append(entry)
            if tensors:
                with self._lock:
                    probs = self.probabilities(torch.stack(tensors))
                for entry, row in zip(slots, probs):
                    entry["top"] = self._top(row, top_k)
                    entry["sure"] = self.verdict(entry["top"]).sure
        return results

    def explain(self, src: Any, class_idx: int | None = None):
        """(top-5, Grad-CAM overlay PIL image) for one image."""
        from shared.analysis.explain import GradCAM, overlay_cam  # only prediction with CAM needs it

        image = load_rgb(src)
        x = self.transform(image).unsqueeze(0).to(self.device)
        with self._lock:
            probs = self.probabilities(x)[0]
            target = int(probs.argmax()) if class_idx is None else class_idx
            cam = GradCAM(self.model, self.spec)(x, target)
        return self._top(probs, 5), overlay_cam(_centre_crop_view(image, self.image_size), cam)


def _centre_crop_view(image, image_size: int):
    """The image region the model saw (resize + centre crop), at the model's input size."""
    from torchvision.transforms import v2

    from shared.data.transforms import resize_size

    return v2.CenterCrop(image_size)(v2.Resize(resize_size(image_size), antialias=True)(image))


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets (CSV injection): file names
# come from uploads, class names from folder names, so each such cell gets a leading quote (OWASP's advice).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """`value` safe to open in a spreadsheet: text that would start a formula is prefixed with a single quote."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_predictions_csv(results: Iterable[dict], path: Path, top_k: int = 5) -> Path:
    """CSV with one row per input: source, top-1 class and probability, then the rest of the top-k, or the error.

    Text cells are neutralised with `csv_cell`, so a file or class named `=HYPERLINK(...)` stays text."""
    path = Path(path)
    header = ["source", "error"]
    for i in range(1, top_k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    with atomic_open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in results:
            row = [r["source"], r["error"] or ""]
            for item in r["top"][:top_k]:
                row += [item["class"], f"{item['probability']:.6f}"]
            writer.writerow([csv_cell(cell) for cell in row])
    return path


def resolve_run(store: RunStore, run: str) -> str:
    """'latest' → the newest succeeded run id; otherwise check the id exists and has a best checkpoint."""
    if run == "latest":
        run_id = store.latest_succeeded()
        if run_id is None:
            raise NoModelError(f"no finished run with a model in {store.root}: train one first "
                               "(resnet-lab train --data-dir DIR, or the Train tab)")
        return run_id
    try:
        run_dir = store.path(run)
    except RunNotFound as exc:
        raise NoModelError(str(exc)) from None
    if not (run_dir / "best.pt").is_file():
        raise NoModelError(f"run {run!r} has no best.pt in {store.root}: it has not finished an epoch yet")
    return run


class PredictorCache:
    """Keeps the most recently used predictors loaded; reloads a run whose best.pt changed on disk."""

    def __init__(self, store: RunStore, size: int = 2, device: str = "cpu"):
        self.store, self.size, self.device = store, size, device
        self._items: OrderedDict[tuple[str, float], Predictor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run: str = "latest") -> Predictor:
        run_id = resolve_run(self.store, run)
        key = (run_id, (self.store.path(run_id) / "best.pt").stat().st_mtime)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            predictor = Predictor(self.store.path(run_id), self.device)
            self._items[key] = predictor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return predictor

