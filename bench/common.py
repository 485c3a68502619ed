"""Shared helpers for the benchmarks: machine info, load average, argument parsing, interleaved timing, tables.

Every benchmark records *where* and *under what load* a figure was taken (`machine_info()`), because this
machine is shared and absolute timings drift run to run; comparisons therefore run both sides in one process,
interleaved (A B A B ...), and report medians and ratios (`interleave`).

Nothing here imports more than the standard library at import time: `bench_gpu.py` must run on a machine with
only torch, torchvision, numpy and Pillow installed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

REPO = Path(__file__).resolve().parents[1]
# the photos live beside the repository, never inside it (read in place, never copied)
DEFAULT_DATA_DIR = (REPO / ".." / "shared" / "datasets" / "flower_photos").resolve()
DEFAULT_CACHE_DIR = REPO / ".cache" / "bench"  # .cache/ is git-ignored
RESULTS_DIR = REPO / "bench" / "results"
# --quick runs train the tests' tiny ResNet (tests/tinymodel.py, ~10x faster than resnet18): their figures are
# meaningless anyway, and the script's code paths are the same for any registered model
TINY_MODEL = "tiny_resnet"
TINY_PLUGIN = "tests.tinymodel:register_tiny_resnet"  # RESNET_LAB_MODEL_PLUGINS for the processes a Stack starts


def ensure_repo_on_path() -> None:
    """Let `python bench/x.py` import `shared` without installing (the venv has it editable anyway)."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))


def use_tiny_model() -> str:
    """Register the tiny ResNet in this process (a `Stack` started with `quick_env()` has it too); its name."""
    ensure_repo_on_path()
    from tests.tinymodel import register_tiny_resnet

    register_tiny_resnet()
    return TINY_MODEL


def quick_env(**more: str) -> dict[str, str]:
    """The environment of the page and worker a --quick run starts: they register the tiny ResNet (the checkout is
    on their PYTHONPATH), and the page uses one torch thread as the script does (a quick run shares CI's cores;
    the worker's threads are the Stack's `worker_threads`)."""
    return {"RESNET_LAB_MODEL_PLUGINS": TINY_PLUGIN, "OMP_NUM_THREADS": "1", **more}


def loadavg() -> tuple[float, float, float]:
    try:
        return os.getloadavg()
    except OSError:
        return (float("nan"),) * 3


def cpu_model_and_flags() -> tuple[str, list[str]]:
    model, flags = platform.processor() or "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key == "model name" and model in ("unknown", "", "x86_64"):
                model = value.strip()
            elif key == "flags" and not flags:
                flags = value.split()
    except OSError:
        pass
    wanted = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
    return model, [f for f in wanted if f in flags]


