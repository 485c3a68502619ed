"""Item 6 — evaluation cost: a full `evaluate_run` of the flower_photos test split on CPU, and t-SNE alone.

`shared.analysis.evaluation.evaluate_run(run_dir, split="test")` does everything a user gets after training: inference over
the split (keeping probabilities and penultimate features), metrics, ROC/PR, calibration, t-SNE of the features,
the Grad-CAM gallery and every figure. Its own per-stage timings (inference, t-SNE, CAM, figures) are reported
next to the wall time, median over `--repeats`.

t-SNE alone: `shared.analysis.explain.tsne_embed` on the test split's 512-d penultimate features (what evaluate_run embeds),
median over `--repeats`. Target <= 15 s. The choice of t-SNE backend on ~3,000 x 512 features (scikit-learn vs
openTSNE) is measured by `bench/bench_tsne.py` (the evaluation suite's own benchmark), not repeated here.

The model is ResNet18 at 128 px with random weights (the cost does not depend on them) unless `--run-dir` points at
a trained run whose split.json covers the photos.

Run (full):  .venv/bin/python bench/bench_evaluation.py --json bench/results/evaluation.json
     quick:  .venv/bin/python bench/bench_evaluation.py --quick --data-dir DIR
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGET_TSNE_S = 15.0


def test_features(run_dir: Path, cache_dir: Path):
    """(N, 512) penultimate features of the run's best model over its test split, from the decoded cache."""
    import torch

    from shared.training.checkpoint import load_model_from_run
    from shared.data.manifest import read_manifest
    from shared.training.engine import extract_features
    from shared.training.models import Backbone, get_spec
    from shared.data.transforms import BatchTransform

    model, meta = load_model_from_run(run_dir, "best")
    manifest = read_manifest(run_dir / "split.json")
    splits, _ = common.load_engine_splits(manifest, int(meta["image_size"]), cache_dir)
    transform = BatchTransform("none", int(meta["image_size"]), meta["mean"], meta["std"])
    feats = extract_features(Backbone(model, get_spec(meta["model_name"])), splits["test"], transform, torch.device("cpu"), 64)
    return feats.numpy(), splits["test"].labels.numpy()


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="evaluate_run repeats (t-SNE alone: one more)")
    parser.add_argument("--run-dir", type=Path, default=None, help="evaluate this trained run instead")
    args = common.parse(parser, argv, __file__)
    if args.quick:
        args.image_size, args.repeats = 32, 1

    common.ensure_repo_on_path()
    from shared.analysis.evaluation import evaluate_run
    from shared.analysis.explain import tsne_embed

    print(f"load before: {common.loadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_eval_") as tmp:
        work = Path(tmp)
        if args.run_dir:
            run_dir = work / args.run_dir.name
            shutil.copytree(args.run_dir, run_dir, ignore=shutil.ignore_patterns("eval*", "last.pt"))
            prep_s = 0.0
        else:
            manifest, prep_s = common.make_manifest(args.data_dir)
            run_id = common.make_run(work / "models", str(args.data_dir), manifest["classes"], args.image_size,
                                     manifest=manifest)
            run_dir = work / "models" / run_id
        evals, tsne_s, loads = [], [], []
        for r in range(args.repeats):
            shutil.rmtree(run_dir / "eval", ignore_errors=True)
            t = time.perf_counter()
            result = evaluate_run(run_dir, split="test")
            wall = time.perf_counter() - t
            loads.append(common.loadavg()[0])
            evals.append({"wall_s": wall, **result["timings"], "n": result["n"], "loadavg": loads[-1]})
            print(f"  evaluate_run {r + 1}: {wall:.1f} s ({result['n']} images; " + ", ".join(
                f"{k} {v}" for k, v in result["timings"].items()) + f"; load {loads[-1]:.2f})", flush=True)
        figures = sorted(p.name for p in (run_dir / "eval").rglob("*.png"))
        features, labels = test_features(run_dir, work / "cache")
        for r in range(args.repeats + 1):
            t = time.perf_counter()
            tsne_embed(features)
            tsne_s.append(time.perf_counter() - t)
            loads.append(common.loadavg()[0])
            print(f"  tsne_embed {features.shape}: {tsne_s[-1]:.1f} s (load {loads[-1]:.2f})", flush=True)

    tsne = common.median(tsne_s)
    keys = ("wall_s", "inference_s", "tsne_s", "cam_s", "figures_s")
    rows = [{"stage": k.removesuffix("_s"), "seconds (median)": common.median([e[k] for e in evals if k in e])}
            for k in keys]
    rows.append({"stage": f"tsne_embed alone ({features.shape[0]}x{features.shape[1]})", "seconds (median)": tsne,
                 "target": f"<= {TARGET_TSNE_S:g} s", "verdict": common.verdict(tsne <= TARGET_TSNE_S, args.quick)})
    common.print_table(rows, title=f"Evaluation of the test split ({evals[0]['n']} images, ResNet18 "
                                   f"{args.image_size}px, CPU), {len(figures)} figures", digits=2)
    print("(t-SNE backend choice on 3,000 x 512 features: see bench/bench_tsne.py)")
    return common.finish(args, "evaluation", {
        "settings": {"image_size": args.image_size, "repeats": args.repeats,
                     "run_dir": str(args.run_dir) if args.run_dir else None},
        "prep": {"dataset_check_and_split_seconds": prep_s}, "evaluate_run": evals, "figures": figures,
        "tsne_seconds": tsne_s, "tsne_median_s": tsne, "features_shape": list(features.shape),
        "loadavg_during": [min(loads), max(loads)]})


if __name__ == "__main__":
    main()
