"""The page: `build_app(settings)` lays out five tabs (Data, Train, Runs, Results, Predict), then wires them.

Each tab lives in `ui/tabs/<name>.py` with `build(lab)` (components only, returned in a small dataclass) and
`wire(lab, ui, ...)` (event handlers). Tabs talk to the rest of the system only through `Lab`: the run store on
disk, the queue client (Redis + Celery, by task name) and the predictor cache that answers Predict in this
process, so prediction keeps working while the worker trains.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import gradio as gr

from shared.analysis.predict import PredictorCache
from shared.runs.lifecycle import mirror
from shared.runs.store import DAMAGED, FINISHED, RunDamaged, RunNotFound, RunStore, read_metrics
from shared.settings import Settings

from .client import QueueClient, QueueUnavailable
from .guard import ClientFiles
from .tabs import data, predict, results, runs, train

log = logging.getLogger(__name__)

TITLE = "ResNet Lab"
THEME = gr.themes.Soft(primary_hue="blue", neutral_hue="slate")
CSS = """
#title h1 { margin-bottom: 0; }
#title p { margin-top: 0.2em; color: var(--body-text-color-subdued); }
#redis-banner { background: #fff4e5; border: 1px solid #f0a020; border-radius: 8px; padding: 0.6em 1em; }
#redis-banner p { margin: 0; color: #6b4100; }
.help { color: var(--body-text-color-subdued); margin-bottom: 0.4em; }
#run-count { font-size: 1.05em; }
.confusion-wrap { overflow-x: auto; }
table.confusion { border-collapse: collapse; font-size: 0.85em; }
table.confusion th, table.confusion td { border: 1px solid var(--border-color-primary); padding: 4px 8px;
  text-align: center; min-width: 2.6em; }
table.confusion th.corner { font-weight: normal; font-size: 0.8em; color: var(--body-text-color-subdued); }
#predict-image img, #act-image img { width: 100%; height: 100%; object-fit: contain; }
/* native plots: the chart fills the block's fixed height, so a caption would be clipped half-way; captions are
   set only to make Gradio rebuild the legend (ui/tabs/__init__.py), the titles and notes say the same */
#roc .caption, #pr .caption, #calibration .caption, #tsne .caption,
#class-counts .caption { display: none; }
/* the Results galleries grow with their figure; Gradio marks a labelled grid pt-6 for room under the floating
   label but ships no rule for it, so a tall figure's top row sat under the label */
#cam-gallery .pt-6, #toploss-gallery .pt-6 { padding-top: 2.4rem; }
/* a disabled choice (Fine-tuning while training from scratch) must not look selected and active */
#finetune label:has(input:disabled) { opacity: 0.55; filter: grayscale(1); cursor: not-allowed; }
#runs-table table { font-size: 0.86em; }
.toolbar { align-items: flex-end !important; }
.toolbar button { max-height: 3.2em; }
footer { display: none !important; }
/* the Runs tab's own charts (ui/charts.py): the chart keeps a readable size, its legend sits beside it and wraps,
   never cut; on a narrow page the legend goes under the chart */
