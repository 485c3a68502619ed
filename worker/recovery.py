"""Crash recovery: a lease per running run, and a scan that re-queues runs whose worker died.

Why not rely on Celery's redelivery: with `task_acks_late` a message taken by a worker that is killed (kill -9,
machine restart) stays un-acknowledged in Redis until `visibility_timeout` passes, and that timeout must be
longer than the longest run (days). So each running task holds a lease — the Redis key `resnet_lab:lease:<id>`
with a TTL of a few tens of seconds, renewed by a heartbeat thread — and every worker periodically looks for
runs marked `running` whose lease has expired (their worker is gone) and for queued runs that no message in
the broker refers to, and sends `resnet_lab.train` for them again under a fresh task id (`<run_id>~r<n>`).

Duplicates are harmless by construction: the train task takes the lease before it does anything and re-reads
the run's status under it, so a second delivery of the same run (the re-sent task, or the original message
coming back after the visibility timeout) either finds the lease taken or the run finished, and skips.

A run is re-sent only while its folder says it can run (`settle_unrunnable`): a run deleted from the page while a
worker was starting it leaves at most a registry record behind, which the scan removes instead of re-sending it
forever; a damaged status.json turns the record DAMAGED (the page shows the fix).
"""

from __future__ import annotations

import base64
import json
import logging
import os
import threading
import time
import uuid
import redis

from shared.runs.lifecycle import mirror
from shared.runs.registry import PREFIX, RunRegistry
from shared.runs.store import DAMAGED, RunDamaged, RunNotFound, RunStore
from shared.tasks import TRAIN_TASK

log = logging.getLogger(__name__)

# a run whose worker died this many times in a row without finishing an epoch is failed instead of re-queued again
# (a process killed every time, e.g. by the kernel's out-of-memory killer, would take every worker down in turn)
MAX_CRASHES = 3
# kombu's Redis transport keeps un-acknowledged messages in this hash and splits a queue by priority step
_UNACKED_KEY = "unacked"
_PRIORITY_SEP = "\x06\x16"
_PRIORITY_STEPS = (3, 6, 9)

# set when the worker is asked to shut down: a running train task stops at its next batch and hands its run back
shutdown_requested = threading.Event()

