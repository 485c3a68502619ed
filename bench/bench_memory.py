"""Item 7 — memory: the worker's RSS across 10 sequential tiny runs, the page's RSS over 10 minutes of polling.

Starts a private Redis, a worker (`python -m worker`) and the page (`python -m ui`), then:

  1. submits tiny runs one at a time through the page's API (`/submit_runs`: generated images, 32 px, 2 epochs,
     each followed by the worker's evaluation) and samples the worker's RSS (process + children) after each
     finishes. After the first 3 runs:
  2. polls the page for `--poll-minutes` with those 3 runs listed: every 2 s `/run_status` + `/run_curves` through
     gradio_client (what a script or the Runs tab asks for), and — when Playwright and a Chromium are available
     — a headless browser keeps the page open on the Runs tab, so the page's own 2-s timer refreshes the table and
     curves as for a user. The page's RSS is sampled every 10 s.
  3. submits the remaining runs (worker sampled after each).

Growth = RSS after the last run − RSS after the first (the first run loads torch's kernels, the evaluation
libraries and the decoded-image cache once). Target: worker growth <= 100 MB over 10 runs; the page's growth
over the polling window is reported (no fixed target: it should be flat).

Run (full):  .venv/bin/python bench/bench_memory.py --json bench/results/memory.json
     quick:  .venv/bin/python bench/bench_memory.py --quick
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_queue_latency as queue  # noqa: E402
import common  # noqa: E402

TARGET_WORKER_GROWTH_MB = 100.0
CHROMIUM_PATHS = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")


def run_one(client, data_dir: Path, args) -> str:
    run_id = queue.submit(client, data_dir, args.epochs, args.image_size, args.model)
    status = queue.wait_until(
        lambda: (s := queue.status_of(client, run_id)) in ("succeeded", "failed", "cancelled") and s,
        args.run_timeout, 0.5, f"run {run_id} to finish")
    if status != "succeeded":
        raise RuntimeError(f"run {run_id} ended as {status!r}; see the worker log")
    return run_id


def open_browser(url: str, run_id: str):
    """(playwright, browser, None) with the page open on the Runs tab showing `run_id`, or (None, None, why not)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None, None, "playwright not installed"
    common.ensure_repo_on_path()
    from tests.browser import CHROMIUM_ARGS  # the flags the browser tests launch Chromium with

    executable = next((p for p in CHROMIUM_PATHS if Path(p).exists()), None) or shutil.which("chromium")
    pw = sync_playwright().start()
    try:
        browser = pw.chromium.launch(headless=True, args=CHROMIUM_ARGS,
                                     **({"executable_path": executable} if executable else {}))
        page = browser.new_page()
        # not "networkidle": the page's own timers keep the network busy, so it never idles
        page.goto(url, wait_until="domcontentloaded", timeout=120_000)
        page.click("#tab-runs-button", timeout=120_000)
        # the run in the table: the Runs tab's timer is refreshing it
        page.locator("#runs-table [role=row]", has_text=run_id).first.wait_for(timeout=60_000)
        return pw, browser, None
    except Exception as exc:  # noqa: BLE001 - no browser means API polling only; say why in the results
        pw.stop()
        return None, None, f"{exc.__class__.__name__}: {str(exc).splitlines()[0][:160]}"


