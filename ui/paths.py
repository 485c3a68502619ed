"""Keep what users type or upload inside the data roots.

Every dataset path that reaches `shared/` from the page goes through `confine_dataset_path`: symlinks are
resolved first, so neither `../` nor a link can lead out of the configured data roots, and a file where a folder
is expected gets a message that says what to pick instead. Uploaded .zip archives are unpacked by
`extract_zip` into the first data root, entry by entry, refusing what `shared.data.archives` refuses (absolute
names, `..`, links, zip bombs) and archives that expand past a size or file-count cap, or that would take
the upload folder past its total cap, and writing into a hidden temporary folder that is renamed into place only
when everything went well; such a folder left by a crash is removed when the page starts
(`remove_stale_extractions`). Only image files are extracted: the data roots are served by the page's file route,
so an uploaded .html or .svg must never land there (it would run in the page's origin).
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import re
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from shared.data.archives import MAX_ENTRY_DEPTH, UnsafeEntry, check_inflation, zip_entry_parts
from shared.data.images import is_image_name
# the confinement lives in shared/: the worker checks task arguments with the same function
from shared.data.paths import PathError, confine_dataset_path, is_within  # noqa: F401 - re-exported for the tabs

# Folders that are never offered as datasets (zip residue, caches, VCS).
_SKIP = frozenset({"__MACOSX", "__pycache__", "node_modules"})
# How deep below a data root `discover_datasets` looks for dataset folders.
_DISCOVER_DEPTH = 3
# Left free on the data folder's disk after an extraction.
_FREE_MARGIN_BYTES = 100_000_000
# An unlocked `.upload-*` folder older than this was left by an extraction that crashed.
_STALE_EXTRACTION_SECONDS = 60.0
_TMP_PREFIX = ".upload-"

log = logging.getLogger(__name__)


def discover_datasets(roots: Sequence[Path], depth: int = _DISCOVER_DEPTH, limit: int = 200) -> list[Path]:
    """Folders under the roots that look like datasets: at least two sub-folders holding image files.

    Cheap: only directory listings, no image is opened. Symlinked folders are listed but not descended into.
    """
    found: list[Path] = []
    for root in roots:
        root = Path(root)
        if root.is_dir():
            _discover(root.resolve(), depth, found, limit)
    return sorted(dict.fromkeys(found), key=lambda p: str(p).lower())


def _discover(folder: Path, depth: int, found: list[Path], limit: int) -> None:
    if len(found) >= limit:
        return
    subdirs = _visible_subdirs(folder)
    with_images = [d for d in subdirs if _has_images(d)]
    if len(with_images) >= 2:
        found.append(folder)
        return  # a dataset's class folders are not datasets themselves
    if depth <= 0:
        return
    for sub in subdirs:
        if not sub.is_symlink():
            _discover(sub, depth - 1, found, limit)


def _visible_subdirs(folder: Path) -> list[Path]:
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.name.startswith(".") or entry.name in _SKIP:
            continue
        try:
            if entry.is_dir():
                out.append(Path(entry.path))
        except OSError:
            continue
    return out


def _has_images(folder: Path, peek: int = 200) -> bool:
    """True when one of the first entries of the folder is an image file (a class folder, not a parent)."""
    try:
        with os.scandir(folder) as it:
            for i, entry in enumerate(it):
                if i >= peek:
                    break
                if not entry.name.startswith(".") and is_image_name(entry.name) and entry.is_file():
                    return True
    except OSError:
        return False
    return False


# --- .zip upload --------------------------------------------------------------------------------------------

def safe_folder_name(name: str) -> str:
    """A folder name made from an upload's file name: letters, digits, `-`, `_`, `.` only, never hidden."""
    stem = Path(name).name
    for suffix in (".zip",):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    clean = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._-")
    return clean[:80] or "dataset"


@dataclass
class Extracted:
    """What `extract_zip` did: the dataset folder, how many images it wrote, which entries it left out."""

    folder: Path
    images: int
    skipped: list[str] = field(default_factory=list)


