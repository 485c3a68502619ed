"""TrainConfig: one typed, validated config per training run, saved into the run folder and its checkpoints."""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Iterable

# the model a form or command starts from: the fastest ResNet, a useful model in minutes on a CPU
DEFAULT_MODEL = "resnet18"
OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULERS = ("plateau", "cosine", "onecycle", "none")
AUGMENTATIONS = ("none", "light", "standard", "trivialaugment")
FINETUNE_MODES = ("full", "head", "probe_then_unfreeze")
SPLITS = ("train", "val", "test")
# class imbalance: auto = weighted_loss when the largest training class has >= IMBALANCE_RATIO x the smallest
BALANCE_MODES = ("auto", "none", "weighted_loss", "sampler")
IMBALANCE_RATIO = 3.0
MIX_MODES = ("none", "mixup", "cutmix", "both")
MAX_TIME_BUDGET_MIN = 7 * 24 * 60  # a week
# progressive resizing starts at no less than a quarter of image_size (below that the images say little)
MIN_PROGRESSIVE_START = 0.25
# what progressive resizing starts at under a time budget, from scratch, unless the run says otherwise: at 30 minutes
# on the flower photos it won on validation by 3.0 points (85.3% vs 82.3%; test 85.5% vs 81.4%), at 10 minutes it
# tied; none of EMA, TTA, mixup, cutmix, SGD, one-cycle, 112 or 96 px added to it won at 30 minutes
# (BENCHMARKS §11a); fine-tuning ImageNet weights (features learnt at 224 px) was not measured, so not there
BUDGET_PROGRESSIVE_RESIZE = 0.5
# Upper bounds: far beyond any useful run on one GPU, low enough that a typo or a hostile request cannot queue a
# run that would hold a worker for months or allocate memory no machine has.
MAX_IMAGE_SIZE = 1024
MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 1024
MAX_SEED = 2**32 - 1  # numpy's seed range
# fields older versions wrote into config.json that no longer do anything: read back without an error
RETIRED_FIELDS = ("num_workers",)  # decoded images are cached, so there are no loader processes to size


# TrainConfig's field annotations (strings: `from __future__ import annotations`) → accepted Python types
_TYPES = {"str": str, "int": int, "float": (int, float), "float | None": (int, float, type(None)), "bool": bool}
_TYPE_WORDS = {"str": "text", "int": "a whole number", "float": "a number",
               "float | None": "a number (or null: automatic)", "bool": "true or false"}


class ConfigError(ValueError):
    """A config value is out of range or unknown; the message names the field and the valid choices."""


