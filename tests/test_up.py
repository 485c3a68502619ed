"""`resnet-lab up` supervising real processes: stand-in worker and page scripts, a real Redis.

Every process a test starts carries a unique marker in its environment (children inherit it), so "no process
left behind" is checked by scanning /proc for that marker — grandchildren and the embedded Redis included.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import pytest

from shared.launch.services import find_free_port, find_redis_server, http_ok, redis_ping, redis_server_version
from shared.settings import Settings
from shared.launch.up import detect_gpus, page_url, parse_gpus, plan_children
from tests.procs import clean_env, wait_for

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")

REPO = Path(__file__).resolve().parents[1]
MARK = "RESNET_LAB_TEST_MARK"

# A worker stand-in: records what it was given, forks a grandchild it never cleans up (only a process-group kill
# removes it), then idles. Modes: ok (exits on SIGTERM), crash (exits 3 after a moment), stubborn (ignores SIGTERM).
WORKER = """
import json, os, signal, subprocess, sys, time
record_dir, mode = sys.argv[1], sys.argv[2]
grandchild = subprocess.Popen(["sleep", "600"])
info = {"pid": os.getpid(), "pgid": os.getpgid(0), "grandchild": grandchild.pid, "started": time.time(),
        "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"), "redis_url": os.environ.get("REDIS_URL"),
        "models_dir": os.environ.get("RESNET_LAB_MODELS_DIR"), "threads": os.environ.get("RESNET_LAB_WORKER_THREADS")}
tmp = os.path.join(record_dir, f".worker-{os.getpid()}")
with open(tmp, "w") as f:
    json.dump(info, f)
os.replace(tmp, os.path.join(record_dir, f"worker-{time.time():.6f}-{os.getpid()}.json"))
if mode == "crash":
    time.sleep(0.3)
    sys.exit(3)
signal.signal(signal.SIGTERM, signal.SIG_IGN if mode == "stubborn" else (lambda *a: sys.exit(0)))
while True:
    time.sleep(0.1)
"""

# A page stand-in: serves HTTP where the settings say, records itself, exits on SIGTERM.
UI = """
import http.server, json, os, signal, sys
record_dir = sys.argv[1]
host, port = os.environ["RESNET_LAB_HOST"], int(os.environ["RESNET_LAB_PORT"])
with open(os.path.join(record_dir, "ui.json"), "w") as f:
    json.dump({"pid": os.getpid(), "pgid": os.getpgid(0), "redis_url": os.environ.get("REDIS_URL")}, f)
class Quiet(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"stand-in page")
    def log_message(self, *args):
        pass
server = http.server.HTTPServer((host, port), Quiet)
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
server.serve_forever()
"""

DRIVER = """
import json, sys
from shared.settings import Settings
from shared.launch.supervisor import RestartPolicy
from shared.launch.up import run_up
cfg = json.loads(sys.argv[1])
settings = Settings.from_env(models_dir=cfg["models_dir"], port=cfg["port"])
sys.exit(run_up(settings, worker_cmd=cfg["worker_cmd"], ui_cmd=cfg["ui_cmd"], gpus=cfg["gpus"],
                stop_timeout=cfg["stop_timeout"], policy=RestartPolicy(**cfg["policy"])))
