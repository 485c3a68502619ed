"""Learning-rate range test (Smith 2017, arXiv:1506.01186; fastai's `lr_find`): train a fresh model for a
fraction of an epoch while the learning rate grows exponentially, watch the loss, and suggest a rate.

The suggestion is the rate at the lowest smoothed loss (`RULE`). bench/bench_lr_find.py scored four rules read
off the same range tests against a 5-rate grid of real 3-epoch runs on two datasets (BENCHMARKS §11): the minimum
landed 1.1x and 1.4x from the grid's best, fastai's classic minimum/10 9.5x and 13.9x below it, fastai's valley and
Smith's steepest descent further still. Every rule's rate is recorded beside the suggestion. The range test costs
well under half an epoch of compute (`STEPS_SHARE`).

The page's range tests are saved by `shared.training.lr_result`.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from shared.training.config import TrainConfig

log = logging.getLogger(__name__)

START_LR, END_LR = 1e-5, 1.0
# steps of the test: this share of an epoch, at least MIN_STEPS (a tiny dataset), at most MAX_STEPS
STEPS_SHARE = 0.45
MIN_STEPS, MAX_STEPS = 30, 100
SMOOTHING = 0.9  # exponential moving average of the loss, bias-corrected
DIVERGED = 4.0  # stop once the smoothed loss is this many times its minimum


def minimum_over_10(lrs: list[float], losses: list[float]) -> float:
    """fastai's classic rule: at the lowest smoothed loss training is about to diverge; a decade lower still learns
    fast."""
    return minimum(lrs, losses) / 10


def valley(lrs: list[float], losses: list[float]) -> float:
    """fastai's default since 2.5 (`valley`): the longest stretch over which the loss keeps falling, and the point
    half-way along it (1/3 + 1/6 of its length, as fastai's `lr_find`; written out: fastai is not a dependency)."""
    n = len(losses)
    run = [1] * n  # length of the longest decreasing subsequence ending at i
    end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[end]:
            end = i
    start = end - run[end]
    section = (end - start) / 3
    return lrs[max(0, min(n - 1, start + int(section) + int(section / 2)))]


def steepest(lrs: list[float], losses: list[float]) -> float:
    """Smith's rule: where the loss falls fastest against log(lr)."""
    if len(losses) < 3:
        return lrs[0]
    return lrs[int(np.argmin(np.gradient(np.asarray(losses), np.log(np.asarray(lrs)))))]


def minimum(lrs: list[float], losses: list[float]) -> float:
    """The lowest smoothed loss itself: the smoothing lags the raw loss, so the raw loss is still falling there."""
    return lrs[int(np.argmin(losses))]


# Rules that read a suggestion off one range test; bench/bench_lr_find.py scores each against a grid of real runs.
SUGGESTION_RULES: dict[str, Callable[[list[float], list[float]], float]] = {
    "minimum/10": minimum_over_10, "valley": valley, "steepest": steepest, "minimum": minimum}
RULE = "minimum"  # the one the suggestion uses: closest to the grid's best in bench_lr_find (see the docstring)


def suggest_lr(lrs: list[float], losses: list[float], rule: str = RULE) -> float:
    """The suggested rate of a range test (losses smoothed, as `range_test` records them), by `rule`."""
    if not losses:
        raise ValueError("the range test recorded no losses")
    return float(SUGGESTION_RULES[rule](lrs, losses))


def range_test(model: nn.Module, batches, transform, criterion, optimizer: torch.optim.Optimizer, steps: int, *,
               start_lr: float = START_LR, end_lr: float = END_LR, generator=None,
               progress: Callable[[int, int], None] | None = None) -> dict:
    """Train `model` for up to `steps` batches while the lr grows from start_lr to end_lr; stops early when the
    loss diverges. Returns {lrs, losses (smoothed), raw_losses}."""
    factor = (end_lr / start_lr) ** (1 / max(steps - 1, 1))
    lrs, losses, raw = [], [], []
    average, best = 0.0, math.inf
    model.train()
    for i, (images, labels) in enumerate(batches):
        if i >= steps:
            break
        lr = start_lr * factor ** i
        for group in optimizer.param_groups:
            group["lr"] = lr
        inputs = transform(images, train=True, generator=generator).contiguous(memory_format=torch.channels_last)
        loss = criterion(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        if not math.isfinite(value):
            break
        average = SMOOTHING * average + (1 - SMOOTHING) * value
        smoothed = average / (1 - SMOOTHING ** (i + 1))
        lrs.append(lr)
        losses.append(smoothed)
        raw.append(value)
        best = min(best, smoothed)
        if progress is not None:
            progress(i + 1, steps)
        if i > 2 and smoothed > DIVERGED * best:
            break
    return {"lrs": lrs, "losses": losses, "raw_losses": raw}


def lr_find(config: TrainConfig, cache_dir: Path, *, plot_path: Path | None = None,
            data_roots: Sequence[Path] | None = None, cache_max_gb: float | None = None,
            progress: Callable[[int, int], None] | None = None) -> dict:
    """The range test on `config`'s data, model and optimizer (its lr is ignored). Returns {suggestion, lrs,
    losses, steps, steps_per_epoch, seconds}; with `plot_path`, a PNG of loss against lr is written there.
    `data_roots` and `cache_max_gb` as for `fit` (the worker's); `progress(step, steps)` after each step."""
    from shared.data.split import make_split
    from shared.data.transforms import BatchTransform, resize_size
    from shared.training.engine import (Reporter, epoch_generator, iterate_batches, load_splits, make_optimizer,
                                        pick_device, seed_everything)
    from shared.training.models import IMAGENET_MEAN, IMAGENET_STD, create_model, get_spec

    started = time.perf_counter()
    device = pick_device(config.device)
    seed_everything(config.seed)
    manifest = make_split(config.data_dir, ratios=config.ratios, seed=config.seed, link_roots=data_roots)
    splits = load_splits(manifest, resize_size(config.image_size), Path(cache_dir), Reporter(),
                         cache_max_bytes=int(cache_max_gb * 1e9) if cache_max_gb else None)
    train = splits["train"]
    if len(train) == 0:
        raise ValueError("the training split is empty: add images or change the split ratios")
    steps_per_epoch = max(1, len(train) // config.batch_size)
    steps = int(min(MAX_STEPS, max(MIN_STEPS, STEPS_SHARE * steps_per_epoch)))
    model = create_model(config.model, len(manifest["classes"]), config.weights, config.dropout).to(device)
    model = model.to(memory_format=torch.channels_last)
    spec = get_spec(config.model)
    optimizer = make_optimizer(config, [{"params": spec.backbone_parameters(model), "lr": START_LR},
                                        {"params": spec.head_parameters(model), "lr": START_LR}])
    transform = BatchTransform(config.augment, config.image_size, IMAGENET_MEAN, IMAGENET_STD)
    criterion = nn.CrossEntropyLoss(label_smoothing=config.label_smoothing)

    def batches():  # as many passes as the steps need (a tiny dataset has fewer batches than MIN_STEPS)
        epoch = 0
        while True:
            epoch += 1
            yield from iterate_batches(train, config.batch_size, device, shuffle=True,
                                       generator=epoch_generator(config.seed, epoch),
                                       drop_last=len(train) > config.batch_size)

    result = range_test(model, batches(), transform, criterion, optimizer, steps,
                        generator=epoch_generator(config.seed, 0), progress=progress)
    by_rule = {rule: suggest_lr(result["lrs"], result["losses"], rule) for rule in SUGGESTION_RULES}
    result.update(suggestion=by_rule[RULE], rule=RULE, by_rule=by_rule, steps=len(result["lrs"]),
                  steps_per_epoch=steps_per_epoch, seconds=round(time.perf_counter() - started, 2))
    if plot_path is not None:
        plot_range_test(result, Path(plot_path))
    log.info("lr range test: %d steps (%.2f of an epoch), suggestion %.2g", result["steps"],
             result["steps"] / steps_per_epoch, result["suggestion"])
    return result


def plot_range_test(result: dict, path: Path) -> Path:
    """Loss against learning rate (log scale), the suggestion marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from shared.fsutil import atomic_path

    fig = Figure(figsize=(6, 4), layout="constrained")
    FigureCanvasAgg(fig)  # no pyplot: no global state, no GUI backend
    ax = fig.subplots()
    ax.plot(result["lrs"], result["losses"], label="smoothed loss")
    ax.axvline(result["suggestion"], color="tab:red", linestyle="--", label=f"suggested {result['suggestion']:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.legend()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
