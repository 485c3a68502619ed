"""Explanations: Grad-CAM and LayerCAM are the real formulas and find the object, every registered model draws them,
activations are real, hooks never leak, t-SNE."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from shared.analysis.explain import (CAM_METHODS, DEFAULT_CAM, FeatureRecorder, GradCAM, LayerCAM, cam_peak,
                                     create_cam, layer_activations, overlay_cam, top_channels, tsne_embed)
from shared.training.models import create_model, get_spec, list_models
from tests.imagegen import POINTING_CLASSES, pointing_dataset
from tests.tinymodel import TINY_RESNET, register_tiny_resnet

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


def test_heat_maps_ignore_other_threads_forward_passes_on_the_same_model():
    """The page shares one model between a heat-map and other requests (a top-5, ONNX Runtime's timing): their forward
    passes run our hooks too, and once overwrote the heat-map's activations with no-grad ones (a CI failure)."""
    import threading

    model = small_resnet().eval()
    x = torch.randn(1, 3, 96, 96)
    expected = {name: CAM_METHODS[name](model, RESNET18)(x, class_idx=1) for name in ("gradcam", "layercam")}
    stop = threading.Event()

    def serve_others():
        other = torch.randn(2, 3, 96, 96)
        while not stop.is_set():
            with torch.inference_mode():
                model(other)

    others = [threading.Thread(target=serve_others) for _ in range(2)]
    for thread in others:
        thread.start()
    try:
        for _ in range(15):
            for name, want in expected.items():
                assert np.allclose(CAM_METHODS[name](model, RESNET18)(x, class_idx=1), want, atol=1e-5), name
    finally:
        stop.set()
        for thread in others:
            thread.join()
    assert no_hooks_left(model)


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


# --- LayerCAM: formula, every registered model -------------------------------------------------------------------

def reference_layercam(model, x, target, fuse):
    """LayerCAM written out a second way: stages by hand, ReLU(grad) * activation per position, per stage."""
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    a2 = model.layer2(model.layer1(h))
    a3 = model.layer3(a2)
    a4 = model.layer4(a3)
    logits = model.fc(torch.flatten(model.avgpool(a4), 1))
    grads = torch.autograd.grad(logits[0, target], [a2, a3, a4])
    maps = []
    for a, g in zip((a2, a3, a4), grads):
        m = F.relu((F.relu(g) * a).sum(1, keepdim=True))
        m = F.interpolate(m, size=x.shape[-2:], mode="bilinear", align_corners=False)[0, 0]
        maps.append(m / m.max())
    fused = torch.stack(maps).mean(0) if fuse == "mean" else torch.stack(maps).amax(0)
    fused = fused - fused.min()
    return (fused / fused.max()).detach().numpy()


@pytest.mark.parametrize("fuse", ["mean", "max"])
def test_layercam_equals_the_formula_and_leaves_the_model_clean(fuse):
    model = small_resnet()
    x = torch.randn(1, 3, 96, 96)
    explainer = LayerCAM(model, RESNET18, fuse=fuse)
    assert explainer.layers == ("layer2", "layer3", "layer4")  # from the spec
    for target in (0, 2):
        cam = explainer(x, class_idx=target)
        assert cam.shape == (96, 96) and cam.dtype == np.float32
        assert np.allclose(cam, reference_layercam(model, x, target, fuse), atol=1e-4)
    assert explainer.map_size == (12, 12)  # layer2: 1/8 of the input
    assert explainer.resolution(x.shape) == "heat-map 12×12 over 96×96 input"
    assert no_hooks_left(model) and all(p.grad is None for p in model.parameters()) and not model.training


def test_cam_methods_are_chosen_by_name():
    model = small_resnet()
    assert isinstance(create_cam(model, RESNET18), CAM_METHODS[DEFAULT_CAM])
    assert isinstance(create_cam(model, RESNET18, "gradcam"), GradCAM)
    with pytest.raises(ValueError, match="choose one of gradcam, layercam"):
        create_cam(model, RESNET18, "saliency")
    with pytest.raises(RuntimeError, match="no CAM drawn yet"):
        create_cam(model, RESNET18).resolution((64, 64))


# Real heat-maps from tiny_resnet and resnet18 (BasicBlock) in the quick lane, resnet50 (Bottleneck) in the full one;
# every registered model's spec is checked on the meta device below (building the 127 M-parameter ones for real
# costs tens of seconds on two cores).
@pytest.mark.parametrize("name", [TINY_RESNET, "resnet18", pytest.param("resnet50", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", sorted(CAM_METHODS))
def test_registered_models_draw_every_heat_map(name, method):
    register_tiny_resnet()
    spec = get_spec(name)
    torch.manual_seed(0)
    model = create_model(name, 3).eval()
    x = torch.randn(2, 3, 32, 32)
    explainer = create_cam(model, spec, method)
    cams, probs = explainer.batch(x, [0, 2])
    assert cams.shape == (2, 32, 32) and cams.dtype == np.float32 and np.isfinite(cams).all()
    assert cams.min() >= 0.0 and cams.max() <= 1.0 + 1e-6
    assert all(np.isclose(c.max(), 1.0) or c.max() == 0.0 for c in cams)
    assert probs.shape == (2, 3)
    assert explainer.map_size == ((4, 4) if method == "layercam" else (1, 1))  # layer2 / layer4 at 32 px
    assert no_hooks_left(model) and all(p.grad is None for p in model.parameters())


@pytest.mark.slow  # building the ten torchvision networks, even without weights: ~10 CPU-seconds
def test_every_registered_model_has_the_heat_map_layers():
    """The modules each spec names for the heat-maps exist and give (N, K, h, w) maps, the first LayerCAM layer the
    finest: checked on the meta device (shapes only, no weights: a real wide_resnet101_2 alone takes ~5 s to build)."""
    register_tiny_resnet()
    for name in list_models():
        spec = get_spec(name)
        with torch.device("meta"):
            model = spec.builder().eval()
        shapes: dict[str, tuple] = {}
        paths = (*spec.layercam_layers, spec.cam_layer)
        handles = [model.get_submodule(path).register_forward_hook(
            lambda m, i, o, path=path: shapes.update({path: tuple(o.shape)})) for path in paths]
        model(torch.empty(1, 3, 64, 64, device="meta"))
        for handle in handles:
            handle.remove()
        assert all(len(shapes[p]) == 4 for p in paths), (name, shapes)
        finest = shapes[spec.layercam_layers[0]]
        assert finest[-2:] == max(shapes[p][-2:] for p in paths), (name, shapes)


# --- the default heat-map points at the object (pointing game, bench/bench_pointing_game.py in small) -------------

POINT_SIZE = 64


@pytest.fixture(scope="module")
def pointing_model():
    """tiny_resnet trained on generated scenes (tests.imagegen.pointing_scene) at 64 px: ~6 CPU-seconds, about
    60% right on new scenes (chance: 33%), enough to tell a map that points from one that does not."""
    register_tiny_resnet()
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels, _ = pointing_dataset(900, POINT_SIZE, seed=0)
    x, y = _scenes(images), torch.from_numpy(labels).long()
    model = create_model(TINY_RESNET, len(POINTING_CLASSES))
    optimizer = torch.optim.AdamW(model.parameters(), 4e-3)
    epochs, batch = 6, 32
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 1e-2, total_steps=epochs * (len(x) // batch))
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


def _scenes(images: np.ndarray) -> torch.Tensor:
    return ((torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - 0.5) / 0.25).contiguous()


@pytest.mark.slow  # trains pointing_model
def test_the_default_heat_map_points_at_the_object(pointing_model):
    images, labels, boxes = pointing_dataset(90, POINT_SIZE, seed=1)
    x = _scenes(images)
    spec = get_spec(TINY_RESNET)
    cams, probs = create_cam(pointing_model, spec).batch(x)
    pred = probs.argmax(1)
    shown = np.nonzero(pred == labels)[0]
    assert len(shown) >= 40, f"the tiny model learned too little ({len(shown)} of 90 right) for the test to mean anything"
    tol = 4  # the pointing game's 15 px at 224, scaled to 64 px

    def hit_rate(maps, scene_boxes):
        return np.mean([b[0] - tol <= r < b[2] + tol and b[1] - tol <= c < b[3] + tol
                        for (r, c), b in zip((cam_peak(m) for m in maps), scene_boxes)])

    hits = hit_rate(cams[shown], boxes[shown])
    # what maps that ignore the object score: random maps, and the same peaks against another scene's box
    rng = np.random.default_rng(0)
    random_hits = hit_rate(rng.random((len(shown), POINT_SIZE, POINT_SIZE)), boxes[shown])
    decoy = hit_rate(cams[shown], np.roll(boxes[shown], 1, axis=0))
    assert hits > max(random_hits, decoy) + 0.3, (hits, random_hits, decoy)
    # and it beats the old default, Grad-CAM on layer4 (a 2x2 map at 64 px)
    old, _ = GradCAM(pointing_model, spec).batch(x[shown], pred[shown].tolist())
    assert hits > hit_rate(old, boxes[shown]) + 0.2, (hits, hit_rate(old, boxes[shown]))
    assert no_hooks_left(pointing_model)


# --- Grad-CAM finds the object that decides the class ------------------------------------------------------------
# Images: Gaussian noise with one bright shape at a random known place. Class 0: a square ring, class 1: a plus
# sign, class 2: no shape at all. The empty class makes both shape classes rely on positive evidence (with only
# ring vs plus, a network may learn "ring = no plus", and the ring's CAM then shows the background — a property of
# that model, not of Grad-CAM). At 112 px, layer4 is a 4x4 grid of 28-px cells; the 36-px shape spans more than a
# cell, so a correct CAM peak lands on it or within a few pixels. The network is tiny_resnet (resnet18's stages and
# layer4 at 1/32 of the input, one block each and 1/8 of the width): ~2 CPU-seconds to learn this (90-100% right on
# new images with any of four seeds, the CAM peak on the object for 88-99% of them) instead of resnet18's ~40.

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
    # ~2 CPU-seconds: one thread (a busy 2-core machine makes more threads slower, not faster)
    register_tiny_resnet()
    torch.manual_seed(0)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    x, y, _ = shapes_dataset(240, seed=0)
    model = create_model(TINY_RESNET, 3)
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
    cams, probs = GradCAM(shapes_model, get_spec(TINY_RESNET)).batch(x)
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
    cams, _ = GradCAM(shapes_model, get_spec(TINY_RESNET)).batch(x, y.tolist())
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


def test_overlay_outlines_the_hot_region_and_rings_the_peak():
    image = Image.new("RGB", (96, 96), (128, 128, 128))
    yy, xx = np.mgrid[0:24, 0:24]
    cam = np.exp(-((yy - 6) ** 2 + (xx - 17) ** 2) / 12.0).astype(np.float32)  # peak at row 6, col 17 of 24
    arr = np.asarray(overlay_cam(image, cam)).astype(int)
    cyan = (arr[..., 0] < 60) & (arr[..., 1] > 200) & (arr[..., 2] > 200)
    rows, cols = np.nonzero(cyan)
    assert len(rows) > 20
    # the marks sit around the peak (scaled 4x: row ~26, col ~70), nowhere near the cold corners
    assert abs(rows.mean() - 4 * 6.4) < 8 and abs(cols.mean() - 4 * 17.4) < 8
    assert not cyan[60:, :40].any()
    plain = np.asarray(overlay_cam(image, cam, outline=False)).astype(int)
    assert not ((plain[..., 0] < 60) & (plain[..., 1] > 200)).any()
    # hot is strongly coloured, cold keeps most of the photo
    assert np.abs(plain[26, 70] - 128).sum() > 150 and np.abs(plain[90, 5] - 128).sum() < np.abs(plain[26, 70] - 128).sum()


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
