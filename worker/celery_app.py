"""The Celery app: broker and result backend from REDIS_URL, JSON only, one task at a time per worker process.

`celery -A worker.celery_app worker` (or `celery -A worker worker`) and `python -m worker` both use the module
level `app`. Creating a Celery object connects nowhere; the worker connects when it starts.
"""

from __future__ import annotations

import logging
import os

from celery import Celery, signals

from shared.runs.registry import RunRegistry
from shared.runs.store import RunStore
from shared.settings import Settings

from .recovery import RecoveryScanner, shutdown_requested

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> Celery:
    """A Celery app for `settings` with the resnet_lab tasks (`resnet_lab.train|evaluate|predict_batch`)."""
    app = Celery("resnet_lab", broker=settings.redis_url, backend=settings.redis_url, include=["worker.tasks"])
    transport = {"visibility_timeout": settings.visibility_timeout}
    app.conf.update(
        # JSON only: a pickled message is refused before it is decoded (unpickling runs arbitrary code)
        task_serializer="json", result_serializer="json", accept_content=["json"], result_accept_content=["json"],
        # a task is acknowledged when it ends, so a worker that dies mid-run leaves its message in Redis;
        # recovery does not wait for the visibility timeout though (see worker/recovery.py)
        task_acks_late=True, task_reject_on_worker_lost=True, task_acks_on_failure_or_timeout=True,
        # one run at a time per process: a worker must not sit on queued runs another worker could train
        worker_prefetch_multiplier=1,
        # longer than the longest run, else Redis hands a running task to a second worker
        broker_transport_options=transport, result_backend_transport_options=transport,
        task_track_started=True,
        # training survives a broker reconnect; the lease (not Celery) decides who owns a run
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_retry_on_startup=True,
        # the worker's logging is configured by Celery's --loglevel; handlers someone else set up stay
        worker_hijack_root_logger=False,
        # per-epoch results are small; keep them for a week for `AsyncResult` users
        result_expires=7 * 24 * 3600,
    )
    # on the app object, not in app.conf: `celery inspect conf` sends the conf to anyone on the broker, and the
    # settings hold the page login and the Redis URL (Celery masks only keys it knows by name)
    app.resnet_lab_settings = settings
    return app


def settings_of(app: Celery) -> Settings:
    """The Settings `app` was created with (from the environment when someone built the app by hand)."""
    return getattr(app, "resnet_lab_settings", None) or Settings.from_env()


def torch_threads(settings: Settings) -> int:
    """Intra-op threads for training: RESNET_LAB_WORKER_THREADS, else one per core this process may use."""
    if settings.worker_threads > 0:
        return settings.worker_threads
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@signals.worker_init.connect
@signals.worker_process_init.connect
def _set_threads(sender=None, **_):
    # the solo pool trains in the worker process itself; prefork children (`--concurrency N`) each get the
    # count `python -m worker` divided among them. Setting the count starts no thread, so forking stays safe.
    import torch
    from celery import current_app

    threads = torch_threads(settings_of(getattr(sender, "app", None) or current_app))
    torch.set_num_threads(threads)
    log.info("torch uses %d threads", threads)


_scanner = None


@signals.worker_ready.connect
def _start_recovery(sender=None, **_):
    """Clear leftovers of crashed writes, then re-queue runs whose worker died (see worker/recovery.py), now and
    periodically."""
    global _scanner

    app = sender.app
    settings = settings_of(app)
    _scanner = RecoveryScanner(app, RunRegistry.from_url(settings.redis_url, timeout=10.0),
                               RunStore(settings.models_dir)).start()


@signals.worker_shutting_down.connect
def _on_shutdown(**_):
    # runs inside the SIGTERM/SIGINT handler: only set flags. A running train task stops at its next batch,
    # puts its run back in the queue and returns, so the warm shutdown does not wait for the whole run.
    shutdown_requested.set()
    if _scanner is not None:
        _scanner.stop()


app = create_app(Settings.from_env())
