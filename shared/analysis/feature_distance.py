"""Is an image like the ones the model was trained on? The second half of an honest "not sure".

The confidence threshold (calibration.py) says how sure the model is *between the classes it knows*; it cannot say
that an image belongs to none of them: a classifier extrapolates to a colour or an object it never saw with full
confidence (BENCHMARKS §11c: 0–44% of an unseen class fell below the threshold). The distance of the image's
penultimate features to the nearest class mean, in the metric of the training features' spread (Mahalanobis,
one covariance shared by the classes: Lee et al. 2018, arXiv:1807.03888), does say it. Measured on generated
classes against the softmax, energy and nearest-neighbour scores, it was the only one that still caught an unseen
class when the known ones overlap (bench/bench_not_sure.py).

Fitted after training on the best checkpoint: the class means and the covariance from the training split (centre
crops, at most `MAX_FIT_IMAGES`), shrunk by Ledoit–Wolf (hundreds of dimensions from a few thousand images), and
the threshold as the `quantile` of the validation split's distances, so that share of images like the training
ones is still answered. Stored whitened: the distance of features f is ||W f − m_c|| for the nearest c, one
matrix product per image whatever the number of classes.

`<run_dir>/feature_distance.npz` has one schema (`FeatureDistance`), read by the predictor and the export bundle
alike; `np.load(allow_pickle=False)`: a file from elsewhere is numbers or refused, never code.
"""

from __future__ import annotations

import io
import logging
import math
import zipfile
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import numpy as np

from shared.fsutil import write_atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
FILE_NAME = "feature_distance.npz"
# share of validation images (like the training ones) that stay answered; the rest of "not sure" comes from the
# confidence threshold, and together they keep >= 90% of in-class images answered (bench_not_sure.py)
DEFAULT_QUANTILE = 0.95
# the covariance of 512-2048 features is well estimated from a few thousand images; more only costs time
MAX_FIT_IMAGES = 4096
# below this many validation images the quantile says nothing: the check is left off (and the run says so)
MIN_VAL_IMAGES = 20
# a whitening matrix bigger than this is not a feature width this project builds (resnet50's is 2048)
MAX_FEATURE_SIZE = 4096
# what the arrays may expand to, checked in the zip's directory before any is read (a 4096-wide whitening matrix
# is 64 MB; a crafted file could otherwise declare gigabytes of zeros that compress to almost nothing)
MAX_EXPANDED_BYTES = 128 * 1024 * 1024


class FeatureDistanceError(ValueError):
    """feature_distance.npz is unreadable or not of this schema; the message names the file and the field."""


