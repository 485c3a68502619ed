"""Model plugins (RESNET_LAB_MODEL_PLUGINS) for the command line: loaded when the model registry is first imported.

The registry (`shared.training.models`) imports torch and torchvision, seconds of CPU; most commands (`up`, `data
check`, `runs`, `predict --queue`) build no model. So the CLI hands its plugins to `defer`, and the registry loads
them as it is imported: a command that never needs a model never pays for them, and one that does gets them before
it looks up a name. The page and the worker load theirs at start (both build models anyway).
"""

from __future__ import annotations

import sys
from typing import Sequence

_pending: list[str] = []


def defer(plugins: Sequence[str]) -> None:
    """Load `plugins` ("module:function") when the registry is imported (now, if it already is)."""
    if "shared.training.models" in sys.modules:
        from shared.training.models import load_model_plugins

        load_model_plugins(plugins)
    else:
        _pending.extend(plugins)


def take_pending() -> list[str]:
    """The deferred plugins, once: the registry calls this as its module is imported."""
    taken = list(_pending)
    _pending.clear()
    return taken
