"""The tiny model and settings every test trains with, in one place: changing the model is one constant.

`TINY_MODEL` is the registry name the tests train; `TINY_TRAIN` the `TrainConfig` keywords of a run that takes
seconds on one CPU thread (32 px, batch 8, no augmentation, no warm-up; the epochs are each test's, one unless it
says); `tiny_form` the same as the page's /submit_runs form; `TINY_CLI` as `resnet-lab train` flags. `train_tiny`
makes a finished run in this process (no worker, no CLI start-up) for tests that only need one to exist.
"""

from __future__ import annotations

from pathlib import Path

TINY_MODEL = "tiny_resnet"  # tests/tinymodel.py, registered by tests/conftest.py in every process the tests start

TINY_TRAIN = dict(model=TINY_MODEL, weights="none", image_size=32, batch_size=8, augment="none", warmup_epochs=0,
                  device="cpu", amp=False, optimizer="sgd", val_ratio=0.25, test_ratio=0.25)

TINY_CLI = ("--model", TINY_MODEL, "--weights", "none", "--image-size", "32", "--epochs", "1", "--batch-size", "8",
            "--augment", "none", "--device", "cpu", "--no-amp")


def tiny_form(data_dir: str | Path, **changes) -> dict:
    """The page's /submit_runs parameters for one tiny run (lists where the form takes a grid)."""
    form = dict(TINY_TRAIN, data_dir=str(data_dir), models=[TINY_MODEL], lrs=[1e-3], batch_sizes=[8], epochs=1)
    del form["model"], form["batch_size"]
    return {**form, **changes}


def train_tiny(models_dir: Path, data_dir: Path, **changes) -> str:
    """A succeeded tiny run in `models_dir` on `data_dir`, trained in this process; its run id.

    No evaluation: figures and eval.json are what tests/test_evaluation.py is for."""
    from shared.runs.store import RunStore
    from shared.training.config import TrainConfig
    from shared.training.engine import fit

    store = RunStore(models_dir)
    config = TrainConfig(data_dir=str(data_dir), **{**TINY_TRAIN, "epochs": 1, **changes})
    run_id = store.create(config)
    best = fit(config, store.path(run_id), cache_dir=Path(models_dir).parent / "tiny-cache")
    store.set_status(run_id, "succeeded", best=best)
    return run_id
