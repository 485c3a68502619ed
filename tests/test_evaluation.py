"""Evaluation: our numbers against scikit-learn on the same arrays, ECE by hand, and evaluate_run on a tiny run;
its eval.json against the schema (shared/analysis/eval_result.py) and every reader of it (Results tab, report, API)."""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from shared.analysis.evaluation import eval_dir_for, evaluate_run
from shared.analysis.metrics import calibration, compute_metrics
from tests.tiny import TINY_MODEL


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def random_probs(n: int, c: int, seed: int = 0, signal: float = 1.5, absent: int | None = None):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, c, n)
    if absent is not None:
        y[y == absent] = (absent + 1) % c
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), y] += signal
    p = np.exp(logits)
    return y, p / p.sum(1, keepdims=True)


def strict_json(obj) -> dict:
    return json.loads(json.dumps(obj, allow_nan=False))


def onehot(y, c):
    return np.eye(c, dtype=int)[y]


# --- metrics against scikit-learn --------------------------------------------------------------------------------

def test_metrics_equal_scikit_learn():
    c = 7
    y, p = random_probs(120, c, seed=1)
    classes = [f"c{k}" for k in range(c)]
    m = strict_json(compute_metrics(y, p, classes))
    pred = p.argmax(1)

    assert m["accuracy"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-6)
    assert m["top_k"] == 5
    assert m["top_k_accuracy"] == pytest.approx(skm.top_k_accuracy_score(y, p, k=5, labels=range(c)))
    assert m["top_k_accuracy"] > m["accuracy"]
    assert m["loss"] == pytest.approx(skm.log_loss(y, p, labels=range(c)), abs=1e-5)
    pr, rc, f1, sup = skm.precision_recall_fscore_support(y, pred, labels=range(c), zero_division=0)
    for k, row in enumerate(m["per_class"]):
        assert row["class"] == classes[k]
        assert (row["precision"], row["recall"], row["f1"], row["support"]) == pytest.approx(
            (pr[k], rc[k], f1[k], sup[k]), abs=1e-6)
    for avg in ("macro", "weighted"):
        want = skm.precision_recall_fscore_support(y, pred, average=avg, zero_division=0)[:3]
        assert [m[avg][k] for k in ("precision", "recall", "f1")] == pytest.approx(want, abs=1e-6)
    assert m["confusion"]["counts"] == skm.confusion_matrix(y, pred).tolist()
    want_norm = skm.confusion_matrix(y, pred, normalize="true")
    assert np.allclose(m["confusion"]["normalized"], want_norm, atol=1e-4)

    for k, name in enumerate(classes):
        assert m["roc"]["per_class"][name]["auc"] == pytest.approx(skm.roc_auc_score(y == k, p[:, k]), abs=1e-6)
        fpr, tpr, _ = skm.roc_curve(y == k, p[:, k])
        assert np.allclose(m["roc"]["per_class"][name]["fpr"], fpr, atol=1e-4)  # short curves are kept whole
        assert np.allclose(m["roc"]["per_class"][name]["tpr"], tpr, atol=1e-4)
        assert m["pr"]["per_class"][name]["ap"] == pytest.approx(skm.average_precision_score(y == k, p[:, k]),
                                                                 abs=1e-6)
    assert m["roc"]["micro"]["auc"] == pytest.approx(skm.roc_auc_score(onehot(y, c), p, average="micro"), abs=1e-6)
    assert m["roc"]["macro"]["auc"] == pytest.approx(
        skm.roc_auc_score(y, p, multi_class="ovr", average="macro"), abs=1e-6)
    assert m["pr"]["micro"]["ap"] == pytest.approx(
        skm.average_precision_score(onehot(y, c), p, average="micro"), abs=1e-6)
    assert m["notes"] == []


def test_curves_are_downsampled_but_auc_uses_every_point():
    y, p = random_probs(3000, 3, seed=2, signal=0.8)
    m = strict_json(compute_metrics(y, p, ["a", "b", "c"]))
    curve = m["roc"]["per_class"]["a"]
    assert len(curve["fpr"]) <= 200 and len(curve["fpr"]) == len(curve["tpr"])
    assert curve["fpr"][0] == 0 and curve["fpr"][-1] == 1 and curve["tpr"][-1] == 1
    assert curve["auc"] == pytest.approx(skm.roc_auc_score(y == 0, p[:, 0]), abs=1e-6)
    assert len(m["pr"]["micro"]["precision"]) <= 200
    assert len(json.dumps(m)) < 60_000


