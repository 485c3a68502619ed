"""docker-compose.yml, Dockerfile and the shell entry points, checked without a Docker engine.

No Docker runs here, so these tests read the files: the compose wiring (services, builds, volumes, environment,
healthchecks, GPU reservation, loopback-only port), every file the Dockerfile copies, and that the pins and
commands the scripts rely on agree with each other.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shlex
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import pytest

yaml = pytest.importorskip("yaml")
tomllib = pytest.importorskip("tomllib")

from shared.settings import Settings, is_loopback  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENV = {"REDIS_PASSWORD": "0123abcd", "RESNET_LAB_AUTH": "admin:pw"}


def interpolate(value: str, env: dict) -> str:
    """Compose's `${VAR}`, `${VAR:-default}` and `${VAR:?error}` substitution (enough for this file)."""
    def sub(match):
        name, op, arg = match.group(1), match.group(2), match.group(3)
        if env.get(name):
            return env[name]
        if op == ":?":
            raise KeyError(f"{name}: {arg}")
        return arg if op == ":-" else ""
    return re.sub(r"\$\{(\w+)(?:(:[-?])([^}]*))?\}", sub, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict, env: dict = ENV) -> dict[str, str]:
    raw = service.get("environment", {})
    if isinstance(raw, list):
        raw = dict(item.split("=", 1) for item in raw)
    return {k: interpolate(str(v), env) for k, v in raw.items()}


def mounts(service: dict) -> dict[str, str]:
    """target path → named volume."""
    return {v.split(":")[1]: v.split(":")[0] for v in service.get("volumes", [])}


def test_the_three_services_and_named_volumes(compose, services):
    assert set(services) == {"redis", "worker", "ui"}
    assert set(compose["volumes"]) == {"models", "data", "redis-data"}
    used = {name for s in services.values() for name in mounts(s).values()}
    assert used == set(compose["volumes"]), "every named volume is declared and used"


def test_redis_persists_requires_a_password_and_has_a_working_healthcheck(services):
    redis = services["redis"]
    assert redis["image"] == "redis:7-alpine"
    command = " ".join(redis["command"])
    assert "--appendonly yes" in command
    assert "--requirepass ${REDIS_PASSWORD:?" in command
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        interpolate(command, {})
    assert mounts(redis) == {"/data": "redis-data"}
    test = " ".join(redis["healthcheck"]["test"])
    assert "redis-cli" in test and "ping" in test.lower()
    # redis-cli must authenticate, or the check fails forever once requirepass is set
    assert env_of(redis)["REDISCLI_AUTH"] == ENV["REDIS_PASSWORD"] or "-a" in test
    assert "ports" not in redis, "Redis stays on the compose network"


@pytest.mark.parametrize("name", ["worker", "ui"])
def test_app_services_build_the_image_and_share_redis_and_volumes(services, name):
    service = services[name]
    build = service["build"]
    context = build if isinstance(build, str) else build.get("context", ".")
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert (REPO / context / dockerfile).is_file()
    assert service["image"] == services["worker"]["image"], "one image for worker and page"
    assert service["command"][:2] == ["resnet-lab", name]
    assert service["depends_on"]["redis"]["condition"] == "service_healthy"

    env = env_of(service)
    url = urlsplit(env["REDIS_URL"])
    assert (url.scheme, url.hostname, url.port, url.password) == ("redis", "redis", 6379, ENV["REDIS_PASSWORD"])
    with pytest.raises(KeyError, match="REDIS_PASSWORD"):
        env_of(service, {})
    settings = Settings.from_env(env)
    volumes = mounts(service)
    assert volumes[str(settings.models_dir)] == "models"
    assert volumes[str(settings.upload_root)] == "data"


def test_worker_reserves_gpus_and_can_be_scaled(services):
    worker = services["worker"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] and
               (d.get("count") == "all" or isinstance(d.get("count"), int) or d.get("device_ids"))
               for d in devices)
    # `--scale worker=N` fails with a fixed container name or a published host port
    assert "container_name" not in worker and "ports" not in worker
    assert str(worker.get("shm_size", "")).lower().endswith(("gb", "g", "mb", "m")), "torch needs /dev/shm"


