"""Export a run's best model as a folder anyone can use without resnet-lab: the model, its classes, its exact
preprocessing, its calibration, a model card and a standalone `predict.py`.

    <out_dir>/
      model.onnx | model.pt   ONNX (dynamic batch axis) or TorchScript (torch.jit.trace); input (N, 3, S, S) float32,
                              output the logits (N, classes), and the penultimate features (N, D) second when the
                              run has a feature distance
      feature_distance.npz    the run's, copied when it has one (shared/analysis/feature_distance.py)
      classes.json            class names, in the model's output order
      preprocess.json         resize, centre crop, mean/std: what `shared.data.transforms.eval_transform` does
      bundle.json             format, versions (torch, onnx, onnxruntime, opset), calibration, the run it came from
      MODEL_CARD.md           data, split hash, test metrics, size, CPU latency, parity measured at export time
      predict.py              `shared/export/bundle_predict.py`, copied: onnxruntime + numpy + Pillow, no torch

Calibration comes from `<run_dir>/calibration.json` ({"temperature", "threshold", "target_precision", ...}) when
the run has one; the bundle copies temperature and threshold into bundle.json. The feature distance travels as its
own file, read by predict.py as resnet-lab reads it, so the bundle says "not sure" where the page does.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import threading
import time
import zipfile
from pathlib import Path

from shared.fsutil import atomic_path, write_atomic

log = logging.getLogger(__name__)

FORMATS = ("onnx", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
BUNDLE_VERSION = 1
INPUT_NAME, OUTPUT_NAME, FEATURES_NAME = "images", "logits", "features"
# How many test images the export checks the bundle on (its predict.py code against the torch model).
PARITY_SAMPLE = 64


class ExportError(ValueError):
    """The run cannot be exported as asked; the message says why and what to do."""


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return fmt


def export_run(run_dir: str | Path, fmt: str = "onnx", out_dir: str | Path | None = None, *,
               measure: bool = True) -> Path:
    """Write the bundle of `run_dir`'s best model to `out_dir` (default `<run_dir>/export/<run id>-<fmt>`); return it.

    `out_dir` must be new, empty, or an earlier bundle (which is replaced whole, never merged). `measure=False`
    skips the latency and parity measurements (the card says so): the registry test exports every model."""
    from shared.analysis.feature_distance import FILE_NAME as DISTANCE_FILE
    from shared.analysis.feature_distance import write_feature_distance
    from shared.runs.store import read_run_file
    from shared.training.checkpoint import load_model_from_run
    from shared.training.models import WithFeatures, get_spec

    check_format(fmt)
    run_dir = Path(run_dir)
    out_dir = Path(out_dir) if out_dir is not None else default_bundle_dir(run_dir, fmt)
    _check_target(out_dir)
    model, meta = load_model_from_run(run_dir, "best")
    config = read_run_file(run_dir, "config.json")
    calibration = read_calibration(run_dir)
    distance = read_distance(run_dir, meta)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        size = int(meta["image_size"])
        model_file = staging / MODEL_FILES[fmt]
        exported = WithFeatures(model, get_spec(meta["model_name"]), size) if distance is not None else model
        versions = (_export_onnx if fmt == "onnx" else _export_torchscript)(exported, size, model_file)
        info = {"bundle_version": BUNDLE_VERSION, "format": fmt, "model_file": model_file.name,
                "run_id": run_dir.name, "model_name": meta["model_name"], "image_size": size,
                "input": {"name": INPUT_NAME, "shape": ["batch", 3, size, size], "dtype": "float32"},
                "output": {"name": OUTPUT_NAME, "shape": ["batch", len(meta["classes"])], "meaning": "logits"},
                "calibration": calibration, "versions": versions,
                "exported": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        write_atomic(staging / "classes.json", json.dumps(list(meta["classes"]), indent=1, ensure_ascii=False) + "\n")
        write_atomic(staging / "preprocess.json", json.dumps(preprocess_spec(size, meta["mean"], meta["std"]),
                                                             indent=1) + "\n")
        if distance is not None:
            info["features"] = {"name": FEATURES_NAME, "shape": ["batch", int(distance.whiten.shape[1])],
                                "meaning": "penultimate features (the second output)"}
            info["feature_distance"] = {"file": DISTANCE_FILE, "threshold": distance.threshold,
                                        "quantile": distance.quantile}
            write_feature_distance(staging, distance)  # what was checked, written again: never the raw file
        write_atomic(staging / "bundle.json", json.dumps(info, indent=1, ensure_ascii=False) + "\n")
        shutil.copyfile(Path(__file__).with_name("bundle_predict.py"), staging / "predict.py")
        from shared.export.card import model_card, measure_latency, measure_parity

        latency = measure_latency(staging) if measure else None
        parity = measure_parity(staging, model, run_dir, config) if measure else None
        write_atomic(staging / "MODEL_CARD.md", model_card(run_dir, info, list(meta["classes"]), config,
                                                           latency, parity, model_file.stat().st_size))
        _replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    log.info("exported run %s as %s to %s", run_dir.name, fmt, out_dir)
    return out_dir


def default_bundle_dir(run_dir: str | Path, fmt: str) -> Path:
    """Where the page's Export button puts a run's bundle (and its zip next to it)."""
    run_dir = Path(run_dir)
    return run_dir / "export" / f"{run_dir.name}-{check_format(fmt)}"


def preprocess_spec(image_size: int, mean, std) -> dict:
    """What `eval_transform(image_size, mean, std)` does, as data (bundle_predict.preprocess reads it)."""
    from shared.data.transforms import resize_size

    return {"resize_short_side": resize_size(image_size), "crop": image_size,
            "interpolation": "bilinear, antialiased (torchvision v2.Resize(antialias=True))",
            "long_side": "int(resize_short_side * long / short), as torchvision computes it",
            "crop_offsets": "top = round((height - crop) / 2), left = round((width - crop) / 2)",
            "scale": "pixel / 255", "mean": [float(m) for m in mean], "std": [float(s) for s in std],
            "normalise": "(x - mean) / std per channel, RGB order", "layout": "NCHW float32"}


def read_distance(run_dir: Path, meta: dict):
    """The run's FeatureDistance (checked against the model), None without; a damaged file stops the export."""
    from shared.analysis.feature_distance import FeatureDistanceError, read_feature_distance
    from shared.training.models import get_spec

    try:
        return read_feature_distance(run_dir, len(meta["classes"]), get_spec(meta["model_name"]).feature_size)
    except FeatureDistanceError as exc:
        raise ExportError(f"{exc} — train the run again or delete the file, then export") from None


