"""Item 4 — prediction latency through the page's HTTP API (gradio_client), ResNet18 at 224 px, CPU, warm model.

Starts a private Redis and the page (`python -m ui`) on a free loopback port with one finished run (ResNet18,
224 px, random weights: latency does not depend on them), then calls the page's named endpoints the way a
script would, alternating the two kinds of call, after a few warm-up calls:

  top-5            `/predict_many` with one image: the page's path that returns top-5 without Grad-CAM
                   (it also writes the one-row CSV the page offers for download).
  top-5 + CAM      `/predict`: one image → top-5 and the Grad-CAM overlay (what the Predict tab shows).

Each call uploads the photo and waits for the answer: the latency a client sees. Two clients:

  *_client   gradio_client (`Client.predict` with `handle_file`), as the issue asks.
  *_rest     the same two requests by hand with httpx (POST /gradio_api/upload, POST /gradio_api/call/<name>, then
             read the SSE answer): Gradio's documented REST API, without gradio_client's own overhead (its SSE
             reader polls its message queue every 50 ms, several messages per call).

  top5_first_rest  /predict streams: the top-5 first, the Grad-CAM after it. This is when the top-5 arrived in
                   the `top5_cam_rest` calls (the label a user sees), not a call of its own.

For where the time goes, the same model is also timed in this process without HTTP (`Predictor.predict` and
`Predictor.explain`), and `/run_status` (no upload, no model) gives the floor of one API call for each client.
Side by side in this process, on the same preprocessed photo: the forward pass through torch and through ONNX
Runtime (the run exported with `shared.export`), and the overlay's encoding as PNG and as JPEG (what the page sends
for the heat-map). The kinds of call take turns (rotating who goes first). p50/p95 (nearest rank) over `--calls` calls each.
Targets: p95 <= 100 ms (top-5) and <= 250 ms (top-5 + CAM), judged for both clients.

With `--py-spy SECONDS` (py-spy installed), the page process is then sampled while top-5 calls through each
client run back to back, and its Python CPU time per call is split into model forward, image decode + preprocess,
the rest of our handler, and Gradio/HTTP: where the time goes when a target is missed.

Run (full):  .venv/bin/python bench/bench_predict_latency.py --py-spy 20 --json bench/results/predict_latency.json
     quick:  .venv/bin/python bench/bench_predict_latency.py --quick --data-dir DIR
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TARGETS_MS = {"top5_client": 100.0, "top5_cam_client": 250.0, "top5_rest": 100.0, "top5_cam_rest": 250.0,
              "top5_first_rest": 100.0}


class RestClient:
    """Gradio's REST API by hand: upload a file, call a named endpoint, read its server-sent answer."""

    def __init__(self, url: str):
        import httpx

        self.http = httpx.Client(base_url=url, timeout=120, trust_env=False)

    def upload(self, path: Path) -> dict:
        with open(path, "rb") as fh:
            response = self.http.post("/gradio_api/upload", files={"files": (path.name, fh)})
        response.raise_for_status()
        return {"path": response.json()[0], "orig_name": path.name, "meta": {"_type": "gradio.FileData"}}

    def call(self, api_name: str, data: list):
        """The endpoint's final answer; `self.first_answer_s` is when its first answer arrived (a streaming
        handler's first yield — /predict's top-5 — or the final one), counted from the call."""
        started = time.perf_counter()
        self.first_answer_s = None
        response = self.http.post(f"/gradio_api/call/{api_name}", json={"data": data})
        response.raise_for_status()
        event_id = response.json()["event_id"]
        event = None
        with self.http.stream("GET", f"/gradio_api/call/{api_name}/{event_id}") as stream:
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event in ("generating", "complete") and self.first_answer_s is None:
                    self.first_answer_s = time.perf_counter() - started
                if line.startswith("data:") and event in ("complete", "error"):
                    if event == "error":
                        raise RuntimeError(f"/{api_name} failed: {line[5:].strip()}")
                    return json.loads(line[5:])
        raise RuntimeError(f"/{api_name}: the answer stream ended without a result")


# Where a sampled stack's time goes: the first category whose marker occurs in it (markers are file paths).
PROFILE_CATEGORIES = (
    ("model forward (torch)", ("torch/nn/modules/",)),
    ("image decode + preprocess", ("shared/data/images.py", "shared/data/transforms.py", "torchvision/transforms/", "PIL/")),
    ("our handler, rest (CSV, formatting)", ("ui/tabs/predict.py", "shared/analysis/predict.py", "ui/")),
    ("Gradio / HTTP server", ("",)),
)
# Innermost frames that are waiting, not working: py-spy --nonblocking cannot always tell that a thread is idle.
IDLE_LEAVES = ("EpollSelector.select", "Condition.wait", "Event.wait", "Thread._wait_for_tstate_lock")


