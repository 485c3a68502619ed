"""The tasks: thin, like torchvision's `run_with_submitit.py` — take ids, load state, call `shared`, report, set
the final status.

`train(run_id)` runs `shared.training.engine.fit` (which resumes from `last.pt` by itself) and then the evaluation suite.
Every status change is written to the run folder and the registry together (`transition`), so the two agree.
A failing run ends FAILED with a readable reason and the task raises `RunFailed` (Celery marks it FAILURE; no
retry, the worker takes the next run). Duplicate deliveries skip: see `worker/recovery.py`.
"""

from __future__ import annotations

import errno
import gc
import logging
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import torch
from celery import shared_task

from shared.data.cache import CacheFullError
from shared.training.checkpoint import CheckpointError
from shared.training.config import SPLITS, ConfigError, TrainConfig
from shared.data.scan import DatasetError
from shared.training.engine import Cancelled, fit, pick_device
from shared.data.images import TooManyFiles, expand_image_paths
from shared.training.models import WeightsUnavailable, confine_weights
from shared.data.paths import PathError, confine_dataset_path, confine_path, is_within, roots_text
from shared.runs.lifecycle import TransitionRefused, fail_in_registry_only, transition
from shared.runs.registry import RunRegistry
from shared.runs.store import FINISHED, RunDamaged, RunNotFound, RunStore
from shared.settings import Settings
from shared.tasks import DATA_ISSUES_TASK, EVALUATE_TASK, LR_FIND_TASK, PREDICT_BATCH_TASK, TRAIN_TASK

from .celery_app import settings_of
from .progress import TaskReporter
from .recovery import MAX_CRASHES, Lease, resend_train, settle_unrunnable, shutdown_requested

log = logging.getLogger(__name__)

# errors whose message already says what to do: shown as they are, without the exception's class name
USER_ERRORS = (DatasetError, ConfigError, WeightsUnavailable, CheckpointError, FloatingPointError, PathError,
               RunDamaged, CacheFullError, TooManyFiles)

# the CSV row of a file found in a folder of the data roots that links out of them (it is not read)
OUTSIDE_ROOTS = "not inside the data folders (a link out of them?) — not read"
# the most files one predict_batch classifies: its folder comes from the page, and its rows are kept in memory
MAX_BATCH_FILES = 200_000
# evaluation results copied into the run's `best` record (the full results stay in eval/eval.json)
EVAL_SUMMARY = ("accuracy", "top_k_accuracy", "macro_f1", "loss", "n")


class RunFailed(RuntimeError):
    """A run ended FAILED; the message is the reason stored with the run."""


@lru_cache(maxsize=4)
def _services(settings: Settings) -> tuple[RunStore, RunRegistry]:
    return RunStore(settings.models_dir), RunRegistry.from_url(settings.redis_url, timeout=10.0)


