"""The one process supervisor, used by `resnet-lab up` and by `python -m worker --gpus`.

Each child runs as the leader of its own process group, so stopping it also stops whatever it forked (Celery's
pool, data-loader workers). The policy:

- A *restartable* child (a worker) that exits is started again after a back-off that doubles with each crash in
  a row (1 s, 2 s, 4 s ... at most 60 s). A worker killed by the kernel's out-of-memory killer is what this is
  for: the run it was training resumes from its last finished epoch on the restarted worker (worker/recovery.py).
  The back-off starts again from 1 s once the child has stayed up `stable_after` seconds.
- A restartable child that crashes `max_quick_crashes` times in a row, each time within `stable_after` seconds of
  starting, cannot start at all (a broken install, a dead GPU, a wrong REDIS_URL): it is given up on, with a
  message. Its siblings go on (one dead GPU does not stop the others); once *every* restartable child has been
  given up on there is nothing left to supervise, so everything stops with exit code 1. For `up` this also
  stops the page: a page without a worker would leave every run QUEUED without saying why, while the terminal
  (and the exit code, for systemd or Docker) says it at once. A run that kills its worker each time is not such
  a loop: the worker fails that run after 3 deaths (worker/recovery.py MAX_CRASHES) and then stays up.
- An *essential* child (the page) that exits, or a watched process started elsewhere (the embedded Redis),
  stops everything with exit code 1: without them nothing works, and restarting them would hide the cause.
- SIGINT, SIGTERM or SIGHUP stops everything (SIGTERM to every group at once, SIGKILL after `stop_timeout`) and
  the supervisor returns 0.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from shared.launch.services import popen_in_own_group, stop_group

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

# say(message, level): how the supervisor reports; `up` prints, `worker --gpus` logs
Say = Callable[[str, int], None]


@dataclass(frozen=True)
class RestartPolicy:
    """When and how often a restartable child is started again (see the module docstring)."""

    first_delay: float = 1.0
    max_delay: float = 60.0
    # a child that stayed up this long was healthy: its next crash starts the back-off from scratch
    stable_after: float = 60.0
    # crashes in a row, each within `stable_after` of starting, before the child is given up on
    max_quick_crashes: int = 5

    def delay(self, crashes: int) -> float:
        """Seconds to wait before the restart that follows the `crashes`-th crash in a row."""
        return min(self.max_delay, self.first_delay * 2 ** max(0, crashes - 1))


@dataclass
class Child:
    """One supervised process: its label for messages, command, extra environment and whether it is restarted."""

    name: str
    cmd: list[str]
    env: dict[str, str]
    restart: bool = False
    proc: subprocess.Popen | None = None
    started_at: float = 0.0
    quick_crashes: int = 0
    restart_at: float | None = None
    given_up: bool = False


@dataclass
class Watched:
    """A process started elsewhere whose death stops everything (the embedded Redis); `hint` ends the message."""

    name: str
    proc: subprocess.Popen
    hint: str = ""


def describe_exit(code: int) -> str:
    """'exited with code 3', or 'was killed by SIGKILL' for a negative Popen return code."""
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (out of memory? see `dmesg`)" if -code == signal.SIGKILL else ""
        return f"was killed by {name}{hint}"
    return f"exited with code {code}"


class StopRequest:
    """Turns SIGINT/SIGTERM/SIGHUP into an event the supervising loop waits on; restores the old handlers after.

    Must be entered in the main thread (signal handlers).
    """

    def __init__(self):
        self.event = threading.Event()
        self.signum: int | None = None
        self._old: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        self.event.set()

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            self._old[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _log_say(message: str, level: int) -> None:
    log.log(level, message)


@dataclass
class Supervisor:
    """Starts `children` with `env` (plus each child's own), watches them and `watched` until a stop or a fatal exit.

    `run()` returns the exit code: 0 after a stop signal, 1 when an essential child or a watched process died or
    every restartable child was given up on. Whatever happens, every child's group is stopped before it returns.
    """

    children: Sequence[Child]
    env: Mapping[str, str]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    watched: Sequence[Watched] = ()
    stop_timeout: float = 20.0
    poll: float = 0.2
    say: Say = _log_say

    def run(self, stop: StopRequest, tick: Callable[[], None] | None = None) -> int:
        """Start every child, then supervise; `tick` runs once per poll (e.g. to say when the page answers)."""
        try:
            for child in self.children:
                if stop.event.is_set():
                    break
                self._start(child)
            return self._watch(stop, tick)
        finally:
            self.stop_all()

    def _start(self, child: Child) -> None:
        child.proc = popen_in_own_group(child.cmd, env={**self.env, **child.env})
        child.started_at = time.monotonic()
        child.restart_at = None
        self.say(f"started {child.name}: pid {child.proc.pid}", logging.INFO)

    def _watch(self, stop: StopRequest, tick) -> int:
        while True:
            if stop.event.is_set():  # first: a child that exits while we are told to stop is no crash
                self.say(f"received {signal.Signals(stop.signum).name}: stopping everything", logging.INFO)
                return 0
            for child in self.children:
                if child.proc is None or child.given_up:
                    continue
                if child.restart_at is not None:
                    if time.monotonic() >= child.restart_at:
                        self._start(child)
                    continue
                code = child.proc.poll()
                if code is None:
                    continue
                if not child.restart:
                    self.say(f"{child.name} (pid {child.proc.pid}) {describe_exit(code)} — stopping everything",
                             logging.ERROR)
                    return 1
                self._crashed(child, code)
            for item in self.watched:
                if item.proc.poll() is not None:
                    self.say(f"{item.name} {describe_exit(item.proc.returncode)}{item.hint} — stopping everything",
                             logging.ERROR)
                    return 1
            restartable = [c for c in self.children if c.restart]
            if restartable and all(c.given_up for c in restartable):
                self.say("no worker is left to supervise — stopping everything", logging.ERROR)
                return 1
            if tick is not None:
                tick()
            stop.event.wait(self.poll)

    def _crashed(self, child: Child, code: int) -> None:
        """Schedule the restart of a restartable child that exited, or give up on it (see the module docstring)."""
        stop_group(child.proc, timeout=0, sig=None)  # whatever it forked goes with it before a new one starts
        uptime = time.monotonic() - child.started_at
        child.quick_crashes = child.quick_crashes + 1 if uptime < self.policy.stable_after else 1
        how = describe_exit(code)
        if child.quick_crashes >= self.policy.max_quick_crashes:
            child.given_up = True
            self.say(f"{child.name} (pid {child.proc.pid}) {how}; it died {child.quick_crashes} times in a row, each "
                     f"within {self.policy.stable_after:.0f} s of starting, so it is not restarted again: see its "
                     f"output above for why it cannot start", logging.ERROR)
            return
        delay = self.policy.delay(child.quick_crashes)
        child.restart_at = time.monotonic() + delay
        self.say(f"{child.name} (pid {child.proc.pid}) {how}; restarting it in {delay:g} s "
                 f"(a run it was training resumes from its last finished epoch)", logging.WARNING)

    def stop_all(self) -> None:
        """SIGTERM every group at once (last started first), then wait on a shared deadline and SIGKILL stragglers."""
        started = [c for c in reversed(self.children) if c.proc is not None]
        for child in started:
            if child.proc.poll() is None:
                try:
                    os.killpg(child.proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        # one SIGTERM only: a second one may mean "hurry" to a child; then a shared deadline and a SIGKILL sweep
        end = time.monotonic() + self.stop_timeout
        for child in started:
            stop_group(child.proc, timeout=max(0.0, end - time.monotonic()), sig=None)
