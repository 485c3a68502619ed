"""One module per tab of the page; each has `build(lab)` (layout) and `wire(lab, ui, ...)` (events)."""

from __future__ import annotations

import logging

import gradio as gr

log = logging.getLogger("ui")


def user_error(message: str, title: str = "Error") -> gr.Error:
    """A message for the person at the page (no traceback anywhere: it is their input, not our bug).

    Gradio prints the traceback of every gr.Error to the server console by default; these are expected, so the
    log gets one line instead.
    """
    log.info("refused (%s): %s", title, message)
    return gr.Error(message, title=title, print_exception=False)
