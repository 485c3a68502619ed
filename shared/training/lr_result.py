"""The page's learning-rate range tests on disk: `<models>/lr-find/<job>.json` (one schema: `save_result` writes
it, `load_result` reads it) and its plot `<job>.png`, the newest `KEEP_RESULTS` of them. No torch here: the page's
file guard and queue client import it.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from pathlib import Path

from shared.fsutil import write_json_atomic
from shared.training.config import ConfigError, TrainConfig

# a folder of the models folder (the page's file route serves its plots), one pair of files per job id
LR_FIND_DIR = "lr-find"
JOB_ID = re.compile(r"[0-9a-f]{32}")
KEEP_RESULTS = 20
RESULT_VERSION = 1


def new_job_id() -> str:
    return uuid.uuid4().hex


def result_paths(models_dir: Path, job: str) -> tuple[Path, Path]:
    """(json, png) of range test `job`. The job id comes from the page's API and from Redis: anything but 32 hex
    characters is refused (ConfigError) before a path is built from it."""
    if not isinstance(job, str) or not JOB_ID.fullmatch(job):
        raise ConfigError(f"no range test {str(job)[:40]!r} — press Find learning rate to start one")
    folder = Path(models_dir) / LR_FIND_DIR
    return folder / f"{job}.json", folder / f"{job}.png"


def save_result(result: dict, config: TrainConfig, path: Path) -> dict:
    """`lr_find`'s answer with what it was measured on, written atomically; the record `load_result` reads."""
    record = {"version": RESULT_VERSION, "created": time.time(), "suggestion": result["suggestion"],
              "lrs": result["lrs"], "losses": result["losses"], "steps": result["steps"],
              "steps_per_epoch": result["steps_per_epoch"], "seconds": result["seconds"],
              "data_dir": config.data_dir, "model": config.model, "batch_size": config.batch_size,
              "image_size": config.image_size, "optimizer": config.optimizer}
    write_json_atomic(path, record)
    return record


def load_result(path: Path) -> dict | None:
    """A saved range test; None when there is none, ValueError for a damaged file or another version."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"{Path(path).name} is unreadable ({exc}) — run the range test again") from None
    numbers = ("suggestion", "steps", "seconds")
    if (not isinstance(data, dict) or data.get("version") != RESULT_VERSION
            or not all(isinstance(data.get(k), (int, float)) for k in numbers)
            or not isinstance(data.get("lrs"), list) or not isinstance(data.get("losses"), list)):
        raise ValueError(f"{Path(path).name} is not a version-{RESULT_VERSION} range test — run it again")
    return data


def prune_results(folder: Path, keep: int = KEEP_RESULTS) -> None:
    """Keep the newest `keep` range tests of the page's folder (each a .json and its .png)."""
    def age(path: Path) -> float:
        try:
            return path.stat().st_mtime
        except OSError:  # removed meanwhile by another worker's pruning
            return 0.0

    results = sorted(Path(folder).glob("*.json"), key=age, reverse=True)
    for old in results[keep:]:
        old.unlink(missing_ok=True)
        old.with_suffix(".png").unlink(missing_ok=True)
