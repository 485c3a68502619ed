"""The real page in Chromium, clicked through as a user would (issue 7).

`resnet-lab up` starts embedded Redis, a CPU worker and the page on a tiny generated dataset; Playwright drives
Debian's Chromium through the five tabs:

1. Data: pick the dataset, see its class counts;
2. Train: the weights and fine-tuning choices; the tiny model with two learning rates ("2 runs"), queue them;
   queue a third run, cancel it on Runs;
3. Runs: both runs train to success with their curves drawn, the third ends cancelled;
4. Results: open one run — confusion matrix, ROC, t-SNE and Grad-CAM images load;
5. Predict: drop an image — top classes with probabilities and the CAM overlay; drop a text file named .jpg —
   a clear error toast, and the page still answers.

Finally SIGTERM to `up`, which must exit cleanly and leave no process behind. Screenshots of every step (and of
the page at a failure, plus `up`'s log) go to tests/artifacts/e2e/, which CI keeps.

Tiny on purpose (the smallest settings the form offers): the test model tiny_resnet (tests/tinymodel.py, which
`up`'s processes load from RESNET_LAB_MODEL_PLUGINS) from scratch, 64 px, batch 16, 2 epochs on 3 classes x 12
images of 48 px, one torch thread. With resnet18 the steps from training to predicting took ~3x longer (its runs,
evaluations, and the page's ONNX export of the model it answers with).
"""

from __future__ import annotations

import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests import browser as b
from tests.imagegen import make_image_folder
from tests.tiny import TINY_MODEL

CLASSES = ["circle", "square", "stripe"]
RUN_ID = rf"\d{{8}}-\d{{6}}-{TINY_MODEL}-[0-9a-f]{{6}}"
TRAIN_TIMEOUT_S = 200  # both runs trained and evaluated (typically well under half of this)


def _skip_without_browser() -> None:
    if not Path(b.CHROMIUM).is_file():
        message = f"{b.CHROMIUM} is missing: `apt-get install -y chromium` (.ci/run installs it)"
        if os.environ.get("CI"):  # CI installs the browser, so a missing one there is a failure, not a skip
            pytest.fail(message)
        pytest.skip(message)
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install -e '.[dev]')")


@pytest.fixture
def app(tmp_path):
    _skip_without_browser()
    data_root = tmp_path / "data"
    make_image_folder(data_root / "shapes", classes=CLASSES, per_class=12, size=48)
    # a second dataset, first in the list, so that picking "shapes" is a real choice
    make_image_folder(data_root / "animals", classes=["cat", "dog"], per_class=3, size=48, seed=1)
    up = b.UpApp(tmp_path, data_root).start()
    try:
        up.wait_ready(timeout=120)
        yield up
    finally:
        if up.proc.poll() is None:  # the test failed before its own shutdown check
            up.stop(timeout=30)
        up.kill_all()
        b.ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(up.log_path, b.ARTIFACTS / "up.log")


@pytest.fixture
def page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=b.CHROMIUM, args=b.CHROMIUM_ARGS)
        try:
            context = chromium.new_context(viewport={"width": 1400, "height": 1000})
            context.set_default_timeout(20_000)
            pg = context.new_page()
            pg.js_errors = []
            pg.on("pageerror", lambda exc: pg.js_errors.append(str(exc)))
            yield pg
        finally:
            chromium.close()


