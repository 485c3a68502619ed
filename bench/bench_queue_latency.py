"""Item 5 — queue latency: submit → RUNNING on an idle worker, and epoch end → the new point visible on the page.

Starts a private Redis, a worker (`python -m worker`) and the page (`python -m ui`), warms the worker with one
run, then submits tiny runs one at a time through the page's API (`/submit_runs`, gradio_client) and polls the
page's status endpoints every `--poll` seconds:

  submit → RUNNING   from calling `/submit_runs` until `/run_status` lists the run as "running".
  epoch end → point  from the epoch's end in the worker until `/run_curves` (the endpoint the page's live
                     curves read, through Redis) returns the new epoch record. The epoch end is observed on disk:
                     `fit` starts writing the epoch's checkpoint (a `.best.pt.tmp*`/`.last.pt.tmp*` file appears)
                     right after the epoch's record is made; a watcher thread polls the run folder every 5 ms.
                     Also reported: from the epoch's line landing in metrics.jsonl (after the checkpoints).

The runs train on generated images (the latency is the queue's and the page's, not the data's; real photos
would only make each run longer): `--train-on-data-dir` uses `--data-dir` instead. Each measurement includes
the polling interval's granularity (up to `--poll`). Targets: p50 <= 1 s and p50 <= 3 s.

Run (full):  .venv/bin/python bench/bench_queue_latency.py --json bench/results/queue_latency.json
     quick:  .venv/bin/python bench/bench_queue_latency.py --quick
"""

from __future__ import annotations

import os
import tempfile
import threading
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS_S = {"submit_to_running": 1.0, "epoch_end_to_visible": 3.0}


class RunWatcher(threading.Thread):
    """Polls one run folder: when each epoch's checkpoint write starts and when its metrics line lands."""

    def __init__(self, run_dir: Path, interval: float = 0.005):
        super().__init__(daemon=True)
        self.run_dir, self.interval = run_dir, interval
        self.epoch_end: list[float] = []      # time the k-th epoch's first checkpoint temp file was seen
        self.metrics_line: list[float] = []   # time metrics.jsonl first had k lines
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            now = time.perf_counter()
            try:
                names = [e.name for e in os.scandir(self.run_dir)]
            except FileNotFoundError:
                names = []
            saving = any(n.startswith((".best.pt.tmp", ".last.pt.tmp")) for n in names)
            if saving and len(self.epoch_end) == len(self.metrics_line):
                self.epoch_end.append(now)
            try:
                lines = (self.run_dir / "metrics.jsonl").read_text().count("\n")
            except FileNotFoundError:
                lines = 0
            while len(self.metrics_line) < lines:
                if len(self.epoch_end) < len(self.metrics_line) + 1:  # the temp file came and went unseen
                    self.epoch_end.append(float("nan"))
                self.metrics_line.append(now)
            self.stop.wait(self.interval)


def status_of(client, run_id: str) -> str | None:
    for r in client.predict(api_name="/run_status"):
        if r["run_id"] == run_id:
            return r["status"]
    return None


def points_of(client, run_id: str) -> int:
    return len(client.predict([run_id], api_name="/run_curves").get(run_id) or [])


def wait_until(predicate, timeout: float, poll: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)


def submit(client, data_dir: Path, epochs: int, image_size: int, model: str = "resnet18") -> str:
    params = {"data_dir": str(data_dir), "models": [model], "lrs": [0.003], "batch_sizes": [8],
              "epochs": epochs, "image_size": image_size, "weights": "none", "warmup_epochs": 0}
    (run_id,) = client.predict(params, api_name="/submit_runs")
    return run_id