def machine_info() -> dict[str, Any]:
    """Cores, CPU model and vector flags, library versions, GPU, date and load: stored with every figure."""
    model, flags = cpu_model_and_flags()
    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cores": os.cpu_count(),
        "cpu": model,
        "cpu_flags": flags,
        "python": platform.python_version(),
        "loadavg": [round(x, 2) for x in loadavg()],
    }
    try:
        with open("/proc/meminfo") as fh:
            info["mem_gib"] = round(int(fh.readline().split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        import numpy
        import PIL
        import torch
        import torchvision

        info.update(torch=torch.__version__, torchvision=torchvision.__version__, numpy=numpy.__version__,
                    pillow=PIL.__version__, torch_threads=torch.get_num_threads(),
                    torch_cpu_capability=torch.backends.cpu.get_cpu_capability())
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cuda"] = torch.version.cuda
    except ImportError:
        pass
    return info


def describe_machine(info: dict[str, Any]) -> str:
    gpu = f", GPU {info['gpu']}" if info.get("gpu") else ", no GPU"
    return (f"{info['cores']} cores {info['cpu']} [{' '.join(info['cpu_flags'])}]{gpu}; torch {info.get('torch')}, "
            f"torchvision {info.get('torchvision')}; {info['date']}; loadavg {info['loadavg']}")


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes so the script runs in seconds (CI); figures are meaningless")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                        help="image folder with one sub-folder per class (read in place)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    return parser


def check_data_dir(path: Path) -> Path:
    path = Path(path).expanduser().resolve()
    if not path.is_dir():
        raise SystemExit(f"data dir {path} not found: pass --data-dir DIR (a folder with one sub-folder per class)")
    return path


def set_threads(n: int) -> None:
    if n > 0:
        import torch

        torch.set_num_threads(n)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def interleave(sides: dict[str, Callable[[], float]], repeats: int,
               on_result: Callable[[str, int, float], None] | None = None) -> dict[str, list[float]]:
    """Run each side once per round, round after round (A B C A B C ...), rotating who goes first.

    Each callable returns one measurement (e.g. images/s). Rotating the order spreads drift in the machine's
    load evenly over the sides instead of always penalising whoever runs last.
    """
    names = list(sides)
    results: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            value = sides[name]()
            results[name].append(value)
            if on_result:
                on_result(name, r, value)
    return results


class Stopwatch:
    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.start


def fmt(value: Any, digits: int = 1) -> str:
    if isinstance(value, float):
        if value != value:  # nan
            return "-"
        return f"{value:,.{digits}f}"
    return str(value)


def print_table(rows: list[dict[str, Any]], columns: Sequence[str] | None = None, title: str | None = None,
                digits: int = 1) -> None:
    """A plain fixed-width table (right-aligned numbers) on stdout."""
    if not rows:
        return
    columns = list(columns or rows[0].keys())
    cells = [[fmt(r.get(c, ""), digits) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(v.rjust(w) if _numeric(v) else v.ljust(w) for v, w in zip(row, widths)))


def _numeric(text: str) -> bool:
    return text.replace(",", "").replace(".", "").replace("-", "").replace("x", "").replace("%", "").isdigit()


def verdict(ok: bool, quick: bool = False) -> str:
    """PASS/MISS against a target; quick runs are too small to judge, so they never claim either."""
    if quick:
        return "n/a (quick)"
    return "PASS" if ok else "MISS"


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, script: str) -> argparse.Namespace:
    """Parse `argv` (None: the command line) and remember the exact command for the record."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command = " ".join([".venv/bin/python", f"bench/{Path(script).name}", *argv])
    args.data_dir = check_data_dir(args.data_dir)
    if getattr(args, "quick", False) and args.threads == 0:
        args.threads = 1  # quick runs share CI's cores: one thread avoids OpenMP threads waiting on each other
    set_threads(args.threads)
    return args


def json_safe(value: Any) -> Any:
    """`value` with NaN and infinities (a side that was not measured) as null: strict JSON that any reader parses."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def finish(args: argparse.Namespace, name: str, payload: dict[str, Any]) -> dict[str, Any]:
    """Attach machine info and the command line, print where the figures came from, write --json if asked."""
    result = {"benchmark": name, "quick": bool(getattr(args, "quick", False)),
              "command": getattr(args, "command", name), "machine": machine_info(), **payload}
    print(f"\ncommand: {result['command']}")
    print(f"machine: {describe_machine(result['machine'])}")
    if result["quick"]:
        print("(--quick: tiny sizes for CI; these numbers are not benchmark figures)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(json_safe(result), indent=2, default=str, allow_nan=False) + "\n")
        print(f"wrote {args.json}")
    return result


# ---- data for the engine-side benchmarks (imports torch lazily) ---------------------------------------------

def make_manifest(data_dir: Path, seed: int = 0, ratios=(0.7, 0.15, 0.15)) -> tuple[dict, float]:
    """The engine's split manifest for `data_dir` (check + hash every file: a one-time cost), and its seconds."""
    ensure_repo_on_path()
    from shared.data.split import make_split

    with Stopwatch() as sw:
        manifest = make_split(data_dir, ratios=ratios, seed=seed)
    return manifest, sw.seconds


def load_engine_splits(manifest: dict, image_size: int, cache_dir: Path) -> tuple[dict, dict[str, Any]]:
    """The engine's train/val/test `ArraySplit`s from the decoded cache, and how long getting them took.

    Returns (splits, {"cache_seconds", "cache_hit", "side"}): a miss decodes and resizes every photo once
    (the one-time cost of the cache); a hit only maps the file.
    """
    ensure_repo_on_path()
    from shared.data.cache import cache_key
    from shared.training.engine import Reporter, load_splits
    from shared.data.transforms import resize_size

    side = resize_size(image_size)
    key = cache_key([f["sha256"] for f in manifest["files"]], side)
    hit = (Path(cache_dir) / f"{key}.json").is_file()
    with Stopwatch() as sw:
        splits = load_splits(manifest, side, Path(cache_dir), Reporter())
    return splits, {"cache_seconds": sw.seconds, "cache_hit": hit, "side": side}


def generate_photos(root: Path, count: int, classes: int = 5, seed: int = 0) -> Path:
    """`count` photo-like JPEGs (320x240 or 240x320, ~30 KB like flower_photos) in `classes` folders.

    For machines without the real photos (a lent GPU machine only gets the repository): smooth gradients,
    coloured blobs per class and noise, so decoding costs about what a real photo of that size costs.
    """
    from concurrent.futures import ThreadPoolExecutor

    root = Path(root)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        list(pool.map(lambda i: _photo(root, i, classes, seed), range(count)))
    return root


def _photo(root: Path, i: int, classes: int, seed: int) -> None:
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng([seed, i])
    hues = [(200, 60, 60), (60, 170, 70), (70, 90, 210), (220, 200, 50), (170, 70, 200), (60, 200, 200)]
    c = i % classes
    w, h = (320, 240) if rng.random() < 0.7 else (240, 320)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx / w * 120 + rng.uniform(40, 120), yy / h * 120 + rng.uniform(40, 120),
                     (xx + yy) / (w + h) * 100 + rng.uniform(40, 120)], axis=-1)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 8))):
        x, y, r = int(rng.integers(0, w)), int(rng.integers(0, h)), int(rng.integers(10, 60))
        colour = tuple(int(v) for v in np.clip(np.array(hues[c % len(hues)]) + rng.normal(0, 25, 3), 0, 255))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    arr = np.asarray(img, dtype=np.int16) + rng.normal(0, 16, (h, w, 3)).astype(np.int16)
    Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB").save(
        root / f"class_{c}" / f"img_{i:05d}.jpg", quality=85)


