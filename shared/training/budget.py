"""Training for a time budget: time a few real steps, pick the epoch count so the whole schedule fits, re-plan
when the machine turns out slower (and back up to the first plan when a slow spell passes).

The clock starts when `fit` starts, so building the decoded-image cache counts against the budget. What is left
after the measured epochs is kept for what follows training: calibration (one validation pass) and the evaluation
of the test split that the CLI and the worker run afterwards (`RESERVE_*` below). A run always trains at least one
epoch, so it always ends with an evaluated best checkpoint, even when the budget is too small for that.

With progressive resizing the early epochs train on smaller images, so they are shorter: a step is timed at the
smallest side too, a step in between is interpolated in pixels, and the plan counts each epoch at its own cost
(`BudgetPlan.epoch_cost`); the re-plan compares measured epochs with what their side was expected to cost.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)

# steps timed before planning: the first is a warm-up (allocations, kernel choice) and is not counted
TIMED_STEPS = 3
# after training: calibration is one validation pass (with TTA when on) and the feature-distance fit one more
# over validation and up to 4,096 training images (`n_fit`); the test evaluation reads and decodes every image
# again and draws figures, measured at ~3x a bare forward pass on flower_photos
RESERVE_VAL_PASSES = 2.0
RESERVE_TEST_PASSES = 3.0
# plus this share of the budget for what the estimate misses (checkpoint writes, the t-SNE of the evaluation)
RESERVE_SHARE = 0.03
# a re-plan paces the epochs left by the mean of the last few measured ones: one slow epoch (the first, or a moment
# when something else ran) must not cut the run for good (a 30-minute run on flower_photos lost 3 of 35 epochs, 191 s
# of its budget unused, to two slow first epochs when a re-plan read only the last two and never went back up)
REPLAN_WINDOW = 3
# a re-plan lengthens the run only when the extra epochs fit with this share of an epoch to spare: pacing near the
# plan must not flip the total (and the cosine's end) back and forth from one epoch to the next
LENGTHEN_MARGIN = 0.5


@dataclass
class BudgetPlan:
    """What the budget mode chose, recorded in config.json (`plan`) and the run's status (`best.budget`)."""

    budget_s: float
    setup_s: float  # split, cache and the timing steps, before the first epoch
    step_s: float  # one training step, measured
    eval_image_s: float  # one image through evaluation, measured
    epoch_s: float  # estimated (then measured) seconds per epoch at full size, training and validation
    reserve_s: float  # kept for calibration and the test evaluation after training
    planned_epochs: int
    replans: list[dict] = field(default_factory=list)
    # what the timed steps first chose: a re-plan may come back up to it after a slow spell, never go beyond it
    first_planned: int = 0
    train_share: float = 1.0  # of epoch_s, the training steps' share (what smaller images make shorter)
    # progressive resizing: the full and the smallest training side, and one step at the smallest, measured
    # (small_side 0: every epoch trains at full size)
    full_side: int = 0
    small_side: int = 0
    small_step_s: float = 0.0

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}

    def epoch_cost(self, side: int) -> float:
        """An epoch training at `side`, relative to one at full size (validation is always at full size). The
        step time is interpolated in pixels between the two timed sides: convolutions cost in proportion to the
        area, plus what does not shrink (which the timed small step includes)."""
        if not self.small_side or side >= self.full_side or self.step_s <= 0:
            return 1.0
        small = min(1.0, self.small_step_s / self.step_s)
        area = max(0.0, (side ** 2 - self.small_side ** 2) / max(self.full_side ** 2 - self.small_side ** 2, 1))
        return 1 - self.train_share + self.train_share * (small + (1 - small) * area)

    def costs(self, sides: Callable[[int], list[int]] | None) -> Callable[[int], list[float]] | None:
        """`sides(n)` (each epoch's training side in a run of n epochs) → each epoch's cost in such a run."""
        if sides is None or not self.small_side:
            return None
        return lambda n: [self.epoch_cost(side) for side in sides(n)]


def epochs_that_fit(seconds_left: float, epoch_s: float, max_epochs: int, min_epochs: int = 1,
                    costs: Callable[[int], list[float]] | None = None) -> int:
    """How many whole epochs of `epoch_s` fit in `seconds_left`, between min_epochs and max_epochs; with
    `costs(n)` (each epoch's share of epoch_s in a run of n epochs, at most 1) the cheaper epochs count as such."""
    if epoch_s <= 0:
        return max_epochs
    n = int(min(max_epochs, max(min_epochs, math.floor(seconds_left / epoch_s))))
    if costs is None:
        return n
    # every cost is <= 1, so the plain count fits: look for more
    return _largest(n, max_epochs, lambda m: epoch_s * sum(costs(m)) <= seconds_left)


def _largest(low: int, high: int, fits: Callable[[int], bool]) -> int:
    """The largest n in [low, high] that fits, `low` when none does (a binary search: a longer run costs more)."""
    while low < high:
        mid = (low + high + 1) // 2
        if fits(mid):
            low = mid
        else:
            high = mid - 1
    return low


