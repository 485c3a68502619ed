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
from shared.analysis.feature_distance import FeatureDistanceError, read_feature_distance
from shared.training.checkpoint import load_model_from_run
from shared.training.models import WithFeatures, get_spec, logits_and_features
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
    calibration.json; so are images whose features are far from the training images' when it has a
    feature_distance.npz (shared/analysis/feature_distance.py). A run trained before these existed answers always
    (`calibration_note` says so).

    runtime="onnxruntime": the model is also exported to ONNX in memory, in a background thread (torch answers
    meanwhile), and ONNX Runtime takes over the top-5 forward pass when it measures faster than torch on this CPU;
    heat-maps always run on torch. Every outcome is logged with its reason (`self.runtime` names the one in use)."""

    def __init__(self, run_dir: Path, device: str = "cpu", runtime: str = "torch"):
        self.run_dir = Path(run_dir)
        self.run_id = self.run_dir.name
        self.device = torch.device(device)
        self.model, self.meta = load_model_from_run(self.run_dir, "best")
        self.model.to(self.device)
        self.spec = get_spec(self.meta["model_name"])  # where its head, heat-map layers and stages are
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
        try:
            self.feature_distance = read_feature_distance(self.run_dir, len(self.classes), self.spec.feature_size)
        except FeatureDistanceError as exc:
            self.feature_distance = None
            note = f"feature-distance check off: {exc}"
            self.calibration_note = f"{self.calibration_note}; {note}" if self.calibration_note else note
            log.warning("%s", note)
        # one model instance serves concurrent page requests; heat-map hooks must not interleave
        self._lock = threading.Lock()
        self.runtime, self._session = "torch", None
        if runtime == "onnxruntime":
            if self.device.type != "cpu":
                log.info("run %s: top-5 on torch (%s), not ONNX Runtime: it is for CPU", self.run_id, self.device)
            else:
                # not a daemon: a process exiting in the middle of an export aborts ("terminate called...")
                self.onnx_ready = threading.Thread(target=self._use_onnxruntime, name=f"onnx-{self.run_id}")
                self.onnx_ready.start()
        elif runtime != "torch":
            raise ValueError(f"runtime must be onnxruntime or torch, got {runtime!r}")

    def _use_onnxruntime(self) -> None:
        """Export, time both runtimes side by side on one input, keep the faster (logged either way)."""
        import copy
        import time

        from shared.export.bundle import onnx_session

        try:
            # a copy, taken under the lock: the trace must not see a concurrent heat-map's or feature read's hooks,
            # and predictions go on meanwhile; with a feature distance, one that also returns the features
            with self._lock:
                model = (WithFeatures(self.model, self.spec, self.image_size) if self.feature_distance is not None
                         else copy.deepcopy(self.model))
            session = onnx_session(model, self.image_size)
        except Exception as exc:  # noqa: BLE001 - any export failure leaves torch answering, said in the log
            log.warning("run %s: top-5 stays on torch: exporting it to ONNX failed (%s: %s)", self.run_id,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            return
        x = torch.zeros(1, 3, self.image_size, self.image_size)
        feed = {session.get_inputs()[0].name: x.numpy()}
        timings = {"torch": [], "onnxruntime": []}
        for _ in range(11):  # alternating, so both see the same load
            with self._lock:  # the model is shared: no forward pass while a heat-map's hooks are on it
                start = time.perf_counter()
                self._torch_forward(x)
                timings["torch"].append(time.perf_counter() - start)
            start = time.perf_counter()
            session.run(None, feed)
            timings["onnxruntime"].append(time.perf_counter() - start)
        ms = {name: 1000 * sorted(t)[len(t) // 2] for name, t in timings.items()}
        if ms["onnxruntime"] < ms["torch"]:
            self._session, self.runtime = session, "onnxruntime"
        log.info("run %s: top-5 on %s (median forward at batch 1: onnxruntime %.1f ms, torch %.1f ms)", self.run_id,
                 self.runtime, ms["onnxruntime"], ms["torch"])

    def preprocess(self, src: Any) -> torch.Tensor:
        return self.transform(load_rgb(src))

    def probabilities(self, batch: torch.Tensor) -> torch.Tensor:
        return self.scores(batch)[0]

    def scores(self, batch: torch.Tensor) -> tuple[torch.Tensor, list[float] | None]:
        """Softmax of the logits over the run's temperature (1 without calibration), image and mirror averaged when
        the run used TTA (as it was validated and calibrated); and each image's feature distance (of the image
        itself, as it was fitted), None for a run without one. The caller holds `_lock`."""
        logits, features = self._forward(batch)
        if self.tta:
            logits = (logits + self._forward(batch.flip(3))[0]) / 2
        distances = None
        if self.feature_distance is not None:
            distances = [float(d) for d in self.feature_distance.distances(features.double().numpy())]
        return torch.softmax(logits / self.temperature, dim=1), distances

    def _forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, penultimate features), on the CPU."""
        session = self._session
        if session is None:
            return self._torch_forward(batch)
        outputs = session.run(None, {session.get_inputs()[0].name: batch.numpy()})
        return torch.from_numpy(outputs[0]).float(), torch.from_numpy(outputs[-1]).float()

    @torch.inference_mode()
    def _torch_forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, features = logits_and_features(self.model, self.spec, batch.to(self.device))
        return logits.float().cpu(), features.float().cpu()

    def verdict(self, top: list[dict], threshold: float | None = None, distance: float | None = None) -> Verdict:
        """The answer for a top-k list: the class, or "not sure — closest: X" below `threshold` (default: the
        run's calibrated one; None for an uncalibrated run = always an answer) or when the image's feature
        `distance` is beyond the run's (None: not checked)."""
        limit = self.feature_distance.threshold if self.feature_distance is not None else None
        return verdict(top, self.threshold if threshold is None else threshold, distance,
                       limit if distance is not None else None)

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
        """[{source, top, error, sure, distance, familiar}] per input, in order: `sure` False is "not sure" (by
        confidence or distance), `familiar` None when the run has no feature distance; unreadable files get an
        error instead of stopping the batch."""
        results: list[dict] = []
        for start in range(0, len(sources), batch_size):
            chunk = sources[start:start + batch_size]
            tensors, slots = [], []
            for src in chunk:
                entry = {"source": str(src) if not isinstance(src, (bytes, bytearray)) else "<bytes>",
                         "top": [], "error": None, "sure": None, "distance": None, "familiar": None}
                try:
                    tensors.append(self.preprocess(src))
                    slots.append(entry)
                except ImageError as exc:
                    entry["error"] = str(exc)
                results.append(entry)
            if tensors:
                with self._lock:
                    probs, distances = self.scores(torch.stack(tensors))
                for i, (entry, row) in enumerate(zip(slots, probs)):
                    entry["top"] = self._top(row, top_k)
                    answer = self.verdict(entry["top"], distance=distances[i] if distances else None)
                    entry.update(sure=answer.sure, distance=answer.distance, familiar=answer.familiar)
        return results

    def explain(self, src: Any, class_idx: int | None = None):
        """(top-5, heat-map overlay PIL image, caption) for one image; the caption names the method and the map's
        resolution ("LayerCAM heat-map 16×16 over 128×128 input"), to be shown beside the overlay."""
        image = load_rgb(src)
        x = self.transform(image).unsqueeze(0).to(self.device)
        with self._lock:
            probs = self.probabilities(x)[0]
        target = int(probs.argmax()) if class_idx is None else class_idx
        overlay, caption = self.cam(image, target, x)
        return self._top(probs, 5), overlay, caption

    def cam(self, image, class_idx: int, x: torch.Tensor | None = None):
        """(heat-map overlay PIL image, caption) of `class_idx` for an RGB PIL image: the page shows the top-5
        first (`predict`) and this when it is ready."""
        from shared.analysis.explain import create_cam, overlay_cam  # only prediction with a heat-map needs it

        x = self.transform(image).unsqueeze(0).to(self.device) if x is None else x
        with self._lock:
            explainer = create_cam(self.model, self.spec)
            heat = explainer(x, class_idx)
        caption = f"{explainer.title} {explainer.resolution(x.shape[-2:])}"
        return overlay_cam(_centre_crop_view(image, self.image_size), heat), caption


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
    """'latest' → the newest succeeded run id; 'best' → the best one on the latest's dataset and classes
    (`RunStore.best_succeeded`); otherwise check the id exists and has a best checkpoint."""
    if run in ("latest", "best"):
        if run == "best":
            choice = store.best_succeeded()
            run_id = choice.run_id if choice else None
        else:
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

    def __init__(self, store: RunStore, size: int = 2, device: str = "cpu", runtime: str = "torch"):
        self.store, self.size, self.device, self.runtime = store, size, device, runtime
        self._items: OrderedDict[tuple[str, float], Predictor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, run: str = "latest") -> Predictor:
        run_id = resolve_run(self.store, run)
        key = (run_id, (self.store.path(run_id) / "best.pt").stat().st_mtime)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            predictor = Predictor(self.store.path(run_id), self.device, self.runtime)
            self._items[key] = predictor
            while len(self._items) > self.size:
                self._items.popitem(last=False)
            return predictor

