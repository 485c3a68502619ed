"""`python -m worker`: one Celery worker on the CPU, or one worker process per GPU.

    python -m worker [--threads N] [--loglevel info] [--concurrency 1]
    python -m worker --gpus all|0,1

CPU: one worker process with the solo pool (training already uses every core through torch threads; a pool of
processes would only split them). `--concurrency N` > 1 uses a prefork pool whose children share the threads.

GPUs: this process starts one child `python -m worker` per GPU, each seeing only its GPU (CUDA_VISIBLE_DEVICES)
and named `gpu<id>@<host>`, forwards SIGTERM/SIGINT to them, and restarts a child that crashes. It never touches
CUDA itself: a CUDA context does not survive fork (Celery issue #3402), so GPUs are found with `nvidia-smi`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time

from shared.services import popen_in_own_group
from shared.settings import Settings
from shared.up import parse_gpus

log = logging.getLogger("worker")

LOGLEVELS = ("debug", "info", "warning", "error", "critical")
# a GPU child that crashes this often within RESTART_WINDOW seconds is not restarted again
MAX_RESTARTS, RESTART_WINDOW = 5, 300.0


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--gpus", help="'all' or ids like 0,1: one worker process per GPU (default: one worker)")
    parser.add_argument("--threads", type=int, help="torch threads per worker (default: cores, or cores / GPUs)")
    parser.add_argument("--loglevel", default="info", type=str.lower, choices=LOGLEVELS)
    parser.add_argument("--concurrency", type=int, default=1,
                        help="tasks at once in this worker; 1 (default) trains in the worker process itself")
    parser.add_argument("-n", "--hostname", help="Celery node name (default: gpu<id>@%%h when one GPU is visible)")
    return parser


def default_hostname(env=os.environ) -> str | None:
    """`gpu<id>@%h` when exactly one GPU is pinned, so the workers of one machine have distinct names."""
    visible = env.get("CUDA_VISIBLE_DEVICES", "")
    if visible and "," not in visible and not visible.startswith("-"):
        return f"gpu{visible}@%h"
    return None


def run_worker(args: argparse.Namespace) -> int:
    """Run one Celery worker in this process until it is told to stop."""
    if args.concurrency < 1:
        raise SystemExit(f"--concurrency must be at least 1, got {args.concurrency}")
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads must be at least 1, got {args.threads}")
        # read by Settings.from_env when the app is created below, and by the pool's children
        os.environ["RESNET_LAB_WORKER_THREADS"] = str(max(1, args.threads // args.concurrency))
    if not os.environ.get("REDIS_URL"):
        raise SystemExit("REDIS_URL is not set: point it at the Redis of the page (e.g. redis://127.0.0.1:6379/0), "
                         "or start everything with `resnet-lab up`")
    from .celery_app import app

    argv = ["worker", f"--loglevel={args.loglevel}", "--without-gossip", "--without-mingle"]
    if args.concurrency == 1:
        argv += ["--pool=solo", "--concurrency=1"]
    else:
        argv += ["--pool=prefork", f"--concurrency={args.concurrency}"]
    hostname = args.hostname or default_hostname()
    if hostname:
        argv.append(f"--hostname={hostname}")
    return app.worker_main(argv) or 0


def run_gpu_workers(gpu_ids: list[str], args: argparse.Namespace) -> int:
    """Supervise one worker child per GPU until SIGTERM/SIGINT; returns the worst child exit code."""
    threads = args.threads or Settings.from_env().worker_threads or max(1, (os.cpu_count() or 1) // len(gpu_ids))

    def start(gpu: str) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "worker", "--loglevel", args.loglevel, "--concurrency", str(args.concurrency),
               "--threads", str(threads), "--hostname", f"gpu{gpu}@%h"]
        log.info("starting the worker for GPU %s", gpu)
        return popen_in_own_group(cmd, env={**os.environ, "CUDA_VISIBLE_DEVICES": gpu})

    children = {gpu: start(gpu) for gpu in gpu_ids}
    crashes: dict[str, list[float]] = {gpu: [] for gpu in gpu_ids}
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        stopping = True
        for proc in children.values():
            if proc.poll() is None:
                proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    codes: dict[str, int] = {}
    while len(codes) < len(children):
        time.sleep(0.5)
        for gpu, proc in list(children.items()):
            code = proc.poll()
            if code is None or gpu in codes:
                continue
            recent = [t for t in crashes[gpu] if time.monotonic() - t < RESTART_WINDOW]
            if stopping or len(recent) >= MAX_RESTARTS:
                if not stopping:
                    log.error("the worker for GPU %s exited with %s %d times in %.0f s: not restarting it",
                              gpu, code, len(recent), RESTART_WINDOW)
                codes[gpu] = code
                continue
            log.warning("the worker for GPU %s exited with %s; restarting it (its run resumes from last.pt)",
                        gpu, code)
            crashes[gpu] = recent + [time.monotonic()]
            children[gpu] = start(gpu)
    return max((abs(c) for c in codes.values()), default=0)


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    if args.gpus is None:
        return run_worker(args)
    logging.basicConfig(level=args.loglevel.upper(), format="[%(asctime)s: %(levelname)s/%(name)s] %(message)s")
    gpu_ids = parse_gpus(args.gpus)
    if not gpu_ids:
        log.warning("--gpus %s: no GPU found (nvidia-smi, CUDA_VISIBLE_DEVICES); starting one CPU worker", args.gpus)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return run_worker(args)
    return run_gpu_workers(gpu_ids, args)


if __name__ == "__main__":
    sys.exit(main())