@torch.no_grad()
def _time_eval(model, images, transform, device, tta: bool) -> float:
    model.eval()
    start = time.perf_counter()
    x = transform(images, train=False)
    model(x)
    if tta:
        model(x.flip(3))
    return (time.perf_counter() - start) / max(len(images), 1)


def time_steps(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], transform, criterion,
               device, tta: bool = False, train_size: int | None = None) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluated image), measured on a copy of the model so the run's own
    weights and optimizer state are untouched. `batches`: TIMED_STEPS + 1 real training batches; `train_size`:
    the training side (progressive resizing), image_size when None."""
    probe = copy.deepcopy(model).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=0.0)  # forward + backward + a step, changing nothing
    probe.train()
    times = []
    for images, labels in batches:
        start = time.perf_counter()
        inputs = transform(images, train=True, size=train_size).contiguous(memory_format=torch.channels_last)
        loss = criterion(probe(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    step_s = sum(times[1:]) / max(len(times) - 1, 1) if len(times) > 1 else times[0]
    eval_image_s = _time_eval(probe, batches[0][0], transform, device, tta)
    del probe, optimizer
    return step_s, eval_image_s


def make_plan(budget_s: float, elapsed_s: float, step_s: float, eval_image_s: float, *, steps_per_epoch: int,
              n_val: int, n_test: int, max_epochs: int, min_epochs: int = 1, n_fit: int = 0,
              sides: Callable[[int], list[int]] | None = None, small_step_s: float = 0.0) -> BudgetPlan:
    """The epoch count whose training, validation and the reserved after-work fit in what is left of the budget.

    Progressive resizing: `sides(n)` gives each epoch's training side in a run of n epochs, `small_step_s` one step
    timed at the smallest of them; the smaller epochs then count at their cost."""
    train_s = steps_per_epoch * step_s
    epoch_s = train_s + n_val * eval_image_s
    reserve_s = ((RESERVE_VAL_PASSES * n_val + n_fit + RESERVE_TEST_PASSES * n_test) * eval_image_s
                 + RESERVE_SHARE * budget_s)
    plan = BudgetPlan(budget_s=budget_s, setup_s=elapsed_s, step_s=step_s, eval_image_s=eval_image_s,
                      epoch_s=epoch_s, reserve_s=reserve_s, planned_epochs=0,
                      train_share=train_s / epoch_s if epoch_s > 0 else 1.0)
    if sides is not None:
        every = sides(max_epochs)
        plan.full_side, plan.small_side, plan.small_step_s = max(every), min(every), small_step_s
    plan.planned_epochs = plan.first_planned = epochs_that_fit(budget_s - elapsed_s - reserve_s, epoch_s,
                                                               max_epochs, min_epochs, plan.costs(sides))
    log.info("time budget %.0f s: %.1f s used before training, ~%.1f s per full-size epoch, %.0f s reserved → %d "
             "epochs", budget_s, elapsed_s, epoch_s, reserve_s, plan.planned_epochs)
    return plan


def replan(plan: BudgetPlan, *, epoch: int, elapsed_s: float, epoch_seconds: list[float], min_epochs: int,
           sides: Callable[[int], list[int]] | None = None) -> int:
    """After `epoch`: the total epoch count that fits what is left at the pace of the last REPLAN_WINDOW epochs.
    Slower than planned: a shorter schedule is re-fitted (the cosine reads its total at every step). Faster again,
    after a slow spell: back up, but never beyond the first plan (`first_planned`): more epochs than the timed steps
    chose would stretch a schedule that was sized for them.

    `epoch_seconds`: the measured epochs, each divided by its `plan.epoch_cost` (seconds at full size); `sides`
    as for `make_plan`: the epochs left count at their cost."""
    if not epoch_seconds:
        return plan.planned_epochs
    recent = epoch_seconds[-REPLAN_WINDOW:]
    measured = sum(recent) / len(recent)
    ceiling = plan.first_planned or plan.planned_epochs  # a plan saved before first_planned existed: its count
    left = plan.budget_s - elapsed_s - plan.reserve_s
    costs = plan.costs(sides)

    def fits(n: int) -> bool:
        """The epochs after this one of an n-epoch run (with progressive resizing, each at its side's cost) fit in
        what is left; a run longer than the current plan must leave LENGTHEN_MARGIN of an epoch to spare."""
        after = measured * (sum(costs(n)[epoch:]) if costs else n - epoch)
        return after + (LENGTHEN_MARGIN * measured if n > plan.planned_epochs else 0) <= left

    total = max(_largest(epoch, ceiling, fits), epoch, min_epochs)  # fits only gets harder as n grows
    if total != plan.planned_epochs:
        plan.replans.append({"after_epoch": epoch, "epoch_s": round(measured, 3), "planned_epochs": total})
        log.info("%s than planned (%.1f s per epoch): %d epochs instead of %d",
                 "slower" if total < plan.planned_epochs else "faster again", measured, total, plan.planned_epochs)
        plan.planned_epochs = total
        plan.epoch_s = measured
    return plan.planned_epochs
