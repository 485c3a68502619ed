"""`resnet-lab predict RUN FILES... --queue`: send `resnet_lab.predict_batch` through Redis to a worker, wait for it
and print what a local `resnet-lab predict` prints (`shared.cli.print_predictions`).

The CLI runs this as `python -m worker.queued_predict` because `shared/` never imports Celery. The worker reads
the files itself, so they must lie inside its data folders (RESNET_LAB_DATA_ROOTS); it also writes the table as
`predictions-<time>.csv` into the run folder. A worker takes the batch after the task it is running, so this may
wait behind a training run; Ctrl-C stops waiting and withdraws the batch.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Sequence

from shared.cli import print_predictions
from shared.settings import Settings, redact_url
from shared.tasks import PREDICT_BATCH_TASK

from .celery_app import create_app

POLL_SECONDS = 0.5


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="resnet-lab predict --queue", description=__doc__.splitlines()[0])
    parser.add_argument("run", help="run id")
    parser.add_argument("files", nargs="+", help="absolute paths of image files or folders in the worker's data roots")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--csv", help="also write the predictions to this CSV file")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    settings = Settings.from_env()
    app = create_app(settings)
    result = app.send_task(PREDICT_BATCH_TASK, args=[args.run, args.files],
                           kwargs={"top_k": args.top_k, "with_results": True})
    print(f"sent {len(args.files)} path(s) to the queue at {redact_url(settings.redis_url)} as task {result.id}; "
          "waiting for a worker (one busy training takes it after its current task)…", file=sys.stderr)
    try:
        _wait(result)
    except KeyboardInterrupt:
        result.revoke()
        print("stopped waiting; the batch is withdrawn", file=sys.stderr)
        return 130
    if result.failed():
        # the worker's message says what to do (a path outside its data folders, a run without a model)
        print(f"error: {result.result}", file=sys.stderr)
        return 2
    answer = result.result
    return print_predictions(args.run, answer["model"], answer["classes"], answer["results"], args.top_k, args.csv)


def _wait(result) -> None:
    """Poll until the task ends, saying how far the worker got (its PROGRESS state) when that changes."""
    said = None
    while not result.ready():
        info = result.info if result.state == "PROGRESS" else None
        if isinstance(info, dict) and (info.get("done"), info.get("total")) != said:
            said = (info.get("done"), info.get("total"))
            print(f"  {said[0]}/{said[1]} images", file=sys.stderr)
        time.sleep(POLL_SECONDS)


if __name__ == "__main__":
    sys.exit(main())
