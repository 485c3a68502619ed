"""Item 1 — training throughput on CPU: our engine end-to-end vs bare compute vs the plain tutorial recipe.

Sides, all ResNet18 (5 classes), batch 32, the same training step (label-smoothed cross-entropy, AdamW,
grad-norm clip 1.0 — the engine's defaults), measured in one process and interleaved round by round:

  bare       forward + backward + clip + optimizer step on one synthetic batch already in memory, channels_last
             (the memory format the engine uses): the ceiling for any input path.
  bare_nchw  the same with contiguous (NCHW) tensors and weights: is channels_last a win on this CPU?
  engine     the engine's own functions over the real photos: `iterate_batches` (decoded cache, warm) →
             `train_one_epoch` (batched `BatchTransform` augmentation "standard", channels_last, loss, step).
  plain      torchvision ImageFolder + PIL transforms (Resize to a square, flip, rotation, colour jitter,
             ToTensor, Normalize) + DataLoader(num_workers=4, shuffle), contiguous NCHW — what tutorials do.

Each side's figure is images/s over N batches of a fresh epoch, timed from creating the epoch's batch iterator
(so a loader's start-up cost counts, as it does in a real epoch) to the end of the N-th step; the median over
the rounds is reported, with the steady rate that leaves out the first batch, and images per CPU-second (all
threads and loader processes: a measure of work per image that preemption by other users does not distort).
Rounds are short for the in-process sides (6 batches) and longer for plain (20 batches, since its loader
processes start with every epoch). One-time costs (dataset check
and split, decoded-cache build) are reported separately. Target: engine >= 90% of bare at every size.

Run (full):  .venv/bin/python bench/bench_train_throughput.py --json bench/results/train_throughput.json
     quick:  .venv/bin/python bench/bench_train_throughput.py --quick --data-dir DIR
"""

from __future__ import annotations

import itertools
import resource
import tempfile
import time
from pathlib import Path
from typing import Callable

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_ENGINE_VS_BARE = 0.90


def build_step(size: int, channels_last: bool, num_classes: int, device, amp_dtype=None, report_loss: bool = True,
               seed: int = 0):
    """step(inputs, labels): the engine's training step without the engine (same loss, optimizer, clip, AMP)."""
    import torch
    from torch import nn

    common.ensure_repo_on_path()
    from shared.training.models import create_model

    torch.manual_seed(seed)
    model = create_model("resnet18", num_classes, weights="none").to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.05)
    criterion = nn.CrossEntropyLoss(label_smoothing=0.1)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    def step(inputs, labels):
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            loss = criterion(model(inputs), labels)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        # the engine and the tutorials read the loss every step (a GPU sync); the bare ceiling does not
        return loss.item() if report_loss else None

    return model, optimizer, criterion, step


def synchronize(device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (DataLoader workers, once joined)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class Timed:
    """One measured segment: its start, the end of its first batch and of its last one (GPU work finished).

    Also the CPU seconds the segment used (call `close()` once its loader's workers have exited): images per
    CPU-second is a measure of work per image that a busy machine's preemption does not distort.
    """

    def __init__(self, batch_size: int):
        self.batch_size = batch_size
        self.batches = 0
        self.first = self.end = float("nan")
        self.cpu = float("nan")
        self.cpu_start = cpu_seconds()
        self.start = time.perf_counter()

    def close(self) -> "Timed":
        self.cpu = cpu_seconds() - self.cpu_start
        return self

    def tick(self, device=None, last: bool = False) -> None:
        """Call after each batch; syncs the GPU only after the first and the last batch."""
        self.batches += 1
        if self.batches == 1 or last:
            if device is not None:
                synchronize(device)
            now = time.perf_counter()
            if self.batches == 1:
                self.first = now
            self.end = now

    def rate(self) -> float:
        """Images/s from the segment's start (iterator creation) to the end of the last batch."""
        return self.batches * self.batch_size / (self.end - self.start)

    def steady(self) -> float:
        """Images/s leaving out the first batch (loader start-up, first prefetch)."""
        if self.batches < 2:
            return float("nan")
        return (self.batches - 1) * self.batch_size / (self.end - self.first)

    def per_cpu(self) -> float:
        """Images per CPU-second (all threads and loader processes)."""
        return self.batches * self.batch_size / self.cpu


def bare_side(size: int, batch: int, n: int, channels_last: bool, num_classes: int, device,
              amp_dtype=None) -> Callable[[], Timed]:
    import torch

    _, _, _, step = build_step(size, channels_last, num_classes, device, amp_dtype, report_loss=False)
    g = torch.Generator().manual_seed(1)
    inputs = torch.randn(batch, 3, size, size, generator=g).to(device)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, num_classes, (batch,), generator=g).to(device)

    def measure(count: int = n) -> Timed:
        timed = Timed(batch)
        for i in range(count):
            step(inputs, labels)
            timed.tick(device, last=i == count - 1)
        return timed.close()

    return measure