def test_page_is_published_on_loopback_only_and_needs_a_login_to_bind_wide(services):
    ui = services["ui"]
    env = env_of(ui)
    settings = Settings.from_env(env)
    assert settings.host == "0.0.0.0"
    assert settings.auth_pair() == ("admin", "pw")
    with pytest.raises(KeyError, match="RESNET_LAB_AUTH"):
        env_of(ui, {"REDIS_PASSWORD": "x"})
    assert ui["ports"], "the page must be reachable from the host"
    for port in ui["ports"]:
        host_ip, host_port, container_port = str(port).split(":")
        assert is_loopback(host_ip), f"{port} would expose the page beyond this machine"
        assert int(container_port) == settings.port


# --- the Dockerfile ---------------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    out = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def copy_sources() -> list[str]:
    sources = []
    for word, rest in dockerfile_instructions():
        if word not in ("COPY", "ADD"):
            continue
        parts = json.loads(rest) if rest.startswith("[") else shlex.split(rest)
        if any(p.startswith("--from") for p in parts):
            continue  # copies from another build stage, not from the repository
        sources += [p for p in parts if not p.startswith("--")][:-1]
    return sources


def dockerignored(path: str) -> bool:
    patterns = [ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()
                if ln.strip() and not ln.startswith("#")]
    parts = Path(path).parts
    prefixes = ["/".join(parts[:i]) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        if any(fnmatch.fnmatch(p, pattern) or fnmatch.fnmatch(p, pattern.replace("**/", "")) for p in prefixes):
            ignored = not negate
    return ignored


def test_every_copied_file_exists_and_is_not_dockerignored():
    sources = copy_sources()
    assert sources, "the Dockerfile copies the project in"
    for source in sources:
        assert (REPO / source).exists(), f"Dockerfile copies {source}, which is not in the repository"
        assert not dockerignored(source), f"Dockerfile copies {source}, but .dockerignore leaves it out"


def test_dockerfile_copies_every_package_and_installs_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    copied = {Path(s).parts[0] for s in copy_sources()}
    assert "pyproject.toml" in copied
    from setuptools import find_packages

    include = project["tool"]["setuptools"]["packages"]["find"]["include"]  # as pip finds them at install
    packages = {name.split(".")[0] for name in find_packages(str(REPO), include=include)}
    assert {"shared", "worker", "ui"} <= packages <= copied
    runs = " ".join(rest for word, rest in dockerfile_instructions() if word == "RUN")
    assert re.search(r"pip install (--no-deps )?\.( |$)", runs)
    assert "resnet-lab" in project["project"]["scripts"], "the compose commands call `resnet-lab`"


def test_dockerfile_environment_matches_the_compose_mounts(services):
    env = dict(re.findall(r"(RESNET_LAB_\w+)=(\S+)", " ".join(r for w, r in dockerfile_instructions() if w == "ENV")))
    settings = Settings.from_env(env)
    assert mounts(services["worker"])[str(settings.models_dir)] == "models"
    assert "GRADIO_ANALYTICS_ENABLED=False" in (REPO / "Dockerfile").read_text()


def test_torch_pins_agree_between_dockerfile_and_run_script():
    args = dict(re.findall(r"ARG (TORCH\w*_VERSION)=(\S+)", (REPO / "Dockerfile").read_text()))
    pins = dict(re.findall(r"(torch|torchvision)==(\S+?)[)\s]", (REPO / "run").read_text()))
    assert args == {"TORCH_VERSION": pins["torch"], "TORCHVISION_VERSION": pins["torchvision"]}


# --- the shell entry points ------------------------------------------------------------------------------------

@pytest.mark.parametrize("script", ["run", ".ci/run"])
def test_scripts_are_executable_bash_that_parses(script):
    path = REPO / script
    assert os.access(path, os.X_OK), f"chmod +x {script}"
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_ci_runs_the_readme_test_command_and_keeps_its_exit_code():
    text = (REPO / ".ci" / "run").read_text()
    assert "set -euo pipefail" in text
    assert re.search(r"^\./run test\b", text, re.M)
    assert 'exit "$status"' in text


def test_run_without_a_command_prints_usage():
    out = subprocess.run([str(REPO / "run")], capture_output=True, text=True, timeout=30)
    assert out.returncode == 2 and "./run app" in out.stderr and "./run test" in out.stderr