def test_a_class_absent_from_the_set_is_skipped_not_nan():
    c = 4
    y, p = random_probs(80, c, seed=3, absent=2)
    classes = ["w", "x", "y", "z"]
    m = compute_metrics(y, p, classes)
    text = json.dumps(m, allow_nan=False)  # strict JSON: no NaN anywhere
    assert "NaN" not in text
    pred = p.argmax(1)
    row = m["per_class"][2]
    assert row["support"] == 0 and row["recall"] is None  # undefined, not 0 and not NaN
    f1 = skm.f1_score(y, pred, labels=[2], average=None, zero_division=np.nan)[0]
    assert row["f1"] == (None if np.isnan(f1) else pytest.approx(f1))
    assert "y" not in m["roc"]["per_class"] and "y" not in m["pr"]["per_class"]
    assert any("y" in note for note in m["notes"])
    with warnings.catch_warnings():  # "y_pred contains classes not in y_true", when it does
        warnings.simplefilter("ignore")
        assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred), abs=1e-6)
    # averages: scikit-learn's default (classes present in y_true or y_pred)
    want = skm.precision_recall_fscore_support(y, pred, average="macro", zero_division=0)[:3]
    assert [m["macro"][k] for k in ("precision", "recall", "f1")] == pytest.approx(want, abs=1e-6)
    present = [0, 1, 3]
    assert m["roc"]["macro"]["auc"] == pytest.approx(
        skm.roc_auc_score(onehot(y, c)[:, present], p[:, present], average="macro"), abs=1e-6)
    assert m["roc"]["micro"]["auc"] == pytest.approx(skm.roc_auc_score(onehot(y, c), p, average="micro"), abs=1e-6)
    assert m["confusion"]["normalized"][2] == [0.0, 0.0, 0.0, 0.0]


def test_two_classes():
    y, p = random_probs(50, 2, seed=4)
    m = strict_json(compute_metrics(y, p, ["cat", "dog"]))
    assert m["top_k"] == 2 and m["top_k_accuracy"] == 1.0
    assert m["roc"]["per_class"]["dog"]["auc"] == pytest.approx(skm.roc_auc_score(y, p[:, 1]), abs=1e-6)
    assert m["roc"]["per_class"]["cat"]["auc"] == pytest.approx(m["roc"]["per_class"]["dog"]["auc"], abs=1e-6)
    assert m["per_class"][1]["f1"] == pytest.approx(skm.f1_score(y, p.argmax(1)), abs=1e-6)


def test_a_single_sample():
    m = strict_json(compute_metrics([1], np.array([[0.2, 0.7, 0.1]]), ["a", "b", "c"]))
    assert m["n"] == 1 and m["accuracy"] == 1.0
    assert m["roc"]["per_class"] == {} and m["roc"]["macro"] is None
    assert m["roc"]["micro"]["auc"] == 1.0
    assert m["calibration"]["ece"] == pytest.approx(0.3)


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="shape"):
        compute_metrics([0, 1], np.ones((3, 2)) / 2, ["a", "b"])
    with pytest.raises(ValueError, match="labels"):
        compute_metrics([0, 5], np.ones((2, 2)) / 2, ["a", "b"])


def test_confused_pairs_list_images_most_confident_first():
    y = np.array([0, 0, 0, 1, 1, 2])
    p = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.1, 0.6, 0.3], [0.7, 0.3, 0.0], [0.1, 0.9, 0.0],
                  [0.0, 0.1, 0.9]])
    m = compute_metrics(y, p, ["a", "b", "c"], paths=["p0", "p1", "p2", "p3", "p4", "p5"])
    assert m["confused_pairs"] == [{"true": "a", "pred": "b", "count": 2, "images": ["p1", "p2"]},
                                   {"true": "b", "pred": "a", "count": 1, "images": ["p3"]}]


# --- calibration -------------------------------------------------------------------------------------------------

