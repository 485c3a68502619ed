"""The training engine: plain functions (`train_one_epoch`, `evaluate`, `fit`) in the torchvision-reference style.

`fit` takes a config and a run folder and returns a plain dict. Progress, cancel and everything that knows
about Celery go through an injected `Reporter`; the engine never imports the worker.

Determinism: every epoch reseeds from (seed, epoch), so a run resumed from `last.pt` replays exactly what
an uninterrupted run would have done (checked by tests/test_engine.py).
"""

from __future__ import annotations

import copy
import errno
import itertools
import json
import logging
import math
import os
import platform
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from shared import __version__
from shared.data.cache import load_image_array
from shared.training.checkpoint import load_checkpoint, save_checkpoint
from shared.analysis.calibration import Calibration, calibrate, write_calibration
from shared.analysis.feature_distance import FILE_NAME as DISTANCE_FILE
from shared.analysis.feature_distance import (MAX_FEATURE_SIZE, MAX_FIT_IMAGES, MIN_VAL_IMAGES, FeatureDistance,
                                               fit_feature_distance, write_feature_distance)
from shared.training.budget import TIMED_STEPS, BudgetPlan, make_plan, replan, time_steps
from shared.training.config import BALANCE_MODES, IMBALANCE_RATIO, MAX_EPOCHS, TrainConfig
from shared.data.manifest import read_manifest, write_manifest
from shared.data.split import make_split
from shared.fsutil import write_atomic, write_json_atomic
from shared.training.models import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_model, get_spec
from shared.data.transforms import BatchTransform, progressive_sizes, progressive_start, resize_size

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """Raised inside `fit` when the reporter asks to stop; the last finished epoch's checkpoint is kept."""


class Reporter:
    """Receives progress from `fit`. Subclass it (the worker publishes to Redis; the CLI draws tqdm bars)."""

    def phase(self, name: str, **info: Any) -> None:
        """'preparing data', 'training', 'evaluating'."""

    def batch(self, epoch: int, batch: int, num_batches: int, images_per_s: float) -> None:
        """Called after every training batch."""

    def epoch(self, record: dict) -> None:
        """Called with each epoch's record (also appended to metrics.jsonl)."""

    def should_stop(self) -> bool:
        """Checked every batch; True cancels the run."""
        return False


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    # Never autocast on CPU: bf16 there measured ~10x slower than fp32 on this kind of machine.
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 100_003 + epoch)


@dataclass
class ArraySplit:
    """One split's decoded images (uint8, N x 3 x S x S) and labels."""

    images: np.ndarray
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)


