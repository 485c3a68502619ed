"""Model registry: one `ModelSpec` per architecture name — how to build it and where its parts are.

timm's idea (a name → constructor registry with `list_models()` / `create_model()`) for torchvision's ResNet
family: the spec carries everything the rest of the code needs to know about an architecture — its builder, its
torchvision weights enum (names, files), where the classifier head is, the layers the heat-maps read, the stages whose
activations the page shows, and the feature size the head receives. Adding a model is one `register_model` call;
nothing else in the code names a layer.

Pretrained weights are looked up offline first, where torchvision caches them (`$TORCH_HOME/hub/checkpoints`),
so a machine without network can use a file copied there by hand.
"""

from __future__ import annotations

import importlib
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

# A torchvision ResNet's stages as (label shown on the page, module path). "conv1" is read at the stem's ReLU
# (after bn1: what layer1 receives); a raw conv1 output would be signed and un-normalised. The stem's `relu` runs
# once per forward: the blocks have their own.
RESNET_STAGES = (("conv1", "relu"), ("layer1", "layer1"), ("layer2", "layer2"), ("layer3", "layer3"),
                 ("layer4", "layer4"))


@dataclass(frozen=True)
class ModelSpec:
    """One architecture: how to build it and where its parts are."""

    # the registry key, the `model` of a TrainConfig and of a checkpoint
    name: str
    # () -> the network with random weights and its original head (weights are loaded by `create_model`)
    builder: Callable[[], nn.Module]
    # width of the pooled features the head receives (the head's in_features)
    feature_size: int
    # torchvision's weights enum: names, DEFAULT, download URLs (whose last part is the cached file's name);
    # None: the model has no pretrained weights (only 'none' or a state-dict file)
    weights: type[tvm.WeightsEnum] | None = None
    # dotted module path of the classifier that `create_model` replaces with one sized for the dataset
    head: str = "fc"
    # module Grad-CAM reads: the last convolutional stage (coarse maps, class-specific features)
    cam_layer: str = "layer4"
    # modules LayerCAM reads and fuses, in forward order: the finest one sets the heat-map's resolution (a ResNet's
    # layer2 is 1/8 of the input: 16x16 at 128 px, against layer4's 4x4); chosen by bench/bench_pointing_game.py
    layercam_layers: tuple[str, ...] = ("layer2", "layer3", "layer4")
    # (label, module path) of the stages whose activations are shown, in forward order
    stages: tuple[tuple[str, str], ...] = RESNET_STAGES

    def weight_names(self) -> list[str]:
        """The enum's weight names (IMAGENET1K_V1, ...), without the DEFAULT alias."""
        return [w.name for w in self.weights] if self.weights is not None else []

    def weight_files(self) -> dict[str, str]:
        """Weight name (DEFAULT included) → the file name torchvision caches it as."""
        if self.weights is None:
            return {}
        return {name: weights_file_name(w) for name, w in self.weights.__members__.items()}

    def head_of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.head)

    def head_linear(self, model: nn.Module) -> nn.Linear:
        """The head's Linear layer (`create_model` may put a Dropout in front of it)."""
        head = self.head_of(model)
        return head[-1] if isinstance(head, nn.Sequential) else head

    def cam_layer_of(self, model: nn.Module) -> nn.Module:
        return model.get_submodule(self.cam_layer)

    def stage_modules(self, model: nn.Module) -> dict[str, nn.Module]:
        return {label: model.get_submodule(path) for label, path in self.stages}

    def head_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        return list(self.head_of(model).parameters())

    def backbone_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        head_ids = {id(p) for p in self.head_parameters(model)}
        return [p for p in model.parameters() if id(p) not in head_ids]


