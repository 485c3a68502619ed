"""Training for a time budget: the plan, the re-plan when the machine is slower, and a run that always ends with an
evaluated best checkpoint. (How good a model the budget buys is a benchmark: bench/bench_budget.py.)"""

from __future__ import annotations

import json

import pytest
import torch

from shared.runs.store import RunStore, read_metrics
from shared.training import engine
from shared.training.budget import epochs_that_fit, make_plan, replan
from shared.training.config import ConfigError, TrainConfig
from shared.training.engine import StepScheduler, fit
from tests.imagegen import make_image_folder
from tests.tiny import TINY_TRAIN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_plan_fits_training_validation_and_the_reserve_inside_the_budget():
    plan = make_plan(600, elapsed_s=60, step_s=0.5, eval_image_s=0.01, steps_per_epoch=100, n_val=500, n_test=500,
                     n_fit=300, max_epochs=1000)
    assert plan.epoch_s == pytest.approx(55)  # 100 steps x 0.5 s + 500 images x 0.01 s
    # calibration's and the feature distance's val passes, its 300 training images, 3 test passes, 3% of the budget
    assert plan.reserve_s == pytest.approx(10 + 3 + 15 + 18)
    assert plan.planned_epochs == 8  # (600 - 60 - 46) / 55 = 8.98
    assert epochs_that_fit(1, 100, 50) == 1  # never less than one epoch: a run always has a best checkpoint
    assert epochs_that_fit(1e6, 1, 50) == 50


def test_replan_shortens_the_run_when_epochs_are_slower_and_lengthens_it_back_when_they_are_not():
    plan = make_plan(600, 0, step_s=0.5, eval_image_s=0, steps_per_epoch=100, n_val=0, n_test=0, max_epochs=100)
    assert plan.planned_epochs == 11
    # epoch 1 took 100 s instead of 50: 482 s left for whole epochs of 100 s
    assert replan(plan, epoch=1, elapsed_s=100, epoch_seconds=[100.0], min_epochs=1) == 5
    assert plan.replans == [{"after_epoch": 1, "epoch_s": 100.0, "planned_epochs": 5}]
    # the slow spell passes: epochs at 50 s again (the last three: 100, 50, 50 → 66.7 s; then 50 s) win back the
    # epochs that still fit (the slow one cost one), up to what the timed steps first chose and never beyond it
    assert replan(plan, epoch=3, elapsed_s=200, epoch_seconds=[100.0, 50.0, 50.0], min_epochs=1) == 8  # 382/66.7
    assert replan(plan, epoch=4, elapsed_s=250, epoch_seconds=[100.0, 50.0, 50.0, 50.0], min_epochs=1) == 10
    assert replan(plan, epoch=5, elapsed_s=260, epoch_seconds=[100.0, 50.0, 50.0, 50.0, 10.0], min_epochs=1) == 11
    assert [r["planned_epochs"] for r in plan.replans] == [5, 8, 10, 11] and plan.first_planned == 11


def test_replan_lengthens_only_with_room_to_spare():
    plan = make_plan(600, 0, step_s=0.5, eval_image_s=0, steps_per_epoch=100, n_val=0, n_test=0, max_epochs=100)
    assert replan(plan, epoch=1, elapsed_s=60, epoch_seconds=[60.0], min_epochs=1) == 9  # 522 s left / 60
    # at 56 s an epoch, 10 epochs would fit with 22 s to spare: under half an epoch, so the total does not flip
    assert replan(plan, epoch=2, elapsed_s=112, epoch_seconds=[60.0, 52.0], min_epochs=1) == 9
    assert len(plan.replans) == 1


