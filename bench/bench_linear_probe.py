"""Item 3 — linear probe speed: head-only training on cached backbone features vs the frozen backbone every epoch.

ResNet18 with a frozen backbone (random or locally made weights: the timing does not depend on them) and a new
linear head, 10 epochs over the training split (+ validation each epoch), on the real photos, decoded cache warm.

  cached    the engine's way (`finetune="head"`): `extract_features` runs the backbone once over train and val
            (centre crops), then every epoch trains the head on the stored 512-d features.
  frozen    the common way: every epoch runs the frozen backbone (no_grad, eval mode) over every training batch
            and the validation split, then steps the head — the same inputs, the same head, the same optimizer.
  fit       (reported once, not interleaved) `shared.training.engine.fit` with `finetune="head"` end to end: the cached
            path plus what a real run adds (model build, per-epoch checkpoints, metrics).

Sides alternate round by round (cached frozen, frozen cached, ...); the medians and the ratio frozen / cached
are reported.

Run (full):  .venv/bin/python bench/bench_linear_probe.py --json bench/results/linear_probe.json
     quick:  .venv/bin/python bench/bench_linear_probe.py --quick --data-dir DIR
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def make_weights(path: Path, seed: int = 0) -> Path:
    """A locally made ResNet18 state dict (random init, seeded), used as the 'pretrained' backbone."""
    import torch
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    torch.save(resnet18(weights=None).state_dict(), path)
    return path


class Probe:
    """Model, head optimizer and the engine's transform for one side; both sides build the same."""

    def __init__(self, weights: Path, num_classes: int, image_size: int, device, amp_dtype=None, lr: float = 1e-3):
        import torch
        from torch import nn

        from shared.training.models import IMAGENET_MEAN, IMAGENET_STD, Backbone, create_model, get_spec
        from shared.data.transforms import BatchTransform

        torch.manual_seed(0)
        self.device, self.amp_dtype = device, amp_dtype
        self.model = create_model("resnet18", num_classes, weights=str(weights)).to(device)
        self.model = self.model.to(memory_format=torch.channels_last)
        for p in self.model.parameters():
            p.requires_grad_(False)
        spec = get_spec("resnet18")
        for p in spec.head_parameters(self.model):
            p.requires_grad_(True)
        self.backbone = Backbone(self.model, spec).eval()
        self.head = spec.head_of(self.model)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr, weight_decay=0.05)
        self.criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
        self.transform = BatchTransform("standard", image_size, IMAGENET_MEAN, IMAGENET_STD)

    def features(self, images):
        """Frozen backbone on a uint8 batch: centre crop, normalise, channels_last, autocast as the engine does."""
        import torch

        with torch.no_grad(), torch.autocast(self.device.type, dtype=self.amp_dtype,
                                             enabled=self.amp_dtype is not None):
            inputs = self.transform(images, train=False).contiguous(memory_format=torch.channels_last)
            return self.backbone(inputs).float()

    def head_step(self, features, labels) -> float:
        self.head.train()
        loss = self.criterion(self.head(features), labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        return loss.item()

    def head_val(self, features, labels) -> float:
        import torch

        self.head.eval()
        with torch.no_grad():
            return (self.head(features).argmax(1) == labels).float().mean().item()


def run_cached(probe: Probe, splits: dict, epochs: int, batch: int) -> dict:
    import torch

    from shared.training.engine import epoch_generator, extract_features

    device = probe.device
    start = time.perf_counter()
    feats = {name: extract_features(probe.backbone, splits[name], probe.transform, device, batch * 2,
                                    probe.amp_dtype) for name in ("train", "val")}
    extract_s = time.perf_counter() - start
    labels = {name: splits[name].labels.to(device) for name in ("train", "val")}
    n = len(labels["train"])
    for epoch in range(1, epochs + 1):
        order = torch.randperm(n, generator=epoch_generator(0, epoch)).to(device)
        for i in range(math.ceil(n / batch)):
            idx = order[i * batch:(i + 1) * batch]
            probe.head_step(feats["train"][idx], labels["train"][idx])
        val_acc = probe.head_val(feats["val"], labels["val"])
    return {"seconds": time.perf_counter() - start, "extract_seconds": extract_s, "val_acc": val_acc}


def run_frozen(probe: Probe, splits: dict, epochs: int, batch: int) -> dict:
    import torch

    from shared.training.engine import epoch_generator, iterate_batches

    device = probe.device
    start = time.perf_counter()
    for epoch in range(1, epochs + 1):
        for images, labels in iterate_batches(splits["train"], batch, device, shuffle=True,
                                              generator=epoch_generator(0, epoch)):
            probe.head_step(probe.features(images), labels)
        correct, seen = 0, 0
        for images, labels in iterate_batches(splits["val"], batch * 2, device, shuffle=False):
            correct += probe.head_val(probe.features(images), labels) * len(labels)
            seen += len(labels)
        val_acc = correct / max(seen, 1)
    return {"seconds": time.perf_counter() - start, "val_acc": val_acc}


def run_fit(data_dir: Path, manifest: dict, weights: Path, image_size: int, epochs: int, batch: int,
            cache_dir: Path, work: Path, device: str, amp: bool) -> dict:
    """The engine's own head-only run, end to end, into a scratch run folder."""
    from shared.training.config import TrainConfig
    from shared.data.manifest import write_manifest
    from shared.training.engine import fit

    run_dir = work / "probe-run"
    run_dir.mkdir(parents=True, exist_ok=True)
    write_manifest(manifest, run_dir / "split.json")  # fit reuses it instead of checking the photos again
    config = TrainConfig(data_dir=str(data_dir), weights=str(weights), finetune="head", image_size=image_size,
                         epochs=epochs, batch_size=batch, warmup_epochs=0, device=device, amp=amp)
    start = time.perf_counter()
    result = fit(config, run_dir, cache_dir=cache_dir)
    return {"seconds": time.perf_counter() - start, "val_acc": result["best_val_acc"]}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds of (cached, frozen)")
    parser.add_argument("--no-fit", action="store_true", help="skip the end-to-end fit() figure")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench_gpu.py runs this with cuda)")
    parser.add_argument("--amp", action="store_true", help="autocast the backbone (CUDA only), as the engine does")
    parser.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE_DIR,
                        help="decoded-image cache (built once, then reused)")
    args = common.parse(parser, argv, __file__)
    if args.quick:
        args.image_size, args.epochs, args.batch_size, args.rounds = min(args.image_size, 32), 2, 4, 1

    import torch

    common.ensure_repo_on_path()
    from shared.training.engine import autocast_dtype, pick_device

    device = pick_device(args.device)
    amp_dtype = autocast_dtype(device, args.amp)
    print(f"load before: {common.loadavg()}; torch threads {torch.get_num_threads()}; device {device}, "
          f"autocast {amp_dtype}")
    manifest, split_s = common.make_manifest(args.data_dir)
    cache_dir = args.cache_dir if not args.quick else None
    with tempfile.TemporaryDirectory(prefix="bench_probe_") as tmp:
        work = Path(tmp)
        cache_dir = cache_dir or work / "cache"
        splits, cache = common.load_engine_splits(manifest, args.image_size, cache_dir)
        print(f"cache {'hit' if cache['cache_hit'] else 'built'} in {cache['cache_seconds']:.1f} s; "
              f"{len(splits['train'])} train, {len(splits['val'])} val images at {args.image_size}px")
        weights = make_weights(work / "resnet18-local.pt")
        num_classes = len(manifest["classes"])
        runs: dict[str, list[dict]] = {"cached": [], "frozen": []}
        loads = []

        def side(name, fn):
            def once() -> float:
                out = fn(Probe(weights, num_classes, args.image_size, device, amp_dtype), splits, args.epochs,
                         args.batch_size)
                out["loadavg"] = common.loadavg()[0]
                loads.append(out["loadavg"])
                runs[name].append(out)
                print(f"  {name:7s} {out['seconds']:8.1f} s  (val acc {out['val_acc']:.3f}, "
                      f"load {out['loadavg']:.2f})", flush=True)
                return out["seconds"]
            return once

        common.interleave({"cached": side("cached", run_cached), "frozen": side("frozen", run_frozen)},
                          args.rounds)
        fit_out = None
        if not args.no_fit:
            fit_out = run_fit(args.data_dir, manifest, weights, args.image_size, args.epochs, args.batch_size,
                              cache_dir, work, str(device), args.amp)
            fit_out["loadavg"] = common.loadavg()[0]
            print(f"  fit(finetune='head') {fit_out['seconds']:.1f} s (load {fit_out['loadavg']:.2f})")

    cached = common.median([r["seconds"] for r in runs["cached"]])
    frozen = common.median([r["seconds"] for r in runs["frozen"]])
    rows = [{"side": "cached features (engine)", "seconds (median)": cached,
             "of which feature extraction": common.median([r["extract_seconds"] for r in runs["cached"]]),
             "rounds": " ".join(f"{r['seconds']:.1f}" for r in runs["cached"])},
            {"side": "frozen backbone every epoch", "seconds (median)": frozen, "of which feature extraction": "-",
             "rounds": " ".join(f"{r['seconds']:.1f}" for r in runs["frozen"])}]
    if fit_out:
        rows.append({"side": "fit(finetune='head') end to end", "seconds (median)": fit_out["seconds"],
                     "of which feature extraction": "-", "rounds": f"{fit_out['seconds']:.1f}"})
    common.print_table(rows, title=f"Linear probe, ResNet18 {args.image_size}px, {args.epochs} epochs, "
                                   f"batch {args.batch_size}, {device}"
                                   f"{', autocast ' + str(amp_dtype) if amp_dtype else ''}")
    print(f"\nfrozen / cached = {frozen / cached:.1f}x faster with cached features "
          f"(load during: {min(loads):.1f}..{max(loads):.1f})")
    return common.finish(args, "linear_probe", {
        "settings": {"device": str(device), "amp": str(amp_dtype), "threads": torch.get_num_threads(),
                     "image_size": args.image_size, "epochs": args.epochs, "batch_size": args.batch_size,
                     "rounds": args.rounds, "train_images": len(splits["train"]), "val_images": len(splits["val"])},
        "prep": {"dataset_check_and_split_seconds": split_s, **cache},
        "cached": runs["cached"], "frozen": runs["frozen"], "fit": fit_out,
        "cached_seconds": cached, "frozen_seconds": frozen, "speedup": frozen / cached})


if __name__ == "__main__":
    main()
