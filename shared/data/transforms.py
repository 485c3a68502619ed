"""Transform presets.

Training images come from the decoded cache as uint8 squares of side `resize_size(image_size)`
(short side resized, centre-cropped square; aspect ratio is never squashed). Augmentation runs on
whole batches of tensors — on the GPU when there is one — instead of per image through PIL:
random-resized-crop, flip and rotation are folded into one affine `grid_sample` call per batch.
With progressive resizing a training batch is produced at a smaller side than `image_size` (the source squares
shrunk with antialiasing first); evaluation is always at `image_size`.
We write this ourselves because torchvision's v2 transforms draw one set of random parameters per
call, so per-image randomness would need a Python loop per image; one batched op is far cheaper
and keeps a GPU fed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from shared.training.config import AUGMENTATIONS

# Eval resizes the short side to size / 0.875 then centre-crops `size` (the torchvision reference recipe).
CROP_FRACTION = 0.875


# Progressive resizing (fastai's and FFCV's recipe: small images early, full size late): the training side grows
# linearly from `start x image_size` over the first PROGRESSIVE_RAMP_SHARE of the epochs; the rest train at
# image_size, so the network ends adapted to the size it is evaluated at. Sides are multiples of SIDE_MULTIPLE.
PROGRESSIVE_RAMP_SHARE = 0.75
SIDE_MULTIPLE = 16


def resize_size(image_size: int) -> int:
    return int(round(image_size / CROP_FRACTION))


def progressive_start(image_size: int, start: float) -> int:
    """The first (smallest) training side: `start x image_size` rounded to a multiple of 16, at most image_size."""
    side = round(start * image_size / SIDE_MULTIPLE) * SIDE_MULTIPLE
    return min(image_size, max(SIDE_MULTIPLE, side))


def progressive_sizes(image_size: int, start: float, epochs: int) -> list[int]:
    """The training side of each of `epochs` epochs, rising from `progressive_start` to image_size, reached after
    PROGRESSIVE_RAMP_SHARE of them (a 1-epoch run trains at full size); start 0 (off): image_size throughout."""
    ramp = int(epochs * PROGRESSIVE_RAMP_SHARE) if start else 0
    return [progressive_start(image_size, start + (1 - start) * k / ramp) if k < ramp else image_size
            for k in range(epochs)]


def eval_transform(image_size: int, mean, std) -> v2.Compose:
    """PIL RGB image → normalised float tensor (3, image_size, image_size), as the model saw val images."""
    return v2.Compose([
        v2.ToImage(),
        v2.Resize(resize_size(image_size), antialias=True),
        v2.CenterCrop(image_size),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(list(mean), list(std)),
    ])


@dataclass(frozen=True)
class AugmentParams:
    crop_scale: tuple[float, float]  # fraction of the source square's area kept by the random crop
    flip: bool
    max_rotation_deg: float
    jitter: float  # brightness/contrast/saturation factor range 1 ± jitter
    trivial_augment: bool = False


PRESETS: dict[str, AugmentParams | None] = {
    "none": None,
    "light": AugmentParams(crop_scale=(0.6, 1.0), flip=True, max_rotation_deg=0.0, jitter=0.0),
    "standard": AugmentParams(crop_scale=(0.25, 1.0), flip=True, max_rotation_deg=10.0, jitter=0.2),
    "trivialaugment": AugmentParams(crop_scale=(0.25, 1.0), flip=True, max_rotation_deg=0.0, jitter=0.0,
                                    trivial_augment=True),
}
assert set(PRESETS) == set(AUGMENTATIONS)


class BatchTransform:
    """uint8 batch (B, 3, S, S) → normalised float batch (B, 3, image_size, image_size), augmented when training;
    a training batch at a smaller `size` when asked (progressive resizing)."""

    def __init__(self, preset: str, image_size: int, mean, std):
        if preset not in PRESETS:
            raise ValueError(f"unknown augmentation {preset!r}; choose one of {', '.join(PRESETS)}")
        self.params = PRESETS[preset]
        self.image_size = image_size
        self.mean = torch.tensor(mean).view(1, 3, 1, 1)
        self.std = torch.tensor(std).view(1, 3, 1, 1)
        self._trivial = v2.TrivialAugmentWide() if self.params and self.params.trivial_augment else None

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def centre(self, batch: torch.Tensor, size: int | None = None) -> torch.Tensor:
        size = size or self.image_size
        if size != self.image_size:
            batch = self._shrink(batch.float().div_(255), size)
        side = batch.shape[-1]
        top = (side - size) // 2
        crop = batch[..., top:top + size, top:top + size]
        return self._normalise(crop.float().div_(255) if crop.dtype == torch.uint8 else crop)

    def __call__(self, batch: torch.Tensor, train: bool, generator: torch.Generator | None = None,
                 size: int | None = None) -> torch.Tensor:
        """`size`: the side of a training batch (progressive resizing), image_size when None; evaluation
        (train=False) is always at image_size."""
        size = (size or self.image_size) if train else self.image_size
        if not train or self.params is None:
            return self.centre(batch, size)
        p = self.params
        if self._trivial is not None:
            # TrivialAugmentWide draws one op per call, so it runs per image (cheap next to the model)
            batch = torch.stack([self._trivial(img) for img in batch])
        x = self._shrink(batch.float().div_(255), size)
        x = self._affine(x, p, generator, size)
        if p.jitter > 0:
            x = self._jitter(x, p.jitter, generator)
        return self._normalise(x)

    def _shrink(self, x: torch.Tensor, size: int) -> torch.Tensor:
        """The source squares scaled by size / image_size, antialiased: the crop's bilinear resampling alone would
        alias at half the side. The saving of a smaller side is in the model's forward and backward passes."""
        if size == self.image_size:
            return x
        side = max(size, round(x.shape[-1] * size / self.image_size))
        return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)

    def _uniform(self, n: int, low: float, high: float, generator, device) -> torch.Tensor:
        return (torch.rand(n, generator=generator) * (high - low) + low).to(device)

    def _affine(self, x: torch.Tensor, p: AugmentParams, generator, size: int) -> torch.Tensor:
        """Random resized crop + horizontal flip + small rotation, as one batched affine resample."""
        n, dev = x.shape[0], x.device
        area = self._uniform(n, *p.crop_scale, generator, dev)
        log_ratio = self._uniform(n, math.log(3 / 4), math.log(4 / 3), generator, dev)
        ratio = torch.exp(log_ratio)
        # crop width/height as fractions of the source side, clipped to the image
        w = torch.sqrt(area * ratio).clamp(max=1.0)
        h = torch.sqrt(area / ratio).clamp(max=1.0)
        cx = self._uniform(n, -1, 1, generator, dev) * (1 - w)
        cy = self._uniform(n, -1, 1, generator, dev) * (1 - h)
        if p.flip:
            w = torch.where(torch.rand(n, generator=generator).to(dev) < 0.5, -w, w)
        angle = self._uniform(n, -1, 1, generator, dev) * math.radians(p.max_rotation_deg)
        cos, sin = torch.cos(angle), torch.sin(angle)
        theta = torch.stack([
            torch.stack([w * cos, -w * sin, cx], dim=1),
            torch.stack([h * sin, h * cos, cy], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, [n, 3, size, size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)

    def _jitter(self, x: torch.Tensor, amount: float, generator) -> torch.Tensor:
        n, dev = x.shape[0], x.device
        shape = (n, 1, 1, 1)
        brightness = self._uniform(n, 1 - amount, 1 + amount, generator, dev).view(shape)
        contrast = self._uniform(n, 1 - amount, 1 + amount, generator, dev).view(shape)
        saturation = self._uniform(n, 1 - amount, 1 + amount, generator, dev).view(shape)
        x = x * brightness
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray.mean(dim=(2, 3), keepdim=True)) * contrast + gray.mean(dim=(2, 3), keepdim=True)
        gray = (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])
        x = (x - gray) * saturation + gray
        return x.clamp_(0, 1)