"""
# restarts a dead worker stand-in quickly (production: 1 s doubling up to 60 s, given up after 5 quick crashes)
FAST_RESTARTS = {"first_delay": 0.2, "max_delay": 0.8, "stable_after": 30.0, "max_quick_crashes": 3}


def aof_path(redis_dir: Path) -> Path:
    """Where the append-only file lives: Redis 7 keeps a folder of parts, 6.2 (the bundled one) a single file."""
    version = redis_server_version(find_redis_server()) or (0,)
    return redis_dir / ("appendonlydir" if version >= (7,) else "appendonly.aof")


def marked_processes(marker: str) -> list[int]:
    """Live (non-zombie) processes whose environment carries `MARK=marker`, or that run in a folder named after it.

    The second test catches redis-server, which overwrites its environment block with its process title but
    works in its data folder (`<models_dir>/.redis`; the `models_dir` fixture puts the marker in that path).
    """
    needle = f"{MARK}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0") \
                    and marker not in os.readlink(entry / "cwd"):
                continue
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(int(entry.name))
    return found


@pytest.fixture
def marker():
    """A unique marker for the processes a test starts; whatever still carries it after the test is killed."""
    value = uuid.uuid4().hex
    yield value
    leftovers = marked_processes(value)
    for pid in leftovers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    if leftovers:
        wait_for(lambda: not marked_processes(value), 5, "the processes left behind to die once killed")
    assert not leftovers, f"processes left behind: {leftovers}"


@pytest.fixture
def models_dir(tmp_path, marker) -> Path:
    return tmp_path / marker / "models"


class Up:
    """`run_up` in its own process with stand-in children (or `ui_cmd` for the page: the real one); collects its
    output."""

    def __init__(self, tmp_path: Path, marker: str, *, models_dir: Path, worker_mode: str = "ok",
                 gpus: str | None = "cpu", env: dict | None = None, stop_timeout: float = 5, port: int | None = None,
                 policy: dict | None = None, ui_cmd: list[str] | None = None):
        self.records = tmp_path / f"records-{uuid.uuid4().hex[:6]}"
        self.records.mkdir()
        scripts = tmp_path / "scripts"
        scripts.mkdir(exist_ok=True)
        (scripts / "worker.py").write_text(WORKER)
        (scripts / "ui.py").write_text(UI)
        self.port = port or find_free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cfg = {
            "models_dir": str(models_dir), "port": self.port, "gpus": gpus, "stop_timeout": stop_timeout,
            "worker_cmd": [sys.executable, str(scripts / "worker.py"), str(self.records), worker_mode],
            "ui_cmd": ui_cmd or [sys.executable, str(scripts / "ui.py"), str(self.records)],
            "policy": policy or FAST_RESTARTS,
        }
        base = clean_env()
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cfg)], cwd=REPO, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     env={**base, MARK: marker, **(env or {})})
        self._lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self._lines)

    def wait_output(self, text: str, timeout: float = 30) -> None:
        """Until `up` prints `text`; AssertionError with its output if it exits first or takes too long."""
        wait_for(lambda: text in self.output or self.proc.poll() is not None, timeout, f"up to print {text!r}",
                 describe=lambda: self.output)
        assert text in self.output, f"up exited before printing {text!r}; output:\n{self.output}"

    def workers(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted(self.records.glob("worker-*.json"))]

    def ui(self) -> dict:
        return json.loads((self.records / "ui.json").read_text())

    def stop(self, sig=signal.SIGTERM, timeout: float = 30) -> int:
        self.proc.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"up did not exit within {timeout} s; output:\n{self.output}")


def test_up_starts_redis_workers_per_gpu_and_page_then_sigterm_leaves_nothing(tmp_path, marker, models_dir):
    models = models_dir
    up = Up(tmp_path, marker, models_dir=models, gpus="0,1")
    up.wait_output(f"resnet-lab is up: open {up.url}")

    # one worker per GPU, each pinned to its GPU, each in its own process group, sharing the embedded Redis
    wait_for(lambda: len(up.workers()) == 2, 10, "two workers to start")
    workers = up.workers()
    assert sorted(w["cuda"] for w in workers) == ["0", "1"]
    assert all(w["pgid"] == w["pid"] for w in workers)
    assert all(w["models_dir"] == str(models.resolve()) for w in workers)
    redis_url = workers[0]["redis_url"]
    assert {w["redis_url"] for w in workers} == {redis_url} == {up.ui()["redis_url"]}
    assert "@127.0.0.1:" in redis_url  # embedded, loopback, with a password
    assert redis_ping(redis_url)
    assert aof_path(models / ".redis").exists()
    assert (models / ".up.lock").read_text().split()[0] == str(up.proc.pid)
    # the supervisor, the Redis, two workers, their grandchildren and the page all run
    assert len(marked_processes(marker)) == 1 + 1 + 2 * 2 + 1, marked_processes(marker)

    assert up.stop(signal.SIGTERM) == 0
    wait_for(lambda: not marked_processes(marker), 5, "every process up started to exit",
             describe=lambda: marked_processes(marker))
    assert not redis_ping(redis_url, timeout=0.5)
    assert not (models / ".up.lock").exists()
    assert "received SIGTERM" in up.output


def test_ctrl_c_with_external_redis_and_a_cpu_worker(tmp_path, marker, redis_url, models_dir):
    up = Up(tmp_path, marker, models_dir=models_dir, gpus=None,
            env={"REDIS_URL": redis_url, "CUDA_VISIBLE_DEVICES": ""})
    up.wait_output("resnet-lab is up")
    wait_for(lambda: len(up.workers()) == 1, 10, "the worker to start")
    worker = up.workers()[0]
    assert worker["cuda"] == ""  # the CPU worker sees no GPU
    assert worker["redis_url"] == redis_url
    assert not (models_dir / ".redis").exists()  # REDIS_URL set: no embedded Redis

    assert up.stop(signal.SIGINT) == 0
    wait_for(lambda: not marked_processes(marker), 5, "every process up started to exit")
    assert redis_ping(redis_url)  # someone else's Redis is left alone


def test_a_worker_that_cannot_start_is_given_up_after_quick_crashes_and_everything_stops(
        tmp_path, marker, redis_url, models_dir):
    up = Up(tmp_path, marker, models_dir=models_dir, worker_mode="crash", env={"REDIS_URL": redis_url})
    assert up.wait(timeout=60) == 1
    out = up.output
    # restarted with a growing back-off, then given up on with a message saying why, then everything stops
    assert "exited with code 3; restarting it in 0.2 s" in out and "exited with code 3; restarting it in 0.4 s" in out
    assert "restarting it in 0.8 s" not in out, out
    assert "died 3 times in a row, each within 30 s of starting, so it is not restarted again" in out, out
    assert "no worker is left to supervise — stopping everything" in out, out
    starts = [w["started"] for w in up.workers()]
    assert len(starts) == 3, starts
    # each stand-in lives 0.3 s; the supervisor waited at least the back-off on top of that
    assert starts[1] - starts[0] >= 0.5 and starts[2] - starts[1] >= 0.7, starts
    wait_for(lambda: not marked_processes(marker), 5, "every process up started to exit",
             describe=lambda: marked_processes(marker))


def test_a_killed_worker_is_restarted_and_the_page_and_redis_stay_up(tmp_path, marker, models_dir):
    up = Up(tmp_path, marker, models_dir=models_dir)
    up.wait_output("resnet-lab is up")
    wait_for(lambda: up.workers(), 10, "a worker to start")
    [first] = up.workers()
    page = up.ui()
    os.killpg(first["pgid"], signal.SIGKILL)  # as the out-of-memory killer would (the worker's group)
    wait_for(lambda: len(up.workers()) == 2, 20, "two workers to start", describe=lambda: up.output)
    second = up.workers()[1]
    assert second["pid"] != first["pid"] and second["redis_url"] == first["redis_url"]
    assert "worker (CPU) (pid %d) was killed by SIGKILL" % first["pid"] in up.output
    assert up.proc.poll() is None and up.ui() == page and redis_ping(first["redis_url"])
    assert http_ok(up.url)
    assert up.stop(signal.SIGTERM) == 0
    wait_for(lambda: not marked_processes(marker), 5, "every process up started to exit",
             describe=lambda: marked_processes(marker))


@pytest.mark.parametrize("victim", ["page", "redis"])
def test_the_page_or_the_embedded_redis_dying_stops_everything(tmp_path, marker, models_dir, victim):
    up = Up(tmp_path, marker, models_dir=models_dir)
    up.wait_output("resnet-lab is up")
    wait_for(lambda: up.workers(), 10, "a worker to start")
    if victim == "page":
        os.kill(up.ui()["pid"], signal.SIGKILL)
        expected = "page (pid %d) was killed by SIGKILL" % up.ui()["pid"]
    else:
        redis_pid = _redis_pid(models_dir)
        os.kill(redis_pid, signal.SIGKILL)
        expected = "the embedded redis-server was killed by SIGKILL"
    assert up.wait(timeout=30) == 1
    assert expected in up.output and "stopping everything" in up.output, up.output
    assert "restarting" not in up.output
    wait_for(lambda: not marked_processes(marker), 5, "every process up started to exit",
             describe=lambda: marked_processes(marker))


def _redis_pid(models_dir: Path) -> int:
    """The embedded redis-server: the marked process working in `<models>/.redis`."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.readlink(entry / "cwd") == str((models_dir / ".redis").resolve()):
                    return int(entry.name)
            except OSError:
                continue
    raise AssertionError("no redis-server runs in " + str(models_dir / ".redis"))