# torchvision's ResNet family (torchvision/models/resnet.py), in the order the page lists them: BasicBlock
# networks pool 512 features, Bottleneck ones 2048. Fields: name, builder, feature size, weights enum.
_REGISTRY: dict[str, ModelSpec] = {spec.name: spec for spec in (
    ModelSpec("resnet18", tvm.resnet18, 512, tvm.ResNet18_Weights),
    ModelSpec("resnet34", tvm.resnet34, 512, tvm.ResNet34_Weights),
    ModelSpec("resnet50", tvm.resnet50, 2048, tvm.ResNet50_Weights),
    ModelSpec("resnet101", tvm.resnet101, 2048, tvm.ResNet101_Weights),
    ModelSpec("resnet152", tvm.resnet152, 2048, tvm.ResNet152_Weights),
    ModelSpec("resnext50_32x4d", tvm.resnext50_32x4d, 2048, tvm.ResNeXt50_32X4D_Weights),
    ModelSpec("resnext101_32x8d", tvm.resnext101_32x8d, 2048, tvm.ResNeXt101_32X8D_Weights),
    ModelSpec("resnext101_64x4d", tvm.resnext101_64x4d, 2048, tvm.ResNeXt101_64X4D_Weights),
    ModelSpec("wide_resnet50_2", tvm.wide_resnet50_2, 2048, tvm.Wide_ResNet50_2_Weights),
    ModelSpec("wide_resnet101_2", tvm.wide_resnet101_2, 2048, tvm.Wide_ResNet101_2_Weights),
)}


def register_model(spec: ModelSpec) -> ModelSpec:
    """Add an architecture. Registering the same spec again is a no-op; another spec under a taken name is an error
    (a silent replacement would change what existing checkpoints of that name load into)."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"expected a ModelSpec, got {type(spec).__name__}")
    known = _REGISTRY.get(spec.name)
    if known is not None and known != spec:
        raise ValueError(f"model {spec.name!r} is already registered with another spec — choose another name")
    _REGISTRY[spec.name] = spec
    return spec


def load_model_plugins(plugins: Sequence[str]) -> None:
    """Call each "module:function" (RESNET_LAB_MODEL_PLUGINS) so it registers its models in this process.

    Set by whoever starts the processes (like `celery -A`), never taken from the page's API."""
    for plugin in plugins:
        module_name, _, function_name = plugin.partition(":")
        try:
            if not module_name or not function_name:
                raise ImportError("expected module:function")
            register = getattr(importlib.import_module(module_name), function_name)
        except (ImportError, AttributeError) as exc:
            raise ValueError(f"RESNET_LAB_MODEL_PLUGINS: cannot load {plugin!r} ({exc}) — give 'module:function' "
                             "importable from this Python, or unset it") from exc
        register()
        log.info("model plugin %s loaded; models: %s", plugin, ", ".join(list_models()))


class WeightsUnavailable(RuntimeError):
    """Pretrained weights are neither cached nor downloadable; the message says where to put the file."""


def list_models() -> list[str]:
    """Registered architecture names, in registration order (smallest ResNet first)."""
    return list(_REGISTRY)


