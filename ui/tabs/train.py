"""Train tab: one form → a grid of runs (models × learning rates × batch sizes) queued for the worker at once.

The form's fields carry TrainConfig's names (`ui.fields`), so the page, the `submit_runs` API and "clone into
this form" from the Runs tab all go through the same two functions: `params_to_configs` and `config_to_form`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields as dc_fields
from functools import partial
from pathlib import Path
from typing import Any

import gradio as gr

from shared.training.config import (AUGMENTATIONS, BALANCE_MODES, DEFAULT_MODEL, MAX_TIME_BUDGET_MIN, MIX_MODES,
                                    OPTIMIZERS, SCHEDULERS, ConfigError, TrainConfig,
                                    automatic_progressive_resize, expand_grid)
from shared.training.models import cached_weights_path, confine_weights, list_models

from .. import formatting as fmt
from .. import train_view as view
from ..client import QueueFull, QueueUnavailable
from ..paths import PathError, confine_dataset_path
from . import lr_find, user_error

log = logging.getLogger(__name__)

HELP = ("Choose one or more models and learning rates: every combination becomes one run, trained one after "
        "another by the worker. The defaults give a useful model in minutes on a CPU.")
LR_CHOICES = [("1e-4", 1e-4), ("3e-4", 3e-4), ("1e-3", 1e-3), ("3e-3", 3e-3), ("1e-2", 1e-2)]
BATCH_CHOICES = [16, 32, 64, 128]
IMAGE_SIZES = [64, 96, 128, 160, 192, 224]
MAX_RUNS_PER_SUBMIT = 48
FINETUNE_CHOICES = [("Fine-tune the whole network", "full"), ("Train the new head only (fastest)", "head"),
                    ("Head first, then the whole network", "probe_then_unfreeze")]
# Shown under Fine-tuning while weights are "None": the head-only choices freeze pretrained layers, and there are none.
FINETUNE_SCRATCH_INFO = "From scratch only the whole network can be trained: there are no pretrained layers to freeze."
WEIGHTS_CHOICES = [("ImageNet (pretrained)", "DEFAULT"), ("None (train from scratch)", "none")]
OPTIMIZER_LABELS = {"adamw": "AdamW", "adam": "Adam", "sgd": "SGD (Nesterov)"}
SCHEDULER_LABELS = {"cosine": "Cosine decay", "onecycle": "One-cycle", "plateau": "Reduce on plateau",
                    "none": "Constant"}
AUGMENT_LABELS = {"standard": "Standard (crop, flip, colour)", "light": "Light (flip)",
                  "trivialaugment": "Strong (TrivialAugment)", "none": "None"}
BALANCE_LABELS = {"auto": "Automatic (weighted loss when skewed 3:1 or more)", "none": "Ignore (train and pick the best epoch as if balanced)",
                  "weighted_loss": "Class-weighted loss (1/√class size)", "sampler": "Balanced sampling"}
# List-valued form fields and the TrainConfig field each one expands over.
GRID_FIELDS = {"models": "model", "lrs": "lr", "batch_sizes": "batch_size"}


@dataclass
class TrainUI:
    # form fields by name: TrainConfig field names, plus the grid lists (models, lrs, batch_sizes) and lrs_custom
    fields: dict[str, gr.components.Component] = field(default_factory=dict)
    dataset: gr.Markdown | None = None
    weights_note: gr.Markdown | None = None
    ratio_note: gr.Markdown | None = None
    run_count: gr.Markdown | None = None
    queue_btn: gr.Button | None = None
    result: gr.Markdown | None = None
    lr_finder: lr_find.LrFindUI | None = None


# --- pretrained weights -------------------------------------------------------------------------------------

def weights_file(model: str) -> Path | None:
    """Where torchvision keeps the default ImageNet weights of `model` (what the worker looks up offline); None
    for a model without pretrained weights."""
    return cached_weights_path(model, "DEFAULT")


def default_weights() -> str:
    """'DEFAULT' (ImageNet) when the default model's weights are cached on this machine, else 'none'.

    Why: pretrained weights are by far the better default (minutes instead of hours to a useful model), but a
    machine without network and without the cached file would fail every run at its first step. The page
    cannot probe the network (no outside calls, issue 4), so it trusts the cache: with the file present the
    form starts on ImageNet, without it on 'none', and the note under the choice says how to get the file.
    """
    try:
        path = weights_file(DEFAULT_MODEL)
        return "DEFAULT" if path is not None and path.is_file() else "none"
    except Exception:  # noqa: BLE001 - an odd torchvision/TORCH_HOME setup must not stop the page from loading
        return "none"


def weights_note(models: list[str], weights: str) -> str:
    if weights == "none":
        return ("Training from scratch: fine for simple images, but ImageNet weights learn far faster from few "
                "images.")
    missing = []
    for model in models or []:
        try:
            path = weights_file(model)
        except Exception:  # noqa: BLE001
            continue
        if path is not None and not path.is_file():
            missing.append((model, path))
    if not missing:
        return "✔ ImageNet weights are on this machine."
    lines = ["⚠ **ImageNet weights are not on this machine** — runs download them when they start, which "
             "fails without network. Copy the file(s) by hand, or choose *None*:"]
    lines += [f"- {m}: {fmt.md_code(p)}" for m, p in missing]
    return "\n".join(lines)


# --- layout -------------------------------------------------------------------------------------------------

def build(lab) -> TrainUI:
    ui = TrainUI()
    f = ui.fields
    gr.Markdown(HELP, elem_classes="help")
    ui.dataset = gr.Markdown(elem_id="train-dataset")
    weights = default_weights()
    with gr.Row(equal_height=False):
        with gr.Column():
            f["models"] = gr.CheckboxGroup(list_models(), value=[DEFAULT_MODEL], label="Models",
                                           info="resnet18 is the fastest; the deeper and wider ones learn more "
                                                "from big datasets but are much slower on a CPU.",
                                           elem_id="models")
            f["weights"] = gr.Radio(WEIGHTS_CHOICES, value=weights, label="Pretrained weights", elem_id="weights")
            ui.weights_note = gr.Markdown(weights_note([DEFAULT_MODEL], weights), elem_id="weights-note")
            f["finetune"] = gr.Radio(FINETUNE_CHOICES, label="Fine-tuning", elem_id="finetune",
                                     **{"value": "full", **finetune_state(weights)})
        with gr.Column():
            f["lrs"] = gr.CheckboxGroup(LR_CHOICES, value=[1e-3], label="Learning rates",
                                        info="Tick several to compare them.", elem_id="lrs")
            f["lrs_custom"] = gr.Textbox(label="Other learning rates", placeholder="e.g. 5e-4, 0.002",
                                         elem_id="lrs-custom")
            ui.lr_finder = lr_find.build()
            f["batch_sizes"] = gr.CheckboxGroup(BATCH_CHOICES, value=[32], label="Batch sizes",
                                                elem_id="batch-sizes")
            f["epochs"] = gr.Slider(1, 100, value=5, step=1, label="Epochs", elem_id="epochs")
            f["time_budget"] = gr.Number(0, label="Time budget (minutes, 0 = off)", minimum=0,
                                         maximum=MAX_TIME_BUDGET_MIN, elem_id="time-budget",
                                         info="Set it and the epochs are chosen to fit: the best model this "
                                              "machine can train in that time.")
            f["image_size"] = gr.Dropdown(IMAGE_SIZES, value=128, label="Image size (pixels)",
                                          info="128 trains about 3× faster than 224 on a CPU.", elem_id="image-size")
        with gr.Column():
            f["optimizer"] = gr.Dropdown([(OPTIMIZER_LABELS[o], o) for o in OPTIMIZERS], value="adamw",
                                         label="Optimizer", elem_id="optimizer")
            f["scheduler"] = gr.Dropdown([(SCHEDULER_LABELS[s], s) for s in SCHEDULERS], value="cosine",
                                         label="Learning-rate schedule", elem_id="scheduler")
            f["augment"] = gr.Dropdown([(AUGMENT_LABELS[a], a) for a in AUGMENTATIONS], value="standard",
                                       label="Augmentation", elem_id="augment")
            f["seed"] = gr.Number(0, precision=0, label="Random seed", elem_id="seed")
            f["val_ratio"] = gr.Slider(0.05, 0.45, value=0.15, step=0.05, label="Validation share",
                                       elem_id="val-ratio")
            f["test_ratio"] = gr.Slider(0.0, 0.45, value=0.15, step=0.05, label="Test share", elem_id="test-ratio")
            ui.ratio_note = gr.Markdown(view.ratio_note(0.15, 0.15), elem_id="ratio-note")
    with gr.Accordion("Advanced settings", open=False):
        with gr.Row():
            f["weight_decay"] = gr.Number(0.05, label="Weight decay", minimum=0, maximum=0.99)
            f["label_smoothing"] = gr.Number(0.1, label="Label smoothing", minimum=0, maximum=0.99)
            f["dropout"] = gr.Number(0.0, label="Dropout before the head", minimum=0, maximum=0.99)
            f["warmup_epochs"] = gr.Number(1, precision=0, label="Warm-up epochs", minimum=0)
        with gr.Row():
            f["patience"] = gr.Number(0, precision=0, label="Early-stop patience (0 = off)", minimum=0)
            f["probe_epochs"] = gr.Number(2, precision=0, label="Head-only epochs (head first, then all)",
                                          minimum=1)
            f["device"] = gr.Dropdown(["auto", "cpu", "cuda"], value="auto", label="Device", allow_custom_value=True)
        with gr.Row():
            f["balance"] = gr.Dropdown([(BALANCE_LABELS[b], b) for b in BALANCE_MODES], value="auto",
                                       label="Class imbalance", elem_id="balance")
            f["mix"] = gr.Dropdown(MIX_MODES, value="none", label="Mixup / CutMix", elem_id="mix")
            f["ema_decay"] = gr.Number(0.0, label="Weight average (EMA) decay, 0 = off", minimum=0, maximum=0.9999,
                                       elem_id="ema-decay")
            f["tta"] = gr.Checkbox(False, label="Flip test-time augmentation", elem_id="tta")
            # a dropdown, not a number field: "automatic" must be a value of its own (a Number shows and sends 0: off)
            f["progressive_resize"] = gr.Dropdown(
                view.PROGRESSIVE_CHOICES, value=view.AUTOMATIC, allow_custom_value=True, elem_id="progressive-resize",
                label="Progressive resizing: start at this share of the image size",
                info="e.g. 0.5: the first epochs train on half-size images, growing to full size by 3/4 of the "
                     "epochs (faster epochs; evaluation is at full size). Automatic: 0.5 with a time budget from "
                     "scratch, else off")
    with gr.Row(elem_classes="toolbar"):
        ui.run_count = gr.Markdown(view.grid_count([DEFAULT_MODEL], [1e-3], [32])[1], elem_id="run-count")
        ui.queue_btn = gr.Button("Queue runs", variant="primary", elem_id="queue-btn", scale=0, min_width=180)
    ui.result = gr.Markdown(elem_id="queue-result")
    return ui


# --- form ↔ configs -----------------------------------------------------------------------------------------

def _lrs(values: dict) -> list[float]:
    lrs = [float(x) for x in values.get("lrs") or []]
    custom = values.get("lrs_custom")
    if custom:
        lrs += view.parse_lrs(str(custom))
    return list(dict.fromkeys(lrs))


def count_text(models, lrs, lrs_custom, batch_sizes) -> str:
    try:
        lr_values = _lrs({"lrs": lrs, "lrs_custom": lrs_custom})
    except ValueError as exc:
        return f"⚠ {exc}"
    n, text = view.grid_count(models or [], lr_values, batch_sizes or [])
    if n > MAX_RUNS_PER_SUBMIT:
        text += f" — ⚠ at most {MAX_RUNS_PER_SUBMIT} at once"
    return text


def params_to_configs(lab, params: dict[str, Any]) -> list[TrainConfig]:
    """JSON-able params (form or API) → one validated TrainConfig per grid combination.

    `models`, `lrs`, `batch_sizes` are lists (or give `model`, `lr`, `batch_size` singly); `data_dir` must lie
    inside the data roots; `weights` must be a weights name or a file in the weights folder or the data roots;
    any other key must be a TrainConfig field. Raises ValueError with what to change.
    """
    if not isinstance(params, dict):
        raise ValueError(f"expected a JSON object of training settings, got {type(params).__name__}")
    params = dict(params)
    data_dir = confine_dataset_path(params.pop("data_dir", "") or "", lab.settings.data_roots)
    lists = {}
    for plural, single in GRID_FIELDS.items():
        value = params.pop(plural, None)
        if value is None:
            value = [params.pop(single)] if single in params else None
        params.pop(single, None)
        if value is not None and not isinstance(value, (list, tuple)):
            value = [value]
        if value is not None and len(value) > MAX_RUNS_PER_SUBMIT:
            raise ValueError(f"{plural}: expected at most {MAX_RUNS_PER_SUBMIT} values, got {len(value)} — "
                             "choose fewer")
        lists[single] = value
    custom = params.pop("lrs_custom", None)
    lists["lr"] = _lrs({"lrs": lists["lr"] or [], "lrs_custom": custom}) if (lists["lr"] or custom) else [1e-3]
    lists["model"] = lists["model"] if lists["model"] is not None else [DEFAULT_MODEL]
    lists["batch_size"] = ([_whole("batch_sizes", b) for b in lists["batch_size"]]
                           if lists["batch_size"] is not None else [32])
    known = {f.name for f in dc_fields(TrainConfig)}
    unknown = sorted(map(str, set(params) - known))
    if unknown:
        raise ValueError(f"unknown setting(s) {', '.join(unknown)}; valid: "
                         f"{', '.join(sorted(known | set(GRID_FIELDS) | {'lrs_custom'}))}")
    for key in ("epochs", "image_size", "seed", "warmup_epochs", "patience", "probe_epochs"):
        if params.get(key) is not None:
            params[key] = _whole(key, params[key])
    n = len(lists["model"]) * len(lists["lr"]) * len(lists["batch_size"])
    if n > MAX_RUNS_PER_SUBMIT:
        raise ValueError(f"{n} runs at once is too many — at most {MAX_RUNS_PER_SUBMIT}; choose fewer values")
    if params.get("weights") in (None, ""):
        params["weights"] = default_weights()
    else:  # checked here, before queueing: the worker would load whatever file the config names
        params["weights"] = confine_weights(params["weights"], lists["model"],
                                            [lab.settings.weights_path, *lab.settings.data_roots])
    if params["weights"] == "none":
        params["finetune"] = "full"
    # warm-up must be shorter than the run: a 1-epoch run gets none rather than an error
    epochs = params.get("epochs", 10)
    if isinstance(epochs, int) and params.get("warmup_epochs", 1) >= epochs:
        params["warmup_epochs"] = 0
    return expand_grid({**params, "data_dir": str(data_dir)}, **lists)


def _whole(name: str, value: Any) -> int:
    """A whole number from the form (sliders send 5.0) or the API; 2.5, "ten", inf and NaN are refused by name."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit() and len(value) < 20:
        return int(value)
    raise ValueError(f"{name}: expected a whole number, got {str(value)[:40]!r} — e.g. {name}=10")