def test_a_child_that_ignores_sigterm_is_killed_after_the_timeout(tmp_path, marker, redis_url, models_dir):
    up = Up(tmp_path, marker, models_dir=models_dir, worker_mode="stubborn", stop_timeout=1,
            env={"REDIS_URL": redis_url})
    up.wait_output("resnet-lab is up")
    wait_for(lambda: up.workers(), 10, "a worker to start")
    started = time.monotonic()
    assert up.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    wait_for(lambda: not marked_processes(marker), 5, "every process up started to exit",
             describe=lambda: marked_processes(marker))


def test_second_up_on_the_same_models_dir_is_refused(tmp_path, marker, redis_url, models_dir):
    models = models_dir
    first = Up(tmp_path, marker, models_dir=models, env={"REDIS_URL": redis_url})
    first.wait_output("resnet-lab is up")
    second = Up(tmp_path, marker, models_dir=models, env={"REDIS_URL": redis_url})
    assert second.wait(timeout=20) == 1
    assert "already running" in second.output and str(first.proc.pid) in second.output
    assert not second.workers()  # refused before starting anything
    assert first.proc.poll() is None and first.workers()  # and the first one is untouched

    assert first.stop() == 0
    wait_for(lambda: not marked_processes(marker), 5, "every process up started to exit")


