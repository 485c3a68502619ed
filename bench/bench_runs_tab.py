"""Issue 18 — the Runs tab with many runs: how long opening it takes and how much each 2-second refresh sends.

Creates `--runs` (500) run folders with the store's own writers (RunStore.create / set_status / annotate; each
with a metrics.jsonl of `--epochs` epoch records as the engine writes them, the newest two still running),
mirrors them into a private Redis the way a worker does, builds the real page (`build_app`) on them and runs its
events through Gradio's own pipeline (`Blocks.process_api`: preprocess, handler, postprocess — what the browser's
calls run, without the HTTP hop) in one session:

  open       selecting the Runs tab (the forced refresh: table page, selector, charts, comparison, sweep)
  open 12    the same with 12 runs selected (curves, comparison table, sweep of 12 runs)
  tick idle  a timer refresh when nothing changed
  tick live  a timer refresh after one running run on the shown page reported a new epoch

and the JSON size of what each answer sends (outputs left out by the handler count as the few bytes Gradio sends
for "no change"). Target: open < 2 s with 500 runs.

Run (full):  .venv/bin/python bench/bench_runs_tab.py --json bench/results/runs_tab.json
     quick:  .venv/bin/python bench/bench_runs_tab.py --quick
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

common.ensure_repo_on_path()

TARGET_OPEN_S = 2.0


def make_runs(models: Path, data_dir: Path, count: int, epochs: int) -> list[str]:
    """`count` run folders written by the store's own writers: a grid over lr x batch size, most succeeded."""
    from shared.runs.store import RunStore
    from shared.training.config import TrainConfig

    store = RunStore(models)
    ids = []
    for i in range(count):
        lr, batch = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)[i % 5], (16, 32, 64, 128)[(i // 5) % 4]
        config = TrainConfig(data_dir=str(data_dir), weights="none", lr=lr, batch_size=batch, epochs=epochs,
                             model=("resnet18", "resnet34")[i % 2], seed=i)
        run_id = store.create(config)
        store.set_status(run_id, "running")
        acc = 0.3 + 0.6 * ((i * 37) % 100) / 100
        history = [{"epoch": e, "stage": "full", "train_loss": 2.0 / e, "train_acc": acc * e / epochs,
                    "val_loss": 2.2 / e, "val_acc": acc * e / epochs, "lr": lr, "images_per_s": 150.0 + i,
                    "seconds": 10.0 * e} for e in range(1, epochs + 1)]
        with open(store.path(run_id) / "metrics.jsonl", "w") as fh:  # as the engine appends it, epoch by epoch
            fh.writelines(json.dumps(h) + "\n" for h in history)
        if i < count - 2:  # the newest two still running (a worker or two busy)
            store.set_status(run_id, "succeeded", best={"best_val_acc": acc, "best_epoch": epochs,
                                                         "images_per_s": 150.0 + i})
        if i % 7 == 0:
            store.annotate(run_id, tags=f"sweep-{i % 3} bench", note=f"run {i}")
        ids.append(run_id)
    return ids


def run_event(demo, session, fn, inputs):
    t0 = time.perf_counter()
    out = asyncio.run(demo.process_api(block_fn=fn, inputs=inputs, state=session))
    seconds = time.perf_counter() - t0
    return seconds, len(json.dumps(out["data"], default=str)), out


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    parser.set_defaults(data_dir=Path(__file__).resolve().parent)  # no images are read: the runs are made up
    args = common.parse(parser, argv, __file__)
    if args.quick:
        args.runs, args.epochs, args.repeats = 14, 2, 1

    from gradio.state_holder import SessionState

    from shared.launch.services import start_redis
    from shared.runs.registry import RunRegistry
    from shared.runs.store import RunStore
    from shared.settings import Settings
    from ui.app import Lab, build_app

    with tempfile.TemporaryDirectory(prefix="bench-runs-tab-") as tmp:
        root = Path(tmp)
        data = root / "data" / "shapes"
        data.mkdir(parents=True)
        t0 = time.perf_counter()
        ids = make_runs(root / "models", data, args.runs, args.epochs)
        make_s = time.perf_counter() - t0
        redis = start_redis(root / "redis", appendonly=False)
        try:
            registry = RunRegistry.from_url(redis.url)
            registry.sync_from_store(RunStore(root / "models"))
            settings = Settings(models_dir=root / "models", data_roots=(root / "data",), redis_url=redis.url)
            lab = Lab(settings)
            demo = build_app(settings, lab)
            fns = list(demo.fns.values())
            refresh = next(f for f in fns if getattr(f.fn, "__name__", None) == "refresh_now")
            tick = next(f for f in fns if getattr(getattr(f.fn, "func", None), "__name__", None) == "tick")
            follow = next(f for f in fns if getattr(f.fn, "__name__", None) == "select_update")
            rows = []

            def measure(name, fn, inputs_of, before=None):
                times, sizes = [], []
                for _ in range(args.repeats):
                    session = SessionState(demo)
                    session[tick.inputs[8]._id] = "runs"  # the active tab
                    run_event(demo, session, refresh, [[], "both", "", "", "", "", 1, False, None])  # the tab is open
                    if before:
                        before()
                    seconds, size, _ = run_event(demo, session, fn, inputs_of())
                    times.append(seconds)
                    sizes.append(size)
                rows.append({"event": name, "median s": common.median(times), "max s": max(times),
                             "median bytes": common.median(sizes)})

            twelve = ids[-12:]
            # open: a fresh session, nothing sent yet
            times, sizes = [], []
            for _ in range(args.repeats):
                seconds, size, _ = run_event(demo, SessionState(demo), refresh, [[], "both", "", "", "", "", 1, False, None])
                times.append(seconds)
                sizes.append(size)
            rows.append({"event": "open", "median s": common.median(times), "max s": max(times),
                         "median bytes": common.median(sizes)})
            times, sizes = [], []
            for _ in range(args.repeats):
                session = SessionState(demo)
                # the selector learns its choices (a State it follows, as in the browser)
                _, _, out = run_event(demo, session, refresh, [[], "both", "", "", "", "", 1, False, None])
                [choices] = [v for b, v in zip(refresh.outputs, out["data"]) if b._id == follow.inputs[0]._id]
                run_event(demo, session, follow, [choices, []])
                seconds, size, _ = run_event(demo, session, refresh, [twelve, "both", "", "", "", "", 1, False, None])
                times.append(seconds)
                sizes.append(size)
            rows.append({"event": "open 12 selected", "median s": common.median(times), "max s": max(times),
                         "median bytes": common.median(sizes)})
            measure("tick idle", tick, lambda: [[], "both", "", "", "", "", 1, False, "runs", None])
            running = ids[-1]  # the newest: still running, on the first page
            state = {"epoch": 0}

            def new_epoch():
                state["epoch"] += 1
                registry.set_progress(running, {"epoch": state["epoch"], "epochs": 99, "phase": "training",
                                                "history": [{"epoch": e, "val_acc": 0.5, "train_acc": 0.5,
                                                             "val_loss": 1.0, "train_loss": 1.0}
                                                            for e in range(1, state["epoch"] + 1)]})

            measure("tick live", tick, lambda: [[], "both", "", "", "", "", 1, False, "runs", None], before=new_epoch)
        finally:
            redis.stop()
    common.print_table(rows, ["event", "median s", "max s", "median bytes"],
                       title=f"Runs tab with {args.runs} runs ({args.epochs} epochs each), {args.repeats} rounds")
    open_s = rows[0]["median s"]
    print(f"open < {TARGET_OPEN_S} s: {common.verdict(open_s < TARGET_OPEN_S, args.quick)} ({open_s:.2f} s); "
          f"{args.runs} run folders made in {make_s:.1f} s")
    return common.finish(args, "runs_tab", {"runs": args.runs, "epochs": args.epochs, "rows": rows,
                                            "target_open_s": TARGET_OPEN_S})


if __name__ == "__main__":
    main()