def failure_reason(exc: BaseException, config=None) -> str:
    """One readable line saying what went wrong and, where we know it, what to do."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        size = getattr(config, "batch_size", "?")
        return f"out of GPU memory at batch size {size}: lower the batch size (or the image size)"
    if isinstance(exc, USER_ERRORS):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        where = Path(exc.filename).parent if exc.filename else "the models folder"
        return (f"cannot write to {where}: {exc.strerror} — make the models folder writable and free some disk "
                "space, then queue the run again")
    return f"{type(exc).__name__}: {exc}"


def free_gpu_memory() -> None:
    gc.collect()
    if torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def _skip_reason(store: RunStore, registry: RunRegistry, run_id: str) -> str | None:
    """Why this delivery must not train the run (None: go ahead). Marks a cancelled, unfinished run CANCELLED."""
    unrunnable = settle_unrunnable(store, registry, run_id)
    if unrunnable:
        return unrunnable
    status = store.status(run_id)["status"]
    if status in FINISHED:
        return f"it is already {status}"
    if registry.cancel_requested(run_id):
        transition(store, registry, run_id, "cancelled", error="cancelled before it started")
        return "it was cancelled before it started"
    crashes = int((registry.get(run_id) or {}).get("crashes") or 0)
    if crashes >= MAX_CRASHES:
        transition(store, registry, run_id, "failed",
                   error=f"its worker process died {crashes} times while training it (killed for lack of memory? "
                         "see the worker's log and `dmesg`): lower the batch size or image size and run it again")
        return f"its worker died {crashes} times"
    return None


@shared_task(bind=True, name=TRAIN_TASK)
def train(self, run_id: str) -> dict:
    """Train a queued (or interrupted) run to the end; returns {run_id, status, best, eval}."""
    store, registry = _services(settings_of(self.app))
    skip = _skip_reason(store, registry, run_id)
    if skip is None:
        lease = Lease(registry.r, run_id, owner=self.request.hostname or "worker")
        if not lease.acquire():
            skip = f"another worker holds it ({lease.holder()})"
        else:
            try:
                # re-read under the lease: a duplicate delivery may arrive just after the run finished
                skip = _skip_reason(store, registry, run_id)
                if skip is None:
                    return _train(self, store, registry, run_id, lease)
            except RunNotFound:
                # a status change found the folder gone (deleted from the page while this worker started the run)
                # or damaged: end here, recreating nothing; the registry record the start may have written goes
                skip = settle_unrunnable(store, registry, run_id)
                if skip is None:
                    raise
            finally:
                lease.release()
    log.info("skipping run %s: %s", run_id, skip)
    return {"run_id": run_id, "status": "skipped", "reason": skip}


def _train(task, store: RunStore, registry: RunRegistry, run_id: str, lease: Lease) -> dict:
    settings = settings_of(task.app)
    run_dir = store.path(run_id)
    record = registry.get(run_id) or {}
    reporter = TaskReporter(task, run_id, registry, lease, run_dir=run_dir)
    config, outcome, reason = None, None, None
    try:
        # a worker that died mid-write (perhaps on another machine) left temp files here: this one owns the run now
        store.remove_run_leftovers(run_id, max_age=lease.ttl / 2)
        config = store.config(run_id)
        # queued, or running when its worker died; cancelled (from the page) since the checks above: not ours
        transition(store, registry, run_id, "running", expected=("queued", "running"),
                   worker=task.request.hostname, task_id=task.request.id,
                   attempt=int(record.get("attempt") or 0) + 1, error=None)
        best = fit(config, run_dir, reporter, cache_dir=settings.cache_path, cache_max_gb=settings.cache_max_gb,
                   data_roots=settings.data_roots)
        reporter.phase("evaluating")
        split = _eval_split(config)
        device = str(pick_device(config.device))
        outcome = {"best": best, "split": split,
                   "eval": _evaluate(run_dir, split, None, device, reporter.evaluation_progress,
                                     settings.eval_figures, settings.data_roots)}
    except Cancelled:
        outcome = "cancelled"
    except TransitionRefused as exc:
        return {"run_id": run_id, "status": "skipped", "reason": str(exc)}
    except Exception as exc:
        log.exception("run %s failed", run_id)
        reason = failure_reason(exc, config)
    # out of the except blocks: the traceback (and the tensors its frames hold) is gone, so memory can go too
    free_gpu_memory()

    if lease.lost:
        log.warning("run %s: another worker took it over; leaving its status alone", run_id)
        return {"run_id": run_id, "status": "lost"}
    # below, the final progress goes out before the final status: whoever sees the status finds the progress
    if reason is not None:
        reporter.finish("failed", error=reason)
        try:
            transition(store, registry, run_id, "failed", error=reason)
        except OSError as exc:
            # the run folder itself cannot be written (read-only, disk full): the registry still tells the page,
            # and a run left 'queued' there would be re-sent by the recovery scan forever
            log.error("run %s: cannot write its failure into %s: %s", run_id, run_dir, exc)
            fail_in_registry_only(registry, run_id, reason)
        raise RunFailed(reason)
    if outcome == "cancelled":
        return _stopped(task, store, registry, run_id, reporter)
    best = {**outcome["best"], "eval_split": outcome["split"],
            **{f"eval_{k}": outcome["eval"][k] for k in EVAL_SUMMARY if k in outcome["eval"]}}
    reporter.finish("succeeded")
    transition(store, registry, run_id, "succeeded", best=best, error=None)
    return {"run_id": run_id, "status": "succeeded", "best": best, "eval": outcome["eval"]}


def _stopped(task, store: RunStore, registry: RunRegistry, run_id: str, reporter: TaskReporter) -> dict:
    """The engine stopped at a batch boundary: a user cancel, or this worker is shutting down."""
    epochs = len(reporter.state["history"])
    if reporter.cancel_requested or not shutdown_requested.is_set():
        reporter.finish("cancelled")
        transition(store, registry, run_id, "cancelled",
                   error=f"cancelled while running, after {epochs} finished epoch(s) (their checkpoint is kept)")
        return {"run_id": run_id, "status": "cancelled", "epochs": epochs}
    # worker shutdown: back to the queue; whichever worker takes it next resumes from last.pt
    reporter.finish("queued", reason="its worker shut down; it resumes from its last finished epoch")
    transition(store, registry, run_id, "queued", error=None)
    resend_train(task.app, registry, run_id, "its worker shut down mid-run")
    return {"run_id": run_id, "status": "queued", "epochs": epochs}


def _eval_split(config) -> str:
    return "test" if config.test_ratio > 0 else "val"


def _evaluate(run_dir: Path, split: str, data_dir: str | None, device: str,
              progress: Callable[[int, int], None], figures: str, data_roots: tuple[Path, ...]) -> dict:
    """`evaluate_run`'s headline numbers (eval.json in the run folder has the tables, curves and figures)."""
    from shared.analysis.evaluation import evaluate_run  # imported late: the suite pulls in matplotlib and sklearn

    result = evaluate_run(run_dir, split=split, data_dir=data_dir, device=device, progress=progress,
                          figures=figures, data_roots=data_roots)
    summary = {k: v for k, v in result.items() if isinstance(v, (str, int, float, bool)) or v is None}
    if isinstance(result.get("macro"), dict):
        summary["macro_f1"] = result["macro"].get("f1")
    return summary


