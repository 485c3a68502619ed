"""Fixes to a dataset's labels kept beside the photos, never by moving or deleting them: relabel, exclude, add.

`<dataset>/.resnet-lab/overrides.json` holds a list of changes, oldest first. Each names a file by its path relative
to the dataset and the sha256 of its content when the change was made:

    {"action": "relabel", "path": "roses/123.jpg", "sha256": "...", "label": "tulips", "time": ..., "source": "page"}
    {"action": "exclude", "path": "roses/456.jpg", "sha256": "...", "time": ..., "source": "cli"}
    {"action": "add", "path": "roses/added-<sha>.jpg", "sha256": "...", "time": ..., "source": "predict"}

The newest relabel or exclude of a path wins; a change whose file has since been edited or removed (its sha256 no
longer matches) is stale: listed, not applied. `make_split` applies the changes, so a run trained after a fix has a
different split hash and records in split.json which changes it used. `undo` removes the newest change.

The dot-folder is invisible to `scan_dataset` (hidden folders are never classes) and to the page's file route.
Photos added from the Predict tab wait in `.resnet-lab/inbox/<class>/<sha256>.<ext>` until the user confirms them;
then they are copied into the class folder ("add" above) and the inbox copy is removed (the inbox is ours, the
class folders are the user's).

Every class name and path here may come from the page, so all are checked: a class must be one of the dataset's
class folders (no `..`, `/`, empty or hidden name), a path must be one of the dataset's image files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Iterator, Sequence

from shared.data.images import IMAGE_EXTENSIONS, ImageError, verify_image
from shared.data.scan import DatasetError, class_of, scan_dataset
from shared.fsutil import write_atomic

STATE_DIR = ".resnet-lab"
OVERRIDES_FILE = "overrides.json"
INBOX_DIR = "inbox"
OVERRIDES_VERSION = 1
ACTIONS = ("relabel", "exclude", "add")
MAX_CHANGES = 100_000  # a file the page can grow one click at a time: bounded
MAX_NAME_CHARS = 255
MAX_INBOX = 1_000  # photos waiting at once: each click of "add to inbox" stores one, so bounded too


class OverrideError(DatasetError):
    """A change was refused; the message names the value and says what is accepted."""


def state_dir(root: str | os.PathLike) -> Path:
    return Path(root).expanduser().resolve() / STATE_DIR


def overrides_path(root: str | os.PathLike) -> Path:
    return state_dir(root) / OVERRIDES_FILE


# --- validation -----------------------------------------------------------------------------------------------

def check_class_name(name: object, classes: Sequence[str]) -> str:
    """`name` when it is one of `classes` (the dataset's class folders); OverrideError otherwise.

    Refused with the list of classes: anything not a string, empty, hidden, with a path separator or `..`, NUL,
    too long, or simply unknown. The value is hostile; it is compared, never joined into a path unchecked.
    """
    known = ", ".join(classes)
    if not isinstance(name, str):
        raise OverrideError(f"a class name must be text; pick one of: {known}")
    text = name.strip()
    shown = repr(text[:40] + ("..." if len(text) > 40 else ""))
    if not text:
        raise OverrideError(f"no class given — pick one of: {known}")
    if (len(text) > MAX_NAME_CHARS or text in (".", "..") or text.startswith(".") or "/" in text or "\\" in text
            or "\x00" in text or ".." in text.split("/")):
        raise OverrideError(f"{shown} is not a class name (no paths, '..' or hidden names) — pick one of: {known}")
    if text not in classes:
        raise OverrideError(f"{shown} is not a class of this dataset — pick one of: {known} (to add a class, make "
                            "its folder in the dataset)")
    return text


def check_rel_path(path: object, files: Sequence[str]) -> str:
    """`path` when it is one of the dataset's image files (relative, '/'); OverrideError otherwise (one message for
    missing and not allowed: `..`, absolute paths and hidden files are simply not among the files)."""
    if not isinstance(path, str) or len(path) > 4096 or path not in set(files):
        text = repr(str(path)[:60]) if isinstance(path, str) else type(path).__name__
        raise OverrideError(f"{text} is not an image of this dataset — pick a file listed in the data issues or the "
                            "results")
    return path


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --- the file -------------------------------------------------------------------------------------------------

def read_changes(root: str | os.PathLike) -> list[dict]:
    """Every change, oldest first ([] when there is no overrides file). DatasetError when it is unreadable."""
    path = overrides_path(root)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, ValueError) as exc:
        raise OverrideError(f"{path} is unreadable ({exc}) — fix or delete it (it holds only the page's relabel and "
                            "exclude changes; the photos are untouched)") from None
    if not isinstance(data, dict) or data.get("version") != OVERRIDES_VERSION or not isinstance(
            data.get("changes"), list):
        raise OverrideError(f"{path} is not an overrides file of version {OVERRIDES_VERSION} — fix or delete it")
    changes = []
    for entry in data["changes"]:
        if (isinstance(entry, dict) and entry.get("action") in ACTIONS and isinstance(entry.get("path"), str)
                and isinstance(entry.get("sha256"), str)
                and (entry["action"] != "relabel" or isinstance(entry.get("label"), str))):
            changes.append(entry)
    return changes


@contextlib.contextmanager
def _locked(root: str | os.PathLike) -> Iterator[Path]:
    """Hold the dataset's overrides lock (two clicks at once must not lose one of the changes)."""
    folder = state_dir(root)
    _refuse_links(folder.parent, folder)
    try:
        folder.mkdir(exist_ok=True)
        lock = open(folder / ".lock", "a")
    except OSError as exc:
        raise OverrideError(f"cannot write {folder} ({exc.strerror or exc}) — the dataset folder must be writable "
                            "to keep its fixes beside it") from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield folder
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _write_changes(root: str | os.PathLike, changes: list[dict]) -> None:
    write_atomic(overrides_path(root), json.dumps({"version": OVERRIDES_VERSION, "changes": changes}, indent=1,
                                                  ensure_ascii=False) + "\n")


