"""Decoded-image cache: each image is decoded and resized once into a uint8 array.

The array is a memory-mapped file keyed by the images' content hashes and the square side, so queued
runs on the same dataset and size share it (and a resumed run does not decode again). Decoding per epoch
is what starves a GPU and, at small sizes, a CPU: a cached epoch reads memory instead of JPEGs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .fsutil import write_atomic
from .images import load_rgb_resized

log = logging.getLogger(__name__)

CACHE_FORMAT = 1


def cache_key(hashes: Sequence[str], side: int) -> str:
    digest = hashlib.sha256(f"v{CACHE_FORMAT}:{side}:".encode())
    for h in hashes:
        digest.update(h.encode())
    return digest.hexdigest()[:24]


def _square(path: Path, side: int) -> np.ndarray:
    """Short side resized to `side`, centre-cropped to a square, as (3, side, side) uint8."""
    img = load_rgb_resized(path, side)
    w, h = img.size
    left, top = (w - side) // 2, (h - side) // 2
    img = img.crop((left, top, left + side, top + side))
    return np.asarray(img, dtype=np.uint8).transpose(2, 0, 1)


def decode_threads() -> int:
    # PIL decoding releases the GIL, so threads scale with cores without pickling arrays between processes
    return max(1, min(8, os.cpu_count() or 1))


def load_image_array(
    root: Path,
    files: Sequence[dict],
    side: int,
    cache_dir: Path,
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """A read-only (N, 3, side, side) uint8 array for `files` (manifest entries with `path` and `sha256`)."""
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key([f["sha256"] for f in files], side)
    data_path = cache_dir / f"{key}.u8"
    meta_path = cache_dir / f"{key}.json"
    shape = (len(files), 3, side, side)
    if meta_path.is_file() and data_path.is_file():
        meta = json.loads(meta_path.read_text())
        if tuple(meta.get("shape", ())) == shape:
            log.info("image cache hit %s", data_path)
            return np.memmap(data_path, dtype=np.uint8, mode="r", shape=shape)
    tmp_path = data_path.with_suffix(f".tmp{os.getpid()}")
    out = np.memmap(tmp_path, dtype=np.uint8, mode="w+", shape=shape)
    done = 0
    try:
        with ThreadPoolExecutor(decode_threads()) as pool:
            paths = [Path(root) / f["path"] for f in files]
            for i, arr in enumerate(pool.map(lambda p: _square(p, side), paths)):
                out[i] = arr
                done += 1
                if progress and (done % 64 == 0 or done == len(files)):
                    progress(done, len(files))
        out.flush()
        del out
        os.replace(tmp_path, data_path)
        # the sidecar is written last: a cache without it is incomplete and rebuilt
        write_atomic(meta_path, json.dumps({"shape": shape, "format": CACHE_FORMAT}))
    finally:
        if tmp_path.exists():
            tmp_path.unlink()
    return np.memmap(data_path, dtype=np.uint8, mode="r", shape=shape)