def measure_run(client, models: Path, data_dir: Path, args) -> dict:
    """Submit one run; time it to RUNNING, then time every epoch's point to the page; wait for it to end."""
    t0 = time.perf_counter()
    run_id = submit(client, data_dir, args.epochs, args.image_size, args.model)
    submit_call = time.perf_counter() - t0
    watcher = RunWatcher(models / run_id)
    watcher.start()
    wait_until(lambda: status_of(client, run_id) in ("running", "succeeded", "failed"), 300, args.poll,
               f"run {run_id} to start")
    to_running = time.perf_counter() - t0
    visible: list[float] = []
    final = None
    deadline = time.monotonic() + args.run_timeout
    while time.monotonic() < deadline:
        n = points_of(client, run_id)
        now = time.perf_counter()
        while len(visible) < n:
            visible.append(now)
        if len(visible) >= args.epochs:
            final = wait_until(lambda: (s := status_of(client, run_id)) in ("succeeded", "failed", "cancelled")
                               and s, args.run_timeout, 0.2, f"run {run_id} to finish")
            break
        time.sleep(args.poll)
    watcher.stop.set()
    watcher.join()
    if final != "succeeded":
        raise RuntimeError(f"run {run_id} ended as {final!r}; see the worker log")
    epoch_lat = [v - e for v, e in zip(visible, watcher.epoch_end)]
    line_lat = [v - m for v, m in zip(visible, watcher.metrics_line)]
    return {"run_id": run_id, "submit_call_s": submit_call, "submit_to_running_s": to_running,
            "epoch_end_to_visible_s": epoch_lat, "metrics_line_to_visible_s": line_lat}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="measured runs (one RUNNING sample each)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per run (one visibility sample each)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=60, help="generated training images")
    parser.add_argument("--poll", type=float, default=0.05, help="seconds between status calls")
    parser.add_argument("--run-timeout", type=float, default=600.0)
    parser.add_argument("--worker-threads", type=int, default=0, help="RESNET_LAB_WORKER_THREADS (0: default)")
    parser.add_argument("--train-on-data-dir", action="store_true",
                        help="train the runs on --data-dir instead of generated images")
    args = common.parse(parser, argv, __file__)
    args.model, env = "resnet18", {}
    if args.quick:  # one run of one epoch: one sample of each latency
        args.runs, args.epochs, args.images = 1, 1, 20
        # the tiny ResNet, and the worker's evaluation after the run without figures (t-SNE, Grad-CAM, galleries)
        args.model, env = common.TINY_MODEL, common.quick_env(RESNET_LAB_EVAL_FIGURES="none")
        args.worker_threads = args.worker_threads or 1

    print(f"load before: {common.loadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_queue_") as tmp:
        work = Path(tmp)
        models = work / "models"
        if args.train_on_data_dir:
            data_dir, roots = args.data_dir, [args.data_dir]
        else:
            data_dir = common.generate_photos(work / "data" / "generated", args.images)
            roots = [work / "data"]
        with common.Stack(work, models, roots, worker_threads=args.worker_threads, env=env) as stack:
            stack.start_redis()
            stack.start_worker_and_page()
            client = stack.client()
            warm = None
            if not args.quick:  # the first task imports torch & co. in the worker: not an idle worker's latency
                t = time.perf_counter()
                warm = measure_run(client, models, data_dir, args)
                print(f"warm-up run {time.perf_counter() - t:.1f} s (submit → running "
                      f"{warm['submit_to_running_s']:.2f} s, cold worker)", flush=True)
            runs, loads = [], []
            for i in range(args.runs):
                if warm or runs:  # after a run, let the worker go idle (acknowledge, fetch the next message)
                    time.sleep(1.0)
                out = measure_run(client, models, data_dir, args)
                out["loadavg"] = common.loadavg()[0]
                loads.append(out["loadavg"])
                runs.append(out)
                print(f"  run {i + 1}: submit → running {out['submit_to_running_s']:.2f} s; epoch end → visible "
                      + " ".join(f"{x:.2f}" for x in out["epoch_end_to_visible_s"]) + f" s; load {loads[-1]:.2f}",
                      flush=True)

    samples = {"submit_to_running": [r["submit_to_running_s"] for r in runs],
               "submit_call": [r["submit_call_s"] for r in runs],
               "epoch_end_to_visible": [x for r in runs for x in r["epoch_end_to_visible_s"] if x == x],
               "metrics_line_to_visible": [x for r in runs for x in r["metrics_line_to_visible_s"]]}
    rows, summary = [], {}
    for name, values in samples.items():
        target = TARGETS_S.get(name)
        p50, p95 = common.percentile(values, 50), common.percentile(values, 95)
        summary[name] = {"p50_s": p50, "p95_s": p95, "max_s": max(values, default=float("nan")), "n": len(values),
                         "target_p50_s": target}
        rows.append({"latency": name, "n": len(values), "p50 s": p50, "p95 s": p95,
                     "max s": max(values, default=float("nan")), "target p50": f"<= {target:g} s" if target else "-",
                     "verdict": common.verdict(p50 <= target, args.quick) if target else "-"})
    common.print_table(rows, title=f"Queue latency through the page's API (poll every {args.poll:g} s)", digits=2)
    return common.finish(args, "queue_latency", {
        "settings": {"runs": args.runs, "epochs": args.epochs, "model": args.model, "image_size": args.image_size,
                     "poll_s": args.poll,
                     "generated_images": None if args.train_on_data_dir else args.images},
        "warmup_run": warm, "runs": runs, "results": summary,
        "loadavg_during": [min(loads, default=float("nan")), max(loads, default=float("nan"))]})


if __name__ == "__main__":
    main()
