"""The Runs tab's delete and clone, driven through the page's own wiring in this process: `build_app` on a real
RunStore and a real Redis, each event run by Gradio's `process_api` (preprocess, handler, postprocess) in one
session, the way the page's buttons run them. Delete and clone have no API name, so there is no HTTP endpoint
to call them by.
"""

from __future__ import annotations

import asyncio

import pytest

from shared.runs.store import RunNotFound
from shared.settings import Settings
from shared.training.config import TrainConfig
from tests.imagegen import make_image_folder

# every form field with a value other than its default, so a field the clone forgot shows up as a difference
CLONED = dict(model="resnet18", weights="none", finetune="full", probe_epochs=3, dropout=0.2, image_size=96,
              epochs=7, batch_size=64, lr=3e-4, optimizer="sgd", weight_decay=0.01, scheduler="onecycle",
              warmup_epochs=2, label_smoothing=0.05, patience=3, augment="light", seed=5, val_ratio=0.2,
              test_ratio=0.1, device="cpu")


@pytest.fixture
def page(tmp_path, redis_url):
    """(lab, demo, session) of a page on a fresh models folder and Redis."""
    from gradio.state_holder import SessionState

    from ui.app import Lab, build_app

    settings = Settings(models_dir=tmp_path / "models", data_roots=(tmp_path / "data",), redis_url=redis_url)
    make_image_folder(tmp_path / "data" / "shapes", classes=2, per_class=3, size=16)
    lab = Lab(settings)
    demo = build_app(settings, lab)
    return lab, demo, SessionState(demo)


def _block(demo, elem_id: str):
    return next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == elem_id)


def _event(demo, elem_id: str, event: str, name: str | None = None):
    """The event handler wired to `event` of the component `elem_id` (the one whose function is `name`)."""
    block = _block(demo, elem_id)
    found = [fn for fn in demo.fns.values() if (block._id, event) in [(t[0], t[1]) for t in fn.targets]
             and (name is None or getattr(fn.fn, "__name__", None) == name
                  or getattr(getattr(fn.fn, "func", None), "__name__", None) == name)]
    assert len(found) == 1, f"{len(found)} handlers for {elem_id}.{event} ({name})"
    return found[0]


def _run(demo, session, fn, inputs: list) -> dict:
    """Run one event like the page does; returns its outputs by component id (postprocessed, as sent)."""
    out = asyncio.run(demo.process_api(block_fn=fn, inputs=inputs, state=session))
    return {block._id: value for block, value in zip(fn.outputs, out["data"])}


_NOT_SENT = object()


def _sent_value(output):
    """The value an output sets: an update's value, a plain value as is, _NOT_SENT for an update without one."""
    if isinstance(output, dict) and output.get("__type__") == "update":
        return output.get("value", _NOT_SENT)
    return output


def _open_runs_tab(demo, session) -> dict:
    """Selecting the Runs tab refreshes it; the choices go to a State, and its change gives the selector the run
    ids it may hold (as the browser runs it)."""
    fn = _event(demo, "tab-runs", "select", name="refresh_now")
    out = _run(demo, session, fn, [[], "both", "", "", "", "", 1, False, None])
    follow = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", None) == "select_update")
    [choices] = [value for block_id, value in out.items() if block_id == follow.inputs[0]._id]
    out.update(_run(demo, session, follow, [choices, []]))
    return out


def _finished_and_running(lab, data_dir):
    done = lab.store.create(TrainConfig(data_dir=str(data_dir), weights="none"))
    lab.store.set_status(done, "running")
    lab.store.set_status(done, "succeeded", best={"best_val_acc": 0.5, "best_epoch": 1})
    running = lab.store.create(TrainConfig(data_dir=str(data_dir), weights="none"))
    lab.store.set_status(running, "running")
    return done, running


def test_delete_removes_a_finished_run_with_its_folder_and_refuses_a_running_one(page, tmp_path):
    lab, demo, session = page
    done, running = _finished_and_running(lab, tmp_path / "data" / "shapes")
    table = _open_runs_tab(demo, session)[_block(demo, "runs-table")._id]
    assert {row[0] for row in table["data"]} == {done, running}

    confirm = _event(demo, "delete-confirm-btn", "click")
    out = _run(demo, session, confirm, [[done, running]])
    message = out[_block(demo, "runs-message")._id]
    assert "Deleted 1 run." in message and f"`{running}`: run {running} is running: cancel it" in message
    assert out[_block(demo, "runs-select")._id]["value"] == [running]  # the one not deleted stays selected
    assert out[_block(demo, "delete-confirm")._id]["visible"] is False
    assert not (lab.store.root / done).exists() and (lab.store.root / running).is_dir()
    with pytest.raises(RunNotFound):
        lab.store.status(done)
    assert lab.client().registry.get(done) is None and lab.client().registry.get(running) is not None
    table = _open_runs_tab(demo, session)[_block(demo, "runs-table")._id]
    assert [row[0] for row in table["data"]] == [running]