def _plan(zf: zipfile.ZipFile, max_bytes: int, max_files: int, skipped: list[str]
          ) -> list[tuple[zipfile.ZipInfo, tuple[str, ...]]]:
    """Check every entry before anything is written; returns (entry, parts) for the images to extract."""
    plan, total = [], 0
    for info in zf.infolist():
        parts = _checked(zip_entry_parts, info)
        if not parts or parts[0] == "__MACOSX" or parts[-1] == ".DS_Store":
            continue
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise PathError(f"the archive is encrypted ({info.filename!r}) — upload an archive without a password")
        if not is_image_name(parts[-1]) or parts[-1].startswith("."):
            skipped.append("/".join(parts))
            continue
        total += info.file_size
        plan.append((info, parts))
        if len(plan) > max_files:
            raise PathError(f"the archive holds more than {max_files} files — split it or copy the folder "
                            "into the data folder instead")
        if total > max_bytes:
            raise PathError(f"the archive expands to more than {_mb(max_bytes)} — too big to extract here; "
                            "copy the folder into the data folder instead")
    if not plan:
        raise PathError("the archive holds no image files — zip a folder with one sub-folder of images per class")
    for info, _ in plan:
        _checked(check_inflation, info)
    return plan


def _checked(rule, info: zipfile.ZipInfo):
    """One of shared.data.archives' entry rules, its refusal said as the page says it."""
    try:
        return rule(info)
    except UnsafeEntry as exc:
        raise PathError(f"the archive's {exc} — refusing to extract it; zip the real image files again") from None


def _bytes_under(root: Path, stop_above: int) -> int:
    """Total size of the files under `root` (links not followed); stops counting once past `stop_above`."""
    total = 0
    for folder, _, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue
        if total > stop_above:
            break
    return total


def _check_room(dest_root: Path, needed: int, max_total_bytes: int | None) -> None:
    """Refuse an extraction that would take the upload folder past its cap or leave its disk nearly full."""
    if max_total_bytes is not None:
        held = _bytes_under(dest_root, max_total_bytes)
        if held + needed > max_total_bytes:
            raise PathError(f"the upload folder {dest_root} holds {_gb(held)}; with this archive ({_mb(needed)}) it "
                            f"would pass its cap of {_gb(max_total_bytes)} (RESNET_LAB_UPLOADS_MAX_GB) — delete "
                            "datasets you no longer need from it, or raise the cap")
    free = shutil.disk_usage(dest_root).free
    if needed > free - _FREE_MARGIN_BYTES:
        raise PathError(f"not enough disk space in {dest_root}: the archive needs {_mb(needed)}, "
                        f"{_mb(free)} are free")


def _mb(n: int) -> str:
    return f"{n / 1e6:.0f} MB"


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 10_000_000 else f"{n / 1e6:.2f} MB"


def _copy_capped(src, dst, limit: int) -> int:
    """Copy at most `limit` bytes; more means the entry lied about its size (a crafted archive)."""
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > limit:
            raise PathError("an archive entry expands beyond the size it declares — refusing a crafted archive")
        dst.write(chunk)
    return written