def test_ece_by_hand():
    # 10 bins. Confidences 0.9, 0.9 (one right, one wrong) -> bin (0.8, 0.9]: acc 0.5, conf 0.9, gap 0.4.
    # 0.6, 0.6 (both right; 0.6 sits on an edge: right-closed, so bin (0.5, 0.6]) -> gap 0.4.
    # 0.75 (wrong) -> bin (0.7, 0.8]: acc 0, gap 0.75.  ECE = 2/5*0.4 + 2/5*0.4 + 1/5*0.75 = 0.47.
    p = np.array([[0.9, 0.1], [0.1, 0.9], [0.6, 0.4], [0.4, 0.6], [0.75, 0.25]])
    y = np.array([0, 0, 0, 1, 1])
    cal = calibration(y, p, n_bins=10)
    assert cal["ece"] == pytest.approx(0.47)
    counts = [b["count"] for b in cal["bins"]]
    assert counts == [0, 0, 0, 0, 0, 2, 0, 1, 2, 0]
    assert cal["bins"][8]["accuracy"] == 0.5 and cal["bins"][8]["confidence"] == pytest.approx(0.9)
    assert cal["bins"][0]["accuracy"] is None
    json.dumps(cal, allow_nan=False)


def test_perfectly_calibrated_predictions_have_zero_ece():
    p = np.array([[1.0, 0.0]] * 4 + [[0.0, 1.0]] * 4)
    assert calibration(np.array([0] * 4 + [1] * 4), p)["ece"] == 0.0


# --- evaluate_run on a tiny trained run --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A real run folder made by shared.training.engine.fit: 3 generated classes at 48 px, a few epochs on one thread."""
    from shared.training.config import TrainConfig
    from shared.training.engine import fit
    from shared.runs.store import RunStore
    from tests.imagegen import make_image_folder

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tmp_path_factory.mktemp("evalrun")
        data = make_image_folder(base / "shapes", classes=3, per_class=20, size=56)
        config = TrainConfig(data_dir=str(data), model=TINY_MODEL, weights="none", image_size=48, epochs=3, batch_size=8,
                             lr=3e-3,
                             warmup_epochs=0)
        store = RunStore(base / "models")
        run_dir = store.path(store.create(config))
        fit(config, run_dir, cache_dir=base / "cache")
        yield run_dir, data
    finally:
        torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def evaluated(tiny_run):
    """The tiny run evaluated once with every figure, for the tests that read it: (result, progress calls, the
    matplotlib figures left open right after)."""
    import matplotlib.pyplot as plt

    run_dir, _ = tiny_run
    calls = []
    result = evaluate_run(run_dir, progress=lambda done, total: calls.append((done, total)))
    return result, calls, plt.get_fignums()


EXPECTED_FIGURES = {"curves", "confusion", "confusion_normalized", "roc", "pr", "reliability", "tsne",
                    "class_counts", "cam_samples", "top_losses", "class_samples", "activations"}


def test_evaluate_run_writes_eval_json_and_every_figure(tiny_run, evaluated):
    run_dir, _ = tiny_run
    result, calls, left_open = evaluated

    saved = json.loads((run_dir / "eval" / "eval.json").read_text(), parse_constant=_no_constants)
    assert saved == strict_json(result)
    for key in ("run_id", "split", "n", "classes", "accuracy", "top_k", "top_k_accuracy", "per_class", "macro",
                "weighted", "confusion", "confused_pairs", "roc", "pr", "calibration", "tsne", "figures", "skipped"):
        assert key in result, key
    assert result["run_id"] == run_dir.name and result["split"] == "test"
    assert result["n"] == sum(row["support"] for row in result["per_class"]) > 0
    assert len(result["tsne"]["x"]) == result["n"] == len(result["tsne"]["path"])
    assert EXPECTED_FIGURES <= set(result["figures"])
    for name, rel in result["figures"].items():
        path = run_dir / rel
        assert path.parent == run_dir / "eval", rel
        with Image.open(path) as img:
            img.load()
            assert img.width > 300 and img.height > 200, name
        assert path.stat().st_size > 8_000, name
    assert calls[-1][0] == calls[-1][1] and len(calls) >= 4
    assert left_open == []


def _no_constants(name):
    raise AssertionError(f"eval.json contains {name}")


