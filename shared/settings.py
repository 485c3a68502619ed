"""Settings from the environment: `RESNET_LAB_*` variables plus the conventional `REDIS_URL`.

Nothing is read at import time; call `Settings.from_env()` where settings are needed.
CLI flags override these by passing keyword overrides.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Mapping

ENV_PREFIX = "RESNET_LAB_"


def _split_paths(value: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip())


@dataclass(frozen=True)
class Settings:
    # where run folders (checkpoints, metrics, figures) live
    models_dir: Path = Path("models").resolve()
    # folders the page may read datasets from (and extract uploads into: the first one)
    data_roots: tuple[Path, ...] = field(default_factory=lambda: (Path("data").resolve(),))
    # decoded-image cache (memory-mapped uint8 arrays); default: <models_dir>/.cache
    cache_dir: Path | None = None
    # most the decoded-image cache may hold, in GB; least recently used arrays are deleted first; 0: no cap
    cache_max_gb: float = 20.0
    # broker + result backend + run registry; None means "start an embedded one" for `up`
    redis_url: str | None = None
    # page bind address and port; binding beyond loopback requires `auth`
    host: str = "127.0.0.1"
    port: int = 7860
    # "user:password" for the page; required when host is not loopback
    auth: str | None = None
    # host names the page answers besides loopback ("lab.example.com", "*.example.com"); needs `auth`
    allowed_hosts: tuple[str, ...] = ()
    # seconds a task may stay un-acknowledged before Redis redelivers it: longer than the longest run
    visibility_timeout: int = 7 * 24 * 3600
    # largest upload the page accepts, in megabytes
    max_upload_mb: int = 200
    # most the upload folder (the first data root) may hold after a .zip is extracted into it, in GB
    uploads_max_gb: float = 20.0
    # torch threads for a CPU worker; 0 means one per core
    worker_threads: int = 0
    # state-dict files the page's API may name as `weights` (besides the data roots); default <models_dir>/weights,
    # which every machine sees (workers load the file from the same path)
    weights_dir: Path | None = None
    # queued + running runs the page accepts at most; a submission that would pass it is refused
    max_queued_runs: int = 200
    # figures an evaluation draws: "all", "basic" (no t-SNE, Grad-CAM, image galleries) or "none" (eval.json only)
    eval_figures: str = "all"
    # "module:function" callables that register extra models (shared.training.models.register_model), called
    # by the page, the worker and the CLI at start; e.g. the test suite's tiny ResNet. Comma-separated in the env.
    model_plugins: tuple[str, ...] = ()

    def __post_init__(self):
        from shared.analysis.eval_result import FIGURE_LEVELS

        if self.eval_figures not in FIGURE_LEVELS:
            raise ValueError(f"{ENV_PREFIX}EVAL_FIGURES must be one of {', '.join(FIGURE_LEVELS)}, "
                             f"got {self.eval_figures!r}")

    @property
    def cache_path(self) -> Path:
        return self.cache_dir or (self.models_dir / ".cache")

    @property
    def weights_path(self) -> Path:
        return self.weights_dir or (self.models_dir / "weights")

    @property
    def upload_root(self) -> Path:
        return self.data_roots[0]

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides) -> "Settings":
        """Build settings from environment variables; keyword overrides (CLI flags) win."""
        env = os.environ if env is None else env
        values: dict = {}

        def get(name: str) -> str | None:
            value = env.get(ENV_PREFIX + name)
            return value if value not in (None, "") else None

        if (v := get("MODELS_DIR")) is not None:
            values["models_dir"] = Path(v).expanduser().resolve()
        if (v := get("DATA_ROOTS")) is not None:
            values["data_roots"] = _split_paths(v)
        if (v := get("CACHE_DIR")) is not None:
            values["cache_dir"] = Path(v).expanduser().resolve()
        if (v := get("WEIGHTS_DIR")) is not None:
            values["weights_dir"] = Path(v).expanduser().resolve()
        if env.get("REDIS_URL"):
            values["redis_url"] = env["REDIS_URL"]
        if (v := get("HOST")) is not None:
            values["host"] = v
        if (v := get("AUTH")) is not None:
            values["auth"] = v
        if (v := get("ALLOWED_HOSTS")) is not None:
            values["allowed_hosts"] = tuple(h.strip().lower() for h in v.split(",") if h.strip())
        if (v := get("MODEL_PLUGINS")) is not None:
            values["model_plugins"] = tuple(p.strip() for p in v.split(",") if p.strip())
        if (v := get("EVAL_FIGURES")) is not None:
            values["eval_figures"] = v
        for name, key in (("PORT", "port"), ("VISIBILITY_TIMEOUT", "visibility_timeout"),
                          ("MAX_UPLOAD_MB", "max_upload_mb"), ("WORKER_THREADS", "worker_threads"),
                          ("MAX_QUEUED_RUNS", "max_queued_runs")):
            if (v := get(name)) is not None:
                try:
                    values[key] = int(v)
                except ValueError:
                    raise ValueError(f"{ENV_PREFIX}{name} must be an integer, got {v!r}") from None
        for name, key in (("CACHE_MAX_GB", "cache_max_gb"), ("UPLOADS_MAX_GB", "uploads_max_gb")):
            if (v := get(name)) is not None:
                values[key] = _gigabytes(name, v)
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("models_dir", "cache_dir", "weights_dir"):
            if isinstance(values.get(key), str):
                values[key] = Path(values[key]).expanduser().resolve()
        if isinstance(values.get("data_roots"), (str, Path)):
            values["data_roots"] = _split_paths(str(values["data_roots"]))
        return cls(**values)

    def with_overrides(self, **overrides) -> "Settings":
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def auth_pair(self) -> tuple[str, str] | None:
        """`auth` as (user, password); raises with the expected form when malformed."""
        if not self.auth:
            return None
        user, sep, password = self.auth.partition(":")
        if not sep or not user or not password:
            raise ValueError(f"{ENV_PREFIX}AUTH must look like 'user:password', got {self.auth!r}")
        return user, password


def _gigabytes(name: str, value: str) -> float:
    try:
        gb = float(value)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb >= 0):
        raise ValueError(f"{ENV_PREFIX}{name} must be a number of gigabytes >= 0 (e.g. 20 or 0.5), got {value!r}")
    return gb


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