def profile_page(pid: int, call, photos: list[Path], seconds: float, raw_path: Path) -> dict:
    """Sample the page with py-spy (--nonblocking: the page is not paused) while `call` runs back to back for
    `seconds`; its Python CPU time per call, by category. Samples of threads that wait (event loop, locks) are
    left out."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    rate = 250
    proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--format", "raw", "--rate", str(rate), "--nonblocking",
                             "--duration", str(int(seconds)), "--output", str(raw_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(1.0)  # let py-spy attach
    calls = 0
    while proc.poll() is None:
        call(photos[calls % len(photos)])
        calls += 1
    if proc.returncode != 0 or not raw_path.exists():
        return {"error": f"py-spy exited {proc.returncode}: {proc.stderr.read().strip()[:300]}"}
    samples: Counter[str] = Counter()
    leaves: Counter[str] = Counter()  # innermost frame of the stacks outside our code and torch
    for line in raw_path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack.split(";")[-1].startswith(IDLE_LEAVES):
            continue
        category = next(name for name, markers in PROFILE_CATEGORIES if any(m in stack for m in markers))
        samples[category] += int(count)
        if category == PROFILE_CATEGORIES[-1][0]:
            leaves[stack.split(";")[-1].split("site-packages/")[-1]] += int(count)
    per_call = lambda n: round(n / rate / max(calls, 1) * 1000, 1)  # noqa: E731
    return {"calls": calls, "seconds": seconds, "rate_hz": rate, "samples": sum(samples.values()),
            "cpu_ms_per_call": {name: per_call(samples[name]) for name, _ in PROFILE_CATEGORIES},
            "wall_ms_per_call": round(seconds * 1000 / max(calls, 1), 1),
            "top_server_frames_ms_per_call": {frame: per_call(n) for frame, n in leaves.most_common(12)}}


def _page_runtime(stack, runtime: str, timeout: float = 600.0) -> str:
    """With onnxruntime the page exports the model in the background after its first prediction and then keeps
    the faster runtime: wait for its log line saying which (the figures are for the settled page)."""
    if runtime == "torch":
        return "torch"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = [line for line in stack.log("page").splitlines() if "top-5 on" in line or "top-5 stays" in line]
        if lines:
            return lines[-1].split(": ", 1)[-1]
        time.sleep(1)
    raise TimeoutError("the page did not say which runtime answers top-5 within "
                       f"{timeout:.0f} s:\n{stack.log('page')[-2000:]}")


def _forward_pair(run_dir: Path, bundle_dir: Path, local, photo: Path) -> dict:
    """In-process calls on one preprocessed photo: the forward pass through torch and through ONNX Runtime, and
    the CAM overlay's encoding as PNG and as JPEG."""
    import io


    from shared.export import export_run
    from shared.export.bundle_predict import Model

    export_run(run_dir, "onnx", bundle_dir, measure=False)
    onnx = Model(bundle_dir)
    x = local.preprocess(photo).unsqueeze(0)
    x_np = x.numpy()
    _, overlay, _ = local.explain(photo)
    overlay = overlay.resize((320, 320))

    def encode(fmt):
        overlay.save(io.BytesIO(), fmt)

    return {"forward_torch_local": lambda p: local.probabilities(x),
            "forward_onnxruntime_local": lambda p: onnx.probabilities(x_np),
            "cam_png_encode_local": lambda p: encode("PNG"),
            "cam_jpeg_encode_local": lambda p: encode("JPEG")}


