"""The worker's reporter: the engine's progress as Celery PROGRESS state and in the run registry; cancel checks.

Publishing is throttled to about once a second (a batch can take milliseconds), except on a phase change, a
new epoch and an epoch's end, which the page must see at once. The page draws live curves from Redis alone,
so every update carries the per-epoch history so far.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import redis

from shared.training.engine import Reporter
from shared.runs.registry import RunRegistry
from shared.runs.store import read_metrics

from .recovery import Lease, shutdown_requested

log = logging.getLogger(__name__)


class TaskReporter(Reporter):
    def __init__(self, task, run_id: str, registry: RunRegistry, lease: Lease | None = None, *,
                 run_dir: Path | None = None, min_interval: float = 1.0, cancel_interval: float = 0.5):
        self.task, self.run_id, self.registry, self.lease = task, run_id, registry, lease
        # a resumed run shows its earlier epochs at once; the 'training' phase re-reads them after fit resumed
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.min_interval, self.cancel_interval = min_interval, cancel_interval
        self.state: dict[str, Any] = {"run_id": run_id, "phase": "starting", "epoch": 0, "epochs": None,
                                      "batch": 0, "num_batches": None, "images_per_s": None, "eta_s": None,
                                      "info": {}, "history": read_metrics(run_dir) if run_dir else []}
        self._last_publish = 0.0
        self._last_cancel_check = 0.0
        self._cancelled = False
        self._history_loaded = False
        # batch timing in this process, for the ETA (a resumed run only counts what it trained here)
        self._train_started: float | None = None
        self._batches_done = 0
        self._publish_failures = 0

    # ---- what the engine calls ----
    def phase(self, name: str, **info: Any) -> None:
        changed = name != self.state["phase"]
        if name == "training":
            if info.get("epochs"):
                self.state["epochs"] = info["epochs"]
            if not self._history_loaded and self.run_dir is not None:
                # fit announces 'training' after resuming, when metrics.jsonl holds exactly last.pt's epochs
                self.state["history"] = read_metrics(self.run_dir)
                self.state["epoch"] = len(self.state["history"])
                self._history_loaded = True
        self.state["phase"] = name
        self.state["info"] = info
        self._publish(force=changed)

    def batch(self, epoch: int, batch: int, num_batches: int, images_per_s: float) -> None:
        new_epoch = epoch != self.state["epoch"]
        if self._train_started is None:
            self._train_started = time.monotonic()
        self._batches_done += 1
        self.state.update(epoch=epoch, batch=batch, num_batches=num_batches, images_per_s=images_per_s,
                          eta_s=self._eta(epoch, batch, num_batches))
        self._publish(force=new_epoch)

    def epoch(self, record: dict) -> None:
        history = [r for r in self.state["history"] if r.get("epoch") != record["epoch"]]
        self.state["history"] = history + [record]
        self.state["epoch"] = record["epoch"]
        self._publish(force=True)

    def should_stop(self) -> bool:
        if self._cancelled or shutdown_requested.is_set() or (self.lease is not None and self.lease.lost):
            return True
        now = time.monotonic()
        if now - self._last_cancel_check >= self.cancel_interval:
            self._last_cancel_check = now
            try:
                self._cancelled = self.registry.cancel_requested(self.run_id)
            except redis.RedisError as exc:  # Redis away for a moment: keep training, ask again next batch
                log.warning("cannot read the cancel flag of %s: %s", self.run_id, exc)
        return self._cancelled

    # ---- for the task ----
    @property
    def cancel_requested(self) -> bool:
        return self._cancelled

    def evaluation_progress(self, done: int, total: int) -> None:
        """Progress callback for `evaluate_run`: steps done out of total."""
        self.state["info"] = {"done": done, "total": total}
        self._publish(force=done >= total)

    def finish(self, phase: str, **info: Any) -> None:
        """The last progress record: `phase` is the final status; history stays for the page's curves."""
        self.state.update(phase=phase, info=info, eta_s=0 if phase == "succeeded" else None)
        self._publish(force=True)

    def snapshot(self) -> dict:
        return {**self.state, "history": list(self.state["history"]), "updated": time.time()}

    # ---- internals ----
    def _eta(self, epoch: int, batch: int, num_batches: int) -> float | None:
        epochs = self.state["epochs"]
        if not epochs or self._batches_done < 2 or self._train_started is None:
            return None
        per_batch = (time.monotonic() - self._train_started) / self._batches_done
        remaining = (num_batches - batch) + (epochs - epoch) * num_batches
        return round(per_batch * remaining, 1)

    def _publish(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_publish < self.min_interval:
            return
        self._last_publish = now
        meta = self.snapshot()
        try:
            self.registry.set_progress(self.run_id, meta)
            if self.task is not None and self.task.request.id:
                self.task.update_state(state="PROGRESS", meta=meta)
        except (redis.RedisError, OSError) as exc:
            # progress is a side channel: a Redis hiccup must not fail hours of training
            self._publish_failures += 1
            if self._publish_failures in (1, 10, 100):
                log.warning("cannot publish progress of %s (%d failures): %s", self.run_id,
                            self._publish_failures, exc)