def add_change(root: str | os.PathLike, action: str, path: object, label: object = None, *,
               source: str = "page", link_roots: Sequence[Path] | None = None) -> dict:
    """Record one relabel or exclude of the image `path` (relative to the dataset `root`); returns the change.

    The path must be one of the dataset's images and the label one of its classes; the file's sha256 is recorded.
    """
    if action not in ("relabel", "exclude"):
        raise OverrideError(f"unknown change {str(action)[:20]!r}: relabel or exclude")
    scan = scan_dataset(root, link_roots=link_roots)
    rel = check_rel_path(path, [p for p, _ in scan.files])
    entry = {"action": action, "path": rel, "sha256": sha256_file(scan.root / rel), "time": round(time.time(), 3),
             "source": str(source)[:40]}
    if action == "relabel":
        entry["label"] = check_class_name(label, scan.classes)
    with _locked(scan.root):
        changes = read_changes(scan.root)
        if len(changes) >= MAX_CHANGES:
            raise OverrideError(f"the dataset already has {MAX_CHANGES:,} changes — undo some or retrain from a "
                                "cleaned copy")
        changes.append(entry)
        _write_changes(scan.root, changes)
    return entry


def undo_last(root: str | os.PathLike) -> dict | None:
    """Remove the newest relabel or exclude (an "add" copied a file in: undo it by deleting that file yourself);
    returns it, or None when there is nothing to undo."""
    root = Path(root).expanduser().resolve()
    with _locked(root):
        changes = read_changes(root)
        for i in range(len(changes) - 1, -1, -1):
            if changes[i]["action"] in ("relabel", "exclude"):
                entry = changes.pop(i)
                _write_changes(root, changes)
                return entry
    return None


def effective(changes: Sequence[dict], hashes: dict[str, str]) -> tuple[dict[str, dict], list[dict]]:
    """({path: the newest relabel/exclude that applies}, stale changes) for files with these sha256s now."""
    newest: dict[str, dict] = {}
    for entry in changes:
        if entry["action"] in ("relabel", "exclude"):
            newest[entry["path"]] = entry
    applied, stale = {}, []
    for path, entry in newest.items():
        if hashes.get(path) == entry["sha256"]:
            applied[path] = entry
        else:
            stale.append(entry)
    return applied, stale


def apply_to_files(root: str | os.PathLike, classes: Sequence[str], hashes: dict[str, str]
                   ) -> tuple[dict[str, str], dict]:
    """(path -> class name for every file kept, record of what was applied) under the dataset's overrides.

    The record goes into split.json: {"applied": [...], "stale": [...], "sha256": hash of the applied changes}.
    A relabel to a class that no longer exists is stale too.
    """
    applied, stale = effective(read_changes(root), hashes)
    labels = {}
    for path in hashes:
        entry = applied.get(path)
        if entry is None:
            labels[path] = class_of(path)
        elif entry["action"] == "exclude":
            continue
        elif entry["label"] in classes:
            labels[path] = entry["label"]
        else:
            stale.append(applied.pop(path))
            labels[path] = class_of(path)
    used = [applied[p] for p in sorted(applied)]
    digest = hashlib.sha256(json.dumps(used, sort_keys=True).encode()).hexdigest() if used else None
    return labels, {"applied": used, "stale": sorted(stale, key=lambda e: e["path"]), "sha256": digest}


