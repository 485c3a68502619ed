"""Item 2 — accuracy per wall time, from scratch: our best CPU recipe vs the original system's recipe.

Both sides train ResNet18 from random weights on the same split manifest (`make_split`, seed 0, 70/15/15) and are
scored on its held-out test split, each within the same wall-clock budget (`--budget-minutes`), one after the other.

  ours      `shared.training.engine.fit`: decoded-image cache (its build counts against the budget), 128 px (short side
            resized to 146, random-resized-crop "standard" augmentation on tensors, no squashing), AdamW, cosine
            with 1 warm-up epoch, label smoothing 0.1, batch 32. The number of epochs is chosen so the cosine schedule
            ends inside the budget, from a short timing of the engine's own training step (which also counts).
  original  the original system's loop: PIL ImageFolder-style dataset, squash to 224x224, RandomRotation(15) and
            ColorJitter(0.2, 0.2, 0.2), DataLoader(num_workers=4), contiguous fp32, Adam 1e-3,
            ReduceLROnPlateau (halve on a 2-epoch val-loss plateau), batch 32, best epoch by val accuracy.

Both sides stop at the budget (a side stopped mid-epoch keeps its best finished epoch). After each epoch the
current model is scored on the test split with the clock paused (that evaluation is outside the budget; each side
uses its own eval transform), which gives the accuracy-vs-time curve. The headline is the test accuracy of each
side's best-by-validation model at the end of the budget. Target: ours >= original + 10 points.

Run (full):  .venv/bin/python bench/bench_accuracy_per_time.py --budget-minutes 30 \
                 --json bench/results/accuracy_per_time.json --plot bench/results/accuracy_per_time.png
     quick:  .venv/bin/python bench/bench_accuracy_per_time.py --quick --data-dir DIR
"""

from __future__ import annotations

import copy
import math
import resource
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_POINTS = 10.0


class Budget:
    """Wall clock for one side that can be paused (for the out-of-budget test evaluations).

    `min_epochs`: the budget is not over before that many epochs (`epoch_done`) finished. --quick runs use 1: on a
    loaded machine a seconds-long budget could otherwise end before the first epoch, leaving a side with no result.
    """

    def __init__(self, seconds: float, min_epochs: int = 0):
        self.seconds = seconds
        self.start = time.perf_counter()
        self.paused = 0.0
        self.cpu_start = _cpu_seconds()
        self.min_epochs, self.epochs = min_epochs, 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start - self.paused

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def over(self) -> bool:
        return self.epochs >= self.min_epochs and self.elapsed() >= self.seconds

    def epoch_done(self) -> None:
        self.epochs += 1

    def pause(self):
        budget = self

        class _Pause:
            def __enter__(self):
                self.t = time.perf_counter()

            def __exit__(self, *exc):
                budget.paused += time.perf_counter() - self.t

        return _Pause()

    def cpu_share(self) -> float:
        """CPU seconds this side got (process + finished children) per wall second, in cores."""
        wall = time.perf_counter() - self.start
        return (_cpu_seconds() - self.cpu_start) / max(wall, 1e-9)


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


# ---- ours: the engine ------------------------------------------------------------------------------------------