@shared_task(bind=True, name=EVALUATE_TASK)
def evaluate(self, run_id: str, split: str = "test", data_dir: str | None = None) -> dict:
    """Re-evaluate a finished run's best checkpoint on one of its splits, or on another folder.

    The arguments come from Redis, where anyone with its password can write: `split` must be a split name and
    `data_dir` a folder inside this worker's own data roots (RESNET_LAB_DATA_ROOTS), checked before any work.
    """
    settings = settings_of(self.app)
    try:
        return _evaluate_task(self, settings, run_id, split, data_dir)
    finally:
        _services(settings)[1].release_job("evaluating", str(run_id))  # the page may queue the next one


def _evaluate_task(self, settings: Settings, run_id: str, split: str, data_dir: str | None) -> dict:
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}; got {str(split)[:40]!r}")
    if data_dir is not None:
        data_dir = str(confine_dataset_path(data_dir, settings.data_roots))
    store, _ = _services(settings)
    run_dir = store.path(run_id)
    if not (run_dir / "best.pt").is_file():
        raise RunNotFound(f"run {run_id!r} has no best.pt in {store.root}: train it first")

    def progress(done: int, total: int) -> None:
        # this task's own state only: the run's registry progress keeps describing its training
        self.update_state(state="PROGRESS", meta={"run_id": run_id, "phase": "evaluating", "split": split,
                                                  "done": done, "total": total})

    try:
        result = _evaluate(run_dir, split, data_dir, str(pick_device("auto")), progress, settings.eval_figures,
                           settings.data_roots)
    finally:
        free_gpu_memory()
    return {"run_id": run_id, "split": split, "data_dir": data_dir, **result}