def config_to_form(config: dict[str, Any]) -> dict[str, Any]:
    """Form values for a run's config (clone): unknown learning rates go into the free-text box."""
    lr = config.get("lr", 1e-3)
    known_lrs = [v for _, v in LR_CHOICES]
    match = next((v for v in known_lrs if abs(v - lr) < 1e-12), None)
    batch = config.get("batch_size", 32)
    values = {
        "models": [config.get("model", DEFAULT_MODEL)],
        "lrs": [match] if match is not None else [],
        "lrs_custom": "" if match is not None else fmt.fmt_lr(lr),
        "batch_sizes": [batch] if batch in BATCH_CHOICES else [],
    }
    if batch not in BATCH_CHOICES:
        values["batch_sizes"] = [min(BATCH_CHOICES, key=lambda b: abs(b - batch))]
        gr.Warning(f"batch size {batch} is not offered in the form; {values['batch_sizes'][0]} was picked")
    weights = str(config.get("weights", "none"))
    values["weights"] = "none" if weights.lower() == "none" else "DEFAULT"
    for key in ("finetune", "epochs", "image_size", "optimizer", "scheduler", "augment", "seed", "val_ratio",
                "test_ratio", "weight_decay", "label_smoothing", "dropout", "warmup_epochs", "patience",
                "probe_epochs", "device", "time_budget", "balance", "mix", "ema_decay", "tta",
                "progressive_resize"):
        if key in config:
            values[key] = config[key]
    if values.get("progressive_resize") == automatic_progressive_resize(config.get("time_budget") or 0,
                                                                        str(config.get("weights", ""))):
        values["progressive_resize"] = view.AUTOMATIC  # as the cloned run had it: it follows the budget and weights
    return values


