"""The Train tab's "Find learning rate" (issue 15, item 3): the page sends the range test to a worker and returns at
once; polled, it answers with the suggestion and a plot that the file route serves (and nothing else of
`<models>/lr-find/`). Hostile settings are refused at the page before anything is queued (the worker refuses them
too: tests/test_worker_confine.py). The session's page and worker (tests/procs.py SharedStack), tiny model.
"""

from __future__ import annotations

import re
import urllib.error
import urllib.request
import uuid

import pytest

from tests.procs import wait_for
from tests.tiny import TINY_MODEL, tiny_form

pytestmark = pytest.mark.timeout(300)

FORM = tiny_form("shapes", lrs_custom="not a rate")  # a dataset of the stack's data root; the lrs are ignored


@pytest.fixture(scope="module")
def stack(session_page):
    return session_page


@pytest.fixture(scope="module")
def client(stack):
    return stack.page.client()


def _get(url: str) -> tuple[int, str, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read()
    except urllib.error.HTTPError as e:
        return e.code, "", b""


def test_find_lr_answers_with_a_suggestion_and_a_plot_the_file_route_serves(client, stack):
    started = client.predict(FORM, api_name="/find_lr")
    job = started["job"]
    assert started["status"] == "queued" and re.fullmatch(r"[0-9a-f]{32}", job), started
    seen = []

    def finished():
        seen.append(client.predict(job, api_name="/lr_find_result"))
        return seen[-1] if seen[-1]["status"] in ("done", "failed") else None

    result = wait_for(finished, 120, "the range test", interval=0.5,
                      describe=lambda: f"{seen[-3:]}\nworker log:\n{stack.worker.log()[-3000:]}")
    assert result["status"] == "done", result
    assert {s["status"] for s in seen} <= {"queued", "running", "done"}, seen
    assert 1e-6 < result["suggestion"] < 1 and result["model"] == TINY_MODEL and result["batch_size"] == 8
    assert len(result["lrs"]) == len(result["losses"]) == result["steps"] >= 4, result
    assert result["lrs"] == sorted(result["lrs"]) and result["seconds"] >= 0

    folder = stack.models / "lr-find"
    assert result["plot"] == str(folder / f"{job}.png")
    status, kind, body = _get(f"{stack.page.url}/gradio_api/file={result['plot']}")
    assert (status, kind, body[:8]) == (200, "image/png", b"\x89PNG\r\n\x1a\n")
    # the result's .json, a made-up name and a path out of the folder are not served
    for path in (folder / f"{job}.json", folder / "notes.png", folder / ".." / stack.run_id / "config.json"):
        assert _get(f"{stack.page.url}/gradio_api/file={path}")[0] == 403, path


def test_find_lr_refuses_hostile_settings_at_the_page(client, stack):
    from gradio_client.exceptions import AppError

    before = sorted((stack.models / "lr-find").glob("*")) if (stack.models / "lr-find").is_dir() else []
    refused = {
        "outside the data folders": [{"data_dir": "/etc"}, {"data_dir": "../" * 8 + "etc"}],
        "no dataset folder given": [{"data_dir": ""}],
        "batch_size must be between 1 and 1024": [{"batch_sizes": [10**9]}],
        "model must be one of": [{"models": ["resnet18; rm -rf /"]}],
        "one model at one batch size": [{"batch_sizes": [8, 16]}],
        "epochs: expected a whole number": [{"epochs": "ten"}],
        "expected a JSON object": ["shapes"],
    }
    for message, changes in refused.items():
        for change in changes:
            params = {**FORM, **change} if isinstance(change, dict) else change
            with pytest.raises(AppError, match=message):
                client.predict(params, api_name="/find_lr")
    # a job id that is malformed, or well formed but never sent: one answer
    for job in ("../../etc/passwd", uuid.uuid4().hex, "", "A" * 32):
        with pytest.raises(AppError, match="no range test .* press Find learning rate"):
            client.predict(job, api_name="/lr_find_result")
    after = sorted((stack.models / "lr-find").glob("*")) if (stack.models / "lr-find").is_dir() else []
    assert after == before, "a refused range test left files"


def test_one_range_test_waits_per_dataset(tmp_path, redis_url):
    """No worker: the first test stays queued, and a second one on the same folder is refused until it ends; the
    client knows only the jobs it sent (the page's one answer for any other id)."""
    from shared.settings import Settings
    from shared.training.config import TrainConfig
    from tests.tiny import TINY_TRAIN
    from ui.client import EvaluationPending, QueueClient

    client = QueueClient(Settings(models_dir=tmp_path / "models", redis_url=redis_url))
    config = TrainConfig(**{**TINY_TRAIN, "data_dir": str(tmp_path / "data")})
    job = client.submit_lr_find(config)
    assert client.lr_find_task(job).state == "PENDING" and client.lr_find_task(uuid.uuid4().hex) is None
    with pytest.raises(EvaluationPending, match="already queued or running"):
        client.submit_lr_find(config)
    assert client.submit_lr_find(config.replace(data_dir=str(tmp_path / "other"))) != job  # another folder
    client.registry.release_job("lr-find", config.data_dir)  # what the worker does when the test ends
    assert client.submit_lr_find(config) != job
