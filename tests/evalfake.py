"""An eval.json built from random arrays by the real metrics code (no model): for tests of its readers."""

from __future__ import annotations

import numpy as np

from shared.analysis.eval_result import EvalResult, skipped_figures_for
from shared.analysis.metrics import compute_metrics


def fake_eval(classes: list[str], *, run_id: str = "20260101-000000-resnet18-abcdef", n: int = 60, seed: int = 0,
              figure_level: str = "all", **fields) -> dict:
    """eval.json's contents (schema-checked) for `n` random predictions over `classes`; `fields` override."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, len(classes), n)
    p = rng.dirichlet(np.ones(len(classes)), n)
    paths = [f"{classes[k]}/img{i}.jpg" for i, k in enumerate(y)]
    result = compute_metrics(y, p, classes, paths=paths)
    tsne = None
    if figure_level == "all":
        tsne = {"x": rng.normal(size=n).round(3).tolist(), "y": rng.normal(size=n).round(3).tolist(),
                "label": y.tolist(), "pred": p.argmax(1).tolist(), "path": paths, "seconds": 0.1}
    result.update({"run_id": run_id, "split": "test", "source": "test split", "model": "resnet18", "image_size": 64,
                   "skipped": [], "losses": {"mean": result["loss"], "max": result["loss"] * 3}, "tsne": tsne,
                   "figures": {}, "figure_level": figure_level, "skipped_figures": skipped_figures_for(figure_level),
                   "timings": {}, **fields})
    return EvalResult.from_dict(result).to_dict()
