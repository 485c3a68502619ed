"""The page's memory with a browser left open (BENCHMARKS.md item 7).

Gradio 6.31 answers a component update (even `gr.skip()`) by storing a new copy of the component in the session,
and that copy has a new id; an event that then reads the component files the copy under that new id as well, and
nothing removes it. The Runs and Predict timers read and updated their selectors every 2 s, so an open page grew
by about two components a tick (~0.4 MB a minute) for as long as it stayed open. Here a browser session is played
in-process, event by event as the frontend sends them (the timer's handlers, their `.then` steps, the `change`
listeners of the States they changed), and the session's component store must stop growing.
"""

from __future__ import annotations

import asyncio
import gc
import json
import time

import gradio as gr
import pytest
from gradio.state_holder import SessionState

from shared.training.config import TrainConfig
from shared.runs.store import RunStore
from shared.settings import Settings

WARMUP_TICKS = 10
# the bug grew the session by two components every tick: 40 ticks showed (178, 178) -> (258, 258) on the code
# before the fix (f7933ef^); more ticks only take longer
TICKS = 40
SELECTORS = {"runs": "runs-select", "predict": "predict-model"}


def make_finished_runs(models_dir, data_dir, n: int = 3) -> list[str]:
    """Finished run folders with five epochs of metrics and a best.pt (the Runs tab lists them and draws their
    curves, the Predict tab offers them; the checkpoint is never loaded here)."""
    store = RunStore(models_dir)
    ids = []
    for _ in range(n):
        run_id = store.create(TrainConfig(data_dir=str(data_dir), weights="none", image_size=32, device="cpu",
                                          epochs=5))
        lines = [json.dumps({"epoch": e, "train_loss": 1.5 / e, "train_acc": 0.1 * e, "val_loss": 1.6 / e,
                             "val_acc": 0.09 * e}) for e in range(1, 6)]
        (store.path(run_id) / "metrics.jsonl").write_text("\n".join(lines) + "\n")
        (store.path(run_id) / "best.pt").write_bytes(b"")
        store.set_status(run_id, "running")
        store.set_status(run_id, "succeeded", best={"val_acc": 0.45, "epoch": 5})
        ids.append(run_id)
        time.sleep(0.01)
    return ids


class BrowserSession:
    """One page session as the frontend drives it: component values as the session last set them, the events a
    trigger starts, their `.then` steps, and the `change` listeners of the States an event changed."""

    def __init__(self, demo: gr.Blocks):
        self.demo = demo
        self.state = SessionState(demo)
        self.events = 0

    def value(self, block) -> object:
        config = self.state.config_values.get(block._id) or {}
        return config.get("props", {}).get("value", getattr(block, "value", None))

    def choices(self, dropdown) -> list[str]:
        """The values a dropdown offers in this session (its "latest" and "best" entries aside)."""
        props = (self.state.config_values.get(dropdown._id) or {}).get("props", {})
        return [value for _, value in props.get("choices", []) if value not in ("latest", "best")]

    def listeners(self, block_id: int, event: str) -> list:
        return [fn for fn in self.demo.fns.values() if (block_id, event) in [tuple(t) for t in fn.targets]]

    async def run(self, fn) -> None:
        inputs = [None if block.stateful else self.value(block) for block in fn.inputs]
        result = await self.demo.process_api(fn, inputs, state=self.state, session_hash="browser",
                                             event_id=f"event-{self.events}")
        self.events += 1
        followers = [f for f in self.demo.fns.values() if f.trigger_after == fn._id]
        for state_id in result.get("changed_state_ids") or []:
            followers += self.listeners(state_id, "change")
        for follower in followers:
            await self.run(follower)

    async def trigger(self, block, event: str) -> None:
        for fn in self.listeners(block._id, event):
            await self.run(fn)

    async def load(self) -> None:
        """What the page does when it opens: its load events, and the `change` listeners of every State (Gradio
        6.31's frontend fires them once with the State's initial value)."""
        for fn in [f for f in self.demo.fns.values() if any(t[1] == "load" for t in f.targets)]:
            await self.run(fn)
        for block in [b for b in self.demo.blocks.values() if isinstance(b, gr.State)]:
            await self.trigger(block, "change")


def session_size(session: BrowserSession) -> tuple[int, int]:
    return len(session.state.blocks_config.blocks), len(session.state.config_values)


