"""Pure views for the Train tab: the form's values as parameters, the extra learning rates typed as text, how many
runs a choice queues, and the split the ratios give."""

from __future__ import annotations

from typing import Any, Sequence

from .formatting import plural

# the progressive-resizing dropdown: "automatic" leaves the field out (TrainConfig works it out), or a share
AUTOMATIC = "automatic"
PROGRESSIVE_CHOICES = [("Automatic", AUTOMATIC), ("Off", 0.0), ("0.25", 0.25), ("0.5", 0.5), ("0.75", 0.75)]


def form_params(values: dict[str, Any], data_dir: str | None) -> dict[str, Any]:
    """The form's values as /submit_runs parameters: empty fields left out, shares rounded."""
    params = {k: v for k, v in values.items() if v is not None and v != ""}
    params["data_dir"] = data_dir or ""
    if params.get("progressive_resize") == AUTOMATIC:
        del params["progressive_resize"]
    for key in ("val_ratio", "test_ratio", "weight_decay", "label_smoothing", "dropout", "time_budget", "ema_decay",
                "progressive_resize"):
        if key in params:
            try:
                params[key] = round(float(params[key]), 6)
            except (TypeError, ValueError):  # typed into the dropdown: TrainConfig refuses it by name
                pass
    return params


def parse_lrs(text: str) -> list[float]:
    """Extra learning rates typed as '3e-4, 0.002'; raises ValueError naming the bad item."""
    values = []
    for item in text.replace(";", ",").replace(" ", ",").split(","):
        item = item.strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"learning rate {item!r} is not a number — write e.g. 3e-4 or 0.0003") from None
        if not (0 < value < 10):
            raise ValueError(f"learning rate {item} must be a positive number below 10")
        values.append(value)
    return values


def grid_count(models: Sequence[str], lrs: Sequence[float], batch_sizes: Sequence[int]) -> tuple[int, str]:
    """(runs, sentence) for the Train tab: how many runs a choice queues, and why."""
    n = len(models) * len(lrs) * len(batch_sizes)
    missing = [name for name, values in (("a model", models), ("a learning rate", lrs),
                                         ("a batch size", batch_sizes)) if not values]
    if missing:
        return 0, "Choose " + " and ".join(missing) + " to queue runs."
    detail = " × ".join([plural(len(models), "model"), plural(len(lrs), "learning rate"),
                         plural(len(batch_sizes), "batch size")])
    return n, f"**{plural(n, 'run')} will be queued** ({detail})"


def ratio_note(val: float, test: float) -> str:
    """The split the validation and test shares leave: "Split: **70% train** / 15% validation / 15% test."."""
    train = 1 - (val or 0) - (test or 0)
    warn = " ⚠ keep at least 10% for training" if train < 0.1 else ""
    return f"Split: **{train:.0%} train** / {val or 0:.0%} validation / {test or 0:.0%} test.{warn}"