def checked_configs(lab, params: dict[str, Any]) -> list[TrainConfig]:
    """`params_to_configs`, its refusals as messages for the person at the page."""
    try:
        return params_to_configs(lab, params)
    except PathError as exc:
        raise user_error(str(exc), title="Folder not allowed") from None
    except (ConfigError, ValueError, TypeError, OverflowError) as exc:
        raise user_error(str(exc), title="Check the settings") from None


def lr_find_config(lab, params: dict[str, Any]) -> TrainConfig:
    """The one config a learning-rate range test runs on: the form's (or the API's) settings for one model at one
    batch size, checked as for queueing runs; the learning rates are left out (the test picks one)."""
    if isinstance(params, dict):
        params = {k: v for k, v in params.items() if k not in ("lr", "lrs", "lrs_custom")}
    configs = checked_configs(lab, params)
    if len(configs) != 1:
        raise user_error(f"the range test is for one model at one batch size, and {len(configs)} combinations are "
                         "chosen — tick one model and one batch size", title="Check the settings")
    return configs[0]


def queue_runs(lab, params: dict[str, Any]) -> list[str]:
    """Validate, then create and send one training task per combination; returns the run ids at once."""
    configs = checked_configs(lab, params)
    try:
        return lab.client().submit(configs)
    except QueueUnavailable as exc:
        raise user_error(str(exc), title="Queue unavailable") from None
    except QueueFull as exc:
        raise user_error(str(exc), title="Too many runs waiting") from None
    except OSError as exc:  # the run folder cannot be created: a read-only or full models folder
        raise user_error(f"cannot create the run folder {exc.filename or lab.settings.models_dir}: {exc.strerror} — "
                         "make the models folder writable and free some disk space, then queue again",
                         title="Models folder not writable") from None


