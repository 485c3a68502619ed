"""The feature distance of an honest "not sure": its maths, its one file format (and what it refuses), and a run
that fits it after training and a predictor that answers with it."""

from __future__ import annotations

import io

import numpy as np
import pytest

from shared.analysis.feature_distance import (FILE_NAME, FeatureDistanceError, fit_feature_distance,
                                              read_feature_distance, write_feature_distance)


def gaussian_classes(n_per_class=300, dims=16, classes=3, seed=0):
    """Three classes of correlated Gaussian features (one shared covariance), their labels, and a far-off cluster."""
    rng = np.random.default_rng(seed)
    mix = rng.normal(size=(dims, dims)) / np.sqrt(dims)
    centres = rng.normal(scale=3.0, size=(classes, dims))
    labels = np.repeat(np.arange(classes), n_per_class)
    features = centres[labels] + rng.normal(size=(len(labels), dims)) @ mix
    outside = rng.normal(scale=3.0, size=dims) * 3 + rng.normal(size=(100, dims)) @ mix
    return features, labels, outside, mix


def test_distance_is_the_mahalanobis_distance_to_the_nearest_class_mean():
    features, labels, _, _ = gaussian_classes()
    fitted = fit_feature_distance(features, labels, features)
    probe = features[:50] + 0.5
    # the same numbers from the definition: the fitted covariance is Ledoit–Wolf's of the class-centred features
    from sklearn.covariance import LedoitWolf

    means = np.stack([features[labels == c].mean(0) for c in range(3)])
    precision = np.linalg.inv(LedoitWolf(assume_centered=True).fit(features - means[labels]).covariance_)
    d = probe[:, None, :] - means[None]
    expected = np.sqrt(np.einsum("ncd,de,nce->nc", d, precision, d).min(1))
    assert fitted.distances(probe) == pytest.approx(expected, rel=1e-4)


def test_threshold_keeps_the_quantile_of_validation_and_catches_a_cluster_it_never_saw():
    features, labels, outside, mix = gaussian_classes()
    rng = np.random.default_rng(1)
    validation = features[::3] + rng.normal(size=(len(features[::3]), features.shape[1])) @ mix * 0.1
    fitted = fit_feature_distance(features, labels, validation, quantile=0.95)
    assert fitted.familiar(fitted.distances(validation)).mean() == pytest.approx(0.95, abs=0.01)
    assert not fitted.familiar(fitted.distances(outside)).any()
    assert (fitted.n_fit, fitted.n_val, fitted.quantile) == (900, 300, 0.95)


def test_a_class_without_training_images_gets_no_mean():
    features, labels, _, _ = gaussian_classes()
    fitted = fit_feature_distance(features[labels != 1], labels[labels != 1], features)
    assert fitted.means.shape == (2, 16)


def test_the_file_round_trips_in_its_one_schema(tmp_path):
    features, labels, outside, _ = gaussian_classes()
    fitted = fit_feature_distance(features, labels, features)
    write_feature_distance(tmp_path, fitted)
    again = read_feature_distance(tmp_path, num_classes=3, feature_size=16)
    assert again.threshold == fitted.threshold and again.n_fit == fitted.n_fit
    assert np.array_equal(again.distances(outside), fitted.distances(outside))
    assert read_feature_distance(tmp_path / "elsewhere") is None  # a run from before: no check, no error


def _write(tmp_path, **arrays):
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (tmp_path / FILE_NAME).write_bytes(buffer.getvalue())


@pytest.mark.parametrize("change, message", [
    ({"schema_version": np.int64(2)}, "schema_version"),
    ({"whiten": np.eye(16)}, "whiten must be a 2-D float32"),  # float64
    ({"means": np.full((3, 16), np.nan, np.float32)}, "means must be a 2-D float32 array of finite"),
    ({"means": np.zeros((3, 8), np.float32)}, "do not fit together"),
    ({"threshold": np.float64(np.inf)}, "threshold must be finite"),
    ({"threshold": np.array([1.0, 2.0])}, "threshold must be one number"),
    ({"quantile": np.float64(1.5)}, "out of range"),
    ({"n_val": np.array(["many"])}, "n_val must be one number"),
])
def test_a_damaged_or_foreign_file_is_refused_naming_the_field(tmp_path, change, message):
    good = dict(schema_version=np.int64(1), whiten=np.eye(16, dtype=np.float32),
                means=np.zeros((3, 16), np.float32), threshold=np.float64(4.0), quantile=np.float64(0.975),
                n_fit=np.int64(900), n_val=np.int64(300))
    _write(tmp_path, **{**good, **change})
    with pytest.raises(FeatureDistanceError, match=message) as caught:
        read_feature_distance(tmp_path, num_classes=3, feature_size=16)
    assert str(tmp_path / FILE_NAME) in str(caught.value)


