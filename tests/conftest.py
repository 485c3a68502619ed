"""Shared pytest fixtures."""

from __future__ import annotations

import pytest


# --- Redis: one private server per test session (shared.services.start_redis) ---------------------------------
# `redis_server` is started once on a free 127.0.0.1 port in a temporary folder and stopped at the end;
# `redis_url` hands each test that server's URL with every database flushed first.

@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """A private redis-server for the whole session; has `.url`, `.port`, `.pid`, `.stop()`."""
    from shared.services import start_redis

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