def test_evaluate_another_split_and_another_folder(tiny_run, tmp_path):
    from tests.imagegen import make_image_folder, write_corrupt

    run_dir, _ = tiny_run
    val = evaluate_run(run_dir, split="val", figures="none")  # figures: the tests above and below
    assert val["split"] == "val" and (eval_dir_for(run_dir, "val") / "eval.json").is_file()
    assert eval_dir_for(run_dir, "val").name == "eval-val"

    # a folder with a subset of the classes, plus one broken file: evaluated, the broken file listed
    other = make_image_folder(tmp_path / "more", classes=["class_0", "class_2"], per_class=4, size=56, seed=5)
    write_corrupt(other / "class_2" / "broken.jpg", "truncated")
    result = evaluate_run(run_dir, data_dir=other, figures="none")
    assert result["n"] == 8 and [s["path"] for s in result["skipped"]] == ["class_2/broken.jpg"]
    assert result["per_class"][1]["support"] == 0 and result["per_class"][1]["recall"] is None
    assert (run_dir / "eval-folder-more" / "eval.json").is_file()
    json.loads((run_dir / "eval-folder-more" / "eval.json").read_text(), parse_constant=_no_constants)


def test_a_folder_with_unknown_classes_is_refused(tiny_run, tmp_path):
    from tests.imagegen import make_image_folder

    run_dir, _ = tiny_run
    other = make_image_folder(tmp_path / "zoo", classes=["class_0", "zebra"], per_class=2, size=56)
    with pytest.raises(ValueError, match="zebra"):
        evaluate_run(run_dir, data_dir=other)


def test_an_empty_split_is_refused_with_the_splits_that_have_images(tiny_run):
    run_dir, _ = tiny_run
    with pytest.raises(ValueError, match="no images"):
        evaluate_run(run_dir, split="nonexistent")


# --- figure levels -----------------------------------------------------------------------------------------------

def test_basic_and_no_figures_skip_the_costly_work_and_say_so(tiny_run, tmp_path):
    from shared.analysis.eval_result import CHART_FIGURES, COSTLY_FIGURES, load_eval_result
    from tests.imagegen import make_image_folder

    run_dir, _ = tiny_run
    basic = evaluate_run(run_dir, split="train", figures="basic")
    assert set(basic["figures"]) == set(CHART_FIGURES) and basic["tsne"] is None
    assert basic["figure_level"] == "basic" and basic["skipped_figures"] == list(COSTLY_FIGURES)
    assert basic["timings"]["cam_s"] == 0 and basic["timings"]["tsne_s"] < 0.5
    saved = load_eval_result(run_dir, "eval-train")
    assert saved.figure_level == "basic" and saved.tsne is None and saved.macro_f1 == basic["macro"]["f1"]
    for rel in basic["figures"].values():
        assert (run_dir / rel).is_file()

    other = make_image_folder(tmp_path / "plain", classes=["class_0", "class_1"], per_class=3, size=56, seed=7)
    none = evaluate_run(run_dir, data_dir=other, figures="none")
    assert none["figures"] == {} and none["figure_level"] == "none"
    assert set(none["skipped_figures"]) == set(CHART_FIGURES) | set(COSTLY_FIGURES)
    assert [p.name for p in (run_dir / "eval-folder-plain").iterdir()] == ["eval.json"]
    assert none["accuracy"] is not None and len(none["per_class"]) == 3

    with pytest.raises(ValueError, match="figures must be one of all, basic, none, got 'some'"):
        evaluate_run(run_dir, figures="some")


def test_the_eval_figures_setting_comes_from_the_environment():
    from shared.settings import Settings

    assert Settings.from_env({}).eval_figures == "all"
    assert Settings.from_env({"RESNET_LAB_EVAL_FIGURES": "basic"}).eval_figures == "basic"
    with pytest.raises(ValueError, match="RESNET_LAB_EVAL_FIGURES must be one of all, basic, none, got 'fast'"):
        Settings.from_env({"RESNET_LAB_EVAL_FIGURES": "fast"})


# --- the eval.json contract: a real file, every reader ------------------------------------------------------------

def missing_and_unknown(data, tp, where: str = "eval.json") -> list[str]:
    """Schema fields (of dataclass type `tp`, recursively) absent from `data`, and keys in `data` no field declares."""
    import dataclasses
    import types
    import typing

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return missing_and_unknown(data, args[0], where)
    if origin in (typing.Union, types.UnionType):
        if data is None:
            return []
        return missing_and_unknown(data, next(a for a in args if a is not type(None)), where)
    if origin is list:
        return [p for i, item in enumerate(data) for p in missing_and_unknown(item, args[0], f"{where}[{i}]")]
    if origin is dict:
        return [p for k, v in data.items() for p in missing_and_unknown(v, args[1], f"{where}.{k}")]
    if not dataclasses.is_dataclass(tp):
        return []
    hints = typing.get_type_hints(tp, include_extras=True)
    problems, keys = [], set()
    for f in dataclasses.fields(tp):
        meta = typing.get_args(hints[f.name])[1:] if typing.get_origin(hints[f.name]) is typing.Annotated else ()
        key = next((m.alias for m in meta if getattr(m, "alias", None)), f.name)
        keys.add(key)
        if key not in data:
            problems.append(f"{where}.{key} missing")
        else:
            problems += missing_and_unknown(data[key], hints[f.name], f"{where}.{key}")
    problems += [f"{where}.{k} not in the schema" for k in set(data) - keys]
    return problems


