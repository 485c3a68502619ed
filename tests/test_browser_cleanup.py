"""Finding and fixing bad data in the real page, in Chromium (issue 16), on the session's page and worker:

1. Results: pick a confusion cell → exactly that cell's test images (from eval.json's per-image predictions);
2. Data issues: queue the report on the worker, load it, relabel one suspect → the dataset's overrides file has
   it and the next split's hash differs from the run's;
3. Predict: "Wrong — it is X" → the photo is in the dataset's inbox under X with the same sha256.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from tests import browser as b
from tests.imagegen import make_image_folder
from tests.test_browser_e2e import _skip_without_browser
from tests.test_browser_e2e import page  # noqa: F401,F811 - the Chromium `page` fixture
from tests.tiny import train_tiny

CLASSES = ["circle", "square", "stripe"]


def sha(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def evaluated(session_page):
    """A tiny run of our own on a dataset of our own, evaluated (no figures) and listed in the registry."""
    from shared.analysis.evaluation import evaluate_run
    from shared.runs.store import RunStore

    _skip_without_browser()
    data = make_image_folder(session_page.folder("cleanup") / "shapes", classes=CLASSES, per_class=10, size=40,
                             seed=7)
    run_id = train_tiny(session_page.models, data, epochs=2)
    result = evaluate_run(session_page.models / run_id, figures="none")
    session_page.registry.sync_from_store(RunStore(session_page.models), [run_id])
    return session_page, data, run_id, result


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(240)
def test_find_fix_and_feed_back_bad_data(evaluated, page):  # noqa: F811
    from shared.data.manifest import read_manifest
    from shared.data.split import make_split

    stack, data, run_id, result = evaluated
    suffix = run_id.rsplit("-", 1)[1]
    page.goto(stack.page.url)
    b.open_tab(page, "results")
    b.pick_option(page, "#results-run", suffix)
    b.wait_text(page, "#results-metrics", "Accuracy")

    # 1. the fullest off-diagonal cell if there is one, else the fullest cell
    counts = result["confusion"]["counts"]
    cells = [(counts[t][p], t != p, t, p) for t in range(3) for p in range(3) if counts[t][p]]
    _, _, t, p = max(cells, key=lambda c: (c[1], c[0]))
    preds = result["predictions"]
    expected = {path for path, lt, lp in zip(preds["path"], preds["label"], preds["pred"]) if (lt, lp) == (t, p)}
    b.pick_option(page, "#cell-true", CLASSES[t])
    b.pick_option(page, "#cell-pred", CLASSES[p])
    page.click("#cell-btn")
    b.wait_text(page, "#cell-note", f"{len(expected)} test image(s) of {CLASSES[t]} predicted as {CLASSES[p]}")
    b.wait_until(lambda: len(b.loaded_images(page, "#cell-gallery")) == len(expected), 30,
                 "the cell's images to load", page=page, describe=lambda: b.images(page, "#cell-gallery"))
    captions = page.locator("#cell-gallery .caption-label, #cell-gallery figcaption").all_inner_texts()
    shown = {c.split(" · ")[0].strip() for c in captions}
    assert shown == expected, (shown, expected)

    # 2. data issues from the worker, then one relabel
    page.click("#issues-panel button >> nth=0")
    page.click("#issues-btn")
    b.wait_text(page, "#issues-note", "Queued")

    def report_loaded():
        page.click("#issues-load")
        return "images judged" in b.md_text(page, "#issues-note")

    b.wait_until(report_loaded, 120, "the data-issues report", page=page, interval=1,
                 describe=lambda: b.md_text(page, "#issues-note") + "\n" + stack.worker.log()[-2000:])
    report = json.loads((stack.models / run_id / "data_issues.json").read_text())
    suspect = report["rows"][0]
    b.pick_option(page, "#issue-pick", suspect["file"])
    b.wait_until(lambda: b.loaded_images(page, "#issue-cam"), 30, "the suspect's Grad-CAM", page=page)
    target = next(c for c in CLASSES if c != suspect["given"])
    b.pick_option(page, "#relabel-to", target)
    page.click("#relabel-btn")
    b.wait_text(page, "#fix-note", f"Relabelled {suspect['file']}")
    changes = json.loads((data / ".resnet-lab" / "overrides.json").read_text())["changes"]
    assert [(c["action"], c["path"], c["label"]) for c in changes] == [("relabel", suspect["file"], target)]
    assert changes[0]["sha256"] == sha(data / suspect["file"])
    assert make_split(data, seed=0)["split_hash"] != read_manifest(stack.models / run_id / "split.json")["split_hash"]
    b.wait_until(lambda: any(suspect["file"] in " ".join(r) for r in b.table_rows(page, "#changes-table")), 10,
                 "the change in the list", page=page)

    # 3. "Wrong — it is X" from Predict
    b.open_tab(page, "predict")
    b.pick_option(page, "#predict-model", suffix)
    photo = sorted((data / "circle").iterdir())[0]
    page.set_input_files("#predict-image input[type=file]", str(photo))
    b.wait_until(lambda: b.loaded_images(page, "#predict-cam"), 30, "the prediction", page=page)
    page.click("#feedback-panel button >> nth=0")
    b.pick_option(page, "#feedback-label", "stripe")
    page.click("#feedback-add")
    b.wait_text(page, "#feedback-note", "Added to the inbox")
    inbox = list((data / ".resnet-lab" / "inbox" / "stripe").iterdir())
    assert [f.name for f in inbox] == [f"{sha(photo)}.jpg"] and sha(inbox[0]) == sha(photo)
