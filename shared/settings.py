"""Settings from the environment: `RESNET_LAB_*` variables plus the conventional `REDIS_URL`.

Nothing is read at import time; call `Settings.from_env()` where settings are needed.
CLI flags override these by passing keyword overrides.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

ENV_PREFIX = "RESNET_LAB_"


def _path(name: str, value: str) -> Path:
    return Path(value).expanduser().resolve()


def _split_paths(name: str, value: str) -> tuple[Path, ...]:
    return tuple(Path(p).expanduser().resolve() for p in value.split(os.pathsep) if p.strip())


def _join_paths(paths: tuple[Path, ...]) -> str:
    return os.pathsep.join(str(p) for p in paths)


def _text(name: str, value: str) -> str:
    return value


def _integer(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _gigabytes(name: str, value: str) -> float:
    try:
        gb = float(value)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and gb >= 0):
        raise ValueError(f"{name} must be a number of gigabytes >= 0 (e.g. 20 or 0.5), got {value!r}")
    return gb


def _names(name: str, value: str) -> tuple[str, ...]:
    """A comma-separated list, blanks dropped."""
    return tuple(part.strip() for part in value.split(",") if part.strip())


def _host_names(name: str, value: str) -> tuple[str, ...]:
    return tuple(h.strip().lower() for h in value.split(",") if h.strip())


PREDICT_RUNTIMES = ("onnxruntime", "torch")


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
    redis_url: str | None = field(default=None, repr=False)  # holds the Redis password: never in a repr
    # page bind address and port; binding beyond loopback requires `auth`
    host: str = "127.0.0.1"
    port: int = 7860
    # "user:password" for the page; required when host is not loopback
    auth: str | None = field(default=None, repr=False)  # the login: never in a repr or a log line
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
    # the page's forward pass for top-5: "onnxruntime" (the model exported in memory; used when it measures faster
    # than torch on this CPU, Grad-CAM stays on torch) or "torch"
    predict_runtime: str = "onnxruntime"

    def __post_init__(self):
        from shared.analysis.eval_result import FIGURE_LEVELS

        if self.eval_figures not in FIGURE_LEVELS:
            raise ValueError(f"{ENV_PREFIX}EVAL_FIGURES must be one of {', '.join(FIGURE_LEVELS)}, "
                             f"got {self.eval_figures!r}")
        if self.predict_runtime not in PREDICT_RUNTIMES:
            raise ValueError(f"{ENV_PREFIX}PREDICT_RUNTIME must be one of {', '.join(PREDICT_RUNTIMES)}, "
                             f"got {self.predict_runtime!r}")

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
        """Build settings from environment variables (`ENV_VARS`); keyword overrides (CLI flags) win."""
        env = os.environ if env is None else env
        values = {var.field: var.parse(var.name, env[var.name]) for var in ENV_VARS if env.get(var.name)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        for key in ("models_dir", "cache_dir", "weights_dir"):
            if isinstance(values.get(key), str):
                values[key] = _path(key, values[key])
        if isinstance(values.get("data_roots"), (str, Path)):
            values["data_roots"] = _split_paths("data_roots", str(values["data_roots"]))
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The environment variables that hand these settings (CLI overrides included) to a child process;
        `Settings.from_env(s.to_env()) == s`. Unset optional settings are left out."""
        return {var.name: var.format(getattr(self, var.field)) for var in ENV_VARS
                if getattr(self, var.field) is not None}

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


@dataclass(frozen=True)
class EnvVar:
    """One setting's environment variable: `parse(name, text)` reads it (errors name the variable), `format`
    writes it back for a child process."""

    field: str
    name: str
    parse: Callable[[str, str], Any]
    format: Callable[[Any], str] = str


# every Settings field, both ways (tests/test_settings.py checks that none is missing and that each round-trips)
ENV_VARS = (
    EnvVar("models_dir", ENV_PREFIX + "MODELS_DIR", _path),
    EnvVar("data_roots", ENV_PREFIX + "DATA_ROOTS", _split_paths, _join_paths),
    EnvVar("cache_dir", ENV_PREFIX + "CACHE_DIR", _path),
    EnvVar("cache_max_gb", ENV_PREFIX + "CACHE_MAX_GB", _gigabytes, repr),
    EnvVar("redis_url", "REDIS_URL", _text),
    EnvVar("host", ENV_PREFIX + "HOST", _text),
    EnvVar("port", ENV_PREFIX + "PORT", _integer),
    EnvVar("auth", ENV_PREFIX + "AUTH", _text),
    EnvVar("allowed_hosts", ENV_PREFIX + "ALLOWED_HOSTS", _host_names, ",".join),
    EnvVar("visibility_timeout", ENV_PREFIX + "VISIBILITY_TIMEOUT", _integer),
    EnvVar("max_upload_mb", ENV_PREFIX + "MAX_UPLOAD_MB", _integer),
    EnvVar("uploads_max_gb", ENV_PREFIX + "UPLOADS_MAX_GB", _gigabytes, repr),
    EnvVar("worker_threads", ENV_PREFIX + "WORKER_THREADS", _integer),
    EnvVar("weights_dir", ENV_PREFIX + "WEIGHTS_DIR", _path),
    EnvVar("max_queued_runs", ENV_PREFIX + "MAX_QUEUED_RUNS", _integer),
    EnvVar("eval_figures", ENV_PREFIX + "EVAL_FIGURES", _text),
    EnvVar("model_plugins", ENV_PREFIX + "MODEL_PLUGINS", _names, ",".join),
    EnvVar("predict_runtime", ENV_PREFIX + "PREDICT_RUNTIME", _text),
)


def redact_url(url: str | None) -> str:
    """A Redis URL for messages: the scheme, host, port and database, never a password.

    Credentials end at the *last* '@': a password may hold '@', ':' or '/' unencoded, which urllib's split (the
    host ends at the first '/') would cut in the middle and half show. A query (`?password=...`) is hidden whole;
    when a '?' comes before the last '@' (a password with '?', or a query with '@') nothing past the scheme shows.
    """
    if not url:
        return "<unset>"
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "redis", url
    credentials, at, tail = rest.rpartition("@")
    if at and "?" in credentials:
        return f"{scheme}://***"
    address, question, _query = tail.partition("?")
    return f"{scheme}://{'***@' if at else ''}{address}{'?***' if question else ''}"


def is_loopback(host: str) -> bool:
    return host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
