"""The model registry: every spec fits the network it builds, the whole ResNet family builds and trains (resnet50
through `fit`, the others one step each), weights resolve to the right torchvision file and load from the offline
cache, and a test-registered model is a valid config."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torchvision.models import WeightsEnum

from shared.cli import TRAIN_HELP
from shared.runs.store import RunStore, read_metrics
from shared.training.checkpoint import load_model_from_run
from shared.training.config import ConfigError, TrainConfig
from shared.training.engine import fit, make_optimizer
from shared.training.models import (ModelSpec, confine_weights, create_model, get_spec, list_models, register_model,
                                    resolve_weights, weights_cache_dir, WeightsUnavailable)
from tests.imagegen import make_image_folder
from tests.procs import REPO
from tests.tinymodel import TINY_RESNET, register_tiny_resnet

# the torchvision family beyond the original three, and resnet50 (untested before): each is trained below
FAMILY = ["resnet50", "resnet101", "resnet152", "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
          "wide_resnet50_2", "wide_resnet101_2"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def tiny() -> ModelSpec:
    return register_tiny_resnet()


@pytest.fixture(scope="module")
def two_classes(tmp_path_factory):
    # 12 images: 8 train (one batch of 8), 4 val, no test
    return make_image_folder(tmp_path_factory.mktemp("data") / "two", classes=2, per_class=6, size=32)


def tiny_fit(tmp_path, data_dir, **changes) -> tuple[dict, object]:
    values = dict(data_dir=str(data_dir), weights="none", image_size=32, epochs=1, batch_size=8, val_ratio=0.34,
                  test_ratio=0.0, augment="none", warmup_epochs=0, label_smoothing=0.0)
    values.update(changes)
    config = TrainConfig(**values)
    store = RunStore(tmp_path / "models")
    run_dir = store.path(store.create(config))
    return fit(config, run_dir, cache_dir=tmp_path / "cache"), run_dir


# --- every spec describes the network its builder makes ----------------------------------------------------------

@pytest.mark.parametrize("name", list(dict.fromkeys([*list_models(), TINY_RESNET])))
def test_each_spec_fits_the_network_it_builds(name, tiny):
    spec = get_spec(name)
    with torch.device("meta"):  # shapes only: no memory, no weight init (wide_resnet101_2 has 127 M parameters)
        model = spec.builder()
    head = spec.head_of(model)
    assert isinstance(head, nn.Linear) and head.in_features == spec.feature_size
    seen: list[tuple[str, tuple]] = []
    hooks = [module.register_forward_hook(lambda m, i, o, label=label: seen.append((label, tuple(o.shape))))
             for label, module in spec.stage_modules(model).items()]
    hooks.append(spec.cam_layer_of(model).register_forward_hook(lambda m, i, o: seen.append(("cam", tuple(o.shape)))))
    hooks.append(head.register_forward_pre_hook(lambda m, args: seen.append(("head", tuple(args[0].shape)))))
    model.eval()
    model(torch.empty(2, 3, 64, 64, device="meta"))
    for hook in hooks:
        hook.remove()
    shapes = dict(seen)
    labels = [label for label, _ in spec.stages]
    assert [label for label, _ in seen if label in labels] == labels  # each stage runs once, in the listed order
    assert all(len(shapes[label]) == 4 for label in labels)  # feature maps (N, C, h, w) to show
    assert len(shapes["cam"]) == 4  # Grad-CAM needs a spatial map
    assert shapes["head"] == (2, spec.feature_size)
    for weight_name, file_name in spec.weight_files().items():
        assert spec.weights[weight_name].url.endswith("/" + file_name)


def test_unknown_names_list_the_valid_choices(tiny):
    with pytest.raises(ValueError, match="unknown model 'vgg16'; choose one of resnet18, resnet34, resnet50, "
                                         "resnet101, resnet152, resnext50_32x4d"):
        get_spec("vgg16")
    with pytest.raises(ValueError, match="unknown model"):
        get_spec({"not": "hashable"})
    with pytest.raises(ConfigError, match="model must be one of resnet18, .*wide_resnet101_2"):
        TrainConfig(data_dir="x", model="vgg16")
    with pytest.raises(ValueError, match="already registered"):
        register_model(ModelSpec(TINY_RESNET, nn.Identity, 1))
    assert register_tiny_resnet() is tiny  # registering the same spec again is harmless


def test_the_cli_help_names_every_torchvision_model():
    # the help is written out so that --help does not import torch; this keeps it in step with the registry
    for name in list_models():
        if get_spec(name).weights is not None:
            assert name in TRAIN_HELP["model"], name


# --- a test-registered model is a model like any other ---------------------------------------------------------

def test_a_registered_model_is_accepted_by_the_config_and_trained_by_fit(tmp_path, two_classes, tiny):
    result, run_dir = tiny_fit(tmp_path, two_classes, model=TINY_RESNET, dropout=0.2)
    assert result["epochs_run"] == 1
    model, meta = load_model_from_run(run_dir)
    assert meta["model_name"] == TINY_RESNET and tiny.head_linear(model).out_features == 2
    with pytest.raises(ValueError, match="tiny_resnet have no pretrained weights"):
        confine_weights("DEFAULT", [TINY_RESNET], [tmp_path])
    with pytest.raises(ValueError, match="unknown weights 'DEFAULT' for tiny_resnet"):
        create_model(TINY_RESNET, 2, weights="DEFAULT")


# --- the rest of torchvision's ResNet family: resnet50 through the real `fit`, the others one training step each ------

def test_resnet50_trains_once_at_a_tiny_size(tmp_path, two_classes):
    # SGD: one state buffer per parameter (AdamW keeps two), so last.pt stays small
    result, run_dir = tiny_fit(tmp_path, two_classes, model="resnet50", optimizer="sgd", scheduler="none")
    records = read_metrics(run_dir)
    assert [r["epoch"] for r in records] == [1] and math.isfinite(records[0]["train_loss"])
    assert result["epochs_run"] == 1
    model, meta = load_model_from_run(run_dir)
    assert meta["model_name"] == "resnet50" and get_spec("resnet50").head_linear(model).out_features == 2


# `fit`, its checkpoints and the reload are the same code for every name (resnet50 above, the tiny model everywhere);
# what differs per member is the network the registry builds. Through `fit` each one cost 5-20 s here, mostly
# writing and reading its checkpoints (wide_resnet101_2's run folder: 1.4 GB): one step shows what is its own.
@pytest.mark.slow  # building the 127 M-parameter networks for real: seconds each
@pytest.mark.parametrize("name", [name for name in FAMILY if name != "resnet50"])
def test_every_family_member_builds_and_takes_one_training_step(name):
    """Built through the registry with a 2-class head, one step of `fit`'s optimizer (the spec's backbone and head
    groups, SGD) on 2 channels-last images of 32 px: a finite loss, a gradient for every parameter, and the first
    convolution, the CAM layer and the head all move."""
    torch.manual_seed(0)
    spec = get_spec(name)
    model = create_model(name, 2)
    head = spec.head_linear(model)
    assert (head.in_features, head.out_features) == (spec.feature_size, 2)
    # no weight decay: a weight moves only by its gradient
    config = TrainConfig(data_dir="unused", model=name, optimizer="sgd", lr=0.1, weight_decay=0.0)
    optimizer = make_optimizer(config, [{"params": spec.backbone_parameters(model), "lr": config.lr},
                                        {"params": spec.head_parameters(model), "lr": config.lr}])
    watched = {"conv1": model.conv1.weight, "cam layer": next(spec.cam_layer_of(model).parameters()),
               "head": head.weight}
    before = {label: p.detach().clone() for label, p in watched.items()}
    model.train()
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    loss = nn.functional.cross_entropy(model(x), torch.tensor([0, 1]))
    assert math.isfinite(loss.item())
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    optimizer.step()
    assert not [label for label, p in watched.items() if torch.equal(p, before[label])]


# --- ImageNet weights: the right enum, the right file, loaded offline ------------------------------------------

@pytest.mark.parametrize("weights, member, file_name", [
    ("IMAGENET1K_V1", "IMAGENET1K_V1", "resnet50-0676ba61.pth"),
    ("IMAGENET1K_V2", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
    ("DEFAULT", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),  # torchvision's DEFAULT for resnet50 is V2
    ("default", "IMAGENET1K_V2", "resnet50-11ad3fa6.pth"),
])
def test_resnet50_weights_resolve_to_the_torchvision_enum_and_file(weights, member, file_name):
    from torchvision.models import ResNet50_Weights

    resolved = resolve_weights("resnet50", weights)
    assert resolved is ResNet50_Weights[member]
    assert get_spec("resnet50").weight_files()[member] == file_name


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty TORCH_HOME, and a network that is never reached (a download attempt fails the test)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))

    def no_download(*args, **kwargs):
        raise ConnectionError("tried to download weights: the offline cache was not used")

    # the download itself (torchvision binds torch.hub's function at import, so patching torch.hub would miss it)
    monkeypatch.setattr(WeightsEnum, "get_state_dict", no_download)
    return weights_cache_dir()


def test_resnet50_v2_weights_load_from_a_file_in_the_offline_cache(offline_cache):
    from torchvision.models import resnet50

    torch.manual_seed(7)
    reference = resnet50(weights=None)  # stands in for ImageNet weights: any state dict of the right shapes
    offline_cache.mkdir(parents=True)
    torch.save(reference.state_dict(), offline_cache / "resnet50-11ad3fa6.pth")
    for weights in ("IMAGENET1K_V2", "DEFAULT"):
        model = create_model("resnet50", num_classes=3, weights=weights)
        assert torch.equal(model.conv1.weight, reference.conv1.weight)
        assert torch.equal(model.layer4[2].conv3.weight, reference.layer4[2].conv3.weight)
        assert get_spec("resnet50").head_linear(model).out_features == 3
    # V1 is another file: absent here, so it is not silently replaced by the V2 file
    assert not os.path.exists(offline_cache / "resnet50-0676ba61.pth")
    with pytest.raises(WeightsUnavailable, match="tried to download.*resnet50-0676ba61.pth"):
        create_model("resnet50", num_classes=3, weights="IMAGENET1K_V1")


# --- other processes learn the tiny model from RESNET_LAB_MODEL_PLUGINS ---------------------------------------

PLUGIN = "tests.tinymodel:register_tiny_resnet"


@pytest.mark.timeout(300)
def test_a_worker_started_with_the_plugin_trains_the_tiny_model(tmp_path, redis_url, start_worker, tiny):
    from shared.runs.store import FINISHED
    from shared.settings import Settings
    from tests.procs import wait_for
    from ui.client import QueueClient

    data = make_image_folder(tmp_path / "data", classes=2, per_class=8, size=32)
    client = QueueClient(Settings(models_dir=tmp_path / "models", redis_url=redis_url, visibility_timeout=3600))
    config = TrainConfig(data_dir=str(data), model=TINY_RESNET, weights="none", image_size=32, epochs=1,
                         batch_size=8, augment="none", warmup_epochs=0, device="cpu", amp=False, val_ratio=0.25,
                         test_ratio=0.25)
    (run_id,) = client.submit([config])
    worker = start_worker(tmp_path / "models", RESNET_LAB_MODEL_PLUGINS=PLUGIN, RESNET_LAB_DATA_ROOTS=data)

    def finished():
        assert worker.alive(), worker.log()[-3000:]
        record = client.registry.get(run_id)
        return record if record["status"] in FINISHED else None

    record = wait_for(finished, 180, f"run {run_id} to finish")
    assert record["status"] == "succeeded", (record, worker.log()[-3000:])
    _, meta = load_model_from_run(client.store.path(run_id))
    assert meta["model_name"] == TINY_RESNET


def test_a_plugin_that_cannot_be_loaded_is_one_clear_error(tmp_path, monkeypatch, capsys):
    from shared.cli import main

    for plugin in ("tests.no_such_module:register", "tests.tinymodel:no_such_function", "tests.tinymodel"):
        monkeypatch.setenv("RESNET_LAB_MODEL_PLUGINS", plugin)
        assert main(["--models-dir", str(tmp_path / "models"), "runs", "list"]) == 2
        err = capsys.readouterr().err
        assert f"RESNET_LAB_MODEL_PLUGINS: cannot load {plugin!r}" in err and "module:function" in err, err


def test_the_cli_loads_plugins_only_for_commands_that_build_models(tmp_path):
    """The registry imports torch (seconds): `runs list` with a plugin set never pays for it, and a model command
    still reports a plugin that cannot be loaded (a fresh process: this one imported the registry long ago)."""
    script = (
        "import sys\n"
        "from shared.cli import main\n"
        f"models = {str(tmp_path / 'models')!r}\n"
        "assert main(['--models-dir', models, 'runs', 'list']) == 0\n"
        "print('torch imported by runs list:', 'torch' in sys.modules)\n"
        f"print('train:', main(['--models-dir', models, 'train', '--data-dir', {str(tmp_path)!r}, '--model', "
        "'tiny_resnet']))\n")
    env = {**os.environ, "RESNET_LAB_MODEL_PLUGINS": "tests.no_such_module:register", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "torch imported by runs list: False" in done.stdout and "train: 2" in done.stdout, done.stdout
    assert "RESNET_LAB_MODEL_PLUGINS: cannot load 'tests.no_such_module:register'" in done.stderr, done.stderr

