"""Confinement of untrusted paths to the data roots: one function for the page and the worker alike.

The page checks every dataset path it is given (`ui/paths.py` re-exports these); the worker checks the paths in
task messages again with its own settings, because anyone who can write to Redis can send a task by name.
Symlinks and `..` are resolved first, so neither can lead out of the roots. A path outside the roots is refused
before anything is learned about it, so the answer never tells whether it exists.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence


class PathError(ValueError):
    """A user path or upload was refused; the message says why and what to do."""


def is_within(path: Path, root: Path) -> bool:
    """True when `path` is `root` or lies below it (both already resolved)."""
    return path == root or root in path.parents


def roots_text(roots: Iterable[Path]) -> str:
    return ", ".join(str(r) for r in roots)


MAX_PATH_CHARS = 4096  # Linux's PATH_MAX


def confine_path(user_path: str | os.PathLike, roots: Sequence[Path]) -> Path:
    """The resolved, existing file or folder for `user_path`, which must lie inside one of `roots`.

    A relative path is taken relative to the first root. Raises PathError for an empty path, a path outside
    the roots (after following symlinks and `..`), or a missing path.
    """
    if not isinstance(user_path, (str, os.PathLike)) and user_path is not None:
        raise PathError(f"expected a path as text, got {type(user_path).__name__} — type a folder inside "
                        f"{roots_text(roots)}")
    text = str(user_path or "").strip()
    if not text:
        raise PathError("no dataset folder given — pick one from the list or type a folder inside "
                        f"{roots_text(roots)}")
    if "\x00" in text:
        raise PathError("the path contains a NUL character — type a plain folder path")
    if len(text) > MAX_PATH_CHARS:  # the OS refuses longer ones anyway ("file name too long"), past our checks
        raise PathError(f"the path is {len(text):,} characters long; paths here have at most {MAX_PATH_CHARS:,} — "
                        "type a folder inside " + roots_text(roots))
    resolved_roots = [Path(r).resolve() for r in roots]
    raw = Path(text).expanduser()
    candidate = raw if raw.is_absolute() else resolved_roots[0] / raw
    try:
        resolved = candidate.resolve(strict=False)
    except (OSError, RuntimeError) as exc:  # RuntimeError: symlink loop on older Pythons
        raise PathError(f"cannot resolve {text!r} ({exc}) — type a plain folder inside {roots_text(roots)}") from None
    if not any(is_within(resolved, root) for root in resolved_roots):
        raise PathError(f"{text!r} is outside the data folders ({roots_text(roots)}) — copy the dataset into one "
                        "of them, upload it as a .zip, or start the page and the workers with RESNET_LAB_DATA_ROOTS "
                        "pointing at its parent folder")
    try:
        exists = resolved.exists()
    except OSError:  # a component too long, a permission error on the way: as unusable as a missing path
        exists = False
    if not exists:
        raise PathError(f"{text!r} does not exist — pick a folder from the list")
    return resolved


def confine_dataset_path(user_path: str | os.PathLike, roots: Sequence[Path]) -> Path:
    """The resolved dataset folder for `user_path`, which must lie inside one of `roots`.

    Like `confine_path`, and a file instead of a folder is refused with what to pick instead.
    """
    resolved = confine_path(user_path, roots)
    if not resolved.is_dir():
        text = str(user_path).strip()
        hint = ("upload the .zip on the Data tab to extract it" if resolved.suffix.lower() == ".zip"
                else "pick the folder that holds one sub-folder of images per class")
        raise PathError(f"{text!r} is a file, not a folder — {hint}")
    return resolved