_REFRESH = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('expire', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def lease_seconds() -> int:
    """Lease TTL: how long after a worker dies its run is taken over (RESNET_LAB_LEASE_SECONDS, default 30)."""
    value = os.environ.get("RESNET_LAB_LEASE_SECONDS", "30")
    try:
        seconds = int(value)
    except ValueError:
        raise ValueError(f"RESNET_LAB_LEASE_SECONDS must be an integer, got {value!r}") from None
    if seconds < 2:
        raise ValueError(f"RESNET_LAB_LEASE_SECONDS must be at least 2, got {seconds}")
    return seconds


def lease_key(run_id: str) -> str:
    return f"{PREFIX}:lease:{run_id}"


class Lease:
    """Exclusive right to train one run, kept alive by a heartbeat thread while this process lives.

    `lost` turns True when the key expired or changed hands under us (Redis unreachable for longer than the
    TTL, or the process was frozen): another worker may own the run now, so this one must stop touching it.
    """

    def __init__(self, client: redis.Redis, run_id: str, owner: str, ttl: int | None = None):
        self.r, self.run_id, self.key = client, run_id, lease_key(run_id)
        self.ttl = ttl or lease_seconds()
        self.token = f"{owner} pid {os.getpid()} {uuid.uuid4().hex[:8]}"
        self.lost = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> bool:
        """True when the lease is ours (and the heartbeat runs); False when another live worker holds it."""
        if not self.r.set(self.key, self.token, nx=True, ex=self.ttl):
            return False
        self._thread = threading.Thread(target=self._beat, name=f"lease-{self.run_id}", daemon=True)
        self._thread.start()
        return True

    def holder(self) -> str | None:
        return self.r.get(self.key)

    def _beat(self) -> None:
        interval = self.ttl / 3
        while not self._stop.wait(interval):
            try:
                if not self.r.eval(_REFRESH, 1, self.key, self.token, self.ttl):
                    self.lost = True
                    log.error("lost the lease on run %s (held by %s now): stopping it here", self.run_id,
                              self.holder())
                    return
            except redis.RedisError as exc:  # keep trying: the key outlives a short outage
                log.warning("cannot renew the lease on run %s: %s", self.run_id, exc)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if not self.lost:
            try:
                self.r.eval(_RELEASE, 1, self.key, self.token)
            except redis.RedisError as exc:  # it expires by itself within the TTL
                log.warning("cannot release the lease on run %s: %s", self.run_id, exc)


# --- finding runs nobody works on -------------------------------------------------------------------------------

def queued_run_ids(client: redis.Redis, queue: str = "celery") -> set[str]:
    """Run ids that a train message waiting in `queue` or taken but un-acknowledged refers to.

    Reads kombu's Redis layout (one list per priority step, plus the `unacked` hash). Only JSON messages are
    decoded: anything else would be refused by the workers anyway.
    """
    raw: list[str] = []
    for key in [queue] + [f"{queue}{_PRIORITY_SEP}{step}" for step in _PRIORITY_STEPS]:
        raw.extend(client.lrange(key, 0, -1))
    for value in client.hvals(_UNACKED_KEY):
        try:
            raw.append(json.dumps(json.loads(value)[0]))
        except (ValueError, IndexError, TypeError):
            continue
    ids = set()
    for item in raw:
        run_id = _train_message_run_id(item)
        if run_id:
            ids.add(run_id)
    return ids


def _train_message_run_id(raw: str) -> str | None:
    try:
        message = json.loads(raw)
        if message.get("headers", {}).get("task") != TRAIN_TASK:
            return None
        if message.get("content-type") != "application/json":
            return None
        body = message["body"]
        if message.get("properties", {}).get("body_encoding") == "base64":
            body = base64.b64decode(body)
        args = json.loads(body)[0]
        return str(args[0]) if args else None
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def find_orphans(registry: RunRegistry, queue: str = "celery", *, queued_grace: float = 300.0,
                 now: float | None = None) -> list[tuple[str, str, bool]]:
    """(run id, why, crashed) for runs that no worker will ever pick up on its own.

    - `running` with a `task_id` (so a worker started it; `resnet-lab train` runs have none) and no lease: the
      worker died.
    - `queued` for longer than `queued_grace` seconds, not cancelled, with no train message for it in the
      broker: the message was lost (the page died between creating the run and sending, Redis lost data).
    """
    now = time.time() if now is None else now
    orphans: list[tuple[str, str, bool]] = []
    waiting: list[str] = []
    run_ids = registry.ids()
    pipe = registry.r.pipeline(transaction=False)
    for run_id in run_ids:
        # lease before record: a finishing worker writes the final status first and then drops the lease
        pipe.exists(lease_key(run_id))
        pipe.get(f"{PREFIX}:run:{run_id}")
    replies = pipe.execute()
    for run_id, leased, raw in zip(run_ids, replies[0::2], replies[1::2]):
        record = json.loads(raw) if raw else {}
        status = record.get("status")
        if status == "running" and record.get("task_id") and not leased:
            orphans.append((run_id, f"its worker {record.get('worker') or '?'} stopped renewing its lease", True))
        elif status == "queued" and now - float(record.get("created") or now) > queued_grace \
                and not registry.cancel_requested(run_id):
            waiting.append(run_id)
    if waiting:
        pending = queued_run_ids(registry.r, queue)
        orphans += [(run_id, "no queued message refers to it", False) for run_id in waiting if run_id not in pending]
    return orphans


def settle_unrunnable(store: RunStore, registry: RunRegistry, run_id: str) -> str | None:
    """Why this run can never be trained from its folder (None: it can). A run whose folder is gone loses its
    registry record (it was deleted; a worker that was starting it may have written the record back); a run whose
    status.json is damaged gets a DAMAGED record naming the fix."""
    if not store.root.is_dir():  # the models folder is not there at all (not mounted?): decide nothing about runs
        return f"the models folder {store.root} is missing"
    try:
        store.status(run_id)
    except RunDamaged as exc:
        mirror(registry, {"run_id": run_id, "status": DAMAGED, "error": str(exc)})
        return f"its run folder is damaged: {exc}"
    except RunNotFound:
        registry.delete(run_id)
        return "its run folder is gone (deleted); its registry record is removed"
    return None


def resend_train(app, registry: RunRegistry, run_id: str, why: str, crashed: bool = False) -> str | None:
    """Send `resnet_lab.train` for a run again; returns the new task id, or None when another worker just did.

    A short Redis mutex keeps several workers that scan at the same time from each sending one. `crashed`
    counts a dead worker against the run (`crashes`): the train task gives up on a run that kills its worker
    every time (see MAX_CRASHES).
    """
    if not registry.r.set(f"{PREFIX}:recover:{run_id}", "1", nx=True, ex=max(2 * lease_seconds(), 30)):
        return None
    record = registry.get(run_id) or {}
    attempt = int(record.get("recoveries") or 0) + 1
    task_id = f"{run_id}~r{attempt}"
    crashes, crash_epochs = int(record.get("crashes") or 0), record.get("crash_epochs")
    if crashed:
        # only deaths with no epoch finished in between count: a run that moves on between crashes (a machine
        # restarted three times overnight) is not what kills its worker, one killed at the same place every time is
        epochs = len((registry.progress(run_id) or {}).get("history") or [])
        crashes = crashes + 1 if crash_epochs is None or epochs <= int(crash_epochs) else 1
        crash_epochs = epochs
    registry.update(run_id, recoveries=attempt, crashes=crashes, crash_epochs=crash_epochs)
    app.send_task(TRAIN_TASK, args=[run_id], task_id=task_id)
    log.warning("re-queued run %s as task %s: %s", run_id, task_id, why)
    return task_id


def recover_orphans(app, registry: RunRegistry, store: RunStore, *, queued_grace: float = 300.0) -> list[str]:
    """One scan: re-send every orphan whose folder can still run; returns the run ids re-queued."""
    queue = app.conf.task_default_queue or "celery"
    resent = []
    for run_id, why, crashed in find_orphans(registry, queue, queued_grace=queued_grace):
        unrunnable = settle_unrunnable(store, registry, run_id)
        if unrunnable:
            log.warning("not re-sending run %s: %s", run_id, unrunnable)
        elif resend_train(app, registry, run_id, why, crashed):
            resent.append(run_id)
    return resent


class RecoveryScanner:
    """Background thread in each worker: clear what crashed writers left in the models folder, then scan at start
    and every `interval` seconds until stopped."""

    def __init__(self, app, registry: RunRegistry, store: RunStore, interval: float | None = None,
                 queued_grace: float | None = None):
        self.app, self.registry, self.store = app, registry, store
        self.interval = interval or max(1.0, lease_seconds() / 2)
        # the page sends a run's message right after creating it; only a run queued for long without one is lost
        self.queued_grace = queued_grace if queued_grace is not None else 10.0 * lease_seconds()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="run-recovery", daemon=True)

    def start(self) -> "RecoveryScanner":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        try:
            self.store.remove_leftovers()
        except OSError as exc:  # a models folder we cannot clean still trains; say why the files stay
            log.warning("cannot remove leftover temporary files in %s: %s", self.store.root, exc)
        while True:
            try:
                recover_orphans(self.app, self.registry, self.store, queued_grace=self.queued_grace)
            except Exception:  # a scan that fails (Redis restarting) must not end the loop; the next one retries
                log.exception("run recovery scan failed; retrying in %.0f s", self.interval)
            if self._stop.wait(self.interval):
                return

