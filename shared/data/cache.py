"""Decoded-image cache: each image is decoded and resized once into a uint8 array.

The array is a memory-mapped file keyed by the images' content hashes and the square side, so queued
runs on the same dataset and size share it (and a resumed run does not decode again). Decoding per epoch
is what starves a GPU and, at small sizes, a CPU: a cached epoch reads memory instead of JPEGs.

The folder is bounded: before a new array is written, the least recently used ones (by modification time,
touched on every hit) are deleted until the new one fits under `max_bytes` (RESNET_LAB_CACHE_MAX_GB) and on the
disk. An array in use holds a shared `flock` for as long as it is mapped, so a running training never loses
its array. The new file's blocks are reserved up front (`posix_fallocate`): a full disk is a clear
`CacheFullError` before any decoding, never a SIGBUS while writing into the mapping.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO, Callable, Sequence

import numpy as np

from shared.fsutil import write_atomic
from shared.data.images import load_rgb_resized

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
# Left free on the cache's disk (at most 5% of a small disk): the models folder (checkpoints) often shares it.
FREE_MARGIN_BYTES = 100_000_000
# A temporary array unlocked and untouched this long belongs to a build that died: deleted by the next build.
STALE_TMP_SECONDS = 60.0
_FIX = "free space or set RESNET_LAB_CACHE_DIR / RESNET_LAB_CACHE_MAX_GB"


class CacheFullError(OSError):
    """No room for a decoded-image array; the message names the folder, the sizes and the fix."""

    def __init__(self, message: str):
        super().__init__(errno.ENOSPC, message)

    def __str__(self) -> str:
        return self.strerror


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
    *,
    max_bytes: int | None = None,
) -> np.ndarray:
    """A read-only (N, 3, side, side) uint8 array for `files` (manifest entries with `path` and `sha256`).

    `max_bytes` caps the whole cache folder (None: only the disk does). Raises CacheFullError when the array
    cannot fit, before anything is decoded.
    """
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = cache_key([f["sha256"] for f in files], side)
    data_path = cache_dir / f"{key}.u8"
    meta_path = cache_dir / f"{key}.json"
    shape = (len(files), 3, side, side)
    cached = _open_cached(data_path, meta_path, shape)
    if cached is not None:
        log.info("image cache hit %s", data_path)
        return cached
    needed = math.prod(shape)
    _make_room(cache_dir, needed, max_bytes)
    # `.u8-tmp<pid>`, not `.tmp<pid>`: that is the sidecar's temporary name (and earlier versions' array's)
    tmp_path = cache_dir / f"{key}.u8-tmp{os.getpid()}"
    fh = open(tmp_path, "w+b")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX)  # a build in progress is never taken for a dead one's leftover
        _allocate(fh, needed, cache_dir)
        out = np.memmap(fh, dtype=np.uint8, mode="r+", shape=shape)
        _decode_into(out, root, files, side, progress)
        out.flush()
        del out
        os.replace(tmp_path, data_path)
        # the sidecar is written last: a cache without it is incomplete and rebuilt
        write_atomic(meta_path, json.dumps({"shape": shape, "format": CACHE_FORMAT}))
    except BaseException:
        fh.close()
        tmp_path.unlink(missing_ok=True)
        raise
    fcntl.flock(fh, fcntl.LOCK_SH)  # from now on only "in use", like any reader's
    return _mapped(fh, shape)


def _decode_into(out: np.ndarray, root: Path, files: Sequence[dict], side: int,
                 progress: Callable[[int, int], None] | None) -> None:
    with ThreadPoolExecutor(decode_threads()) as pool:
        paths = [Path(root) / f["path"] for f in files]
        for i, arr in enumerate(pool.map(lambda p: _square(p, side), paths)):
            out[i] = arr
            done = i + 1
            if progress and (done % 64 == 0 or done == len(files)):
                progress(done, len(files))


def _mapped(fh: BinaryIO, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only mapping of `fh`, which stays open (and locked) for as long as the array or a view lives."""
    array = np.memmap(fh, dtype=np.uint8, mode="r", shape=shape)
    array._cache_lock = fh  # closing the file (when the array is freed) drops the lock
    return array


def _open_cached(data_path: Path, meta_path: Path, shape: tuple[int, ...]) -> np.ndarray | None:
    """The complete cached array, locked as in use and marked recently used; None when there is none."""
    try:
        meta = json.loads(meta_path.read_text())
        fh = open(data_path, "rb")
    except (OSError, ValueError):
        return None
    try:
        fcntl.flock(fh, fcntl.LOCK_SH)
        st = os.fstat(fh.fileno())
        # evicted between our open and our lock: the name is gone or names a newer file
        current = data_path.stat()
        usable = (st.st_ino, st.st_dev) == (current.st_ino, current.st_dev) and st.st_size == math.prod(shape) \
            and tuple(meta.get("shape", ())) == shape and meta_path.is_file()
    except OSError:
        usable = False
    if not usable:
        fh.close()
        return None
    try:
        os.utime(data_path)  # least recently used goes first
    except OSError as exc:
        log.debug("cannot mark %s as used: %s", data_path, exc)
    return _mapped(fh, shape)


