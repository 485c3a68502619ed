"""Generated image classes for the issue-15 benchmarks (imbalance, "not sure", LR finder): harder than the tests'
colour-per-class images, so a model does not reach 100% and the differences between recipes show.

A class is a base colour (optionally jittered per image); the stripe/checker pattern of every image is drawn at random (so it says nothing about
the class), with brightness jitter and heavy noise (tests/imagegen.py's `image_array`). Neighbouring classes'
colours are `spread` apart: the smaller, the harder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

PATTERNS = ("hstripes", "vstripes", "checker", "plain")


def class_colour(index: int, spread: float) -> tuple[int, int, int]:
    """Colours on a circle in RGB around mid-grey: class k at angle k * spread radians."""
    angle = index * spread
    return tuple(int(128 + 70 * np.cos(angle + phase)) for phase in (0.0, 2.1, 4.2))


def make_classes(root: Path, counts: Sequence[int], *, size: int = 48, spread: float = 0.5, noise: float = 30.0,
                 colour_jitter: float = 0.0, seed: int = 0, names: Sequence[str] | None = None,
                 first_index: int = 0, by: str = "colour") -> Path:
    """root/<name>/<k>.png for each class, `counts[i]` images of class i (colour index first_index + i).

    colour_jitter: per-image standard deviation added to each channel of the class colour; comparable to the
    distance between classes, it makes them overlap (some images are truly ambiguous, as in real photos).
    by="pattern": the class is the stripe/checker pattern instead (PATTERNS[first_index + i]) and the colour is drawn
    at random per image: every image says its class, but under `noise` a model needs examples to learn it."""
    from PIL import Image

    import common

    common.ensure_repo_on_path()
    from tests.imagegen import image_array

    root = Path(root)
    rng = np.random.default_rng(seed)
    names = list(names or [f"c{first_index + i}" for i in range(len(counts))])
    for i, (name, n) in enumerate(zip(names, counts)):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        colour = np.array(class_colour(first_index + i, spread), dtype=np.float64)
        for k in range(n):
            if by == "pattern":
                shade, pattern = tuple(rng.uniform(60, 200, 3)), PATTERNS[first_index + i]
            else:
                shade = tuple(np.clip(colour + rng.normal(0, colour_jitter, 3), 0, 255)) if colour_jitter else colour
                pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
            arr = image_array(size, colour=shade, pattern=pattern, noise=noise,
                              rng=np.random.default_rng(int(rng.integers(2**31))))
            Image.fromarray(arr, "RGB").save(folder / f"{k:04d}.png")
    return root