def page_timer(demo):
    """The page's poll timer (ui/app.py), not the Train tab's learning-rate one, which starts inactive."""
    (timer,) = [b for b in demo.blocks.values() if isinstance(b, gr.Timer) and b.active]
    return timer


@pytest.mark.parametrize("tab", ["runs", "predict"])
def test_a_page_left_open_stops_growing(redis_url, tmp_path, monkeypatch, tab):
    from ui.app import build_app

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    models = tmp_path / "models"
    run_ids = make_finished_runs(models, tmp_path)
    demo = build_app(Settings(models_dir=models, data_roots=(tmp_path,), redis_url=redis_url))
    timer = page_timer(demo)
    tab_block = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == f"tab-{tab}")
    select = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == SELECTORS[tab])
    session = BrowserSession(demo)

    async def browse(ticks: int) -> None:
        for _ in range(ticks):
            await session.trigger(timer, "tick")

    async def open_tab() -> None:
        await session.load()
        await session.trigger(tab_block, "select")
        await browse(WARMUP_TICKS)

    asyncio.run(open_tab())
    # the session really is on that tab, its selector offering the runs
    assert sorted(session.choices(select)) == sorted(run_ids), session.choices(select)
    gc.collect()
    before, events_before = session_size(session), session.events
    started = time.perf_counter()
    asyncio.run(browse(TICKS))
    seconds = time.perf_counter() - started
    gc.collect()
    after = session_size(session)
    assert session.events - events_before >= 2 * TICKS  # both tabs' timers (and the Runs tab's .then) ran
    # (components, their configs) kept for this session: constant once the tab shows everything
    assert after == before, (f"the session grew from {before} to {after} (components, configs) in {TICKS} ticks "
                             f"({seconds:.1f} s)")


@pytest.mark.parametrize("tab", ["runs", "predict"])
def test_the_selectors_still_follow_new_runs(redis_url, tmp_path, monkeypatch, tab):
    """The timers now update the selectors through a State: a run finishing later still shows up in them."""
    from ui.app import Lab, build_app

    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "False")
    models = tmp_path / "models"
    first = make_finished_runs(models, tmp_path, 1)
    lab = Lab(Settings(models_dir=models, data_roots=(tmp_path,), redis_url=redis_url))
    demo = build_app(lab.settings, lab)
    timer = page_timer(demo)
    tab_block = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == f"tab-{tab}")
    select = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == SELECTORS[tab])
    session = BrowserSession(demo)

    async def play() -> tuple[list[str], list[str], list[str]]:
        await session.load()
        await session.trigger(tab_block, "select")
        await session.trigger(timer, "tick")
        before = session.choices(select)
        second = make_finished_runs(models, tmp_path, 1)
        lab.client().resync()  # into the registry now, not at the page's next resync (at most every 10 s)
        await session.trigger(timer, "tick")
        return before, session.choices(select), second

    before, after, second = asyncio.run(play())
    assert before == first and sorted(after) == sorted(first + second), (before, after)



def test_the_tracemalloc_diagnostic_is_off_unless_asked_and_reports_what_grew(tmp_path):
    """RESNET_LAB_TRACEMALLOC (the diagnostic that found the growth above): off by default, a clear message for
    a bad period, and a report naming the line that allocated."""
    import tracemalloc

    from ui import memtrace

    assert memtrace.start_from_env({}) is None and not tracemalloc.is_tracing()
    with pytest.raises(SystemExit, match="RESNET_LAB_TRACEMALLOC_EVERY must be a number of seconds"):
        memtrace.start_from_env({"RESNET_LAB_TRACEMALLOC": str(tmp_path / "r.txt"),
                                 "RESNET_LAB_TRACEMALLOC_EVERY": "soon"})
    tracemalloc.start(memtrace.FRAMES)
    try:
        first = memtrace._snapshot()
        kept = [bytearray(4096) for _ in range(100)]  # this line must top the report
        memtrace.write_report(tmp_path / "r.txt", first, memtrace._snapshot(), 60.0)
    finally:
        tracemalloc.stop()
    report = (tmp_path / "r.txt").read_text()
    assert report.startswith("after 1.0 min: traced") and len(kept) == 100
    assert "kept = [bytearray(4096)" in report.split("\n\n")[1], report[:1500]
    assert (tmp_path / "r.txt.log").read_text().count("after 1.0 min") == 1
