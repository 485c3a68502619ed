"""Settings ↔ environment (one table, both ways) and the one Redis URL redaction."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest

from shared.settings import ENV_VARS, Settings, redact_url
from tests.procs import REPO


def _all_changed(tmp_path) -> Settings:
    """Settings with every field away from its default (a new field must be added here to pass)."""
    values = dict(models_dir=tmp_path / "m", data_roots=(tmp_path / "a", tmp_path / "b"), cache_dir=tmp_path / "c",
                  cache_max_gb=0.25, redis_url="redis://:p@ss/w:rd@host:1/0", host="0.0.0.0", port=8000,
                  auth="u:p", allowed_hosts=("lab.example.com", "*.example.org"), visibility_timeout=60,
                  max_upload_mb=5, uploads_max_gb=1.5, worker_threads=2, weights_dir=tmp_path / "w",
                  max_queued_runs=7, eval_figures="basic", model_plugins=("tests.tinymodel:register_tiny_resnet",),
                  predict_runtime="torch")
    default = Settings()
    fields = {f.name for f in dataclasses.fields(Settings)}
    assert set(values) == fields, f"give the new setting(s) {sorted(fields - set(values))} a value here"
    for name, value in values.items():
        assert getattr(default, name) != value, f"{name}: pick a value that differs from the default"
    return Settings(**values)


def test_every_setting_has_one_environment_variable():
    names = [var.field for var in ENV_VARS]
    assert sorted(names) == sorted(f.name for f in dataclasses.fields(Settings)), "a setting has no env variable"
    assert len(set(var.name for var in ENV_VARS)) == len(ENV_VARS)


def test_every_setting_survives_the_trip_through_the_environment(tmp_path):
    settings = _all_changed(tmp_path)
    env = settings.to_env()
    assert all(isinstance(v, str) for v in env.values())
    assert Settings.from_env(env) == settings
    assert Settings.from_env(Settings(models_dir=tmp_path).to_env()) == Settings(models_dir=tmp_path)


def test_a_child_process_sees_the_same_settings(tmp_path):
    # what `resnet-lab up` / `ui` / `worker` do: the parent's settings reach a new process through its environment
    settings = _all_changed(tmp_path)
    probe = "from shared.settings import Settings; print(repr(Settings.from_env()))"
    out = subprocess.run([sys.executable, "-c", probe], env=settings.to_env(), cwd=REPO, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == repr(settings)


@pytest.mark.parametrize("name, value, expected", [
    ("RESNET_LAB_PORT", "80x", "RESNET_LAB_PORT must be an integer, got '80x'"),
    ("RESNET_LAB_CACHE_MAX_GB", "-1", "RESNET_LAB_CACHE_MAX_GB must be a number of gigabytes"),
    ("RESNET_LAB_UPLOADS_MAX_GB", "nan", "RESNET_LAB_UPLOADS_MAX_GB must be a number of gigabytes"),
    ("RESNET_LAB_MAX_QUEUED_RUNS", "many", "RESNET_LAB_MAX_QUEUED_RUNS must be an integer"),
])
def test_a_bad_value_names_its_variable(name, value, expected):
    with pytest.raises(ValueError, match=re.escape(expected)):
        Settings.from_env({name: value})


PASSWORDS = ["r3dis:pass@word", "p@ss/w:rd@", "a/b", "::@@//", "Zq9x:xYq7@wv7Kp/k2Jm"]


@pytest.mark.parametrize("password", PASSWORDS)
@pytest.mark.parametrize("user", ["", "default"])
def test_a_redacted_redis_url_shows_no_part_of_the_password(password, user):
    url = f"redis://{user}:{password}@redis.example:6379/0"
    shown = redact_url(url)
    assert shown == "redis://***@redis.example:6379/0", shown
    for piece in filter(None, re.split(r"[:@/]", password)):
        assert piece not in shown.replace("redis.example:6379/0", ""), (password, shown)


@pytest.mark.parametrize("url, shown", [
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("rediss://u:secret@h:6380/2", "rediss://***@h:6380/2"),
    ("redis://h:6379/0?password=secret", "redis://h:6379/0?***"),
    ("redis://:x@h:6379/0?password=secret", "redis://***@h:6379/0?***"),
    ("redis://h:6379/0?password=se@cret", "redis://***"),   # a query holding '@': hide everything
    ("redis://:pa?ss@h:6379/0", "redis://***"),           # a password holding '?': the same
    ("unix://:secret@/run/redis.sock?db=1", "unix://***@/run/redis.sock?***"),
    ("localhost:6379", "redis://localhost:6379"),
    (None, "<unset>"),
])
def test_redacted_urls_keep_the_address(url, shown):
    assert redact_url(url) == shown


def test_every_message_naming_redis_uses_the_one_redaction(tmp_path):
    # the page's client, `up` and the folder pairing each show a bad REDIS_URL without its password
    from shared.launch.identity import redis_address
    from shared.launch.services import redis_ping

    url = "redis://:se/cret@127.0.0.1:1/0"  # an unencoded '/': redis-py cannot read it and quotes the piece
    with pytest.raises(ValueError) as caught:
        redis_address(url)
    assert "se" not in str(caught.value).replace("redis-py", "").replace("percent-encode", "") \
        and "cret" not in str(caught.value), caught.value
    assert redis_ping(url) is False


def test_the_repr_of_settings_shows_no_secret(tmp_path):
    # settings end up in log lines and tracebacks: the login and the Redis password must not
    text = repr(Settings(models_dir=tmp_path, auth="admin:hunter2", redis_url="redis://:s3cret@h:1/0"))
    assert "hunter2" not in text and "s3cret" not in text, text
