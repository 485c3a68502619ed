"""`resnet-lab up`: Redis, one worker per GPU (or one CPU worker) and the page, supervised as one unit.

The parts run as separate processes (`python -m worker`, `python -m ui`) under `shared.launch.supervisor`: a worker
that dies (out of memory, kill -9) is restarted with back-off and its run resumes; the page or the embedded
Redis dying stops everything with a non-zero exit, and so does a worker that cannot start at all. Ctrl-C or
SIGTERM stops everything. A lock file in the models store keeps a second `up` from sharing it, and the folder's
Redis pairing (shared.launch.identity) keeps a stack with another Redis from sharing it.

This module is the `up` command itself, so it prints what a user must see (the URL, why it stopped).
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path
from typing import Mapping, Sequence

from shared.launch.identity import IdentityMismatch, check_models_dir
from shared.launch.services import http_ok, port_in_use, redis_ping, start_redis
from shared.settings import ENV_PREFIX, Settings, redact_url
from shared.launch.supervisor import Child, RestartPolicy, StopRequest, Supervisor, Watched

log = logging.getLogger(__name__)

LOCK_NAME = ".up.lock"
REDIS_DIR_NAME = ".redis"


# --- what to run -----------------------------------------------------------------------------------------------

def detect_gpus(env: Mapping[str, str] | None = None) -> list[str]:
    """GPU ids this machine offers, found without initialising CUDA in this process.

    `CUDA_VISIBLE_DEVICES` wins when set (ids or UUIDs; "" or "-1" means none); otherwise ask `nvidia-smi`
    in a subprocess. No NVIDIA driver means no GPUs.
    """
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = []
        for item in (v.strip() for v in visible.split(",")):
            if not item or item.startswith("-"):
                break  # CUDA ignores everything from the first invalid id on
            ids.append(item)
        return ids
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, env=dict(env))
    except (OSError, subprocess.TimeoutExpired):
        return []
    if out.returncode != 0:
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip().isdigit()]


def parse_gpus(gpus: str | Sequence[str] | None, env: Mapping[str, str] | None = None) -> list[str]:
    """`None`/"all" → every detected GPU; "cpu"/"none"/"" → no GPU; "0,2" or ["0", "2"] → those ids."""
    if gpus is None or gpus == "all":
        return detect_gpus(env)
    if isinstance(gpus, str):
        if gpus.strip().lower() in ("", "cpu", "none"):
            return []
        gpus = gpus.split(",")
    return [str(g).strip() for g in gpus if str(g).strip()]


def page_url(settings: Settings) -> str:
    """The address to open in a browser: a wildcard bind is reached through loopback."""
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{settings.port}"


def plan_children(settings: Settings, gpu_ids: list[str], worker_cmd: Sequence[str],
                  ui_cmd: Sequence[str]) -> list[Child]:
    """Workers first (one per GPU, each seeing only its GPU; or one CPU worker; restarted when they die), then
    the page (whose death stops everything)."""
    workers = []
    if gpu_ids:
        threads = settings.worker_threads or max(1, (os.cpu_count() or 1) // len(gpu_ids))
        for gpu in gpu_ids:
            workers.append(Child(f"worker (GPU {gpu})", list(worker_cmd),
                                 {"CUDA_VISIBLE_DEVICES": gpu, ENV_PREFIX + "WORKER_THREADS": str(threads)},
                                 restart=True))
    else:
        # "" hides every GPU, so a machine whose driver nvidia-smi could not see still trains on the CPU
        workers.append(Child("worker (CPU)", list(worker_cmd), {"CUDA_VISIBLE_DEVICES": ""}, restart=True))
    return workers + [Child("page", list(ui_cmd), {})]


# --- the lock ----------------------------------------------------------------------------------------------------

class AlreadyRunning(RuntimeError):
    pass


class UpLock:
    """`<models_dir>/.up.lock`, flock-ed while `up` runs and holding "pid host".

    The kernel drops the flock when its holder dies, so a lock left by a crashed `up` is simply taken over.
    """

    def __init__(self, models_dir: Path):
        self.path = Path(models_dir) / LOCK_NAME
        self._fd: int | None = None
        self.previous = ""

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown pid"
                os.close(fd)
                raise AlreadyRunning(
                    f"resnet-lab up is already running for {self.path.parent} (pid {holder}); "
                    f"open its page or stop it first (Ctrl-C in its terminal, or kill that pid)") from None
            # the holder may have removed the file between our open and flock: then lock the new file instead
            try:
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        self.previous = os.pread(fd, 200, 0).decode(errors="replace").strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# --- the supervisor ----------------------------------------------------------------------------------------------

def _say(message: str, level: int = logging.INFO) -> None:
    print(message, file=sys.stderr if level >= logging.WARNING else sys.stdout, flush=True)


def run_up(settings: Settings, *, worker_cmd: Sequence[str] | None = None, ui_cmd: Sequence[str] | None = None,
           gpus: str | Sequence[str] | None = None, stop_timeout: float = 20.0, poll: float = 0.2,
           policy: RestartPolicy | None = None) -> int:
    """Run Redis (REDIS_URL or an embedded one), the workers and the page until a signal or a fatal exit; return the exit code.

    `worker_cmd`/`ui_cmd` default to `python -m worker` / `python -m ui` (tests pass stand-ins). `gpus` is
    None/"all" (detect), "cpu", or ids such as "0,1". Children get the settings as environment variables.
    Workers are restarted by `policy` (shared.launch.supervisor). Must run in the main thread (signal handlers).
    """
    worker_cmd = list(worker_cmd or [sys.executable, "-m", "worker"])
    ui_cmd = list(ui_cmd or [sys.executable, "-m", "ui"])
    lock = UpLock(settings.models_dir)
    try:
        lock.acquire()
    except AlreadyRunning as e:
        _say(str(e), logging.ERROR)
        return 1
    try:
        if lock.previous:
            log.info("took over a stale lock left by %s", lock.previous)
            _say(f"note: took over a stale lock from a previous `up` ({lock.previous}) that is no longer running")
        with StopRequest() as stop:
            return _run(settings, worker_cmd, ui_cmd, gpus, stop, stop_timeout, poll, policy or RestartPolicy())
    finally:
        lock.release()


def _run(settings: Settings, worker_cmd, ui_cmd, gpus, stop: StopRequest, stop_timeout: float, poll: float,
         policy: RestartPolicy) -> int:
    if port_in_use(settings.host, settings.port):
        _say(f"port {settings.port} on {settings.host} is already in use — stop what uses it, "
             f"or pick another with {ENV_PREFIX}PORT=<port>", logging.ERROR)
        return 1
    redis_server = None
    try:
        if settings.redis_url:
            if not redis_ping(settings.redis_url, timeout=5):
                _say(f"REDIS_URL does not answer PING ({redact_url(settings.redis_url)}) — start that Redis, "
                     f"fix the URL or password, or unset REDIS_URL to use the embedded one", logging.ERROR)
                return 1
            redis_url = settings.redis_url
        else:
            # a fresh password each start: other local users can reach 127.0.0.1 too
            redis_server = start_redis(settings.models_dir / REDIS_DIR_NAME, password=secrets.token_hex(16))
            redis_url = redis_server.url
            _say(f"redis: embedded {redis_server.describe()} on 127.0.0.1:{redis_server.port}, "
                 f"data in {redis_server.data_dir}")
        try:
            # `up` holds the folder's lock and its embedded Redis keeps its data in the folder: an empty one is ours
            check_models_dir(settings.models_dir, redis_url, owns_redis=redis_server is not None)
        except (IdentityMismatch, ConnectionError) as exc:
            _say(f"error: {exc}", logging.ERROR)
            return 1
        base_env = {**os.environ, **settings.to_env(), "REDIS_URL": redis_url}
        children = plan_children(settings, parse_gpus(gpus), worker_cmd, ui_cmd)
        watched = []
        if redis_server is not None:
            watched.append(Watched("the embedded redis-server", redis_server.process,
                                   f" (log: {redis_server.log_path})"))
        supervisor = Supervisor(children, base_env, policy=policy, watched=watched, stop_timeout=stop_timeout,
                                poll=poll, say=_say)
        return supervisor.run(stop, tick=_ready_notice(settings, poll))
    finally:
        if redis_server is not None:  # last, so workers could still acknowledge their tasks while stopping
            redis_server.stop(timeout=stop_timeout)


def _ready_notice(settings: Settings, poll: float):
    """A tick that says once where to open the page, as soon as it answers."""
    url = page_url(settings)
    ready = False

    def tick() -> None:
        nonlocal ready
        if not ready and http_ok(url, timeout=min(1.0, poll * 5)):
            ready = True
            _say(f"resnet-lab is up: open {url}  (Ctrl-C stops everything)")

    return tick


# --- `resnet-lab ui` / `resnet-lab worker` ----------------------------------------------------------------------

def run_child(module: str, args: Sequence[str] = (), settings: Settings | None = None, *,
              env: Mapping[str, str] | None = None):
    """Replace this process with `python -m <module> <args>`; never returns.

    `settings` (CLI overrides included) reach the child as environment variables, plus any extra `env`.
    """
    argv = [sys.executable, "-m", module, *args]
    child_env = {**os.environ, **(settings.to_env() if settings else {}), **(env or {})}
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, child_env)
