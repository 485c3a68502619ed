"""What an export measures about its bundle (CPU latency, parity with the torch model) and the MODEL_CARD.md it writes."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from shared.export.bundle_predict import Model

# Latency: warm-up calls, then the median of timed calls, per batch size; a slow model gets fewer timed calls.
LATENCY_BATCHES = (1, 32)
LATENCY_BUDGET_S = 10.0


def measure_latency(bundle_dir: Path) -> dict:
    """{batch: median ms per call} of the bundle's model on this machine's CPU (the bundle's own runtime)."""
    model = Model(bundle_dir)
    size = int(model.bundle["image_size"])
    rng = np.random.default_rng(0)
    out = {}
    for batch in LATENCY_BATCHES:
        x = rng.standard_normal((batch, 3, size, size), dtype=np.float32)
        start = time.perf_counter()
        model.probabilities(x)  # warm-up (first call allocates)
        first = time.perf_counter() - start
        times = []
        calls = max(3, min(20, int(LATENCY_BUDGET_S / len(LATENCY_BATCHES) / max(first, 1e-3))))
        for _ in range(calls):
            start = time.perf_counter()
            model.probabilities(x)
            times.append(time.perf_counter() - start)
        out[batch] = {"ms": 1000 * statistics.median(times), "calls": calls}
    return out


def measure_parity(bundle_dir: Path, model, run_dir: Path, config: dict, limit: int | None = None) -> dict:
    """The bundle's own predict.py code (its numpy preprocessing + the exported model) against resnet-lab's torch path
    (`eval_transform` + the checkpoint) on up to `limit` test images of the run: top-1 agreement and the largest
    probability difference, before calibration (both sides would divide by the same temperature)."""
    import torch

    from shared.data.images import ImageError, load_rgb
    from shared.data.manifest import read_manifest
    from shared.data.scan import DatasetError
    from shared.data.transforms import eval_transform
    from shared.export.bundle import PARITY_SAMPLE
    from shared.export.bundle_predict import preprocess

    limit = PARITY_SAMPLE if limit is None else limit
    try:
        manifest = read_manifest(Path(run_dir) / "split.json")
    except DatasetError as exc:
        return {"n": 0, "reason": f"no split to check on ({exc})"}
    root = Path(manifest["root"])
    files = [root / f["path"] for f in manifest["files"] if f["split"] == "test"][:limit]
    bundle_model = Model(bundle_dir)
    bundle_model.temperature = 1.0
    pre = bundle_model.pre
    transform = eval_transform(int(bundle_model.bundle["image_size"]), pre["mean"], pre["std"])
    ours, theirs = [], []
    for path in files:
        try:
            image = load_rgb(path)
        except (ImageError, OSError):
            continue  # moved or unreadable since training: nothing to compare
        ours.append(transform(image))
        theirs.append(preprocess(image, pre))
    if not ours:
        return {"n": 0, "reason": f"none of the run's test images could be read under {root}"}
    with torch.inference_mode():
        reference = torch.softmax(model(torch.stack(ours)).float(), dim=1).double().numpy()
    exported = np.concatenate([bundle_model.probabilities(np.stack(theirs[i:i + 32]))
                               for i in range(0, len(theirs), 32)])
    return {"n": len(ours), "top1_agree": int((reference.argmax(1) == exported.argmax(1)).sum()),
            "max_abs_diff": float(np.abs(reference - exported).max())}


def model_card(run_dir: Path, info: dict, classes: list[str], config: dict, latency: dict | None,
               parity: dict | None, model_bytes: int) -> str:
    """MODEL_CARD.md: what the model is, what it was trained and tested on, how fast and how faithful it is."""
    from shared.analysis.eval_result import EvalResultError, load_eval_result

    lines = [f"# {info['model_name']} — run {info['run_id']}", "",
             f"Exported {info['exported']} by resnet-lab as **{info['format']}** (`{info['model_file']}`, "
             f"{model_bytes / 2**20:.1f} MiB on disk).", "",
             "## Model", "",
             f"- architecture: {info['model_name']}, input {info['image_size']}×{info['image_size']} RGB, "
             f"{len(classes)} classes: {', '.join(classes)}",
             f"- input `{info['input']['name']}` {info['input']['shape']} float32 (see preprocess.json), output "
             f"`{info['output']['name']}`: logits; probabilities are softmax(logits / temperature)",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()), "",
             "## Data", "",
             f"- data folder at training time: `{config.get('data_dir', 'unknown')}`",
             f"- split hash: `{config.get('split_hash') or 'not recorded'}` (sha256 of the split's file list; the "
             "run folder's split.json lists every file)",
             f"- training: {config.get('epochs', '?')} epochs, weights {config.get('weights', '?')}, "
             f"augmentation {config.get('augment', '?')}", "",
             "## Test metrics", ""]
    try:
        result = load_eval_result(run_dir)
    except EvalResultError as exc:
        result, lines = None, lines + [f"Not available: {exc}"]
    if result is not None:
        lines += [f"On the run's {result.split} split ({result.n} images):", "",
                  f"- accuracy {_pct(result.accuracy)}, balanced accuracy {_pct(result.balanced_accuracy)}, "
                  f"macro F1 {_num(result.macro_f1)}, top-{result.top_k} accuracy {_pct(result.top_k_accuracy)}",
                  f"- expected calibration error {_num(result.calibration.ece)}"]
    elif not lines[-1].startswith("Not available"):
        lines += ["Not evaluated yet (`resnet-lab evaluate RUN`, then export again)."]
    lines += ["", "## Calibration", ""]
    cal = info.get("calibration")
    if cal:
        target = f" (chosen for {_pct(cal['target_precision'])} precision on validation)" \
            if cal.get("target_precision") is not None else ""
        lines += [f"- temperature {cal['temperature']:.4g}: probabilities are softmax(logits / {cal['temperature']:.4g})",
                  f"- \"not sure\" threshold: {cal['threshold'] if cal['threshold'] is not None else 'none'}{target}"]
    else:
        lines += ["None: the run has no calibration.json, so probabilities are the plain softmax of the logits "
                  "and predict.py never answers \"not sure\" for low confidence."]
    distance = info.get("feature_distance")
    if distance:
        lines += [f"- unlike the training images: an image whose penultimate features are further than "
                  f"{distance['threshold']:.4g} (Mahalanobis) from every class mean is \"not sure\" too; the limit "
                  f"keeps {_pct(distance['quantile'])} of validation images answered (`{distance['file']}`)"]
    lines += ["", "## CPU latency (measured at export)", ""]
    if latency:
        lines += [f"On {platform.machine()} with {os.cpu_count()} logical CPUs ({info['format']} runtime, "
                  "median of warm calls, preprocessing not included; other work on the machine adds to it):", ""]
        lines += [f"- batch {b}: {v['ms']:.1f} ms per call ({v['ms'] / b:.2f} ms per image, {v['calls']} calls)"
                  for b, v in latency.items()]
    else:
        lines += ["Not measured for this export."]
    lines += ["", "## Parity with resnet-lab (measured at export)", ""]
    if parity and parity.get("n"):
        lines += [f"predict.py's code (its numpy preprocessing + this model) against resnet-lab's torch prediction on "
                  f"{parity['n']} of the run's test images: top-1 agrees on {parity['top1_agree']}/{parity['n']}, "
                  f"largest probability difference {parity['max_abs_diff']:.2e} (predict.py resizes with "
                  "torchvision's own kernel, written in numpy: the rest is floating-point order)."]
    else:
        lines += [f"Not measured: {(parity or {}).get('reason', 'skipped for this export')}."]
    lines += ["", "## Use", "", "```", "pip install onnxruntime numpy Pillow" if info["format"] == "onnx"
              else "pip install torch numpy Pillow", "python predict.py photo.jpg folder/ --csv predictions.csv",
              "```", ""]
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _num(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"