def read_calibration(run_dir: Path) -> dict | None:
    """{"temperature", "threshold", "target_precision"} of the run's calibration.json, read through its one schema
    (`shared.analysis.calibration`, as the Predictor reads it: a bundle never answers differently); None without."""
    from shared.analysis.calibration import CalibrationError, read_calibration as read_run_calibration

    try:
        calibration = read_run_calibration(run_dir)
    except CalibrationError as exc:
        raise ExportError(f"{exc} — calibrate the run again or delete the file, then export") from None
    if calibration is None:
        return None
    return {"temperature": calibration.temperature, "threshold": calibration.threshold,
            "target_precision": calibration.target_precision}


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir())
                                                        and not (out_dir / "bundle.json").is_file())):
        raise ExportError(f"{out_dir} exists and is not an empty folder or an earlier export — choose a new folder")


def _replace(staging: Path, out_dir: Path) -> None:
    """The finished bundle takes `out_dir`'s place: an earlier bundle is moved aside first, then removed."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{staging.name[-8:]}")
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def onnx_program(model, image_size: int):
    """The model as an ONNX program through torch.export (torch's maintained exporter), batch axis dynamic."""
    import torch

    from shared.training.models import WithFeatures

    example = torch.zeros(2, 3, image_size, image_size)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with _EXPORT_LOCK:
        outputs = [OUTPUT_NAME, FEATURES_NAME] if isinstance(model, WithFeatures) else [OUTPUT_NAME]
        return torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=outputs,
                                 dynamic_shapes=({0: batch},), dynamo=True, verbose=False)


# torch.export keeps its tracing state per process, not per thread: two exports at once (the page loading two
# predictors, or one while the Results tab exports) fail with "ProxyTorchDispatchMode slot already occupied".
_EXPORT_LOCK = threading.Lock()


def onnx_session(model, image_size: int):
    """An ONNX Runtime CPU session of the model, exported in memory (the page's fast top-5)."""
    import onnxruntime

    proto = onnx_program(model, image_size).model_proto
    return onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])


def _export_onnx(model, image_size: int, path: Path) -> dict:
    import onnx
    import onnxruntime
    import torch

    program = onnx_program(model, image_size)
    with atomic_path(path) as tmp:
        program.save(str(tmp))
    proto = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    return {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
            "opset": opset}


def _export_torchscript(model, image_size: int, path: Path) -> dict:
    """TorchScript by tracing (torch marks torch.jit deprecated in favour of torch.export, but TorchScript is what
    the issue asks for and what C++/mobile runtimes load today): its warnings are expected, so not repeated."""
    import warnings

    import torch

    with warnings.catch_warnings(), torch.no_grad():
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
        traced = torch.jit.trace(model, torch.zeros(1, 3, image_size, image_size))
        with atomic_path(path) as tmp:
            torch.jit.save(traced, str(tmp))
    return {"torch": torch.__version__}


def zip_bundle(bundle_dir: str | Path, zip_path: str | Path | None = None) -> Path:
    """The bundle as one .zip (default `<bundle_dir>.zip`), its files under a folder named like the bundle."""
    bundle_dir = Path(bundle_dir)
    zip_path = Path(zip_path) if zip_path is not None else bundle_dir.with_name(bundle_dir.name + ".zip")
    with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(bundle_dir.iterdir()):
            if file.is_file():
                archive.write(file, f"{bundle_dir.name}/{file.name}")
    return zip_path
