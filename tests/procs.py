"""Real processes for the fault, bad-input and security tests: pages (`python -m ui`), workers (`python -m worker`).

`Processes` starts them in their own process groups with output in log files and stops every one it started
(SIGTERM, then SIGKILL) in `close()`, which the tests' fixtures call in their finalizers whatever happened.
Everything binds 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.launch.services import find_free_port, popen_in_own_group, stop_group, wait_for_http

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned); AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


class Proc:
    """One started process (leader of its own group) and its log file."""

    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path):
        self.name, self.proc, self.log_path = name, proc, log_path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill9(self) -> None:
        """SIGKILL the whole group, as a crash or a power cut would."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=30)

    def stop(self, timeout: float = 20.0) -> int | None:
        if self.proc.returncode is None:
            return stop_group(self.proc, timeout=timeout)
        return self.proc.returncode


class Page(Proc):
    def __init__(self, name: str, proc: subprocess.Popen, log_path: Path, url: str, auth=None):
        super().__init__(name, proc, log_path)
        self.url, self.auth = url, auth

    def client(self):
        from gradio_client import Client

        return Client(self.url, auth=self.auth, verbose=False, download_files=False, analytics_enabled=False)


class Processes:
    """Starts workers and pages for one test (or module) and stops them all in `close()`."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.started: list[Proc] = []

    def _popen(self, name: str, args: list[str], env: dict) -> tuple[subprocess.Popen, Path]:
        log_path = self.log_dir / f"{name}-{len(self.started)}.log"
        full_env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONUNBUFFERED": "1",
                    "GRADIO_ANALYTICS_ENABLED": "False", "HF_HUB_OFFLINE": "1",
                    **{k: str(v) for k, v in env.items()}}
        with open(log_path, "wb") as out:
            proc = popen_in_own_group([sys.executable, "-m", *args], env=full_env, cwd=REPO, stdout=out,
                                      stderr=subprocess.STDOUT)
        return proc, log_path

    def worker(self, redis_url: str, models_dir: Path, *, ready_timeout: float = 120.0, **env) -> Proc:
        """`python -m worker` (one torch thread) against `redis_url`; returns once Celery says it is ready.

        Its evaluations draw no figures (~5 s less per tiny run) unless env says RESNET_LAB_EVAL_FIGURES="all"."""
        proc, log_path = self._popen("worker", ["worker", "--loglevel", "info"], {
            "REDIS_URL": redis_url, "RESNET_LAB_MODELS_DIR": models_dir, "RESNET_LAB_WORKER_THREADS": 1,
            "RESNET_LAB_EVAL_FIGURES": "none", **env})
        worker = Proc("worker", proc, log_path)
        self.started.append(worker)
        wait_for(lambda: " ready." in worker.log() or _died(worker), ready_timeout, "the worker to be ready",
                 interval=0.1)
        return worker

    def page(self, models_dir: Path, data_roots: list[Path] | Path, *, redis_url: str | None = None,
             port: int | None = None, ready_timeout: float = 120.0, wait: bool = True, **env) -> Page:
        """`python -m ui` on 127.0.0.1:`port` (a free one by default); returns once it answers HTTP."""
        roots = data_roots if isinstance(data_roots, (list, tuple)) else [data_roots]
        port = port or find_free_port()
        env = {"RESNET_LAB_MODELS_DIR": models_dir, "RESNET_LAB_DATA_ROOTS": os.pathsep.join(map(str, roots)),
               "RESNET_LAB_PORT": port, "GRADIO_TEMP_DIR": self.log_dir / "gradio-tmp", **env}
        if redis_url:
            env["REDIS_URL"] = redis_url
        proc, log_path = self._popen("page", ["ui"], env)
        auth = tuple(env["RESNET_LAB_AUTH"].split(":", 1)) if env.get("RESNET_LAB_AUTH") else None
        page = Page("page", proc, log_path, f"http://127.0.0.1:{port}", auth)
        self.started.append(page)
        if wait:
            deadline = time.monotonic() + ready_timeout
            while True:
                _died(page)
                try:
                    wait_for_http(page.url + "/gradio_api/info", timeout=1.0)
                    break
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise AssertionError(f"page not up within {ready_timeout:.0f} s:\n{page.log()[-3000:]}")
        return page

    def close(self) -> None:
        for proc in reversed(self.started):
            try:
                proc.stop(timeout=15)
            except Exception:  # noqa: BLE001 - stop the others whatever one of them does
                pass
        self.started.clear()


def _died(proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log()[-3000:]}")
    return False