@pytest.fixture(scope="module")
def results_page(tiny_run):
    """The Results tab built for the tiny run's models folder (no server: its handlers are called directly)."""
    from types import SimpleNamespace

    import gradio as gr

    from shared.runs.store import RunStore
    from ui.tabs import results

    run_dir, _ = tiny_run
    lab = SimpleNamespace(store=RunStore(run_dir.parent), succeeded_runs=lambda: [])
    with gr.Blocks():
        ui = results.build(lab)
    return lab, ui


def test_every_field_the_page_report_and_api_read_is_in_a_real_eval_json(tiny_run, evaluated, results_page):
    """A real evaluation's eval.json has exactly the schema's fields (none filled in by a default), and the Results
    tab, the HTML report and /run_results all read it through load_eval_result: a reader asking for a field that is
    not in the schema fails here (typed attributes raise), a field the writer forgot fails the key check."""
    from shared.analysis.eval_result import EvalResult, load_eval_result
    from shared.analysis.report import write_report
    from ui.tabs import results

    run_dir, _ = tiny_run
    raw = json.loads((run_dir / "eval" / "eval.json").read_text())
    assert missing_and_unknown(raw, EvalResult) == []
    assert raw["schema_version"] == 2 and raw["figure_level"] == "all" and raw["skipped_figures"] == []
    preds = raw["predictions"]
    assert len(preds["path"]) == len(preds["label"]) == len(preds["pred"]) == len(preds["confidence"]) == raw["n"]
    typed = load_eval_result(run_dir)
    assert typed.to_dict() == raw

    lab, ui = results_page
    shown = results.show_run(lab, ui, run_dir.name, "counts", {})
    assert set(shown) <= {getattr(ui, f) for f in ui.__dataclass_fields__}
    assert f"**Macro F1:** {raw['macro']['f1']:.3f}" in shown[ui.metrics]
    assert f"({raw['n']} images)" in shown[ui.metrics]
    assert list(shown[ui.per_class]["class"]) == raw["classes"]
    assert len(shown[ui.tsne]) == raw["n"] and shown[ui.tsne_panel].visible is True
    assert not shown[ui.roc].empty and not shown[ui.pr].empty and not shown[ui.calibration].empty
    assert shown[ui.cams].visible is True and shown[ui.cams].value and shown[ui.top_losses].value
    assert "class_0" in shown[ui.confusion] and shown[ui.body].visible is True
    assert "%" in results.switch_confusion(lab, run_dir.name, "normalized")

    html = write_report(run_dir).read_text(encoding="utf-8")
    section = html.split("<h2>Evaluation: eval</h2>")[1].split("<h2>")[0]  # other tests add eval-* sections
    assert section.count("data:image/png;base64,") == len(raw["figures"]) - 1  # curves: under Training
    assert "is missing" not in section and "skipped" not in section
    # as the report writes numbers (1.0 is "1"); matched in its cell, not anywhere in the text
    assert f"<td class='num'>{raw['balanced_accuracy']:.4f}".rstrip("0").rstrip(".") + "</td>" in section

    api = results.run_results(lab, run_dir.name)
    assert api["macro_f1"] == raw["macro"]["f1"] and api["balanced_accuracy"] == raw["balanced_accuracy"]
    assert api["top_k_accuracy"] == raw["top_k_accuracy"] and api["n"] == raw["n"]
    assert api["accuracy"] == raw["accuracy"] and api["loss"] == raw["loss"]
    assert api["ece"] == raw["calibration"]["ece"] and api["classes"] == raw["classes"]
    assert api["per_class"][0] == raw["per_class"][0]
    assert api["confusion"]["counts"] == raw["confusion"]["counts"] and api["figures"] == sorted(raw["figures"])
    assert None not in (api["macro_f1"], api["balanced_accuracy"], api["top_k_accuracy"], api["ece"])
    json.dumps(api, allow_nan=False)


