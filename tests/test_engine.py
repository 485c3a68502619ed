"""The training engine on real (tiny) models and generated images: learning, resume, fine-tuning modes, weights."""

from __future__ import annotations

import os
import pickle
import urllib.error

import pytest
import torch
from torchvision.models import WeightsEnum

from shared.training.checkpoint import CheckpointError, load_checkpoint, load_model_from_run, save_checkpoint
from shared.training.config import ConfigError, TrainConfig, expand_grid
from shared.training.engine import Cancelled, Reporter, fit
from shared.training.models import WeightsUnavailable, create_model, weights_cache_dir
from shared.runs.store import RunStore, read_metrics
from tests.imagegen import make_image_folder
from tests.tinymodel import register_tiny_resnet


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp("data") / "shapes", classes=3, per_class=20, size=48)


@pytest.fixture(scope="module")
def tiny() -> str:
    """The tiny ResNet's name (~10x faster to train than resnet18 here): for tests of the loop, not of a model."""
    return register_tiny_resnet().name


def tiny_config(data_dir, **changes) -> TrainConfig:
    base = dict(data_dir=str(data_dir), weights="none", image_size=32, epochs=3, batch_size=8, lr=3e-3,
                warmup_epochs=0)
    base.update(changes)
    return TrainConfig(**base)


def new_run(tmp_path, config):
    store = RunStore(tmp_path / "models")
    run_id = store.create(config)
    return store, store.path(run_id)


def test_fit_learns_and_writes_a_complete_run(tmp_path, dataset, tiny):
    config = tiny_config(dataset, model=tiny)
    _, run_dir = new_run(tmp_path, config)
    result = fit(config, run_dir, cache_dir=tmp_path / "cache")

    assert result["best_val_acc"] > 0.6, result  # 3 classes: chance is 0.33
    for name in ("config.json", "split.json", "metrics.jsonl", "best.pt", "last.pt"):
        assert (run_dir / name).is_file(), name
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    assert {"train_loss", "train_acc", "val_loss", "val_acc", "lr", "images_per_s", "seconds"} <= set(records[0])
    model, meta = load_model_from_run(run_dir)
    assert meta["classes"] == ["class_0", "class_1", "class_2"]
    assert meta["image_size"] == 32 and len(meta["mean"]) == 3


class StopAfterEpoch(Reporter):
    def __init__(self, epoch):
        self.stop_after, self.done = epoch, 0

    def epoch(self, record):
        self.done = record["epoch"]

    def should_stop(self):
        return self.done >= self.stop_after