def test_clone_fills_the_train_form_with_the_runs_settings(page, tmp_path):
    """Clone, then queue the form as it stands: the new run's config is the cloned run's, field for field."""
    lab, demo, session = page
    data_dir = (tmp_path / "data" / "shapes").resolve()
    original = TrainConfig(data_dir=str(data_dir), **CLONED)
    run_id = lab.store.create(original)
    _open_runs_tab(demo, session)

    clone = _event(demo, "clone-btn", "click")
    out = _run(demo, session, clone, [[run_id]])
    value = {block_id: _sent_value(v) for block_id, v in out.items() if _sent_value(v) is not _NOT_SENT}
    assert value[_block(demo, "data-dir")._id] == str(data_dir)
    assert value[_block(demo, "models")._id] == ["resnet18"] and value[_block(demo, "lrs")._id] == [3e-4]
    assert value[_block(demo, "batch-sizes")._id] == [64] and value[_block(demo, "epochs")._id] == 7
    assert value[_block(demo, "optimizer")._id] == "sgd" and value[_block(demo, "seed")._id] == 5
    assert out[_block(demo, "tabs")._id]["selected"] == "train"

    # the Queue button reads every field: what the clone set, else what the field holds already
    queue = _event(demo, "queue-btn", "click")
    inputs = [value.get(c._id, c.value) for c in queue.inputs]
    _run(demo, session, queue, inputs)
    (new_id,) = [rid for rid in lab.store.ids() if rid != run_id]
    assert lab.store.config(new_id).to_dict() == original.to_dict()


def _timer_tick(demo):
    return next(f for f in demo.fns.values() if getattr(getattr(f.fn, "func", None), "__name__", None) == "tick")


def test_a_run_whose_first_epoch_comes_late_is_drawn_and_named_in_both_charts(page, tmp_path):
    """The bug behind issue 18: with three runs selected, the one whose first epoch finished after the others' was
    left out of the Accuracy chart and its legend (Gradio's plot rebuilt its legend only when the caption — made
    of the *selected* runs — changed, and it did not). Each chart now carries its own legend: every run with a
    point is drawn and named in full, whatever came first. A tick that changes nothing sends nothing heavy."""
    import json

    lab, demo, session = page
    runs = [lab.store.create(TrainConfig(data_dir=str(tmp_path / "data" / "shapes"), weights="none", lr=lr))
            for lr in (1e-3, 3e-3, 1e-2)]
    for rid in runs:
        lab.store.set_status(rid, "running")

    def epoch(rid, n):
        with open(lab.store.path(rid) / "metrics.jsonl", "a") as fh:
            fh.write(json.dumps({"epoch": n, "train_loss": 1.0, "val_loss": 1.1, "train_acc": 0.5,
                                 "val_acc": 0.4}) + "\n")

    epoch(runs[0], 1)
    epoch(runs[1], 1)
    _open_runs_tab(demo, session)  # the selector learns the runs
    tick = _timer_tick(demo)
    session[tick.inputs[8]._id] = "runs"  # the active tab (a State: Gradio reads it from the session)
    ids = {name: _block(demo, name)._id for name in ("curves-loss", "curves-acc", "runs-table")}

    def run_tick():  # the tab's State comes from the session (Gradio keeps it between events)
        out = _run(demo, session, tick, [runs, "both", "", "", "", "", 1, False, "runs", None])
        return {name: _sent_value(out[i]) for name, i in ids.items()}

    first = run_tick()
    assert runs[2] not in first["curves-acc"] and runs[0] in first["curves-acc"]
    epoch(runs[2], 1)  # the third run's first epoch, after the charts were drawn
    second = run_tick()
    for chart in ("curves-loss", "curves-acc"):
        html = second[chart]
        legend = html[html.index('class="chart-legend"'):]
        for rid in runs:
            assert f'data-run="{rid}"' in legend, f"{rid} missing from the {chart} legend"
            assert html.count(f'data-series="{rid} · ') == 2, f"{rid}: not both splits in {chart}"
    quiet = run_tick()  # nothing changed: charts and table are not sent again
    assert all(value is _NOT_SENT for value in quiet.values()), quiet


def test_tags_from_the_page_are_checked_saved_and_filter_the_list_and_the_csv(page, tmp_path):
    import csv

    from gradio.exceptions import Error

    lab, demo, session = page
    done, running = _finished_and_running(lab, tmp_path / "data" / "shapes")
    _open_runs_tab(demo, session)
    save = _event(demo, "annotate-btn", "click")
    with pytest.raises(Error, match="tag '<b>' is not allowed"):
        _run(demo, session, save, [[done], "keep <b>", ""])
    out = _run(demo, session, save, [[done], "keep, best", "=1+1 is a note"])
    assert out[_block(demo, "runs-message")._id] == "Saved tags and note of 1 run."
    assert lab.store.annotations(done).tags == ("keep", "best")

    refresh = _event(demo, "tab-runs", "select", name="refresh_now")
    _run(demo, session, refresh, [[], "both", "", "", "", "", 1, False, None])
    follow = next(f for f in demo.fns.values() if getattr(f.fn, "__name__", None) == "filters_update")
    filters = session[follow.inputs[0]._id]  # a State: Gradio keeps its value in the session
    assert filters["tag"] == ["best", "keep"]
    _run(demo, session, follow, [filters, "", "", ""])  # the tag filter now offers them
    table = _run(demo, session, refresh, [[], "both", "best", "", "", "", 1, False, None])[_block(demo, "runs-table")._id]
    assert [row[0] for row in table["data"]] == [done] and table["data"][0][-1] == "keep best"

    export = _event(demo, "export-btn", "click")
    out = _run(demo, session, export, ["", "", "", ""])
    path = out[_block(demo, "runs-csv")._id]["value"]["path"]
    rows = {r["run_id"]: r for r in csv.DictReader(open(path))}
    assert set(rows) == {done, running}
    assert rows[done]["tags"] == "keep best" and rows[done]["note"] == "'=1+1 is a note"
    assert rows[done]["best_val_acc"] == "0.5" and rows[running]["status"] == "running"
