"""Evaluation: our numbers against scikit-learn on the same arrays, ECE by hand, and evaluate_run on a tiny run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn import metrics as skm

from shared.evaluation import calibration, compute_metrics, eval_dir_for, evaluate_run


@pytest.fixture(autouse=True)
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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
    """A real run folder made by shared.engine.fit: 3 generated classes at 48 px, a few epochs on one thread."""
    from shared.config import TrainConfig
    from shared.engine import fit
    from shared.runs import RunStore
    from tests.imagegen import make_image_folder

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base = tmp_path_factory.mktemp("evalrun")
        data = make_image_folder(base / "shapes", classes=3, per_class=20, size=56)
        config = TrainConfig(data_dir=str(data), weights="none", image_size=48, epochs=3, batch_size=8, lr=3e-3,
                             warmup_epochs=0)
        store = RunStore(base / "models")
        run_dir = store.path(store.create(config))
        fit(config, run_dir, cache_dir=base / "cache")
        yield run_dir, data
    finally:
        torch.set_num_threads(previous)


EXPECTED_FIGURES = {"curves", "confusion", "confusion_normalized", "roc", "pr", "reliability", "tsne",
                    "class_counts", "cam_samples", "top_losses", "class_samples", "activations"}


def test_evaluate_run_writes_eval_json_and_every_figure(tiny_run):
    import matplotlib.pyplot as plt

    run_dir, _ = tiny_run
    calls = []
    result = evaluate_run(run_dir, progress=lambda done, total: calls.append((done, total)))

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
    assert plt.get_fignums() == []


def _no_constants(name):
    raise AssertionError(f"eval.json contains {name}")


def test_evaluate_another_split_and_another_folder(tiny_run, tmp_path):
    from tests.imagegen import make_image_folder, write_corrupt

    run_dir, _ = tiny_run
    val = evaluate_run(run_dir, split="val", cam_samples_per_class=1)
    assert val["split"] == "val" and (eval_dir_for(run_dir, "val") / "eval.json").is_file()
    assert eval_dir_for(run_dir, "val").name == "eval-val"

    # a folder with a subset of the classes, plus one broken file: evaluated, the broken file listed
    other = make_image_folder(tmp_path / "more", classes=["class_0", "class_2"], per_class=4, size=56, seed=5)
    write_corrupt(other / "class_2" / "broken.jpg", "truncated")
    result = evaluate_run(run_dir, data_dir=other, cam_samples_per_class=1)
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
