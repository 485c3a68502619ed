"""Holes a hostile-client probe of the merged hardening found, each now closed and kept closed here.

Each test talks to a real `python -m ui` over raw HTTP, as a local client would: Gradio's direct REST routes that
skipped the queue, dataset links out of the data roots, a FIFO named like an image, a run id the page did not know
when it was built, odd values that got a blank error, and an "Evaluate again" that could be queued without end.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from tests.imagegen import make_image_folder
from tests.tiny import TINY_MODEL

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def page(session_page, tmp_path_factory):
    """The session's page (tests/procs.py SharedStack: starting a page of our own costs ~10 s of CPU) and this
    module's datasets in a folder of its own in the stack's data root (`probe/...`); its run in the stack's models
    folder. The FIFO is removed at the end, so that no later test of the session meets it."""
    stack = session_page
    data = stack.folder("probe")
    outside = tmp_path_factory.mktemp("probe-outside")
    make_image_folder(data / "shapes", classes=2, per_class=4, size=32)
    # a dataset whose second class folder is a link to private pictures outside every data root
    make_image_folder(data / "linked", classes=["inside", "also_inside"], per_class=3, size=32)
    make_image_folder(outside, classes=["private"], per_class=3, size=32, seed=7)
    os.symlink(outside / "private", data / "linked" / "private")
    # a dataset with a FIFO named like an image
    make_image_folder(data / "piped", classes=2, per_class=3, size=32)
    fifo = data / "piped" / "class_0" / "zz.png"
    os.mkfifo(fifo)
    served = SimpleNamespace(url=stack.page.url, fifo=fifo, models_dir=stack.models, data=data)
    try:
        yield served
    finally:
        _release(fifo)
        fifo.unlink(missing_ok=True)


def call(url: str, api: str, data: list, timeout: float = 60) -> tuple[str, object]:
    """POST /gradio_api/call/<api>, then its event stream, within `timeout` seconds in all (heartbeats included:
    Gradio sends one every 15 s, so a per-read timeout alone would wait forever)."""
    deadline = time.monotonic() + timeout
    posted = requests.post(f"{url}/gradio_api/call/{api}", json={"data": data}, timeout=timeout)
    assert posted.status_code == 200, (posted.status_code, posted.text[:300])
    event_id = posted.json()["event_id"]
    with requests.get(f"{url}/gradio_api/call/{api}/{event_id}", stream=True, timeout=timeout) as stream:
        event = None
        for line in stream.iter_lines(decode_unicode=True):
            if time.monotonic() > deadline:
                raise TimeoutError(f"/{api} did not answer within {timeout:.0f} s")
            if line.startswith("event: "):
                event = line[len("event: "):]
            elif line.startswith("data: ") and event in ("complete", "error"):
                return event, json.loads(line[len("data: "):])
    raise AssertionError(f"no answer from /{api}")


def test_direct_rest_route_does_not_skip_the_queue(page):
    direct = requests.post(f"{page.url}/gradio_api/run/check_dataset", json={"data": ["probe/shapes"]}, timeout=60)
    assert direct.status_code == 404, (direct.status_code, direct.text[:200])
    # the queue stays the way in
    kind, _ = call(page.url, "check_dataset", ["probe/shapes"])
    assert kind == "complete"


def test_a_class_folder_linking_out_of_the_roots_is_not_read(page):
    kind, data = call(page.url, "check_dataset", ["probe/linked"])
    assert kind == "complete", data
    counts = {row[0]: row[1] for row in data[1]["data"]}
    assert counts == {"also_inside": 3, "inside": 3}, f"read images from outside the data roots: {data}"


def test_a_fifo_in_a_dataset_does_not_hang_the_check(page):
    try:
        kind, data = call(page.url, "check_dataset", ["probe/piped"], timeout=20)
    except (requests.exceptions.RequestException, TimeoutError) as exc:
        pytest.fail(f"no answer within 20 s: {type(exc).__name__}")
    finally:
        _release(page.fifo)
    assert kind == "complete", data
    assert "not a regular file" in json.dumps(data), data  # listed as unreadable, with the reason


def _release(fifo: Path) -> None:
    """Give a reader stuck in open() a writer that closes at once (EOF), so the page can stop at teardown."""
    for _ in range(4):
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:  # no reader waiting (ENXIO): nothing is stuck
            return


def test_a_very_long_path_gets_a_message_not_a_blank_error(page):
    kind, data = call(page.url, "check_dataset", ["x" * 100_000])
    assert kind == "error" and data and "100,000 characters" in json.dumps(data), str(data)[:300]


def test_odd_run_ids_get_a_short_message(page):
    for api, value in (("run_curves", [["y" * 5000]]), ("run_curves", [[1, 2]]), ("run_curves", [{"a": 1}]),
                       ("run_results", ["../" * 3000]), ("run_results", [["x"]])):
        kind, data = call(page.url, api, value)
        text = json.dumps(data)
        assert kind == "error" and data, (api, str(value)[:40], text[:200])
        assert "run" in text and len(text) < 600, (api, text[:300])


def test_predict_many_answers_with_a_run_that_finished_after_the_page_started(page, tmp_path):
    from shared.training.config import TrainConfig
    from shared.training.engine import fit
    from shared.runs.store import RunStore

    store = RunStore(Path(page.models_dir))
    config = TrainConfig(data_dir=str(page.data / "shapes"), model=TINY_MODEL, weights="none", image_size=32,
                         epochs=1, batch_size=8, augment="none", warmup_epochs=0, device="cpu", val_ratio=0.25,
                         test_ratio=0.0)
    run_id = store.create(config)
    fit(config, store.path(run_id))
    store.set_status(run_id, "succeeded")
    photo = sorted((page.data / "shapes" / "class_0").iterdir())[0]
    upload = requests.post(f"{page.url}/gradio_api/upload", files={"files": (photo.name, photo.read_bytes())},
                           timeout=60)
    assert upload.status_code == 200, upload.text[:200]
    path = upload.json()[0]
    kind, data = call(page.url, "predict_many", [[{"path": path, "meta": {"_type": "gradio.FileData"}}], run_id])
    assert kind == "complete", str(data)[:300]
    assert run_id in json.dumps(data)


def test_one_pending_evaluation_per_run(redis_url, tmp_path):
    """A client pressing "Evaluate again" in a loop queued one evaluation per press; now the second is refused
    until the worker releases the first (tests/test_worker.py runs evaluations through a real worker)."""
    from shared.runs.store import RunStore
    from shared.settings import Settings
    from shared.training.config import TrainConfig
    from ui.client import EvaluationPending, QueueClient

    settings = Settings(models_dir=tmp_path / "models", data_roots=(tmp_path,), redis_url=redis_url)
    client = QueueClient(settings)
    run_id = RunStore(settings.models_dir).create(TrainConfig(data_dir=str(tmp_path), epochs=1))
    client.submit_evaluate(run_id)
    with pytest.raises(EvaluationPending, match="already queued or running"):
        client.submit_evaluate(run_id)
    client.registry.release_job("evaluating", run_id)  # what the worker does when the evaluation ends
    client.submit_evaluate(run_id)


def test_a_batch_folder_is_walked_only_up_to_its_cap(tmp_path):
    """The page's "Classify folder" names any folder of the data roots (a whole root too) and the worker listed
    and kept every image in it; now the walk stops at the cap with a message."""
    from shared.data.images import TooManyFiles, expand_image_paths
    from worker.tasks import MAX_BATCH_FILES, USER_ERRORS

    for k in range(6):
        (tmp_path / "sub" if k % 2 else tmp_path).mkdir(exist_ok=True)
        ((tmp_path / "sub" if k % 2 else tmp_path) / f"{k}.jpg").write_bytes(b"x")  # only names are looked at
    assert len(expand_image_paths([tmp_path], limit=6)) == 6
    with pytest.raises(TooManyFiles, match="more than 5 image files"):
        expand_image_paths([tmp_path], limit=5)
    with pytest.raises(TooManyFiles):  # the cap counts across the sources
        expand_image_paths([tmp_path / "sub", tmp_path / "0.jpg"], limit=3)
    assert TooManyFiles in USER_ERRORS and MAX_BATCH_FILES >= 10_000


def test_page_writes_stay_in_the_datasets_own_state_folder(tmp_path, monkeypatch):
    """A `.resnet-lab` link in a dataset sent the inbox photos, the lock and overrides.json wherever it pointed;
    and the inbox grew one photo per click without end."""
    from shared.data import overrides

    root = make_image_folder(tmp_path / "ds", classes=2, per_class=3, size=32)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    os.symlink(elsewhere, root / ".resnet-lab")
    with pytest.raises(overrides.OverrideError, match="is a link"):
        overrides.add_to_inbox(root, "class_0", root / "class_0" / "class_0_000.jpg")
    with pytest.raises(overrides.OverrideError, match="is a link"):
        overrides.add_change(root, "exclude", "class_0/class_0_000.jpg")
    assert list(elsewhere.iterdir()) == []
    os.unlink(root / ".resnet-lab")

    photos = sorted((root / "class_1").iterdir())
    for photo in photos[:2]:
        overrides.add_to_inbox(root, "class_1", photo)
    monkeypatch.setattr(overrides, "MAX_INBOX", 2)
    overrides.add_to_inbox(root, "class_1", photos[0])  # the same photo again is the same file: accepted
    with pytest.raises(overrides.OverrideError, match="inbox already holds 2 photos"):
        overrides.add_to_inbox(root, "class_1", photos[2])


def test_dataset_names_in_cleanup_notes_are_escaped_markdown(tmp_path):
    """Class and file names come from users' folders (an uploaded zip too): the relabel/exclude/undo notes put
    them into Markdown raw, so a backtick closed the code span and `*_<>` were read as markup."""
    from types import SimpleNamespace

    from shared.runs.store import RunStore
    from shared.settings import Settings
    from shared.training.config import TrainConfig
    from ui.tabs import cleanup

    odd, other = "a`b*_c", "<i>x"
    data = make_image_folder(tmp_path / "data" / "odd", classes=[odd, other], per_class=3, size=32)
    photo = sorted(p.name for p in (data / odd).iterdir())[0]
    (data / odd / photo).rename(data / odd / "p`q.jpg")
    settings = Settings(models_dir=tmp_path / "models", data_roots=(tmp_path / "data",))
    lab = SimpleNamespace(store=RunStore(settings.models_dir), settings=settings)
    run_id = lab.store.create(TrainConfig(data_dir=str(data), epochs=1))

    text, _ = cleanup._fix(lab, run_id, "relabel", f"{odd}/p`q.jpg", other)
    assert text.startswith(f"Relabelled ``{odd}/p`q.jpg`` → **&lt;i&gt;x**."), text
    text, _ = cleanup._fix(lab, run_id, "undo", None)
    assert f"``{odd}/p`q.jpg``" in text, text


def test_one_pending_data_issues_search_per_run(redis_url, tmp_path):
    """"Find data issues" (a private event any client can call by its fn_index) queued one whole-dataset search
    per press; now the second waits until the worker releases the first, as evaluations do."""
    from shared.runs.store import RunStore
    from shared.settings import Settings
    from shared.training.config import TrainConfig
    from ui.client import EvaluationPending, QueueClient

    settings = Settings(models_dir=tmp_path / "models", data_roots=(tmp_path,), redis_url=redis_url)
    client = QueueClient(settings)
    run_id = RunStore(settings.models_dir).create(TrainConfig(data_dir=str(tmp_path), epochs=1))
    client.submit_data_issues(run_id)
    with pytest.raises(EvaluationPending, match="already being looked for"):
        client.submit_data_issues(run_id)
    client.submit_evaluate(run_id)  # a different job of the same run is not held up
    client.registry.release_job("data-issues", run_id)  # what the worker does when the search ends
    client.submit_data_issues(run_id)
