"""Issue 15 — an honest "not sure": images of a class the model never saw vs images of the classes it knows.

A model (ResNet18 from scratch) is trained on `--classes` generated classes (bench/gen_images.py); after training
`fit` fits the temperature and the "not sure" threshold on the validation split (target precision 0.95). Then the
Predictor answers fresh in-class images and images of one more generated class it never saw (the next colour on
the circle): "not sure" below the confidence threshold or beyond the feature distance (feature_distance.py), each
reason also counted apart. Targets (issue 15): >= 70% of the unseen class answered "not sure", >= 90% of in-class images still
answered; ECE after temperature scaling below ECE before, accuracy unchanged.

Run:    .venv/bin/python bench/bench_not_sure.py --json bench/results/not_sure.json
quick:  .venv/bin/python bench/bench_not_sure.py --quick
"""

from __future__ import annotations

import tempfile
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gen_images  # noqa: E402


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.set_defaults(data_dir=Path(tempfile.gettempdir()))  # the images are generated; --data-dir is unused
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--per-class", type=int, default=150, help="training images per known class")
    parser.add_argument("--test-per-class", type=int, default=50)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--spread", type=float, default=1.0, help="colour distance between classes")
    parser.add_argument("--colour-jitter", type=float, default=0.0, help="per-image colour noise (classes overlap)")
    parser.add_argument("--size", type=int, default=48)
    args = common.parse(parser, argv, __file__)
    common.ensure_repo_on_path()
    from shared.analysis.calibration import read_calibration
    from shared.analysis.predict import Predictor
    from shared.runs.store import RunStore
    from shared.training.config import TrainConfig
    from shared.training.engine import fit

    model = "resnet18"
    if args.quick:  # the tiny ResNet: the same run and Predictor, a fraction of ResNet18's CPU time
        args.per_class, args.test_per_class, args.epochs, args.size = 12, 4, 1, 32
        model = common.use_tiny_model()
    with tempfile.TemporaryDirectory(prefix="bench-not-sure-") as tmp:
        tmp = Path(tmp)
        known = [f"c{i}" for i in range(args.classes)]
        train_dir = gen_images.make_classes(tmp / "train", [args.per_class] * args.classes, size=args.size + 8,
                                            spread=args.spread, colour_jitter=args.colour_jitter, seed=1)
        test_dir = gen_images.make_classes(tmp / "test", [args.test_per_class] * args.classes, size=args.size + 8,
                                           spread=args.spread, colour_jitter=args.colour_jitter, seed=2)
        unseen_dir = gen_images.make_classes(tmp / "unseen", [2 * args.test_per_class], size=args.size + 8,
                                             spread=args.spread, colour_jitter=args.colour_jitter, seed=3,
                                             first_index=args.classes)
        config = TrainConfig(data_dir=str(train_dir), model=model, weights="none", image_size=args.size,
                             batch_size=32, lr=1e-3, epochs=args.epochs, augment="light", val_ratio=0.2,
                             test_ratio=0.0, device="cpu", amp=False, seed=0)
        store = RunStore(tmp / "models")
        run_id = store.create(config)
        best = fit(config, store.path(run_id), cache_dir=tmp / "cache")
        calibration = read_calibration(store.path(run_id))
        predictor = Predictor(store.path(run_id))
        in_files = sorted(test_dir.rglob("*.png"))
        in_results = predictor.predict_many(in_files, top_k=1)
        unseen_results = predictor.predict_many(sorted(unseen_dir.rglob("*.png")), top_k=1)
    answered = [r for r in in_results if r["sure"]]
    right = sum(r["top"][0]["class"] == Path(r["source"]).parent.name for r in answered)
    summary = {
        "val_accuracy": calibration.val_accuracy, "n_val": calibration.n_val,
        "temperature": calibration.temperature, "threshold": calibration.threshold,
        "ece_before": calibration.ece_before, "ece_after": calibration.ece_after,
        "in_class_answered": len(answered) / len(in_results),
        "in_class_accuracy_all": sum(r["top"][0]["class"] == Path(r["source"]).parent.name
                                     for r in in_results) / len(in_results),
        "in_class_precision_answered": right / max(len(answered), 1),
        "unseen_not_sure": sum(not r["sure"] for r in unseen_results) / len(unseen_results),
        # the two reasons apart: below the confidence threshold, and beyond the feature distance
        "unseen_below_threshold": sum(r["top"][0]["probability"] < calibration.threshold
                                      for r in unseen_results) / len(unseen_results),
        "unseen_unfamiliar": sum(r["familiar"] is False for r in unseen_results) / len(unseen_results),
        "in_class_unfamiliar": sum(r["familiar"] is False for r in in_results) / len(in_results),
        "distance_threshold": predictor.feature_distance.threshold if predictor.feature_distance else None,
        "best_val_acc": best["best_val_acc"], "load": common.loadavg()[0],
    }
    common.print_table([summary], title=f"{args.classes} known generated classes + 1 unseen, ResNet18 from scratch",
                       digits=3)
    ok = summary["unseen_not_sure"] >= 0.70 and summary["in_class_answered"] >= 0.90
    print(f"unseen class 'not sure' {summary['unseen_not_sure']:.1%} (>= 70%), in-class answered "
          f"{summary['in_class_answered']:.1%} (>= 90%) → {common.verdict(ok, args.quick)}; ECE "
          f"{summary['ece_before']:.3f} → {summary['ece_after']:.3f} → "
          f"{common.verdict(summary['ece_after'] < summary['ece_before'], args.quick)}")
    return common.finish(args, "not_sure", {"settings": {k: getattr(args, k) for k in (
        "classes", "per_class", "test_per_class", "epochs", "spread", "colour_jitter", "size")}, "known": known, "summary": summary})


if __name__ == "__main__":
    main()