@shared_task(bind=True, name=PREDICT_BATCH_TASK)
def predict_batch(self, run_id: str, sources: list[str], top_k: int = 5, chunk: int = 256,
                  with_results: bool = False) -> dict:
    """Classify many images with a run's best model; writes `predictions-<timestamp>.csv` into the run and returns
    its path with the model's name and classes, and every row too when `with_results` (`resnet-lab predict --queue`).

    Every source must lie inside this worker's data roots (checked before any folder is listed), and files
    found in those folders that link out of the roots get an error row instead of being read: the CSV lands in
    the run folder, which the page serves.
    """
    from shared.analysis.predict import Predictor, write_predictions_csv

    settings = settings_of(self.app)
    top_k, chunk = _bounded("top_k", top_k, 1, 100), _bounded("chunk", chunk, 1, 4096)
    if not isinstance(with_results, bool):
        raise ConfigError(f"with_results must be true or false; got {str(with_results)[:40]!r}")
    roots = settings.data_roots
    if not isinstance(sources, list) or not sources:
        raise PathError(f"sources must be a non-empty list of image files or folders inside {roots_text(roots)}")
    confined = [_confine_source(source, roots) for source in sources]
    store, _ = _services(settings)
    run_dir = store.path(run_id)
    # a missing path gets an error row in the CSV (as unreadable files do): one bad entry does not cost the batch
    files = [str(p) for p in expand_image_paths(confined, must_exist=False, limit=MAX_BATCH_FILES)]
    if not files:
        raise ValueError(f"no image files in {sources}: give image files or folders that hold some")
    outside = {f for f in files if not _inside(f, roots)}
    device = "cuda" if pick_device("auto").type == "cuda" else "cpu"
    try:
        predictor = Predictor(run_dir, device=device)
        results: list[dict] = []
        for start in range(0, len(files), chunk):
            part = files[start:start + chunk]
            readable = [f for f in part if f not in outside]
            answers = iter(predictor.predict_many(readable, top_k=top_k)) if readable else iter(())
            results += [{"source": f, "error": OUTSIDE_ROOTS, "top": []} if f in outside else next(answers)
                        for f in part]
            self.update_state(state="PROGRESS", meta={"run_id": run_id, "phase": "predicting",
                                                      "done": len(results), "total": len(files)})
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S-%f")[:-3]
        path = write_predictions_csv(results, run_dir / f"predictions-{stamp}.csv", top_k=top_k)
    finally:
        free_gpu_memory()
    errors = sum(1 for r in results if r["error"])
    answer = {"run_id": run_id, "path": str(path), "count": len(results), "errors": errors,
              "model": predictor.meta["model_name"], "classes": list(predictor.classes)}
    return {**answer, "results": results} if with_results else answer


@shared_task(bind=True, name=DATA_ISSUES_TASK)
def data_issues(self, run_id: str, data_dir: str | None = None) -> dict:
    """Find a dataset's likely label errors, near-duplicates and outliers with a finished run's best checkpoint;
    the report goes to `<run>/data_issues.json` (the page reads it from there). Returns the counts.

    `data_dir` (from Redis: hostile) must be a folder inside this worker's data roots; None means the run's own
    dataset, which must lie inside them too.
    """
    settings = settings_of(self.app)
    try:
        return _data_issues_task(self, settings, run_id, data_dir)
    finally:
        _services(settings)[1].release_job("data-issues", str(run_id))  # the page may queue the next one


