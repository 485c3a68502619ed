"""The `resnet-lab` command: data, train, evaluate, report, predict, runs, and the app processes (up/ui/worker).

Every TrainConfig field is a `train` flag (generated from the dataclass, so the two never drift apart).
User errors print one line and exit 2; tracebacks are for bugs only.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from shared.settings import Settings

log = logging.getLogger("resnet_lab")

# field name → help text; fields without an entry still get a flag
TRAIN_HELP = {
    "data_dir": "dataset folder with one sub-folder per class (required)",
    # written out rather than read from the registry, so `--help` does not import torch; tests/test_models.py
    # checks it names every registered model
    "model": "architecture, torchvision's ResNet family: resnet18 (fastest), resnet34, resnet50, resnet101, "
             "resnet152, resnext50_32x4d, resnext101_32x8d, resnext101_64x4d, wide_resnet50_2, wide_resnet101_2",
    "weights": "IMAGENET1K_V1, IMAGENET1K_V2 (all but resnet18/34 and resnext101_64x4d), DEFAULT (the best ImageNet "
               "weights), none (from scratch) or a state-dict file",
    "finetune": "full, head (linear probe on cached features) or probe_then_unfreeze",
    "image_size": "square input size in pixels (128 is ~3x faster than 224 on CPU)",
    "augment": "none, light, standard or trivialaugment",
    "scheduler": "cosine (with warm-up), onecycle, plateau or none",
    "optimizer": "adamw, adam or sgd (Nesterov)",
    "patience": "early stopping: epochs without val-accuracy gain (0 = off)",
    "device": "auto, cpu, cuda or cuda:N",
    "time_budget": "minutes for the whole run: the epochs are chosen to fit (timed on real steps); 0 = use --epochs",
    "balance": "class imbalance: auto (weighted loss when the largest class is >= 3x the smallest), none, "
               "weighted_loss or sampler",
    "ema_decay": "average of the weights, evaluated and saved instead of them (e.g. 0.999; 0 = off)",
    "tta": "flip test-time augmentation at validation, evaluation and prediction",
    "mix": "none, mixup, cutmix or both",
    "progressive_resize": "progressive resizing: train first at this share of --image-size (e.g. 0.5), growing to "
                          "full size by 3/4 of the epochs; evaluation is at full size (0 = off; not given: 0.5 with "
                          "--time-budget and --weights none, else off)",
    "target_precision": "the 'not sure' threshold is chosen on validation for this precision",
    "lr": "learning rate, or 'auto': a learning-rate range test picks it (resnet-lab lr-find)",
}


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from shared.training.config import TrainConfig

    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        help_text = TRAIN_HELP.get(f.name, "")
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default,
                                help=help_text or f"(default {default})")
            continue
        kind = {"int": int, "float": float, "float | None": float}.get(str(f.type), str)
        if f.name == "lr":
            kind = _lr_value
        # required fields are checked in `_train_config`: `--resume RUN` reads them from the run instead
        required = default is dataclasses.MISSING
        shown_default = "" if required or default is None else f" (default {default})"  # None: worked out per run
        parser.add_argument(flag, type=kind, default=None if required else default,
                            help=f"{help_text}{shown_default}".strip())


def _lr_value(text: str) -> float | str:
    """A learning rate, or 'auto' (the range test picks it)."""
    if text == "auto":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or 'auto', got {text!r}") from None


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability between 0 and 1, got {text!r}")
    return value


def _train_config(args: argparse.Namespace):
    from shared.training.config import ConfigError, TrainConfig

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)}
    if values["data_dir"] is None:
        raise ConfigError("--data-dir is required: a folder with one sub-folder per class (or --resume RUN to "
                          "continue a run)")
    values["data_dir"] = str(Path(values["data_dir"]).expanduser().resolve())
    if values["lr"] == "auto":  # a valid placeholder; cmd_train replaces it with the range test's suggestion
        values["lr"] = 1e-3
        return TrainConfig(**values), True
    return TrainConfig(**values), False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-lab", description=__doc__.splitlines()[0])
    parser.add_argument("--models-dir", help="run store folder (env RESNET_LAB_MODELS_DIR, default ./models)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="download, check or clean a dataset").add_subparsers(dest="data_command",
                                                                                       required=True)
    check = data.add_parser("check", help="count classes, find unreadable files and duplicates")
    check.add_argument("dir", help="dataset folder (one sub-folder per class)")
    check.add_argument("--json", action="store_true", help="print the report as JSON")
    issues = data.add_parser("issues", help="rank likely label errors, near-duplicates and outliers with a run")
    issues.add_argument("dir", help="dataset folder (the run's classes)")
    issues.add_argument("--run", required=True, help="run id or 'latest': its best checkpoint gives the features")
    issues.add_argument("--csv", help="also write every row to this CSV file")
    issues.add_argument("--limit", type=int, default=50, help="rows to print (0: all; default 50)")
    relabel = data.add_parser("relabel", help="record that an image belongs to another class (the photo stays)")
    relabel.add_argument("dir", help="dataset folder")
    relabel.add_argument("file", help="image path relative to the dataset, e.g. roses/123.jpg")
    relabel.add_argument("label", help="the class it really is (one of the class folders)")
    exclude = data.add_parser("exclude", help="leave an image out of future splits (the photo stays)")
    exclude.add_argument("dir", help="dataset folder")
    exclude.add_argument("file", help="image path relative to the dataset")
    undo = data.add_parser("undo", help="undo the newest relabel or exclude")
    undo.add_argument("dir", help="dataset folder")
    changes = data.add_parser("changes", help="list the dataset's relabel, exclude and add changes, newest first")
    changes.add_argument("dir", help="dataset folder")
    download = data.add_parser("download", help="download a public dataset")
    download.add_argument("name", choices=["flowers"], help="flowers: the 5-class flower_photos set (~220 MB)")
    download.add_argument("--dest", default="data", help="folder to put the dataset in (default ./data)")

    train = sub.add_parser("train", help="train one model (in this process; the page queues runs on a worker)")
    _add_train_flags(train)
    train.add_argument("--skip-eval", action="store_true", help="do not evaluate the best checkpoint afterwards")
    train.add_argument("--resume", metavar="RUN", help="continue a run from its last.pt instead of starting one")

    lr_find = sub.add_parser("lr-find", help="suggest a learning rate: a range test on a fraction of an epoch")
    _add_train_flags(lr_find)
    lr_find.add_argument("--plot", metavar="PNG", help="also draw loss against learning rate into this file")

    evaluate = sub.add_parser("evaluate", help="evaluate a run's best checkpoint (metrics, figures)")
    evaluate.add_argument("run", help="run id or 'latest'")
    evaluate.add_argument("--split", default="test", choices=["test", "val", "train"])
    evaluate.add_argument("--data-dir", help="evaluate on another folder with the same class names")

    report = sub.add_parser("report", help="write a self-contained HTML report for a run")
    report.add_argument("run", help="run id or 'latest'")

    predict = sub.add_parser("predict", help="classify images with a trained run")
    predict.add_argument("run", help="run id or 'latest' (newest succeeded run)")
    predict.add_argument("files", nargs="+", help="image files or folders")
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--csv", help="also write the predictions to this CSV file")
    predict.add_argument("--threshold", type=_probability, metavar="P",
                         help="answer 'not sure' below this confidence (0-1; default: the run's calibrated "
                              "threshold, from calibration.json)")
    predict.add_argument("--queue", action="store_true",
                         help="send the batch through Redis (REDIS_URL) to a worker and wait for its answer; the "
                              "files must lie in the worker's data folders (RESNET_LAB_DATA_ROOTS)")

    export = sub.add_parser("export", help="export a run's model as a folder + .zip: model (ONNX or TorchScript), "
                                           "classes, preprocessing, calibration, model card, standalone predict.py")
    export.add_argument("run", help="run id or 'latest'")
    export.add_argument("--format", default="onnx", choices=["onnx", "torchscript"],
                        help="onnx (default; predict.py needs only onnxruntime, numpy, Pillow) or torchscript")
    export.add_argument("--out", metavar="DIR",
                        help="new or empty folder for the bundle (an earlier bundle there is replaced); the .zip "
                             "goes next to it as DIR.zip (default: the run's export/ folder)")

    runs = sub.add_parser("runs", help="list runs").add_subparsers(dest="runs_command", required=True)
    runs_list = runs.add_parser("list", help="all runs, newest first")
    runs_list.add_argument("--json", action="store_true")

    up = sub.add_parser("up", help="start everything: embedded Redis (unless REDIS_URL), worker(s), page")
    up.add_argument("--gpus", help="'all' or a list like 0,1: one worker per GPU (default: all GPUs, else CPU)")
    up.add_argument("--port", type=int, help="page port (default 7860)")
    ui = sub.add_parser("ui", help="start only the page (needs REDIS_URL)")
    ui.add_argument("--host")
    ui.add_argument("--port", type=int)
    worker = sub.add_parser("worker", help="start only a worker (needs REDIS_URL)")
    worker.add_argument("--gpus", help="'all' or a list like 0,1: one worker process per GPU")
    worker.add_argument("--threads", type=int, help="torch threads for a CPU worker (default: one per core)")
    return parser


# ---------- commands ----------

def cmd_data_check(args, settings: Settings) -> int:
    from shared.data.check import check_dataset, format_check_report

    report = check_dataset(args.dir)
    print(json.dumps(report, indent=2) if args.json else format_check_report(report))
    return 0


def cmd_data_issues(args, settings: Settings) -> int:
    from shared.analysis.data_issues import find_data_issues, format_rows, write_rows_csv
    from shared.runs.store import RunStore

    store = RunStore(settings.models_dir)
    run_id = _run_id(store, args.run)
    report = find_data_issues(store.path(run_id), args.dir)
    counts = ", ".join(f"{n} {kind.replace('_', '-')}" for kind, n in report["counts"].items())
    print(f"{report['n']} images judged with run {run_id}: {counts}; saved in "
          f"{store.path(run_id) / 'data_issues.json'}", file=sys.stderr)
    print(format_rows(report["rows"], args.limit or None))
    if args.csv:
        print(f"wrote {write_rows_csv(report['rows'], args.csv)}", file=sys.stderr)
    return 0


def cmd_data_relabel(args, settings: Settings) -> int:
    from shared.data.overrides import add_change

    entry = add_change(args.dir, "relabel", args.file, args.label, source="cli")
    print(f"{entry['path']} is now {entry['label']} in new splits (undo: resnet-lab data undo {args.dir})")
    return 0


def cmd_data_exclude(args, settings: Settings) -> int:
    from shared.data.overrides import add_change

    entry = add_change(args.dir, "exclude", args.file, source="cli")
    print(f"{entry['path']} is left out of new splits (undo: resnet-lab data undo {args.dir})")
    return 0


def cmd_data_undo(args, settings: Settings) -> int:
    from shared.data.overrides import undo_last

    entry = undo_last(args.dir)
    print("nothing to undo" if entry is None else f"undone: {entry['action']} {entry['path']}")
    return 0


def cmd_data_changes(args, settings: Settings) -> int:
    from shared.data.overrides import list_changes

    for entry in list_changes(args.dir):
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(entry["time"]))
        to = f" -> {entry['label']}" if entry["action"] == "relabel" else ""
        print(f"{when}  {entry['action']:8} {entry['path']}{to}  ({entry['state']}, from {entry['source']})")
    return 0


def cmd_data_download(args, settings: Settings) -> int:
    from shared.data.download import download_flowers

    path = download_flowers(Path(args.dest))
    print(f"flower_photos is ready in {path}")
    return 0


class TqdmReporter:
    """Draws one progress bar per epoch on the terminal (duck-types engine.Reporter; importing the engine
    here would load torch for every `--help`)."""

    def __init__(self):
        from tqdm import tqdm

        self._tqdm, self._bar, self._bar_epoch = tqdm, None, None

    def phase(self, name: str, **info: Any) -> None:
        if name == "preparing data" and "decoded" in info:
            if self._bar is None:
                self._bar = self._tqdm(total=info["total"], desc="decoding images", unit="img", leave=False,
                                       disable=None)
            self._bar.n = info["decoded"]
            self._bar.refresh()
            return
        self._close()
        if "decoded" not in info:
            print(f"[{name}]", file=sys.stderr)

    def batch(self, epoch: int, batch: int, num_batches: int, images_per_s: float) -> None:
        if self._bar is None or self._bar_epoch != epoch:
            self._close()
            self._bar = self._tqdm(total=num_batches, desc=f"epoch {epoch}", unit="batch", leave=False,
                                   disable=None)  # None: no bar when stderr is not a terminal
            self._bar_epoch = epoch
        self._bar.n = batch
        self._bar.set_postfix_str(f"{images_per_s:.0f} img/s", refresh=True)

    def epoch(self, record: dict) -> None:
        self._close()
        print(f"epoch {record['epoch']}: train loss {record['train_loss']:.3f} acc {record['train_acc']:.3f} | "
              f"val loss {record['val_loss']:.3f} acc {record['val_acc']:.3f} | {record['images_per_s']:.0f} img/s "
              f"| {record['seconds']:.0f}s", file=sys.stderr)

    def should_stop(self) -> bool:
        return False

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def cmd_train(args, settings: Settings) -> int:
    from shared.runs.lifecycle import transition
    from shared.runs.store import RunStore
    from shared.training.engine import fit

    store = RunStore(settings.models_dir)
    if args.resume:
        run_id = args.resume
        config = store.config(run_id)
    else:
        from shared.data.scan import scan_dataset

        config, auto_lr = _train_config(args)
        scan_dataset(config.data_dir)  # a mistyped folder is refused before a run folder is made for it
        if auto_lr:
            config = config.replace(lr=_find_lr(config, settings))
        run_id = store.create(config)
    run_dir = store.path(run_id)
    print(f"run {run_id} in {run_dir}", file=sys.stderr)
    reporter = TqdmReporter()
    # the run folder is the record (no registry: the page shows CLI runs from their folders); a run that already
    # succeeded is refused here, before anything is trained
    transition(store, None, run_id, "running")
    try:
        result = fit(config, run_dir, reporter, cache_dir=settings.cache_path, cache_max_gb=settings.cache_max_gb)
        _print_skipped(run_dir)
        if not args.skip_eval:  # as on a worker: a run whose evaluation fails is failed
            _evaluate(run_dir, "test", None, settings.eval_figures)
    except KeyboardInterrupt:
        transition(store, None, run_id, "cancelled", error="interrupted from the keyboard")
        print(f"interrupted; resume with: resnet-lab train --resume {run_id}", file=sys.stderr)
        return 130
    except Exception as exc:
        transition(store, None, run_id, "failed", error=f"{exc.__class__.__name__}: {exc}")
        raise
    transition(store, None, run_id, "succeeded", best=result)
    print(f"best val accuracy {result['best_val_acc']:.3f} at epoch {result['best_epoch']}; run {run_id}")
    return 0


def _find_lr(config, settings: Settings, plot: str | None = None) -> float:
    from shared.training.lr_find import lr_find

    print("[finding the learning rate]", file=sys.stderr)
    result = lr_find(config, settings.cache_path, plot_path=Path(plot) if plot else None)
    print(f"learning rate: {result['suggestion']:.2g} (range test, {result['steps']} steps = "
          f"{result['steps'] / result['steps_per_epoch']:.2f} epoch, {result['seconds']:.0f} s)", file=sys.stderr)
    return result["suggestion"]


def cmd_lr_find(args, settings: Settings) -> int:
    from shared.data.scan import scan_dataset

    config, _ = _train_config(args)
    scan_dataset(config.data_dir)
    lr = _find_lr(config, settings, args.plot)
    if args.plot:
        print(f"plot: {args.plot}", file=sys.stderr)
    print(f"{lr:.3g}")
    return 0


def _print_skipped(run_dir: Path, limit: int = 20) -> None:
    """Name the files the run left out (unreadable), so nobody has to open split.json to learn of them."""
    skipped = json.loads((run_dir / "split.json").read_text()).get("skipped") or []
    if not skipped:
        return
    print(f"skipped {len(skipped)} unreadable file{'s' if len(skipped) != 1 else ''} (not trained on):",
          file=sys.stderr)
    for item in skipped[:limit]:
        print(f"  {item['path']}: {item['reason']}", file=sys.stderr)
    if len(skipped) > limit:
        print(f"  ... and {len(skipped) - limit} more, all listed in {run_dir / 'split.json'}", file=sys.stderr)


def _evaluate(run_dir: Path, split: str, data_dir: str | None, figures: str) -> dict:
    from shared.analysis.evaluation import eval_dir_for, evaluate_run

    print("[evaluating]", file=sys.stderr)
    result = evaluate_run(run_dir, split=split, data_dir=data_dir, figures=figures)
    print(f"{split if not data_dir else data_dir}: accuracy {result['accuracy']:.3f} on {result['n']} images; "
          f"figures in {eval_dir_for(run_dir, split, data_dir)}", file=sys.stderr)
    return result


def _run_id(store, run: str) -> str:
    from shared.analysis.predict import resolve_run

    return resolve_run(store, run)


def cmd_evaluate(args, settings: Settings) -> int:
    from shared.runs.store import RunStore

    store = RunStore(settings.models_dir)
    run_id = _run_id(store, args.run)
    result = _evaluate(store.path(run_id), args.split, args.data_dir, settings.eval_figures)
    print(json.dumps({k: result[k] for k in ("accuracy", "top_k_accuracy", "macro") if k in result}, indent=2))
    return 0


def cmd_report(args, settings: Settings) -> int:
    from shared.analysis.report import write_report
    from shared.runs.store import RunStore

    store = RunStore(settings.models_dir)
    path = write_report(store.path(_run_id(store, args.run)))
    print(path)
    return 0


def cmd_predict(args, settings: Settings) -> int:
    from shared.runs.store import RunStore

    if args.queue and not settings.redis_url:
        raise ValueError("--queue needs REDIS_URL: the address of the Redis your workers use (resnet-lab up prints "
                         "it), e.g. REDIS_URL=redis://:password@host:6379/0")
    store = RunStore(settings.models_dir)
    run_id = _run_id(store, args.run)
    if args.queue:  # the worker loads the model: no torch here
        return _predict_on_a_worker(args, run_id, settings)
    from shared.analysis.predict import Predictor
    from shared.data.images import expand_image_paths

    predictor = Predictor(store.path(run_id))
    files = expand_image_paths(args.files)
    results = predictor.predict_many(files, top_k=args.top_k)
    if predictor.calibration_note and args.threshold is None:
        print(f"note: {predictor.calibration_note}", file=sys.stderr)
    threshold = predictor.threshold if args.threshold is None else args.threshold
    return print_predictions(run_id, predictor.meta["model_name"], predictor.classes, results, args.top_k, args.csv,
                             threshold=threshold)


def _predict_on_a_worker(args, run_id: str, settings: Settings) -> int:
    """Hand over to `python -m worker.queued_predict` (shared/ never imports Celery), which sends the batch to a
    worker, waits and prints the answer with `print_predictions`."""
    from shared.launch.up import run_child

    files = [str(Path(f).expanduser().absolute()) for f in args.files]  # the worker does not share our cwd
    extra = [run_id, *files, "--top-k", str(args.top_k)]
    if args.csv:
        extra += ["--csv", str(Path(args.csv).expanduser().absolute())]
    return run_child("worker.queued_predict", extra, settings)


def print_predictions(run_id: str, model_name: str, classes: Sequence[str], results: list[dict], top_k: int,
                      csv_path: str | None, threshold: float | None = None) -> int:
    """What `resnet-lab predict` prints (the table on stdout, the model on stderr) and writes (--csv), whether the
    model ran here or on a worker; returns the exit code (1 when no file could be classified).

    An answer whose top probability is below `threshold` is printed "not sure — closest: X" (None: the results'
    own `sure`, set by the run's calibration, when they carry it), and so is one the results mark unlike the
    training images (`familiar` False, from the run's feature distance)."""
    from shared.analysis.calibration import verdict
    from shared.analysis.predict import write_predictions_csv

    print(f"model: run {run_id} ({model_name}, classes: {', '.join(classes)})", file=sys.stderr)
    if threshold is not None:
        print(f"answers below {threshold:.1%} confidence are \"not sure\"", file=sys.stderr)
    failures = 0
    for r in results:
        if r["error"]:
            failures += 1
            print(f"{r['source']}: skipped: {r['error']}")
        else:
            top = ", ".join(f"{t['class']} {t['probability']:.1%}" for t in r["top"])
            # `familiar` False: the image is unlike the training images, whatever the confidence threshold
            sure = ((verdict(r["top"], threshold).sure if threshold is not None else r.get("sure") is not False)
                    and r.get("familiar") is not False)
            why = " (unlike the images it was trained on)" if r.get("familiar") is False else ""
            print(f"{r['source']}: {top}" if sure else f"{r['source']}: not sure — closest: {top}{why}")
    if csv_path:
        write_predictions_csv(results, Path(csv_path), top_k=top_k)
        print(f"wrote {csv_path}", file=sys.stderr)
    return 1 if failures == len(results) else 0


def cmd_export(args, settings: Settings) -> int:
    from shared.export import export_run, zip_bundle
    from shared.runs.store import RunStore

    store = RunStore(settings.models_dir)
    run_id = _run_id(store, args.run)
    print(f"exporting run {run_id} as {args.format} (and measuring its latency and parity)", file=sys.stderr)
    out = export_run(store.path(run_id), args.format, Path(args.out).expanduser() if args.out else None)
    print(out)
    print(zip_bundle(out))
    return 0


def cmd_runs_list(args, settings: Settings) -> int:
    from shared.runs.store import DAMAGED, RunStore

    store = RunStore(settings.models_dir)
    rows = list(store.list())
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"no runs in {store.root}")
        return 0
    print(f"{'run id':38} {'status':10} {'best val acc':>12} {'finished':>20}")
    for r in rows:
        best = (r.get("best") or {}).get("best_val_acc")
        finished = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["finished"])) if r.get("finished") else ""
        print(f"{r['run_id']:38} {r['status']:10} {'' if best is None else f'{best:.3f}':>12} {finished:>20}")
        if r["status"] == DAMAGED:
            print(f"  {r['error']}")
    return 0