@pytest.mark.browser
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_user_clicks_through_the_page(app, page, tmp_path):
    shots = b.Shots(page)
    started = time.monotonic()

    @contextmanager
    def step(name: str):
        t0 = time.monotonic()
        try:
            yield
            print(f"step '{name}': {time.monotonic() - t0:.0f} s")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # assertions, Playwright timeouts and pytest-timeout's failure alike
            shot = shots.failure(name)
            raise AssertionError(f"step '{name}' failed after {time.monotonic() - started:.0f} s: {exc}\n"
                                 f"screenshot: {shot}\nlog of `resnet-lab up` (tail):\n{app.log(3000)}") from exc

    with step("1 data"):
        page.goto(app.url)
        page.wait_for_selector("#data-dir input[role=combobox]", timeout=60_000)
        b.pick_option(page, "#data-dir", "shapes")
        b.wait_text(page, "#data-summary", "3 classes, 36 image files")
        b.wait_until(lambda: [h > 10 for h in b.vega_bar_heights(page, "#class-counts")] == [True] * 3, 20,
                     "3 visible bars in 'Images per class'", page=page,
                     describe=lambda: f"bar heights {b.vega_bar_heights(page, '#class-counts')}, "
                                      f"text {b.md_text(page, '#class-counts')!r}")
        counts_text = b.md_text(page, "#class-counts")
        assert all(name in counts_text for name in CLASSES), counts_text
        page.click("#check-btn")
        summary = b.wait_text(page, "#data-summary", "3 classes, 36 usable images", 60)
        assert str(app.data_root / "shapes") in summary, f"the folder is not shown as written: {summary!r}"
        shots.take("data")

    with step("2 train"):
        b.open_tab(page, "train")
        b.wait_text(page, "#train-dataset", "shapes")
        _set_checkboxes(page, "#models", {"resnet18"})
        page.click("#weights label:has-text('ImageNet')")
        head_only = page.locator("#finetune label", has_text="head only").locator("input")
        b.wait_until(head_only.is_enabled, 10, "Fine-tuning to open with pretrained weights", page=page)
        head_only.check()
        page.click("#weights label:has-text('None (train from scratch)')")
        # from scratch only full fine-tuning exists: chosen for the user, greyed out, and the form says why
        b.wait_text(page, "#finetune", "no pretrained layers to freeze")
        finetune = page.locator("#finetune input[type=radio]")
        assert page.locator("#finetune label", has_text="Fine-tune the whole").locator("input").is_checked()
        assert all(finetune.nth(i).is_disabled() for i in range(finetune.count()))
        # Gradio animates the fade, so read it once the transition has settled rather than mid-way
        b.wait_until(lambda: float(page.locator("#finetune label").first.evaluate(
            "l => getComputedStyle(l).opacity")) < 0.8, 5, "the disabled fine-tuning choices to fade", page=page,
            interval=0.2)
        _set_checkboxes(page, "#models", {TINY_MODEL})
        _set_checkboxes(page, "#lrs", {"1e-3", "3e-3"})
        _set_checkboxes(page, "#batch-sizes", {"16"})
        page.fill("#epochs input[type=number]", "2")
        page.press("#epochs input[type=number]", "Enter")
        b.pick_option(page, "#image-size", "64")
        b.wait_text(page, "#run-count", "2 runs will be queued")
        shots.take("train-two-runs")
        page.click("#queue-btn")
        b.wait_text(page, "#queue-result", "Queued 2 runs", 30)
        two = re.findall(RUN_ID, b.md_text(page, "#queue-result"))
        assert len(two) == 2, b.md_text(page, "#queue-result")
        # the third run: long enough that it cannot finish before it is cancelled
        _set_checkboxes(page, "#lrs", {"1e-2"})
        page.fill("#epochs input[type=number]", "30")
        page.press("#epochs input[type=number]", "Enter")
        b.wait_text(page, "#run-count", "1 run will be queued")
        page.click("#queue-btn")
        b.wait_text(page, "#queue-result", "Queued 1 run", 30)
        (third,) = re.findall(RUN_ID, b.md_text(page, "#queue-result"))
        shots.take("train-third-queued")

    with step("2 cancel the third run"):
        b.open_tab(page, "runs")
        _toggle_row(page, third, selected=True)
        page.click("#cancel-btn")
        b.wait_text(page, "#runs-message", "Cancel requested for 1 run")
        # it will never finish an epoch: the note says so rather than "Waiting for the first epoch to finish…"
        note = b.wait_text(page, "#curves-note", "was cancelled before")
        assert "Waiting" not in note and third.rsplit("-", 1)[1] in note, note
        shots.take("runs-third-cancelled")
        _toggle_row(page, third, selected=False)

    with step("3 runs train to success"):
        seen_running = set()

        def finished():
            rows = {r[0]: r for r in b.table_rows(page, "#runs-table") if r}
            for rid in two:
                if "running" in (rows.get(rid) or ["", ""])[1]:
                    if not seen_running:
                        shots.take("runs-training")
                    seen_running.add(rid)
            status = {rid: (rows.get(rid) or ["", "(missing)"])[1] for rid in [*two, third]}
            if any("failed" in s for s in status.values()):
                raise AssertionError(f"a run failed: {status}; worker log in up.log")
            return all("succeeded" in status[r] for r in two) and "cancelled" in status[third]

        b.wait_until(finished, TRAIN_TIMEOUT_S, "both runs ✔ succeeded and the third ■ cancelled", interval=1.0,
                     page=page, describe=lambda: b.table_rows(page, "#runs-table"))
        assert seen_running, "never saw a run in the ▶ running state (progress was not shown while training)"
        rows = {r[0]: r for r in b.table_rows(page, "#runs-table")}
        for rid in two:
            assert rows[rid][5] == "2" and rows[rid][2] == TINY_MODEL, rows[rid]  # epochs, model from the form
            assert "%" in rows[rid][7], f"no best val accuracy shown: {rows[rid]}"
        for rid in two:
            _toggle_row(page, rid, selected=True)
        b.wait_text(page, "#curves-note", "Curves of the 2 selected runs")
        # lines of both runs (train and val each by default) in each chart, coloured and named in the legend
        for plot in ("#curves-loss", "#curves-acc"):
            def visible(plot=plot):
                lines, legend = b.chart_series(page, plot), b.chart_legend(page, plot)
                return all(sum(rid in line["name"] and line["stroke"] not in (None, "", "none") for line in lines)
                           == 2 and any(rid in entry["text"] and not entry["cut"] for entry in legend) for rid in two)

            b.wait_until(visible, 20, f"coloured curves of both runs, named in full in the legend, in {plot}",
                         page=page, describe=lambda plot=plot: f"lines {b.chart_series(page, plot)}, "
                                                               f"legend {b.chart_legend(page, plot)}")
            # whole epochs only, each once (a numeric axis over 1..2 showed "1, 2, 2")
            assert b.chart_axis_labels(page, plot, "x") == ["1", "2"], b.chart_axis_labels(page, plot, "x")
        assert b.md_text(page, "#run-detail").count("best val accuracy") == 2, b.md_text(page, "#run-detail")
        shots.take("runs-done")

    with step("4 results"):
        b.open_tab(page, "results")
        b.pick_option(page, "#results-run", two[0].rsplit("-", 1)[1])
        b.wait_until(lambda: "Evaluated on the" in b.md_text(page, "#results-metrics"), 30,
                     "the evaluation summary of the run", page=page,
                     describe=lambda: b.md_text(page, "#results-metrics"))
        page.wait_for_selector("#results-body", state="visible")
        confusion = page.locator("#confusion table.confusion")
        confusion.wait_for()
        assert all(name in confusion.inner_text() for name in CLASSES), confusion.inner_text()
        assert confusion.locator("tbody tr").count() == 3
        # no blank cells in the per-class table: an undefined score is a dash, and the note under it says why
        per_class = b.table_rows(page, "#per-class")
        assert len(per_class) == 3 and all(cell for row in per_class for cell in row), per_class
        if any(row[1] == "—" for row in per_class):  # a class the tiny model never predicted
            assert "never predicted" in b.md_text(page, "#per-class-note"), b.md_text(page, "#per-class-note")
        b.wait_until(lambda: b.vega_marks(page, "#roc", "line") >= 1, 20, "ROC curves drawn", page=page)
        for plot in ("#roc", "#pr"):  # every curve named in full, the averages included
            legend = b.vega_legend(page, plot)
            assert any(label.startswith("micro avg") for label in legend), legend
            assert not b.vega_legend_cut(page, plot), f"legend labels cut: {b.vega_legend_cut(page, plot)} of {legend}"
        assert any(label.startswith("macro avg") for label in b.vega_legend(page, "#roc")), b.vega_legend(page, "#roc")
        b.wait_until(lambda: b.vega_marks(page, "#tsne", "symbol") >= 3, 20, "t-SNE points drawn", page=page,
                     describe=lambda: f"{b.vega_marks(page, '#tsne', 'symbol')} points")
        page.locator("#cam-gallery").scroll_into_view_if_needed()
        b.wait_until(lambda: b.loaded_images(page, "#cam-gallery"), 20, "a Grad-CAM image to load", page=page,
                     describe=lambda: b.images(page, "#cam-gallery"))
        for gallery in ("#cam-gallery", "#toploss-gallery"):  # each figure whole: not cut, not under the label
            assert not b.clipped_images(page, gallery), f"{gallery} figure cut: {b.clipped_images(page, gallery)}"
            assert not b.covered_images(page, gallery), f"{gallery} figure under its label: " \
                                                        f"{b.covered_images(page, gallery)}"
        broken = b.broken_images(page, "#tab-results")
        assert not broken, f"broken images on Results: {broken}"
        shots.take("results")

    with step("5 predict"):
        b.open_tab(page, "predict")
        b.wait_text(page, "#predict-model-info", "Now answering with")
        calls = b.record_event_calls(page)
        good = sorted((app.data_root / "shapes" / "square").iterdir())[0]
        page.set_input_files("#predict-image input[type=file]", str(good))
        _wait_prediction(page)
        shots.take("predict")

        notes = tmp_path / "notes.jpg"
        notes.write_text("this is not a picture\n" * 10)
        page.set_input_files("#predict-image input[type=file]", str(notes))  # dropped over the first image
        b.wait_until(lambda: b.toasts(page), 30, "an error toast for the text file", page=page)
        page.wait_for_timeout(1500)  # time for a second (duplicate) call to answer
        errors = b.toasts(page)
        assert len(errors) == 1, f"one bad file, one toast (Gradio's `change` fires twice over an image): {errors}"
        assert sum("notes.jpg" in c for c in calls) == 1, "the text file was sent to a handler more than once"
        assert any("notes.jpg: not an image" in t and "contains text" in t for t in errors), errors
        assert not any("Traceback" in t or "Error:" in t for t in errors), errors
        # the previous image's answer is gone: no classes, no CAM, no "answered by" next to the bad file
        label = b.md_text(page, "#predict-label")
        assert "Error" in label and not any(name in label for name in CLASSES), f"old answer still shown: {label!r}"
        assert not b.loaded_images(page, "#predict-cam"), "the previous image's Grad-CAM still shows"
        assert "Answered by" not in b.md_text(page, "#predict-info"), b.md_text(page, "#predict-info")
        shots.take("predict-text-file")
        # no crash: the same page still answers for a real image
        page.set_input_files("#predict-image input[type=file]", str(good))
        _wait_prediction(page)
        page.wait_for_timeout(1000)
        assert sum(good.name in c for c in calls) == 2, "an image dropped over another was predicted more than once"
        assert not page.js_errors, f"uncaught errors in the page: {page.js_errors}"

    with step("stop"):
        assert app.proc.poll() is None, f"`resnet-lab up` died during the test:\n{app.log()}"
        code = app.stop(timeout=60)
        assert code == 0, f"`resnet-lab up` exited with {code} on SIGTERM:\n{app.log()}"
        b.wait_until(lambda: not app.leftovers(), 10, "every process started by `up` to exit",
                     describe=lambda: "\n".join(app.leftovers()))
        assert "Traceback" not in app.log(0), f"a traceback in the app's output:\n{app.log()}"
    print(f"browser e2e: {time.monotonic() - started:.0f} s, screenshots in {b.ARTIFACTS}")