def _allocate(fh: BinaryIO, nbytes: int, cache_dir: Path) -> None:
    """Reserve the file's blocks now: ENOSPC here instead of a SIGBUS when a page of the mapping is written."""
    try:
        os.posix_fallocate(fh.fileno(), 0, nbytes)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise _disk_full(cache_dir, nbytes) from None
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        # the filesystem cannot reserve blocks: the free-space check in _make_room is all we have
        log.warning("%s cannot pre-allocate files (%s); relying on the free-space check", cache_dir, exc.strerror)
        fh.truncate(nbytes)


def _disk_full(cache_dir: Path, needed: int) -> CacheFullError:
    free = shutil.disk_usage(cache_dir).free
    return CacheFullError(f"disk full: {_gb(needed)} needed in {cache_dir}, "
                          f"{_gb(free)} free — {_FIX}")


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 10_000_000 else f"{nbytes / 1e6:.2f} MB"


def _margin(cache_dir: Path) -> int:
    return min(FREE_MARGIN_BYTES, shutil.disk_usage(cache_dir).total // 20)


# --- eviction ----------------------------------------------------------------------------------------------------

def _make_room(cache_dir: Path, needed: int, max_bytes: int | None) -> None:
    """Delete unused arrays, least recently used first, until `needed` more bytes fit under the cap and on disk."""
    if max_bytes is not None and needed > max_bytes:
        raise CacheFullError(f"the decoded-image cache for this run needs {_gb(needed)}, more than the cache's "
                             f"cap of {_gb(max_bytes)} (RESNET_LAB_CACHE_MAX_GB) — raise the cap or train at a "
                             "smaller image size")
    # what dead builds left is garbage whether room is short or not
    entries = [e for e in _entries(cache_dir) if not (_is_temporary(e[1]) and _evict(e[1]))]
    total = sum(size for _, _, size in entries)
    margin = _margin(cache_dir)
    if shutil.disk_usage(cache_dir).free + total < needed + margin:
        raise _disk_full(cache_dir, needed + margin)  # hopeless: keep the arrays other runs may still use

    def fits() -> bool:
        under_cap = max_bytes is None or total + needed <= max_bytes
        return under_cap and shutil.disk_usage(cache_dir).free >= needed + margin

    for _, path, size in sorted(entries):
        if fits():
            break
        if _evict(path):
            total -= size
    if max_bytes is not None and total + needed > max_bytes:
        log.warning("image cache %s: %s in use by running trainings, going over its cap of %s until they end",
                    cache_dir, _gb(total), _gb(max_bytes))
    if shutil.disk_usage(cache_dir).free < needed + margin:
        raise _disk_full(cache_dir, needed + margin)  # what must be free, margin included


def _is_temporary(path: Path) -> bool:
    # `.tmp<pid>`: arrays of builds by earlier versions (left behind when a full disk killed them with SIGBUS)
    return path.suffix.startswith((".u8-tmp", ".tmp"))


def _entries(cache_dir: Path) -> list[tuple[float, Path, int]]:
    """(modification time, path, size) of every array and temporary array in the folder."""
    out = []
    for path in cache_dir.iterdir():
        if path.suffix == ".u8" or _is_temporary(path):
            try:
                st = path.stat()
            except OSError:
                continue
            out.append((st.st_mtime, path, st.st_size))
    return out


def _evict(path: Path) -> bool:
    """Delete an array (and its sidecar) unless a training maps it or a build writes it; True when it is gone."""
    try:
        fh = open(path, "r+b")  # for writing: NFS only grants exclusive locks on files open for writing
    except FileNotFoundError:
        return True
    except OSError as exc:
        log.warning("image cache: cannot open %s to evict it: %s", path, exc)
        return False
    with fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # in use
        except OSError as exc:
            log.warning("image cache: cannot lock %s to evict it (%s); keeping it", path, exc)
            return False
        st = os.fstat(fh.fileno())
        if _is_temporary(path) and time.time() - st.st_mtime < STALE_TMP_SECONDS:
            return False  # a build that has not taken its lock yet, or a sidecar about to be renamed
        if path.suffix == ".u8":
            path.with_suffix(".json").unlink(missing_ok=True)  # first: an array without sidecar is a miss
        path.unlink(missing_ok=True)
    log.info("image cache: evicted %s (%s, last used %s)", path.name, _gb(st.st_size),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(st.st_mtime)))
    return True
