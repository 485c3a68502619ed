#!/usr/bin/env python3
"""Classify images with an exported resnet-lab model: the bundle's `predict.py`.

Needs only onnxruntime, numpy and Pillow (`pip install onnxruntime numpy Pillow`); a TorchScript bundle
(`model.pt`) needs torch instead of onnxruntime. Run it from anywhere:

    python predict.py photo.jpg some/folder/ [--top-k 5] [--csv out.csv]

It prints and writes what `resnet-lab predict` does: one line per image, and with `--csv` the same CSV (columns
source, error, class_1, probability_1, ...). The preprocessing is read from `preprocess.json` (written by the
export from the run's own settings): short side resized with antialiased bilinear to `resize_short_side`, the
long side as torchvision computes it, a centre crop of `crop`, values scaled to 0..1, then (x - mean) / std. The
resize is torchvision's own kernel written in numpy (`resize`), so the model sees the pixels resnet-lab gives it.

When the run was calibrated (`bundle.json` → calibration: temperature scaling fitted on its validation split),
probabilities are softmax(logits / temperature), and an answer below the "not sure" threshold is printed as
"not sure — closest: ..." (the CSV keeps the numbers). Without calibration they are plain softmax(logits). When the
bundle has `feature_distance.npz`, an image whose penultimate features (the model's second output) are further
from every class than the run's threshold is "not sure" too: it is unlike the training images. This file is a
copy of resnet-lab's `shared/export/bundle_predict.py`; it imports nothing from resnet-lab.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

HERE = Path(__file__).resolve().parent
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
# Text that would start a formula in a spreadsheet gets a leading quote (CSV injection), as resnet-lab does.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


# ---------- images ----------

def expand_image_paths(items):
    """Files as given, folders replaced by the image files inside them (recursively, sorted)."""
    files = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*")
                            if (p.is_file() or p.is_symlink()) and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif not (path.exists() or path.is_symlink()):
            raise FileNotFoundError(f"no such file or folder: {item}")
        else:
            files.append(path)
    return files


def load_rgb(path) -> Image.Image:
    """8-bit RGB, EXIF orientation applied, transparency on white, first frame (as resnet-lab decodes)."""
    with Image.open(path) as img:
        img.seek(0)
        img.load()
        img = ImageOps.exif_transpose(img)
    if img.mode == "RGB":
        return img
    if img.mode in ("P", "PA", "RGBA", "RGBa", "LA", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    if img.mode.startswith("I;16") or img.mode in ("I", "F"):
        a = np.asarray(img).astype(np.float64)
        lo, hi = float(np.nanmin(a)), float(np.nanmax(a))
        if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
            a = np.round(a / 257.0)
        elif img.mode == "F" and lo >= 0 and hi <= 1:
            a = np.nan_to_num(np.round(a * 255.0))
        else:
            a = np.zeros(a.shape) if not hi > lo else np.nan_to_num(np.round((a - lo) * (255.0 / (hi - lo))))
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L").convert("RGB")
    return img.convert("RGB")


def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) after resizing the short side to `short_side`, the long side rounded down (torchvision)."""
    if width <= height:
        return short_side, int(short_side * height / width)
    return int(short_side * width / height), short_side


# torchvision resizes uint8 images with torch's antialiased bilinear kernel (aten/src/ATen/native/cpu/
# UpSampleKernel.cpp): Pillow's filter, but with integer weights of at most 15 bits instead of Pillow's 22, so
# Pillow's own resize differs by one grey level on some pixels. These two functions are that kernel in numpy:
# the same weights, the same integer sums, width first then height; they give torchvision's pixels exactly.