# ---- the running system: private Redis + `python -m worker` + `python -m ui` ----------------------------------

class Stack:
    """A private Redis, a worker and the page as separate process groups, as `resnet-lab up` runs them.

    Logs go to `work/*.log`; `close()` stops what was started (SIGTERM to each group, then SIGKILL). The page
    and Redis bind 127.0.0.1 only.
    """

    def __init__(self, work: Path, models_dir: Path, data_roots: Sequence[Path], worker_threads: int = 0,
                 env: dict[str, str] | None = None):
        self.work, self.models_dir, self.data_roots = Path(work), Path(models_dir), list(data_roots)
        self.worker_threads = worker_threads
        self.extra_env = dict(env or {})  # for the processes only: this process's environment stays as it was
        self.redis = None
        self.procs: dict[str, Any] = {}
        self.url: str | None = None

    def env(self) -> dict[str, str]:
        env = {**os.environ, "RESNET_LAB_MODELS_DIR": str(self.models_dir), "PYTHONUNBUFFERED": "1",
               "RESNET_LAB_DATA_ROOTS": os.pathsep.join(map(str, self.data_roots)), "CUDA_VISIBLE_DEVICES": "",
               "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO),
               "GRADIO_TEMP_DIR": str(self.work / "gradio-tmp")}
        if self.redis is not None:
            env["REDIS_URL"] = self.redis.url
        if self.worker_threads:
            env["RESNET_LAB_WORKER_THREADS"] = str(self.worker_threads)
        return {**env, **self.extra_env}

    def start_redis(self) -> None:
        ensure_repo_on_path()
        from shared.launch.services import start_redis

        self.redis = start_redis(self.work / "redis", appendonly=False)

    def _spawn(self, name: str, args: list[str], env: dict[str, str]):
        import subprocess

        from shared.launch.services import popen_in_own_group

        log_path = self.work / f"{name}.log"
        with open(log_path, "ab") as out:
            proc = popen_in_own_group([sys.executable, "-m", *args], env=env, cwd=REPO, stdout=out,
                                      stderr=subprocess.STDOUT)
        self.procs[name] = (proc, log_path)
        return proc

    def log(self, name: str) -> str:
        path = self.procs[name][1]
        return path.read_text(errors="replace") if path.exists() else ""

    def _wait(self, name: str, ready: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        proc = self.procs[name][0]
        while not ready():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name} not ready within {timeout:.0f} s:\n{self.log(name)[-3000:]}")
            time.sleep(0.1)

    def start_worker(self, timeout: float = 180.0, wait: bool = True):
        """`python -m worker`; returns its Popen once Celery logs that it is ready (`wait=False`: at once)."""
        proc = self._spawn("worker", ["worker", "--loglevel", "info"], self.env())
        if wait:
            self.wait_worker(timeout)
        return proc

    def wait_worker(self, timeout: float = 180.0) -> None:
        self._wait("worker", lambda: " ready." in self.log("worker"), timeout)

    def start_worker_and_page(self, timeout: float = 180.0) -> None:
        """Both, their start-ups (imports: seconds of CPU each) overlapping; returns once both are ready."""
        self.start_worker(timeout, wait=False)
        self.start_page(timeout)
        self.wait_worker(timeout)

    def start_page(self, timeout: float = 180.0):
        """`python -m ui` on a free loopback port; returns its Popen once the API answers."""
        from shared.launch.services import find_free_port, http_ok

        port = find_free_port()
        self.url = f"http://127.0.0.1:{port}"
        proc = self._spawn("page", ["ui", "--port", str(port)], self.env())
        self._wait("page", lambda: http_ok(self.url + "/gradio_api/info", timeout=1.0), timeout)
        return proc

    def client(self):
        from gradio_client import Client

        return Client(self.url, verbose=False, download_files=False, analytics_enabled=False)

    def close(self) -> None:
        import signal

        from shared.launch.services import stop_group

        running = [proc for proc, _ in reversed(list(self.procs.values())) if proc.poll() is None]
        for proc in running:  # all at once: they shut down side by side
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except (ProcessLookupError, PermissionError):
                pass
        for proc in running:
            stop_group(proc, timeout=20, sig=None)  # waits, then kills what is left of the group
        self.procs.clear()
        if self.redis is not None:
            self.redis.stop()
            self.redis = None

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) — no interpolation, so p95 of 100 samples is the 95th value."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-q * len(ordered) // 100))))
    return ordered[rank - 1]