def cmd_up(args, settings: Settings) -> int:
    from shared.launch.up import run_up

    if args.port:
        settings = settings.with_overrides(port=args.port)
    return run_up(settings, gpus=args.gpus)


def cmd_ui(args, settings: Settings) -> int:
    from shared.launch.up import run_child

    extra = []
    if args.host:
        extra += ["--host", args.host]
    if args.port:
        extra += ["--port", str(args.port)]
    return run_child("ui", extra, settings)


def cmd_worker(args, settings: Settings) -> int:
    from shared.launch.up import run_child

    extra = []
    if args.gpus:
        extra += ["--gpus", args.gpus]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    return run_child("worker", extra, settings)


COMMANDS = {
    ("data", "check"): cmd_data_check,
    ("data", "download"): cmd_data_download,
    ("data", "issues"): cmd_data_issues,
    ("data", "relabel"): cmd_data_relabel,
    ("data", "exclude"): cmd_data_exclude,
    ("data", "undo"): cmd_data_undo,
    ("data", "changes"): cmd_data_changes,
    ("train", None): cmd_train,
    ("evaluate", None): cmd_evaluate,
    ("lr-find", None): cmd_lr_find,
    ("report", None): cmd_report,
    ("predict", None): cmd_predict,
    ("export", None): cmd_export,
    ("runs", "list"): cmd_runs_list,
    ("up", None): cmd_up,
    ("ui", None): cmd_ui,
    ("worker", None): cmd_worker,
}


