"""An honest "not sure": temperature scaling, the threshold, calibration.json, and the predictor that uses them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shared.analysis.calibration import (SCHEMA_VERSION, CalibrationError, calibrate, choose_threshold,
                                         read_calibration)
from shared.analysis.predict import Predictor
from shared.runs.store import RunStore
from tests.imagegen import make_image_folder
from tests.tiny import train_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def overconfident_logits(n=2000, classes=4, scale=4.0, seed=0):
    """A calibrated model's logits (labels drawn from their own softmax) multiplied by `scale`: same argmax,
    over-confident probabilities; temperature scaling should find T near `scale`."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=generator) * 1.5
    labels = torch.multinomial(torch.softmax(logits, 1), 1, generator=generator).squeeze(1)
    return logits * scale, labels


def test_temperature_scaling_cuts_ece_and_keeps_accuracy():
    logits, labels = overconfident_logits()
    cal = calibrate(logits, labels, target_precision=0.9)
    assert 3 < cal.temperature < 5  # over-confident logits are softened back
    assert cal.ece_after < cal.ece_before / 3, cal
    assert cal.val_accuracy == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert cal.n_val == 2000 and cal.schema_version == SCHEMA_VERSION
    # the threshold really gives >= 90% precision on what it answers
    probs = torch.softmax(logits / cal.temperature, 1)
    answered = probs.max(1).values >= cal.threshold
    assert 0 < answered.sum() < len(labels)
    assert (probs.argmax(1) == labels)[answered].float().mean() >= 0.9


def test_no_validation_error_leaves_the_temperature_at_one():
    # all right: the NLL would fall forever as T → 0, pushing every confidence to 100% and erasing the differences
    # the threshold is chosen from
    logits = torch.tensor([[3.0, 0.0], [0.0, 1.0], [2.0, 1.5]])
    cal = calibrate(logits, torch.tensor([0, 1, 0]))
    assert cal.temperature == 1.0 and cal.val_accuracy == 1.0
    assert cal.threshold == pytest.approx(torch.softmax(logits[2], 0).max().item(), abs=1e-6)


def test_threshold_is_the_lowest_confidence_that_keeps_the_target_precision():
    conf = np.array([0.9, 0.8, 0.7, 0.6])
    correct = np.array([1, 1, 0, 1])
    assert choose_threshold(conf, correct, 0.95) == 0.8
    assert choose_threshold(conf, correct, 0.7) == 0.6
    # tied confidences are kept or dropped together; none good enough: 1.0, every answer is "not sure"
    assert choose_threshold(np.array([0.9, 0.9, 0.5]), np.array([1, 0, 1]), 0.95) == 1.0


@pytest.fixture(scope="module")
def calibrated_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cal")
    data = make_image_folder(root / "data", classes=3, per_class=12, size=40)
    run_id = train_tiny(root / "models", data, lr=3e-3)
    return RunStore(root / "models").path(run_id), data


def test_training_writes_calibration_json_in_its_one_schema(calibrated_run):
    run_dir, _ = calibrated_run
    data = json.loads((run_dir / "calibration.json").read_text())
    assert set(data) == {"schema_version", "temperature", "threshold", "target_precision", "ece_before",
                         "ece_after", "val_accuracy", "n_val"}
    assert data["schema_version"] == 1 and data["target_precision"] == 0.95
    assert isinstance(data["n_val"], int) and data["n_val"] == 9  # 3 classes x 12 images x val share 0.25
    assert all(isinstance(data[k], float) for k in ("temperature", "threshold", "ece_before", "ece_after"))
    assert read_calibration(run_dir).temperature == data["temperature"]


def test_predictor_applies_the_temperature_and_answers_not_sure_below_the_threshold(calibrated_run):
    run_dir, data = calibrated_run
    predictor = Predictor(run_dir)
    image = next((data / "class_0").glob("*.jpg"))
    x = predictor.preprocess(image).unsqueeze(0)
    with torch.no_grad():
        expected = torch.softmax(predictor.model(x) / predictor.temperature, 1)[0]
    assert torch.allclose(predictor.probabilities(x)[0], expected, atol=1e-6)
    top = predictor.predict(image)
    assert predictor.verdict(top, threshold=0.0).sure
    refused = predictor.verdict(top, threshold=1.0)
    assert not refused.sure and refused.text == f"not sure — closest: {top[0]['class']}"
    [entry] = predictor.predict_many([image])
    assert entry["sure"] == (top[0]["probability"] >= predictor.threshold)


def test_a_run_without_calibration_always_answers_and_says_so(calibrated_run, tmp_path):
    run_dir, data = calibrated_run
    old = tmp_path / run_dir.name
    old.mkdir()
    for name in ("best.pt", "config.json"):
        (old / name).write_bytes((run_dir / name).read_bytes())
    predictor = Predictor(old)
    assert predictor.threshold is None and predictor.temperature == 1.0
    assert "no calibration" in predictor.calibration_note
    assert predictor.verdict(predictor.predict(next((data / "class_1").glob("*.jpg")))).sure
    (old / "calibration.json").write_text('{"schema_version": 1, "temperature": "hot"}')
    with pytest.raises(CalibrationError, match="temperature must be a number"):
        read_calibration(old)
    assert "calibration ignored" in Predictor(old).calibration_note