def _aa_weights(in_size: int, out_size: int):
    """(first source index, integer weights (out, taps), precision bits) of one axis."""
    scale = in_size / out_size
    support = scale if scale >= 1.0 else 1.0  # bilinear: half-width 1, stretched by the scale when shrinking
    invscale = 1.0 / scale if scale >= 1.0 else 1.0
    centres = scale * (np.arange(out_size) + 0.5)
    xmin = np.maximum((centres - support + 0.5).astype(np.int64), 0)
    xsize = np.minimum((centres + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(int(xsize.max()))
    w = np.clip(1.0 - np.abs((taps[None, :] + xmin[:, None] - centres[:, None] + 0.5) * invscale), 0.0, None)
    w[taps[None, :] >= xsize[:, None]] = 0.0
    total = w.sum(axis=1, keepdims=True)
    w = w / np.where(total == 0, 1.0, total)
    precision = 0
    while precision < 22 and int(0.5 + w.max() * (1 << (precision + 1))) < (1 << 15):
        precision += 1
    return xmin, (0.5 + w * (1 << precision)).astype(np.int32), precision  # weights are >= 0: round half up


def _resample(a: np.ndarray, axis: int, out_size: int) -> np.ndarray:
    in_size = a.shape[axis]
    xmin, w, precision = _aa_weights(in_size, out_size)
    a = np.moveaxis(a, axis, 0)
    acc = np.full((out_size,) + a.shape[1:], 1 << (precision - 1), dtype=np.int32)
    shape = (out_size,) + (1,) * (a.ndim - 1)
    for k in range(w.shape[1]):
        acc += a[np.minimum(xmin + k, in_size - 1)].astype(np.int32) * w[:, k].reshape(shape)
    return np.moveaxis(np.clip(acc >> precision, 0, 255).astype(np.uint8), 0, axis)


def resize(pixels: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 (H, W, 3) → (height, width, 3), antialiased bilinear exactly as torchvision's v2.Resize."""
    if pixels.shape[1] != width:
        pixels = _resample(pixels, 1, width)
    if pixels.shape[0] != height:
        pixels = _resample(pixels, 0, height)
    return pixels


def preprocess(img: Image.Image, pre: dict) -> np.ndarray:
    """RGB image → float32 (3, crop, crop), normalised: resize (antialiased bilinear), centre crop, scale, mean/std."""
    w, h = resized_size(img.width, img.height, int(pre["resize_short_side"]))
    pixels = resize(np.asarray(img), w, h)
    crop = int(pre["crop"])
    if min(w, h) < crop:  # never from resnet-lab, whose resize is crop / 0.875 (torchvision would pad)
        raise ValueError(f"preprocess.json: resize_short_side {w, h} is smaller than the crop {crop}")
    # torchvision's centre crop: offsets rounded half to even, as Python's round
    top, left = int(round((h - crop) / 2.0)), int(round((w - crop) / 2.0))
    x = pixels[top:top + crop, left:left + crop].astype(np.float32) / np.float32(255.0)
    mean = np.asarray(pre["mean"], dtype=np.float32)
    std = np.asarray(pre["std"], dtype=np.float32)
    return ((x - mean) / std).transpose(2, 0, 1)


# ---------- the model ----------

class Model:
    """The bundle's model: model.onnx through onnxruntime, or model.pt (TorchScript) through torch."""

    def __init__(self, folder: Path = HERE):
        self.folder = Path(folder)
        self.bundle = json.loads((self.folder / "bundle.json").read_text(encoding="utf-8"))
        self.pre = json.loads((self.folder / "preprocess.json").read_text(encoding="utf-8"))
        self.classes = json.loads((self.folder / "classes.json").read_text(encoding="utf-8"))
        calibration = self.bundle.get("calibration") or {}
        self.temperature = float(calibration.get("temperature") or 1.0)
        self.threshold = calibration.get("threshold")
        self.distance = self._read_distance()
        model_file = self.folder / self.bundle["model_file"]
        if self.bundle["format"] == "onnx":
            import onnxruntime as ort

            self.session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
            self.input_name = self.session.get_inputs()[0].name
            self._forward = lambda x: self.session.run(None, {self.input_name: x})
        else:
            import warnings

            import torch

            with warnings.catch_warnings():  # torch marks torch.jit deprecated; loading a TorchScript file still works
                warnings.simplefilter("ignore", FutureWarning)
                module = torch.jit.load(str(model_file), map_location="cpu").eval()

            def forward(x):
                with torch.inference_mode():
                    out = module(torch.from_numpy(x))
                return [o.float().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]
            self._forward = forward

    def _read_distance(self) -> dict | None:
        """whiten (D, D), means (C, D), threshold from feature_distance.npz (numbers only: allow_pickle=False)."""
        entry = self.bundle.get("feature_distance")
        if not entry:
            return None
        # a name inside this folder, whatever bundle.json says
        with np.load(self.folder / Path(str(entry["file"])).name, allow_pickle=False) as data:
            whiten, means = data["whiten"].astype(np.float64), data["means"].astype(np.float64)
            threshold = float(data["threshold"])
        if whiten.ndim != 2 or means.ndim != 2 or not whiten.shape[0] == whiten.shape[1] == means.shape[1]:
            raise ValueError(f"{entry['file']}: whiten {whiten.shape} and means {means.shape} do not fit together")
        return {"whiten": whiten, "means": means, "threshold": threshold}

    def probabilities(self, batch: np.ndarray) -> np.ndarray:
        return self.scores(batch)[0]

    def scores(self, batch: np.ndarray):
        """(probabilities (N, C), each image's feature distance or None), as resnet-lab's Predictor computes them."""
        outputs = self._forward(np.ascontiguousarray(batch, dtype=np.float32))
        logits = outputs[0].astype(np.float64) / self.temperature
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        distances = None
        if self.distance is not None:  # the nearest class mean, in whitened features
            z = outputs[-1].astype(np.float64) @ self.distance["whiten"].T
            m = self.distance["means"]
            squared = (z * z).sum(1, keepdims=True) - 2 * z @ m.T + (m * m).sum(1)[None, :]
            distances = np.sqrt(np.maximum(squared.min(1), 0.0))
        return e / e.sum(axis=1, keepdims=True), distances

    def top(self, probs: np.ndarray, top_k: int) -> list[dict]:
        k = max(1, min(top_k, len(self.classes)))
        order = np.argsort(-probs, kind="stable")[:k]
        return [{"class": self.classes[i], "probability": float(probs[i])} for i in order]

    def predict_many(self, sources, top_k: int = 5, batch_size: int = 32) -> list[dict]:
        """[{source, top, error, familiar}] per file, in order (familiar: None without a feature distance); a file
        that cannot be read gets an error, not a crash."""
        results = []
        for start in range(0, len(sources), batch_size):
            arrays, slots = [], []
            for src in sources[start:start + batch_size]:
                entry = {"source": str(src), "top": [], "error": None, "familiar": None}
                try:
                    arrays.append(preprocess(load_rgb(src), self.pre))
                    slots.append(entry)
                except (OSError, ValueError, Image.DecompressionBombError) as exc:
                    entry["error"] = f"{src}: cannot read the image ({exc})"
                results.append(entry)
            if arrays:
                probs, distances = self.scores(np.stack(arrays))
                for i, (entry, row) in enumerate(zip(slots, probs)):
                    entry["top"] = self.top(row, top_k)
                    if distances is not None:
                        entry["familiar"] = bool(distances[i] <= self.distance["threshold"])
        return results


# ---------- output ----------

def csv_cell(value):
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


def write_csv(results, path, top_k: int) -> None:
    header = ["source", "error"]
    for i in range(1, top_k + 1):
        header += [f"class_{i}", f"probability_{i}"]
    tmp = Path(f"{path}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for r in results:
            row = [r["source"], r["error"] or ""]
            for item in r["top"][:top_k]:
                row += [item["class"], f"{item['probability']:.6f}"]
            writer.writerow([csv_cell(cell) for cell in row])
    os.replace(tmp, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", help="image files or folders")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--csv", help="also write the predictions to this CSV file")
    args = parser.parse_args(argv)
    try:
        files = expand_image_paths(args.files)
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = Model()
    print(f"model: run {model.bundle['run_id']} ({model.bundle['model_name']}, classes: "
          f"{', '.join(model.classes)})", file=sys.stderr)
    results = model.predict_many(files, top_k=args.top_k)
    failures = 0
    for r in results:
        if r["error"]:
            failures += 1
            print(f"{r['source']}: skipped: {r['error']}")
            continue
        top = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"])
        unsure = model.threshold is not None and r["top"][0]["probability"] < float(model.threshold)
        why = " (unlike the images it was trained on)" if r["familiar"] is False else ""
        print(f"{r['source']}: {'not sure — closest: ' if unsure or why else ''}{top}{why}")
    if args.csv:
        write_csv(results, args.csv, args.top_k)
        print(f"wrote {args.csv}", file=sys.stderr)
    return 1 if results and failures == len(results) else 0


if __name__ == "__main__":
    sys.exit(main())