def list_changes(root: str | os.PathLike) -> list[dict]:
    """Every change, newest first, each with `state`: applied, superseded (a newer change of the same file) or
    stale (the file changed or is gone since)."""
    root = Path(root).expanduser().resolve()
    changes = read_changes(root)
    newest = {}
    for i, entry in enumerate(changes):
        if entry["action"] in ("relabel", "exclude"):
            newest[entry["path"]] = i
    out = []
    for i, entry in enumerate(changes):
        state = "applied"
        if entry["action"] != "add" and newest.get(entry["path"]) != i:
            state = "superseded"
        else:
            try:
                if sha256_file(root / entry["path"]) != entry["sha256"]:
                    state = "stale"
            except OSError:
                state = "stale"
        out.append({**entry, "state": state})
    return out[::-1]


# --- the inbox: photos from the Predict tab ----------------------------------------------------------------------

def add_to_inbox(root: str | os.PathLike, label: object, image_file: str | os.PathLike, *,
                 link_roots: Sequence[Path] | None = None) -> Path:
    """Copy a photo into `.resnet-lab/inbox/<label>/<sha256>.<ext>` of the dataset; returns the copy's path.

    The label must be one of the dataset's classes; the file must decode as an image. The same photo twice is one
    file (its name is its hash).
    """
    scan = scan_dataset(root, link_roots=link_roots)
    label = check_class_name(label, scan.classes)
    source = Path(image_file)
    try:
        verify_image(source)
        ext = _extension_of(source)
    except (ImageError, OSError) as exc:
        raise OverrideError(f"the photo cannot be added: {exc}") from None
    sha = sha256_file(source)
    folder = state_dir(scan.root) / INBOX_DIR / label
    _refuse_links(scan.root, folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{sha}{ext}"
    if not target.exists():
        if len(list_inbox(scan.root)) >= MAX_INBOX:
            raise OverrideError(f"the inbox already holds {MAX_INBOX:,} photos — confirm or delete some first")
        tmp = folder / f".{sha}.part"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return target


def _refuse_links(root: Path, folder: Path) -> None:
    """The page writes only inside the dataset's own `.resnet-lab` folder: a link on the way (put there by hand)
    could send its writes elsewhere."""
    for part in [folder, *folder.parents]:
        if part == root:
            return
        if part.is_symlink():
            raise OverrideError(f"{part.relative_to(root)} in the dataset is a link — the page writes only into a "
                                f"real {STATE_DIR} folder; remove the link")


# the file's real format decides its extension (a webcam shot may come without a usable name)
_FORMAT_EXTENSIONS = {"JPEG": ".jpg", "PNG": ".png", "WEBP": ".webp", "BMP": ".bmp", "GIF": ".gif", "TIFF": ".tif"}


def _extension_of(path: Path) -> str:
    from PIL import Image

    with Image.open(path) as img:
        ext = _FORMAT_EXTENSIONS.get(img.format or "")
    if ext is None:
        suffix = path.suffix.lower()
        ext = suffix if suffix in IMAGE_EXTENSIONS else ".png"
    return ext


def list_inbox(root: str | os.PathLike) -> list[dict]:
    """Photos waiting in the inbox: [{label, file (name), path, sha256}] sorted by label and name."""
    inbox = state_dir(root) / INBOX_DIR
    out = []
    if not inbox.is_dir():
        return out
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.is_symlink()):
        for f in sorted(folder.iterdir()):
            if f.is_file() and not f.is_symlink() and not f.name.startswith("."):
                out.append({"label": folder.name, "file": f.name, "path": str(f), "sha256": f.stem})
    return out


def confirm_inbox(root: str | os.PathLike, label: object, name: object, *,
                  link_roots: Sequence[Path] | None = None) -> dict:
    """Copy one inbox photo into its class folder as `added-<sha256 prefix>.<ext>`, record an "add" change with its
    sha256 and remove it from the inbox; returns the change."""
    scan = scan_dataset(root, link_roots=link_roots)
    label = check_class_name(label, scan.classes)
    waiting = {e["file"]: e for e in list_inbox(scan.root) if e["label"] == label}
    if not isinstance(name, str) or name not in waiting:
        raise OverrideError(f"{str(name)[:80]!r} is not waiting in the {label} inbox — refresh the list")
    source = Path(waiting[name]["path"])
    sha = sha256_file(source)
    target = scan.root / label / f"added-{sha[:16]}{source.suffix}"
    with _locked(scan.root):
        if target.exists() and sha256_file(target) != sha:
            # the user's file, not this photo: never overwritten, and the inbox copy stays
            raise OverrideError(f"{label}/{target.name} already exists with other contents — rename or move it, "
                                "then confirm again")
        if not target.exists():
            tmp = target.with_name(f".{target.name}.part")
            shutil.copyfile(source, tmp)
            os.replace(tmp, target)
        entry = {"action": "add", "path": f"{label}/{target.name}", "sha256": sha, "time": round(time.time(), 3),
                 "source": "predict"}
        changes = read_changes(scan.root)
        changes.append(entry)
        _write_changes(scan.root, changes)
        source.unlink()
    return entry