def test_stale_lock_from_a_dead_up_is_taken_over(tmp_path, marker, redis_url, models_dir):
    models = models_dir
    models.mkdir(parents=True)
    dead = subprocess.Popen(["true"])
    dead.wait()
    (models / ".up.lock").write_text(f"{dead.pid} some-host\n")
    up = Up(tmp_path, marker, models_dir=models, env={"REDIS_URL": redis_url})
    up.wait_output("resnet-lab is up")
    assert f"stale lock from a previous `up` ({dead.pid} some-host)" in up.output
    assert up.stop() == 0


def test_port_already_taken_is_refused_before_starting_anything(tmp_path, marker, redis_url, models_dir):
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        up = Up(tmp_path, marker, models_dir=models_dir, port=blocker.getsockname()[1],
                env={"REDIS_URL": redis_url})
        assert up.wait(timeout=20) == 1
    assert "already in use" in up.output and "RESNET_LAB_PORT" in up.output
    assert not up.workers()


def test_killed_supervisor_takes_its_children_and_redis_along(tmp_path, marker, models_dir):
    # SIGKILL cannot be handled; the children get SIGTERM from the kernel (parent-death signal) instead
    up = Up(tmp_path, marker, models_dir=models_dir)
    up.wait_output("resnet-lab is up")
    wait_for(lambda: up.workers(), 10, "a worker to start")
    direct = [up.workers()[0]["pid"], up.ui()["pid"]]
    redis_url = up.workers()[0]["redis_url"]
    up.proc.kill()
    up.wait()
    wait_for(lambda: not set(direct) & set(marked_processes(marker)), 10, "the worker and the page to exit")
    wait_for(lambda: not redis_ping(redis_url, timeout=0.5), 10, "the embedded Redis to stop")
    # the worker's own grandchild is the worker's business once the supervisor is gone
    for pid in marked_processes(marker):
        os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not marked_processes(marker), 5, "every process up started to exit")


