"""Benchmark: scikit-learn TSNE (PCA init) vs openTSNE on ~3,000 x 512 penultimate-like features.

Decides which backend `shared.analysis.explain.tsne_embed` uses (issue 6: "use the faster one that gives equal quality;
target under 15 s on this 2-core machine"). Both run on the same PCA-50 input, as `tsne_embed` does.

Feature sets (pick with --features, default both):
  synthetic  3,000 x 512 non-negative clustered vectors (5 classes of unequal size, each a low-rank Gaussian blob
             with sub-clusters, passed through ReLU like avgpool features) — labels are known, so quality is measurable.
  flowers    512-d avgpool features of a random-weight (seeded) torchvision resnet18 over up to 3,000 photos of
             /work/shared/datasets/flower_photos at 112 px (read in place, features cached under /tmp).
             Random weights give weak class structure; they are here for a realistic feature distribution.
  FILE.npz   any saved features: arrays `x` (N, D) and `y` (N,).

Quality: trustworthiness (k=10, sklearn.manifold.trustworthiness, 1.0 = local neighbourhoods preserved) and
10-NN accuracy in the 2-D embedding (5-fold CV), next to 10-NN accuracy in the PCA-50 input for reference.

Run: .venv/bin/python bench/bench_tsne.py [--features synthetic flowers] [--threads 1] [--repeats 1]

Measured on the 2-core dev machine (shared with other jobs, so wall seconds vary; CPU seconds are steadier):

  features        backend          threads  wall s  CPU s  trust@10  10NN acc 2D  (PCA50 ref)
  flowers 3000    scikit-learn     2         12.9     -     0.989     0.386        0.458   (load ~1.5)
  flowers 3000    openTSNE         2          6.4     -     0.989     0.381        0.458
  flowers 3000    scikit-learn     1         96.2   22.2    0.989     0.389        0.458   (load ~7)
  flowers 3000    openTSNE         1         53.6   11.2    0.989     0.385        0.458
  flowers 3000    scikit-learn     1         29-36  20.6-21.2                              (load ~3)
  flowers 3000    openTSNE         1         16-17  10.3-11.6
  synthetic 3000  scikit-learn     1         30.9   13.9    0.810     0.768        0.809   (load ~7)
  synthetic 3000  openTSNE         1         35.2   12.1    0.808     0.765        0.809
  synthetic 3000  scikit-learn     2        165.3   33.8    0.811     0.769        0.809   (load ~6-11)
  synthetic 3000  openTSNE         2         69.2   20.7    0.807     0.768        0.809

Same quality; openTSNE needs about half the CPU on realistic features, so shared.analysis.explain.tsne_embed uses it
(scikit-learn when openTSNE is not installed), on one thread: on a busy machine the second thread made both slower.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import time
from pathlib import Path

import numpy as np

FLOWERS = Path("/work/shared/datasets/flower_photos")


def synthetic_features(n: int = 3000, dim: int = 512, classes: int = 5, seed: int = 0):
    rng = np.random.default_rng(seed)
    sizes = rng.dirichlet(np.full(classes, 4.0)) * n
    sizes = np.maximum(sizes.astype(int), 50)
    sizes[-1] = n - sizes[:-1].sum()
    xs, ys = [], []
    for c, size in enumerate(sizes):
        centre = rng.gamma(2.0, 0.5, dim) * 0.3
        basis = rng.normal(0, 1, (8, dim)) / np.sqrt(dim) * 6.0       # low-rank within-class spread
        subs = rng.normal(0, 1, (3, dim)) * 0.35                       # three sub-clusters per class
        sub = rng.integers(0, 3, size)
        x = centre + subs[sub] + rng.normal(0, 1, (size, 8)) @ basis + rng.normal(0, 2.5, (size, dim))
        xs.append(np.maximum(x, 0.0))
        ys.append(np.full(size, c))
    return np.concatenate(xs).astype(np.float32), np.concatenate(ys)


def flower_features(limit: int = 3000, size: int = 112):
    import torch
    import torchvision
    from PIL import Image

    files = sorted(p for p in FLOWERS.rglob("*") if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    classes = sorted({p.parent.name for p in files})
    rng = np.random.default_rng(0)
    files = [files[i] for i in sorted(rng.permutation(len(files))[:limit])]
    key = hashlib.sha1(("|".join(map(str, files)) + str(size)).encode()).hexdigest()[:12]
    cache = Path(f"/tmp/bench_tsne_flowers_{key}.npz")
    if cache.exists():
        data = np.load(cache)
        return data["x"], data["y"]
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None).eval()
    feats = []
    model.avgpool.register_forward_hook(lambda m, i, o: feats.append(o.flatten(1).numpy().copy()))
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    t0 = time.perf_counter()
    batch = []
    with torch.no_grad():
        for i, path in enumerate(files):
            img = Image.open(path).convert("RGB")
            img.draft("RGB", (size * 2, size * 2))
            img = img.resize((size, size), Image.BILINEAR)
            t = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
            batch.append((t - mean) / std)
            if len(batch) == 64 or i == len(files) - 1:
                model(torch.stack(batch))
                batch = []
    x = np.concatenate(feats).astype(np.float32)
    y = np.array([classes.index(p.parent.name) for p in files])
    print(f"flower features: {x.shape} in {time.perf_counter() - t0:.1f} s (cached at {cache})")
    np.savez(cache, x=x, y=y)
    return x, y


def pca50(x: np.ndarray) -> np.ndarray:
    from sklearn.decomposition import PCA

    return PCA(n_components=min(50, *x.shape), random_state=0).fit_transform(x).astype(np.float32)


def run_sklearn(x, seed, threads):
    from sklearn.manifold import TSNE

    return TSNE(2, init="pca", learning_rate="auto", perplexity=30, random_state=seed, n_jobs=threads).fit_transform(x)


def run_opentsne(x, seed, threads):
    import openTSNE

    return np.asarray(openTSNE.TSNE(2, perplexity=30, initialization="pca", random_state=seed, n_jobs=threads).fit(x))


def quality(x_in, emb, y):
    from sklearn.manifold import trustworthiness
    from sklearn.model_selection import cross_val_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(10)
    return {"trust": trustworthiness(x_in, emb, n_neighbors=10),
            "knn2d": cross_val_score(knn, emb, y, cv=5).mean()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", nargs="+", default=["synthetic", "flowers"])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    backends = {"sklearn TSNE(init=pca)": run_sklearn}
    try:
        import openTSNE  # noqa: F401
        backends["openTSNE"] = run_opentsne
    except ImportError:
        print("openTSNE not installed: `pip install openTSNE` to compare")

    print(f"threads={args.threads} repeats={args.repeats} load average before: {os.getloadavg()[0]:.1f} "
          f"(wall seconds suffer from other processes on a shared machine; CPU seconds much less)")
    print(f"{'features':<14} {'backend':<24} {'wall s':>7} {'CPU s':>7} {'trust@10':>9} {'10NN acc 2D':>12} "
          f"{'10NN acc PCA50':>15}")
    for name in args.features:
        if name == "synthetic":
            x, y = synthetic_features()
        elif name == "flowers":
            x, y = flower_features()
        else:
            data = np.load(name)
            x, y = data["x"], data["y"]
        with threadpool_limits(args.threads):
            t0, c0 = time.perf_counter(), time.process_time()
            x50 = pca50(x)
            t_pca, c_pca = time.perf_counter() - t0, time.process_time() - c0
            from sklearn.model_selection import cross_val_score
            from sklearn.neighbors import KNeighborsClassifier
            ref = cross_val_score(KNeighborsClassifier(10), x50, y, cv=5).mean()
            for backend, fn in backends.items():
                times, cpu, q = [], [], None
                for r in range(args.repeats):
                    t0, c0 = time.perf_counter(), time.process_time()
                    emb = fn(x50, r, args.threads)
                    times.append(time.perf_counter() - t0 + t_pca)
                    cpu.append(time.process_time() - c0 + c_pca)
                    q = quality(x50, emb, y) if q is None else q
                print(f"{name + ' ' + str(x.shape[0]):<14} {backend:<24} {np.median(times):7.1f} {np.median(cpu):7.1f} "
                      f"{q['trust']:9.3f} {q['knn2d']:12.3f} {ref:15.3f}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
