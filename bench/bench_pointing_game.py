"""Benchmark: which heat-map points at the object? Grad-CAM on layer4 (the old default) and layer3 vs LayerCAM.

The pointing game (Zhang et al., 2016, arXiv:1608.00507) on generated scenes (`tests.imagegen.pointing_scene`):
one object whose shape alone decides the class (ring, plus, cross; random colour, ~30% of the side) at a random
place, and filled discs and squares of random colours elsewhere. For each model and input size, a model of the
registry is trained from scratch on fresh scenes, then every correctly classified test scene counts a hit for a
method when that method's map peaks on the object: inside its box widened by the game's usual tolerance (15 px at
224 px, scaled with the size). "strict" is the same without the tolerance. Chance is what a peak at a random place
would score (the widened box's share of the image).

Every method is timed on the same batches in the same process, the order rotated batch by batch; the figure is
milliseconds per image (batch 32, forward + backward + maps), and the ratio to Grad-CAM on layer4.

Run: .venv/bin/python bench/bench_pointing_game.py [--models tiny_resnet resnet18] [--sizes 64 128 224]
     [--json bench/results/pointing_game.json]  (about 25 min on two busy cores; --quick: seconds, for CI)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import finish, print_table, set_threads, verdict  # noqa: E402

TARGET = 0.90  # issue 16: the chosen map's peak on the object for >= 90% of correctly classified images at 128 px
TOLERANCE_AT_224 = 15  # px, the pointing game's tolerance


def variants(spec) -> dict:
    """Name → (model → explainer). Stage module paths come from the spec, so any registered ResNet works."""
    from shared.analysis.explain import DEFAULT_CAM, GradCAM, LayerCAM, create_cam

    paths = [path for _, path in spec.stages]
    l2, l3, l4 = paths[-3], paths[-2], paths[-1]
    return {
        "gradcam-l4": lambda m: GradCAM(m, spec, layer=l4),
        "gradcam-l3": lambda m: GradCAM(m, spec, layer=l3),
        "layercam-l4": lambda m: LayerCAM(m, spec, layers=(l4,)),
        "layercam-l3+4": lambda m: LayerCAM(m, spec, layers=(l3, l4)),
        "layercam-l2..4": lambda m: LayerCAM(m, spec, layers=(l2, l3, l4)),
        "layercam-l2..4-max": lambda m: LayerCAM(m, spec, layers=(l2, l3, l4), fuse="max"),
        "layercam-l3+4-geo": lambda m: LayerCAM(m, spec, layers=(l3, l4), fuse="geomean"),
        "layercam-l2..4-geo": lambda m: LayerCAM(m, spec, layers=(l2, l3, l4), fuse="geomean"),
        f"default ({DEFAULT_CAM})": lambda m: create_cam(m, spec),
    }


def to_tensor(images: np.ndarray):
    import torch

    from shared.training.models import IMAGENET_MEAN, IMAGENET_STD

    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()  # NCHW: the permuted (channels-last) tensor crashed a 224 px backward in libtorch_cpu


def train(model_name: str, size: int, n_train: int, epochs: int, seed: int, batch: int = 32):
    """A model of the registry trained from scratch on `n_train` fresh scenes; (model, seconds)."""
    import torch
    import torch.nn.functional as F

    from shared.training.models import create_model
    from tests.imagegen import POINTING_CLASSES, pointing_dataset

    torch.manual_seed(seed)
    images, labels, _ = pointing_dataset(n_train, size, seed=seed)
    x, y = to_tensor(images), torch.from_numpy(labels).long()
    model = create_model(model_name, len(POINTING_CLASSES), "none")
    optimizer = torch.optim.AdamW(model.parameters(), 2e-3, weight_decay=1e-4)
    steps = epochs * (n_train // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 4e-3, total_steps=steps, pct_start=0.2)
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    model.train()
    for _ in range(epochs):
        order = torch.randperm(n_train, generator=generator)
        for start in range(0, n_train - batch + 1, batch):
            idx = order[start:start + batch]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    model.eval()
    model.zero_grad(set_to_none=True)
    return model, time.perf_counter() - t0


def on_object(peak: tuple[float, float], box: Sequence[int], tolerance: float) -> bool:
    r, c = peak
    return box[0] - tolerance <= r < box[2] + tolerance and box[1] - tolerance <= c < box[3] + tolerance


def save_examples(folder: Path, model_name: str, size: int, model, x, targets, makers: dict) -> None:
    """A sheet of overlays (rows: scenes; columns: the scene, then each method) to look at, beside the figures."""
    from PIL import Image

    from shared.analysis.explain import overlay_cam
    from shared.analysis.plots import image_grid
    from shared.training.models import IMAGENET_MEAN, IMAGENET_STD

    mean, std = np.asarray(IMAGENET_MEAN).reshape(3, 1, 1), np.asarray(IMAGENET_STD).reshape(3, 1, 1)
    views = [Image.fromarray((np.clip(t.numpy() * std + mean, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0))
             for t in x]
    maps = {name: make(model).batch(x, targets.tolist())[0] for name, make in makers.items()}
    images, titles = [], []
    for i, view in enumerate(views):
        images.append(view)
        titles.append("scene")
        for name, cams in maps.items():
            images.append(overlay_cam(view, cams[i]))
            titles.append(name)
    folder.mkdir(parents=True, exist_ok=True)
    image_grid(images, titles, ncols=1 + len(maps), cell=128,
               suptitle=f"{model_name} at {size} px").save(folder / f"pointing_{model_name}_{size}.png")


def play(model_name: str, size: int, n_train: int, n_test: int, epochs: int, seed: int,
         figure: Path | None = None) -> dict:
    import torch

    from shared.analysis.explain import cam_peak
    from shared.training.models import get_spec
    from tests.imagegen import pointing_dataset

    spec = get_spec(model_name)
    model, train_s = train(model_name, size, n_train, epochs, seed)
    images, labels, boxes = pointing_dataset(n_test, size, seed=seed + 1000)
    x = to_tensor(images)
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 64]).argmax(1) for i in range(0, n_test, 64)]).numpy()
    correct = np.nonzero(pred == labels)[0]
    tolerance = TOLERANCE_AT_224 * size / 224
    makers = variants(spec)
    names = list(makers)
    peaks: dict[str, list] = {n: [] for n in names}
    seconds = {n: 0.0 for n in names}
    map_size: dict[str, str] = {}
    chunks = [correct[i:i + 32] for i in range(0, len(correct), 32)]
    for k, chunk in enumerate(chunks):
        order = names[k % len(names):] + names[:k % len(names)]  # rotate: load drifts hit every method alike
        for name in order:
            explainer = makers[name](model)
            t0 = time.perf_counter()
            cams, _ = explainer.batch(x[chunk], pred[chunk].tolist())
            seconds[name] += time.perf_counter() - t0
            map_size[name] = explainer.resolution(x.shape[-2:])
            peaks[name] += [cam_peak(c) for c in cams]
    n = max(1, len(correct))
    if figure is not None:
        save_examples(figure, model_name, size, model, x[correct[:4]], pred[correct[:4]], makers)
    area = [min(size, b[2] + tolerance) - max(0, b[0] - tolerance) for b in boxes[correct]]
    area = [a * (min(size, b[3] + tolerance) - max(0, b[1] - tolerance)) / size ** 2
            for a, b in zip(area, boxes[correct])]
    methods = {}
    for name in names:
        hits = [on_object(p, boxes[i], tolerance) for p, i in zip(peaks[name], correct)]
        strict = [on_object(p, boxes[i], 0) for p, i in zip(peaks[name], correct)]
        methods[name] = {"hit": float(np.mean(hits)) if hits else float("nan"),
                         "strict": float(np.mean(strict)) if strict else float("nan"),
                         "ms_per_image": 1000 * seconds[name] / n, "map": map_size.get(name, "-")}
    base = methods["gradcam-l4"]["ms_per_image"]
    for name in names:
        methods[name]["time_vs_gradcam_l4"] = methods[name]["ms_per_image"] / base if base > 0 else float("nan")
    return {"model": model_name, "size": size, "train_images": n_train, "epochs": epochs, "train_s": train_s,
            "test_images": n_test, "accuracy": float(np.mean(pred == labels)), "correct": int(len(correct)),
            "chance": float(np.mean(area)) if area else float("nan"), "tolerance_px": tolerance, "methods": methods}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["tiny_resnet", "resnet18"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[64, 128, 224])
    parser.add_argument("--train", type=int, default=0, help="training scenes (0: 2400, 1200 at 224 px)")
    parser.add_argument("--test", type=int, default=300, help="test scenes")
    parser.add_argument("--epochs", type=int, default=0, help="epochs (0: 4, 3 at 224 px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figures", type=Path, default=None, metavar="DIR",
                        help="also save a sheet of example overlays per model and size here")
    parser.add_argument("--quick", action="store_true", help="tiny sizes so the script runs in seconds (CI)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the results here")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.command = " ".join([".venv/bin/python", "bench/bench_pointing_game.py", *argv])
    if args.quick:
        args.models, args.sizes, args.test = ["tiny_resnet"], [32], 24
        args.threads = args.threads or 1
    set_threads(args.threads)
    from tests.tinymodel import register_tiny_resnet

    register_tiny_resnet()
    results = []
    for model_name in args.models:
        for size in args.sizes:
            n_train = 48 if args.quick else args.train or (1200 if size >= 224 else 2400)
            epochs = 1 if args.quick else args.epochs or (3 if size >= 224 else 4)
            res = play(model_name, size, n_train, args.test, epochs, args.seed, args.figures)
            results.append(res)
            hits = ", ".join(f"{name} {m['hit']:.0%}" for name, m in res["methods"].items())
            print(f"{model_name} {size} px: accuracy {res['accuracy']:.1%}, {res['correct']} correct, "
                  f"trained {res['train_s']:.0f} s; peak on the object: {hits}", flush=True)
    names = list(results[0]["methods"])
    rows = [{"model": r["model"], "px": r["size"], "acc": f"{r['accuracy']:.0%}", "n": r["correct"],
             "chance": f"{r['chance']:.0%}",
             **{name: f"{m['hit']:.0%} ({m['strict']:.0%})" for name, m in r["methods"].items()}} for r in results]
    print_table(rows, title="Peak on the object, correctly classified scenes: with tolerance (strict)")
    print_table([{"model": r["model"], "px": r["size"], **{name: m["map"].split(" over")[0].replace("heat-map ", "")
                                                             for name, m in r["methods"].items()}} for r in results],
                title="Heat-map resolution")
    print_table([{"model": r["model"], "px": r["size"],
                  **{name: f"{m['ms_per_image']:.1f} ({m['time_vs_gradcam_l4']:.2f}x)"
                     for name, m in r["methods"].items()}} for r in results],
                title="Milliseconds per image (ratio to gradcam-l4)")
    default = names[-1]
    judged = [r for r in results if r["size"] == 128]
    ok = bool(judged) and all(r["methods"][default]["hit"] >= TARGET
                              and r["methods"][default]["hit"] > r["methods"]["gradcam-l4"]["hit"] for r in judged)
    judgement = verdict(ok, args.quick) if judged else "n/a (no 128 px run)"
    print(f"\ntarget: {default} >= {TARGET:.0%} at 128 px and above gradcam-l4: {judgement}")
    return finish(args, "pointing_game", {"results": results, "target": TARGET, "default": default,
                                          "verdict": judgement})


if __name__ == "__main__":
    main()
