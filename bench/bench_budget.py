"""Issue 15 — the best model for a time budget: an ablation of recipe changes, one at a time, against the baseline.

Every variant is `resnet-lab train --time-budget MINUTES` (`shared.training.engine.fit` with `time_budget`), from
scratch, on the same split (make_split, seed 0, 70/15/15: the same files in the same splits for every variant),
then the best checkpoint is evaluated on the test split (`evaluate_run`, figures off). The budget covers the cache,
the timing steps, training and calibration; the evaluation is reserved for inside it too (see budget.py), and the
table shows the seconds each variant really used, evaluation included.

  baseline   ResNet18, 128 px, AdamW lr 1e-3, cosine with 1 warm-up epoch, label smoothing 0.1, "standard" augment,
             no progressive resizing (the budget mode's recipe before progressive resizing became its default)
  ema        + EMA of the weights (decay 0.999), evaluated and checkpointed
  tta        + flip test-time augmentation (validation, calibration, test)
  mixup      + mixup;  cutmix: + cutmix
  sgd        SGD + Nesterov, lr 0.05 (momentum 0.9)
  onecycle   one-cycle schedule instead of cosine
  px112      112 px;  px96: 96 px
  progressive  progressive resizing from 0.5x (64 px) to 128 px by 3/4 of the epochs; the plan counts the smaller
             epochs at their measured cost, so the budget buys more epochs
The variant that wins on *validation* by more than one standard error of that split is the one to keep (test
accuracy is reported, not chosen on; a smaller win is within one seed's spread).

`--on VARIANT` adds every variant to that one instead of to the baseline: the next step of keeping what wins is
to try each remaining change on top of the winner so far (`--on progressive`: on the budget mode's default now).
The reference row is then VARIANT alone, run in the same invocation, and the others are named "VARIANT+change".

Run (full, one budget):  .venv/bin/python bench/bench_budget.py --minutes 30 --json bench/results/budget_30.json
     some variants:      .venv/bin/python bench/bench_budget.py --minutes 10 --variants baseline ema tta
     on the default:     .venv/bin/python bench/bench_budget.py --minutes 30 --on progressive --variants ema tta
     quick:              .venv/bin/python bench/bench_budget.py --quick --data-dir DIR
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

TARGET_TEST_ACC = 0.82  # issue 15: ResNet18 from scratch, --time-budget 30 on 2 CPU cores
BASELINE = dict(model="resnet18", weights="none", image_size=128, batch_size=32, lr=1e-3, optimizer="adamw",
                scheduler="cosine", warmup_epochs=1, augment="standard", seed=0, val_ratio=0.15, test_ratio=0.15,
                device="cpu", amp=False, progressive_resize=0.0)
VARIANTS = {
    "baseline": {},
    "ema": {"ema_decay": 0.999},
    "tta": {"tta": True},
    "mixup": {"mix": "mixup"},
    "cutmix": {"mix": "cutmix"},
    "sgd": {"optimizer": "sgd", "lr": 0.05},
    "onecycle": {"scheduler": "onecycle"},
    "px112": {"image_size": 112},
    "px96": {"image_size": 96},
    "progressive": {"progressive_resize": 0.5},
}


def run_variant(name: str, changes: dict, data_dir: Path, minutes: float, models: Path, cache: Path,
                base: dict) -> dict:
    from shared.analysis.evaluation import evaluate_run
    from shared.data.manifest import read_manifest, split_counts
    from shared.runs.store import RunStore
    from shared.training.config import TrainConfig
    from shared.training.engine import fit

    config = TrainConfig(data_dir=str(data_dir), **{**base, **changes, "time_budget": minutes})
    store = RunStore(models)
    run_id = store.create(config)
    start = time.perf_counter()
    best = fit(config, store.path(run_id), cache_dir=cache)
    evaluation = evaluate_run(store.path(run_id), figures="none")
    seconds = time.perf_counter() - start
    n_val = sum(split_counts(read_manifest(store.path(run_id) / "split.json"))["val"].values())
    row = {"variant": name, "epochs": best["budget"]["planned_epochs"], "replans": len(best["budget"]["replans"]),
           "val_acc": best["best_val_acc"], "test_acc": evaluation["accuracy"],
           "test_macro_f1": evaluation["macro"]["f1"], "ece_before": best["calibration"]["ece_before"],
           "ece_after": best["calibration"]["ece_after"], "used_s": round(seconds, 1),
           "budget_s": minutes * 60, "load": common.loadavg()[0], "n_val": n_val}
    print(f"{name}: {row}", flush=True)
    return row


def keep_rule(reference: dict, candidates: list[dict]) -> dict:
    """The change to keep: the best on validation, if it beats the reference by more than one standard error of
    the reference's validation accuracy (binomial, sqrt(p(1-p)/n)); a smaller win is within one seed's spread."""
    p, n = reference["val_acc"], reference["n_val"]
    se_points = 100 * math.sqrt(p * (1 - p) / n)
    best = max(candidates, key=lambda r: r["val_acc"], default=None)
    won = best is not None and best["d_val"] > se_points
    return {"variant": best["variant"] if won else None, "se_points": round(se_points, 2)}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="time budget per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--on", choices=list(VARIANTS), default="baseline",
                        help="the recipe every variant is added to; it runs first, as the reference row")
    parser.add_argument("--cache-dir", type=Path, default=common.DEFAULT_CACHE_DIR)
    args = common.parse(parser, argv, __file__)
    common.ensure_repo_on_path()
    base = dict(BASELINE)
    if args.quick:  # seconds, on a few generated images: only checks that the script works
        args.minutes = 0.02  # a run always trains one epoch, however small its budget
        args.variants = ["baseline", "tta"]
        base.update(model=common.use_tiny_model(), image_size=32, batch_size=8, val_ratio=0.25, test_ratio=0.25)
    base.update(VARIANTS[args.on])
    # The reference first, then each variant once; "baseline" is the reference itself whatever --on names.
    added = [name for name in dict.fromkeys(args.variants) if name not in ("baseline", args.on)]
    if args.on == "baseline" and "baseline" not in args.variants:
        runs = [(name, name) for name in added]  # no reference asked for: the rows stand alone
    else:
        runs = [(args.on, "baseline")] + [(name if args.on == "baseline" else f"{args.on}+{name}", name)
                                          for name in added]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-budget-") as tmp:
        for row_name, name in runs:
            changes = dict(VARIANTS[name])
            if args.quick and "image_size" in changes:
                changes["image_size"] = 32
            rows.append(run_variant(row_name, changes, args.data_dir, args.minutes, Path(tmp) / "models",
                                    args.cache_dir, base))
    reference = rows[0] if runs[0][1] == "baseline" else None
    keep = None
    for r in rows:
        if reference is not None:
            r["d_val"] = round(100 * (r["val_acc"] - reference["val_acc"]), 1)
            r["d_test"] = round(100 * (r["test_acc"] - reference["test_acc"]), 1)
    common.print_table(rows, ["variant", "epochs", "replans", "val_acc", "test_acc", "d_val", "d_test",
                              "test_macro_f1", "ece_before", "ece_after", "used_s", "budget_s", "load"],
                       title=f"time budget {args.minutes:g} min per variant, ResNet18 from scratch, each added to {args.on}", digits=3)
    if reference is not None:
        keep = keep_rule(reference, rows[1:])
        print(f"keep (wins on validation by more than one standard error, {keep['se_points']:.1f} points): "
              f"{keep['variant'] or 'none: the reference stays'}")
    best_test = max(r["test_acc"] for r in rows)
    print(f"target: test accuracy >= {TARGET_TEST_ACC:.0%} at 30 minutes: "
          f"{common.verdict(best_test >= TARGET_TEST_ACC and args.minutes <= 30, args.quick)}")
    return common.finish(args, "budget", {"minutes": args.minutes, "on": args.on, "base": base, "rows": rows,
                                                "keep": keep})


if __name__ == "__main__":
    main()