def get_spec(name: str) -> ModelSpec:
    """The spec of a registered model; an unknown name raises listing the valid ones."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        shown = repr(name) if len(repr(name)) <= 60 else repr(name)[:57] + "..."  # a hostile value may be huge
        raise ValueError(f"unknown model {shown}; choose one of {', '.join(list_models())}") from None


def list_weights(name: str) -> list[str]:
    """Weight choices for a model: torchvision enum names, plus 'none' (from scratch)."""
    return get_spec(name).weight_names() + ["none"]


def weights_file_name(weights: tvm.WeightsEnum) -> str:
    """The file torchvision downloads an enum member to (and where the offline lookup expects it)."""
    return os.path.basename(weights.url)


def resolve_weights(name: str, weights: str) -> tvm.WeightsEnum | Path | None:
    """'none' → None; an existing file → its Path; else a torchvision enum member ('DEFAULT' allowed)."""
    if weights is None or str(weights).lower() == "none":
        return None
    spec = get_spec(name)
    key = str(weights)
    enum = spec.weights
    if enum is not None and key.upper() == "DEFAULT":
        return enum.DEFAULT
    if enum is not None and key in enum.__members__:
        return enum[key]
    path = Path(key).expanduser()
    if path.is_file():
        return path
    raise ValueError(
        f"unknown weights {weights!r} for {name}; choose one of {', '.join(list_weights(name))}, "
        "or give the path of a state-dict file"
    )


def cached_weights_path(name: str, weights: str = "DEFAULT") -> Path | None:
    """Where the offline lookup expects `weights` of model `name` (None when the model has no such weights)."""
    key = "DEFAULT" if weights.upper() == "DEFAULT" else weights
    file_name = get_spec(name).weight_files().get(key)
    return weights_cache_dir() / file_name if file_name else None


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
    models = list(dict.fromkeys(models))
    specs = [get_spec(m) for m in models]
    if key.upper() == "DEFAULT":
        without = [spec.name for spec in specs if spec.weights is None]
        if without:
            raise ValueError(f"{', '.join(without)} have no pretrained weights — choose 'none' or a state-dict file, "
                             "or queue those models separately")
        return "DEFAULT"
    known = {spec.name: set(spec.weight_names()) for spec in specs}
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
    cached = weights_cache_dir() / weights_file_name(weights)
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
    """A registered architecture with its weights loaded and a fresh head for `num_classes` (behind dropout when
    `dropout` > 0)."""
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    spec = get_spec(name)
    model = spec.builder()
    resolved = resolve_weights(name, weights)
    if isinstance(resolved, Path):
        state = _load_state_dict_file(resolved)
    elif resolved is not None:
        state = load_pretrained_state(resolved)
    else:
        state = None
    if state is not None:
        _load_backbone(model, spec, state, weights)
    head = nn.Linear(spec.feature_size, num_classes)
    model.set_submodule(spec.head, nn.Sequential(nn.Dropout(dropout), head) if dropout > 0 else head)
    return model


def _load_backbone(model: nn.Module, spec: ModelSpec, state: dict[str, torch.Tensor], weights: str) -> None:
    """Load everything but the head: the saved head may have another class count; it is replaced anyway."""
    prefix = spec.head + "."
    state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.startswith(prefix)]
    if missing or unexpected:
        raise ValueError(
            f"weights {weights!r} do not fit {spec.name}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def logits_and_features(model: nn.Module, spec: ModelSpec, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass: the logits, and the pooled penultimate features (N, D) read at the head's input (so it
    holds for any registered architecture). The caller keeps other threads off `model` meanwhile (the hook is the
    module's, not the thread's)."""
    captured: list[torch.Tensor] = []
    handle = spec.head_of(model).register_forward_pre_hook(lambda m, args: captured.append(args[0]))
    try:
        logits = model(x)
    finally:
        handle.remove()
    return logits, captured[0].flatten(1)


class Backbone(nn.Module):
    """The model up to the pooled penultimate features: what the head receives (the head's own cost is one small
    matrix product)."""

    def __init__(self, model: nn.Module, spec: ModelSpec):
        super().__init__()
        self.model = model
        self.spec = spec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return logits_and_features(self.model, self.spec, x)[1]


class WithFeatures(nn.Module):
    """A copy of the model that returns (logits, penultimate features), without hooks, for exporting (ONNX traces
    no hook): the head is cut out of the body and applied to what the body returns. Checked on construction to
    give the model's own logits, so an architecture whose head is not its last step is refused, not mis-exported."""

    def __init__(self, model: nn.Module, spec: ModelSpec, image_size: int):
        super().__init__()
        import copy

        self.body = copy.deepcopy(model).eval()
        self.head = spec.head_of(self.body)
        x = torch.zeros(1, 3, image_size, image_size)
        with torch.inference_mode():
            expected = self.body(x)
            self.body.set_submodule(spec.head, nn.Identity())
            got = self.eval()(x)[0]
        if not torch.allclose(expected, got, rtol=1e-4, atol=1e-5):
            raise ValueError(f"{spec.name}: its head {spec.head!r} is not the last step of its forward pass")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = torch.flatten(self.body(x), 1)
        return self.head(features), features


# plugins the command line deferred (shared.training.plugins): registered before any caller looks a name up
def _load_deferred_plugins() -> None:
    from shared.training.plugins import take_pending

    load_model_plugins(take_pending())


_load_deferred_plugins()
