"""Checkpoints: atomic writes, safe loads (`weights_only=True`: a checkpoint can never run code)."""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from shared.fsutil import atomic_path
from shared.training.models import create_model, list_models

FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or not one of ours."""


def save_checkpoint(state: dict[str, Any], path: Path) -> None:
    """Write to a temp file in the same folder, then rename: a crash never leaves half a checkpoint in place.

    A failed write (disk full, read-only folder) raises CheckpointError saying so; the previous file is untouched.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            torch.save({**state, "format_version": FORMAT_VERSION}, tmp)
    except (OSError, RuntimeError) as exc:  # torch reports a full disk as RuntimeError "[enforce fail ...]"
        raise CheckpointError(_write_failure(path, exc)) from exc


def _write_failure(path: Path, exc: BaseException) -> str:
    kept = f"the previous {path.name} is unchanged" if path.exists() else f"no {path.name} was written"
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < 16 * 2**20):
        room = f" ({free / 2**20:.1f} MB free)" if free is not None else ""
        return (f"cannot write checkpoint {path}: no space left on the disk{room} — free some space or point "
                f"RESNET_LAB_MODELS_DIR at a bigger disk, then train again; {kept}")
    if code in (errno.EROFS, errno.EACCES, errno.EPERM):
        return (f"cannot write checkpoint {path}: {os.strerror(code).lower()} — make {path.parent} writable, "
                f"then train again; {kept}")
    first = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"cannot write checkpoint {path} ({type(exc).__name__}: {first}); {kept}"


def load_checkpoint(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle.UnpicklingError for unsafe content, RuntimeError/EOFError for corrupt files
        raise CheckpointError(
            f"refusing to load {path}: it is not a plain-tensor checkpoint or it is damaged ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200]})"
        ) from exc
    if not isinstance(state, dict) or "model" not in state:
        raise CheckpointError(f"{path} is not a resnet-lab checkpoint (no 'model' entry)")
    return state


def model_meta(state: dict[str, Any]) -> dict[str, Any]:
    """What prediction needs besides the weights."""
    keys = ("classes", "image_size", "mean", "std", "model_name", "config", "epoch", "val_acc")
    return {k: state.get(k) for k in keys}


def load_model_from_run(run_dir: Path, which: str = "best") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The run's model in eval mode on CPU, plus its meta (classes, image_size, mean, std, model_name, config)."""
    path = Path(run_dir) / f"{which}.pt"
    state = load_checkpoint(path)
    meta = model_meta(state)
    config = meta.get("config") or {}
    if meta["model_name"] not in list_models():
        raise CheckpointError(f"{path} holds a {meta['model_name']!r} model, which is not registered here "
                              f"(known: {', '.join(list_models())})")
    model = create_model(meta["model_name"], len(meta["classes"]), weights="none",
                         dropout=float(config.get("dropout", 0.0)))
    model.load_state_dict(state["model"])
    model.eval()
    return model, meta
