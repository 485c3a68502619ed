"""A run's life: every status change goes through `transition` — the CLI's `train`, the worker's tasks and the
page's cancel alike.

The folder is written first (status.json is the durable truth), then the registry copy in Redis (what the page
polls), both under the run folder's lock so two writers (the page cancelling while a worker starts the run) can
neither interleave their folder writes nor leave Redis showing the older of the two. A change the table below
does not allow is refused with `TransitionRefused` before anything is written.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Iterable

from shared.runs.registry import RunRegistry
from shared.runs.store import RunStore

log = logging.getLogger(__name__)

# status now → the statuses it may change to, and why each is allowed
TRANSITIONS: dict[str, tuple[str, ...]] = {
    # a worker (or `resnet-lab train`) starts it; cancelled or failed before it could start
    "queued": ("running", "cancelled", "failed"),
    # another worker takes over a run whose worker died (it resumes from last.pt); its worker shut down and handed
    # it back to the queue; it ended
    "running": ("running", "queued", "succeeded", "failed", "cancelled"),
    # `resnet-lab train --resume` continues it from last.pt
    "failed": ("running",),
    # resumed like a failed run; a cancel that raced the run's start ends it as cancelled twice
    "cancelled": ("running", "cancelled"),
    # final: a new run is how to train it again
    "succeeded": (),
}


class TransitionRefused(ValueError):
    """The run cannot move from its status to the one asked for; the message says both and what to do."""


def check_transition(run_id: str, current: str, status: str, expected: Iterable[str] | None = None) -> None:
    """Raise TransitionRefused unless the table (and `expected`, the statuses the caller saw) allows it."""
    if status not in TRANSITIONS:
        raise ValueError(f"status must be one of {', '.join(TRANSITIONS)}, got {status!r}")
    expected = tuple(expected) if expected is not None else None
    if expected is not None and current not in expected:
        raise TransitionRefused(f"run {run_id}'s status is {current} now, no longer {' or '.join(expected)}")
    if status not in TRANSITIONS[current]:
        allowed = ", ".join(TRANSITIONS[current]) or "nothing (it is final: start a new run instead)"
        raise TransitionRefused(f"run {run_id}'s status is {current}: it cannot become {status} — from {current} "
                                f"it can become {allowed}")


def transition(store: RunStore, registry: RunRegistry | None, run_id: str, status: str, *,
               expected: Iterable[str] | None = None, **fields: Any) -> dict:
    """Move a run to `status` (with `fields` such as `error`, `best`, `worker`): the run folder, then its registry
    record when `registry` is given; returns the new status record.

    `expected`: the statuses the caller decided on (the page cancels only a run that is still queued); refused
    when the run moved on meanwhile. RunNotFound / RunDamaged when the folder is gone or unreadable (nothing is
    written then, in Redis neither); OSError when it cannot be written.
    """
    with store.locked(run_id):
        current = store.status(run_id)["status"]
        check_transition(run_id, current, status, expected)
        record = store.set_status(run_id, status, **fields)
        if registry is not None:
            mirror(registry, record)
    log.debug("run %s: %s → %s", run_id, current, status)
    return record


def mirror(registry: RunRegistry, record: dict) -> dict:
    """Copy a status record read from a run folder (or the fields of one) into the run's registry record."""
    return registry.update(record["run_id"], **{k: v for k, v in record.items() if k != "run_id"})


def fail_in_registry_only(registry: RunRegistry, run_id: str, error: str) -> dict:
    """A run whose folder cannot be written (read-only, disk full) ends FAILED in the registry alone: the page still
    shows why, and the recovery scan does not re-send a run that Redis would otherwise keep showing as running."""
    return registry.update(run_id, status="failed", error=error, finished=time.time())