def _data_issues_task(self, settings: Settings, run_id: str, data_dir: str | None) -> dict:
    from shared.analysis.data_issues import ISSUES_FILE, find_data_issues
    from shared.data.manifest import read_manifest

    store, _ = _services(settings)
    run_dir = store.path(run_id)
    if not (run_dir / "best.pt").is_file():
        raise RunNotFound(f"run {run_id!r} has no best.pt in {store.root}: train it first")
    if data_dir is None:
        data_dir = read_manifest(run_dir / "split.json")["root"]
    folder = confine_dataset_path(data_dir, settings.data_roots)

    def progress(done: int, total: int) -> None:
        self.update_state(state="PROGRESS", meta={"run_id": run_id, "phase": "finding data issues", "done": done,
                                                  "total": total})

    try:
        report = find_data_issues(run_dir, folder, device=str(pick_device("auto")), progress=progress,
                                  data_roots=settings.data_roots)
    finally:
        free_gpu_memory()
    return {"run_id": run_id, "data_dir": str(folder), "n": report["n"], "counts": report["counts"],
            "path": str(run_dir / ISSUES_FILE)}


@shared_task(bind=True, name=LR_FIND_TASK)
def lr_find(self, job: str, config: dict) -> dict:
    """The learning-rate range test for the page's Train form: `config` (TrainConfig fields; its lr is ignored) →
    `<models>/lr-find/<job>.json` and `<job>.png`, which the page reads and serves. Returns the suggestion.

    Both arguments come from Redis (hostile): `job` must be a job id, `config` a valid TrainConfig (a registered
    model, bounded batch and image sizes) whose data folder lies inside this worker's data roots and whose
    weights are a weights name or a file in the weights folder or the data roots — checked before any work.
    """
    settings = settings_of(self.app)
    try:
        return _lr_find_task(self, settings, job, config)
    finally:  # the page may queue the next one on this dataset (it claimed the folder it sent)
        if isinstance(config, dict):
            _services(settings)[1].release_job("lr-find", str(config.get("data_dir"))[:4096])


def _lr_find_task(self, settings: Settings, job: str, config: dict) -> dict:
    from shared.training.lr_find import lr_find as run_range_test
    from shared.training.lr_result import prune_results, result_paths, save_result

    json_path, plot_path = result_paths(settings.models_dir, job)
    if not isinstance(config, dict):
        raise ConfigError(f"config must be a JSON object of training settings; got {type(config).__name__}")
    config = TrainConfig.from_dict(config)
    folder = confine_dataset_path(config.data_dir, settings.data_roots)
    weights = confine_weights(config.weights, [config.model], [settings.weights_path, *settings.data_roots])
    config = config.replace(data_dir=str(folder), weights=weights)

    def progress(done: int, total: int) -> None:
        self.update_state(state="PROGRESS", meta={"job": job, "phase": "range test", "done": done, "total": total})

    self.update_state(state="PROGRESS", meta={"job": job, "phase": "preparing data"})
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    try:
        result = run_range_test(config, settings.cache_path, plot_path=plot_path, data_roots=settings.data_roots,
                                cache_max_gb=settings.cache_max_gb, progress=progress)
    finally:
        free_gpu_memory()
    save_result(result, config, json_path)
    prune_results(json_path.parent)
    return {"job": job, "suggestion": result["suggestion"], "steps": result["steps"], "seconds": result["seconds"]}


def _confine_source(source: Any, roots) -> Path:
    """A source inside the roots, unresolved below them so that a missing file still gets its own error row;
    one outside (after links and `..`) is refused whether or not it exists."""
    if not isinstance(source, str):
        raise PathError(f"sources must be paths as text; got {type(source).__name__}")
    try:
        return confine_path(source, roots)
    except PathError:
        raw = Path(source).expanduser()
        candidate = raw if raw.is_absolute() else Path(roots[0]) / raw
        if source.strip() and _inside(str(candidate), roots):
            return candidate  # inside the roots but missing: predict_many reports it in its row
        raise


def _inside(path: str, roots) -> bool:
    try:
        resolved = Path(path).resolve(strict=False)
    except (OSError, RuntimeError, ValueError):  # a link loop, a NUL byte: not a path inside the roots
        return False
    return any(is_within(resolved, Path(root).resolve()) for root in roots)


def _bounded(name: str, value: Any, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(f"{name} must be a whole number between {low} and {high}; got {str(value)[:40]!r}")
    return value