def test_an_eval_json_from_before_the_schema_still_loads(tiny_run, evaluated, results_page, tmp_path):
    """Files written by the code before schema_version: same layout without the four new fields. They load in one
    place (the conversion), with balanced accuracy from the per-class recalls, and the page shows them."""
    import shutil

    from shared.analysis.eval_result import load_eval_result
    from shared.runs.store import RunStore
    from ui.tabs import results

    run_dir, _ = tiny_run
    new = json.loads((run_dir / "eval" / "eval.json").read_text())
    old = {k: v for k, v in new.items()
           if k not in ("schema_version", "balanced_accuracy", "figure_level", "skipped_figures", "predictions")}
    new = {**new, "predictions": None}  # version 1 and older had no per-image predictions
    copy = tmp_path / "models" / run_dir.name
    shutil.copytree(run_dir / "eval", copy / "eval")
    (copy / "eval" / "eval.json").write_text(json.dumps(old))

    loaded = load_eval_result(copy)
    assert loaded.to_dict() == new  # balanced accuracy recomputed from per_class, to the same 6 digits
    assert loaded.figure_level == "all" and loaded.skipped_figures == []
    _, ui = results_page
    shown = results.show_run(SimpleNamespace(store=RunStore(copy.parent)), ui, copy.name, "counts", {})
    assert f"**Macro F1:** {new['macro']['f1']:.3f}" in shown[ui.metrics] and shown[ui.cams].value


def test_an_unusable_eval_json_asks_to_evaluate_again(tiny_run, evaluated, results_page, tmp_path):
    """A newer schema, a damaged file or one that lost a field: no guessing — the page says what is wrong and to
    evaluate again (the button is beside it); the API refuses with the same message."""
    import gradio as gr

    from shared.runs.store import RunStore
    from ui.formatting import md_escape
    from ui.tabs import results

    run_dir, _ = tiny_run
    good = json.loads((run_dir / "eval" / "eval.json").read_text())
    lab = SimpleNamespace(store=RunStore(tmp_path / "models"))
    _, ui = results_page
    run = tmp_path / "models" / run_dir.name
    (run / "eval").mkdir(parents=True)
    without_macro = {k: v for k, v in good.items() if k != "macro"}
    for content, problem in ((json.dumps({**good, "schema_version": 3}), "has schema_version 3"),
                             ('{"accuracy": 0.9', "is not valid JSON"),
                             (json.dumps(without_macro), "first: macro: Field required"),
                             (json.dumps([1, 2]), "does not hold an evaluation")):
        (run / "eval" / "eval.json").write_text(content)
        shown = results.show_run(lab, ui, run.name, "counts", {})
        assert md_escape(problem) in shown[ui.metrics] and "evaluate the run again" in shown[ui.metrics]
        assert shown[ui.body].visible is False
        with pytest.raises(gr.Error, match="evaluate the run again") as refused:
            results.run_results(lab, run.name)
        assert problem in str(refused.value) and str(tmp_path) not in str(refused.value)


def test_run_results_answers_the_same_for_unknown_and_hostile_run_ids(results_page):
    import gradio as gr

    from ui.tabs import results

    lab, _ = results_page
    for run_id in ("20990101-000000-resnet18-ffffff", "../../etc", "", ".hidden", None, {"a": 1}):
        with pytest.raises(gr.Error, match="no evaluation for run .*: the run does not exist or has not been"):
            results.run_results(lab, run_id)


def test_the_results_tab_hides_what_a_basic_evaluation_skipped_and_says_so(results_page, tmp_path):
    from shared.runs.store import RunStore
    from tests.evalfake import fake_eval
    from ui.tabs import results

    _, ui = results_page
    run = tmp_path / "models" / "20260101-000000-resnet18-abcdef"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval.json").write_text(json.dumps(fake_eval(["cat", "dog"], figure_level="basic")))
    shown = results.show_run(SimpleNamespace(store=RunStore(tmp_path / "models")), ui, run.name, "counts", {})
    assert shown[ui.body].visible is True and not shown[ui.roc].empty  # the charts are drawn from eval.json's data
    assert shown[ui.tsne_panel].visible is False and shown[ui.tsne].empty
    assert shown[ui.cams].visible is False and shown[ui.top_losses].visible is False
    assert "skipped these figures (figures = basic): t-SNE, Grad-CAM samples" in shown[ui.metrics]