# The exceptions that mean 'the user asked for something impossible', by the module that defines each. Importing
# those modules only to name their errors would cost every one-line error seconds (several import torch); an
# exception can only be an instance of a class whose module has been imported, so only those are checked.
USER_ERRORS = (("shared.training.config", "ConfigError"), ("shared.data.scan", "DatasetError"),
               ("shared.data.images", "ImageError"), ("shared.training.models", "WeightsUnavailable"),
               ("shared.analysis.predict", "NoModelError"), ("shared.runs.store", "RunNotFound"),
               ("shared.training.checkpoint", "CheckpointError"), ("shared.data.download", "DownloadError"),
               ("shared.export.bundle", "ExportError"))


def user_error_types() -> tuple[type[BaseException], ...]:
    """Exceptions that mean 'the user asked for something impossible': one line, no traceback."""
    loaded = tuple(getattr(sys.modules[module], name) for module, name in USER_ERRORS if module in sys.modules)
    return (*loaded, FileNotFoundError, NotADirectoryError, PermissionError)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    key = (args.command, getattr(args, f"{args.command}_command", None))
    handler = COMMANDS[key]
    try:
        settings = Settings.from_env(models_dir=args.models_dir)
        if settings.model_plugins:  # loaded with the model registry: most commands build no model
            from shared.training.plugins import defer

            defer(settings.model_plugins)
        return handler(args, settings)
    except user_error_types() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:  # invalid settings/values (e.g. an unknown weights name)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
            raise
        # the machine, not a bug: a read-only or full disk under the models folder
        print(f"error: cannot write {exc.filename or 'to the models folder'}: {exc.strerror} — make the models "
              "folder writable and free some disk space (or use --models-dir)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
