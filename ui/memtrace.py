"""Opt-in allocation tracing of the page, to find what makes its memory grow (BENCHMARKS.md item 7).

`RESNET_LAB_TRACEMALLOC=/path/to/report.txt python -m ui` starts a daemon thread that switches tracemalloc on
`RESNET_LAB_TRACEMALLOC_EVERY` seconds (default 60) after start (tracing the imports would slow starting the page
several-fold), takes a first snapshot one period later, then every period rewrites the file with the 30 allocation
sites (grouped by traceback) that grew most since that first snapshot, and appends one summary line to
`<path>.log`. Off unless the variable is set; importing this module does nothing. Tracing slows the page down:
a diagnostic, not for production.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import tracemalloc
from pathlib import Path

log = logging.getLogger(__name__)

ENV_PATH = "RESNET_LAB_TRACEMALLOC"
ENV_EVERY = "RESNET_LAB_TRACEMALLOC_EVERY"
FRAMES = 12
TOP = 30
# tracemalloc's own bookkeeping and what this module allocates (its reports read source lines) are not the page's
_IGNORE = (tracemalloc.Filter(False, tracemalloc.__file__), tracemalloc.Filter(False, __file__, all_frames=True),
           tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
           tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"))


def start_from_env(env=None) -> threading.Thread | None:
    """Start tracing when RESNET_LAB_TRACEMALLOC names a file; returns the reporting thread (None when off)."""
    env = os.environ if env is None else env
    path = env.get(ENV_PATH)
    if not path:
        return None
    try:
        every = float(env.get(ENV_EVERY, "60"))
    except ValueError:
        raise SystemExit(f"error: {ENV_EVERY} must be a number of seconds, got {env[ENV_EVERY]!r}") from None
    if every <= 0:
        raise SystemExit(f"error: {ENV_EVERY} must be > 0, got {every:g}")
    thread = threading.Thread(target=_report_loop, args=(Path(path), every), name="tracemalloc-report",
                              daemon=True)
    thread.start()
    log.warning("tracemalloc on (a diagnostic that slows the page): tracing from %g s after start, growth report "
                "every %g s in %s", every, every, path)
    return thread


def _snapshot() -> tracemalloc.Snapshot:
    return tracemalloc.take_snapshot().filter_traces(_IGNORE)


def _report_loop(path: Path, every: float) -> None:
    time.sleep(every)  # the page has started by now: trace what it allocates while serving, not its imports
    tracemalloc.start(FRAMES)
    time.sleep(every)
    first, t0 = _snapshot(), time.monotonic()
    while True:
        time.sleep(every)
        try:
            write_report(path, first, _snapshot(), time.monotonic() - t0)
        except OSError as exc:
            log.warning("tracemalloc report not written to %s: %s", path, exc)


def write_report(path: Path, first: tracemalloc.Snapshot, now: tracemalloc.Snapshot, seconds: float) -> None:
    """Top growth by traceback since `first` into `path`; one summary line appended to `<path>.log`."""
    stats = now.compare_to(first, "traceback")
    total = sum(s.size_diff for s in stats)
    traced, peak = tracemalloc.get_traced_memory()
    head = (f"after {seconds / 60:.1f} min: traced {traced / 2**20:.1f} MB (peak {peak / 2**20:.1f}), "
            f"{total / 2**10:+.0f} KiB since the first snapshot")
    lines = [head, ""]
    for stat in stats[:TOP]:
        lines.append(f"{stat.size_diff / 2**10:+.1f} KiB ({stat.count_diff:+d} blocks), now "
                     f"{stat.size / 2**10:.1f} KiB in {stat.count} blocks")
        lines.extend("    " + line for line in stat.traceback.format(most_recent_first=True))
        lines.append("")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)
    with open(path.with_name(path.name + ".log"), "a") as fh:
        fh.write(head + "\n")