# --- page actions -------------------------------------------------------------------------------------------

def _set_checkboxes(page, group: str, wanted: set[str]) -> None:
    """Tick exactly the options of a CheckboxGroup whose labels are in `wanted`."""
    labels = page.locator(f"{group} label")
    names = [t.strip() for t in labels.all_inner_texts()]
    missing = wanted - set(names)
    assert not missing, f"{group} offers {names}, not {sorted(missing)}"
    for i, name in enumerate(names):
        box = labels.nth(i).locator("input[type=checkbox]")
        if box.is_checked() != (name in wanted):
            box.click()
    for i, name in enumerate(names):
        assert labels.nth(i).locator("input[type=checkbox]").is_checked() == (name in wanted), (group, name)


def _toggle_row(page, run_id: str, *, selected: bool) -> None:
    """Click a run's row in the Runs table until the selector shows it (de)selected; the table refreshes itself."""
    suffix = run_id.rsplit("-", 1)[1]

    def chosen() -> bool:
        return suffix in b.md_text(page, "#runs-select")

    def attempt() -> bool:
        if chosen() == selected:
            return True
        b.table_cell(page, "#runs-table", run_id).click()
        try:  # a click during a table refresh can miss: then click again
            b.wait_until(lambda: chosen() == selected, 3, "the row's run (de)selected", interval=0.2, page=page)
        except AssertionError:
            return False
        return True

    b.wait_until(attempt, 30, f"run {run_id} {'selected' if selected else 'deselected'} by clicking its row",
                 interval=0.5, page=page, describe=lambda: b.md_text(page, "#runs-select"))