def test_a_pickled_object_or_a_file_of_another_model_is_refused(tmp_path):
    _write(tmp_path, schema_version=np.int64(1), whiten=np.array([object()], dtype=object))
    with pytest.raises(FeatureDistanceError, match="whiten holds objects, not numbers"):
        read_feature_distance(tmp_path)
    features, labels, _, _ = gaussian_classes()
    write_feature_distance(tmp_path, fit_feature_distance(features, labels, features))
    with pytest.raises(FeatureDistanceError, match="fitted on 16 features, the model gives 512"):
        read_feature_distance(tmp_path, num_classes=3, feature_size=512)
    (tmp_path / FILE_NAME).write_bytes(b"not a zip")
    with pytest.raises(FeatureDistanceError, match="not a readable .npz"):
        read_feature_distance(tmp_path)


def test_a_header_declaring_a_huge_array_or_a_damaged_member_is_refused_not_raised(tmp_path):
    import zipfile

    # 160 GB declared in 100 bytes: numpy would allocate from the header before finding the data short
    with zipfile.ZipFile(tmp_path / FILE_NAME, "w") as archive:
        with archive.open("whiten.npy", "w") as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                         "shape": (200000, 200000)})
    with pytest.raises(FeatureDistanceError, match="would take over 128 MB"):
        read_feature_distance(tmp_path)
    # a member that is not .npy at all, and deflate data cut short: one message, never another exception
    with zipfile.ZipFile(tmp_path / FILE_NAME, "w") as archive:
        archive.writestr("schema_version.npy", b"not numpy")
    with pytest.raises(FeatureDistanceError, match="not a readable .npz"):
        read_feature_distance(tmp_path)
    features, labels, _, _ = gaussian_classes()
    write_feature_distance(tmp_path, fit_feature_distance(features, labels, features))
    data = bytearray((tmp_path / FILE_NAME).read_bytes())
    data[200:260] = bytes(60)  # inside the first member's stored bytes
    (tmp_path / FILE_NAME).write_bytes(bytes(data))
    with pytest.raises(FeatureDistanceError):
        read_feature_distance(tmp_path)


def test_a_file_that_would_expand_to_gigabytes_is_refused_before_reading(tmp_path):
    """200 MB of zeros compress to ~200 kB: the zip's directory says what they expand to, checked first."""
    import zipfile

    with zipfile.ZipFile(tmp_path / FILE_NAME, "w", zipfile.ZIP_DEFLATED) as archive:
        with archive.open("whiten.npy", "w", force_zip64=True) as member:
            np.lib.format.write_array_header_1_0(member, {"descr": "<f4", "fortran_order": False,
                                                         "shape": (7300, 7300)})
            chunk = bytes(2**20)
            for _ in range(200):
                member.write(chunk)
    with pytest.raises(FeatureDistanceError, match="would take over 128 MB"):
        read_feature_distance(tmp_path)


@pytest.mark.usefixtures("one_torch_thread")
def test_training_fits_it_and_the_predictor_answers_not_sure_beyond_it(tmp_path):
    from PIL import Image

    from shared.analysis.predict import Predictor
    from shared.data.manifest import read_manifest
    from shared.runs.store import RunStore
    from tests.imagegen import make_image_folder
    from tests.tiny import train_tiny

    data = make_image_folder(tmp_path / "data", classes=3, per_class=30, size=40)
    run_dir = RunStore(tmp_path / "models").path(train_tiny(tmp_path / "models", data, lr=3e-3))
    manifest = read_manifest(run_dir / "split.json")
    val = [f"{manifest['root']}/{f['path']}" for f in manifest["files"] if f["split"] == "val"]
    fitted = read_feature_distance(run_dir)
    assert fitted is not None and fitted.n_val == len(val) >= 20
    predictor = Predictor(run_dir)
    answers = predictor.predict_many(val, top_k=1)
    assert all(a["familiar"] == (a["distance"] <= fitted.threshold) for a in answers)
    # the limit keeps 95% of validation as training read it (decoded once, cached); read here through PIL, most
    assert sum(a["familiar"] for a in answers) >= 0.8 * len(val)
    # an image far from anything it was trained on: beyond the distance however confident, so "not sure"
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8))
    (far,) = predictor.predict_many([noise], top_k=1)
    assert far["familiar"] is False and far["sure"] is False
    answer = predictor.verdict(far["top"], threshold=0.0, distance=far["distance"])
    assert not answer.sure and answer.confident and answer.familiar is False


@pytest.mark.usefixtures("one_torch_thread")
def test_a_failed_fit_keeps_the_trained_run_and_says_why(tmp_path, monkeypatch):
    from shared.runs.store import RunStore
    from shared.training import engine
    from tests.imagegen import make_image_folder
    from tests.tiny import train_tiny

    def broken(*args, **kwargs):
        raise np.linalg.LinAlgError("Eigenvalues did not converge")

    monkeypatch.setattr(engine, "fit_feature_distance", broken)
    data = make_image_folder(tmp_path / "data", classes=3, per_class=30, size=40)
    store = RunStore(tmp_path / "models")
    run_id = train_tiny(tmp_path / "models", data)
    assert store.status(run_id)["status"] == "succeeded"
    assert store.status(run_id)["best"]["feature_distance"] == {
        "skipped": "the fit failed (LinAlgError: Eigenvalues did not converge)"}
    assert read_feature_distance(store.path(run_id)) is None
