"""Generate small test images and image folders in a temporary directory (never download, never copy photos).

`make_image_folder` builds a dataset whose classes are learnable: each class has its own dominant colour and
stripe pattern, plus per-image noise and brightness jitter, so a tiny CNN beats chance in a few epochs.
The `write_*` helpers produce the broken files real users bring: empty, truncated, HTML saved as .jpg, ...
`pointing_scene` / `pointing_dataset` draw scenes with one class-deciding object at a known place among clutter,
for testing where heat-maps point (tests/test_explain.py, bench/bench_pointing_game.py).
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

# Well separated hues; class i gets COLOURS[i % 8] and PATTERNS[i % 3]: 24 distinct (colour, pattern) pairs.
COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 220), (230, 200, 40), (160, 60, 200), (40, 200, 210),
           (240, 130, 30), (120, 120, 120)]
PATTERNS = ["hstripes", "vstripes", "checker"]
CORRUPT_KINDS = ("truncated", "text", "html", "empty", "svg")


def class_names(n: int) -> list[str]:
    """Default class folder names: class_0, class_1, ..."""
    return [f"class_{i}" for i in range(n)]


def image_array(size: int | tuple[int, int] = 48, *, colour=(220, 40, 40), pattern: str = "hstripes",
                noise: float = 12.0, rng: np.random.Generator | None = None) -> np.ndarray:
    """An HxWx3 uint8 array: `colour` modulated by a stripe/checker pattern, with brightness jitter and noise."""
    rng = rng or np.random.default_rng(0)
    w, h = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:h, 0:w]
    period = max(4, min(w, h) // 6)
    phase = int(rng.integers(0, period))
    if pattern == "hstripes":
        mask = ((yy + phase) // (period // 2)) % 2
    elif pattern == "vstripes":
        mask = ((xx + phase) // (period // 2)) % 2
    elif pattern == "checker":
        mask = (((xx + phase) // (period // 2)) + ((yy + phase) // (period // 2))) % 2
    elif pattern == "plain":
        mask = np.ones((h, w), dtype=int)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected hstripes, vstripes, checker or plain")
    base = np.asarray(colour, dtype=np.float64) * rng.uniform(0.8, 1.1)
    img = base[None, None, :] * (0.6 + 0.4 * mask[..., None])
    img = img + rng.normal(0.0, noise, size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image(path: str | Path, size: int | tuple[int, int] = 48, *, colour=(220, 40, 40),
               pattern: str = "hstripes", noise: float = 12.0, seed: int = 0, mode: str = "RGB",
               **save_kwargs) -> Path:
    """Write one generated image; the format follows the extension (.jpg, .png, .bmp, .gif, .webp, .tif)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_array(size, colour=colour, pattern=pattern, noise=noise, rng=np.random.default_rng(seed))
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, **save_kwargs)
    return path