# --- the pieces, without processes ---------------------------------------------------------------------------

@pytest.mark.parametrize("visible, expected", [
    ("", []), ("-1", []), ("0", ["0"]), ("0,2", ["0", "2"]), ("1,-1,2", ["1"]),
    ("GPU-3a23c669-1f69-c64e-cf85-44e9b07e7a2a", ["GPU-3a23c669-1f69-c64e-cf85-44e9b07e7a2a"]),
])
def test_detect_gpus_reads_cuda_visible_devices(visible, expected):
    assert detect_gpus({"CUDA_VISIBLE_DEVICES": visible, "PATH": "/nonexistent"}) == expected


def test_detect_gpus_asks_nvidia_smi_in_a_subprocess(tmp_path):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '0\\n1\\n2\\n'\n")
    fake.chmod(0o755)
    assert detect_gpus({"PATH": str(tmp_path)}) == ["0", "1", "2"]
    fake.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed' >&2\nexit 9\n")
    assert detect_gpus({"PATH": str(tmp_path)}) == []
    assert detect_gpus({"PATH": str(tmp_path / "none")}) == []


def test_detect_gpus_never_initialises_cuda_in_the_parent():
    code = ("import sys; from shared.launch.up import detect_gpus; detect_gpus(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'gradio', 'celery')))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_parse_gpus():
    env = {"CUDA_VISIBLE_DEVICES": "3,4"}
    assert parse_gpus(None, env) == parse_gpus("all", env) == ["3", "4"]
    assert parse_gpus("cpu", env) == parse_gpus("", env) == []
    assert parse_gpus("0, 2", env) == ["0", "2"]
    assert parse_gpus(["1"], env) == ["1"]


def test_plan_children_splits_threads_between_gpu_workers(tmp_path):
    settings = Settings(models_dir=tmp_path)
    plan = plan_children(settings, ["0", "1"], ["w"], ["u"])
    assert [c.name for c in plan] == ["worker (GPU 0)", "worker (GPU 1)", "page"]
    assert [c.env.get("CUDA_VISIBLE_DEVICES") for c in plan] == ["0", "1", None]
    assert plan[0].env["RESNET_LAB_WORKER_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert plan_children(Settings(models_dir=tmp_path, worker_threads=3), ["0"], ["w"], ["u"])[0] \
        .env["RESNET_LAB_WORKER_THREADS"] == "3"
    cpu = plan_children(settings, [], ["w"], ["u"])
    assert [c.name for c in cpu] == ["worker (CPU)", "page"] and cpu[0].env == {"CUDA_VISIBLE_DEVICES": ""}


def test_page_url():
    assert page_url(Settings(host="0.0.0.0", port=7860)) == "http://127.0.0.1:7860"
    assert page_url(Settings(host="::1", port=80)) == "http://[::1]:80"
    assert page_url(Settings(port=7860)) == "http://127.0.0.1:7860"


def test_run_child_execs_python_module_with_args_settings_and_env(tmp_path):
    (tmp_path / "probe.py").write_text(textwrap.dedent("""
        import json, os, sys
        print(json.dumps({"argv": sys.argv[1:], "pid": os.getpid(), "x": os.environ.get("PROBE_X"),
                          "models": os.environ.get("RESNET_LAB_MODELS_DIR")}))
    """))
    code = ("import os; from shared.settings import Settings; from shared.launch.up import run_child; "
            "print(os.getpid(), flush=True); "
            f"run_child('probe', ['--port', '1'], Settings(models_dir={str(tmp_path / 'm')!r}), env={{'PROBE_X': 'y'}})")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    parent_pid, child = out.stdout.splitlines()
    assert json.loads(child) == {"argv": ["--port", "1"], "pid": int(parent_pid), "x": "y",
                                 "models": str(tmp_path / "m")}