def test_resume_gives_the_same_weights_as_an_uninterrupted_run(tmp_path, dataset, tiny):
    config = tiny_config(dataset, model=tiny, epochs=2, augment="standard", dropout=0.2)
    _, straight = new_run(tmp_path / "a", config)
    fit(config, straight, cache_dir=tmp_path / "cache")

    _, interrupted = new_run(tmp_path / "b", config)
    with pytest.raises(Cancelled):
        fit(config, interrupted, StopAfterEpoch(1), cache_dir=tmp_path / "cache")
    assert [r["epoch"] for r in read_metrics(interrupted)] == [1]
    fit(config, interrupted, cache_dir=tmp_path / "cache")

    assert [r["epoch"] for r in read_metrics(interrupted)] == [1, 2]
    a = load_checkpoint(straight / "last.pt")["model"]
    b = load_checkpoint(interrupted / "last.pt")["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert (straight / "split.json").read_bytes() == (interrupted / "split.json").read_bytes()


def test_a_torn_metrics_line_after_the_checkpoint_is_not_duplicated_on_resume(tmp_path, dataset, tiny):
    config = tiny_config(dataset, model=tiny, epochs=2)
    _, run_dir = new_run(tmp_path, config)
    with pytest.raises(Cancelled):
        fit(config, run_dir, StopAfterEpoch(1), cache_dir=tmp_path / "cache")
    # a crash after metrics.jsonl was appended for epoch 2 but before last.pt moved: the record must not repeat
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "val_acc": 0.0}\n{"epoch": 3, "va')
    fit(config, run_dir, cache_dir=tmp_path / "cache")
    assert [r["epoch"] for r in read_metrics(run_dir)] == [1, 2]


@pytest.fixture
def cached_resnet18_weights(tmp_path, monkeypatch):
    """A state dict saved where torchvision's cache expects IMAGENET1K_V1 — what an offline user copies by hand."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    from torchvision.models import ResNet18_Weights, resnet18

    torch.manual_seed(123)
    reference = resnet18(weights=None)
    path = weights_cache_dir() / os.path.basename(ResNet18_Weights.IMAGENET1K_V1.url)
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)
    return reference


def test_pretrained_weights_are_loaded_from_the_offline_cache(cached_resnet18_weights):
    model = create_model("resnet18", num_classes=4, weights="IMAGENET1K_V1")
    assert torch.equal(model.conv1.weight, cached_resnet18_weights.conv1.weight)
    assert model.fc.out_features == 4


def test_missing_weights_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_home"))

    def offline(*args, **kwargs):  # the network library, not our code: this machine is offline by design
        raise urllib.error.URLError("no network")

    # the download itself: torchvision binds torch.hub's function at import, so patching torch.hub would miss it
    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(WeightsUnavailable) as info:
        create_model("resnet34", num_classes=3, weights="IMAGENET1K_V1")
    message = str(info.value)
    assert "resnet34-b627a593.pth" in message and str(tmp_path / "empty_home") in message
    assert "--weights none" in message


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory, dataset, tiny):
    """Pretrained weights for the tiny ResNet as a state-dict file (what --weights FILE loads): two epochs on the
    dataset, so that a head alone learns on its features. The weights enum's offline cache has its own test above;
    the fine-tuning modes are the same for a file and for an enum, and the tiny model trains ~10x faster."""
    root = tmp_path_factory.mktemp("pretrained")
    torch.manual_seed(123)
    config = tiny_config(dataset, model=tiny, epochs=2)
    _, run_dir = new_run(root, config)
    fit(config, run_dir, cache_dir=root / "cache")
    state = load_checkpoint(run_dir / "best.pt")["model"]
    path = root / "tiny-pretrained.pth"
    torch.save(state, path)
    return path, state


@pytest.mark.parametrize("mode", ["head", "probe_then_unfreeze"])
def test_fine_tuning_modes(tmp_path, dataset, tiny, tiny_weights, mode):
    weights, reference = tiny_weights
    config = tiny_config(dataset, model=tiny, weights=str(weights), finetune=mode, epochs=3, probe_epochs=1,
                         lr=1e-2)
    _, run_dir = new_run(tmp_path, config)
    result = fit(config, run_dir, cache_dir=tmp_path / "cache")
    stages = [r["stage"] for r in read_metrics(run_dir)]
    assert stages == (["head"] * 3 if mode == "head" else ["head", "full", "full"])
    trained = load_checkpoint(run_dir / "last.pt")["model"]
    backbone_changed = not torch.equal(trained["conv1.weight"], reference["conv1.weight"])
    assert backbone_changed == (mode == "probe_then_unfreeze")
    assert result["best_val_acc"] > 0.5


def test_config_errors_name_the_field_and_choices():
    with pytest.raises(ConfigError, match="model must be one of resnet18, resnet34, resnet50, resnet101"):
        TrainConfig(data_dir="x", model="vgg16")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(data_dir="x", batch_size=0)
    with pytest.raises(ConfigError, match="unknown config field"):
        TrainConfig.from_dict({"data_dir": "x", "learning_rate": 0.1})
    with pytest.raises(ConfigError, match="needs pretrained weights"):
        TrainConfig(data_dir="x", weights="none", finetune="head")


def test_expand_grid_makes_one_config_per_combination():
    configs = expand_grid({"data_dir": "d", "epochs": 2}, model=["resnet18", "resnet34"], lr=[1e-3, 1e-2, 1e-3])
    assert [(c.model, c.lr) for c in configs] == [("resnet18", 1e-3), ("resnet18", 1e-2),
                                                  ("resnet34", 1e-3), ("resnet34", 1e-2)]
    with pytest.raises(ConfigError, match="at least one"):
        expand_grid({"data_dir": "d"}, model=[])


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "best.pt"
    with open(path, "wb") as fh:
        pickle.dump({"model": _Exploit(marker)}, fh)
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(path)
    assert not marker.exists()


def test_checkpoint_writes_are_atomic(tmp_path):
    path = tmp_path / "best.pt"
    save_checkpoint({"model": {"w": torch.ones(2)}}, path)
    assert load_checkpoint(path)["model"]["w"].sum() == 2
    assert [p.name for p in tmp_path.iterdir()] == ["best.pt"]  # no temp files left behind


# --- optimizers, schedules and early stopping, each run once on the tiny ResNet ----------------------------------

def test_onecycle_warms_up_then_anneals_per_step(tmp_path, dataset, tiny):
    config = tiny_config(dataset, model=tiny, scheduler="onecycle", lr=1e-2)
    _, run_dir = new_run(tmp_path, config)
    fit(config, run_dir, cache_dir=tmp_path / "cache")
    lrs = [r["lr"] for r in read_metrics(run_dir)]
    # OneCycleLR starts at lr/25, peaks at lr 30% in, then anneals far below its start: stepped per batch
    assert lrs[0] > 0.5e-2 and lrs[0] > lrs[1] > lrs[2], lrs
    assert lrs[-1] < 1e-2 / 25, lrs


def test_plateau_halves_the_lr_when_val_loss_stalls(tmp_path, dataset, tiny):
    # A stall on purpose: only the head trains (on features computed once), at an lr too small to move it, so the
    # val loss stays flat after epoch 1 and the schedule must halve the lr after 2 more epochs without progress.
    weights = tmp_path / "tiny.pth"
    torch.save(create_model(tiny, 3).state_dict(), weights)
    config = tiny_config(dataset, model=tiny, weights=str(weights), finetune="head", scheduler="plateau", epochs=5,
                         lr=1e-6)
    _, run_dir = new_run(tmp_path, config)
    fit(config, run_dir, cache_dir=tmp_path / "cache")
    records = read_metrics(run_dir)
    assert [r["lr"] for r in records] == pytest.approx([1e-6, 1e-6, 1e-6, 5e-7, 5e-7], rel=1e-6)
    # and the same as torch's ReduceLROnPlateau (factor 0.5, patience 2) fed the val losses the run recorded
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-6)
    oracle = torch.optim.lr_scheduler.ReduceLROnPlateau(probe, mode="min", factor=0.5, patience=2)
    expected = []
    for record in records:
        oracle.step(record["val_loss"])
        expected.append(probe.param_groups[0]["lr"])
    assert [r["lr"] for r in records] == pytest.approx(expected, rel=1e-6)


def test_adam_is_the_optimizer_asked_for(tmp_path, dataset, tiny):
    config = tiny_config(dataset, model=tiny, optimizer="adam", epochs=2)
    _, run_dir = new_run(tmp_path, config)
    result = fit(config, run_dir, cache_dir=tmp_path / "cache")
    optimizer = load_checkpoint(run_dir / "last.pt")["optimizer"]
    assert not optimizer["param_groups"][0]["decoupled_weight_decay"]  # Adam (L2 decay), not AdamW
    assert all("exp_avg_sq" in state for state in optimizer["state"].values())  # not SGD's momentum buffer
    assert result["best_val_acc"] > 0.5


def test_patience_stops_when_val_accuracy_stops_improving(tmp_path, dataset, tiny):
    # 9 validation images: accuracy takes at most 10 values, so 12 epochs cannot all improve — the run must stop
    config = tiny_config(dataset, model=tiny, patience=1, epochs=12)
    _, run_dir = new_run(tmp_path, config)
    result = fit(config, run_dir, cache_dir=tmp_path / "cache")
    accs = [r["val_acc"] for r in read_metrics(run_dir)]
    assert result["stopped_early"] and result["epochs_run"] == len(accs) < 12
    assert accs[-1] <= max(accs[:-1])  # the last epoch did not improve: that is what stopped it
    assert all(later > earlier for earlier, later in zip(accs[:-2], accs[1:-1]))  # it was the first that did not