def engine_side(splits: dict, size: int, batch: int, n: int, num_classes: int, device,
                amp_dtype=None) -> Callable[[], Timed]:
    import torch

    from shared.training.engine import Reporter, StepScheduler, epoch_generator, iterate_batches, train_one_epoch
    from shared.training.models import IMAGENET_MEAN, IMAGENET_STD
    from shared.data.transforms import BatchTransform

    model, optimizer, criterion, _ = build_step(size, True, num_classes, device, amp_dtype)
    transform = BatchTransform("standard", size, IMAGENET_MEAN, IMAGENET_STD)
    scheduler = StepScheduler(optimizer, "cosine", total_steps=10**6, warmup_steps=0)
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    epoch = itertools.count(1)

    class Ticks(Reporter):
        def __init__(self, timed: Timed):
            self.timed = timed

        def batch(self, epoch, batch, num_batches, images_per_s):
            self.timed.tick(device, last=batch == num_batches)

    def measure(count: int = n) -> Timed:
        e = next(epoch)
        generator = epoch_generator(0, e)
        timed = Timed(batch)
        batches = iterate_batches(splits["train"], batch, device, shuffle=True, generator=generator,
                                  drop_last=len(splits["train"]) > batch)
        train_one_epoch(model, itertools.islice(batches, count), transform, optimizer, scheduler, criterion,
                        device, epoch=e, num_batches=min(count, len(splits["train"]) // batch or 1),
                        reporter=Ticks(timed),
                        generator=generator, scaler=scaler, amp_dtype=amp_dtype, grad_clip=1.0)
        batches.close()
        return timed.close()

    return measure


def plain_transform(size: int, crop: str):
    from torchvision import transforms as T

    first = T.Resize((size, size)) if crop == "resize" else T.RandomResizedCrop(size)
    return T.Compose([first, T.RandomHorizontalFlip(), T.RandomRotation(10),
                      T.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2), T.ToTensor(),
                      T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])


def plain_side(data_dir: Path, size: int, batch: int, n: int, workers: int, crop: str,
               device) -> Callable[[], Timed]:
    """The tutorial recipe: fp32, contiguous, PIL transforms in DataLoader workers (pinned memory on a GPU)."""
    import torch
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder

    dataset = ImageFolder(str(data_dir), transform=plain_transform(size, crop))
    _, _, _, step = build_step(size, False, len(dataset.classes), device)
    generator = torch.Generator().manual_seed(2)
    n = min(n, len(dataset) // batch or 1)

    def measure(count: int = n) -> Timed:
        timed = Timed(batch)
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                            generator=generator, pin_memory=device.type == "cuda")
        for i, (inputs, labels) in enumerate(itertools.islice(loader, count)):
            step(inputs, labels)
            timed.tick(device, last=i == count - 1)
        del loader  # its workers exit here, so their CPU time is counted
        return timed.close()

    return measure


def warm(measure: Callable[..., Timed], steps: int = 3) -> None:
    """A short untimed segment per side: oneDNN builds its kernels for a shape on first use."""
    measure(steps)


