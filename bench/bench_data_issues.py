"""Issue 16 — finding bad data: label errors planted on purpose, and resized / re-compressed copies.

label errors  a generated image folder (tests/imagegen.py, learnable colour+stripe classes) with 5% of its images
              moved into another class folder; a short run of the tiny ResNet is trained on the noisy folder, then
              `find_data_issues` ranks every image by cleanlab's label quality (cross-validated linear probes on
              the run's frozen features). Reported: precision of the top k (k = number flipped), recall of the
              flipped files within the top 2k, and what cleanlab flagged; beside them a random ranking's expected
              precision (the flip rate).
copies        a folder of distinct generated scenes plus resized (0.5-0.9x) and re-compressed JPEG (quality 50-90)
              copies filed under another class. Reported: recall of the copy pairs, and false pairs (reported pairs
              that are not copies) as a share of the reported pairs and of all distinct pairs.

Targets (issue 16): precision@k >= 0.8, recall@2k >= 0.7; copies recall >= 95%, false pairs < 1%.

Run:   PYTHONPATH=$PWD .venv/bin/python bench/bench_data_issues.py [--per-class 100] [--epochs 4] [--json FILE]
quick: PYTHONPATH=$PWD .venv/bin/python bench/bench_data_issues.py --quick
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

common.ensure_repo_on_path()


def label_errors(work: Path, classes: int, per_class: int, epochs: int, seeds: list[int]) -> list[dict]:
    from shared.analysis.data_issues import find_data_issues
    from tests.imagegen import flip_labels, make_image_folder
    from tests.tiny import train_tiny

    rows = []
    for seed in seeds:
        base = work / f"labels-{seed}"
        data = make_image_folder(base / "data", classes=classes, per_class=per_class, size=48, seed=seed)
        flipped = flip_labels(data, 0.05, seed=seed)
        t0 = time.perf_counter()
        run = train_tiny(base / "models", data, epochs=epochs, seed=seed)
        train_s = time.perf_counter() - t0
        report = find_data_issues(base / "models" / run, data)
        quality = report["quality"]
        order = sorted(quality, key=lambda p: (quality[p], p))
        k = len(flipped)
        flagged = {r["file"] for r in report["rows"] if r["kind"] == "label"}
        rows.append({"seed": seed, "images": report["n"], "flipped": k,
                     "precision@k": len(set(order[:k]) & flipped) / k,
                     "recall@2k": len(set(order[:2 * k]) & flipped) / k,
                     "flagged": len(flagged), "flagged_precision": len(flagged & flipped) / max(1, len(flagged)),
                     "flagged_recall": len(flagged & flipped) / k, "random_precision": k / report["n"],
                     "train_s": round(train_s, 1), "issues_s": report["timings"]["total_s"]})
    return rows


def copies(work: Path, classes: int, per_class: int, n_copies: int, epochs: int, seeds: list[int]) -> list[dict]:
    from shared.analysis.data_issues import find_data_issues
    from tests.imagegen import make_scene_folder_with_copies
    from tests.tiny import train_tiny

    rows = []
    for seed in seeds:
        base = work / f"copies-{seed}"
        data, pairs = make_scene_folder_with_copies(base / "data", classes=classes, per_class=per_class,
                                                    copies=n_copies, seed=seed)
        run = train_tiny(base / "models", data, epochs=epochs, seed=seed, image_size=64)
        report = find_data_issues(base / "models" / run, data)
        found = {frozenset((r["file"], r["other"])) for r in report["rows"] if r["kind"] == "near_duplicate"}
        n = report["n"]
        distinct_pairs = n * (n - 1) // 2 - len(pairs)
        false = found - pairs
        rows.append({"seed": seed, "images": n, "copies": len(pairs), "reported": len(found),
                     "recall": len(found & pairs) / len(pairs), "false_pairs": len(false),
                     "false_share_of_reported": len(false) / max(1, len(found)),
                     "false_share_of_distinct": len(false) / distinct_pairs,
                     "issues_s": report["timings"]["total_s"]})
    return rows


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--copies", type=int, default=40)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--seeds", type=int, default=3)
    args = common.parse(parser, argv, "bench_data_issues.py")
    if args.quick:
        args.per_class, args.copies, args.seeds, args.epochs = 20, 6, 1, 2
    common.set_threads(1)
    from tests.tinymodel import register_tiny_resnet

    register_tiny_resnet()
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory(prefix="bench-issues-") as tmp:
        labels = label_errors(Path(tmp), args.classes, args.per_class, args.epochs, seeds)
        dups = copies(Path(tmp), args.classes, args.per_class // 2, args.copies, args.epochs, seeds)
    common.print_table(labels, digits=3, title="label errors (5% flipped; ranking by cleanlab label quality)")
    common.print_table(dups, digits=3, title="resized + re-compressed copies under another class")
    ok = (min(r["precision@k"] for r in labels) >= 0.8 and min(r["recall@2k"] for r in labels) >= 0.7
          and min(r["recall"] for r in dups) >= 0.95 and max(r["false_share_of_reported"] for r in dups) < 0.01)
    print(common.verdict(ok, args.quick))
    return common.finish(args, "data_issues", {"labels": labels, "copies": dups, "ok": ok})


if __name__ == "__main__":
    main()
