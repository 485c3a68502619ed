"""Freeze a seeded, stratified, reproducible train/val/test split of a dataset."""

from __future__ import annotations

import hashlib
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from shared.data.scan import DatasetError
from shared.data.check import check_dataset
from shared.data.manifest import MANIFEST_VERSION, SPLITS, split_hash


def make_split(root: str | os.PathLike, *, ratios: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
               report: dict | None = None, link_roots: Sequence[Path] | None = None) -> dict:
    """A seeded, stratified, deterministic train/val/test split of the usable images of `root`.

    Identical files (same sha256, even under different classes) always land in the same split, so a test image
    never has a copy in train. Pass the `report` of `check_dataset(root)` to avoid reading the images twice.
    The dataset's overrides (`shared.data.overrides`: relabel, exclude) are applied; `overrides` in the result
    records which were (so a fixed dataset gives another split hash, and the run says why).
    """
    from shared.data.overrides import apply_to_files

    ratios = validate_ratios(ratios)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetError(f"seed must be an integer, got {seed!r}")
    if report is None:
        report = check_dataset(root, link_roots=link_roots)
    elif report.get("root") != str(Path(root).expanduser().resolve()) or "hashes" not in report:
        raise DatasetError(f"the report passed to make_split is not a check_dataset report of {root} "
                           f"(it is for {report.get('root')!r}) — call check_dataset({str(root)!r}) first.")
    classes = list(report["classes"])
    labels, overrides = apply_to_files(report["root"], classes, report["hashes"])
    hashes: dict[str, str] = {path: sha for path, sha in report["hashes"].items() if path in labels}
    assignment = _assign_splits(classes, hashes, labels, ratios, seed)
    files = [{"path": path, "label": classes.index(labels[path]), "sha256": hashes[path],
              "split": assignment[path]} for path in sorted(hashes)]
    return {
        "version": MANIFEST_VERSION,
        "root": report["root"],
        "classes": classes,
        "seed": seed,
        "ratios": list(ratios),
        "files": files,
        "skipped": sorted(({"path": u["path"], "reason": u["reason"]} for u in report["unreadable"]),
                          key=lambda u: u["path"]),
        "split_hash": split_hash(classes, files),
        "overrides": overrides,
    }


def validate_ratios(ratios: Sequence[float]) -> tuple[float, float, float]:
    """Check (train, val, test) ratios; returns them as floats or raises DatasetError saying what is expected."""
    expected = "expected three numbers (train, val, test) >= 0 that sum to 1, e.g. (0.7, 0.15, 0.15)"
    try:
        values = tuple(ratios)
    except TypeError:
        raise DatasetError(f"split ratios: {expected}; got {ratios!r}") from None
    if len(values) != 3 or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        raise DatasetError(f"split ratios: {expected}; got {ratios!r}")
    values = tuple(float(v) for v in values)
    if any(not math.isfinite(v) or v < 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise DatasetError(f"split ratios: {expected}; got {ratios!r} (sum {sum(values):g})")
    if values[0] <= 0 or values[1] <= 0:
        raise DatasetError(f"split ratios: train and val must be > 0 (val picks the best epoch); got {ratios!r}")
    return values  # type: ignore[return-value]


def _split_targets(n: int, ratios: tuple[float, float, float]) -> list[int]:
    """Image counts per split: largest remainder, then at least one per positive-ratio split when n allows."""
    raw = [round(r * n, 9) for r in ratios]  # round away float noise such as 0.15 * 20 = 3.0000000000000004
    targets = [math.floor(x) for x in raw]
    by_remainder = sorted(range(3), key=lambda i: (-(raw[i] - targets[i]), i))
    for i in by_remainder[: n - sum(targets)]:
        targets[i] += 1
    positive = [i for i in range(3) if ratios[i] > 0]
    for i in positive:
        if targets[i] == 0:
            donors = [j for j in positive if targets[j] > 1]
            if not donors:
                break
            donor = max(donors, key=lambda j: (targets[j], -j))
            targets[donor] -= 1
            targets[i] += 1
    return targets


def _assign_splits(classes: list[str], hashes: dict[str, str], labels: dict[str, str],
                   ratios: tuple[float, float, float], seed: int) -> dict[str, str]:
    """path -> split. Units are groups of identical files; each unit belongs to the class (`labels`) of its first
    path."""
    members: dict[str, list[str]] = defaultdict(list)
    for path in sorted(hashes):
        members[hashes[path]].append(path)
    units_of_class: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for sha, paths in members.items():
        units_of_class[labels[paths[0]]].append((sha, paths))

    positive = [i for i in range(3) if ratios[i] > 0]
    assignment: dict[str, str] = {}
    for name in classes:
        units = units_of_class.get(name, [])
        # Order by a hash of (seed, content): deterministic on every platform and Python version, independent of
        # file names and of the other classes, so adding images elsewhere does not reshuffle this class.
        units.sort(key=lambda u: hashlib.sha256(f"{seed}:{u[0]}".encode()).hexdigest())
        targets = _split_targets(sum(len(paths) for _, paths in units), ratios)
        filled = [0, 0, 0]
        for _, paths in units:
            split = max(positive, key=lambda i: (targets[i] - filled[i], -i))
            filled[split] += len(paths)
            for path in paths:
                assignment[path] = SPLITS[split]
    return assignment
