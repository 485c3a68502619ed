"""The Predict tab's handler answers in two steps: the top-5 at once (the old CAM taken away with it), then the
Grad-CAM; an unreadable picture clears the previous answer before its error. In-process, no server."""

from __future__ import annotations

import gradio as gr
import pytest

from shared.settings import Settings
from tests.imagegen import make_image_folder, write_corrupt
from tests.tiny import train_tiny


@pytest.fixture(scope="module")
def lab_and_ui(tmp_path_factory):
    from ui.app import Lab
    from ui.tabs import predict as tab

    root = tmp_path_factory.mktemp("stream")
    data = make_image_folder(root / "data" / "ds", classes=3, per_class=8, size=40)
    train_tiny(root / "models", data)
    lab = Lab(Settings(models_dir=root / "models", data_roots=(root / "data",), redis_url=None,
                       predict_runtime="torch"))
    with gr.Blocks():
        ui = tab.build(lab)
    return lab, ui, data


def test_top5_comes_first_then_the_cam(lab_and_ui, one_torch_thread):
    from ui.tabs.predict import predict

    lab, ui, data = lab_and_ui
    image = str(data / "class_0" / "class_0_000.jpg")
    steps = list(predict(lab, ui, image))
    assert len(steps) == 2
    first, last = steps
    assert first[ui.cam] is None and len(first[ui.label]) == 3  # 3 classes: all of them in the "top 5"
    assert "latest finished run" in first[ui.answer]
    assert last[ui.label] == first[ui.label] and last[ui.cam].size == (320, 320)
    assert last[ui.answer] == first[ui.answer] + "  \nHeat-map: LayerCAM heat-map 4×4 over 32×32 input."
    # every output of the API's answer (the feature distance is a State: the page's, not the API's)
    assert set(last) == {ui.label, ui.cam, ui.answer, ui.answered, ui.distance}
    assert last[ui.distance] == {"run": last[ui.answered], "distance": None}  # a tiny run: too little validation


def test_an_unreadable_picture_clears_the_answer_then_says_why(lab_and_ui, tmp_path):
    from ui.tabs.predict import predict

    lab, ui, data = lab_and_ui
    bad = write_corrupt(data.parent / "bad.jpg", "html")
    steps = predict(lab, ui, str(bad))
    assert next(steps) == {ui.label: None, ui.cam: None, ui.answer: ""}
    with pytest.raises(gr.Error):
        next(steps)


@pytest.mark.slow  # a torch.export of the tiny model: 5-10 s on 2 cores
def test_onnxruntime_top5_is_measured_chosen_and_logged(lab_and_ui, caplog, one_torch_thread):
    """runtime="onnxruntime": exported in the background, timed against torch, the faster one kept and named in
    the log; the ONNX Runtime answer equals torch's."""
    import logging

    import torch

    from shared.analysis.predict import Predictor
    from shared.export.bundle import onnx_session

    lab, _, data = lab_and_ui
    run_dir = lab.store.path(lab.store.latest_succeeded())
    with caplog.at_level(logging.INFO, logger="shared.analysis.predict"):
        predictor = Predictor(run_dir, runtime="onnxruntime")
        assert predictor.runtime == "torch"  # until the export is done and measured
        predictor.onnx_ready.join(120)
    (line,) = [r.getMessage() for r in caplog.records if "top-5 on" in r.getMessage()]
    assert f"top-5 on {predictor.runtime}" in line and "onnxruntime" in line and "torch" in line
    x = torch.stack([predictor.preprocess(p) for p in sorted(data.rglob("*.jpg"))[:6]])
    predictor._session = onnx_session(predictor.model, predictor.image_size)  # whichever won, the ONNX answer
    assert torch.allclose(predictor.probabilities(x),
                          torch.softmax(predictor._torch_forward(x)[0] / predictor.temperature, dim=1), atol=1e-5)


@pytest.mark.slow  # a torch.export of the tiny model: 5-10 s on 2 cores
def test_onnxruntime_gives_the_same_feature_distances_as_torch(lab_and_ui, one_torch_thread):
    """A run with a feature distance exports a model that also returns its features (WithFeatures): ONNX Runtime
    then gives the distances torch gives, so "not sure" does not depend on the runtime that won."""
    import torch

    from shared.analysis.feature_distance import fit_feature_distance, write_feature_distance
    from shared.analysis.predict import Predictor
    from shared.export.bundle import onnx_session
    from shared.training.models import WithFeatures

    lab, _, data = lab_and_ui
    run_dir = lab.store.path(lab.store.latest_succeeded())
    probe = Predictor(run_dir)
    files = sorted(data.rglob("*.jpg"))
    x = torch.stack([probe.preprocess(p) for p in files])
    _, features = probe._torch_forward(x)
    labels = [probe.classes.index(p.parent.name) for p in files]
    write_feature_distance(run_dir, fit_feature_distance(features.numpy(), labels, features.numpy()))
    try:
        predictor = Predictor(run_dir)
        torch_probs, torch_distances = predictor.scores(x)
        predictor._session = onnx_session(WithFeatures(predictor.model, predictor.spec, predictor.image_size),
                                          predictor.image_size)
        onnx_probs, onnx_distances = predictor.scores(x)
    finally:
        (run_dir / "feature_distance.npz").unlink()
    assert torch.allclose(onnx_probs, torch_probs, atol=1e-5)
    assert onnx_distances == pytest.approx(torch_distances, rel=1e-3, abs=1e-3)
    assert max(torch_distances) > 0