def sample_images(data_dir: Path, count: int) -> tuple[list[str], list[Path]]:
    """(class names, up to `count` image paths spread over the classes), read in place."""
    common.ensure_repo_on_path()
    from shared.data.images import is_image_name

    classes = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = [sorted(f for f in (data_dir / c).iterdir() if is_image_name(f.name)) for c in classes]
    picks: list[Path] = []
    for i in range(count):
        files = per_class[i % len(per_class)]
        if files:
            picks.append(files[(i // len(per_class)) % len(files)])
    return classes, picks


def main(argv=None) -> dict:
    parser = common.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=100, help="calls of each kind")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--runtime", choices=["onnxruntime", "torch"], default="onnxruntime",
                        help="the page's top-5 forward pass (RESNET_LAB_PREDICT_RUNTIME)")
    parser.add_argument("--py-spy", type=float, default=0, metavar="SECONDS",
                        help="then profile the page with py-spy for this long per client (0 = off)")
    args = common.parse(parser, argv, __file__)
    model_name, env = "resnet18", {}
    if args.quick:  # the tiny ResNet: the same calls, each a fraction of ResNet18's CPU time
        args.calls, args.warmup, args.image_size = 2, 1, 64
        model_name, env = common.use_tiny_model(), common.quick_env()

    from gradio_client import handle_file

    common.ensure_repo_on_path()
    from shared.analysis.predict import Predictor

    print(f"load before: {common.loadavg()}")
    env["RESNET_LAB_PREDICT_RUNTIME"] = args.runtime  # the page's (this process's environment stays as it was)
    classes, photos = sample_images(args.data_dir, 20)
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        work = Path(tmp)
        models = work / "models"
        run_id = common.make_run(models, str(args.data_dir), classes, args.image_size, model_name=model_name)
        with common.Stack(work, models, [args.data_dir], env=env) as stack:
            stack.start_redis()
            t0 = time.perf_counter()
            stack.start_page()
            page_start_s = time.perf_counter() - t0
            client, rest = stack.client(), RestClient(stack.url)
            local = Predictor(models / run_id)
            forward = _forward_pair(models / run_id, work / "bundle", local, photos[0])
            calls = {
                "top5_client": lambda p: client.predict([handle_file(str(p))], "latest", api_name="/predict_many"),
                "top5_cam_client": lambda p: client.predict(handle_file(str(p)), "latest", api_name="/predict"),
                "floor_client": lambda p: client.predict(api_name="/run_status"),  # no model, no upload
                "top5_rest": lambda p: rest.call("predict_many", [[rest.upload(p)], "latest"]),
                "top5_cam_rest": lambda p: rest.call("predict", [rest.upload(p), "latest"]),
                "floor_rest": lambda p: rest.call("run_status", []),
                "top5_local": lambda p: local.predict(p),
                "top5_cam_local": lambda p: local.explain(p),
                **forward,
            }
            first_call_ms = {}
            for name, call in calls.items():
                t = time.perf_counter()
                call(photos[0])
                first_call_ms[name] = (time.perf_counter() - t) * 1000
                for i in range(args.warmup - 1):
                    call(photos[(i + 1) % len(photos)])
            page_runtime = _page_runtime(stack, args.runtime)
            times: dict[str, list[float]] = {name: [] for name in calls}
            times["top5_first_rest"] = []
            first_call_ms["top5_first_rest"] = float("nan")
            loads = []
            for i in range(args.calls):
                photo = photos[i % len(photos)]
                names = list(calls)[i % len(calls):] + list(calls)[:i % len(calls)]  # rotate who goes first
                for name in names:
                    t = time.perf_counter()
                    calls[name](photo)
                    times[name].append((time.perf_counter() - t) * 1000)
                    if name == "top5_cam_rest":
                        times["top5_first_rest"].append(rest.first_answer_s * 1000)
                if i % 10 == 0:
                    loads.append(common.loadavg()[0])
            page_rss = common.rss_mb(stack.procs["page"][0].pid)
            profiles = {}
            for name in ("top5_rest", "top5_client") if args.py_spy else ():
                profiles[name] = profile_page(stack.procs["page"][0].pid, calls[name], photos, args.py_spy,
                                              work / f"{name}.pyspy.txt")

    rows, summary = [], {}
    for name, values in times.items():
        p50, p95 = common.percentile(values, 50), common.percentile(values, 95)
        target = TARGETS_MS.get(name)
        summary[name] = {"p50_ms": p50, "p95_ms": p95, "max_ms": max(values), "first_call_ms": first_call_ms[name],
                         "target_p95_ms": target, "calls": len(values)}
        rows.append({"call": name, "p50 ms": p50, "p95 ms": p95, "max ms": max(values),
                     "first call ms": first_call_ms[name],
                     "target p95": f"<= {target:g} ms" if target else "-",
                     "verdict": common.verdict(p95 <= target, args.quick) if target else "-"})
    common.print_table(rows, title=f"Prediction latency, ResNet18 {args.image_size}px, CPU, {args.calls} calls "
                                   f"each (client = gradio_client, rest = Gradio's REST API by hand, local = the "
                                   f"same model in-process)")
    print(f"\npage's top-5 runtime: {page_runtime}")
    print(f"\npage start-up {page_start_s:.1f} s; page RSS after the calls {page_rss:.0f} MB; "
          f"load during {min(loads):.1f}..{max(loads):.1f}")
    for name, profile in profiles.items():
        if "error" in profile:
            print(f"\npy-spy on the page during {name}: {profile['error']}")
            continue
        print(f"\npage's Python CPU time per {name} call (py-spy, {profile['calls']} calls, "
              f"{profile['wall_ms_per_call']} ms wall each):")
        for category, ms in profile["cpu_ms_per_call"].items():
            print(f"  {category:38s} {ms:7.1f} ms")
    return common.finish(args, "predict_latency", {
        "settings": {"model": model_name, "image_size": args.image_size, "calls": args.calls, "warmup": args.warmup,
                     "photos": len(photos)},
        "page_runtime": page_runtime, "page_start_seconds": page_start_s, "page_rss_mb": page_rss, "loadavg_during": [min(loads), max(loads)],
        "results": summary, "page_profile": profiles, "samples_ms": {k: [round(v, 2) for v in vs] for k, vs in times.items()}})


if __name__ == "__main__":
    main()
