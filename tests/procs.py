"""Real processes for the tests: pages (`python -m ui`), workers (`python -m worker`), and the one polling loop.

`Processes` starts them in their own process groups with output in log files and stops every one it started
(SIGTERM, then SIGKILL) in `close()`, which the tests' fixtures call in their finalizers whatever happened.
`SharedStack` is the session's Redis + worker + page (tests/conftest.py). `wait_for` is how every test waits.
Everything binds 127.0.0.1; nothing leaves the machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from shared.launch.services import find_free_port, http_ok, popen_in_own_group, stop_group

REPO = Path(__file__).resolve().parents[1]


def clean_env() -> dict[str, str]:
    """This environment without the lab's settings and REDIS_URL (a test gives its processes its own), but with
    RESNET_LAB_MODEL_PLUGINS, through which every process the tests start knows the tiny test model."""
    return {k: v for k, v in os.environ.items()
            if not (k.startswith("RESNET_LAB_") and k != "RESNET_LAB_MODEL_PLUGINS") and k != "REDIS_URL"}


def wait_for(predicate, timeout: float, what: str, interval: float = 0.05, *, describe=None, sleep=time.sleep):
    """Poll `predicate` until it returns something truthy (returned); AssertionError naming `what` after `timeout` s.

    The one polling loop of the suite. `describe()`, when given, adds what was seen (a log tail, the last answer)
    to the failure; an exception from `predicate` (e.g. "the worker died") ends the wait at once. `sleep` is what
    waits between looks (tests/browser.py passes Playwright's, so the page's events keep flowing)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            seen = ""
            if describe is not None:
                try:
                    seen = f"\nlast seen:\n{describe()}"
                except Exception as exc:  # noqa: BLE001 - the description must not hide the timeout
                    seen = f"\n(could not describe what was seen: {exc!r})"
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}{seen}")
        sleep(interval)


class Proc:
    """One started process (leader of its own group) and its log file."""

    ready = 1  # a worker: how many Celery workers say "ready" once it is up (one per GPU with --gpus)

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

    def worker(self, redis_url: str, models_dir: Path, *, args=(), ready: int = 1, ready_timeout: float = 120.0,
               wait: bool = True, **env) -> Proc:
        """`python -m worker` (one torch thread) against `redis_url`; returns once Celery says `ready` workers are
        ready (more than one with `args=["--gpus", ...]`), or at once with `wait=False` (then `wait_ready`).

        Its evaluations draw no figures (~5 s less per tiny run) unless env says RESNET_LAB_EVAL_FIGURES="all"."""
        proc, log_path = self._popen("worker", ["worker", "--loglevel", "info", *args], {
            "REDIS_URL": redis_url, "RESNET_LAB_MODELS_DIR": models_dir, "RESNET_LAB_WORKER_THREADS": 1,
            "RESNET_LAB_EVAL_FIGURES": "none", **env})
        worker = Proc("worker", proc, log_path)
        worker.ready = ready
        self.started.append(worker)
        if wait:
            self.wait_ready(worker, ready_timeout)
        return worker

    @staticmethod
    def wait_ready(worker: Proc, timeout: float = 120.0) -> None:
        wait_for(lambda: worker.log().count(" ready.") >= worker.ready or _died(worker), timeout,
                 "the worker to be ready", interval=0.1, describe=lambda: worker.log()[-3000:])

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
            wait_for(lambda: not _died(page) and http_ok(page.url + "/gradio_api/info"), ready_timeout,
                     "the page to answer HTTP", interval=0.2, describe=lambda: page.log()[-3000:])
        return page

    def close(self) -> None:
        """SIGTERM to every process at once (their shutdowns overlap), then wait for each; SIGKILL after 15 s."""
        for proc in self.started:
            if proc.alive():
                try:
                    os.killpg(proc.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in reversed(self.started):
            try:
                stop_group(proc.proc, timeout=15, sig=None)
            except Exception:  # noqa: BLE001 - stop the others whatever one of them does
                pass
        self.started.clear()


def _died(proc: Proc) -> bool:
    if not proc.alive():
        raise AssertionError(f"{proc.name} exited with {proc.proc.returncode}:\n{proc.log()[-3000:]}")
    return False


class SharedStack:
    """One Redis (with a password), one worker and one page for the whole test session (tests/conftest.py:
    `session_stack`, `session_page`), over one models folder and one data root that holds `shapes` (classes
    circle, square, stripe; 12 images of 40 px each) and one finished tiny run trained on it (`run_id`).

    Starting a page or a worker costs seconds of CPU (importing torch and Gradio) and a trained run more, so tests
    that use them as they are share these. Such a test may add runs, datasets (in a folder of its own: `folder`)
    and tasks; it must not stop, restart or reconfigure a process (those tests start their own with `Processes`),
    nor rely on what other tests did: the models folder holds their runs too, so a test names its runs by id.

    The page has a 1 MB upload cap; the worker draws only the "basic" evaluation figures (charts, no t-SNE or
    Grad-CAM), has the data root as RESNET_LAB_DATA_ROOTS, a 3 s lease (its recovery scan runs every 1.5 s), and
    carries a page login in its environment (RESNET_LAB_AUTH, which the page itself does not get) that must never
    show up where the worker answers.
    """

    REDIS_PASSWORD = "Zq9x:xYq7@wv7Kp/k2Jm"  # URL-special characters on purpose; each piece distinctive
    WORKER_AUTH = "tester:s3cret-AUTH-9f2"
    CLASSES = ["circle", "square", "stripe"]
    UPLOAD_MB = 1

    def __init__(self, root: Path):
        from shared.launch.services import start_redis
        from shared.runs.registry import RunRegistry
        from shared.runs.store import RunStore
        from tests.imagegen import make_image_folder
        from tests.tiny import train_tiny

        self.root = Path(root)
        self.models = self.root / "models"
        self.data_root = self.root / "data"
        self.data = make_image_folder(self.data_root / "shapes", classes=self.CLASSES, per_class=12, size=40)
        self.procs = Processes(self.root / "logs")
        self.page: Page | None = None
        self.redis = start_redis(self.root / "redis", password=self.REDIS_PASSWORD, appendonly=False)
        try:
            self.env = {"RESNET_LAB_DATA_ROOTS": self.data_root, "RESNET_LAB_CACHE_DIR": self.root / "cache",
                        "RESNET_LAB_MAX_UPLOAD_MB": self.UPLOAD_MB}
            self.worker = self.procs.worker(self.redis.url, self.models, wait=False, RESNET_LAB_EVAL_FIGURES="basic",
                                            RESNET_LAB_LEASE_SECONDS=3, RESNET_LAB_AUTH=self.WORKER_AUTH, **self.env)
            self.run_id = train_tiny(self.models, self.data)  # while the worker imports torch
            self.registry = RunRegistry.from_url(self.redis.url)
            self.registry.sync_from_store(RunStore(self.models), [self.run_id])  # listed as a worker leaves it
            self.procs.wait_ready(self.worker)
        except BaseException:
            self.close()
            raise

    @property
    def redis_url(self) -> str:
        return self.redis.url

    def start_page(self) -> Page:
        if self.page is None:
            self.page = self.procs.page(self.models, self.data_root, redis_url=self.redis.url, **self.env)
        return self.page

    def folder(self, name: str) -> Path:
        """A fresh folder of the caller's own inside the data root (`name` unique per caller)."""
        path = self.data_root / name
        path.mkdir()
        return path

    def image(self, class_name: str = "square") -> Path:
        return sorted((self.data / class_name).iterdir())[0]

    def close(self) -> None:
        self.procs.close()
        self.redis.stop()