def run_size(args, size: int, splits: dict, num_classes: int, device, amp_dtype) -> dict:
    n = args.batches
    makers = {
        "bare": lambda: bare_side(size, args.batch_size, n, True, num_classes, device, amp_dtype),
        "bare_nchw": lambda: bare_side(size, args.batch_size, n, False, num_classes, device, amp_dtype),
        "bare_fp32": lambda: bare_side(size, args.batch_size, n, False, num_classes, device, None),
        "engine": lambda: engine_side(splits, size, args.batch_size, n, num_classes, device, amp_dtype),
        "plain": lambda: plain_side(args.data_dir, size, args.batch_size, args.plain_batches, args.workers,
                                    args.plain_crop, device),
    }
    sides = {name: makers[name]() for name in args.sides}
    for name in args.sides:
        warm(sides[name], 1 if args.quick else 3)
    timings: dict[str, list[Timed]] = {name: [] for name in args.sides}
    loads: list[float] = []

    def run(name: str) -> Callable[[], float]:
        def once() -> float:
            timed = sides[name]()
            timings[name].append(timed)
            loads.append(common.loadavg()[0])
            print(f"  {size}px round {len(timings[name])} {name:9s} {timed.rate():7.1f} img/s "
                  f"(steady {timed.steady():7.1f}, {timed.per_cpu():6.1f} img/cpu-s)  load {loads[-1]:.2f}",
                  flush=True)
            return timed.rate()
        return once

    common.interleave({name: run(name) for name in args.sides}, args.rounds)
    out = {"size": size, "batches_per_round": n, "plain_batches_per_round": args.plain_batches,
           "rounds": args.rounds,
           "loadavg_during": [min(loads), common.median(loads), max(loads)]}
    for name, segs in timings.items():
        out[name] = {"images_per_s": common.median([t.rate() for t in segs]),
                     "steady_images_per_s": common.median([t.steady() for t in segs]),
                     "images_per_cpu_s": common.median([t.per_cpu() for t in segs]),
                     "rounds": [round(t.rate(), 2) for t in segs]}
    return out


