"""Issue 15 — class imbalance: a 20:5:1 training set, trained as if balanced vs class-weighted loss vs balanced sampler.

The images are generated (bench/gen_images.py: classes told apart by colour only, under noise and brightness
jitter). Training: ResNet18 from scratch, the same split and seed for every side, fixed epochs. Scored on a
separate generated test folder with the same 20:5:1 skew (large enough that the minority class has `--test-minority`
images): the minority class's recall, macro F1 and plain accuracy.

`--photos DIR` cuts the same skew from a real image folder instead (e.g. the flower photos): `--photo-classes`
(largest first) get 20k:5k:k training and 20t:5t:t test images drawn at random, disjoint, linked in place (the
photos are never copied).

Target (issue 15): minority recall +15 points and macro F1 +5 points over "none", accuracy at most 2 points lower.

Run:    .venv/bin/python bench/bench_imbalance.py --json bench/results/imbalance.json
quick:  .venv/bin/python bench/bench_imbalance.py --quick
"""

from __future__ import annotations

import tempfile
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gen_images  # noqa: E402

SIDES = ("none", "weighted_loss", "sampler")


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(data_dir=Path(tempfile.gettempdir()))  # the images are generated; --data-dir is unused
    parser.add_argument("--minority", type=int, default=20, help="training images of the smallest class (x5, x20)")
    parser.add_argument("--test-minority", type=int, default=30, help="test images of the smallest class")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--spread", type=float, default=0.2, help="colour distance between classes (smaller: harder)")
    parser.add_argument("--colour-jitter", type=float, default=8.0,
                        help="per-image colour noise: the classes overlap, so a skew moves the decision boundary")
    parser.add_argument("--by", choices=("colour", "pattern"), default="colour",
                        help="what tells the classes apart (bench/gen_images.py): colour (overlapping under "
                             "--colour-jitter) or the stripe pattern (every image unambiguous, learnt from examples)")
    parser.add_argument("--noise", type=float, default=30.0, help="per-pixel noise of the generated images")
    parser.add_argument("--photos", type=Path, default=None,
                        help="cut the 20:5:1 sets from this real image folder (one sub-folder per class) instead")
    parser.add_argument("--photo-classes", nargs=3, default=["dandelion", "tulips", "sunflowers"],
                        help="with --photos: the majority, middle and minority class folders")
    parser.add_argument("--augment", default="light", help="the training augmentation (TrainConfig.augment)")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--sides", nargs="+", default=list(SIDES), choices=SIDES)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="training seeds (same images): one run per side and seed, the table shows each and the "
                             "mean; with a validation split of 2-3 minority images one seed is mostly noise")
    args = common.parse(parser, argv, __file__)
    common.ensure_repo_on_path()
    from shared.analysis.evaluation import evaluate_run
    from shared.runs.store import RunStore
    from shared.training.config import TrainConfig
    from shared.training.engine import fit

    model = "resnet18"
    if args.quick:  # the tiny ResNet: the same three runs, a fraction of ResNet18's CPU time
        args.minority, args.test_minority, args.epochs, args.size = 2, 2, 1, 32
        model = common.use_tiny_model()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-imbalance-") as tmp:
        tmp = Path(tmp)
        train_dir, test_dir, names = make_sets(args, tmp)
        store = RunStore(tmp / "models")
        for seed in args.seeds:
            for side in args.sides:
                config = TrainConfig(data_dir=str(train_dir), model=model, weights="none", image_size=args.size,
                                     batch_size=32, lr=1e-3, epochs=args.epochs, augment=args.augment, val_ratio=0.2,
                                     test_ratio=0.0, balance=side, device="cpu", amp=False, seed=seed)
                run_id = store.create(config)
                best = fit(config, store.path(run_id), cache_dir=tmp / "cache")
                ev = evaluate_run(store.path(run_id), data_dir=test_dir, figures="none")
                recall = {c["class"]: c["recall"] for c in ev["per_class"]}
                rows.append({"balance": side, "seed": seed, "picked_by": best["select_by"],
                             "best_epoch": best["best_epoch"], "minority_recall": recall[names[2]],
                             "middle_recall": recall[names[1]], "majority_recall": recall[names[0]],
                             "macro_f1": ev["macro"]["f1"], "accuracy": ev["accuracy"], "load": common.loadavg()[0]})
                print(rows[-1], flush=True)
    if len(args.seeds) > 1:  # each side's mean over the seeds, after its runs
        for side in args.sides:
            runs = [r for r in rows if r["balance"] == side and r["seed"] != "mean"]
            rows.append({"balance": side, "seed": "mean", "picked_by": runs[0]["picked_by"], "best_epoch": None,
                         **{k: sum(r[k] for r in runs) / len(runs) for k in (
                             "minority_recall", "middle_recall", "majority_recall", "macro_f1", "accuracy", "load")}})
    for r in rows:
        base = next((b for b in rows if b["balance"] == args.sides[0] and b["seed"] == r["seed"]), None)
        if base is None:
            continue
        r["d_minority"] = round(100 * (r["minority_recall"] - base["minority_recall"]), 1)
        r["d_macro_f1"] = round(100 * (r["macro_f1"] - base["macro_f1"]), 1)
        r["d_accuracy"] = round(100 * (r["accuracy"] - base["accuracy"]), 1)
    common.print_table(rows, ["balance", "seed", "picked_by", "best_epoch", "minority_recall", "middle_recall",
                              "majority_recall", "macro_f1", "accuracy", "d_minority", "d_macro_f1", "d_accuracy",
                              "load"], title="20:5:1 generated classes, ResNet18 from scratch", digits=3)
    judged = [r for r in rows if r["balance"] != args.sides[0] and "d_minority" in r
              and (r["seed"] == "mean" or len(args.seeds) == 1)]
    for r in judged:
        ok = r["d_minority"] >= 15 and r["d_macro_f1"] >= 5 and r["d_accuracy"] >= -2
        print(f"{r['balance']}: minority recall {r['d_minority']:+.1f}, macro F1 {r['d_macro_f1']:+.1f}, accuracy "
              f"{r['d_accuracy']:+.1f} points → {common.verdict(ok, args.quick)}")
    return common.finish(args, "imbalance", {"settings": {k: getattr(args, k) for k in (
        "minority", "test_minority", "epochs", "photos", "photo_classes", "augment", "by", "noise", "spread",
        "colour_jitter", "size", "sides", "seeds")}, "rows": rows})