# --- handlers -----------------------------------------------------------------------------------------------

def on_queue(lab, data_dir: str | None, **values) -> str:
    run_ids = queue_runs(lab, view.form_params(values, data_dir))
    gr.Info(f"Queued {len(run_ids)} run{'s' if len(run_ids) != 1 else ''}.")
    listing = "\n".join(f"- `{rid}`" for rid in run_ids[:10]) + ("\n- …" if len(run_ids) > 10 else "")
    return (f"✔ **Queued {len(run_ids)} run{'s' if len(run_ids) != 1 else ''}** — follow them on the "
            f"**Runs** tab.\n{listing}")


def dataset_text(lab, data_dir: str | None) -> str:
    if not data_dir:
        return "⚠ **No dataset chosen** — pick one on the **Data** tab first."
    try:
        path = confine_dataset_path(data_dir, lab.settings.data_roots)
    except PathError as exc:
        return f"⚠ {fmt.md_escape(exc)}"
    return f"Training data: **{fmt.md_escape(path.name)}** ({fmt.md_code(path)}) — change it on the Data tab."


def finetune_state(weights: str) -> dict[str, Any]:
    """Fine-tuning's props for a weights choice: from scratch it is fixed to "full", greyed out (app.CSS), and says
    why; with pretrained weights every choice is open."""
    if weights == "none":
        return {"value": "full", "interactive": False, "info": FINETUNE_SCRATCH_INFO}
    return {"interactive": True, "info": ""}


