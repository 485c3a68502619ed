"""Item 8 — items 1 and 3 on a GPU: the engine (AMP + channels_last + decoded-cache inputs) vs the plain fp32 recipe.

Needs only torch, torchvision, numpy and Pillow (plus this repository): it drives the same code as
`bench_train_throughput.py` and `bench_linear_probe.py` with `--device cuda --amp`.

Training throughput, sides interleaved per round:
  bare       synthetic batch already on the GPU, autocast (bf16 where supported, else fp16) + channels_last, no
             per-step sync: the ceiling.
  bare_fp32  the same in fp32, contiguous: what the tutorial's model step costs.
  engine     `iterate_batches` (cache → pinned → GPU, one batch prefetched) + `BatchTransform` on the GPU +
             `train_one_epoch` with autocast + channels_last.
  plain      ImageFolder + PIL transforms + DataLoader(num_workers=4, pin_memory) + fp32 contiguous step.
Targets: engine >= 90% of bare (the input path never starves the GPU) and >= 2.5x plain, at every size.
Linear probe (item 3) on the GPU: cached features vs frozen backbone every epoch, 10 epochs, ratio reported.

The real photos live outside the repository; where they are missing (a lent GPU machine gets only the
repository) `--generate N` photo-like JPEGs of the same size class are written to a temporary folder instead.

Run:    .venv/bin/python bench/bench_gpu.py --json bench/results/gpu.json     (on a machine with CUDA)
quick:  .venv/bin/python bench/bench_gpu.py --quick --device cpu --data-dir DIR   (CI: exercises the code on CPU)
"""

from __future__ import annotations

import tempfile
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_VS_BARE = 0.90
TARGET_VS_PLAIN = 2.5


def main(argv=None) -> dict:
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 224])
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--batches", type=int, default=60, help="batches per side per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the plain recipe")
    parser.add_argument("--probe-size", type=int, default=224)
    parser.add_argument("--generate", type=int, default=None, metavar="N",
                        help="use N generated photo-like JPEGs (default: 3000 when --data-dir does not exist)")
    parser.add_argument("--skip-probe", action="store_true")
    pre, _ = parser.parse_known_args(argv)
    tmp = None
    if pre.generate or not Path(pre.data_dir).expanduser().is_dir():
        tmp = tempfile.TemporaryDirectory(prefix="bench_gpu_photos_")
        count = pre.generate or (60 if pre.quick else 3000)
        print(f"{pre.data_dir} not used: generating {count} photo-like JPEGs in {tmp.name}", flush=True)
        common.generate_photos(Path(tmp.name), count)
        argv = [*argv, "--data-dir", tmp.name]
    args = common.parse(parser, argv, __file__)
    try:
        return run(args, generated=tmp is not None)
    finally:
        if tmp:
            tmp.cleanup()


def run(args, generated: bool) -> dict:
    import torch

    import bench_linear_probe
    import bench_train_throughput

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here: nothing measured (run this on a GPU machine; --device cpu exercises the code)")
        return common.finish(args, "gpu", {"skipped": "no CUDA device"})
    common_args = ["--data-dir", str(args.data_dir), "--device", args.device, "--amp"]
    if args.quick:
        common_args.append("--quick")
    if args.threads:
        common_args += ["--threads", str(args.threads)]
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        sizing = [] if args.quick else ["--sizes", *map(str, args.sizes), "--batch-size", str(args.batch_size),
                                        "--batches", str(args.batches), "--rounds", str(args.rounds)]
        train = bench_train_throughput.main(common_args + sizing + [
            "--workers", str(args.workers), "--sides", "bare", "bare_fp32", "engine", "plain",
            "--json", str(Path(tmp) / "train.json")])
        probe = None
        if not args.skip_probe:
            size = [] if args.quick else ["--image-size", str(args.probe_size)]
            probe = bench_linear_probe.main(common_args + size + [
                "--cache-dir", str(Path(tmp) / "cache"), "--json", str(Path(tmp) / "probe.json")])
    rows = []
    for res in train["results"]:
        r = res["ratios"]
        ok_bare, ok_plain = r["engine_vs_bare"] >= TARGET_VS_BARE, r["engine_vs_plain"] >= TARGET_VS_PLAIN
        rows.append({"size": res["size"], "bare img/s": res["bare"]["images_per_s"],
                     "engine img/s": res["engine"]["images_per_s"], "plain img/s": res["plain"]["images_per_s"],
                     "engine/bare": f"{r['engine_vs_bare']:.1%} " + common.verdict(ok_bare, args.quick),
                     "engine/plain": f"{r['engine_vs_plain']:.2f}x {common.verdict(ok_plain, args.quick)}",
                     "amp/fp32 bare": f"{r['bare_vs_bare_fp32']:.2f}x"})
    common.print_table(rows, title=f"GPU summary (targets: engine >= {TARGET_VS_BARE:.0%} of bare, "
                                   f">= {TARGET_VS_PLAIN:g}x plain)")
    if probe:
        ps = probe["settings"]
        print(f"linear probe {ps['image_size']}px, {ps['epochs']} epochs: cached {probe['cached_seconds']:.1f} s, "
              f"frozen {probe['frozen_seconds']:.1f} s -> {probe['speedup']:.1f}x")
    return common.finish(args, "gpu", {"generated_photos": generated, "train_throughput": train,
                                       "linear_probe": probe, "summary": rows})


if __name__ == "__main__":
    main()
