"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


# --- Redis: one private server per test session (shared.launch.services.start_redis) ---------------------------------
# `redis_server` is started once on a free 127.0.0.1 port in a temporary folder and stopped at the end;
# `redis_url` hands each test that server's URL with every database flushed first.

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server for the whole session; has `.url`, `.port`, `.pid`, `.stop()`."""
    from shared.launch.services import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session's private Redis, emptied (FLUSHALL) before the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


# --- Worker: real `python -m worker` processes (tests/test_worker.py) -------------------------------------------
# `start_worker(models_dir, **env)` starts one worker against the session's Redis with one torch thread, its
# output in a log file, and waits until Celery says it is ready; every worker started is stopped at teardown
# (SIGTERM, then SIGKILL), whatever the test did. Its evaluations draw no figures (RESNET_LAB_EVAL_FIGURES=none:
# ~5 s less per tiny run); a test that looks at figures passes RESNET_LAB_EVAL_FIGURES="all".

class WorkerProcess:
    def __init__(self, proc, log_path):
        self.proc, self.log_path = proc, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole process group, as a crash or a power cut would."""
        import os
        import signal

        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int | None:
        from shared.launch.services import stop_group

        if self.proc.returncode is None:
            return stop_group(self.proc, timeout=timeout)
        return self.proc.returncode


@pytest.fixture
def start_worker(redis_url, tmp_path):
    """Factory: start_worker(models_dir, args=(), ready=1, ready_timeout=120, **extra_env) -> WorkerProcess.

    Returns once the log shows `ready` Celery workers ready (more than one with `args=["--gpus", ...]`).
    """
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    from shared.launch.services import popen_in_own_group

    started: list[WorkerProcess] = []

    def start(models_dir, *, args=(), ready: int = 1, ready_timeout: float = 120.0, **extra_env) -> WorkerProcess:
        log_path = Path(tmp_path) / f"worker-{len(started)}.log"
        env = {**os.environ, "REDIS_URL": redis_url, "RESNET_LAB_MODELS_DIR": str(models_dir),
               "RESNET_LAB_WORKER_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
               "RESNET_LAB_EVAL_FIGURES": "none", **{k: str(v) for k, v in extra_env.items()}}
        with open(log_path, "wb") as out:
            proc = popen_in_own_group([sys.executable, "-m", "worker", "--loglevel", "info", *args], env=env,
                                      cwd=Path(__file__).resolve().parents[1], stdout=out,
                                      stderr=subprocess.STDOUT)
        worker = WorkerProcess(proc, log_path)
        started.append(worker)
        deadline = time.monotonic() + ready_timeout
        while worker.log().count(" ready.") < ready:
            if not worker.alive():
                raise RuntimeError(f"worker exited with {proc.returncode}:\n{worker.log()[-3000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"worker not ready within {ready_timeout:.0f} s:\n{worker.log()[-3000:]}")
            time.sleep(0.1)
        return worker

    yield start
    for worker in started:
        worker.stop()