def make_sets(args, tmp: Path) -> tuple[Path, Path, list[str]]:
    """The 20:5:1 training and test folders, and their class names (majority, middle, minority)."""
    train_counts = [20 * args.minority, 5 * args.minority, args.minority]
    test_counts = [20 * args.test_minority, 5 * args.test_minority, args.test_minority]
    if args.photos:
        return (*cut_photos(common.check_data_dir(args.photos), args.photo_classes, tmp, train_counts, test_counts),
                list(args.photo_classes))
    made = {name: gen_images.make_classes(tmp / name, counts, size=args.size + 4, spread=args.spread,
                                          colour_jitter=args.colour_jitter, seed=seed, by=args.by, noise=args.noise)
            for name, counts, seed in (("train", train_counts, 1), ("test", test_counts, 2))}
    return made["train"], made["test"], ["c0", "c1", "c2"]


def cut_photos(root: Path, classes, tmp: Path, train_counts, test_counts) -> tuple[Path, Path]:
    """Disjoint random training and test draws of each class's photos, as links to the files in place."""
    import random

    rng = random.Random(0)
    for name, n_train, n_test in zip(classes, train_counts, test_counts):
        photos = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        if len(photos) < n_train + n_test:
            raise SystemExit(f"{root / name} has {len(photos)} photos; {n_train} + {n_test} are needed: lower "
                             "--minority or --test-minority")
        drawn = rng.sample(photos, n_train + n_test)
        for part, files in (("train", drawn[:n_train]), ("test", drawn[n_train:])):
            folder = tmp / part / name
            folder.mkdir(parents=True)
            for photo in files:
                (folder / photo.name).symlink_to(photo)
    return tmp / "train", tmp / "test"


if __name__ == "__main__":
    main()