def estimate_epochs(config, splits, num_classes: int, budget: Budget, steps: int) -> tuple[int, float]:
    """How many epochs fit in what is left of the budget: time `steps` real training steps of the engine."""
    import itertools

    import torch
    from torch import nn

    from shared.training.engine import Reporter, StepScheduler, epoch_generator, iterate_batches, train_one_epoch
    from shared.training.models import IMAGENET_MEAN, IMAGENET_STD, create_model
    from shared.data.transforms import BatchTransform

    model = create_model(config.model, num_classes, "none").to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    transform = BatchTransform(config.augment, config.image_size, IMAGENET_MEAN, IMAGENET_STD)
    times: list[float] = []

    class Ticks(Reporter):
        def batch(self, *a):
            times.append(time.perf_counter())

    g = epoch_generator(config.seed, 999)
    batches = iterate_batches(splits["train"], config.batch_size, torch.device("cpu"), shuffle=True, generator=g,
                              drop_last=len(splits["train"]) > config.batch_size)
    train_one_epoch(model, itertools.islice(batches, steps + 1), transform, optimizer,
                    StepScheduler(optimizer, "none", 1, 0), nn.CrossEntropyLoss(), torch.device("cpu"), epoch=1,
                    num_batches=steps + 1, reporter=Ticks(), generator=g)
    step_s = (times[-1] - times[0]) / max(len(times) - 1, 1)
    train_steps = max(1, len(splits["train"]) // config.batch_size)
    # evaluation: forward only (~1/3 of a training step per image), val split every epoch, plus checkpoint saves
    epoch_s = train_steps * step_s + len(splits["val"]) / config.batch_size * step_s / 3 + 0.5
    return max(1, int(budget.left() * 0.92 // epoch_s)), epoch_s


def run_ours(args, manifest: dict, work: Path) -> dict:
    import torch

    from shared.training.checkpoint import load_model_from_run
    from shared.training.config import TrainConfig
    from shared.data.manifest import write_manifest
    from shared.training.engine import Cancelled, Reporter, evaluate, fit, iterate_batches
    from shared.training.models import IMAGENET_MEAN, IMAGENET_STD
    from shared.data.transforms import BatchTransform

    budget = Budget(args.budget_minutes * 60, min_epochs=1 if args.quick else 0)
    cache_dir = work / "cache-ours"  # cold: the one-time decode counts against our budget
    splits, cache = common.load_engine_splits(manifest, args.ours_size, cache_dir)
    base = TrainConfig(data_dir=str(args.data_dir), weights="none", image_size=args.ours_size, epochs=2,
                       batch_size=args.ours_batch, lr=args.ours_lr, optimizer="adamw", scheduler="cosine",
                       warmup_epochs=1, label_smoothing=0.1, augment=args.ours_augment, device="cpu", seed=0)
    epochs, epoch_s = estimate_epochs(base, splits, len(manifest["classes"]), budget, steps=args.calibration_steps)
    config = base.replace(epochs=epochs, warmup_epochs=1 if epochs > 1 else 0)
    print(f"ours: cache {cache['cache_seconds']:.1f} s; estimated {epoch_s:.1f} s/epoch -> {epochs} epochs "
          f"in the {budget.left():.0f} s left", flush=True)
    run_dir = work / "ours-run"
    run_dir.mkdir()
    write_manifest(manifest, run_dir / "split.json")
    test_transform = BatchTransform("none", args.ours_size, IMAGENET_MEAN, IMAGENET_STD)
    curve: list[dict] = []

    class BudgetReporter(Reporter):
        def should_stop(self) -> bool:
            return budget.over()

        def epoch(self, record: dict) -> None:
            budget.epoch_done()
            t = budget.elapsed()
            with budget.pause():
                model, _ = load_model_from_run(run_dir, "last")
                test = evaluate(model.to(memory_format=torch.channels_last),
                                iterate_batches(splits["test"], 64, torch.device("cpu"), shuffle=False),
                                test_transform, torch.nn.CrossEntropyLoss(), torch.device("cpu"))
            curve.append({"epoch": record["epoch"], "minutes": t / 60, "val_acc": record["val_acc"],
                          "test_acc": test["acc"], "loadavg": common.loadavg()[0]})
            print(f"  ours epoch {record['epoch']:3d}/{epochs}  {t / 60:6.2f} min  val {record['val_acc']:.3f}  "
                  f"test {test['acc']:.3f}  load {curve[-1]['loadavg']:.2f}", flush=True)

    stopped = False
    try:
        fit(config, run_dir, BudgetReporter(), cache_dir=cache_dir)
    except Cancelled:
        stopped = True
    used = budget.elapsed()
    test, meta = {"acc": float("nan")}, {"epoch": 0}  # not even one epoch fitted in the budget
    if (run_dir / "best.pt").is_file():
        model, meta = load_model_from_run(run_dir, "best")
        test = evaluate(model.to(memory_format=torch.channels_last),
                        iterate_batches(splits["test"], 64, torch.device("cpu"), shuffle=False), test_transform,
                        torch.nn.CrossEntropyLoss(), torch.device("cpu"))
    return {"recipe": {k: getattr(config, k) for k in ("image_size", "batch_size", "lr", "optimizer", "scheduler",
                                                       "warmup_epochs", "label_smoothing", "augment",
                                                       "weight_decay", "epochs")},
            "cache_seconds": cache["cache_seconds"], "estimated_epoch_seconds": epoch_s,
            "best_epoch": meta["epoch"], "test_acc": test["acc"], "stopped_by_budget": stopped,
            "seconds_used": used, "cpu_cores_obtained": budget.cpu_share(), "curve": curve}


# ---- original: the plain loop the project replaced -------------------------------------------------------------

class FileDataset:
    """(path, label) pairs of one split, opened with PIL like the original ImageFolder loop."""

    def __init__(self, root: Path, files: list[dict], transform):
        self.items = [(Path(root) / f["path"], f["label"]) for f in files]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as img:
            return self.transform(img.convert("RGB")), label


def original_transforms(size: int):
    from torchvision import transforms as T

    norm = T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    train = T.Compose([T.Resize((size, size)), T.RandomRotation(15), T.ColorJitter(0.2, 0.2, 0.2), T.ToTensor(),
                       norm])
    test = T.Compose([T.Resize((size, size)), T.ToTensor(), norm])
    return train, test


def run_original(args, manifest: dict) -> dict:
    import torch
    from torch import nn
    from torch.utils.data import DataLoader
    from torchvision.models import resnet18

    budget = Budget(args.budget_minutes * 60, min_epochs=1 if args.quick else 0)
    root = Path(manifest["root"])
    by_split = {s: [f for f in manifest["files"] if f["split"] == s] for s in ("train", "val", "test")}
    train_tf, test_tf = original_transforms(args.original_size)
    loaders = {
        "train": DataLoader(FileDataset(root, by_split["train"], train_tf), batch_size=32, shuffle=True,
                            num_workers=args.workers, generator=torch.Generator().manual_seed(0)),
        "val": DataLoader(FileDataset(root, by_split["val"], test_tf), batch_size=32, num_workers=args.workers),
    }
    with budget.pause():  # the curve's test set, decoded once outside the budget (deterministic transform)
        test_x, test_y = map(_stack, zip(*FileDataset(root, by_split["test"], test_tf)))
    torch.manual_seed(0)
    model = resnet18(weights=None, num_classes=len(manifest["classes"]))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode="min", factor=0.5, patience=2)
    criterion = nn.CrossEntropyLoss()
    best_val, best_state, best_epoch, curve, stopped = -1.0, None, 0, [], False
    epoch = 0
    while not budget.over():
        epoch += 1
        model.train()
        for x, y in loaders["train"]:
            if budget.over():
                stopped = True
                break
            loss = criterion(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if stopped:
            break
        model.eval()
        val_loss, correct, seen = 0.0, 0, 0
        with torch.no_grad():
            for x, y in loaders["val"]:
                logits = model(x)
                val_loss += criterion(logits, y).item() * len(y)
                correct += (logits.argmax(1) == y).sum().item()
                seen += len(y)
        if budget.over():  # an epoch whose validation ran past the budget does not count
            stopped = True
            break
        budget.epoch_done()
        val_acc = correct / seen
        scheduler.step(val_loss / seen)
        if val_acc > best_val:
            best_val, best_epoch = val_acc, epoch
            best_state = copy.deepcopy(model.state_dict())
        t = budget.elapsed()
        with budget.pause():
            test_acc = _accuracy(model, test_x, test_y)
        curve.append({"epoch": epoch, "minutes": t / 60, "val_acc": val_acc, "test_acc": test_acc,
                      "loadavg": common.loadavg()[0]})
        print(f"  original epoch {epoch:3d}  {t / 60:6.2f} min  val {val_acc:.3f}  test {test_acc:.3f}  "
              f"load {curve[-1]['loadavg']:.2f}", flush=True)
    used = budget.elapsed()
    if best_state is not None:
        model.load_state_dict(best_state)
        test_acc = _accuracy(model, test_x, test_y)
    else:
        test_acc = float("nan")  # not even one epoch fitted in the budget
    return {"recipe": {"image_size": args.original_size, "squash": True, "batch_size": 32, "optimizer": "adam",
                       "lr": 1e-3, "scheduler": "plateau(0.5, patience 2)", "augment": "rotation 15 + jitter 0.2",
                       "workers": args.workers},
            "best_epoch": best_epoch, "test_acc": test_acc, "stopped_by_budget": stopped, "epochs_finished": len(curve),
            "seconds_used": used, "cpu_cores_obtained": budget.cpu_share(), "curve": curve}


def _stack(items):
    import torch

    first = items[0]
    return torch.stack(list(items)) if isinstance(first, torch.Tensor) else torch.tensor(items)


def _accuracy(model, x, y, batch: int = 64) -> float:
    import torch

    model.eval()
    correct = 0
    with torch.no_grad():
        for i in range(0, len(y), batch):
            correct += (model(x[i:i + batch]).argmax(1) == y[i:i + batch]).sum().item()
    return correct / max(len(y), 1)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=90)
    for name, style in (("ours", "-o"), ("original", "-s")):
        curve = result[name]["curve"]
        label = f"{name} (final {result[name]['test_acc']:.1%})"
        ax.plot([0] + [c["minutes"] for c in curve], [0.2] + [c["test_acc"] for c in curve], style, ms=3,
                label=label)
    ax.axhline(0.2, color="grey", lw=0.7, ls=":")
    ax.set_xlabel("wall time within the budget (minutes)")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"ResNet18 from scratch, flower_photos, {result['budget_minutes']:g}-min CPU budget each",
                 fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--budget-minutes", type=float, default=30.0, help="wall budget for each side")
    parser.add_argument("--sides", nargs="+", default=["ours", "original"], choices=["ours", "original"],
                        help="which sides to run, in this order")
    parser.add_argument("--ours-size", type=int, default=128)
    parser.add_argument("--ours-batch", type=int, default=32)
    parser.add_argument("--ours-lr", type=float, default=2e-3)
    parser.add_argument("--ours-augment", default="standard")
    parser.add_argument("--original-size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the original loop")
    parser.add_argument("--calibration-steps", type=int, default=5)
    parser.add_argument("--plot", type=Path, default=None, help="write the accuracy-vs-time curve as a PNG")
    args = common.parse(parser, argv, __file__)
    if args.quick:  # one epoch a side (the budget never ends a quick side before its first one)
        args.budget_minutes = min(args.budget_minutes, 0.02)
        args.ours_size, args.original_size, args.workers, args.calibration_steps = 32, 32, 1, 1
        args.ours_batch = 4

    import torch

    common.ensure_repo_on_path()
    print(f"load before: {common.loadavg()}; torch threads {torch.get_num_threads()}; "
          f"budget {args.budget_minutes:g} min per side")
    manifest, split_s = common.make_manifest(args.data_dir)
    counts = {s: sum(f["split"] == s for f in manifest["files"]) for s in ("train", "val", "test")}
    result: dict = {"budget_minutes": args.budget_minutes, "split": {**counts, "hash": manifest["split_hash"]}}
    with tempfile.TemporaryDirectory(prefix="bench_acc_") as tmp:
        for side in args.sides:
            load = common.loadavg()
            out = run_ours(args, manifest, Path(tmp)) if side == "ours" else run_original(args, manifest)
            out["loadavg_start"], out["loadavg_end"] = list(load), list(common.loadavg())
            result[side] = out
    rows = [{"side": side, "test acc": f"{result[side]['test_acc']:.1%}",
             "best epoch": result[side]["best_epoch"], "epochs done": len(result[side]["curve"]),
             "minutes used": result[side]["seconds_used"] / 60,
             "cores obtained": result[side]["cpu_cores_obtained"],
             "load start/end": f"{result[side]['loadavg_start'][0]:.1f}/{result[side]['loadavg_end'][0]:.1f}"}
            for side in args.sides]
    common.print_table(rows, title=f"Accuracy at a {args.budget_minutes:g}-minute CPU budget each "
                                   f"(test split: {counts['test']} images)", digits=2)
    if "ours" in result and "original" in result:
        gap = 100 * (result["ours"]["test_acc"] - result["original"]["test_acc"])
        result["gap_points"] = gap
        ok = not math.isnan(gap) and gap >= TARGET_POINTS
        print(f"\nours - original = {gap:+.1f} points (target >= +{TARGET_POINTS:g}): {common.verdict(ok, args.quick)}")
        if args.plot:
            plot(result, args.plot)
            print(f"wrote {args.plot}")
    return common.finish(args, "accuracy_per_time", {"prep": {"dataset_check_and_split_seconds": split_s},
                                                      **result})


if __name__ == "__main__":
    main()
