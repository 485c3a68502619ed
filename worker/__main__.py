"""`python -m worker`: one Celery worker on the CPU, or one worker process per GPU.

    python -m worker [--threads N] [--loglevel info] [--concurrency 1]
    python -m worker --gpus all|0,1

CPU: one worker process with the solo pool (training already uses every core through torch threads; a pool of
processes would only split them). `--concurrency N` > 1 uses a prefork pool whose children share the threads.

GPUs: this process starts one child `python -m worker` per GPU, each seeing only its GPU (CUDA_VISIBLE_DEVICES)
and named `gpu<id>@<host>`, and supervises them with `shared.launch.supervisor` (the same policy as `resnet-lab up`: a
child that dies is restarted with back-off, one that cannot start is given up on, SIGTERM/SIGINT stop them all).
It never touches CUDA itself: a CUDA context does not survive fork (Celery issue #3402), so GPUs are found with
`nvidia-smi`.

Before Celery starts, a worker checks that the models folder is paired with its Redis (shared.launch.identity) and
refuses to start otherwise.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from shared.launch.identity import IdentityMismatch, check_models_dir
from shared.settings import Settings
from shared.launch.supervisor import Child, StopRequest, Supervisor
from shared.launch.up import parse_gpus

log = logging.getLogger("worker")

LOGLEVELS = ("debug", "info", "warning", "error", "critical")
# how long a starting worker waits for Redis (Celery would retry too) before it says it cannot reach it
REDIS_WAIT = 60.0
# under docker compose's stop_grace_period (30 s): a warm shutdown hands a running run back within one batch
STOP_TIMEOUT = 25.0


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
    check_pairing()
    plugins = Settings.from_env().model_plugins
    if plugins:  # before the pool forks: its children inherit the registry
        from shared.training.models import load_model_plugins

        try:
            load_model_plugins(plugins)
        except ValueError as exc:
            raise SystemExit(f"error: {exc}") from None
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


def gpu_children(gpu_ids: list[str], args: argparse.Namespace) -> list[Child]:
    """One restartable `python -m worker` child per GPU, seeing only its GPU and named `gpu<id>@<host>`."""
    threads = args.threads or Settings.from_env().worker_threads or max(1, (os.cpu_count() or 1) // len(gpu_ids))
    return [Child(f"worker (GPU {gpu})",
                  [sys.executable, "-m", "worker", "--loglevel", args.loglevel, "--concurrency", str(args.concurrency),
                   "--threads", str(threads), "--hostname", f"gpu{gpu}@%h"],
                  {"CUDA_VISIBLE_DEVICES": gpu}, restart=True)
            for gpu in gpu_ids]


def run_gpu_workers(gpu_ids: list[str], args: argparse.Namespace) -> int:
    """Supervise one worker child per GPU (shared.launch.supervisor) until SIGTERM/SIGINT; 1 when every one gave up."""
    with StopRequest() as stop:
        return Supervisor(gpu_children(gpu_ids, args), dict(os.environ), stop_timeout=STOP_TIMEOUT).run(stop)


def check_pairing() -> None:
    """Refuse to start without REDIS_URL, or on a models folder paired with another Redis (shared.launch.identity).

    Waits up to REDIS_WAIT seconds for Redis to answer (it may start after the worker)."""
    if not os.environ.get("REDIS_URL"):
        raise SystemExit("REDIS_URL is not set: point it at the Redis of the page (e.g. redis://127.0.0.1:6379/0), "
                         "or start everything with `resnet-lab up`")
    settings = Settings.from_env()
    try:
        check_models_dir(settings.models_dir, settings.redis_url, wait=REDIS_WAIT)
    except (IdentityMismatch, ConnectionError) as exc:
        raise SystemExit(f"error: {exc}") from None


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
    check_pairing()  # once here, so a refused folder says so once instead of in every child
    return run_gpu_workers(gpu_ids, args)


if __name__ == "__main__":
    sys.exit(main())
