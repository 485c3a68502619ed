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


def client_file(lab, payload) -> tuple[bytes, str]:
    """(bytes, display name) of a file the client names (FileData dict, path, or data: URL), through the one guard
    for client-named files (ui/guard.py: uploads and the data roots only, regular files, at most the upload cap)."""
    from ..guard import FileRefused, UploadError

    try:
        return lab.files.read(payload)
    except FileRefused as exc:
        raise user_error(str(exc), title="Upload the image again") from None
    except UploadError as exc:
        raise user_error(str(exc), title="Not a usable upload") from None


MAX_RUN_IDS = 500  # run ids one API call may name (the store's runs fit; a flood of ids does not)


def shown(value) -> str:
    """A user's value as it may appear in a message: repr'd and cut short (a 100 kB id is not echoed back)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def run_ids_arg(value, *, title: str = "Unknown run") -> list[str]:
    """The list of run ids an API call named, checked at the edge: a list of at most MAX_RUN_IDS short texts."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or len(value) > MAX_RUN_IDS:
        raise user_error(f"expected a list of at most {MAX_RUN_IDS} run ids, got {shown(value)}", title=title)
    bad = next((v for v in value if not isinstance(v, str) or not v or len(v) > 120), None)
    if bad is not None:
        raise user_error(f"no run {shown(bad)} — run ids are listed by /run_status", title=title)
    return value


# --- native plots ---------------------------------------------------------------------------------------------
# Gradio 6.31's LinePlot/BarPlot/ScatterPlot (Vega) keep the colour legend of their first data: a new DataFrame
# redraws the lines but not the legend, and an update that sets the value and other props in one message is not
# applied at all. What works (checked in Chromium): send the DataFrame, then, in a chained `.then` step, change a
# prop the plot rebuilds on (caption, y_lim). So handlers return plain DataFrames and park the props in their
# session state under "plots"; `plot_props_step` sends them once, after the data.

def park_plot_props(state: dict, name: str, **props) -> None:
    """Remember props (caption=..., y_lim=...) to send to plot `name` after its new data."""
    state.setdefault("plots", {})[name] = props


def plot_props_step(state: dict | None, plots: dict[str, gr.components.Component],
                    state_output: gr.State) -> dict:
    """The chained step: each plot (by its parked name) gets its parked props when they changed since last sent,
    as an update of its own kind; the others are not sent."""
    state = dict(state or {})
    parked, sent = state.get("plots", {}), dict(state.get("plots_sent", {}))
    out = {}
    for name, plot in plots.items():
        props = parked.get(name)
        if props is not None and sent.get(name) != props:
            out[plot] = type(plot)(**props)
            sent[name] = props
    state["plots_sent"] = sent
    return {**out, state_output: state}