def test_progressive_resizing_plans_its_smaller_epochs_at_their_cost_and_replans_by_them():
    from shared.data.transforms import progressive_sizes

    def sides(n):
        return progressive_sizes(128, 0.5, n)  # 64 px first, 128 px from 3/4 of the epochs on

    common = dict(step_s=0.5, eval_image_s=0.01, steps_per_epoch=100, n_val=100, n_test=0, max_epochs=100)
    plain = make_plan(600, 0, **common)
    plan = make_plan(600, 0, **common, sides=sides, small_step_s=0.125)  # a step at 64 px: a quarter of one at 128
    assert plan.epoch_s == plain.epoch_s == pytest.approx(51) and plain.planned_epochs == 11  # (600 - 19) / 51
    assert plan.epoch_cost(128) == 1 and plan.epoch_cost(64) == pytest.approx((1 + 50 * 0.25) / 51)  # val: 128 px
    left = 600 - plan.reserve_s
    n = plan.planned_epochs

    def cost(total):
        return [plan.epoch_cost(side) for side in sides(total)]

    assert n > plain.planned_epochs and 51 * sum(cost(n)) <= left < 51 * sum(cost(n + 1))
    # epochs as fast as their side predicts: the plan stands (seconds are passed as if at full size)
    first = 51 * cost(n)[0]
    assert replan(plan, epoch=1, elapsed_s=first, epoch_seconds=[51.0], min_epochs=1, sides=sides) == n
    # twice as slow: the longest shorter run whose remaining epochs, at their sides, fit what is left
    elapsed = 2 * 51 * (cost(n)[0] + cost(n)[1])
    total = replan(plan, epoch=2, elapsed_s=elapsed, epoch_seconds=[102.0, 102.0], min_epochs=1, sides=sides)
    assert 2 < total < n and plan.epoch_s == 102
    assert 102 * sum(cost(total)[2:]) <= left - elapsed < 102 * sum(cost(total + 1)[2:])


@pytest.mark.parametrize("kind", ["cosine", "onecycle"])
def test_a_shortened_schedule_still_ends_at_its_lowest_rate(kind):
    param = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.SGD([param], lr=0.1)
    scheduler = StepScheduler(optimizer, kind, total_steps=100, warmup_steps=5)
    for _ in range(20):
        optimizer.step()
        scheduler.step_batch()
    scheduler.set_total_steps(40)
    for _ in range(19):
        optimizer.step()
        scheduler.step_batch()
    assert optimizer.param_groups[0]["lr"] < 0.1 * 0.02, optimizer.param_groups[0]["lr"]


def test_time_budget_is_validated():
    with pytest.raises(ConfigError, match="time_budget must be between 0"):
        TrainConfig(data_dir="x", time_budget=-1)
    with pytest.raises(ConfigError, match="time_budget"):
        TrainConfig(data_dir="x", time_budget=float("nan"))
    with pytest.raises(ConfigError, match="time_budget"):
        TrainConfig(data_dir="x", time_budget=10**6)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("budget") / "data", classes=2, per_class=12, size=40)


@pytest.mark.slow  # trains for its 3-second budget
def test_a_slower_machine_is_replanned_and_the_run_ends_evaluated(tmp_path, dataset, monkeypatch):
    # the timing steps report a machine 1000x faster than this one: the plan asks for the maximum of epochs,
    # and the first measured epoch must bring it down to what is left of a 3-second budget
    monkeypatch.setattr(engine, "time_steps", lambda *args, **kwargs: (1e-6, 1e-7))
    config = TrainConfig(data_dir=str(dataset), **{**TINY_TRAIN, "time_budget": 0.05, "epochs": 1})
    store = RunStore(tmp_path / "models")
    run_dir = store.path(store.create(config))
    result = fit(config, run_dir, cache_dir=tmp_path / "cache")
    budget = result["budget"]
    assert budget["replans"] and budget["replans"][0]["after_epoch"] == 1
    assert result["epochs_run"] == budget["planned_epochs"] < 1000
    assert len(read_metrics(run_dir)) == result["epochs_run"]
    for name in ("best.pt", "calibration.json"):
        assert (run_dir / name).is_file(), name
    recorded = json.loads((run_dir / "config.json").read_text())
    assert recorded["time_budget"] == 0.05 and recorded["plan"]["budget"]["planned_epochs"] >= 1
    assert store.config(run_dir.name).time_budget == 0.05  # the record still reads back as a TrainConfig


def test_steps_are_timed_on_a_copy_leaving_the_runs_weights_alone():
    from shared.data.transforms import BatchTransform
    from shared.training.budget import time_steps
    from shared.training.models import IMAGENET_MEAN, IMAGENET_STD, create_model
    from tests.tinymodel import register_tiny_resnet

    model = create_model(register_tiny_resnet().name, 3).to(memory_format=torch.channels_last)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = [(torch.randint(0, 255, (4, 3, 36, 36), dtype=torch.uint8), torch.tensor([0, 1, 2, 0]))] * 4
    step_s, eval_image_s = time_steps(model, batches, BatchTransform("standard", 32, IMAGENET_MEAN, IMAGENET_STD),
                                      torch.nn.CrossEntropyLoss(), torch.device("cpu"), tta=True)
    assert step_s > 0 and eval_image_s > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