def make_image_folder(root: str | Path, classes: int | Sequence[str] = 3, per_class: int | Sequence[int] = 12,
                      size: int = 48, *, corrupt: int = 0, ext: str = ".jpg", seed: int = 0) -> Path:
    """Create `root/<class>/<class>_<k><ext>` images with learnable classes; return `root`.

    classes: a count (names class_0, class_1, ...) or a list of names. per_class: one count for all classes
    or one per class (for imbalance). corrupt: that many extra broken files (cycling through CORRUPT_KINDS),
    spread over the classes round-robin, named `broken_<k>.jpg`, on top of the valid images.
    """
    root = Path(root)
    names = class_names(classes) if isinstance(classes, int) else list(classes)
    counts = [per_class] * len(names) if isinstance(per_class, int) else list(per_class)
    if len(counts) != len(names):
        raise ValueError(f"per_class has {len(counts)} counts for {len(names)} classes")
    rng = np.random.default_rng(seed)
    for ci, (name, n) in enumerate(zip(names, counts)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            make_image(folder / f"{name}_{k:03d}{ext}", size, colour=COLOURS[ci % len(COLOURS)],
                       pattern=PATTERNS[ci % len(PATTERNS)],
                       seed=int(rng.integers(0, 2**31)))
    for k in range(corrupt):
        write_corrupt(root / names[k % len(names)] / f"broken_{k:03d}.jpg", CORRUPT_KINDS[k % len(CORRUPT_KINDS)])
    return root


# --- broken files ------------------------------------------------------------------------------------------

def write_corrupt(path: str | Path, kind: str) -> Path:
    """Write a broken file of `kind` (one of CORRUPT_KINDS) at `path`."""
    writers = {"truncated": write_truncated_jpeg, "text": lambda p: write_text_as_image(p, "text"),
               "html": lambda p: write_text_as_image(p, "html"), "svg": lambda p: write_text_as_image(p, "svg"),
               "empty": write_zero_byte}
    if kind not in writers:
        raise ValueError(f"unknown corrupt kind {kind!r}; expected one of {', '.join(writers)}")
    return writers[kind](path)


def write_zero_byte(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def jpeg_bytes(size: int = 64, *, seed: int = 0, quality: int = 90) -> bytes:
    """A valid noisy JPEG (noise keeps the entropy-coded data large, so truncation is visible)."""
    arr = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def write_truncated_jpeg(path: str | Path, size: int = 64, keep: float = 0.5) -> Path:
    """A JPEG cut off after `keep` of its bytes (an interrupted copy or download)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(size)
    path.write_bytes(data[: int(len(data) * keep)])
    return path


_TEXTS = {
    "text": b"this is not an image, just some notes\n",
    "html": b"<!DOCTYPE html>\n<html><head><title>Access denied</title></head><body>403</body></html>\n",
    "svg": b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10">'
           b'<rect width="10" height="10" fill="red"/></svg>\n',
}


def write_text_as_image(path: str | Path, kind: str = "text") -> Path:
    """Text, HTML or SVG content under an image name (e.g. `photo.jpg`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_TEXTS[kind])
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def bomb_png_bytes(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb as far as a decoder knows)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def write_bomb_png(path: str | Path, width: int = 30_000, height: int = 30_000) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bomb_png_bytes(width, height))
    return path


def write_exif_rotated_jpeg(path: str | Path, orientation: int = 6, size: tuple[int, int] = (40, 20)) -> Path:
    """A landscape JPEG (left half red, right half blue) tagged with EXIF `orientation`.

    Orientation 6 means "rotate 90 degrees clockwise to display": the upright image is portrait, red on top.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    w, h = size
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2:] = (0, 0, 255)
    img = Image.fromarray(arr, "RGB")
    exif = Image.Exif()
    exif[0x0112] = orientation
    img.save(path, "JPEG", quality=95, exif=exif.tobytes())
    return path


# --- scenes with an object at a known place (heat-map pointing game) ---------------------------------------

POINTING_CLASSES = ("ring", "plus", "cross")


def pointing_scene(size: int, label: int, rng: np.random.Generator, clutter: tuple[int, int] = (4, 7)
                   ) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """One (size, size, 3) uint8 scene and its object's box (row0, col0, row1, col1), end exclusive.

    The object, whose shape alone decides the class (POINTING_CLASSES: a square ring, a plus, a diagonal cross;
    drawn with thick strokes, about 30% of the side), sits at a random place on a smooth random-colour background
    with noise; clutter (filled discs and squares, 12-22% of the side) is scattered elsewhere. Colours are random for
    the object and the clutter alike, so only the object's shape and place tell the class: a heat-map that explains
    the decision must point at the object (the pointing game of Zhang et al., 2016, arXiv:1608.00507).
    """
    from PIL import ImageDraw

    if label not in range(len(POINTING_CLASSES)):
        raise ValueError(f"label must be 0..{len(POINTING_CLASSES) - 1}, got {label}")
    yy, xx = np.mgrid[0:size, 0:size] / size
    start, slope = rng.uniform(40, 150, 3), rng.uniform(-50, 50, (2, 3))
    background = start + yy[..., None] * slope[0] + xx[..., None] * slope[1]
    image = Image.fromarray(np.clip(background, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)

    def colour():
        return tuple(int(v) for v in rng.integers(0, 256, 3))

    side = int(round(size * rng.uniform(0.26, 0.34)))
    r0, c0 = (int(v) for v in rng.integers(1, size - side - 1, 2))
    box = (r0, c0, r0 + side, c0 + side)
    stroke = max(2, side // 6)
    placed = [box]
    for _ in range(int(rng.integers(*clutter))):
        for _attempt in range(20):  # rejection sampling: clutter never touches the object (nor other clutter)
            s = int(round(size * rng.uniform(0.12, 0.22)))
            r, c = (int(v) for v in rng.integers(0, size - s, 2))
            if all(r + s + 2 <= b[0] or b[2] + 2 <= r or c + s + 2 <= b[1] or b[3] + 2 <= c for b in placed):
                placed.append((r, c, r + s, c + s))
                shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
                shape([c, r, c + s - 1, r + s - 1], fill=colour())
                break
    fill = colour()
    x0, y0, x1, y1 = c0, r0, c0 + side - 1, r0 + side - 1
    if label == 0:
        draw.rectangle([x0, y0, x1, y1], outline=fill, width=stroke)
    elif label == 1:
        mid = side // 2
        draw.rectangle([x0, y0 + mid - stroke // 2, x1, y0 + mid + (stroke - 1) // 2], fill=fill)
        draw.rectangle([x0 + mid - stroke // 2, y0, x0 + mid + (stroke - 1) // 2, y1], fill=fill)
    else:
        draw.line([x0, y0, x1, y1], fill=fill, width=stroke)
        draw.line([x0, y1, x1, y0], fill=fill, width=stroke)
    arr = np.asarray(image, dtype=np.float32) + rng.normal(0.0, 10.0, (size, size, 3))
    return np.clip(arr, 0, 255).astype(np.uint8), box


def pointing_dataset(n: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`n` scenes: (images (n, size, size, 3) uint8, labels (n,), boxes (n, 4)); classes balanced, order random."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(POINTING_CLASSES))
    images = np.zeros((n, size, size, 3), np.uint8)
    boxes = np.zeros((n, 4), int)
    for i, label in enumerate(labels):
        images[i], boxes[i] = pointing_scene(size, int(label), rng)
    return images, labels, boxes


# --- bad data on purpose (tests/test_data_issues.py, bench/bench_data_issues.py) ------------------------------

def flip_labels(root: str | Path, fraction: float = 0.05, seed: int = 0) -> set[str]:
    """Move `fraction` of the images of an image folder into another (random) class folder, renamed
    `flipped_<name>`; returns their new relative paths (the label errors a finder should report)."""
    import random

    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    files = sorted(p for c in classes for p in (root / c).iterdir() if p.is_file())
    rng = random.Random(seed)
    flipped = set()
    for f in rng.sample(files, max(1, round(fraction * len(files)))):
        other = rng.choice([c for c in classes if c != f.parent.name])
        target = root / other / f"flipped_{f.name}"
        f.rename(target)
        flipped.add(f"{other}/{target.name}")
    return flipped


def scene_image(size: int = 64, *, class_index: int = 0, seed: int = 0) -> Image.Image:
    """A class background (colour and pattern) with three random shapes: distinct seeds give distinct pictures
    (the plain `image_array` images of one class differ only by noise, as copies of one picture would)."""
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    img = Image.fromarray(image_array(size, colour=COLOURS[class_index % len(COLOURS)],
                                      pattern=PATTERNS[class_index % len(PATTERNS)], rng=rng))
    draw = ImageDraw.Draw(img)
    for _ in range(3):
        x0, y0 = (int(v) for v in rng.integers(0, size - 16, 2))
        w, h = (int(v) for v in rng.integers(8, size // 2, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x0 + w, y0 + h], fill=fill)
    return img


def make_scene_folder_with_copies(root: str | Path, classes: int = 4, per_class: int = 40, copies: int = 20,
                                  size: int = 64, seed: int = 0) -> tuple[Path, set[frozenset[str]]]:
    """An image folder of distinct `scene_image`s plus `copies` resized (0.5-0.9x) and re-compressed JPEG (quality
    50-90) copies of some of them, each filed under another class as `copy_<k>.jpg`. Returns (root, the copy pairs
    as frozensets of two relative paths)."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    originals = []
    for ci in range(classes):
        folder = root / f"class_{ci}"
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            rel = f"class_{ci}/scene_{k:03d}.png"
            scene_image(size, class_index=ci, seed=int(rng.integers(0, 2**31))).save(root / rel)
            originals.append((rel, ci))
    pairs = set()
    for k, i in enumerate(rng.choice(len(originals), copies, replace=False)):
        rel, ci = originals[int(i)]
        other = int((ci + 1 + rng.integers(0, classes - 1)) % classes)
        scale = float(rng.uniform(0.5, 0.9))
        img = Image.open(root / rel)
        small = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))), Image.BILINEAR)
        copy_rel = f"class_{other}/copy_{k:03d}.jpg"
        small.save(root / copy_rel, "JPEG", quality=int(rng.integers(50, 91)))
        pairs.add(frozenset((rel, copy_rel)))
    return root, pairs