@dataclass(frozen=True)
class FeatureDistance:
    whiten: np.ndarray  # (D, D) float32: ||whiten @ (f - mean)|| is the Mahalanobis distance
    means: np.ndarray  # (C, D) float32: each class's mean feature, whitened
    threshold: float  # a distance above it: unlike the training images, "not sure"
    quantile: float  # of the validation distances, what `threshold` is
    n_fit: int  # training images the means and covariance come from
    n_val: int  # validation images the threshold comes from

    @cached_property
    def _float64(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """whitenᵀ, means and their squared norms in float64, converted once (not per prediction)."""
        means = self.means.astype(np.float64)
        return np.ascontiguousarray(self.whiten.T, dtype=np.float64), means, (means * means).sum(1)

    def distances(self, features: np.ndarray) -> np.ndarray:
        """(N, D) penultimate features → (N,) distance to the nearest class mean."""
        whiten_t, means, means_squared = self._float64
        z = np.asarray(features, dtype=np.float64).reshape(len(features), -1) @ whiten_t
        # ||z - m||² = ||z||² - 2 z·m + ||m||²: no (N, C, D) array, so many classes and wide features stay cheap
        squared = (z * z).sum(1, keepdims=True) - 2 * z @ means.T + means_squared[None, :]
        return np.sqrt(np.maximum(squared.min(1), 0.0))

    def familiar(self, distances: np.ndarray) -> np.ndarray:
        return np.asarray(distances) <= self.threshold


def fit_feature_distance(train_features: np.ndarray, train_labels: np.ndarray, val_features: np.ndarray,
                         quantile: float = DEFAULT_QUANTILE) -> FeatureDistance:
    """Class means, a shared shrunk covariance (training split) and the threshold (validation split)."""
    from sklearn.covariance import LedoitWolf

    if not 0 < quantile < 1:
        raise ValueError(f"quantile must be in (0, 1), got {quantile}")
    x = np.asarray(train_features, dtype=np.float64)
    y = np.asarray(train_labels, dtype=np.int64)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise ValueError(f"need (N >= 2, D) training features with N labels, got {x.shape} and {y.shape}")
    classes = np.unique(y)  # a class with no training image has no mean: it cannot be near anything
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    covariance = LedoitWolf(assume_centered=True).fit(centred).covariance_
    # whitening by the eigen-decomposition: Λ^-1/2 Uᵀ, with the smallest eigenvalues floored (shrinkage keeps them
    # positive; the floor guards against round-off on features that never vary, e.g. a dead channel)
    eigenvalues, vectors = np.linalg.eigh(covariance)
    floor = max(float(eigenvalues.max()) * 1e-9, 1e-12)
    whiten = (vectors / np.sqrt(np.maximum(eigenvalues, floor))).T
    fitted = FeatureDistance(whiten=whiten.astype(np.float32), means=(means @ whiten.T).astype(np.float32),
                             threshold=0.0, quantile=float(quantile), n_fit=int(len(x)), n_val=int(len(val_features)))
    return replace(fitted, threshold=float(np.quantile(fitted.distances(val_features), quantile)))


def write_feature_distance(run_dir: Path, fitted: FeatureDistance) -> Path:
    buffer = io.BytesIO()
    np.savez(buffer, schema_version=np.int64(SCHEMA_VERSION), whiten=fitted.whiten, means=fitted.means,
             threshold=np.float64(fitted.threshold), quantile=np.float64(fitted.quantile),
             n_fit=np.int64(fitted.n_fit), n_val=np.int64(fitted.n_val))
    return write_atomic(Path(run_dir) / FILE_NAME, buffer.getvalue())


def read_feature_distance(run_dir: Path, num_classes: int | None = None,
                          feature_size: int | None = None) -> FeatureDistance | None:
    """The run's fitted distance, or None for a run without one (trained before it existed, or too little
    validation data). A file that is there but damaged or of another shape raises FeatureDistanceError."""
    path = Path(run_dir) / FILE_NAME
    if not path.is_file():
        return None
    try:
        arrays = _read_arrays(path)
    except FeatureDistanceError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a damaged or crafted zip raises (zlib, encryption, ...)
        raise FeatureDistanceError(f"{path}: not a readable .npz ({type(exc).__name__})") from None
    return _checked(arrays, str(path), num_classes, feature_size)


ARRAY_NAMES = ("schema_version", "whiten", "means", "threshold", "quantile", "n_fit", "n_val")


def _read_arrays(path: Path) -> dict[str, np.ndarray]:
    """The schema's arrays, each read only after its .npy header's shape and type say it fits in
    MAX_EXPANDED_BYTES together with the others (numpy allocates from the header before reading)."""
    arrays, total = {}, 0
    with zipfile.ZipFile(path) as archive:
        for name in ARRAY_NAMES:
            try:
                member = archive.open(f"{name}.npy")
            except KeyError:
                continue  # _checked names what is missing
            with member:
                version = np.lib.format.read_magic(member)
                header = {(1, 0): np.lib.format.read_array_header_1_0,
                          (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                if header is None:
                    raise FeatureDistanceError(f"{path}: {name} is in .npy format {version}, not 1.0 or 2.0")
                shape, _, dtype = header(member)
                if dtype.hasobject:
                    raise FeatureDistanceError(f"{path}: {name} holds objects, not numbers")
                total += int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
                if total > MAX_EXPANDED_BYTES:
                    raise FeatureDistanceError(f"{path}: its arrays would take over {MAX_EXPANDED_BYTES / 2**20:.0f}"
                                               " MB, more than any model here needs")
            with archive.open(f"{name}.npy") as member:
                arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
    return arrays


def _scalar(arrays: dict, name: str, where: str, kind: type) -> float | int:
    value = arrays.get(name)
    if value is None or value.shape != () or value.dtype.kind not in ("i", "u", "f"):
        raise FeatureDistanceError(f"{where}: {name} must be one number")
    value = value.item()
    if not math.isfinite(value):
        raise FeatureDistanceError(f"{where}: {name} must be finite, got {value}")
    return kind(value)


def _checked(arrays: dict, where: str, num_classes: int | None, feature_size: int | None) -> FeatureDistance:
    version = arrays.get("schema_version")
    if version is None or version.shape != () or version.item() != SCHEMA_VERSION:
        raise FeatureDistanceError(f"{where}: expected schema_version {SCHEMA_VERSION}")
    whiten, means = arrays.get("whiten"), arrays.get("means")
    for name, array in (("whiten", whiten), ("means", means)):
        if array is None or array.ndim != 2 or array.dtype != np.float32 or not np.isfinite(array).all():
            raise FeatureDistanceError(f"{where}: {name} must be a 2-D float32 array of finite numbers")
    d = whiten.shape[1]
    if whiten.shape[0] != d or means.shape[1] != d or not 0 < d <= MAX_FEATURE_SIZE or len(means) == 0:
        raise FeatureDistanceError(f"{where}: whiten {whiten.shape} and means {means.shape} do not fit together")
    if feature_size is not None and d != feature_size:
        raise FeatureDistanceError(f"{where}: fitted on {d} features, the model gives {feature_size}")
    if num_classes is not None and len(means) > num_classes:
        raise FeatureDistanceError(f"{where}: {len(means)} class means for a model of {num_classes} classes")
    threshold = _scalar(arrays, "threshold", where, float)
    quantile = _scalar(arrays, "quantile", where, float)
    if threshold < 0 or not 0 < quantile < 1:
        raise FeatureDistanceError(f"{where}: threshold {threshold} or quantile {quantile} out of range")
    return FeatureDistance(whiten=whiten, means=means, threshold=threshold, quantile=quantile,
                           n_fit=_scalar(arrays, "n_fit", where, int), n_val=_scalar(arrays, "n_val", where, int))
