"""Explanations: Grad-CAM is the real formula and finds the object, activations are real, hooks never leak, t-SNE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from shared.analysis.explain import GradCAM, FeatureRecorder, layer_activations, overlay_cam, top_channels, tsne_embed
from shared.training.models import get_spec

RESNET18 = get_spec("resnet18")


@pytest.fixture(autouse=True)
def few_threads():
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def small_resnet(num_classes: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(weights=None, num_classes=num_classes).eval()


def no_hooks_left(model: torch.nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks
               for m in model.modules())


# --- Grad-CAM: formula, hygiene ----------------------------------------------------------------------------------

def reference_gradcam(model, x, target):
    """Grad-CAM written out a second way: run the stages by hand, keep layer4's output, backprop the class score."""
    model.zero_grad(set_to_none=True)
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    a = model.layer4(model.layer3(model.layer2(model.layer1(h))))
    a.retain_grad()
    logits = model.fc(torch.flatten(model.avgpool(a), 1))
    logits[0, target].backward()
    weights = a.grad.mean(dim=(2, 3), keepdim=True)
    cam = F.relu((weights * a).sum(1, keepdim=True))
    cam = F.interpolate(cam, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
    cam = cam - cam.min()
    model.zero_grad(set_to_none=True)
    return (cam / cam.max()).detach().numpy()


def test_gradcam_equals_the_formula_and_leaves_the_model_clean():
    model = small_resnet()
    x = torch.randn(1, 3, 96, 96)
    for target in (0, 2):
        cam = GradCAM(model, RESNET18)(x, class_idx=target)
        assert cam.shape == (96, 96) and cam.dtype == np.float32
        assert cam.min() == 0.0 and cam.max() == pytest.approx(1.0)
        assert np.allclose(cam, reference_gradcam(model, x, target), atol=1e-4)
    # default target: the predicted class
    with torch.no_grad():
        predicted = int(model(x).argmax())
    assert np.allclose(GradCAM(model, RESNET18)(x), GradCAM(model, RESNET18)(x, predicted))
    assert no_hooks_left(model)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training


def test_gradcam_batch_matches_single_images_and_restores_train_mode():
    model = small_resnet()
    x = torch.randn(3, 3, 64, 64)
    model.train()
    cams, probs = GradCAM(model, RESNET18).batch(x, [0, 1, 2])
    assert model.training  # restored
    model.eval()
    for i in range(3):
        assert np.allclose(cams[i], GradCAM(model, RESNET18)(x[i:i + 1], i), atol=1e-5)
    assert probs.shape == (3, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    with pytest.raises(ValueError, match="class index"):
        GradCAM(model, RESNET18).batch(x, [0, 1, 7])
    assert no_hooks_left(model)


def test_gradcam_works_with_a_frozen_backbone_and_dropout_head():
    model = small_resnet()
    model.fc = torch.nn.Sequential(torch.nn.Dropout(0.5), torch.nn.Linear(512, 3))
    for p in model.parameters():
        p.requires_grad_(False)
    cam = GradCAM(model, RESNET18)(torch.randn(1, 3, 64, 64), 1)
    assert cam.shape == (64, 64) and np.isfinite(cam).all()
    assert no_hooks_left(model)


# --- Grad-CAM finds the object that decides the class ------------------------------------------------------------
# Images: Gaussian noise with one bright shape at a random known place. Class 0: a square ring, class 1: a plus
# sign, class 2: no shape at all. The empty class makes both shape classes rely on positive evidence (with only
# ring vs plus, a network may learn "ring = no plus", and the ring's CAM then shows the background — a property of
# that model, not of Grad-CAM). At 112 px, layer4 is a 4x4 grid of 28-px cells; the 36-px shape spans more than a
# cell, so a correct CAM peak lands on it or within a few pixels.

SIZE, OBJECT, MARGIN = 112, 36, 8


def shape_mask(kind: int) -> np.ndarray:
    m = np.zeros((OBJECT, OBJECT), bool)
    t = OBJECT // 8
    if kind == 0:
        m[:] = True
        m[t:-t, t:-t] = False
    elif kind == 1:
        c = OBJECT // 2
        m[c - t:c + t, :] = True
        m[:, c - t:c + t] = True
    return m


def shapes_dataset(n: int, seed: int):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.35, (n, 3, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 3, n)
    boxes = np.zeros((n, 4), int)
    for i in range(n):
        r, c = rng.integers(2, SIZE - OBJECT - 2, 2)
        x[i, :, r:r + OBJECT, c:c + OBJECT] += rng.uniform(1.5, 2.5) * shape_mask(y[i])
        boxes[i] = (r, c, r + OBJECT, c + OBJECT)
    return torch.from_numpy(x), torch.from_numpy(y), boxes


def peak(cam: np.ndarray) -> tuple[float, float]:
    """Where the CAM is highest; bilinear upsampling clamps at the borders, so ties are averaged."""
    rows, cols = np.nonzero(cam >= cam.max() - 1e-6)
    return rows.mean(), cols.mean()


def near_box(point, box, margin=MARGIN) -> bool:
    r, c = point
    return box[0] - margin <= r < box[2] + margin and box[1] - margin <= c < box[3] + margin


@pytest.fixture(scope="module")
def shapes_model():  # tests that use it are marked slow: the quick lane skips this training
    # ~40 CPU-seconds: one thread (a busy 2-core machine makes more threads slower, not faster)
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y, _ = shapes_dataset(240, seed=0)
    model = torchvision.models.resnet18(weights=None, num_classes=3)
    optimizer = torch.optim.Adam(model.parameters(), 1e-3)
    epochs, batch = 3, 16
    steps = epochs * (len(x) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 2e-3, total_steps=steps, pct_start=0.2)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch + 1, batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    torch.set_num_threads(previous)
    return model


@pytest.mark.slow  # trains shapes_model
def test_gradcam_peak_falls_on_the_object(shapes_model):
    x, y, boxes = shapes_dataset(90, seed=1)
    cams, probs = GradCAM(shapes_model, RESNET18).batch(x)
    pred = probs.argmax(1)
    y = y.numpy()
    assert (pred == y).mean() > 0.8, "the little model did not learn the task; the CAM test would mean nothing"
    shown = np.nonzero((pred == y) & (y != 2))[0]
    assert len(shown) >= 30
    hits = np.mean([near_box(peak(cams[i]), boxes[i]) for i in shown])
    # the same peaks against the box of a different image: what a CAM unrelated to the object would score
    decoy = np.mean([near_box(peak(cams[i]), boxes[(i + 7) % len(y)]) for i in shown])
    assert hits > 0.7, f"CAM peak on the object for only {hits:.0%} of correctly classified images"
    assert hits - decoy > 0.3, (hits, decoy)
    # the heat is concentrated on the object, not spread evenly
    inside = [cams[i][boxes[i][0]:boxes[i][2], boxes[i][1]:boxes[i][3]].mean() / cams[i].mean() for i in shown]
    assert np.median(inside) > 1.5, np.median(inside)
    assert no_hooks_left(shapes_model)


@pytest.mark.slow  # trains shapes_model
def test_gradcam_is_not_flat(shapes_model):
    x, y, _ = shapes_dataset(12, seed=2)
    cams, _ = GradCAM(shapes_model, RESNET18).batch(x, y.tolist())
    for cam, label in zip(cams, y.tolist()):
        if label == 2:
            continue
        assert cam.std() > 0.1, cam.std()
        assert (cam > 0.5).mean() < 0.5  # a minority of pixels is "hot"
        assert np.unique(np.round(cam, 2)).size > 20


# --- overlay, activations, features ------------------------------------------------------------------------------

def test_overlay_cam_blends_a_colormap_over_the_image():
    image = Image.new("RGB", (80, 60), (128, 128, 128))
    cam = np.zeros((30, 40), np.float32)
    cam[:15, :20] = 1.0
    out = overlay_cam(image, cam)
    assert out.size == (80, 60) and out.mode == "RGB"
    arr = np.asarray(out).astype(int)
    assert not np.array_equal(arr[5, 5], arr[50, 70])  # hot corner differs from the cold one
    assert np.array_equal(np.asarray(overlay_cam(image, cam, alpha=0.0)), np.asarray(image))


def test_layer_activations_are_the_real_feature_maps():
    model = small_resnet()
    x = torch.randn(1, 3, 64, 64)
    info = top_channels(model, RESNET18, x, top=8)
    assert list(info) == ["conv1", "layer1", "layer2", "layer3", "layer4"]
    shapes = {"conv1": (32, 32), "layer1": (16, 16), "layer2": (8, 8), "layer3": (4, 4), "layer4": (2, 2)}
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
        l1 = model.layer1(model.maxpool(stem))
        l4 = model.layer4(model.layer3(model.layer2(l1)))
    for name, ref in (("conv1", stem), ("layer1", l1), ("layer4", l4)):
        channels, maps = info[name]["channels"], info[name]["maps"]
        assert len(maps) == 8 and maps[0].shape == shapes[name]
        means = ref[0].mean(dim=(1, 2))
        assert channels == torch.argsort(means, descending=True)[:8].tolist()
        for ch, m in zip(channels, maps):
            assert np.allclose(m, ref[0, ch].numpy(), atol=1e-5)
    plain = layer_activations(model, RESNET18, x, top=3)
    assert [len(v) for v in plain.values()] == [3] * 5
    assert no_hooks_left(model)


def test_feature_recorder_collects_penultimate_features_and_unhooks():
    model = small_resnet()
    x = torch.randn(4, 3, 64, 64)
    with FeatureRecorder(model, RESNET18) as rec, torch.no_grad():
        model(x[:2])
        logits = model(x[2:])
    feats = rec.features()
    assert feats.shape == (4, 512)
    assert np.allclose(model.fc(torch.from_numpy(feats[2:])).detach().numpy(), logits.numpy(), atol=1e-4)
    assert no_hooks_left(model)


# --- t-SNE -------------------------------------------------------------------------------------------------------

def test_tsne_separates_clusters_and_is_deterministic():
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    rng = np.random.default_rng(0)
    centres = rng.normal(0, 4, (3, 64))
    labels = np.repeat(np.arange(3), 60)
    feats = (centres[labels] + rng.normal(0, 1, (180, 64))).astype(np.float32)
    emb = tsne_embed(feats, seed=0, n_jobs=1)
    assert emb.shape == (180, 2) and emb.dtype == np.float32 and np.isfinite(emb).all()
    assert cross_val_score(KNeighborsClassifier(5), emb, labels, cv=3).mean() > 0.95
    assert np.array_equal(emb, tsne_embed(feats, seed=0, n_jobs=1))


@pytest.mark.parametrize("n", [0, 1, 2, 3, 5, 12])
def test_tsne_handles_tiny_inputs(n):
    feats = np.random.default_rng(n).normal(size=(n, 512)).astype(np.float32)
    emb = tsne_embed(feats, n_jobs=1)
    assert emb.shape == (n, 2) and np.isfinite(emb).all()


def test_tsne_of_identical_points_does_not_crash():
    emb = tsne_embed(np.ones((10, 8), np.float32), n_jobs=1)
    assert emb.shape == (10, 2) and np.isfinite(emb).all()
