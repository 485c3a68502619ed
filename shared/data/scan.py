"""Scan an image-folder dataset: classes (sub-folders) and image files, without decoding anything.

A dataset is a folder with one sub-folder per class (torchvision `ImageFolder` layout); images may sit in
nested folders inside a class folder.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from shared.data.images import IMAGE_EXTENSIONS, is_image_name


# Folder names that are never classes: macOS zip residue and hidden folders (".git", ".cache", ...).
_JUNK_DIRS = frozenset({"__MACOSX"})


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the folder and says what to do."""


@dataclass
class DatasetScan:
    root: Path
    # sorted class folder names; the index in this list is the label
    classes: list[str]
    # (path relative to root with '/', class index), sorted by path
    files: list[tuple[str, int]]
    # (relative path, reason) for files and folders that were not taken
    ignored: list[tuple[str, str]]


def scan_dataset(root: str | os.PathLike, *, link_roots: Sequence[Path] | None = None) -> DatasetScan:
    """List classes (sub-folders) and image files (found recursively) without decoding anything.

    `link_roots`: when given (the page and the worker pass their data roots), a class folder or image file that is
    a symbolic link is taken only if it leads inside one of these folders; other links are listed as ignored and
    never read. A link is how someone who may write into a data folder would make the page read a picture it may
    not serve. None (the CLI, on the user's own files) follows links wherever they lead.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist — check the path; expected a folder with one "
                           f"sub-folder of images per class.")
    if not root.is_dir():
        hint = ("extract the archive and point at the extracted folder" if _looks_like_archive(root)
                else "point at the folder that holds one sub-folder of images per class")
        raise DatasetError(f"{root} is a file, not a folder — {hint}.")
    root = root.resolve()
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot read dataset folder {root} ({e.strerror or e}) — check its permissions.") from None
    classes: list[str] = []
    ignored: list[tuple[str, str]] = []
    allowed = None if link_roots is None else [Path(r).resolve() for r in link_roots]
    for entry in entries:
        if _hidden(entry.name):
            continue
        if _is_dir(entry):
            if _links_out(Path(entry.path), allowed):
                ignored.append((entry.name + "/", LINK_OUT))
                continue
            classes.append(entry.name)
        else:
            ignored.append((entry.name, "not inside a class folder"))
    if len(classes) < 2:
        raise DatasetError(_too_few_classes(root, classes, ignored))

    files: list[tuple[str, int]] = []
    empty: list[str] = []
    for index, name in enumerate(classes):
        found = _walk_class(root, name, ignored, allowed)
        if not found:
            empty.append(name)
        files.extend((path, index) for path in found)
    if empty:
        raise DatasetError(_empty_classes(root, empty, ignored))
    files.sort()
    ignored.sort()
    return DatasetScan(root=root, classes=classes, files=files, ignored=ignored)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_DIRS


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlinked class folder; loops are impossible at this depth
    except OSError:
        return False


def _looks_like_archive(path: Path) -> bool:
    return path.name.lower().endswith((".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".7z", ".rar"))


LINK_OUT = "a link that leads outside the data folders — not read"


def _links_out(path: Path, allowed: list[Path] | None) -> bool:
    """True when `path` is a link whose target lies outside every allowed folder (never with allowed=None)."""
    if allowed is None or not path.is_symlink():
        return False
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling or looping: nothing to read anyway
        return True
    return not any(target == r or r in target.parents for r in allowed)


def _walk_class(root: Path, name: str, ignored: list[tuple[str, str]], allowed: list[Path] | None = None
                ) -> list[str]:
    """Image paths (relative, '/') under root/name. Symlinked sub-folders are not followed (no loops)."""
    def rel(path: str) -> str:
        return Path(os.path.relpath(path, root)).as_posix()

    def unreadable(err: OSError) -> None:
        ignored.append((rel(err.filename) + "/", f"cannot read folder ({err.strerror or err})"))

    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root / name, followlinks=False, onerror=unreadable):
        kept = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if _hidden(d):
                continue
            if os.path.islink(full):
                ignored.append((rel(full) + "/", "symlinked folder not followed"))
                continue
            kept.append(d)
        dirnames[:] = kept  # os.walk descends only into what is left here
        for f in filenames:
            if _hidden(f):
                continue
            path = rel(os.path.join(dirpath, f))
            if _links_out(Path(dirpath, f), allowed):
                ignored.append((path, LINK_OUT))
            elif is_image_name(f):
                found.append(path)
            else:
                ignored.append((path, f"not an image file ({Path(f).suffix or 'no extension'})"))
    return sorted(found)


def _too_few_classes(root: Path, classes: list[str], ignored: list[tuple[str, str]]) -> str:
    loose_images = sum(1 for path, _ in ignored if is_image_name(path))
    if not classes:
        if loose_images:
            return (f"{root} has {loose_images} image files but no class sub-folders — put each class's images in "
                    f"its own sub-folder, e.g. {root}/cats/1.jpg and {root}/dogs/2.jpg.")
        return (f"{root} has no class sub-folders — expected one sub-folder of images per class, "
                f"e.g. {root}/cats/ and {root}/dogs/.")
    only = root / classes[0]
    nested = [p.name for p in _safe_subdirs(only)]
    if len(nested) >= 2:
        return (f"{root} has a single sub-folder '{classes[0]}', which itself holds {len(nested)} folders "
                f"({', '.join(sorted(nested)[:5])}) — did you mean the dataset folder {only}?")
    return (f"{root} has only one class folder ('{classes[0]}') — a classifier needs at least 2 classes; "
            f"add one sub-folder of images per class.")


def _safe_subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not _hidden(p.name)]
    except OSError:
        return []


def _empty_classes(root: Path, empty: list[str], ignored: list[tuple[str, str]]) -> str:
    parts = []
    for name in empty:
        others = [p for p, _ in ignored if p.startswith(name + "/")]
        note = f" ({len(others)} other files, e.g. {others[0]})" if others else ""
        parts.append(f"{root / name}{note}")
    exts = ", ".join(sorted(IMAGE_EXTENSIONS))
    return (f"class folder{'s' if len(empty) > 1 else ''} without any image file: {'; '.join(parts)} — add images "
            f"({exts}) or remove the folder.")


def class_of(path: str) -> str:
    return path.split("/", 1)[0]
