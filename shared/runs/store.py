"""The run store: one folder per run under the models directory, with its status in `status.json`.

The folder is the durable truth (it survives Redis); `shared.runs.registry` mirrors the same records in Redis
for cheap polling across machines.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import secrets
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator

from shared.runs.annotations import ANNOTATIONS_FILE, Annotations, check_note, parse_tags, read_annotations, \
    write_annotations
from shared.training.config import TrainConfig
from shared.fsutil import TRASH_PREFIX, remove_stale_temps, remove_tree, write_json_atomic

log = logging.getLogger(__name__)

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
# not a state a run moves to: what `RunStore.list` reports for a folder whose status.json cannot be read
DAMAGED = "damaged"
# what `fit` adds to config.json next to the TrainConfig fields (not config, so not read back as config)
FIT_RECORD_KEYS = ("env", "split_hash", "classes", "plan", "overrides_sha256")

__all__ = ["DAMAGED", "FINISHED", "STATUSES", "BestChoice", "RunDamaged", "RunNotFound", "RunStore", "read_metrics",
           "read_run_file", "write_json_atomic"]


class RunNotFound(LookupError):
    pass


class RunDamaged(RunNotFound):
    """A run folder whose status.json or config.json is empty or not what we wrote (a power loss during a write
    by an older version, a hand edit). The message names the file, the folder and the fix."""


def read_run_file(run_dir: Path, name: str) -> dict:
    """A run's JSON record file as a dict: RunNotFound when it is missing, RunDamaged when it cannot be read,
    is not JSON or not a JSON object."""
    path = Path(run_dir) / name
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise RunNotFound(f"run {Path(run_dir).name!r} not found in {Path(run_dir).parent}") from None
    except ValueError:  # JSONDecodeError, or bytes that are not UTF-8
        raise RunDamaged(damaged_message(run_dir, name, "is empty or not JSON")) from None
    except OSError as exc:
        raise RunDamaged(damaged_message(run_dir, name, f"cannot be read ({exc.strerror})")) from None
    if not isinstance(data, dict):
        raise RunDamaged(damaged_message(run_dir, name, f"holds a JSON {type(data).__name__}, not an object"))
    return data


def damaged_message(run_dir: Path, name: str, problem: str) -> str:
    return f"{name} {problem} — delete the folder {run_dir} or restore its {name}"


def new_run_id(model: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{model}-{secrets.token_hex(3)}"


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-epoch records from metrics.jsonl. Lines that are not an epoch record (a torn last line from a crash,
    garbage) are skipped and logged: the curves show the epochs that are readable."""
    records = []
    path = Path(run_dir) / "metrics.jsonl"
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return records
    bad = 0
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:  # not JSON, or not UTF-8
            record = None
        if isinstance(record, dict) and isinstance(record.get("epoch"), int):
            records.append(record)
        elif line.strip():
            bad += 1
    if bad:
        log.debug("%s: skipped %d line(s) that are not epoch records", path, bad)
    return records


