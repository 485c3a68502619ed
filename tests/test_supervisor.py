"""shared.launch.supervisor in this process, with stand-in commands (`python -c ...`): restarts with back-off, giving
up on a child that cannot start, essential children and watched processes, stopping.

`up` and `worker --gpus` wrap this class; tests/test_up.py drives it through `up` with real processes.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from shared.launch.supervisor import Child, RestartPolicy, StopRequest, Supervisor, Watched, describe_exit
from tests.procs import wait_for

pytestmark = pytest.mark.timeout(120)

# a stand-in that appends its start time to a file, lives `seconds` and exits with `code` (never, with -1)
STAND_IN = """
import json, signal, sys, time
log, seconds, code = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
with open(log, "a") as f:
    f.write(json.dumps({"start": time.time()}) + "\\n")
signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
time.sleep(seconds if code >= 0 else 600)
sys.exit(code)
"""


def stand_in(tmp_path: Path, name: str, seconds: float, code: int, restart: bool = True) -> Child:
    return Child(name, [sys.executable, "-c", STAND_IN, str(tmp_path / f"{name}.log"), str(seconds), str(code)], {},
                 restart=restart)


def starts(tmp_path: Path, name: str) -> list[float]:
    path = tmp_path / f"{name}.log"
    return [json.loads(line)["start"] for line in path.read_text().splitlines()] if path.exists() else []


class Run:
    """Supervisor.run in this (main) thread; `stop_when(predicate)` sets the stop event from `tick`."""

    def __init__(self, children, policy=None, watched=(), stop_when=None):
        self.messages: list[tuple[int, str]] = []
        self.supervisor = Supervisor(children, {"PATH": "/usr/bin:/bin"}, policy=policy or RestartPolicy(),
                                     watched=watched, stop_timeout=5, poll=0.05,
                                     say=lambda m, level: self.messages.append((level, m)))
        self.stop_when = stop_when

    def __call__(self, timeout: float = 60) -> int:
        deadline = time.monotonic() + timeout
        with StopRequest() as stop:
            def tick():
                if (self.stop_when and self.stop_when()) or time.monotonic() > deadline:
                    stop.signum = signal.SIGTERM
                    stop.event.set()
            return self.supervisor.run(stop, tick=tick)

    @property
    def text(self) -> str:
        return "\n".join(m for _, m in self.messages)


def test_restarts_with_a_doubling_back_off_then_gives_up_after_quick_crashes(tmp_path):
    policy = RestartPolicy(first_delay=0.3, max_delay=0.6, stable_after=30, max_quick_crashes=4)
    run = Run([stand_in(tmp_path, "w", 0.0, 3), stand_in(tmp_path, "page", 0, -1, restart=False)], policy)
    assert run() == 1
    times = starts(tmp_path, "w")
    assert len(times) == 4, run.text
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert gaps[0] >= 0.3 and gaps[1] >= 0.6 and gaps[2] >= 0.6, gaps  # 0.3, 0.6, then capped at max_delay
    delays = [m.split("restarting it in ")[1].split(" s")[0] for _, m in run.messages if "restarting" in m]
    assert delays == ["0.3", "0.6", "0.6"], run.text
    assert "died 4 times in a row, each within 30 s of starting, so it is not restarted again" in run.text
    assert run.text.endswith("no worker is left to supervise — stopping everything")
    assert all(c.proc.poll() is not None for c in run.supervisor.children)  # the page was stopped too


def test_the_back_off_starts_again_after_a_child_stayed_up(tmp_path):
    # every run lasts longer than stable_after: each crash is the first in a row, so never given up on
    policy = RestartPolicy(first_delay=0.2, max_delay=5, stable_after=0.5, max_quick_crashes=2)
    run = Run([stand_in(tmp_path, "w", 0.8, 3)], policy, stop_when=lambda: len(starts(tmp_path, "w")) >= 4)
    assert run() == 0
    delays = [m.split("restarting it in ")[1].split(" s")[0] for _, m in run.messages if "restarting" in m]
    assert delays == ["0.2"] * len(delays) and len(delays) >= 3, run.text
    assert "not restarted again" not in run.text


def test_one_child_given_up_while_another_still_works_keeps_going(tmp_path):
    # `worker --gpus 0,1` with GPU 1 broken: GPU 0 keeps training
    policy = RestartPolicy(first_delay=0.1, max_delay=0.1, stable_after=30, max_quick_crashes=2)
    healthy, broken = stand_in(tmp_path, "gpu0", 0, -1), stand_in(tmp_path, "gpu1", 0.0, 1)
    run = Run([healthy, broken], policy, stop_when=lambda: broken.given_up)
    assert run() == 0, run.text  # stopped by the test, not by the supervisor
    assert broken.given_up and not healthy.given_up and len(starts(tmp_path, "gpu0")) == 1
    assert "gpu1" in run.text and "not restarted again" in run.text


def test_an_essential_child_dying_stops_everything_without_restarting(tmp_path):
    worker, page = stand_in(tmp_path, "w", 0, -1), stand_in(tmp_path, "page", 0.5, 0, restart=False)
    run = Run([worker, page])
    assert run() == 1
    assert "page (pid %d) exited with code 0 — stopping everything" % page.proc.pid in run.text
    assert len(starts(tmp_path, "page")) == 1 and "restarting" not in run.text
    assert worker.proc.returncode == 0  # stopped with SIGTERM


def test_a_watched_process_dying_stops_everything(tmp_path):
    redis = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    worker = stand_in(tmp_path, "w", 0, -1)
    run = Run([worker], watched=[Watched("the embedded redis-server", redis, " (log: x.log)")])
    assert run() == 1
    assert "the embedded redis-server exited with code 0 (log: x.log) — stopping everything" in run.text
    assert worker.proc.poll() is not None


def test_sigterm_stops_every_child_and_returns_0(tmp_path):
    children = [stand_in(tmp_path, "w", 0, -1), stand_in(tmp_path, "page", 0, -1, restart=False)]
    run = Run(children)
    finished = threading.Event()

    def kill_self_when_started():  # a real SIGTERM to this process, handled by StopRequest
        wait_for(lambda: (starts(tmp_path, "w") and starts(tmp_path, "page")) or finished.is_set(), 60,
                 "both stand-ins to start")
        if not finished.is_set():
            signal.raise_signal(signal.SIGTERM)

    threading.Thread(target=kill_self_when_started, daemon=True).start()
    try:
        assert run() == 0
    finally:
        finished.set()
    assert "received SIGTERM: stopping everything" in run.text
    assert [c.proc.returncode for c in children] == [0, 0]


def test_describe_exit():
    assert describe_exit(3) == "exited with code 3"
    assert describe_exit(-9) == "was killed by SIGKILL (out of memory? see `dmesg`)"
    assert describe_exit(-15) == "was killed by SIGTERM"
    assert RestartPolicy().delay(1) == 1 and RestartPolicy().delay(4) == 8 and RestartPolicy().delay(20) == 60
