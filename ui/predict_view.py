"""Pure views for the Predict tab: the top-5 for gr.Label."""

from __future__ import annotations

from typing import Any, Iterable, Mapping


def top5_dict(top: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Predictor top-k list → {class: probability} for gr.Label."""
    return {item["class"]: float(item["probability"]) for item in top}