def make_run(models_dir: Path, data_dir: str, classes: list[str], image_size: int, model=None,
             manifest: dict | None = None, model_name: str = "resnet18") -> str:
    """A finished run folder (best.pt + status 'succeeded') holding `model` (default: random `model_name` weights).

    Prediction, evaluation and memory benchmarks time the machinery, which does not depend on the weights.
    """
    ensure_repo_on_path()
    import torch

    from shared.training.checkpoint import save_checkpoint
    from shared.training.config import TrainConfig
    from shared.data.manifest import write_manifest
    from shared.training.models import IMAGENET_MEAN, IMAGENET_STD, create_model
    from shared.runs.store import RunStore

    config = TrainConfig(data_dir=str(data_dir), model=model_name, weights="none", image_size=image_size,
                         device="cpu")
    store = RunStore(models_dir)
    run_id = store.create(config)
    if model is None:
        torch.manual_seed(0)
        model = create_model(model_name, len(classes), "none")
    save_checkpoint({"classes": classes, "image_size": image_size, "mean": list(IMAGENET_MEAN),
                     "std": list(IMAGENET_STD), "model_name": model_name, "config": config.to_dict(),
                     "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "epoch": 1,
                     "val_acc": 0.0, "split_hash": (manifest or {}).get("split_hash")},
                    store.path(run_id) / "best.pt")
    if manifest is not None:
        write_manifest(manifest, store.path(run_id) / "split.json")
    store.set_status(run_id, "running")
    store.set_status(run_id, "succeeded", best={"val_acc": 0.0, "epoch": 1})
    return run_id


def rss_mb(pid: int, children: bool = True) -> float:
    """Resident memory of a process (plus its children) in MB, from /proc (psutil when present)."""
    try:
        import psutil

        proc = psutil.Process(pid)
        procs = [proc] + (proc.children(recursive=True) if children else [])
        total = 0
        for p in procs:
            try:
                total += p.memory_info().rss
            except psutil.NoSuchProcess:
                pass
        return total / 2**20
    except ImportError:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")