def _wait_prediction(page) -> None:
    """Top classes with percentages in the label, a 'which run answered' line and the Grad-CAM overlay loaded."""
    def answered():  # ("Error" is the badge Gradio leaves on the outputs of a failed call)
        text = b.md_text(page, "#predict-label")
        return (all(name in text for name in CLASSES) and len(re.findall(r"\d+(?:\.\d+)?\s?%", text)) >= 3
                and "Error" not in text + b.md_text(page, "#predict-cam"))

    b.wait_until(answered, 30, "the top classes with probabilities", page=page,
                 describe=lambda: b.md_text(page, "#predict-label"))
    answer = b.wait_text(page, "#predict-info", "Answered by")
    # the answer line above it: the class, or "Not sure — closest: …" below the run's calibrated threshold
    b.wait_until(lambda: re.search(r"\d%", b.md_text(page, "#predict-verdict")), 20, "the answer line", page=page,
                 describe=lambda: b.md_text(page, "#predict-verdict"))
    # the model line above names the same run (it follows the answer, not the last poll of the runs)
    suffix = re.search(r"\d{8}-\d{6}-\w+-([0-9a-f]{6})", answer).group(1)
    b.wait_text(page, "#predict-model-info", f"Now answering with {suffix} ")
    b.wait_until(lambda: b.loaded_images(page, "#predict-cam"), 20, "the Grad-CAM overlay to load", page=page,
                 describe=lambda: b.images(page, "#predict-cam"))
