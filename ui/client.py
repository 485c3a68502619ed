"""The page's side of the queue: create runs, send tasks by name, poll the registry, cancel, delete.

It never imports `worker`: tasks are sent by their names (`resnet_lab.train`, ...) with JSON arguments, so the
page and the workers can be deployed and upgraded apart.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from functools import cached_property

import redis
from celery import Celery

from shared.training.config import TrainConfig
from shared.runs.lifecycle import TransitionRefused, transition
from shared.runs.registry import PREFIX, RunRegistry
from shared.runs.store import RunNotFound, RunStore
from shared.settings import Settings, redact_url
from shared.tasks import DATA_ISSUES_TASK, EVALUATE_TASK, LR_FIND_TASK, PREDICT_BATCH_TASK, TRAIN_TASK
from shared.training.lr_result import new_job_id

log = logging.getLogger(__name__)



# how long the page remembers a range test it sent (as long as Celery keeps task results: celery_app.py)
LR_FIND_KEEP_S = 7 * 24 * 3600


class EvaluationPending(RuntimeError):
    """An evaluation (or a data-issues search) of this run, or a range test on this dataset, is already queued or
    running."""


class QueueUnavailable(RuntimeError):
    """Redis cannot be reached; the message says what to start."""


class QueueFull(RuntimeError):
    """Queuing these runs would pass RESNET_LAB_MAX_QUEUED_RUNS; the message says how many wait and what to do."""


class QueueClient:
    def __init__(self, settings: Settings):
        if not settings.redis_url:
            raise QueueUnavailable("REDIS_URL is not set: start the app with `resnet-lab up`, or set REDIS_URL "
                                   "to a running Redis (e.g. redis://127.0.0.1:6379/0)")
        self.settings = settings
        self.store = RunStore(settings.models_dir)
        self.registry = RunRegistry.from_url(settings.redis_url)

    @cached_property
    def celery(self) -> Celery:
        app = Celery("resnet_lab_client", broker=self.settings.redis_url, backend=self.settings.redis_url)
        app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json",
                        broker_transport_options={"visibility_timeout": self.settings.visibility_timeout},
                        broker_connection_retry_on_startup=True, broker_connection_max_retries=1)
        return app

    def redis_ok(self) -> bool:
        return self.registry.ping()

    def _require_redis(self) -> None:
        if not self.redis_ok():
            raise QueueUnavailable(f"cannot reach Redis at {redact_url(self.settings.redis_url)}: start it "
                                   "(`resnet-lab up` starts one) and the page reconnects by itself")

    def submit(self, configs: list[TrainConfig]) -> list[str]:
        """One QUEUED run per config, each visible in the registry before its task is sent.

        Refuses (QueueFull) when the queued and running runs would pass `settings.max_queued_runs`; the count and
        the new records happen under one Redis lock, so two submissions at once cannot both slip under the cap.
        """
        self._require_redis()
        lock = self.registry.r.lock(f"{PREFIX}:submit-lock", timeout=120, blocking_timeout=60)
        if not lock.acquire():
            raise QueueUnavailable("another submission has held the queue for a minute — try again shortly")
        try:
            waiting = self.registry.count_unfinished()
            cap = self.settings.max_queued_runs
            if waiting + len(configs) > cap:
                raise QueueFull(f"{waiting} run(s) are queued or running and this adds {len(configs)}: at most {cap} "
                                "may wait at once (RESNET_LAB_MAX_QUEUED_RUNS) — queue fewer, cancel queued runs, "
                                "or wait for some to finish")
            return self._create_and_send(configs)
        finally:
            lock.release()

    def _create_and_send(self, configs: list[TrainConfig]) -> list[str]:
        run_ids = []
        for config in configs:
            run_id = self.store.create(config)
            record = {**self.store.status(run_id), "config": config.to_dict()}
            self.registry.put(record)
            self.celery.send_task(TRAIN_TASK, args=[run_id], task_id=run_id)
            run_ids.append(run_id)
        return run_ids

    def submit_evaluate(self, run_id: str, split: str = "test", data_dir: str | None = None) -> str:
        # one pending evaluation per run: a client pressing "Evaluate again" in a loop must not bury the workers
        return self._send_claimed("evaluating", run_id, EVALUATE_TASK, {"split": split, "data_dir": data_dir},
                                  f"an evaluation of {run_id} is already queued or running — wait for it to finish")

    def submit_predict_batch(self, run_id: str, sources: list[str]) -> str:
        self._require_redis()
        self.store.status(run_id)
        return self.celery.send_task(PREDICT_BATCH_TASK, args=[run_id, sources]).id

    def submit_data_issues(self, run_id: str, data_dir: str | None = None) -> str:
        """Queue `find_data_issues` for a finished run (its own dataset unless `data_dir`); the task's id."""
        return self._send_claimed("data-issues", run_id, DATA_ISSUES_TASK, {"data_dir": data_dir},
                                  f"the data issues of {run_id} are already being looked for — wait for the report")

    def _send_claimed(self, job: str, run_id: str, task: str, kwargs: dict, pending: str) -> str:
        """Send `task` for an existing run while no other `job` of it is pending (the worker releases the claim
        when it ends); EvaluationPending(`pending`) otherwise."""
        self._require_redis()
        self.store.status(run_id)  # raises RunNotFound early
        with self._claimed(job, run_id, pending):
            return self.celery.send_task(task, args=[run_id], kwargs=kwargs).id

    @contextmanager
    def _claimed(self, job: str, key: str, pending: str):
        """Claim `job` of `key` (EvaluationPending(`pending`) when one is pending) for the block that sends it;
        a send that fails releases the claim, else the worker does when the job ends."""
        if not self.registry.claim_job(job, key):
            raise EvaluationPending(pending)
        try:
            yield
        except BaseException:
            self.registry.release_job(job, key)
            raise

    def submit_lr_find(self, config: TrainConfig) -> str:
        """Queue a learning-rate range test for `config` (one pending per dataset folder); returns its job id,
        which is also its task's id and names its result files (`shared.training.lr_result.result_paths`)."""
        self._require_redis()
        job = new_job_id()
        with self._claimed("lr-find", config.data_dir, f"a learning-rate range test on {config.data_dir} is already "
                                                       "queued or running — wait for its result"):
            self.registry.r.set(f"{PREFIX}:lr-find-job:{job}", config.data_dir, ex=LR_FIND_KEEP_S)
            self.celery.send_task(LR_FIND_TASK, args=[job, config.to_dict()], task_id=job)
        return job

    def lr_find_task(self, job: str):
        """The Celery result of a range test this page sent; None for any other id (never sent, or forgotten)."""
        try:
            if not self.registry.r.exists(f"{PREFIX}:lr-find-job:{job}"):
                return None
        except redis.RedisError as exc:
            raise QueueUnavailable(f"cannot reach Redis at {redact_url(self.settings.redis_url)}: {exc}") from exc
        return self.celery.AsyncResult(job)

    def list_runs(self, limit: int = 500) -> list[dict]:
        """Registry records (newest first) with `progress`; raises QueueUnavailable when Redis is down."""
        try:
            return self.registry.list(limit)
        except redis.RedisError as exc:
            raise QueueUnavailable(f"cannot reach Redis at {redact_url(self.settings.redis_url)}: {exc}") from exc

    def run(self, run_id: str) -> dict:
        record = self.registry.get(run_id)
        if record is None:
            raise RunNotFound(f"run {run_id!r} is not in the registry")
        record["progress"] = self.registry.progress(run_id)
        return record

    def cancel(self, run_id: str) -> dict:
        """Queued: marked cancelled now and skipped by the worker. Running: the engine stops within one batch."""
        self._require_redis()
        self.registry.request_cancel(run_id)
        try:
            return transition(self.store, self.registry, run_id, "cancelled", expected=("queued",),
                              error="cancelled before it started")
        except TransitionRefused:  # running (or finished): the flag above is what stops it
            return self.registry.update(run_id, cancel_requested=True)

    def delete(self, run_id: str) -> None:
        """Remove a finished or queued run with its files (a running run must be cancelled first)."""
        self.store.delete(run_id)
        self.registry.delete(run_id)
        self.registry.request_cancel(run_id)  # a still-queued task for it must not resurrect it

    def resync(self) -> int:
        """After Redis lost its data (restarted without persistence), rebuild records from the run folders."""
        return self.registry.sync_from_store(self.store)