def ratios(result: dict) -> dict:
    def r(a: str, b: str, key: str = "images_per_s") -> float:
        if a in result and b in result:
            return result[a][key] / result[b][key]
        return float("nan")

    return {"engine_vs_bare": r("engine", "bare"), "engine_vs_plain": r("engine", "plain"),
            "plain_vs_bare": r("plain", "bare"), "channels_last_vs_nchw": r("bare", "bare_nchw"),
            "bare_vs_bare_fp32": r("bare", "bare_fp32"),
            "engine_vs_bare_per_cpu": r("engine", "bare", "images_per_cpu_s")}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=None,
                        help="batches per round for bare/engine (default 6: short rounds, many of them, so a burst "
                             "of load on the shared machine hits few)")
    parser.add_argument("--plain-batches", type=int, default=None,
                        help="batches per round for plain (default 20: its 4 loader processes start every epoch, "
                             "a cost a real epoch spreads over its batches)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default 6)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the plain recipe")
    parser.add_argument("--plain-crop", choices=["resize", "rrc"], default="resize",
                        help="plain recipe's first transform: Resize((s, s)) squash or RandomResizedCrop(s)")
    parser.add_argument("--sides", nargs="+", default=["bare", "bare_nchw", "engine", "plain"],
                        choices=["bare", "bare_nchw", "bare_fp32", "engine", "plain"],
                        help="bare_fp32: contiguous without AMP (only differs from bare_nchw with --amp)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (bench_gpu.py runs this with cuda)")
    parser.add_argument("--amp", action="store_true",
                        help="autocast (bf16/fp16 as the engine picks; CUDA only) for bare, bare_nchw and engine")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="decoded-image cache to reuse (default: a fresh temporary one, so its build is timed)")
    args = common.parse(parser, argv, __file__)
    if args.quick:
        args.sizes = [s for s in args.sizes if s <= 64] or [32]
        args.batch_size = min(args.batch_size, 4)
        args.batches = args.batches or 2
        args.plain_batches = args.plain_batches or 2
        args.rounds = args.rounds or 1
        args.workers = min(args.workers, 1)
    args.batches = args.batches or 6
    args.plain_batches = args.plain_batches or 20
    args.rounds = args.rounds or 6

    import torch

    common.ensure_repo_on_path()
    from shared.training.engine import autocast_dtype, pick_device

    device = pick_device(args.device)
    amp_dtype = autocast_dtype(device, args.amp)
    print(f"load before: {common.loadavg()}; torch threads {torch.get_num_threads()}; device {device}, "
          f"autocast {amp_dtype}")
    manifest, split_seconds = common.make_manifest(args.data_dir)
    num_classes = len(manifest["classes"])
    tmp = tempfile.TemporaryDirectory(prefix="bench_cache_") if args.cache_dir is None else None
    cache_dir = Path(tmp.name) if tmp else args.cache_dir
    results, prep = [], {"dataset_check_and_split_seconds": split_seconds, "images": len(manifest["files"]),
                         "cache": {}}
    try:
        for size in args.sizes:
            splits, info = common.load_engine_splits(manifest, size, cache_dir)
            prep["cache"][size] = {**info, "loadavg": common.loadavg()[0]}
            print(f"{size}px: decoded cache ({info['side']}px squares) "
                  f"{'hit' if info['cache_hit'] else 'built'} in {info['cache_seconds']:.1f} s")
            result = run_size(args, size, splits, num_classes, device, amp_dtype)
            result["ratios"] = ratios(result)
            results.append(result)
    finally:
        if tmp:
            tmp.cleanup()

    rows = []
    for res in results:
        for name in args.sides:
            rows.append({"size": res["size"], "side": name, "img/s (median)": res[name]["images_per_s"],
                         "steady img/s": res[name]["steady_images_per_s"],
                         "img/cpu-s": res[name]["images_per_cpu_s"],
                         "rounds": " ".join(f"{x:.1f}" for x in res[name]["rounds"])})
    common.print_table(rows, title=f"Training throughput, ResNet18, batch {args.batch_size}, {device}"
                                   f"{', autocast ' + str(amp_dtype) if amp_dtype else ''}")
    summary = []
    for res in results:
        rr = res["ratios"]
        ok = rr["engine_vs_bare"] >= TARGET_ENGINE_VS_BARE
        summary.append({"size": res["size"], "engine/bare": f"{rr['engine_vs_bare']:.1%}",
                        "target": f">= {TARGET_ENGINE_VS_BARE:.0%}", "verdict": common.verdict(ok, args.quick),
                        "engine/plain": f"{rr['engine_vs_plain']:.2f}x", "plain/bare": f"{rr['plain_vs_bare']:.1%}",
                        "channels_last/nchw": f"{rr['channels_last_vs_nchw']:.2f}x",
                        "engine/bare per cpu-s": f"{rr['engine_vs_bare_per_cpu']:.1%}",
                        "load min/med/max": "/".join(f"{x:.1f}" for x in res["loadavg_during"])})
    common.print_table(summary, title="Ratios (medians of interleaved rounds)")
    print(f"\none-time: dataset check + split {split_seconds:.1f} s for {len(manifest['files'])} images; "
          + "; ".join(f"cache {s}px {'hit' if c['cache_hit'] else 'build'} {c['cache_seconds']:.1f} s"
                      for s, c in prep["cache"].items()))
    return common.finish(args, "train_throughput", {"settings": {
        "sizes": args.sizes, "batch_size": args.batch_size, "batches": args.batches,
        "plain_batches": args.plain_batches, "rounds": args.rounds,
        "workers": args.workers, "plain_crop": args.plain_crop, "device": str(device), "amp": str(amp_dtype),
        "threads": torch.get_num_threads()}, "prep": prep, "results": results})


if __name__ == "__main__":
    main()
