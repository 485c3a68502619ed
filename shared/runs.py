"""The run store: one folder per run under the models directory, with its status in `status.json`.

The folder is the durable truth (it survives Redis); `shared.registry` mirrors the same records in Redis
for cheap polling across machines.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

from .config import TrainConfig

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
# what `fit` adds to config.json next to the TrainConfig fields (not config, so not read back as config)
FIT_RECORD_KEYS = ("env", "split_hash", "classes")


class RunNotFound(LookupError):
    pass


def write_json_atomic(path: Path, data: Any) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


def read_json(path: Path, default: Any = None) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return default


def new_run_id(model: str) -> str:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{stamp}-{model}-{secrets.token_hex(3)}"


def read_metrics(run_dir: Path) -> list[dict]:
    """Per-epoch records from metrics.jsonl (a torn last line from a crash is ignored)."""
    records = []
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
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

    def config(self, run_id: str) -> TrainConfig:
        data = read_json(self.path(run_id) / "config.json")
        if data is None:
            raise RunNotFound(f"run {run_id!r} not found in {self.root}")
        return TrainConfig.from_dict({k: v for k, v in data.items() if k not in FIT_RECORD_KEYS})

    def status(self, run_id: str) -> dict:
        data = read_json(self.path(run_id) / "status.json")
        if data is None:
            raise RunNotFound(f"run {run_id!r} not found in {self.root}")
        return data

    def set_status(self, run_id: str, status: str, **fields: Any) -> dict:
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        data = self.status(run_id)
        data.update(fields, status=status)
        if status == "running" and not data.get("started"):
            data["started"] = time.time()
            data["worker"] = data.get("worker") or socket.gethostname()
        if status in FINISHED:
            data["finished"] = time.time()
        write_json_atomic(self.path(run_id) / "status.json", data)
        return data

    def ids(self) -> list[str]:
        """Run ids, newest first."""
        if not self.root.is_dir():
            return []
        return sorted((p.name for p in self.root.iterdir() if (p / "status.json").is_file()), reverse=True)

    def list(self) -> Iterator[dict]:
        for run_id in self.ids():
            status = read_json(self.root / run_id / "status.json")
            if status:
                yield status

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

    def delete(self, run_id: str) -> None:
        status = self.status(run_id)
        if status["status"] == "running":
            raise ValueError(f"run {run_id} is running: cancel it before deleting")
        shutil.rmtree(self.path(run_id))

    def metrics(self, run_id: str) -> list[dict]:
        return read_metrics(self.path(run_id))
