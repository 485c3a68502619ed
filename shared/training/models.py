"""Model registry: ResNet18/34/50 from torchvision with explicit weights, a new head per dataset.

Pretrained weights are looked up offline first, where torchvision caches them (`$TORCH_HOME/hub/checkpoints`),
so a machine without network can use a file copied there by hand.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from torch import nn
from torchvision import models as tvm

from shared.data.paths import is_within

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    weights_enum: type[tvm.WeightsEnum]


_REGISTRY: dict[str, ModelSpec] = {
    "resnet18": ModelSpec(tvm.resnet18, tvm.ResNet18_Weights),
    "resnet34": ModelSpec(tvm.resnet34, tvm.ResNet34_Weights),
    "resnet50": ModelSpec(tvm.resnet50, tvm.ResNet50_Weights),
}


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached nor downloadable; the message says where to put the file."""


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def _spec(name: str) -> ModelSpec:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(list_models())}") from None


def list_weights(name: str) -> list[str]:
    """Weight choices for a model: torchvision enum names, plus 'none' (from scratch)."""
    return [w.name for w in _spec(name).weights_enum] + ["none"]


def resolve_weights(name: str, weights: str) -> tvm.WeightsEnum | Path | None:
    """'none' → None; an existing file → its Path; else a torchvision enum member ('DEFAULT' allowed)."""
    if weights is None or str(weights).lower() == "none":
        return None
    enum = _spec(name).weights_enum
    key = str(weights)
    if key.upper() == "DEFAULT":
        return enum.DEFAULT
    if key in enum.__members__:
        return enum[key]
    path = Path(key).expanduser()
    if path.is_file():
        return path
    raise ValueError(
        f"unknown weights {weights!r} for {name}; choose one of {', '.join(list_weights(name))}, "
        "or give the path of a state-dict file"
    )


def confine_weights(weights: Any, models: Sequence[str], folders: Sequence[Path]) -> str:
    """A `weights` value from the page's API, checked before any run is queued: 'none', 'DEFAULT', a weights
    name every one of `models` has, or a file inside `folders` (the weights folder first: relative paths are
    taken from there, then the data roots). Returns the value to store: a file as its resolved path.

    A file that is missing and one outside the folders get the same message, so the answer tells nothing about
    files the page may not read.
    """
    if not isinstance(weights, str):
        raise ValueError(f"weights must be text (a weights name, 'none' or a file name), got {type(weights).__name__}")
    key = weights.strip()
    if key.lower() == "none":
        return "none"
    if key.upper() == "DEFAULT":
        return "DEFAULT"
    models = list(dict.fromkeys(models))
    known = {m: set(_spec(m).weights_enum.__members__) for m in models}
    if all(key in names for names in known.values()):
        return key
    if any(key in names for names in known.values()):
        lacking = [m for m, names in known.items() if key not in names]
        raise ValueError(f"weights {key!r} do not exist for {', '.join(lacking)} — choose DEFAULT (ImageNet) or "
                         "'none', or queue those models separately")
    path = _file_inside(key, folders)
    if path is None:
        names = sorted(set().union(*known.values()) | {"DEFAULT"}) + ["none"]
        raise ValueError(f"weights {key!r}: no such weights name, nor a state-dict file in the weights folder "
                         f"{folders[0]} or the data folders — choose one of {', '.join(names)}, or copy the file "
                         f"into {folders[0]} and give its name")
    return str(path)


def _file_inside(name: str, folders: Sequence[Path]) -> Path | None:
    """The resolved file `name` (relative to folders[0]) when it is a file inside one of `folders`, else None."""
    if not name or "\x00" in name:
        return None
    roots = [Path(f).resolve() for f in folders]
    raw = Path(name).expanduser()
    try:
        path = (raw if raw.is_absolute() else roots[0] / raw).resolve(strict=False)
        root = next((r for r in roots if is_within(path, r)), None)
        # hidden files and folders (.env, .git/, .redis/) are never weights: the page serves none of them either
        hidden = root is not None and any(part.startswith(".") for part in path.relative_to(root).parts)
        return path if root is not None and not hidden and path.is_file() else None
    except (OSError, RuntimeError):  # a symlink loop, a name too long: as unusable as a missing file
        return None


def weights_cache_dir() -> Path:
    """The folder torchvision downloads weights into (honours TORCH_HOME)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def _load_state_dict_file(path: Path) -> dict[str, torch.Tensor]:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # UnpicklingError (unsafe content), RuntimeError/EOFError/IndexError (not a torch file)
        raise ValueError(
            f"cannot load weights from {path}: not a plain-tensor PyTorch file or damaged ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200] if str(exc) else 'no details'}) — give a state dict saved with "
            "torch.save, a torchvision weights name, or 'none'"
        ) from exc
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # one of our own checkpoints
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__})")
    return state


def load_pretrained_state(weights: tvm.WeightsEnum) -> dict[str, torch.Tensor]:
    """State dict for a torchvision enum member: from the local cache, else downloaded into it."""
    file_name = os.path.basename(weights.url)
    cached = weights_cache_dir() / file_name
    if cached.is_file():
        log.info("loading cached weights %s", cached)
        return _load_state_dict_file(cached)
    try:
        return weights.get_state_dict(progress=True, check_hash=True)
    except Exception as exc:  # URLError, socket errors, HTTP errors: all mean "not reachable"
        raise WeightsUnavailable(
            f"cannot load {weights} weights: no cached file and the download failed ({exc.__class__.__name__}: "
            f"{exc}). Download {weights.url} on a machine with network and place it as {cached} "
            f"(folder {cached.parent}; set TORCH_HOME to use another cache), or use --weights none."
        ) from exc


def create_model(name: str, num_classes: int, weights: str = "none", dropout: float = 0.0) -> nn.Module:
    """A torchvision ResNet with a fresh `fc` head for `num_classes` (optionally behind dropout)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    spec = _spec(name)
    model = spec.builder(weights=None)
    resolved = resolve_weights(name, weights)
    if isinstance(resolved, Path):
        state = _load_state_dict_file(resolved)
    elif resolved is not None:
        state = load_pretrained_state(resolved)
    else:
        state = None
    if state is not None:
        # the saved head may have another class count: keep the backbone, replace the head below
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("fc.")]
        if missing or unexpected:
            raise ValueError(
                f"weights {weights!r} do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
    head = nn.Linear(model.fc.in_features, num_classes)
    model.fc = nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head
    return model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.fc.parameters())


def backbone_parameters(model: nn.Module) -> list[nn.Parameter]:
    head_ids = {id(p) for p in head_parameters(model)}
    return [p for p in model.parameters() if id(p) not in head_ids]


class Backbone(nn.Module):
    """The model up to the pooled penultimate features (what the head sees)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))
        return torch.flatten(m.avgpool(x), 1)