.chart-block { display: flex; flex-wrap: wrap; gap: 0.6em 1.2em; align-items: flex-start; }
.chart-main { flex: 1 1 460px; max-width: 720px; min-width: 300px; }
.chart-title { font-weight: 600; margin-bottom: 0.2em; }
.chart-svg { width: 100%; height: auto; font-size: 12px; font-family: var(--font); }
.chart-svg .grid { stroke: #e3e6ea; } .chart-svg .domain { stroke: #888; }
.chart-svg .tick { fill: var(--body-text-color-subdued); } .chart-svg .title { fill: var(--body-text-color); }
.chart-legend { flex: 1 1 260px; font-size: 0.85em; overflow-wrap: anywhere; }
.chart-legend ul { list-style: none; padding: 0; margin: 0.3em 0 0 0; }
.chart-legend li { display: flex; align-items: baseline; gap: 0.45em; margin: 0.15em 0; }
.chart-legend .swatch { flex: 0 0 auto; width: 0.9em; height: 0.9em; border-radius: 2px; display: inline-block; }
.legend-key svg { display: inline-block; vertical-align: middle; margin: 0 0.2em 0 0.6em; }
.chart-empty { color: var(--body-text-color-subdued); padding: 1em 0; }
"""
# Seconds between refreshes of the runs table / banner (issue 4: "about every 2 s, small payloads").
POLL_SECONDS = 2.0
# A registry that lost records (Redis restarted without its data) is rebuilt from the run folders at most this often.
RESYNC_EVERY_S = 10.0


class Lab:
    """What the tabs share: settings, the run store, the queue client (lazy), the predictor cache, and `files`,
    the only way a handler opens a file a client named (ui/guard.py)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.files = ClientFiles.for_settings(settings)
        self.store = RunStore(settings.models_dir)
        self.predictors = PredictorCache(self.store, size=2, device="cpu", runtime=settings.predict_runtime)
        self._client: QueueClient | None = None
        self._lock = threading.Lock()
        self._last_check = 0.0
        self._redis_was_down = False

    def client(self) -> QueueClient:
        """The queue client; raises QueueUnavailable (with what to start) when REDIS_URL is unset."""
        with self._lock:
            if self._client is None:
                self._client = QueueClient(self.settings)
            return self._client

    def snapshot(self) -> tuple[list[dict], str | None]:
        """(run records newest first, problem). With Redis down the records come from the run folders and
        `problem` says what to start; when Redis is back (possibly empty after a restart) it is resynced."""
        try:
            client = self.client()
            records = client.list_runs()
        except QueueUnavailable as exc:
            self._redis_was_down = True
            problem = str(exc)
            if "resnet-lab up" not in problem:
                problem += " — start Redis (`resnet-lab up` starts Redis, a worker and this page together)"
            return self.disk_records(), problem
        if self._maybe_resync(client, records):
            try:
                records = client.list_runs()
            except QueueUnavailable as exc:
                return self.disk_records(), str(exc)
        return [self._reconcile(client, r) for r in records], None

    def _reconcile(self, client: QueueClient, record: dict) -> dict:
        """A queued/running record whose folder says it finished (the worker died between writing the folder
        and Redis), or a DAMAGED one whose folder was restored, takes the folder's status, in Redis too: the
        folder is the durable truth. One whose status.json is damaged shows as DAMAGED."""
        if record.get("status") not in ("queued", "running", DAMAGED):
            return record
        try:
            status = self.store.status(record["run_id"])
        except RunDamaged as exc:
            return {**record, "status": DAMAGED, "error": str(exc)}
        except RunNotFound:  # folder gone: the record is what there is (the workers' scan removes a stale one)
            return record
        if status.get("status") not in FINISHED and record.get("status") != DAMAGED:
            return record
        try:
            mirror(client.registry, status)
        except Exception as exc:  # noqa: BLE001 - shown from the folder anyway; the next tick retries
            log.warning("could not repair the registry record of %s: %s", record["run_id"], exc)
        return {**record, **status}

    def _maybe_resync(self, client: QueueClient, records: list[dict]) -> bool:
        """Rebuild missing registry records from the run folders when Redis was down or holds fewer runs than
        the disk (it lost its data); checked at most every RESYNC_EVERY_S. True when records were added."""
        now = time.monotonic()
        if not self._redis_was_down and now - self._last_check < RESYNC_EVERY_S:
            return False
        self._last_check = now
        added = 0
        if self._redis_was_down or len(records) < min(len(self.store.ids()), 500):
            try:
                added = client.resync()
            except Exception as exc:  # noqa: BLE001 - Redis may drop again mid-resync; the next tick retries
                log.warning("resync from the run folders failed: %s", exc)
                return False
            if added:
                log.info("registry rebuilt from the run folders: %d runs restored", added)
        self._redis_was_down = False
        return added > 0

    def disk_records(self) -> list[dict]:
        """Run records from the run folders (no live progress): the fallback while Redis is down."""
        out = []
        for status in self.store.list():
            run_dir = self.store.root / status["run_id"]
            record = dict(status)
            record["config"] = self.store.display_config(status["run_id"])
            if status.get("status") == "running":
                record["progress"] = {"history": read_metrics(run_dir),
                                      "epochs": record["config"].get("epochs")}
            out.append(record)
        return out

    def record(self, run_id: str) -> dict:
        """One run's record: from Redis when it answers, else from its folder."""
        try:
            return self.client().run(run_id)
        except Exception:  # noqa: BLE001 - any registry trouble: the folder is the durable truth
            status = self.store.status(run_id)
            return {**status, "config": self.store.display_config(run_id)}

    def succeeded_runs(self) -> list[dict]:
        """Finished runs with a best checkpoint, newest first (from disk: works without Redis)."""
        out = []
        for status in self.store.list():
            if status.get("status") == "succeeded" and (self.store.root / status["run_id"] / "best.pt").is_file():
                record = dict(status)
                record["config"] = self.store.display_config(status["run_id"])
                out.append(record)
        out.sort(key=lambda r: (r.get("finished") or 0.0, r["run_id"]), reverse=True)
        return out


CACHE_CLEANUP = (3600, 86400)  # (every N seconds, delete cached files older than M seconds)


def allowed_paths(settings: Settings) -> list[str]:
    """Where Gradio may take the files handlers return (it copies data-root images into its cache and serves the
    run folders in place); what its file route really serves is narrowed by `ui.guard.FilePolicy`."""
    return [str(Path(settings.models_dir).resolve())] + [str(Path(r).resolve()) for r in settings.data_roots]


def build_app(settings: Settings, lab: Lab | None = None) -> gr.Blocks:
    """The whole page. Layout first (every tab's `build`), then events (every tab's `wire`)."""
    lab = lab or Lab(settings)
    # Figures and checkpoints are served from the run folders as they are, not copied into Gradio's cache
    # (a ResNet50 best.pt is ~95 MB). This is process-wide in Gradio; the page is the only app in its process.
    gr.set_static_paths([str(Path(settings.models_dir).resolve())])
    # Uploads (every dropped photo) and outputs copied into Gradio's cache would otherwise stay on disk for good:
    # every hour, delete this page's cached files older than a day (Gradio also empties the cache at restart)
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(f"# {TITLE}\nTrain, compare and explain ResNet image classifiers — pick data, queue runs, "
                    "watch them learn, study the results, and try the model on your own images.", elem_id="title")
        banner = gr.Markdown(visible=False, elem_id="redis-banner")
        active_tab = gr.State("data")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Data", id="data", elem_id="tab-data") as tab_data:
                data_ui = data.build(lab)
            with gr.Tab("Train", id="train", elem_id="tab-train") as tab_train:
                train_ui = train.build(lab)
            with gr.Tab("Runs", id="runs", elem_id="tab-runs") as tab_runs:
                runs_ui = runs.build(lab)
            with gr.Tab("Results", id="results", elem_id="tab-results") as tab_results:
                results_ui = results.build(lab)
            with gr.Tab("Predict", id="predict", elem_id="tab-predict") as tab_predict:
                predict_ui = predict.build(lab)
        timer = gr.Timer(POLL_SECONDS)

        for tab, name in ((tab_data, "data"), (tab_train, "train"), (tab_runs, "runs"),
                          (tab_results, "results"), (tab_predict, "predict")):
            tab.select(lambda name=name: name, None, active_tab, api_visibility="private", queue=False)

        data.wire(lab, data_ui)
        train.wire(lab, train_ui, data_dir=data_ui.data_dir, tab=tab_train)
        runs.wire(lab, runs_ui, timer=timer, banner=banner, active_tab=active_tab, tab=tab_runs,
                  train_ui=train_ui, data_dir=data_ui.data_dir, tabs=tabs)
        results.wire(lab, results_ui, tab=tab_results)
        predict.wire(lab, predict_ui, timer=timer, active_tab=active_tab, tab=tab_predict)
    return demo
