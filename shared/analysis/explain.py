"""Why did the model say that? Heat-maps (Grad-CAM, LayerCAM), layer activations and t-SNE of penultimate features.

Everything here works on any registered model through forward hooks on the modules its `ModelSpec` names (the CAM
layer, the stages, the head); nothing re-implements the forward pass. Hooks are removed in `finally` blocks, gradients are taken with
`torch.autograd.grad` (so no `.grad` is ever left on the parameters), and the model's train/eval mode is restored.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shared.training.models import ModelSpec

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Run in eval mode (BatchNorm must not update its running stats) and restore the previous mode."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


class CamExplainer:
    """What every gradient CAM shares: hook some modules, run the model once, take d score / d activations.

    Subclasses name the modules (`layers`) and turn (activations, gradients) per module into one map (`_combine`).
    """

    name = ""    # the key in CAM_METHODS
    title = ""   # the method's name for people
    label = ""   # the method and its layers, for figure titles

    def __init__(self, model: nn.Module, layers: Sequence[str]):
        if not layers:
            raise ValueError("a CAM needs at least one layer")
        self.model = model
        self.layers = tuple(layers)
        self.modules = [model.get_submodule(path) for path in self.layers]
        # (h, w) of the finest activation map the last call used: the heat-map's real resolution
        self.map_size: tuple[int, int] | None = None

    def __call__(self, input_tensor: torch.Tensor, class_idx: int | None = None) -> np.ndarray:
        """CAM for one image (1, 3, H, W) or (3, H, W) → (H, W) float32 in [0, 1]; class_idx None = predicted."""
        if input_tensor.dim() == 3:
            input_tensor = input_tensor.unsqueeze(0)
        if input_tensor.shape[0] != 1:
            raise ValueError(f"expected one image (1, 3, H, W), got {tuple(input_tensor.shape)} — use .batch()")
        cams, _ = self.batch(input_tensor, None if class_idx is None else [class_idx])
        return cams[0]

    def batch(self, inputs: torch.Tensor, class_indices: Sequence[int] | None = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """CAMs for a batch (N, 3, H, W), one target class per image (None = each image's prediction).

        Returns (cams (N, H, W) float32 in [0, 1], probabilities (N, C) float32). Images do not interact: the model
        runs in eval mode, so the sum of the per-image scores has per-image gradients.
        """
        captured: dict[int, torch.Tensor] = {}
        # Hooks live on the module, so any thread's forward pass runs them: one serving the same model elsewhere
        # (the page answering a top-5, timing ONNX Runtime) would otherwise overwrite our activations with its
        # no-grad ones ("One of the differentiated Tensors does not require grad"). Capture only our own pass.
        owner = threading.get_ident()

        def hook(index: int):
            def capture(module, inp, out):
                if threading.get_ident() != owner:
                    return out
                if not captured:
                    # The first hooked module in forward order: detach and re-attach, so backward stops here (never
                    # walks the earlier layers) and frozen (requires_grad=False) backbones still work.
                    out = out.detach().requires_grad_(True)
                captured[index] = out
                return out
            return capture

        handles = [module.register_forward_hook(hook(i)) for i, module in enumerate(self.modules)]
        try:
            with _eval_mode(self.model), torch.enable_grad():
                logits = self.model(inputs.to(_model_device(self.model)))
                acts = [captured.get(i) for i in range(len(self.modules))]
                if any(a is None or a.dim() != 4 for a in acts):
                    raise ValueError(f"the CAM layers {', '.join(self.layers)} did not all produce an (N, K, h, w) "
                                     "activation map in the forward pass")
                targets = _targets(logits, class_indices)
                score = logits.gather(1, targets.view(-1, 1)).sum()
                grads = torch.autograd.grad(score, acts)
        finally:
            for handle in handles:
                handle.remove()
        with torch.no_grad():
            acts = [a.detach() for a in acts]
            finest = max(acts, key=lambda a: a.shape[-2] * a.shape[-1])
            self.map_size = (int(finest.shape[-2]), int(finest.shape[-1]))
            cam = _unit_range(self._combine(acts, grads, inputs.shape[-2:]))
            probs = logits.detach().softmax(1)
        return cam.float().cpu().numpy(), probs.float().cpu().numpy()

    def _combine(self, acts: list[torch.Tensor], grads: Sequence[torch.Tensor], size) -> torch.Tensor:
        raise NotImplementedError

    def resolution(self, input_size: Sequence[int]) -> str:
        """"heat-map 16×16 over 128×128 input": how fine the overlay's detail really is (after a CAM was drawn)."""
        if self.map_size is None:
            raise RuntimeError("no CAM drawn yet: call the explainer on an image first")
        h, w = self.map_size
        ih, iw = (int(s) for s in input_size[-2:])
        return f"heat-map {w}×{h} over {iw}×{ih} input"


def _targets(logits: torch.Tensor, class_indices: Sequence[int] | None) -> torch.Tensor:
    if class_indices is None:
        return logits.argmax(1)
    if len(class_indices) != logits.shape[0]:
        raise ValueError(f"expected {logits.shape[0]} class indices, got {len(class_indices)}")
    targets = torch.as_tensor(list(class_indices), device=logits.device)
    if targets.min() < 0 or targets.max() >= logits.shape[1]:
        raise ValueError(f"class index out of range 0..{logits.shape[1] - 1}: {list(class_indices)}")
    return targets


def _upsample(cam: torch.Tensor, size) -> torch.Tensor:
    """(N, 1, h, w) → (N, H, W), bilinear."""
    return F.interpolate(cam, size=tuple(size), mode="bilinear", align_corners=False)[:, 0]


def _unit_range(cam: torch.Tensor) -> torch.Tensor:
    """Each (H, W) map of (N, H, W) scaled to [0, 1]; a flat map becomes all zeros."""
    cam = cam - cam.amin(dim=(1, 2), keepdim=True)
    peak = cam.amax(dim=(1, 2), keepdim=True)
    return torch.where(peak > 0, cam / peak.clamp_min(1e-12), torch.zeros_like(cam))


class GradCAM(CamExplainer):
    """Grad-CAM (Selvaraju et al., 2017, arXiv:1610.02391) on one layer: the spec's CAM layer (a ResNet's
    `layer4`) unless `layer` names another module.

    cam = ReLU(sum_k w_k * A_k) with w_k = spatial mean of d score_c / d A_k, upsampled (bilinear) to the input
    size and scaled to [0, 1]. A is the layer's (N, K, h, w) activation map, not the pooled 1x1 features (pooling
    first is what made the original system's CAM a flat tint).

    Why not the `grad-cam` package: for two methods on ResNets it is ~100 lines here, while the package would add
    opencv-python and ttach to the core install, and computes the same formulas. tests/test_explain.py checks
    this implementation against the formula written out by hand and against known object positions.
    """

    name = "gradcam"
    title = "Grad-CAM"

    def __init__(self, model: nn.Module, spec: ModelSpec, layer: str | None = None):
        super().__init__(model, [layer or spec.cam_layer])
        self.target_layer = self.modules[0]
        self.label = f"Grad-CAM ({self.layers[0]})"

    def _combine(self, acts, grads, size):
        weights = grads[0].mean(dim=(2, 3), keepdim=True)                       # (N, K, 1, 1)
        return _upsample(F.relu((weights * acts[0]).sum(dim=1, keepdim=True)), size)


class LayerCAM(CamExplainer):
    """LayerCAM (Jiang et al., 2021, IEEE TIP 30:5875, "Exploring hierarchical class activation maps for
    localization") over several stages, fused into one map.

    Per stage: M = ReLU(sum_k ReLU(d score_c / d A_k) ⊙ A_k), element-wise: each position keeps its own positive
    gradient instead of Grad-CAM's one mean weight per channel, so earlier (finer) stages give usable class maps.
    Each stage's map is upsampled to the input size and scaled by its own maximum (shallow stages have far smaller
    values), then fused: "mean" averages the stages, so a peak needs the deep, class-specific stages' support;
    "max" is the paper's element-wise maximum. Which stages, and which fusion, were chosen with
    bench/bench_pointing_game.py (BENCHMARKS.md, "Heat-maps"): the spec's `layercam_layers`, "mean".
    """

    name = "layercam"
    title = "LayerCAM"
    FUSIONS = ("mean", "max", "geomean")

    def __init__(self, model: nn.Module, spec: ModelSpec, layers: Sequence[str] | None = None, fuse: str = "mean"):
        if fuse not in self.FUSIONS:
            raise ValueError(f"unknown fusion {fuse!r}; choose one of {', '.join(self.FUSIONS)}")
        super().__init__(model, tuple(layers) if layers else spec.layercam_layers)
        self.fuse = fuse
        self.label = f"LayerCAM ({'+'.join(self.layers)})"

    def _combine(self, acts, grads, size):
        maps = []
        for a, g in zip(acts, grads):
            m = _upsample(F.relu((F.relu(g) * a).sum(dim=1, keepdim=True)), size)
            peak = m.amax(dim=(1, 2), keepdim=True)
            maps.append(torch.where(peak > 0, m / peak.clamp_min(1e-12), torch.zeros_like(m)))
        stacked = torch.stack(maps)
        if self.fuse == "geomean":
            return stacked.clamp_min(1e-6).log().mean(0).exp()
        return stacked.mean(0) if self.fuse == "mean" else stacked.amax(0)


# Heat-map methods by name: everything that draws a CAM (Predict, the evaluation's figures, the data-issues view)
# goes through `create_cam`, so changing the default is one line.
CAM_METHODS: dict[str, type[CamExplainer]] = {"gradcam": GradCAM, "layercam": LayerCAM}
# chosen by bench/bench_pointing_game.py: see LayerCAM's docstring and BENCHMARKS.md
DEFAULT_CAM = "layercam"


def create_cam(model: nn.Module, spec: ModelSpec, method: str = DEFAULT_CAM) -> CamExplainer:
    """The heat-map explainer `method` ("gradcam", "layercam") for a registered model; its layers come from `spec`."""
    try:
        cls = CAM_METHODS[method]
    except (KeyError, TypeError):
        raise ValueError(f"unknown heat-map method {method!r}; choose one of {', '.join(CAM_METHODS)}") from None
    return cls(model, spec)


def overlay_cam(pil_image, cam: np.ndarray, alpha: float = 0.75, cmap: str = "inferno", outline: bool = True):
    """A [0, 1] heat-map over a PIL image (the map resized to the image), readable at a glance.

    The colour map is perceptual and colour-blind-friendly (inferno). Opacity follows the heat: up to `alpha` where
    the map is hot, a light tint where it is cold, so the photo stays visible around the hot region instead of
    being dimmed everywhere. With `outline`, the region at or above half the peak is outlined and the peak itself is
    marked with a ring, both in cyan (inferno has none, so the marks never read as heat).
    """
    from matplotlib import colormaps
    from PIL import Image, ImageDraw

    image = pil_image.convert("RGB")
    cam = np.clip(np.asarray(cam, dtype=np.float32), 0.0, 1.0)
    if cam.shape != (image.height, image.width):
        cam = np.asarray(Image.fromarray(cam, mode="F").resize(image.size, Image.BILINEAR), dtype=np.float32)
        cam = np.clip(cam, 0.0, 1.0)
    heat = colormaps[cmap](cam)[..., :3]
    base = np.asarray(image, dtype=np.float32) / 255.0
    weight = (alpha * (0.3 + 0.7 * cam))[..., None]
    out = Image.fromarray(np.clip(((1.0 - weight) * base + weight * heat) * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if outline and alpha > 0 and cam.max() > 0:
        marks = np.asarray(out).copy()
        hot = cam >= 0.5 * cam.max()
        inner = hot.copy()  # one-pixel erosion: the outline is the hot region's border
        inner[1:, :] &= hot[:-1, :]
        inner[:-1, :] &= hot[1:, :]
        inner[:, 1:] &= hot[:, :-1]
        inner[:, :-1] &= hot[:, 1:]
        marks[hot & ~inner] = (0, 255, 255)
        out = Image.fromarray(marks)
        rows, cols = np.nonzero(cam >= cam.max() - 1e-6)
        r, c = float(rows.mean()), float(cols.mean())
        radius = max(3.0, min(image.size) / 24)
        draw = ImageDraw.Draw(out)
        width = max(1, round(radius / 3))
        draw.ellipse([c - radius - 1, r - radius - 1, c + radius + 1, r + radius + 1], outline=(0, 0, 0), width=width + 2)
        draw.ellipse([c - radius, r - radius, c + radius, r + radius], outline=(0, 255, 255), width=width)
    return out


def cam_peak(cam: np.ndarray) -> tuple[float, float]:
    """(row, col) where a map is highest; ties (bilinear upsampling clamps at the borders) are averaged."""
    rows, cols = np.nonzero(cam >= cam.max() - 1e-6)
    return float(rows.mean()), float(cols.mean())


def top_channels(model: nn.Module, spec: ModelSpec, input_tensor: torch.Tensor, top: int = 8) -> dict[str, dict]:
    """Strongest feature maps per stage of `spec.stages`, in forward order:
    {stage: {"channels": [int], "means": [float], "maps": [(h, w) arrays]}}.

    Channels are ranked by their mean activation over the image; maps are the real post-ReLU activations.
    """
    if input_tensor.dim() == 3:
        input_tensor = input_tensor.unsqueeze(0)
    if input_tensor.shape[0] != 1:
        raise ValueError(f"expected one image (1, 3, H, W), got {tuple(input_tensor.shape)}")
    captured: dict[str, torch.Tensor] = {}
    handles = []
    try:
        for name, module in spec.stage_modules(model).items():
            # clone: a ResNet's stem ReLU is in-place and its output tensor is reused downstream
            handles.append(module.register_forward_hook(
                lambda m, i, o, name=name: captured.setdefault(name, o.detach().clone())))
        with _eval_mode(model), torch.no_grad():
            model(input_tensor.to(_model_device(model)))
    finally:
        for handle in handles:
            handle.remove()
    result = {}
    for name, _ in spec.stages:
        acts = captured[name][0].float().cpu()                              # (C, h, w)
        means = acts.mean(dim=(1, 2))
        k = min(top, acts.shape[0])
        order = torch.argsort(means, descending=True)[:k]
        result[name] = {"channels": order.tolist(), "means": means[order].tolist(),
                        "maps": [acts[c].numpy() for c in order.tolist()]}
    return result


def layer_activations(model: nn.Module, spec: ModelSpec, input_tensor: torch.Tensor, top: int = 8
                      ) -> dict[str, list[np.ndarray]]:
    """{stage ("conv1", "layer1".."layer4" on a ResNet): [top (h, w) activation maps, strongest mean first]}."""
    return {name: info["maps"] for name, info in top_channels(model, spec, input_tensor, top).items()}


class FeatureRecorder:
    """Collect penultimate features (what the head receives) during ordinary forward passes.

    with FeatureRecorder(model, spec) as rec: model(x) ... rec.features() → (N, spec.feature_size) array.
    The hook is removed on exit.
    """

    def __init__(self, model: nn.Module, spec: ModelSpec):
        self.head = spec.head_of(model)
        self._chunks: list[np.ndarray] = []
        self._handle = None
        self.paused = False  # True during extra passes (the mirror of flip TTA): one feature row per image

    def __enter__(self) -> "FeatureRecorder":
        def record(module, args):
            if not self.paused:
                self._chunks.append(args[0].detach().flatten(1).float().cpu().numpy())

        self._handle = self.head.register_forward_pre_hook(record)
        return self

    def __exit__(self, *exc) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def features(self) -> np.ndarray:
        return np.concatenate(self._chunks) if self._chunks else np.zeros((0, 0), np.float32)


def tsne_embed(features: np.ndarray, seed: int = 0, n_jobs: int = 1) -> np.ndarray:
    """2-D t-SNE of (N, D) features → (N, 2) float32, deterministic for a seed.

    PCA to 50 dimensions first (standard practice; it makes the neighbour search cheap), then openTSNE
    (Barnes-Hut below 10,000 points, PCA initialisation), chosen over scikit-learn's TSNE by bench/bench_tsne.py:
    3,000 x 512 resnet18 features of the flower photos on this 2-core machine, equal quality (trustworthiness@10
    0.989 vs 0.989, 10-NN accuracy in 2-D 0.385 vs 0.389): openTSNE 10-12 CPU-seconds, scikit-learn 21-22, one
    thread each; 6.4 s vs 12.9 s wall with two threads on a quiet machine.
    n_jobs defaults to 1: on a busy machine a second thread made openTSNE slower (468 points: 1.2 → 9 CPU-seconds;
    3,000 points: no gain), and one thread keeps 3,000 points near 11 s.
    """
    from sklearn.decomposition import PCA

    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected features of shape (N, D), got {x.shape}")
    n = x.shape[0]
    if n == 0:
        return np.zeros((0, 2), np.float32)
    x = np.nan_to_num(x)
    if n < 6 or np.allclose(x, x[0]):
        # t-SNE needs a neighbourhood (perplexity < N); with a handful of points (or identical ones) PCA says as much
        out = np.zeros((n, 2), np.float32)
        if n > 1 and not np.allclose(x, x[0]):
            k = min(2, n - 1, x.shape[1])
            out[:, :k] = PCA(n_components=k, random_state=seed).fit_transform(x)
        return out
    dims = min(50, n - 1, x.shape[1])
    if x.shape[1] > dims:
        x = PCA(n_components=dims, random_state=seed).fit_transform(x).astype(np.float32)
    perplexity = float(min(30.0, (n - 1) / 3.0))
    threads = max(1, int(n_jobs))
    import openTSNE  # imported here: loading it takes a while, and only evaluations draw a t-SNE

    embedding = openTSNE.TSNE(n_components=2, perplexity=perplexity, initialization="pca", random_state=seed,
                              n_jobs=threads, verbose=False).fit(x)
    return np.asarray(embedding, dtype=np.float32)

