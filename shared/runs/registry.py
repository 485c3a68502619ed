"""The run registry in Redis: the run records of the run store, mirrored for cheap polling from any machine,
plus live progress and cancel flags.

Keys (all under `resnet_lab:`):
- `runs`                 sorted set of run ids by creation time
- `run:<id>`             JSON status record (same fields as the run folder's status.json, plus `config`)
- `progress:<id>`        JSON of the latest progress (phase, epoch, batch, images/s, ETA, history)
- `cancel:<id>`          present when a cancel was requested
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any, Iterable

import redis

from shared.runs.store import FIT_RECORD_KEYS, RunNotFound, RunStore

PREFIX = "resnet_lab"
# how long an evaluation may stay pending before another may be queued: a worker that died must not block it for ever
EVALUATION_CLAIM_TTL_S = 6 * 3600
# what the page queues per finished run, one at a time (`claim_job`); "lr-find" is per dataset folder instead
PENDING_JOBS = ("evaluating", "data-issues", "lr-find")

log = logging.getLogger(__name__)


class RunRegistry:
    def __init__(self, client: redis.Redis):
        self.r = client

    @classmethod
    def from_url(cls, url: str, timeout: float = 2.0) -> "RunRegistry":
        return cls(redis.Redis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout,
                                        decode_responses=True, health_check_interval=30))

    def _key(self, kind: str, run_id: str) -> str:
        return f"{PREFIX}:{kind}:{run_id}"

    def ping(self) -> bool:
        try:
            return bool(self.r.ping())
        except redis.RedisError:
            return False

    def put(self, record: dict) -> None:
        run_id = record["run_id"]
        pipe = self.r.pipeline()
        pipe.set(self._key("run", run_id), json.dumps(record))
        pipe.zadd(f"{PREFIX}:runs", {run_id: float(record.get("created") or time.time())})
        pipe.execute()

    def update(self, run_id: str, **fields: Any) -> dict:
        """Merge fields into a record atomically (the page and workers write concurrently)."""
        key = self._key("run", run_id)
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(key)
                    raw = pipe.get(key)
                    record = json.loads(raw) if raw else {"run_id": run_id}
                    record.update(fields)
                    pipe.multi()
                    pipe.set(key, json.dumps(record))
                    pipe.zadd(f"{PREFIX}:runs", {run_id: float(record.get("created") or time.time())}, nx=True)
                    pipe.execute()
                    return record
                except redis.WatchError:
                    continue

    def get(self, run_id: str) -> dict | None:
        raw = self.r.get(self._key("run", run_id))
        return json.loads(raw) if raw else None

    def ids(self, limit: int = 500) -> list[str]:
        return list(self.r.zrevrange(f"{PREFIX}:runs", 0, limit - 1))

    def list(self, limit: int = 500) -> list[dict]:
        """Records newest first, each with its latest progress under `progress`."""
        ids = self.ids(limit)
        if not ids:
            return []
        pipe = self.r.pipeline()
        for run_id in ids:
            pipe.get(self._key("run", run_id))
            pipe.get(self._key("progress", run_id))
        raw = pipe.execute()
        records = []
        for i in range(0, len(raw), 2):
            if raw[i]:
                record = json.loads(raw[i])
                record["progress"] = json.loads(raw[i + 1]) if raw[i + 1] else None
                records.append(record)
        return records

    def delete(self, run_id: str) -> None:
        pipe = self.r.pipeline()
        for kind in ("run", "progress", "cancel"):
            pipe.delete(self._key(kind, run_id))
        pipe.zrem(f"{PREFIX}:runs", run_id)
        pipe.execute()

    def set_progress(self, run_id: str, progress: dict) -> None:
        self.r.set(self._key("progress", run_id), json.dumps(progress))

    def progress(self, run_id: str) -> dict | None:
        raw = self.r.get(self._key("progress", run_id))
        return json.loads(raw) if raw else None

    def request_cancel(self, run_id: str) -> None:
        self.r.set(self._key("cancel", run_id), "1")

    def cancel_requested(self, run_id: str) -> bool:
        return bool(self.r.exists(self._key("cancel", run_id)))

    def claim_job(self, job: str, run_id: str, ttl: int = EVALUATION_CLAIM_TTL_S) -> bool:
        """True when no `job` (one of PENDING_JOBS) of `run_id` was queued or running; marks one as pending until
        `release_job` (or `ttl` seconds, should the worker die): a page may queue one of each per run, so a client
        pressing the button in a loop cannot bury the workers."""
        if job not in PENDING_JOBS:
            raise ValueError(f"unknown job {job!r}; one of {', '.join(PENDING_JOBS)}")
        return bool(self.r.set(self._key(job, run_id), str(time.time()), nx=True, ex=ttl))

    def release_job(self, job: str, run_id: str) -> None:
        self.r.delete(self._key(job, run_id))

    def count_unfinished(self) -> int:
        """How many runs are queued or running (what the page caps)."""
        ids = self.r.zrange(f"{PREFIX}:runs", 0, -1)
        if not ids:
            return 0
        raws = self.r.mget([self._key("run", run_id) for run_id in ids])
        return sum(1 for raw in raws if raw and json.loads(raw).get("status") in ("queued", "running"))

    def sync_from_store(self, store: RunStore, run_ids: Iterable[str] | None = None) -> int:
        """Re-create records from the run folders (after Redis lost its data); returns how many were written.
        A run whose status.json is damaged gets a DAMAGED record (see `RunStore.list`), so the page shows it."""
        count = 0
        for status in store.list():
            if run_ids is not None and status["run_id"] not in run_ids:
                continue
            if self.get(status["run_id"]) is None:
                record = dict(status)
                try:
                    config = store.config_record(status["run_id"])
                    record["config"] = {k: v for k, v in config.items() if k not in FIT_RECORD_KEYS}
                except RunNotFound as exc:  # a damaged config.json must not hide the run: it shows with model "?"
                    log.warning("run %s: %s", status["run_id"], exc)
                    record["config"] = None
                self.put(record)
                count += 1
        return count
