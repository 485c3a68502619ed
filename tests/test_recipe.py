"""The recipe options of issue 15 at a tiny size: class imbalance, EMA of the weights, flip TTA, mixup/cutmix,
progressive resizing and the learning-rate finder. (Whether they make a better model is a benchmark:
bench/bench_budget.py, bench/bench_imbalance.py, bench/bench_lr_find.py.)"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.runs.store import RunStore, read_metrics
from shared.training.checkpoint import load_checkpoint
from shared.training.config import BUDGET_PROGRESSIVE_RESIZE, ConfigError, TrainConfig
from shared.training.engine import class_balance, fit
from tests.imagegen import make_image_folder
from tests.tiny import TINY_TRAIN

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def skewed(tmp_path_factory):
    """24 : 6 : 6 images: the largest class has 4x the smallest."""
    return make_image_folder(tmp_path_factory.mktemp("skew") / "data", classes=3, per_class=[24, 6, 6], size=40)


def tiny_run(tmp_path, data, **changes):
    config = TrainConfig(data_dir=str(data), **{**TINY_TRAIN, "epochs": 1, "lr": 3e-3, **changes})
    store = RunStore(tmp_path / "models")
    run_dir = store.path(store.create(config))
    return fit(config, run_dir, cache_dir=tmp_path.parent / "recipe-cache"), run_dir


def test_the_weighted_loss_weighs_classes_by_their_inverse_square_root_at_mean_one():
    from shared.training.engine import class_weights

    weight = class_weights([400, 100, 25])  # 16:4:1
    assert weight[2] / weight[0] == pytest.approx(4.0) and weight[1] / weight[0] == pytest.approx(2.0)
    assert float((weight * torch.tensor([400, 100, 25])).sum()) == pytest.approx(525)  # mean 1 over the images
    assert torch.isfinite(class_weights([10, 0])).all()  # a class with no training image weighs as one with 1


def test_class_balance_is_automatic_from_three_to_one():
    config = TrainConfig(data_dir="x")
    assert class_balance(config, torch.tensor([0] * 9 + [1] * 3), 2)["balance"] == "weighted_loss"
    assert class_balance(config, torch.tensor([0] * 8 + [1] * 3), 2) == {
        "class_counts": [8, 3], "imbalanced": False, "balance": "none", "select_by": "val_acc"}
    chosen = class_balance(config.replace(balance="sampler"), torch.tensor([0] * 9 + [1] * 3), 2)
    assert chosen["balance"] == "sampler" and chosen["select_by"] == "val_macro_f1"
    ignored = class_balance(config.replace(balance="none"), torch.tensor([0] * 9 + [1] * 3), 2)
    assert ignored["imbalanced"] and ignored["select_by"] == "val_acc"  # as if balanced, as asked


def test_an_imbalanced_run_is_rebalanced_picked_by_macro_f1_and_logs_per_class_recall(tmp_path, skewed):
    result, run_dir = tiny_run(tmp_path, skewed)
    assert result["balance"] == "weighted_loss" and result["select_by"] == "val_macro_f1"
    [record] = read_metrics(run_dir)
    assert list(record["val_recall"]) == ["class_0", "class_1", "class_2"] and 0 <= record["val_macro_f1"] <= 1
    plan = json.loads((run_dir / "config.json").read_text())["plan"]
    assert plan["class_counts"] == [12, 3, 3] and plan["imbalanced"]  # the training split (half of each class)


def test_the_weighted_loss_option_weighs_the_loss_and_draws_every_image_once(tmp_path, skewed, monkeypatch):
    from shared.training import engine

    criteria, orders = [], []
    original_loss, original_batches = engine.nn.CrossEntropyLoss, engine.iterate_batches

    def loss_spy(*args, **kwargs):
        criteria.append(kwargs.get("weight"))
        return original_loss(*args, **kwargs)

    def batches_spy(split, *args, order=None, **kwargs):
        orders.append(order)
        return original_batches(split, *args, order=order, **kwargs)

    monkeypatch.setattr(engine.nn, "CrossEntropyLoss", loss_spy)
    monkeypatch.setattr(engine, "iterate_batches", batches_spy)
    result, _ = tiny_run(tmp_path, skewed, balance="weighted_loss")
    assert result["balance"] == "weighted_loss" and result["select_by"] == "val_macro_f1"
    weight = criteria[0]  # the training criterion, made first: 1/sqrt of the training counts 12:3:3
    assert weight is not None and float(weight[1] / weight[0]) == pytest.approx(2.0)
    assert all(order is None for order in orders)  # no sampler draw: every training image once per epoch


def test_the_balanced_sampler_draws_classes_evenly(tmp_path, skewed, monkeypatch):
    from shared.training import engine

    drawn = []
    original = engine.iterate_batches

    def spy(split, *args, order=None, **kwargs):
        if order is not None:
            drawn.append(split.labels[order])
        return original(split, *args, order=order, **kwargs)

    monkeypatch.setattr(engine, "iterate_batches", spy)
    tiny_run(tmp_path, skewed, balance="sampler", epochs=3)
    labels = torch.cat(drawn)
    counts = np.bincount(labels.numpy(), minlength=3)
    assert len(drawn) == 3 and counts.min() > 0.2 * len(labels), counts  # not 2/3 of the draws from class 0


def test_ema_weights_are_what_is_evaluated_and_saved(tmp_path, skewed):
    _, run_dir = tiny_run(tmp_path, skewed, ema_decay=0.9)
    best = load_checkpoint(run_dir / "best.pt")["model"]
    last = load_checkpoint(run_dir / "last.pt")
    ema = {k.removeprefix("module."): v for k, v in last["ema"].items() if k.startswith("module.")}
    assert all(torch.equal(best[k], ema[k]) for k in best)
    assert not all(torch.equal(best[k], last["model"][k]) for k in best)  # the average, not the raw weights
    with pytest.raises(ConfigError, match="ema_decay"):
        TrainConfig(data_dir="x", ema_decay=0.3)


def test_tta_and_mixup_train_evaluate_and_predict(tmp_path, skewed):
    from shared.analysis.evaluation import evaluate_run
    from shared.analysis.predict import Predictor

    _, run_dir = tiny_run(tmp_path, skewed, tta=True, mix="both", balance="none")
    predictor = Predictor(run_dir)
    x = predictor.preprocess(next((skewed / "class_0").glob("*.jpg"))).unsqueeze(0)
    with torch.no_grad():
        logits = (predictor.model(x) + predictor.model(x.flip(3))) / 2
    expected = torch.softmax(logits / predictor.temperature, 1)
    assert predictor.tta and torch.allclose(predictor.probabilities(x), expected, atol=1e-6)
    result = evaluate_run(run_dir, figures="none")
    assert any("flip test-time augmentation" in note for note in result["notes"])
    assert any("temperature-scaled" in note for note in result["notes"])


def test_progressive_resizing_trains_small_then_full_size_and_evaluates_at_full_size(tmp_path, skewed, monkeypatch):
    from shared.data.transforms import BatchTransform

    seen = []  # (train?, side of the batch the model got)
    original = BatchTransform.__call__

    def spy(self, batch, train, generator=None, size=None):
        out = original(self, batch, train, generator, size)
        seen.append((train, out.shape[-1]))
        return out

    monkeypatch.setattr(BatchTransform, "__call__", spy)
    # 64 px from a quarter: 16, 32, 48 over the first 3/4 of the epochs, then 64 (the affine crop path: "light")
    _, run_dir = tiny_run(tmp_path, skewed, image_size=64, epochs=4, augment="light", balance="none",
                          progressive_resize=0.25)
    assert [r["image_size"] for r in read_metrics(run_dir)] == [16, 32, 48, 64]
    assert sorted({side for train, side in seen if train}) == [16, 32, 48, 64]
    assert {side for train, side in seen if not train} == {64}  # validation and calibration at image_size
    assert load_checkpoint(run_dir / "best.pt")["image_size"] == 64  # what evaluation and prediction resize to
    assert json.loads((run_dir / "config.json").read_text())["progressive_resize"] == 0.25


def test_progressive_resizing_is_validated_and_a_train_flag():
    from shared.cli import _train_config, build_parser

    for bad in (0.1, 1.0, -0.5, float("nan")):
        with pytest.raises(ConfigError, match="progressive_resize must be 0 \\(off\\) or in \\[0.25, 1\\)"):
            TrainConfig(data_dir="x", progressive_resize=bad)
    with pytest.raises(ConfigError, match="progressive_resize"):
        TrainConfig(data_dir="x", progressive_resize=True)  # a bool is not a share
    with pytest.raises(ConfigError, match="finetune 'head'"):
        TrainConfig(data_dir="x", finetune="head", progressive_resize=0.5)
    assert TrainConfig(data_dir="x").progressive_resize == 0  # off unless asked, or under a time budget:
    scratch = dict(data_dir="x", time_budget=30, weights="none")
    assert TrainConfig(**scratch).progressive_resize == BUDGET_PROGRESSIVE_RESIZE == 0.5
    assert TrainConfig(**scratch, progressive_resize=0).progressive_resize == 0  # off, as asked
    assert TrainConfig(data_dir="x", time_budget=30).progressive_resize == 0  # fine-tuning ImageNet weights: not
    assert TrainConfig(data_dir="x", time_budget=30, finetune="head").progressive_resize == 0  # measured, so off
    resolved = TrainConfig(**scratch)
    assert TrainConfig.from_dict(resolved.to_dict()) == resolved  # config.json holds the number the run used
    parse = build_parser().parse_args
    config, _ = _train_config(parse(["train", "--data-dir", "x", "--progressive-resize", "0.5"]))
    assert config.progressive_resize == 0.5
    config, _ = _train_config(parse(["train", "--data-dir", "x", "--time-budget", "10", "--weights", "none"]))
    assert config.progressive_resize == 0.5


def test_lr_finder_suggests_a_rate_from_a_range_test_and_draws_it(tmp_path, skewed):
    from shared.training.lr_find import MIN_STEPS, lr_find

    config = TrainConfig(data_dir=str(skewed), **{**TINY_TRAIN})
    result = lr_find(config, tmp_path / "cache", plot_path=tmp_path / "lr.png")
    assert 1e-5 <= result["suggestion"] <= 0.1
    assert result["suggestion"] == pytest.approx(result["lrs"][int(np.argmin(result["losses"]))])  # RULE "minimum"
    assert result["steps"] <= MIN_STEPS and result["lrs"] == sorted(result["lrs"])
    assert (tmp_path / "lr.png").read_bytes()[:4] == b"\x89PNG"
    assert set(result["by_rule"]) == {"minimum/10", "valley", "steepest", "minimum"} and result["rule"] == "minimum"


def test_lr_suggestion_rules_read_the_curve_where_they_say():
    from shared.training.lr_find import SUGGESTION_RULES, suggest_lr

    lrs = list(np.logspace(-5, 0, 51))  # 10 steps a decade
    x = np.log10(lrs)
    # flat up to 1e-4, falling fastest at 1e-3, lowest at 1e-2, then diverging
    losses = list(np.where(x < -4, 2.0, 1.5 + np.cos(np.clip((x + 4) / 2, 0, 1) * np.pi) / 2)
                  + np.where(x > -2, (x + 2) ** 2 * 3, 0.0))
    by_rule = {rule: suggest_lr(lrs, losses, rule) for rule in SUGGESTION_RULES}
    assert by_rule["minimum"] == pytest.approx(1e-2)
    assert by_rule["minimum/10"] == pytest.approx(1e-3)
    assert by_rule["steepest"] == pytest.approx(1e-3, rel=0.3)
    # the longest fall runs 1e-4 -> 1e-2 (20 steps); the valley rule takes the point half-way down it (fastai)
    assert 5e-4 < by_rule["valley"] < 2e-3


def test_a_resumed_run_keeps_its_weight_average_and_its_budget_plan(tmp_path, skewed, monkeypatch):
    from shared.training import engine
    from shared.training.engine import Cancelled, Reporter

    class StopAfterFirstEpoch(Reporter):
        done = False

        def epoch(self, record):
            self.done = True

        def should_stop(self):
            return self.done

    monkeypatch.setattr(engine, "time_steps", lambda *args, **kwargs: (1e-4, 1e-5))  # plans far more than 2
    # progressive resizing: the plan times a step at the smallest side too, and keeps it
    config = TrainConfig(data_dir=str(skewed), **{**TINY_TRAIN, "ema_decay": 0.9, "time_budget": 60.0,
                                                  "progressive_resize": 0.5})
    store = RunStore(tmp_path / "models")
    run_dir = store.path(store.create(config))
    with pytest.raises(Cancelled):
        fit(config, run_dir, StopAfterFirstEpoch(), cache_dir=tmp_path / "cache")
    saved = load_checkpoint(run_dir / "last.pt")
    planned = saved["plan"]["planned_epochs"]  # already re-planned after epoch 1: this machine is slower
    assert planned > 2 and saved["ema"]["n_averaged"] > 0
    assert (saved["plan"]["small_side"], saved["plan"]["full_side"]) == (16, 32)
    assert saved["history"][0]["image_size"] == 16
    # a run begun when `auto` meant the sampler goes on with it after an update made `auto` the weighted loss
    record = json.loads((run_dir / "config.json").read_text())
    assert record["balance"] == "auto" and record["plan"]["balance"] == "weighted_loss"
    record["plan"]["balance"] = "sampler"
    (run_dir / "config.json").write_text(json.dumps(record))
    # resumed: the plan is read back (no new timing), cut short here by patience to keep the test small
    monkeypatch.setattr(engine, "time_steps", lambda *a, **k: pytest.fail("a resumed run must not re-time"))
    result = fit(config.replace(patience=1), run_dir, cache_dir=tmp_path / "cache")
    assert result["budget"]["planned_epochs"] == planned and result["epochs_run"] >= 2
    assert result["balance"] == "sampler" and result["select_by"] == "val_macro_f1"
    resumed = load_checkpoint(run_dir / "last.pt")["ema"]["n_averaged"]
    assert resumed > saved["ema"]["n_averaged"]  # the average went on from where it stopped
