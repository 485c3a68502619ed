"""The README's start command, as a new user runs it: from a fresh clone, `./run app`, queue a run, stop, no leftovers.

The clone reuses this checkout's installed .venv (a fresh install is what `.ci/run` itself proves), with the
clone's own code first on the path so what runs is what was committed. It must never install into that .venv:
`pip install -e` from the clone would point the checkout's editable install and its `resnet-lab` script at the
clone, which is deleted after the test. So the clone's .venv is a folder of links to this one's, carrying the
install stamp `./run` expects, and its `python` refuses `-m pip`.
"""

from __future__ import annotations

import hashlib
import platform
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from shared.launch.services import popen_in_own_group
from tests.browser import REPO, UpApp, wait_until
from tests.imagegen import make_image_folder

pytestmark = pytest.mark.slow


def readme_commands() -> list[str]:
    """The commands in the README's first code block (the two a new user is told to run)."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", text, re.S).group(1)
    return [line.split("#")[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_first_screen_gives_the_start_and_test_commands():
    commands = readme_commands()
    assert commands == ["./run app", "./run test", './run test -m "not slow"']  # start, all tests, quick lane
    ci = (REPO / ".ci" / "run").read_text()
    assert "./run test" in ci  # CI runs exactly the README's test command


class ClonedApp(UpApp):
    """`./run app` in a fresh clone of this repository."""

    def __init__(self, root, data_root):
        super().__init__(root, data_root)
        self.clone = self.root / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(self.clone)], check=True, timeout=120)
        borrow_venv(self.clone)
        self.env["PYTHONPATH"] = str(self.clone)
        self.env["CUDA_VISIBLE_DEVICES"] = ""  # CPU worker, whatever this machine has

    def start(self) -> "ClonedApp":
        start_command = readme_commands()[0].split()
        with open(self.log_path, "wb") as out:
            self.proc = popen_in_own_group(start_command, env=self.env, cwd=self.clone, stdout=out,
                                           stderr=subprocess.STDOUT)
        return self


def borrow_venv(clone: Path) -> None:
    """clone/.venv: links to this checkout's .venv, `./run`'s install stamp for the clone (so it installs nothing),
    and a `python` that refuses pip, so a stamp this test computes differently from `./run` fails loudly instead
    of rewriting the shared .venv."""
    shared = (REPO / ".venv").resolve()
    venv = clone / ".venv"
    (venv / "bin").mkdir(parents=True)
    for entry in shared.iterdir():
        if entry.name not in ("bin", ".resnet-lab-installed"):
            (venv / entry.name).symlink_to(entry)
    for entry in (shared / "bin").iterdir():
        if entry.name != "python":
            (venv / "bin" / entry.name).symlink_to(entry)
    python = venv / "bin" / "python"
    python.write_text(f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && {{ echo "test clone: no pip into the shared .venv" >&2; '
                      f'exit 3; }}\nexec {shared / "bin" / "python"} "$@"\n')
    python.chmod(0o755)
    # what ./run's setup() compares: the pyproject's sha256 and, on x86_64, the torch pins
    run_script = (clone / "run").read_text()
    pins = re.search(r"x86_64 \] && TORCH_PINS=\(([^)]*)\)", run_script).group(1).split()
    digest = hashlib.sha256((clone / "pyproject.toml").read_bytes()).hexdigest()
    (venv / ".resnet-lab-installed").write_text(" ".join([digest, *(pins if platform.machine() == "x86_64" else [])])
                                                + "\n")


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
def test_readme_start_command_runs_the_whole_app_from_a_fresh_clone(tmp_path):
    from gradio_client import Client

    data_root = tmp_path / "data"
    make_image_folder(data_root / "shapes", classes=3, per_class=12, size=48)
    app = ClonedApp(tmp_path, data_root)
    try:
        app.start()
        app.wait_ready(timeout=180)
        assert f"http://127.0.0.1:{app.port}" in app.log(0)
        client = Client(app.url, verbose=False)
        (run_id,) = client.predict({"data_dir": "shapes", "models": ["resnet18"], "lrs": [3e-3], "epochs": 1,
                                    "batch_sizes": [8], "image_size": 32, "weights": "none"},
                                   api_name="/submit_runs")

        def finished():
            runs = {r["run_id"]: r for r in client.predict(api_name="/run_status")}
            status = runs[run_id]["status"]
            assert status not in ("failed", "cancelled"), runs[run_id]
            return status == "succeeded"

        wait_until(finished, 240, f"run {run_id} to succeed", interval=1.0, describe=lambda: app.log(2000))
        assert (app.models / run_id / "best.pt").is_file()
        started = time.monotonic()
        assert app.stop(timeout=60) == 0, app.log()
        assert time.monotonic() - started < 60
        assert app.leftovers() == [], "processes left behind after Ctrl-C/SIGTERM"
        assert "Traceback" not in app.log(0)
    finally:
        app.kill_all()
