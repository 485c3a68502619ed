"""Comparing runs (issue 18): tags/note/baseline in the run folder, the "best finished run" rule, the comparison
table, the CSV export, and the Runs tab's own charts — real run folders in tmp_path, no processes."""

from __future__ import annotations

import csv
import json

import pytest

from shared.runs import compare
from shared.runs.annotations import AnnotationError
from shared.runs.store import RunStore
from shared.training.config import TrainConfig
from ui import charts, runs_view


def _run(store: RunStore, data_dir, *, acc=None, classes=("a", "b"), finished=None, checkpoint=True, **config):
    """A run folder as `fit` leaves it: config.json with its classes, succeeded with `acc`, a best.pt."""
    run_id = store.create(TrainConfig(data_dir=str(data_dir), weights="none", **config))
    record = store.config_record(run_id) | {"classes": list(classes)}
    (store.path(run_id) / "config.json").write_text(json.dumps(record))
    if acc is not None:
        store.set_status(run_id, "running")
        store.set_status(run_id, "succeeded", best={"best_val_acc": acc, "best_epoch": 1})
        if finished is not None:  # a chosen finish time (set_status stamps now)
            status = json.loads((store.path(run_id) / "status.json").read_text()) | {"finished": finished}
            (store.path(run_id) / "status.json").write_text(json.dumps(status))
        if checkpoint:
            (store.path(run_id) / "best.pt").write_bytes(b"x")
    return run_id


def test_tags_and_note_live_in_the_run_folder_and_hostile_values_are_refused(tmp_path):
    store = RunStore(tmp_path / "models")
    run_id = _run(store, tmp_path / "data")
    store.annotate(run_id, tags="lr-sweep, keep  lr-sweep v1.2", note="first try\nwith cosine")
    again = RunStore(tmp_path / "models")  # a restarted page reads the folder afresh
    assert again.annotations(run_id).tags == ("lr-sweep", "keep", "v1.2")
    assert again.annotations(run_id).note == "first try\nwith cosine"
    for tags in ("<script>", "a/b", "x" * 33, ",".join(f"t{i}" for i in range(13)), "=cmd|' /C calc'!A0"):
        with pytest.raises(AnnotationError, match="tag|tags"):
            store.annotate(run_id, tags=tags)
    for note in ("x" * 1001, "bell\x07", "rtl\u202eevil"):
        with pytest.raises(AnnotationError, match="note"):
            store.annotate(run_id, note=note)
    assert again.annotations(run_id).tags == ("lr-sweep", "keep", "v1.2")  # refused values changed nothing
    # a hand-damaged file hides nothing: the run reads as un-annotated, the next save replaces it
    (store.path(run_id) / "annotations.json").write_text('{"schema_version": 1, "tags": ["../x"]}')
    assert store.annotations(run_id).tags == ()


def test_one_baseline_at_a_time(tmp_path):
    store = RunStore(tmp_path / "models")
    first, second = _run(store, tmp_path / "d"), _run(store, tmp_path / "d")
    store.annotate(first, tags="keep")
    store.set_baseline(first)
    assert store.baseline() == first
    store.set_baseline(second)
    assert store.baseline() == second and not store.annotations(first).baseline
    assert store.annotations(first).tags == ("keep",)  # pinning keeps the tags
    store.set_baseline(None)
    assert store.baseline() is None


def test_best_succeeded_is_the_highest_validation_run_on_the_latest_runs_data_and_classes(tmp_path):
    store = RunStore(tmp_path / "models")
    data, other = tmp_path / "flowers", tmp_path / "shapes"
    assert store.best_succeeded() is None
    good = _run(store, data, acc=0.43, finished=100.0)
    _run(store, data, acc=0.90, finished=150.0, classes=("a", "b", "c"))  # other classes: not comparable
    _run(store, other, acc=0.99, finished=160.0)  # other data: not comparable
    _run(store, data, acc=0.95, finished=170.0, checkpoint=False)  # no model to answer with
    latest = _run(store, data, acc=0.23, finished=200.0)
    choice = store.best_succeeded()
    assert store.latest_succeeded() == latest
    assert (choice.run_id, choice.val_acc, choice.pool, choice.latest) == (good, 0.43, 2, latest)
    tie = _run(store, data, acc=0.43, finished=300.0)  # a tie goes to the newer run
    assert store.best_succeeded().run_id == tie


def _record(run_id, acc, **config):
    return {"run_id": run_id, "status": "succeeded", "started": 10.0, "finished": 70.0,
            "best": {"best_val_acc": acc, "best_epoch": 2, "images_per_s": 123.456},
            "config": {"data_dir": "/d/shapes", "model": "tiny_resnet", "lr": 1e-3, "batch_size": 8, "epochs": 2,
                       "seed": 0, "classes": ["a", "b"], **config}}


