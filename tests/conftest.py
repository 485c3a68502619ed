"""Shared pytest fixtures: the session's Redis, the session's worker + page stack, and workers of a test's own.

RESNET_LAB_TEST_SHUFFLE=<seed> runs the modules, and the tests inside each module, in a random order (seeded):
a test that passes only after another one fails then. Tests stay grouped by module so that module fixtures
start once.
"""

from __future__ import annotations

import os
import random

import pytest


def pytest_configure(config):
    # Two test processes share 2 cores with the pages, workers and CLIs they start: each computes on one thread
    # (torch's default, one per core, had them oversubscribe: a whole run took ~45 s more of wall and 50 s more CPU).
    # A worker still sets its own count (RESNET_LAB_WORKER_THREADS); tests that need more threads set them.
    # Set before this process imports torch (below), which reads it once.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    # Tests train the tiny ResNet (tests/tinymodel.py: 143 k parameters, ~10x faster than resnet18). A process that
    # runs tests registers it (the xdist controller of `-n 2` runs none: it would import torch for nothing, seconds
    # before the workers start); the page, worker and CLI processes the tests start learn it from
    # RESNET_LAB_MODEL_PLUGINS and import it from the checkout (PYTHONPATH, for the `resnet-lab` console script, whose
    # path starts in .venv/bin).
    if os.environ.get("PYTEST_XDIST_WORKER") or not config.getoption("numprocesses", default=None):
        from tests.tinymodel import register_tiny_resnet

        register_tiny_resnet()
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    os.environ.setdefault("RESNET_LAB_MODEL_PLUGINS", "tests.tinymodel:register_tiny_resnet")
    # The pages the tests start predict on torch: the default, onnxruntime, exports each model it loads in a
    # background thread (seconds of CPU per tiny run on shared cores); tests/test_predict_stream.py covers it.
    os.environ.setdefault("RESNET_LAB_PREDICT_RUNTIME", "torch")
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    os.environ["PYTHONPATH"] = os.pathsep.join([repo, *[p for p in paths if p != repo]])


# The modules that take longest (`--durations` of a fresh-clone run on 2 cores, 2026-12-01), longest first. The suite
# runs in two processes, each taking the next module when it is free (pytest-xdist --dist loadfile): starting the
# long ones first keeps one process from running a long module alone at the end.
LONGEST_FIRST = ("test_reliability.py", "test_bench_quick.py", "test_worker.py", "test_browser_e2e.py", "test_cli.py",
                 "test_export.py", "test_models.py", "test_resource_limits.py", "test_security.py",
                 "test_readme_start.py", "test_predict_queue.py", "test_bad_input.py", "test_browser_cleanup.py",
                 "test_ui_app.py", "test_browser_compare.py", "test_page_edge.py", "test_explain.py",
                 "test_predict_stream.py", "test_damaged_records.py", "test_api_limits.py", "test_up.py")


def pytest_collection_modifyitems(config, items):
    seed = os.environ.get("RESNET_LAB_TEST_SHUFFLE")
    if not seed:
        rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
        # sorted is stable: the other modules, and the tests inside every module, keep their order
        items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1], len(rank)))
        return
    rng = random.Random(seed)
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = list(modules.values())
    rng.shuffle(order)
    for group in order:
        rng.shuffle(group)
    items[:] = [item for group in order for item in group]


def pytest_report_header(config):
    seed = os.environ.get("RESNET_LAB_TEST_SHUFFLE")
    return f"RESNET_LAB_TEST_SHUFFLE={seed}: modules and tests in a random order" if seed else None


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test, restored after: in-process training gives the same numbers on any machine
    and leaves the other core to the processes a test starts."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# --- Redis: one private server per test session (shared.launch.services.start_redis) ---------------------------------
# `redis_server` is started once on a free 127.0.0.1 port in a temporary folder and stopped at the end;
# `redis_url` hands each test that server's URL with every database flushed first.

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server for the whole session; has `.url`, `.port`, `.pid`, `.stop()`."""
    from shared.launch.services import start_redis

    server = start_redis(tmp_path_factory.mktemp("redis"), appendonly=False)
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server) -> str:
    """URL of the session's private Redis, emptied (FLUSHALL) before the test."""
    import redis

    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


# --- one Redis + worker + page for the whole session (tests.procs.SharedStack) ---------------------------------------
# For tests that use a worker or a page as they are. The stack has its own Redis (the `redis_url` fixture flushes
# the other one before every test). `session_stack` starts Redis and the worker and trains one tiny run;
# `session_page` adds the page (only sessions that need one pay for it).

@pytest.fixture(scope="session")
def session_stack(tmp_path_factory):
    """tests.procs.SharedStack: Redis, one worker, a models folder with one finished run, a data root."""
    from tests.procs import SharedStack

    stack = SharedStack(tmp_path_factory.mktemp("session-stack"))
    yield stack
    stack.close()


@pytest.fixture(scope="session")
def session_page(session_stack):
    """The session stack with its page up (`.page`: a tests.procs.Page)."""
    session_stack.start_page()
    return session_stack


# --- workers of a test's own: real `python -m worker` processes (tests/test_worker.py) -----------------------------
# `start_worker(models_dir, **env)` starts one worker against the session's Redis (`redis_url`: flushed) with one
# torch thread, its output in a log file, and waits until Celery says it is ready; every worker started is stopped
# at teardown (SIGTERM, then SIGKILL), whatever the test did. Its evaluations draw no figures
# (RESNET_LAB_EVAL_FIGURES=none: ~5 s less per tiny run); a test that looks at figures passes
# RESNET_LAB_EVAL_FIGURES="all".

@pytest.fixture
def start_worker(redis_url, tmp_path):
    """Factory: start_worker(models_dir, args=(), ready=1, ready_timeout=120, **extra_env) -> tests.procs.Proc."""
    from tests.procs import Processes

    procs = Processes(tmp_path / "worker-logs")

    def start(models_dir, *, args=(), ready: int = 1, ready_timeout: float = 120.0, **extra_env):
        return procs.worker(redis_url, models_dir, args=args, ready=ready, ready_timeout=ready_timeout, **extra_env)

    yield start
    procs.close()