def _choice(name: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


@dataclass(frozen=True)
class TrainConfig:
    # dataset folder with one sub-folder per class
    data_dir: str
    # architecture: a name registered in shared.training.models (list_models())
    model: str = DEFAULT_MODEL
    # "DEFAULT"/"IMAGENET1K_V1"/"IMAGENET1K_V2" (torchvision enum), "none" (from scratch), or a state-dict path
    weights: str = "IMAGENET1K_V1"
    # full: train everything; head: linear probe on cached features; probe_then_unfreeze: head first, then all
    finetune: str = "full"
    # head-only epochs before unfreezing (probe_then_unfreeze only)
    probe_epochs: int = 2
    # backbone lr = lr * backbone_lr_mult after unfreezing (lower, so pretrained features are not wrecked)
    backbone_lr_mult: float = 0.1
    # dropout before the new classification head; 0 disables
    dropout: float = 0.0
    # square input size in pixels (128 trains ~3x faster than 224 on CPU)
    image_size: int = 128
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    optimizer: str = "adamw"
    weight_decay: float = 0.05
    # SGD momentum (Nesterov)
    momentum: float = 0.9
    scheduler: str = "cosine"
    # linear warm-up for the cosine schedule (capped at epochs - 1, so a 1-epoch run has none)
    warmup_epochs: int = 1
    label_smoothing: float = 0.1
    # max gradient norm; 0 disables clipping
    grad_clip: float = 1.0
    # stop after this many epochs without val-accuracy improvement; 0 disables
    patience: int = 0
    augment: str = "standard"
    seed: int = 0
    val_ratio: float = 0.15
    test_ratio: float = 0.15
    # "auto" picks CUDA when available; "cpu"/"cuda"/"cuda:1" force one
    device: str = "auto"
    # mixed precision on CUDA (bf16 where supported, else fp16); never used on CPU (it is ~10x slower there)
    amp: bool = True
    # minutes for the whole run (cache building and calibration count); 0 = off. When set, `epochs` is not used:
    # the engine times real steps and picks the epoch count that fits (shared/training/budget.py)
    time_budget: float = 0.0
    # class imbalance: auto (weighted loss when the largest class is >= 3x the smallest), none, weighted_loss
    # (1/sqrt(class size)), sampler (each class equally likely, drawn with replacement); when imbalanced, the best
    # checkpoint is chosen by macro F1
    balance: str = "auto"
    # exponential moving average of the weights, evaluated and checkpointed instead of them; 0 = off (e.g. 0.999)
    ema_decay: float = 0.0
    # flip test-time augmentation: validation, calibration, evaluation and prediction average image and mirror
    tta: bool = False
    # mixup / cutmix on training batches (torchvision.transforms.v2): none, mixup, cutmix, both (one per batch)
    mix: str = "none"
    # progressive resizing: training starts at this share of image_size (e.g. 0.5, rounded to a multiple of 16 px)
    # and grows to image_size by 3/4 of the epochs; validation, evaluation and prediction stay at image_size; 0 = off;
    # None (not given) = BUDGET_PROGRESSIVE_RESIZE under a time budget from scratch, else off (resolved here, so
    # config.json and every reader see the number the run used)
    progressive_resize: float | None = None
    # the "not sure" threshold is chosen on validation so answers above it are right this often
    target_precision: float = 0.95

    def __post_init__(self) -> None:
        self._check_types()
        if self.progressive_resize is None:
            object.__setattr__(self, "progressive_resize", automatic_progressive_resize(self.time_budget, self.weights))
        if not self.data_dir:
            raise ConfigError("data_dir is required: a folder with one sub-folder per class")
        self._check_model()
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("scheduler", self.scheduler, SCHEDULERS)
        _choice("augment", self.augment, AUGMENTATIONS)
        _choice("finetune", self.finetune, FINETUNE_MODES)
        _choice("balance", self.balance, BALANCE_MODES)
        _choice("mix", self.mix, MIX_MODES)
        if self.ema_decay and self.finetune == "head":
            raise ConfigError("ema_decay averages the whole network's weights; with finetune 'head' set it to 0")
        if self.progressive_resize and self.finetune == "head":
            raise ConfigError("progressive_resize shrinks the images the whole network trains on; with finetune "
                              "'head' (features of full-size images) set it to 0")
        if self.finetune != "full" and self.weights.lower() == "none":
            raise ConfigError(f"finetune={self.finetune!r} needs pretrained weights; with weights 'none' use 'full'")
        ratio_sum = self.val_ratio + self.test_ratio
        checks = [
            ("image_size", self.image_size, 32 <= self.image_size <= MAX_IMAGE_SIZE, f"between 32 and {MAX_IMAGE_SIZE}"),
            ("epochs", self.epochs, 1 <= self.epochs <= MAX_EPOCHS, f"between 1 and {MAX_EPOCHS}"),
            ("batch_size", self.batch_size, 1 <= self.batch_size <= MAX_BATCH_SIZE, f"between 1 and {MAX_BATCH_SIZE}"),
            ("lr", self.lr, 0 < self.lr < 10, "a positive number below 10"),
            ("weight_decay", self.weight_decay, 0 <= self.weight_decay < 1, "in [0, 1)"),
            ("momentum", self.momentum, 0 <= self.momentum < 1, "in [0, 1)"),
            ("dropout", self.dropout, 0 <= self.dropout < 1, "in [0, 1)"),
            ("label_smoothing", self.label_smoothing, 0 <= self.label_smoothing < 1, "in [0, 1)"),
            ("grad_clip", self.grad_clip, 0 <= self.grad_clip <= 1e6, "between 0 and 1e6"),
            ("patience", self.patience, 0 <= self.patience <= MAX_EPOCHS, f"between 0 and {MAX_EPOCHS}"),
            ("warmup_epochs", self.warmup_epochs, 0 <= self.warmup_epochs <= MAX_EPOCHS, f"between 0 and {MAX_EPOCHS}"),
            ("probe_epochs", self.probe_epochs,
             self.finetune != "probe_then_unfreeze" or 1 <= self.probe_epochs < self.epochs,
             "at least 1 and smaller than epochs"),
            ("backbone_lr_mult", self.backbone_lr_mult, 0 < self.backbone_lr_mult <= 1, "in (0, 1]"),
            ("val_ratio", self.val_ratio, 0 < self.val_ratio < 1, "in (0, 1)"),
            ("test_ratio", self.test_ratio, 0 <= self.test_ratio < 1, "in [0, 1)"),
            ("val_ratio + test_ratio", ratio_sum, ratio_sum <= 0.9, "at most 0.9"),
            ("seed", self.seed, 0 <= self.seed <= MAX_SEED, f"between 0 and {MAX_SEED}"),
            ("time_budget", self.time_budget, 0 <= self.time_budget <= MAX_TIME_BUDGET_MIN,
             f"between 0 (off) and {MAX_TIME_BUDGET_MIN} minutes"),
            ("ema_decay", self.ema_decay, self.ema_decay == 0 or 0.5 <= self.ema_decay < 1,
             "0 (off) or in [0.5, 1)"),
            ("progressive_resize", self.progressive_resize,
             self.progressive_resize == 0 or MIN_PROGRESSIVE_START <= self.progressive_resize < 1,
             f"0 (off) or in [{MIN_PROGRESSIVE_START}, 1)"),
            ("target_precision", self.target_precision, 0.5 <= self.target_precision <= 1, "in [0.5, 1]"),
        ]
        for name, value, ok, expected in checks:
            if not ok:
                raise ConfigError(f"{name} must be {expected}; got {value} — change it to a value in that range")
        if not (self.device in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d{1,3}", str(self.device))):
            raise ConfigError(f"device must be auto, cpu, cuda or cuda:N; got {self.device!r}")

    def _check_model(self) -> None:
        # asked at validation time, not copied into a tuple here: a model registered later (a test's tiny ResNet)
        # is valid. Imported here because the registry imports torch, which a config alone does not need.
        from shared.training.models import list_models

        _choice("model", self.model, list_models())

    def _check_types(self) -> None:
        """Every field has its declared type (JSON from the page's API can carry anything), so the range checks
        below compare numbers with numbers; a bool is not accepted as a number."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = _TYPES[f.type]
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
            if not ok:
                raise ConfigError(f"{f.name} must be {_TYPE_WORDS[f.type]}; got {value!r} ({type(value).__name__})")

    @property
    def ratios(self) -> tuple[float, float, float]:
        return (round(1 - self.val_ratio - self.test_ratio, 6), self.val_ratio, self.test_ratio)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """Build from a dict, refusing unknown keys (a typo must not be silently ignored); the RETIRED fields of
        older config.json files are dropped."""
        known = {f.name for f in fields(cls)}
        data = {k: v for k, v in data.items() if k not in RETIRED_FIELDS}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; valid: {', '.join(sorted(known))}")
        return cls(**data)

    def replace(self, **changes: Any) -> "TrainConfig":
        return replace(self, **changes)


def automatic_progressive_resize(time_budget: float, weights: str) -> float:
    """What a run that does not set progressive_resize gets: BUDGET_PROGRESSIVE_RESIZE under a time budget from
    scratch (where it was measured), else 0 (off)."""
    return BUDGET_PROGRESSIVE_RESIZE if time_budget and str(weights).lower() == "none" else 0.0


def expand_grid(base: dict[str, Any], **lists: Iterable[Any]) -> list[TrainConfig]:
    """One TrainConfig per combination of the list-valued fields (models x learning rates x ...).

    Each combination is validated; an empty list is an error rather than zero runs.
    """
    names = list(lists)
    values = []
    for name in names:
        options = list(dict.fromkeys(lists[name]))  # drop repeats, keep order
        if not options:
            raise ConfigError(f"{name}: choose at least one value")
        values.append(options)
    return [TrainConfig.from_dict({**base, **dict(zip(names, combo))}) for combo in itertools.product(*values)]