def extract_zip(zip_path: str | os.PathLike, dest_root: Path, *, name: str | None = None,
                max_bytes: int = 400_000_000, max_files: int = 100_000,
                max_total_bytes: int | None = None) -> Extracted:
    """Unpack the images of an uploaded .zip into a new folder under `dest_root`.

    The folder is named after `name` (default: the zip's file name), made unique. When the archive wraps
    everything in a single top folder (`flowers/daisy/...`), that folder is the dataset folder returned.
    Entries that are not images are skipped and listed. Nothing is left behind when the archive is refused.
    `max_bytes` caps what this archive expands to, `max_total_bytes` all that `dest_root` holds afterwards.
    """
    dest_root = Path(dest_root)
    try:
        dest_root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PathError(f"cannot create the data folder {dest_root} ({exc.strerror or exc})") from None
    dest_root = dest_root.resolve()
    try:
        zf = zipfile.ZipFile(zip_path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise PathError(f"{Path(name or zip_path).name} is not a readable .zip archive ({exc}) — "
                        "upload a .zip of class folders") from None
    skipped: list[str] = []
    with zf:
        plan = _plan(zf, max_bytes, max_files, skipped)
        _check_room(dest_root, sum(info.file_size for info, _ in plan), max_total_bytes)
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=dest_root))
        lock = _lock_folder(tmp)  # tells remove_stale_extractions (another page starting) it is in use
        try:
            for info, parts in plan:
                target = tmp.joinpath(*parts)
                # belt and braces: the parts were checked, but never write outside tmp whatever happens
                if not is_within(target.resolve(strict=False), tmp.resolve()):
                    raise PathError(f"refusing archive entry {info.filename!r}: it would land outside the folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "xb") as dst:
                    _copy_capped(src, dst, info.file_size)
            final = _unique(dest_root / safe_folder_name(name or Path(zip_path).name))
            os.replace(tmp, final)
        except BaseException as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(exc, (zipfile.BadZipFile, EOFError)):
                raise PathError(f"the archive is damaged ({exc}) — zip the folder again and re-upload") from None
            if isinstance(exc, FileExistsError):
                raise PathError(f"the archive lists the same file twice ({exc.filename}) — "
                                "zip the folder again") from None
            if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise PathError(f"the disk of {dest_root} filled up while extracting — nothing was kept; free "
                                "some space and upload again") from None
            raise
        finally:
            os.close(lock)
    os.chmod(final, 0o755)
    return Extracted(_dataset_inside(final), len(plan), skipped)


def _lock_folder(folder: Path) -> int:
    """An open descriptor of `folder` holding an exclusive flock (dropped when it is closed, or its holder dies)."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
    except OSError as exc:  # some network filesystems: remove_stale_extractions then leaves the folder alone
        log.info("cannot lock %s (%s); extracting without the lock", folder, exc)
    return fd


def remove_stale_extractions(dest_root: Path) -> list[Path]:
    """Delete the hidden temporary folders that crashed extractions left in `dest_root`; returns them.

    A folder still locked by a running extraction (of another page on the same folder) is kept.
    """
    removed = []
    try:
        candidates = [Path(e.path) for e in os.scandir(dest_root)
                      if e.name.startswith(_TMP_PREFIX) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return removed
    for folder in candidates:
        try:
            fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if time.time() - os.fstat(fd).st_mtime < _STALE_EXTRACTION_SECONDS:
                continue  # just made by an extraction that has not taken its lock yet
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except OSError:  # locked by a running extraction, or a filesystem without locks: keep it
            continue
        finally:
            os.close(fd)
    if removed:
        log.info("removed %d unfinished extraction(s) from %s: %s", len(removed), dest_root,
                 ", ".join(p.name for p in removed))
    return removed


def _unique(path: Path) -> Path:
    if not path.exists():
        return path
    for i in range(2, 10_000):
        candidate = path.with_name(f"{path.name}-{i}")
        if not candidate.exists():
            return candidate
    raise PathError(f"too many folders named {path.name} in {path.parent} — remove some")


def _dataset_inside(folder: Path) -> Path:
    """Descend through single wrapper folders (`upload/flowers/<classes>` → `upload/flowers`)."""
    for _ in range(MAX_ENTRY_DEPTH):
        try:
            entries = [e for e in os.scandir(folder) if not e.name.startswith(".") and e.name not in _SKIP]
        except OSError:
            return folder
        dirs = [e for e in entries if e.is_dir(follow_symlinks=False)]
        files = [e for e in entries if e.is_file(follow_symlinks=False)]
        if len(dirs) == 1 and not files:
            folder = Path(dirs[0].path)
            continue
        return folder
    return folder
