"""Download public datasets into class folders, safely: checksum, atomic extraction, no path escapes.

A dataset folder appears under `dest` only when it is complete (it is extracted into a hidden temporary folder
beside it, marked complete, then renamed into place), so an interrupted download never leaves a folder that
looks usable. Offline machines get a DownloadError saying how to fetch the archive by hand.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from shared.data.archives import UnsafeEntry, tar_member_parts

log = logging.getLogger(__name__)

FLOWERS_URL = "https://storage.googleapis.com/download.tensorflow.org/example_images/flower_photos.tgz"
# From TensorFlow Datasets' checksum record (tensorflow/datasets, tensorflow_datasets/url_checksums/tf_flowers.txt)
# for the same archive at download.tensorflow.org, which is served from this bucket: 228,813,984 bytes, 3,670
# JPEGs in 5 class folders plus LICENSE.txt.
FLOWERS_SHA256 = "4c54ace7911aaffe13a365c34f650e71dd5bf1be0a58b464e5a7183e3e595d9c"
FLOWERS_SIZE = 228_813_984

# Written into a dataset folder as the last step before it is renamed into place.
COMPLETE_MARKER = ".resnet-lab-complete"
_TIMEOUT_S = 30
_STALE_S = 3600


class DownloadError(RuntimeError):
    """A download or extraction failed; the message says what happened and how to do it by hand."""


def download_flowers(dest: str | os.PathLike, *, url: str = FLOWERS_URL, sha256: str | None = FLOWERS_SHA256,
                     progress: bool = True) -> Path:
    """Download and extract the flower_photos archive into `dest`; return the dataset folder (dest/flower_photos).

    Does nothing if a complete copy is already there. An archive placed by hand at dest/<name>.tgz is used
    instead of downloading (after the checksum check). `sha256=None` skips verification (custom URLs).
    """
    dest = Path(dest).expanduser().resolve()
    archive_name = PurePosixPath(urlsplit(url).path).name or "dataset.tgz"
    name = _stem(archive_name)
    target = dest / name
    if (target / COMPLETE_MARKER).is_file():
        log.info("%s is already downloaded", target)
        return target
    if target.exists():
        raise DownloadError(f"{target} already exists but was not made by a complete download — if you extracted "
                            f"it yourself, use it directly as the dataset folder; otherwise delete it and run again.")
    try:
        dest.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DownloadError(f"cannot create {dest} ({e.strerror or e}) — choose a writable folder.") from None
    _remove_stale(dest, name)

    manual = dest / archive_name
    if manual.is_file():
        log.info("using %s placed by hand instead of downloading", manual)
        _verify(manual, sha256, url, dest, archive_name)
        _extract(manual, dest, name, archive_name)
        return target
    archive = _fetch(url, dest, name, sha256, progress, archive_name)
    try:
        _extract(archive, dest, name, archive_name)
    finally:
        archive.unlink(missing_ok=True)
    return target


def _stem(archive_name: str) -> str:
    for suffix in (".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
        if archive_name.lower().endswith(suffix):
            return archive_name[: -len(suffix)]
    return archive_name


def _manual_steps(url: str, dest: Path, archive_name: str) -> str:
    return (f"To get it by hand: open {url} in a browser on a machine with internet access (or run "
            f"`curl -LO {url}`), then either save {archive_name} as {dest / archive_name} and run this again "
            f"(it is checked and extracted for you), or extract it yourself with "
            f"`tar xzf {archive_name} -C {dest}` and use {dest / _stem(archive_name)} as the dataset folder.")


def _remove_stale(dest: Path, name: str) -> None:
    """Delete leftovers of downloads that were killed mid-way (hidden, older than an hour)."""
    now = time.time()
    for path in dest.glob(f".{name}-*"):
        try:
            if now - path.lstat().st_mtime > _STALE_S:
                log.info("removing stale partial download %s", path)
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        except OSError as e:
            log.warning("could not remove stale %s: %s", path, e)


def _fetch(url: str, dest: Path, name: str, sha256: str | None, progress: bool, archive_name: str) -> Path:
    """Stream `url` into a hidden temp file in `dest`, hashing as it goes; return it once verified."""
    from tqdm.auto import tqdm  # only the download path needs it

    fd, tmp = tempfile.mkstemp(dir=dest, prefix=f".{name}-", suffix=".download")
    tmp_path = Path(tmp)
    digest = hashlib.sha256()
    received = 0
    try:
        with os.fdopen(fd, "wb") as out:
            try:
                response = urllib.request.urlopen(url, timeout=_TIMEOUT_S)
            except (urllib.error.URLError, OSError, ValueError) as e:
                raise DownloadError(f"could not download {url} ({_reason(e)}). "
                                    + _manual_steps(url, dest, archive_name)) from None
            with response:
                total = int(response.headers.get("Content-Length") or 0) or None
                log.info("downloading %s (%s bytes) to %s", url, total or "unknown", dest)
                with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=archive_name,
                          disable=not progress) as bar:
                    try:
                        while chunk := response.read(1 << 20):
                            out.write(chunk)
                            digest.update(chunk)
                            received += len(chunk)
                            bar.update(len(chunk))
                    except (OSError, ValueError) as e:  # includes http.client.IncompleteRead, timeouts
                        raise DownloadError(f"download of {url} was interrupted after {received:,} bytes "
                                            f"({_reason(e)}). Run again, or: "
                                            + _manual_steps(url, dest, archive_name)) from None
            if total is not None and received != total:
                raise DownloadError(f"download of {url} stopped after {received:,} of {total:,} bytes. Run again, "
                                    f"or: " + _manual_steps(url, dest, archive_name))
        _check_digest(digest.hexdigest(), sha256, url, dest, archive_name)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    return tmp_path


def _reason(e: BaseException) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"network unreachable or host not found: {e.reason}"
    return f"{type(e).__name__}: {e}"


def _verify(path: Path, sha256: str | None, url: str, dest: Path, archive_name: str) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    _check_digest(digest.hexdigest(), sha256, url, dest, archive_name, placed_by_hand=path)


def _check_digest(got: str, expected: str | None, url: str, dest: Path, archive_name: str,
                  placed_by_hand: Path | None = None) -> None:
    if expected is None:
        log.warning("no checksum given for %s; the archive was not verified", url)
        return
    if got != expected.lower():
        what = f"{placed_by_hand} (placed by hand)" if placed_by_hand else f"the download of {url}"
        fix = "replace it with a fresh download" if placed_by_hand else "nothing was kept; run again"
        raise DownloadError(f"checksum mismatch for {what}: expected sha256 {expected}, got {got} — the file is "
                            f"corrupt or changed upstream; {fix}. " + _manual_steps(url, dest, archive_name))


def _extract(archive: Path, dest: Path, name: str, archive_name: str) -> None:
    """Extract into a hidden temp folder in `dest`, mark it complete, then rename it to dest/name."""
    target = dest / name
    work = Path(tempfile.mkdtemp(dir=dest, prefix=f".{name}-extract-"))
    try:
        try:
            with tarfile.open(archive, "r:*") as tar:
                members = tar.getmembers()
                for member in members:
                    try:
                        tar_member_parts(member)
                    except UnsafeEntry as exc:
                        raise DownloadError(f"refusing to extract {archive_name}: {exc} — the archive is corrupt or "
                                            f"malicious; nothing was extracted.") from None
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: the stdlib's own safety net as well
                    tar.extractall(work, members=members, filter="data")
                else:
                    tar.extractall(work, members=members)
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            if isinstance(e, OSError) and e.errno is not None:  # disk full, permissions (not a bad archive)
                raise DownloadError(f"cannot extract {archive_name} into {dest} ({e.strerror or e}) — check free "
                                    f"disk space and permissions.") from None
            raise DownloadError(f"{archive_name} is not a valid .tar.gz archive ({e}) — delete it and download "
                                f"again.") from None
        entries = [p for p in work.iterdir()]
        # the usual layout is one top folder named like the archive; otherwise the archive holds the classes itself
        source = entries[0] if len(entries) == 1 and entries[0].is_dir() and entries[0].name == name else work
        (source / COMPLETE_MARKER).write_text(f"extracted from {archive_name}\n", encoding="utf-8")
        try:
            os.rename(source, target)
        except OSError:
            if (target / COMPLETE_MARKER).is_file():  # another process finished first: same content
                return
            raise DownloadError(f"could not move the extracted folder to {target} — it appeared while "
                                f"extracting; delete it and run again.") from None
        log.info("extracted %s to %s", archive_name, target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --- Oxford Flowers-102 (optional) -------------------------------------------------------------------------------

FLOWERS102_PAGE = "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/"


def download_flowers102(dest: str | os.PathLike, *, keep_raw: bool = False) -> Path:
    """Download Oxford Flowers-102 with torchvision and export it as dest/flowers102/<category name>/*.jpg.

    The 102 category names are torchvision's `Flowers102.classes`; the official train/val/test lists are
    ignored (make_split makes a stratified split). The raw download (~330 MB) goes to dest/.flowers102-raw and
    is deleted afterwards unless `keep_raw`.
    """
    dest = Path(dest).expanduser().resolve()
    target = dest / "flowers102"
    if (target / COMPLETE_MARKER).is_file():
        return target
    if target.exists():
        raise DownloadError(f"{target} already exists but was not made by a complete download — delete it and run "
                            f"again.")
    raw = dest / ".flowers102-raw"
    raw.mkdir(parents=True, exist_ok=True)
    base = _fetch_flowers102_raw(raw)
    _export_flowers102(base, target)
    if not keep_raw:
        shutil.rmtree(raw, ignore_errors=True)
    return target


def _fetch_flowers102_raw(raw: Path) -> Path:
    """Let torchvision download and md5-check the archive and label files; return the flowers-102 folder."""
    from torchvision.datasets import Flowers102

    try:
        Flowers102(root=str(raw), split="train", download=True)
    except Exception as e:  # noqa: BLE001 — torchvision raises URLError, RuntimeError, OSError...; re-raised below
        raise DownloadError(
            f"could not download Oxford Flowers-102 ({type(e).__name__}: {e}). To get it by hand: from "
            f"{FLOWERS102_PAGE} download 102flowers.tgz, imagelabels.mat and setid.mat into {raw / 'flowers-102'}, "
            f"extract 102flowers.tgz there (it makes a jpg/ folder) and run this again.") from None
    return raw / "flowers-102"


def _export_flowers102(base: Path, target: Path) -> None:
    """Link (or copy) base/jpg/image_NNNNN.jpg into <target>/<category>/ using imagelabels.mat; atomic rename."""
    from scipy.io import loadmat
    from torchvision.datasets import Flowers102

    names = list(Flowers102.classes)
    labels = loadmat(str(base / "imagelabels.mat"), squeeze_me=True)["labels"].tolist()  # 1-based, per image id
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=".flowers102-export-"))
    try:
        for image_id, label in enumerate(labels, 1):
            src = base / "jpg" / f"image_{image_id:05d}.jpg"
            folder = work / names[int(label) - 1]
            folder.mkdir(exist_ok=True)
            try:
                os.link(src, folder / src.name)  # same filesystem: no second copy of 330 MB
            except OSError:
                shutil.copy2(src, folder / src.name)
        (work / COMPLETE_MARKER).write_text("exported from Oxford Flowers-102\n", encoding="utf-8")
        os.rename(work, target)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