def on_weights(models, weights):
    return gr.Radio(**finetune_state(weights)), weights_note(models, weights)


def wire(lab, ui: TrainUI, *, data_dir: gr.Dropdown, tab: gr.Tab) -> None:
    f = ui.fields
    count_inputs = [f["models"], f["lrs"], f["lrs_custom"], f["batch_sizes"]]
    gr.on([c.change for c in count_inputs], count_text, count_inputs, ui.run_count, api_visibility="private",
          queue=False, show_progress="hidden")
    gr.on([f["weights"].change, f["models"].change], on_weights, [f["models"], f["weights"]],
          [f["finetune"], ui.weights_note], api_visibility="private", show_progress="hidden")
    gr.on([f["val_ratio"].change, f["test_ratio"].change], view.ratio_note, [f["val_ratio"], f["test_ratio"]],
          ui.ratio_note, api_visibility="private", queue=False, show_progress="hidden")
    gr.on([data_dir.change, tab.select], partial(dataset_text, lab), data_dir, ui.dataset,
          api_visibility="private", show_progress="hidden")
    ui.queue_btn.click(partial(on_queue, lab), inputs=[data_dir], inputs_kwargs=dict(f), outputs=ui.result,
                       api_visibility="private", concurrency_limit=2)
    lr_find.wire(lab, ui.lr_finder, form=f, data_dir=data_dir, config_of=partial(lr_find_config, lab))

    def submit_runs(params: dict) -> list[str]:
        """Queue training runs and return their ids at once.

        params: {"data_dir": "<folder inside the data roots>", "models": ["resnet18"], "lrs": [0.001],
        "batch_sizes": [32]} plus, optionally, any TrainConfig field: "epochs", "image_size", "weights"
        ("DEFAULT" = ImageNet, or "none"), "finetune", "optimizer", "scheduler", "augment", "seed",
        "val_ratio", "test_ratio", ...
        """
        return queue_runs(lab, params)

    gr.api(submit_runs, api_name="submit_runs", concurrency_limit=2)