def test_comparison_shows_only_the_differing_settings_and_marks_the_best():
    runs = [_record(f"r{i}-{lr}-{bs}", 0.3 + i / 10, lr=lr, batch_size=bs, model=("a", "b")[i % 2])
            for i, (lr, bs) in enumerate((lr, bs) for lr in (1e-3, 3e-3, 1e-2) for bs in (8, 16))]
    columns, rows = compare.comparison(runs, {"r0-0.001-8": (0.5, 0.4)}, baseline="r1-0.001-16")
    assert columns == ["run", "mark", "model", "batch size", "lr", *compare.METRIC_COLUMNS]  # TrainConfig's order
    by_run = {row[0]: dict(zip(columns, row)) for row in rows}
    assert by_run["r5-0.01-16"]["mark"] == compare.BEST_MARK
    assert by_run["r1-0.001-16"]["mark"] == compare.BASELINE_MARK
    assert by_run["r0-0.001-8"]["test acc"] == 0.5 and by_run["r0-0.001-8"]["test macro F1"] == 0.4
    assert by_run["r0-0.001-8"]["time (s)"] == 60.0 and by_run["r0-0.001-8"]["images/s"] == 123.5
    assert compare.differing_settings(runs[:1]) == []
    assert compare.differing_settings(runs) == ["batch_size", "lr"]  # the model has its own column, once


def test_runs_csv_keeps_formulas_as_text(tmp_path):
    record = _record("r1", 0.5)
    path = compare.write_runs_csv([compare.csv_row(record, (0.4, None), ["=HYPERLINK"], "@note", True)],
                                  tmp_path / "runs.csv")
    header, row = list(csv.reader(path.open()))
    assert header == compare.CSV_COLUMNS
    cells = dict(zip(header, row))
    assert cells["tags"] == "'=HYPERLINK" and cells["note"] == "'@note" and cells["test_acc"] == "0.4"
    assert cells["best_val_acc"] == "0.5" and cells["baseline"] == "True" and cells["test_macro_f1"] == ""


def test_curves_name_every_run_in_full_with_stable_colours_and_one_epoch_visible():
    records = [_record(f"20260101-000000-tiny_resnet-{i:06x}", 0.5, lr=10 ** -i) for i in range(1, 13)]
    one_epoch = [{"epoch": 1, "train_loss": 1.0, "val_loss": 1.2, "train_acc": 0.4, "val_acc": 0.3}]
    loss, acc, legend = runs_view.curve_series([(r, one_epoch) for r in records])
    assert len(loss) == len(acc) == 24 and len(legend) == 12
    svg = charts.line_chart(acc, y_title="accuracy", y_lim=(0, 1))
    for r in records:  # each run's two series named in full, each with a visible marker for its single epoch
        label = runs_view.full_label(r)
        assert svg.count(f'data-series="{label} · val"') == 1 and svg.count(f'data-series="{label} · train"') == 1
    assert svg.count('class="point"') == 24 and svg.count('stroke-dasharray') == 12  # training dashed
    colours = charts.run_colours(r["run_id"] for r in records)
    assert len(set(colours.values())) == 12
    # the same run keeps its colour in another selection and another chart
    again = charts.run_colours([records[3]["run_id"], records[0]["run_id"]])
    assert charts.run_colours([records[3]["run_id"]])[records[3]["run_id"]] == again[records[3]["run_id"]]
    html = charts.legend_html(legend)
    assert all(runs_view.full_label(r) in html for r in records) and "…" not in html
    assert charts.tick_label(0.25, 0.25) == "0.25" and charts.tick_label(2.0, 1.0) == "2"


def test_predict_resolves_best_and_says_why(tmp_path):
    from shared.analysis.predict import resolve_run
    from ui.predict_view import best_reason

    store = RunStore(tmp_path / "models")
    best = _run(store, tmp_path / "flowers", acc=0.43, finished=100.0)
    latest = _run(store, tmp_path / "flowers", acc=0.23, finished=200.0)
    assert resolve_run(store, "latest") == latest and resolve_run(store, "best") == best
    why = best_reason(store.best_succeeded(), best)
    assert "highest validation accuracy of the 2 finished runs on **flowers**" in why
    assert "when the request came in" in best_reason(store.best_succeeded(), latest)  # it changed meanwhile


def test_filter_by_tag_dataset_model_status():
    record = _record("r1", 0.5)
    assert compare.matches(record, ("grid",), tag="grid", dataset="shapes", model="tiny_resnet", status="succeeded")
    assert compare.matches(record, (), tag="", dataset="", model="", status="")
    for criterion in ({"tag": "other"}, {"dataset": "flowers"}, {"model": "resnet18"}, {"status": "running"}):
        assert not compare.matches(record, ("grid",), **criterion), criterion


def test_sweep_view_one_mark_per_run_coloured_by_model_on_log_axes(tmp_path):
    from types import SimpleNamespace

    from ui import runs_data

    runs = [_record(f"r-{lr}-{bs}-{m}", 0.3 + lr * 10, lr=lr, batch_size=bs, model=m)
            for lr in (1e-3, 3e-3, 1e-2) for bs in (8, 16) for m in ("tiny_resnet", "resnet18")]
    lab = SimpleNamespace(store=SimpleNamespace(root=tmp_path))
    html = runs_data.sweep_html(runs_data.look(lab, runs, "", "", "", ""), [])
    lr_svg, bs_svg = html.split("</svg>")[:2]
    assert lr_svg.count('class="mark"') == bs_svg.count('class="mark"') == 12
    ticks = [t.split(">")[-1] for t in lr_svg.split("</text>") if 'class="tick"' in t]
    assert {"1e-3", "3e-3", "1e-2"} <= set(ticks)
    assert {"8", "16"} <= {t.split(">")[-1] for t in bs_svg.split("</text>") if 'class="tick"' in t}
    fills = {t.split('fill="')[1][:7] for t in lr_svg.split('<g class="mark"')[1:]}
    assert len(fills) == 2  # one colour per model, never shared (their names may hash alike)
    assert "tiny_resnet" in html and "resnet18" in html  # the legend names the models