def iterate_batches(split: ArraySplit, batch_size: int, device: torch.device, *, shuffle: bool,
                    generator: torch.Generator | None = None, drop_last: bool = False,
                    order: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """uint8 batches from the array with one batch prefetched in a background thread.

    No DataLoader: the images are already decoded, so a batch is one fancy-index copy out of memory;
    worker processes would only add pickling. One thread overlaps that copy (and the host→GPU transfer)
    with compute without oversubscribing the cores.
    """
    n = len(split)
    if order is None:  # a given order (the balanced sampler's draw) is used as it is
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    n = len(order)
    stops = range(0, n - batch_size + 1 if drop_last else n, batch_size)
    pin = device.type == "cuda"

    def load(start: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = order[start:start + batch_size].sort().values.numpy()
        x = torch.from_numpy(np.ascontiguousarray(split.images[idx]))
        y = split.labels[idx]
        if pin:
            x = x.pin_memory()
        return x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    result: dict[str, Any] = {}

    def fetch(start: int) -> None:
        try:
            result["batch"] = load(start)
        except BaseException as exc:  # surfaced in the consumer thread below
            result["error"] = exc

    starts = list(stops)
    thread = None
    if starts:
        thread = threading.Thread(target=fetch, args=(starts[0],), daemon=True)
        thread.start()
    for i in range(len(starts)):
        thread.join()
        if "error" in result:
            raise result.pop("error")
        batch = result.pop("batch")
        if i + 1 < len(starts):
            thread = threading.Thread(target=fetch, args=(starts[i + 1],), daemon=True)
            thread.start()
        yield batch


class StepScheduler:
    """Per-step lr schedule (cosine with linear warm-up, one-cycle) or per-epoch ReduceLROnPlateau."""

    def __init__(self, optimizer: torch.optim.Optimizer, kind: str, total_steps: int, warmup_steps: int):
        self.kind = kind
        self.optimizer = optimizer
        self.total_steps = total_steps
        if kind == "cosine":
            def factor(step: int) -> float:
                if step < warmup_steps:
                    return (step + 1) / warmup_steps
                progress = (step - warmup_steps) / max(1, self.total_steps - warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
            self.inner = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        elif kind == "onecycle":
            max_lrs = [g["lr"] for g in optimizer.param_groups]
            self.inner = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lrs, total_steps=total_steps)
        elif kind == "plateau":
            # the original system's schedule: halve the lr when val loss stalls for 2 epochs
            self.inner = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
        else:
            self.inner = None

    def set_total_steps(self, total_steps: int) -> None:
        """Shorten (or lengthen) the schedule mid-run: the time budget's re-plan. The cosine reads the total at
        every step; OneCycleLR fixed its phase ends at creation, so they are moved to the same shares of the new
        total (torch keeps them in `_schedule_phases`; checked by tests/test_budget.py)."""
        if self.kind == "onecycle":
            old = self.inner.total_steps
            for phase in self.inner._schedule_phases:
                phase["end_step"] = (phase["end_step"] + 1) / old * total_steps - 1
            self.inner.total_steps = total_steps
        self.total_steps = total_steps

    def step_batch(self) -> None:
        if self.kind in ("cosine", "onecycle"):
            self.inner.step()

    def step_epoch(self, val_loss: float) -> None:
        if self.kind == "plateau":
            self.inner.step(val_loss)

    def state_dict(self) -> dict:
        return self.inner.state_dict() if self.inner is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if self.inner is not None and state:
            self.inner.load_state_dict(state)


def make_optimizer(config: TrainConfig, groups: list[dict]) -> torch.optim.Optimizer:
    # no weight decay on norms and biases (the usual recipe; decaying BN scales hurts accuracy)
    param_groups = []
    for group in groups:
        decay = [p for p in group["params"] if p.ndim > 1]
        no_decay = [p for p in group["params"] if p.ndim <= 1]
        for params, wd in ((decay, config.weight_decay), (no_decay, 0.0)):
            if params:
                param_groups.append({"params": params, "lr": group["lr"], "weight_decay": wd})
    if config.optimizer == "sgd":
        return torch.optim.SGD(param_groups, lr=config.lr, momentum=config.momentum, nesterov=True)
    if config.optimizer == "adam":
        return torch.optim.Adam(param_groups, lr=config.lr)
    return torch.optim.AdamW(param_groups, lr=config.lr)


def train_one_epoch(model: nn.Module, batches, transform: BatchTransform, optimizer, scheduler: StepScheduler,
                    criterion, device: torch.device, *, epoch: int, num_batches: int, reporter: Reporter,
                    generator: torch.Generator | None, scaler=None, amp_dtype=None, grad_clip: float = 0.0,
                    channels_last: bool = True, mix=None, after_step=None, size: int | None = None) -> dict:
    """One pass over `batches`. `mix(inputs, labels) -> (inputs, soft targets)` (mixup/cutmix) when given;
    `after_step()` after every optimizer step (the EMA update); `size`: the training side (progressive resizing),
    the transform's image_size when None."""
    model.train()
    total_loss, correct, seen = 0.0, 0, 0
    start = time.perf_counter()
    for i, (images, labels) in enumerate(batches):
        if reporter.should_stop():
            raise Cancelled()
        inputs = transform(images, train=True, generator=generator, size=size)
        targets = labels
        if mix is not None:
            inputs, targets = mix(inputs, labels)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(inputs)
            loss = criterion(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"training loss became {loss.item()} at epoch {epoch}, batch {i + 1}: lower the learning rate")
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if grad_clip > 0:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        if after_step is not None:
            after_step()
        scheduler.step_batch()
        n = labels.shape[0]
        total_loss += loss.item() * n
        correct += (logits.argmax(1) == labels).sum().item()
        seen += n
        reporter.batch(epoch, i + 1, num_batches, seen / max(time.perf_counter() - start, 1e-9))
    seconds = time.perf_counter() - start
    return {"train_loss": total_loss / max(seen, 1), "train_acc": correct / max(seen, 1),
            "images_per_s": seen / max(seconds, 1e-9), "train_seconds": seconds}


def flip_tta(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """Logits averaged over the image and its mirror (flip test-time augmentation)."""
    return (model(inputs) + model(inputs.flip(3))) / 2


def class_scores(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    """Per-class recall (None for a class without images) and macro F1 of argmax predictions (scikit-learn)."""
    from sklearn.metrics import f1_score, recall_score

    y, pred = labels.cpu().numpy(), logits.argmax(1).cpu().numpy()
    present = np.bincount(y, minlength=num_classes) > 0
    recall = recall_score(y, pred, labels=list(range(num_classes)), average=None, zero_division=0)
    return {"recall": [round(float(r), 6) if ok else None for r, ok in zip(recall, present)],
            "macro_f1": round(float(f1_score(y, pred, average="macro", zero_division=0)), 6)}


@torch.no_grad()
def evaluate(model: nn.Module, batches, transform: BatchTransform, criterion, device: torch.device, *,
             amp_dtype=None, channels_last: bool = True, tta: bool = False, num_classes: int | None = None,
             keep_logits: bool = False) -> dict:
    """{loss, acc}; with `num_classes` also per-class `recall` and `macro_f1`; with `keep_logits` the (N, C)
    float32 `logits` and `labels` on the CPU (for calibration)."""
    model.eval()
    total_loss, correct, seen = 0.0, 0, 0
    all_logits, all_labels = [], []
    for images, labels in batches:
        inputs = transform(images, train=False)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = flip_tta(model, inputs) if tta else model(inputs)
        logits = logits.float()
        total_loss += criterion(logits, labels).item() * labels.shape[0]
        correct += (logits.argmax(1) == labels).sum().item()
        seen += labels.shape[0]
        if num_classes or keep_logits:
            all_logits.append(logits.cpu())
            all_labels.append(labels.cpu())
    out = {"loss": total_loss / max(seen, 1), "acc": correct / max(seen, 1)}
    if all_logits:
        logits, labels = torch.cat(all_logits), torch.cat(all_labels)
        if num_classes:
            out.update(class_scores(logits, labels, num_classes))
        if keep_logits:
            out.update(logits=logits, labels=labels)
    return out


@torch.no_grad()
def extract_features(backbone: nn.Module, split: ArraySplit, transform: BatchTransform, device, batch_size: int,
                     amp_dtype=None, reporter: Reporter | None = None,
                     order: torch.Tensor | None = None) -> torch.Tensor:
    """Penultimate features of a frozen backbone, computed once (centre crops, no augmentation); of the images
    in `order` (sorted) when given, else of all."""
    backbone.eval()
    chunks = []
    for images, _ in iterate_batches(split, batch_size, device, shuffle=False, order=order):
        if reporter is not None and reporter.should_stop():
            raise Cancelled()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            chunks.append(backbone(transform(images, train=False)).float())
    return torch.cat(chunks) if chunks else torch.empty(0)


def environment_info(device: torch.device) -> dict:
    import torchvision

    info = {"resnet_lab": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "python": platform.python_version(), "device": str(device), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def prepare_split(config: TrainConfig, run_dir: Path, data_roots: Sequence[Path] | None = None) -> dict:
    """The run's manifest: read it when resuming (same split), else make and save it (links confined to
    `data_roots` when given: see `scan_dataset`)."""
    path = run_dir / "split.json"
    if path.is_file():
        return read_manifest(path)
    manifest = make_split(config.data_dir, ratios=config.ratios, seed=config.seed, link_roots=data_roots)
    if not run_dir.is_dir():  # deleted while the split was made (minutes on a large dataset): never recreate it
        raise FileNotFoundError(errno.ENOENT, "the run folder was deleted while its split was made", str(run_dir))
    write_manifest(manifest, path)
    return manifest


def load_splits(manifest: dict, side: int, cache_dir: Path, reporter: Reporter, *,
                cache_max_bytes: int | None = None) -> dict[str, ArraySplit]:
    files = manifest["files"]

    def progress(done: int, total: int) -> None:
        reporter.phase("preparing data", decoded=done, total=total)
        if reporter.should_stop():
            raise Cancelled()

    images = load_image_array(Path(manifest["root"]), files, side, cache_dir, progress=progress,
                              max_bytes=cache_max_bytes)
    splits = {}
    for name in ("train", "val", "test"):
        idx = np.array([i for i, f in enumerate(files) if f["split"] == name], dtype=np.int64)
        splits[name] = ArraySplit(images=_Subset(images, idx),
                                  labels=torch.tensor([files[i]["label"] for i in idx], dtype=torch.long))
    return splits


class _Subset:
    """Index view over the cached array without copying it (the cache can be larger than a split)."""

    def __init__(self, array: np.ndarray, idx: np.ndarray):
        self.array, self.idx = array, idx

    def __len__(self) -> int:
        return len(self.idx)

    def __getitem__(self, positions) -> np.ndarray:
        return self.array[self.idx[positions]]


def class_balance(config: TrainConfig, labels: torch.Tensor, num_classes: int) -> dict:
    """How the run treats class imbalance: the training split's counts, whether it is imbalanced (largest class
    >= IMBALANCE_RATIO x the smallest), the balance mode used ("auto" resolved) and what picks the best epoch
    (macro F1 when imbalanced, unless balance is "none")."""
    counts = np.bincount(labels.numpy(), minlength=num_classes)
    imbalanced = bool(counts.max() >= IMBALANCE_RATIO * max(int(counts.min()), 1))
    mode = config.balance
    if mode == "auto":  # the weighted loss: it met the target on real photos cut 20:5:1, the sampler did not (§11b)
        mode = "weighted_loss" if imbalanced else "none"
    # balance "none" asked for explicitly trains and picks as if balanced (what runs did before imbalance existed)
    by_f1 = imbalanced and mode != "none"
    return {"class_counts": counts.tolist(), "imbalanced": imbalanced, "balance": mode,
            "select_by": "val_macro_f1" if by_f1 else "val_acc"}


def recorded_balance(run_dir: Path) -> str | None:
    """The balance mode config.json says the run trained with ("auto" already resolved), None when it says none."""
    try:
        mode = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))["plan"]["balance"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return mode if mode in BALANCE_MODES and mode != "auto" else None


def class_weights(class_counts: Sequence[int]) -> torch.Tensor:
    """The weighted loss's per-class weights: inverse square root of the class's training images, scaled to a mean
    of 1 over the images. The square root, not the full inverse frequency: on a 20:5:1 set of overlapping
    generated classes, over 4 seeds, the full inverse lifted the minority's recall by 20.8 points at 20.2 points of
    accuracy, the square root by 14.2 at 4.0 (BENCHMARKS §11b; neither beat no weighting on macro F1 there). What
    `auto` uses: on the flower photos cut 20:5:1 (3 seeds) it lifted minority recall by 48.9 points and macro F1 by
    12.1 at 1.7 points of accuracy, where the balanced sampler cost 6.8 (§11b)."""
    counts = torch.tensor(class_counts, dtype=torch.float64).clamp(min=1)
    weight = counts.rsqrt()
    return (weight * counts.sum() / (weight * counts).sum()).float()


def make_mix(kind: str, num_classes: int):
    """torchvision's batch MixUp / CutMix (soft targets), or None."""
    if kind == "none":
        return None
    from torchvision.transforms import v2

    ops = {"mixup": [v2.MixUp(num_classes=num_classes)], "cutmix": [v2.CutMix(num_classes=num_classes)],
           "both": [v2.MixUp(num_classes=num_classes), v2.CutMix(num_classes=num_classes)]}[kind]
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)


def make_ema(model: nn.Module, decay: float) -> torch.optim.swa_utils.AveragedModel:
    """An exponential moving average of `model`'s weights and BN buffers. The decay warms up as in timm's
    ModelEmaV3 ((1 + n) / (10 + n), capped at `decay`), so a short run is not dominated by its random start."""
    def average(ema_value, value, n):
        d = ((1 + n) / (10 + n)).clamp(max=decay).to(ema_value.dtype)
        return ema_value * d + value * (1 - d)

    return torch.optim.swa_utils.AveragedModel(model, avg_fn=average, use_buffers=True)


def fit(config: TrainConfig, run_dir: Path, reporter: Reporter | None = None, *, cache_dir: Path | None = None,
        cache_max_gb: float | None = None, data_roots: Sequence[Path] | None = None) -> dict:
    """Train one run into `run_dir`, resuming from `last.pt` when present. Returns the best metrics.

    `cache_max_gb` caps the decoded-image cache folder (None or 0: only the disk does); a cache that cannot fit
    raises `CacheFullError` before anything is decoded. `data_roots` (the worker's): links in the dataset that lead
    outside them are not read (see `scan_dataset`).
    With `config.time_budget` the epoch count is planned (shared/training/budget.py); after training the best
    checkpoint is calibrated on the validation split (calibration.json, shared/analysis/calibration.py).
    Raises `Cancelled` when the reporter asks to stop (last.pt stays), and lets other errors propagate.
    """
    started = time.monotonic()  # the budget's clock: the split and the image cache count against it
    run_dir = Path(run_dir)
    reporter = reporter or Reporter()
    cache_dir = Path(cache_dir) if cache_dir else run_dir.parent / ".cache"
    device = pick_device(config.device)
    amp_dtype = autocast_dtype(device, config.amp)
    seed_everything(config.seed)

    reporter.phase("preparing data")
    manifest = prepare_split(config, run_dir, data_roots)
    classes = manifest["classes"]
    splits = load_splits(manifest, resize_size(config.image_size), cache_dir, reporter,
                         cache_max_bytes=int(cache_max_gb * 1e9) if cache_max_gb else None)
    if len(splits["train"]) == 0 or len(splits["val"]) == 0:
        raise ValueError(f"the split has {len(splits['train'])} training and {len(splits['val'])} validation "
                         "images; add images or change the split ratios")

    model = create_model(config.model, len(classes), config.weights, config.dropout).to(device)
    model = model.to(memory_format=torch.channels_last)
    transform = BatchTransform(config.augment, config.image_size, IMAGENET_MEAN, IMAGENET_STD)
    started_with = recorded_balance(run_dir) if (run_dir / "last.pt").is_file() else None
    # a resumed run trains on as it began, whatever `auto` means in the code that resumes it
    balance = class_balance(config.replace(balance=started_with) if started_with else config,
                            splits["train"].labels, len(classes))
    weight = class_weights(balance["class_counts"]).to(device) if balance["balance"] == "weighted_loss" else None
    criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=config.label_smoothing)

    meta = {"classes": classes, "image_size": config.image_size, "mean": list(IMAGENET_MEAN),
            "std": list(IMAGENET_STD), "model_name": config.model, "config": config.to_dict(),
            "split_hash": manifest["split_hash"]}
    if manifest.get("skipped"):
        log.warning("%s: %d unreadable file(s) skipped, listed with reasons in %s", run_dir.name,
                    len(manifest["skipped"]), run_dir / "split.json")
    trainer = _Trainer(config, run_dir, model, splits, transform, criterion, device, amp_dtype, reporter, meta,
                       balance)
    trainer.resume()
    if config.time_budget and trainer.plan is None:
        trainer.plan_budget(config.time_budget * 60, started, len(splits["test"]))
    plan = {**balance, "budget": trainer.plan.to_dict() if trainer.plan else None}
    config_record = {**config.to_dict(), "env": environment_info(device), "split_hash": manifest["split_hash"],
                     "classes": classes, "plan": plan,
                     # which of the dataset's relabel/exclude fixes this run trained with (split.json lists them)
                     "overrides_sha256": (manifest.get("overrides") or {}).get("sha256")}
    write_json_atomic(run_dir / "config.json", config_record)
    # the count goes into the run's status (`best`); the files and reasons stay in split.json
    return {**trainer.run(started), "skipped_files": len(manifest.get("skipped", []))}


class _Trainer:
    """Holds the state of one `fit` call: stages, optimizer, checkpoints, history."""

    def __init__(self, config, run_dir, model, splits, transform, criterion, device, amp_dtype, reporter, meta,
                 balance):
        self.config, self.run_dir, self.model, self.splits = config, run_dir, model, splits
        self.transform, self.criterion, self.device, self.amp_dtype = transform, criterion, device, amp_dtype
        self.reporter, self.meta, self.balance = reporter, meta, balance
        # validation loss is the plain one: class weights are a training device, not what "val loss" means
        self.val_criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)
        self.num_classes = len(meta["classes"])
        self.select_by = balance["select_by"]
        self.mix = make_mix(config.mix, self.num_classes)
        self.spec = get_spec(config.model)
        self.epochs = config.epochs  # the budget mode's plan replaces it
        self.plan: BudgetPlan | None = None
        self.replan_live = False  # re-planning measures this process's clock, so not after a resume
        self.ema: torch.optim.swa_utils.AveragedModel | None = None
        self.history: list[dict] = []
        self.best_val_acc, self.best_score, self.best_epoch = -1.0, -1.0, 0
        self.start_epoch = 1
        self._resume_state: dict | None = None
        self._features: dict[str, torch.Tensor] = {}

    # ---- stages: which epochs train only the head on cached features, which train the network ----
    def stage_of(self, epoch: int) -> str:
        if self.config.finetune == "head":
            return "head"
        if self.config.finetune == "probe_then_unfreeze" and epoch <= self.config.probe_epochs:
            return "head"
        return "full"

    def stage_epochs(self, stage: str) -> tuple[int, int]:
        epochs = [e for e in range(1, self.epochs + 1) if self.stage_of(e) == stage]
        return (epochs[0], len(epochs)) if epochs else (0, 0)

    def train_sides(self, total: int) -> list[int]:
        """Each epoch's training side in a run of `total` epochs: progressive resizing over the whole-network
        epochs (off: image_size), image_size for the head-only ones (their features are of full-size crops)."""
        c = self.config
        full = [e for e in range(1, total + 1) if self.stage_of(e) == "full"]
        ramp = dict(zip(full, progressive_sizes(c.image_size, c.progressive_resize, len(full))))
        return [ramp.get(e, c.image_size) for e in range(1, total + 1)]

    def min_epochs(self) -> int:
        return self.config.probe_epochs + 1 if self.config.finetune == "probe_then_unfreeze" else 1

    def steps_per_epoch(self, stage: str) -> int:
        n, bs = len(self.splits["train"]), self.config.batch_size
        return math.ceil(n / bs) if stage == "head" else max(1, n // bs)

    def build_optimizer(self, stage: str) -> tuple[torch.optim.Optimizer, StepScheduler, int]:
        c = self.config
        if stage == "head":
            for p in self.spec.backbone_parameters(self.model):
                p.requires_grad_(False)
            groups = [{"params": self.spec.head_parameters(self.model), "lr": c.lr}]
        else:
            for p in self.model.parameters():
                p.requires_grad_(True)
            backbone_lr = c.lr * (c.backbone_lr_mult if c.finetune == "probe_then_unfreeze" else 1.0)
            groups = [{"params": self.spec.backbone_parameters(self.model), "lr": backbone_lr},
                      {"params": self.spec.head_parameters(self.model), "lr": c.lr}]
        steps_per_epoch = self.steps_per_epoch(stage)
        optimizer = make_optimizer(c, groups)
        _, n_epochs = self.stage_epochs(stage)
        warmup = min(c.warmup_epochs, max(n_epochs - 1, 0)) * steps_per_epoch
        scheduler = StepScheduler(optimizer, c.scheduler, n_epochs * steps_per_epoch, warmup)
        return optimizer, scheduler, steps_per_epoch

    # ---- the time budget ----
    def plan_budget(self, budget_s: float, started: float, n_test: int) -> None:
        """Time real steps (on a copy of the model), then fix the epoch count the budget allows."""
        c = self.config
        self.reporter.phase("timing steps")
        batches = []
        generator = torch.Generator().manual_seed(c.seed)
        while len(batches) < TIMED_STEPS + 1:
            batches += list(itertools.islice(
                iterate_batches(self.splits["train"], c.batch_size, self.device, shuffle=True, generator=generator),
                TIMED_STEPS + 1 - len(batches)))
        step_s, eval_image_s = time_steps(self.model, batches, self.transform, self.criterion, self.device, c.tta)
        small_step_s, sides = 0.0, None
        small = progressive_start(c.image_size, c.progressive_resize) if c.progressive_resize else c.image_size
        if small < c.image_size:  # smaller images make shorter epochs: time a step at the smallest side too
            small_step_s, _ = time_steps(self.model, batches, self.transform, self.criterion, self.device,
                                         train_size=small)
            sides = self.train_sides
        self.plan = make_plan(budget_s, time.monotonic() - started, step_s, eval_image_s,
                              steps_per_epoch=self.steps_per_epoch("full"), n_val=len(self.splits["val"]),
                              n_test=n_test, n_fit=min(len(self.splits["train"]), MAX_FIT_IMAGES),
                              max_epochs=MAX_EPOCHS, min_epochs=self.min_epochs(),
                              sides=sides, small_step_s=small_step_s)
        self.epochs = self.plan.planned_epochs
        self.replan_live = True

    def replan(self, epoch: int, started: float, stage: str, scheduler: StepScheduler, steps: int) -> None:
        if self.plan is None or not self.replan_live:
            return
        # as if at full size: an epoch on smaller images is expected to be shorter (progressive resizing)
        seconds = [r["seconds"] / self.plan.epoch_cost(r["image_size"]) for r in self.history
                   if r.get("stage") == "full"]
        total = replan(self.plan, epoch=epoch, elapsed_s=time.monotonic() - started, epoch_seconds=seconds,
                       min_epochs=self.min_epochs(), sides=self.train_sides)
        if total != self.epochs:
            self.epochs = total
            self.reporter.phase("training", epochs=total)  # the page's "epoch n/N" and ETA follow the new plan
            _, n_epochs = self.stage_epochs(stage)
            if n_epochs:
                scheduler.set_total_steps(n_epochs * steps)

    # ---- checkpoints ----
    def resume(self) -> None:
        last = self.run_dir / "last.pt"
        if not last.is_file():
            (self.run_dir / "metrics.jsonl").unlink(missing_ok=True)
            return
        state = load_checkpoint(last)
        self.model.load_state_dict(state["model"])
        if state.get("ema") is not None:
            self.ema = make_ema(self.model, self.config.ema_decay)
            self.ema.load_state_dict(state["ema"])
        if state.get("plan") is not None:  # the budget's plan as it stood; no new timing, no re-plan
            self.plan = BudgetPlan(**state["plan"])
            self.epochs = self.plan.planned_epochs
        self.history = list(state["history"])
        self.best_val_acc, self.best_epoch = state["best_val_acc"], state["best_epoch"]
        self.best_score = state.get("best_score", self.best_val_acc)
        self.start_epoch = state["epoch"] + 1
        self._resume_state = state
        # metrics.jsonl may hold a record written after last.pt (a crash between the two); keep what last.pt knows
        write_atomic(self.run_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in self.history))
        log.info("resuming %s at epoch %d", self.run_dir.name, self.start_epoch)

    def eval_model(self, stage: str) -> nn.Module:
        """What validation, best.pt and calibration see: the EMA of the weights when it is on."""
        return self.ema.module if self.ema is not None and stage == "full" else self.model

    def save(self, epoch: int, optimizer, scheduler, scaler, improved: bool) -> None:
        def cpu(module):
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}

        common = {**self.meta, "epoch": epoch}
        if improved:
            save_checkpoint({**common, "model": cpu(self.eval_model(self.stage_of(epoch))),
                             "val_acc": self.best_val_acc}, self.run_dir / "best.pt")
        save_checkpoint({**common, "model": cpu(self.model), "ema": cpu(self.ema) if self.ema is not None else None,
                         "val_acc": self.history[-1]["val_acc"], "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler else None,
                         "history": self.history, "best_val_acc": self.best_val_acc, "best_score": self.best_score,
                         "best_epoch": self.best_epoch, "stage": self.stage_of(epoch),
                         "plan": self.plan.to_dict() if self.plan else None},
                        self.run_dir / "last.pt")

    # ---- the loop ----
    def run(self, started: float) -> dict:
        c = self.config
        stopped_early = False
        optimizer = scheduler = None
        current_stage = None
        steps = 0
        scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.reporter.phase("training", epochs=self.epochs)
        epoch = self.start_epoch
        while epoch <= self.epochs:
            stage = self.stage_of(epoch)
            if stage != current_stage:
                optimizer, scheduler, steps = self.build_optimizer(stage)
                current_stage = stage
                state = self._resume_state
                if state is not None and state.get("stage") == stage:
                    optimizer.load_state_dict(state["optimizer"])
                    scheduler.load_state_dict(state["scheduler"])
                    if scaler is not None and state.get("scaler"):
                        scaler.load_state_dict(state["scaler"])
                self._resume_state = None
                if stage == "full" and c.ema_decay and self.ema is None:
                    self.ema = make_ema(self.model, c.ema_decay)
            seed_everything(c.seed * 1000 + epoch)
            generator = epoch_generator(c.seed, epoch)
            side = self.train_sides(self.epochs)[epoch - 1]
            last = self.history[-1] if self.history else {}
            if last.get("stage") == stage and last.get("image_size"):
                side = max(side, last["image_size"])  # a re-plan that lengthened the ramp never shrinks the images
            start = time.perf_counter()
            if stage == "head":
                train_stats, val_stats = self.head_epoch(epoch, optimizer, scheduler, generator)
            else:
                train_stats, val_stats = self.full_epoch(epoch, optimizer, scheduler, scaler, generator, steps, side)
            scheduler.step_epoch(val_stats["loss"])
            record = {
                "epoch": epoch, "stage": stage, "image_size": side,  # the training side; validation: image_size
                "train_loss": train_stats["train_loss"], "train_acc": train_stats["train_acc"],
                "val_loss": val_stats["loss"], "val_acc": val_stats["acc"],
                "val_macro_f1": val_stats["macro_f1"],
                "val_recall": dict(zip(self.meta["classes"], val_stats["recall"])),  # per class, by name
                "lr": max(g["lr"] for g in optimizer.param_groups),
                "images_per_s": train_stats["images_per_s"], "seconds": time.perf_counter() - start,
            }
            self.history.append(record)
            improved = record[self.select_by] > self.best_score
            if improved:
                self.best_score, self.best_val_acc, self.best_epoch = record[self.select_by], record["val_acc"], epoch
            self.replan(epoch, started, stage, scheduler, steps)
            self.save(epoch, optimizer, scheduler, scaler, improved)
            with open(self.run_dir / "metrics.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")
            self.reporter.epoch(record)
            if c.patience and epoch - self.best_epoch >= c.patience:
                stopped_early = True
                log.info("early stop at epoch %d (best %d)", epoch, self.best_epoch)
                break
            epoch += 1
        self._features.clear()
        best_model = self.best_model()
        calibration = self.calibrate(best_model)
        feature_distance = self.fit_feature_distance(best_model)
        last = self.history[-1] if self.history else {}
        result = {"best_val_acc": self.best_val_acc, "best_epoch": self.best_epoch, "epochs_run": len(self.history),
                  "stopped_early": stopped_early, "final_train_loss": last.get("train_loss"),
                  "final_val_loss": last.get("val_loss"), "images_per_s": last.get("images_per_s"),
                  "select_by": self.select_by, "balance": self.balance["balance"],
                  "calibration": {k: getattr(calibration, k) for k in ("temperature", "threshold", "ece_before",
                                                                        "ece_after")},
                  "feature_distance": feature_distance}
        if self.plan is not None:
            result["budget"] = {**self.plan.to_dict(), "seconds_used": round(time.monotonic() - started, 1)}
        return result

    def best_model(self) -> nn.Module:
        """A copy of the model with best.pt's weights: what calibration and the feature distance are fitted to."""
        model = copy.deepcopy(self.model)
        model.load_state_dict(load_checkpoint(self.run_dir / "best.pt")["model"])
        return model

    def calibrate(self, model: nn.Module) -> Calibration:
        """Temperature and "not sure" threshold of best.pt (`model`) on the validation split → calibration.json."""
        self.reporter.phase("calibrating")
        stats = evaluate(model, iterate_batches(self.splits["val"], self.config.batch_size * 2, self.device,
                                                shuffle=False),
                         self.transform, self.val_criterion, self.device, amp_dtype=self.amp_dtype,
                         tta=self.config.tta, keep_logits=True)
        calibration = calibrate(stats["logits"], stats["labels"], self.config.target_precision)
        write_calibration(self.run_dir, calibration)
        log.info("%s calibrated: T=%.3f, ECE %.3f → %.3f, threshold %.3f", self.run_dir.name,
                 calibration.temperature, calibration.ece_before, calibration.ece_after, calibration.threshold)
        return calibration

    def fit_feature_distance(self, model: nn.Module) -> dict:
        """How far from the training images best.pt's features may be and still be answered → feature_distance.npz
        (shared/analysis/feature_distance.py). What happened, for the run's result: the limit, or why there is
        none (too little validation, features too wide, or the fit failed: the trained model is kept either way,
        it answers without this check, and the log and the result say why)."""
        n_val = len(self.splits["val"])
        why = (f"{n_val} validation images, it needs {MIN_VAL_IMAGES}" if n_val < MIN_VAL_IMAGES else
               f"{self.spec.feature_size} features, it handles up to {MAX_FEATURE_SIZE}"
               if self.spec.feature_size > MAX_FEATURE_SIZE else None)
        if why is None:
            try:
                fitted = self._fit_feature_distance(model)
                return {"threshold": round(fitted.threshold, 4), "quantile": fitted.quantile, "n_fit": fitted.n_fit}
            except Cancelled:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed fit must not fail a trained run
                why = f"the fit failed ({type(exc).__name__}: {str(exc)[:200]})"
        (self.run_dir / DISTANCE_FILE).unlink(missing_ok=True)  # an earlier attempt's would not fit this best.pt
        log.warning("%s: no feature-distance check: %s", self.run_dir.name, why)
        return {"skipped": why}

    def _fit_feature_distance(self, model: nn.Module) -> FeatureDistance:
        train = self.splits["train"]
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.config.seed))
        order = order[:MAX_FIT_IMAGES].sort().values
        backbone, batch = Backbone(model, self.spec), self.config.batch_size * 2
        features = {name: extract_features(backbone, self.splits[name], self.transform, self.device, batch,
                                           self.amp_dtype, self.reporter, order=chosen).cpu().double().numpy()
                    for name, chosen in (("train", order), ("val", None))}
        fitted = fit_feature_distance(features["train"], train.labels[order].numpy(), features["val"])
        write_feature_distance(self.run_dir, fitted)
        log.info("%s: feature distance fitted on %d training images, threshold %.2f (%.1f%% of validation)",
                 self.run_dir.name, fitted.n_fit, fitted.threshold, 100 * fitted.quantile)
        return fitted

    def train_order(self, generator: torch.Generator) -> torch.Tensor | None:
        """The balanced sampler's draw for one epoch (with replacement, each class equally likely), else None."""
        if self.balance["balance"] != "sampler":
            return None
        labels = self.splits["train"].labels
        counts = torch.bincount(labels, minlength=self.num_classes).float().clamp(min=1)
        return torch.multinomial(1.0 / counts[labels], len(labels), replacement=True, generator=generator)

    def full_epoch(self, epoch, optimizer, scheduler, scaler, generator, steps, side):
        c = self.config
        batches = iterate_batches(self.splits["train"], c.batch_size, self.device, shuffle=True,
                                  generator=generator, drop_last=len(self.splits["train"]) > c.batch_size,
                                  order=self.train_order(generator))
        after_step = (lambda: self.ema.update_parameters(self.model)) if self.ema is not None else None
        train_stats = train_one_epoch(
            self.model, batches, self.transform, optimizer, scheduler, self.criterion, self.device,
            epoch=epoch, num_batches=steps, reporter=self.reporter, generator=generator, scaler=scaler,
            amp_dtype=self.amp_dtype, grad_clip=c.grad_clip, mix=self.mix, after_step=after_step, size=side)
        val_stats = evaluate(self.eval_model("full"),
                             iterate_batches(self.splits["val"], c.batch_size * 2, self.device, shuffle=False),
                             self.transform, self.val_criterion, self.device, amp_dtype=self.amp_dtype, tta=c.tta,
                             num_classes=self.num_classes)
        return train_stats, val_stats

    def head_epoch(self, epoch, optimizer, scheduler, generator):
        """Linear probe on features computed once: the frozen backbone never runs twice on the same image.
        (Flip TTA does not apply here: the features are of the centre crops.)"""
        c = self.config
        if not self._features:
            backbone = Backbone(self.model, self.spec)
            for name in ("train", "val"):
                self.reporter.phase("extracting features", split=name)
                self._features[name] = extract_features(backbone, self.splits[name], self.transform, self.device,
                                                        c.batch_size * 2, self.amp_dtype, self.reporter)
            self.reporter.phase("training", epochs=self.epochs)
        head = self.spec.head_of(self.model)
        feats, labels = self._features["train"], self.splits["train"].labels.to(self.device)
        n = len(labels)
        steps = math.ceil(n / c.batch_size)
        order = self.train_order(generator)
        order = (torch.randperm(n, generator=generator) if order is None else order).to(self.device)
        head.train()
        start = time.perf_counter()
        total_loss, correct = 0.0, 0
        for i in range(steps):
            if self.reporter.should_stop():
                raise Cancelled()
            idx = order[i * c.batch_size:(i + 1) * c.batch_size]
            logits = head(feats[idx])
            loss = self.criterion(logits, labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step_batch()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == labels[idx]).sum().item()
            self.reporter.batch(epoch, i + 1, steps, (i + 1) * c.batch_size / max(time.perf_counter() - start, 1e-9))
        seconds = time.perf_counter() - start
        head.eval()
        with torch.no_grad():
            val_labels = self.splits["val"].labels.to(self.device)
            val_logits = head(self._features["val"])
            val_stats = {"loss": self.val_criterion(val_logits, val_labels).item(),
                         "acc": (val_logits.argmax(1) == val_labels).float().mean().item(),
                         **class_scores(val_logits, val_labels, self.num_classes)}
        return ({"train_loss": total_loss / n, "train_acc": correct / n, "images_per_s": n / max(seconds, 1e-9)},
                val_stats)