def poll_page(stack, client, run_ids: list[str], minutes: float, use_browser: bool) -> dict:
    page_pid = stack.procs["page"][0].pid
    pw = browser = None
    browser_note = "disabled (--no-browser)"
    if use_browser:
        pw, browser, problem = open_browser(stack.url, run_ids[-1])
        browser_note = problem or "headless Chromium on the Runs tab"
    samples = [(0.0, common.rss_mb(page_pid))]
    start = next_sample = time.monotonic()
    calls = 0
    try:
        while time.monotonic() - start < minutes * 60:
            listed = [r["run_id"] for r in client.predict(api_name="/run_status")]
            client.predict(run_ids, api_name="/run_curves")
            calls += 2
            if time.monotonic() >= next_sample:
                samples.append((time.monotonic() - start, common.rss_mb(page_pid)))
                next_sample += 10.0
            time.sleep(2.0)
    finally:
        if browser is not None:
            browser.close()
            pw.stop()
    samples.append((time.monotonic() - start, common.rss_mb(page_pid)))
    rss = [s[1] for s in samples]
    return {"minutes": minutes, "runs_listed": len(listed), "api_calls": calls, "browser": browser_note,
            "rss_start_mb": rss[0], "rss_end_mb": rss[-1], "rss_max_mb": max(rss), "growth_mb": rss[-1] - rss[0],
            "samples": [(round(t, 1), round(m, 1)) for t, m in samples]}


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--images", type=int, default=60, help="generated training images")
    parser.add_argument("--poll-minutes", type=float, default=10.0)
    parser.add_argument("--listed", type=int, default=3, help="runs finished before the page polling window")
    parser.add_argument("--no-browser", action="store_true", help="poll through the API only")
    parser.add_argument("--run-timeout", type=float, default=600.0)
    parser.add_argument("--worker-threads", type=int, default=0)
    args = common.parse(parser, argv, __file__)
    args.model, env = "resnet18", {}
    if args.quick:  # two runs of one epoch (one growth sample), a few seconds of polling through the API
        args.runs, args.listed, args.poll_minutes, args.images, args.no_browser = 2, 1, 0.05, 20, True
        args.epochs = 1
        # the tiny ResNet, and the worker's evaluation after each run without figures (t-SNE, Grad-CAM, galleries)
        args.model, env = common.TINY_MODEL, common.quick_env(RESNET_LAB_EVAL_FIGURES="none")
        args.worker_threads = args.worker_threads or 1

    print(f"load before: {common.loadavg()}")
    with tempfile.TemporaryDirectory(prefix="bench_memory_") as tmp:
        work = Path(tmp)
        models = work / "models"
        data_dir = common.generate_photos(work / "data" / "generated", args.images)
        with common.Stack(work, models, [work / "data"], worker_threads=args.worker_threads, env=env) as stack:
            stack.start_redis()
            stack.start_worker_and_page()
            worker_pid = stack.procs["worker"][0].pid
            client = stack.client()
            worker = [{"after_run": 0, "rss_mb": common.rss_mb(worker_pid), "loadavg": common.loadavg()[0]}]
            print(f"worker idle: {worker[0]['rss_mb']:.0f} MB", flush=True)
            run_ids, page = [], None
            for i in range(1, args.runs + 1):
                t = time.perf_counter()
                run_ids.append(run_one(client, data_dir, args))
                worker.append({"after_run": i, "rss_mb": common.rss_mb(worker_pid), "loadavg": common.loadavg()[0],
                               "run_seconds": time.perf_counter() - t})
                print(f"  after run {i:2d}: worker {worker[-1]['rss_mb']:.0f} MB "
                      f"({worker[-1]['run_seconds']:.1f} s, load {worker[-1]['loadavg']:.2f})", flush=True)
                if i == args.listed:
                    print(f"polling the page for {args.poll_minutes:g} min with {i} runs listed ...", flush=True)
                    page = poll_page(stack, client, run_ids, args.poll_minutes, not args.no_browser)
                    print(f"  page {page['rss_start_mb']:.0f} → {page['rss_end_mb']:.0f} MB "
                          f"(max {page['rss_max_mb']:.0f}; {page['browser']})", flush=True)

    growth = worker[-1]["rss_mb"] - worker[1]["rss_mb"]
    rows = [{"process": "worker", "window": f"after run 1 → after run {args.runs}",
             "start MB": worker[1]["rss_mb"], "end MB": worker[-1]["rss_mb"],
             "max MB": max(w["rss_mb"] for w in worker), "growth MB": growth,
             "target": f"<= {TARGET_WORKER_GROWTH_MB:g} MB",
             "verdict": common.verdict(growth <= TARGET_WORKER_GROWTH_MB, args.quick)}]
    if page:
        rows.append({"process": "page", "window": f"{args.poll_minutes:g} min polling, {page['runs_listed']} runs",
                     "start MB": page["rss_start_mb"], "end MB": page["rss_end_mb"], "max MB": page["rss_max_mb"],
                     "growth MB": page["growth_mb"], "target": "flat (reported)", "verdict": "-"})
    common.print_table(rows, title="Resident memory (RSS, process + children)")
    print("worker RSS after each run (MB): " + " ".join(f"{w['rss_mb']:.0f}" for w in worker))
    return common.finish(args, "memory", {
        "settings": {"runs": args.runs, "epochs": args.epochs, "model": args.model, "image_size": args.image_size,
                     "generated_images": args.images, "poll_minutes": args.poll_minutes},
        "worker": worker, "worker_growth_mb": growth, "page": page})


if __name__ == "__main__":
    main()