class RunStore:
    def __init__(self, models_dir: Path):
        self.root = Path(models_dir)

    def path(self, run_id: str) -> Path:
        # run ids come from the page and the CLI: refuse anything that could leave the models folder
        if not run_id or "/" in run_id or "\\" in run_id or run_id.startswith(".") or run_id != Path(run_id).name:
            raise RunNotFound(f"invalid run id {run_id!r}")
        return self.root / run_id

    def exists(self, run_id: str) -> bool:
        try:
            return (self.path(run_id) / "status.json").is_file()
        except RunNotFound:
            return False

    def create(self, config: TrainConfig) -> str:
        """A new QUEUED run folder holding its config; returns the run id."""
        self.root.mkdir(parents=True, exist_ok=True)
        while True:
            run_id = new_run_id(config.model)
            try:
                self.path(run_id).mkdir()
                break
            except FileExistsError:
                continue
        run_dir = self.path(run_id)
        write_json_atomic(run_dir / "config.json", config.to_dict())
        write_json_atomic(run_dir / "status.json", {
            "run_id": run_id, "status": "queued", "created": time.time(),
            "started": None, "finished": None, "error": None, "worker": None, "best": None,
        })
        return run_id

    def config_record(self, run_id: str) -> dict:
        """config.json as written (TrainConfig fields plus what `fit` adds); RunNotFound / RunDamaged."""
        return read_run_file(self.path(run_id), "config.json")

    def display_config(self, run_id: str) -> dict:
        """config.json for lists: {} when it is missing or damaged (said once in the log), so one bad file hides
        no run; training, cloning and evaluating read `config` and get the error."""
        try:
            return self.config_record(run_id)
        except RunNotFound as exc:
            _warn_once(f"run {run_id}: {exc}")
            return {}

    def config(self, run_id: str) -> TrainConfig:
        data = self.config_record(run_id)
        return TrainConfig.from_dict({k: v for k, v in data.items() if k not in FIT_RECORD_KEYS})

    def status(self, run_id: str) -> dict:
        """status.json; RunNotFound when the run is gone, RunDamaged when its status.json cannot be read."""
        run_dir = self.path(run_id)
        data = read_run_file(run_dir, "status.json")
        if data.get("status") not in STATUSES:
            raise RunDamaged(damaged_message(run_dir, "status.json", f"holds no valid status "
                                             f"(expected one of {', '.join(STATUSES)}, got {data.get('status')!r})"))
        data["run_id"] = run_id  # the folder is the run's identity (a copied folder keeps its old id inside)
        return data

    def damaged_record(self, run_id: str, error: str) -> dict:
        """What lists show for a run whose status.json cannot be read: status DAMAGED, the fix in `error`."""
        try:
            created = self.path(run_id).stat().st_mtime
        except OSError:
            created = None
        return {"run_id": run_id, "status": DAMAGED, "error": error, "created": created, "started": None,
                "finished": None, "worker": None, "best": None}

    @contextmanager
    def locked(self, run_id: str) -> Iterator[None]:
        """Hold the run folder's lock (an flock on the folder, dropped if the holder dies): status changes read,
        check and write under it (`shared.runs.lifecycle`). RunNotFound when the folder is gone."""
        try:
            fd = os.open(self.path(run_id), os.O_RDONLY | os.O_DIRECTORY)
        except (FileNotFoundError, NotADirectoryError):
            raise RunNotFound(f"run {run_id!r} not found in {self.root}") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # a filesystem without locks: the status is still written atomically
                _warn_once(f"cannot lock run folders in {self.root} ({exc.strerror}); status changes go unlocked")
            yield
        finally:
            os.close(fd)  # closing drops the flock

    def set_status(self, run_id: str, status: str, **fields: Any) -> dict:
        """Write status.json (the folder's half of a status change: use `shared.runs.lifecycle.transition`,
        which checks the change and updates the registry too)."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        data = self.status(run_id)
        data.update(fields, status=status)
        if status == "running" and not data.get("started"):
            data["started"] = time.time()
            data["worker"] = data.get("worker") or socket.gethostname()
        if status in FINISHED:
            data["finished"] = time.time()
        run_dir = self.path(run_id)
        try:
            write_json_atomic(run_dir / "status.json", data)
        except FileNotFoundError:
            if run_dir.is_dir():
                raise
            # deleted between the read and the write: never recreate it
            raise RunNotFound(f"run {run_id!r} was deleted from {self.root}") from None
        return data

    def ids(self) -> list[str]:
        """Run ids, newest first (a dot folder is never a run: `.redis`, a delete in progress)."""
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir()
                       if not p.name.startswith(".") and (p / "status.json").is_file()), reverse=True)

    def list(self) -> Iterator[dict]:
        """Every run's status, newest first. A run whose status.json cannot be read is listed as DAMAGED (its
        `error` names the folder and the fix) instead of stopping the listing."""
        for run_id in self.ids():
            try:
                yield self.status(run_id)
            except RunDamaged as exc:
                _warn_once(f"run {run_id}: {exc}")
                yield self.damaged_record(run_id, str(exc))
            except RunNotFound:  # deleted since ids() looked
                continue

    def latest_succeeded(self) -> str | None:
        """The newest run that finished successfully with a best checkpoint (what 'latest' means)."""
        best: tuple[float, str] | None = None
        for status in self.list():
            run_id = status["run_id"]
            if status.get("status") == "succeeded" and (self.root / run_id / "best.pt").is_file():
                key = (status.get("finished") or 0.0, run_id)
                if best is None or key > best:
                    best = key
        return best[1] if best else None

    def best_succeeded(self) -> "BestChoice | None":
        """What 'best finished run' means: among the succeeded runs with a best checkpoint trained on the same
        dataset folder and the same class list as the latest one, the highest best validation accuracy (the newer
        run on a tie). Runs on other data are not comparable (another validation set), so they never compete."""
        latest = self.latest_succeeded()
        if latest is None:
            return None
        def key_of(run_id: str) -> tuple:
            config = self.display_config(run_id)
            return config.get("data_dir"), tuple(config.get("classes") or ())
        same = key_of(latest)
        pool: list[tuple[float, float, str]] = []
        for status in self.list():
            run_id = status["run_id"]
            if status.get("status") != "succeeded" or not (self.root / run_id / "best.pt").is_file():
                continue
            if key_of(run_id) != same:
                continue
            acc = (status.get("best") or {}).get("best_val_acc")
            acc = float(acc) if isinstance(acc, (int, float)) else float("-inf")
            pool.append((acc, status.get("finished") or 0.0, run_id))
        acc, _, run_id = max(pool)
        return BestChoice(run_id=run_id, val_acc=None if acc == float("-inf") else acc, pool=len(pool),
                          data_dir=same[0], latest=latest)

    # --- tags, note, baseline (shared/runs/annotations.py) ---

    def annotations(self, run_id: str) -> Annotations:
        return read_annotations(self.path(run_id))

    def annotate(self, run_id: str, *, tags=None, note=None) -> Annotations:
        """Set a run's tags and/or note (checked: AnnotationError names the problem); RunNotFound when gone."""
        with self.locked(run_id):
            current = self.annotations(run_id)
            updated = Annotations(tags=current.tags if tags is None else parse_tags(tags),
                                  note=current.note if note is None else check_note(note), baseline=current.baseline)
            write_annotations(self.path(run_id), updated)
        return updated

    def baseline(self) -> str | None:
        """The run pinned as the baseline (the newest one, should two folders say so after a copy)."""
        for run_id in self.ids():
            if (self.root / run_id / ANNOTATIONS_FILE).is_file() and self.annotations(run_id).baseline:
                return run_id
        return None

    def set_baseline(self, run_id: str | None) -> None:
        """Pin `run_id` as the one baseline (None: no baseline); the previous one is unpinned."""
        if run_id is not None and not self.exists(run_id):
            raise RunNotFound(f"run {run_id!r} not found in {self.root}")
        for other in self.ids():
            if other != run_id and (self.root / other / ANNOTATIONS_FILE).is_file():
                with self.locked(other):
                    current = self.annotations(other)
                    if current.baseline:
                        write_annotations(self.path(other), Annotations(current.tags, current.note, False))
        if run_id is not None:
            with self.locked(run_id):
                current = self.annotations(run_id)
                write_annotations(self.path(run_id), Annotations(current.tags, current.note, True))

    def delete(self, run_id: str) -> None:
        """Remove a run folder that is not running (a DAMAGED one too: deleting it is the advertised fix).

        Checked and renamed under the folder's lock: a worker starting the run at the same moment either makes it
        running first (then this refuses) or finds the folder gone."""
        trash = self.root / f"{TRASH_PREFIX}{run_id}-{secrets.token_hex(3)}"
        with self.locked(run_id):
            try:
                status = self.status(run_id)["status"]
            except RunDamaged:
                status = DAMAGED
            if status == "running":
                raise ValueError(f"run {run_id} is running: cancel it before deleting")
            # renamed away first, in one step: a worker writing into the run from now on finds it gone instead of
            # recreating files in a half-removed folder; a crash mid-removal leaves a dot folder `remove_leftovers`
            # clears
            try:
                os.rename(self.path(run_id), trash)
            except FileNotFoundError:
                raise RunNotFound(f"run {run_id!r} not found in {self.root}") from None
        remove_tree(trash)

    def metrics(self, run_id: str) -> list[dict]:
        return read_metrics(self.path(run_id))

    def remove_leftovers(self) -> list[Path]:
        """Remove what crashed writers and deletes left in the models folder (see `shared.fsutil`); the page
        and each worker call this when they start."""
        if not self.root.is_dir():
            return []
        folders = [self.root]
        for entry in self.root.iterdir():
            if entry.is_dir() and not entry.name.startswith("."):
                folders += _run_folders(entry)
        return remove_stale_temps(folders)

    def remove_run_leftovers(self, run_id: str, max_age: float) -> list[Path]:
        """Remove the temp files a dead writer left in one run's folders, any host's, older than `max_age` s.

        The worker that takes over a run calls this under the run's lease with half the lease's TTL: the last holder
        renewed its lease every TTL/3 until it died, so it stopped writing at least 2/3 TTL before the lease came
        free, while a write the page is making right now is younger."""
        return remove_stale_temps(_run_folders(self.path(run_id)), max_age=max_age)


def _run_folders(run_dir: Path) -> list[Path]:
    """A run folder and its evaluation folders (eval/, eval-val/, eval-folder-<name>/)."""
    return [run_dir, *(d for d in run_dir.glob("eval*") if d.is_dir())]


@dataclass(frozen=True)
class BestChoice:
    """`RunStore.best_succeeded`'s answer, with what the page says about why."""
    run_id: str
    val_acc: float | None
    pool: int  # succeeded runs on the same dataset and classes that competed
    data_dir: str | None
    latest: str  # the latest succeeded run, whose dataset and classes define the pool


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    # the page lists the runs every 2 s: say it once per process, the Runs table keeps showing it
    if message not in _warned:
        _warned.add(message)
        log.warning("%s", message)
