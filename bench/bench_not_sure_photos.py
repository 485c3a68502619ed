"""Issue 15 — "not sure" on real photos: a run trained on the flower photos answers its own test split and
real photos of other things (a cheetah, a lion, a tower, a portrait, diagrams…).

Where `bench_not_sure.py` measures on generated classes, this reads a finished run (`--run`, e.g. one the
time-budget benchmark kept) and the Predictor the page uses: the share of the run's test-split photos it still
answers (and how often rightly), and the share of `--unseen` images it calls "not sure", by confidence and by
feature distance apart. Nothing is trained here.

Run:    .venv/bin/python bench/bench_not_sure_photos.py --run RUN_DIR --unseen FILE_OR_DIR ... --json OUT
quick:  .venv/bin/python bench/bench_not_sure_photos.py --quick --data-dir FOLDER  (trains a tiny run on FOLDER
        for one epoch and uses generated pictures as the unseen ones: the script's paths, not figures)
"""

from __future__ import annotations

from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished run folder (its test split is read from split.json)")
    parser.add_argument("--unseen", nargs="+", type=Path,
                        help="image files or folders of things the run was not trained on")
    args = common.parse(parser, argv, __file__)
    common.ensure_repo_on_path()
    if args.quick:
        args.run, args.unseen = quick_run(args.data_dir)
    elif not (args.run and args.unseen):
        parser.error("--run and --unseen are needed (or --quick)")
    from shared.analysis.calibration import read_calibration
    from shared.analysis.predict import Predictor
    from shared.data.images import expand_image_paths
    from shared.data.manifest import read_manifest

    manifest = read_manifest(args.run / "split.json")
    root = Path(manifest["root"])
    test = [(root / f["path"], manifest["classes"][int(f["label"])]) for f in manifest["files"]
            if f["split"] == "test"]
    unseen = expand_image_paths(args.unseen)
    predictor = Predictor(args.run)
    calibration = read_calibration(args.run)
    in_results = predictor.predict_many([path for path, _ in test], top_k=1)
    unseen_results = predictor.predict_many(unseen, top_k=1)
    in_ok = [(r, label) for r, (_, label) in zip(in_results, test) if not r["error"]]
    answered = [(r, label) for r, label in in_ok if r["sure"]]
    unseen_ok = [r for r in unseen_results if not r["error"]]
    if not in_ok or not unseen_ok:
        raise SystemExit(f"nothing to compare: {len(in_ok)} readable test-split images in {args.run} and "
                         f"{len(unseen_ok)} readable --unseen images; give a run with a test split and image files")
    below = [r for r in unseen_ok if r["top"][0]["probability"] < calibration.threshold]
    summary = {
        "test_images": len(in_ok), "test_accuracy_all": sum(r["top"][0]["class"] == label for r, label in in_ok)
        / len(in_ok),
        "test_answered": len(answered) / len(in_ok),
        "test_precision_answered": sum(r["top"][0]["class"] == label for r, label in answered) / max(len(answered), 1),
        "test_unfamiliar": sum(r["familiar"] is False for r, _ in in_ok) / len(in_ok),
        "unseen_images": len(unseen_ok),
        "unseen_not_sure": sum(not r["sure"] for r in unseen_ok) / len(unseen_ok),
        "unseen_below_threshold": len(below) / len(unseen_ok),
        "unseen_unfamiliar": sum(r["familiar"] is False for r in unseen_ok) / len(unseen_ok),
        "threshold": calibration.threshold,
        "distance_threshold": predictor.feature_distance.threshold if predictor.feature_distance else None,
    }
    per_image = [{"image": Path(r["source"]).name, "closest": r["top"][0]["class"],
                  "probability": r["top"][0]["probability"], "distance": r["distance"], "sure": r["sure"]}
                 for r in unseen_ok]
    common.print_table(per_image, ["image", "closest", "probability", "distance", "sure"],
                       title="unseen images, one by one", digits=3)
    common.print_table([summary], title=f"{args.run.name}: its test split vs {len(unseen_ok)} unseen images",
                       digits=3)
    return common.finish(args, "not_sure_photos", {"run": str(args.run), "summary": summary,
                                                    "unseen": per_image})


def quick_run(data_dir: Path) -> tuple[Path, list[Path]]:
    """A one-epoch tiny run on `data_dir` and a folder of generated pictures unlike it (kept in a temporary
    folder for the rest of the process)."""
    import tempfile

    import gen_images
    from shared.runs.store import RunStore
    from shared.training.config import TrainConfig
    from shared.training.engine import fit

    tmp = Path(tempfile.mkdtemp(prefix="bench-not-sure-photos-"))
    config = TrainConfig(data_dir=str(common.check_data_dir(data_dir)), model=common.use_tiny_model(),
                         weights="none", image_size=32, batch_size=8, epochs=1, val_ratio=0.25, test_ratio=0.25,
                         device="cpu", amp=False)
    store = RunStore(tmp / "models")
    run_id = store.create(config)
    fit(config, store.path(run_id), cache_dir=tmp / "cache")
    unseen = gen_images.make_classes(tmp / "unseen", [4], size=36, spread=1.0, seed=3, first_index=5)
    return store.path(run_id), [unseen]


if __name__ == "__main__":
    main()
