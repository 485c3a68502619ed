"""Check a dataset: read, hash and decode every image; a report of counts, sizes, duplicates and problems."""

from __future__ import annotations

import hashlib
import os
import statistics
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, Sequence

from shared.fsutil import open_regular
from shared.data.images import ImageError, verify_image
from shared.data.scan import DatasetError, DatasetScan, class_of, scan_dataset
from shared.data.manifest import compare_manifest


# Thresholds for the human summary in `problems`; the raw numbers are always in the report.
_IMBALANCE_WARN = 3.0
_SMALL_CLASS = 10
_TINY_SIDE = 32
_LIST_LIMIT = 10


def check_dataset(root: str | os.PathLike, *, decode: bool = True, workers: int | None = None,
                  manifest: dict | None = None, link_roots: Sequence[Path] | None = None) -> dict:
    """Read, hash and (optionally) decode every image; return a JSON-serialisable report.

    Files that fail to decode are listed under `unreadable` and left out of every count. With `manifest`,
    the report also says whether that split still matches the dataset (see `compare_manifest`).
    Raises DatasetError when the layout is unusable or a class has no usable image left. `link_roots`: see
    `scan_dataset`.
    """
    scan = scan_dataset(root, link_roots=link_roots)
    workers = workers or min(16, 2 * (os.cpu_count() or 2))
    jobs = [(scan.root, path, decode) for path, _ in scan.files]
    with ThreadPoolExecutor(max_workers=workers) as pool:  # decoding and hashing release the GIL
        results = list(pool.map(_inspect_file, jobs))

    usable = []  # (path, label, sha256, size or None)
    unreadable = []
    for (path, label), (sha, size, error) in zip(scan.files, results):
        if error:
            unreadable.append({"path": path, "reason": error})
        else:
            usable.append((path, label, sha, size))
    counts = {name: 0 for name in scan.classes}
    for _, label, _, _ in usable:
        counts[scan.classes[label]] += 1
    _refuse_empty_after_decode(scan, counts, unreadable)

    groups = _identical_groups((path, sha) for path, _, sha, _ in usable)
    report = {
        "root": str(scan.root),
        "classes": scan.classes,
        "decoded": decode,
        "counts": counts,
        "total": len(usable),
        "imbalance_ratio": round(max(counts.values()) / min(counts.values()), 3),
        "sizes": _size_summary([size for *_, size in usable if size]) if decode else None,
        "unreadable": unreadable,
        "ignored": [{"path": p, "reason": r} for p, r in scan.ignored],
        "duplicates": _classify_duplicates(groups),
        # path -> sha256 of every usable file, so make_split can reuse this report instead of reading again
        "hashes": {path: sha for path, _, sha, _ in usable},
    }
    if manifest is not None:
        report["manifest"] = compare_manifest(manifest, report)
    report["problems"] = _problems(report, [size for *_, size in usable if size])
    report["ok"] = not report["problems"]
    return report


def _inspect_file(job: tuple[Path, str, bool]) -> tuple[str | None, tuple[int, int] | None, str | None]:
    """(sha256, upright size, None) for a good file, (None, None, reason) for a bad one.

    The file is hashed in chunks and decoded from disk, never held in memory whole: many of these run at once,
    and the decodes share the process-wide budget of `shared.data.images` (a second read comes from the page cache).
    """
    root, path, decode = job
    try:
        sha, nbytes = _sha256_of(root / path)
    except OSError as e:
        return None, None, f"cannot read the file ({e.strerror or e})"
    if not nbytes:
        return None, None, "empty file (0 bytes)"
    if not decode:
        return sha, None, None
    try:
        size = verify_image(root / path, name=path)
    except ImageError as e:
        return None, None, str(e).removeprefix(f"{path}: ")
    return sha, size, None


def _sha256_of(path: Path) -> tuple[str, int]:
    """(hex sha256, size in bytes) of a file, read in 1 MB chunks (hashlib.file_digest needs Python 3.11)."""
    digest, nbytes = hashlib.sha256(), 0
    with open_regular(path) as f:  # a FIFO named like an image must not hang the check
        while chunk := f.read(1 << 20):
            digest.update(chunk)
            nbytes += len(chunk)
    return digest.hexdigest(), nbytes


def _refuse_empty_after_decode(scan: DatasetScan, counts: dict[str, int], unreadable: list[dict]) -> None:
    dead = [name for name, n in counts.items() if n == 0]
    if not dead:
        return
    parts = []
    for name in dead:
        bad = [u for u in unreadable if u["path"].startswith(name + "/")]
        example = f", e.g. {bad[0]['path']}: {bad[0]['reason']}" if bad else ""
        parts.append(f"{scan.root / name} ({len(bad)} image files, none decodable{example})")
    raise DatasetError(f"class folder{'s' if len(dead) > 1 else ''} without any usable image: {'; '.join(parts)} — "
                       f"replace the broken files or remove the folder.")


def _identical_groups(path_sha: Iterable[tuple[str, str]]) -> dict[str, list[str]]:
    """sha256 -> sorted paths, only for contents that occur more than once."""
    by_sha: dict[str, list[str]] = defaultdict(list)
    for path, sha in path_sha:
        by_sha[sha].append(path)
    return {sha: sorted(paths) for sha, paths in by_sha.items() if len(paths) > 1}


def _classify_duplicates(groups: dict[str, list[str]]) -> dict[str, list[list[str]]]:
    within, across = [], []
    for paths in groups.values():
        (within if len({class_of(p) for p in paths}) == 1 else across).append(paths)
    return {"within_class": sorted(within), "across_classes": sorted(across)}


def _size_summary(sizes: list[tuple[int, int]]) -> dict | None:
    if not sizes:
        return None
    widths = [w for w, _ in sizes]
    heights = [h for _, h in sizes]
    aspects = [w / h for w, h in sizes]

    def stats(values, digits=None):
        out = {"min": min(values), "median": statistics.median(values), "max": max(values)}
        return {k: round(v, digits) if digits else v for k, v in out.items()}

    return {"width": stats(widths), "height": stats(heights), "aspect": stats(aspects, 3)}


def _problems(report: dict, sizes: list[tuple[int, int]]) -> list[str]:
    out = []
    if n := len(report["unreadable"]):
        out.append(f"{n} file{'s' if n > 1 else ''} could not be decoded and will be skipped (see 'unreadable').")
    across = report["duplicates"]["across_classes"]
    if across:
        first = " = ".join(across[0])
        more = f" (and {len(across) - 1} more)" if len(across) > 1 else ""
        out.append(f"{len(across)} image{'s are' if len(across) > 1 else ' is'} filed under more than one class "
                   f"(label conflict): {first}{more} — keep one copy, in the right class.")
    within = report["duplicates"]["within_class"]
    if within:
        extra = sum(len(g) - 1 for g in within)
        out.append(f"{len(within)} group{'s' if len(within) > 1 else ''} of identical images inside a class "
                   f"({extra} redundant cop{'ies' if extra > 1 else 'y'}) — they add nothing; delete the copies.")
    counts = report["counts"]
    if report["imbalance_ratio"] > _IMBALANCE_WARN:
        big, small = max(counts, key=counts.get), min(counts, key=counts.get)
        out.append(f"classes are imbalanced: '{big}' has {counts[big]} images, '{small}' only {counts[small]} "
                   f"(ratio {report['imbalance_ratio']:.1f}) — add '{small}' images or watch per-class recall.")
    for name, n in counts.items():
        if n < _SMALL_CLASS:
            out.append(f"class '{name}' has only {n} usable image{'s' if n != 1 else ''} — too few for a "
                       f"meaningful train/val/test split; aim for at least 20.")
    tiny = [s for s in sizes if min(s) < _TINY_SIDE]
    if tiny:
        w, h = min(tiny, key=min)
        out.append(f"{len(tiny)} image{'s are' if len(tiny) > 1 else ' is'} smaller than {_TINY_SIDE} px on a side "
                   f"(smallest {w}x{h}) — they will be upscaled and blurry.")
    if (m := report.get("manifest")) is not None:
        if m["duplicates_across_splits"]:
            out.append(f"{len(m['duplicates_across_splits'])} identical image(s) appear in more than one split of "
                       f"the manifest — test scores would be inflated; make a new split.")
        changed = len(m["missing"]) + len(m["changed"]) + len(m["new"])
        if changed:
            out.append(f"the dataset changed since the split was made ({len(m['missing'])} missing, "
                       f"{len(m['changed'])} modified, {len(m['new'])} new files) — make a new split.")
    return out


def format_check_report(report: dict) -> str:
    """A readable summary of a `check_dataset` report for the terminal."""
    counts = report["counts"]
    width = max(12, *(len(c) for c in counts))
    lines = [f"Dataset {report['root']}: {len(counts)} classes, {report['total']} usable images", "",
             f"  {'class':<{width}}  {'images':>7}"]
    lines += [f"  {name:<{width}}  {n:>7}" for name, n in counts.items()]
    lines += [f"  {'total':<{width}}  {report['total']:>7}   (largest/smallest class: {report['imbalance_ratio']:.2f})",
              ""]
    if sizes := report.get("sizes"):
        def fmt(s, unit=""):
            return f"{s['min']}{unit} / {s['median']}{unit} / {s['max']}{unit}"
        lines += [f"Image size min / median / max: width {fmt(sizes['width'], ' px')}; "
                  f"height {fmt(sizes['height'], ' px')}; aspect {fmt(sizes['aspect'])}", ""]
    elif not report.get("decoded", True):
        lines += ["Images were hashed but not decoded (decode=False).", ""]
    lines += _listing("Unreadable (skipped)", [f"{u['path']}: {u['reason']}" for u in report["unreadable"]])
    lines += _listing("Ignored", [f"{i['path']} ({i['reason']})" for i in report["ignored"]])
    dup = report["duplicates"]
    lines += _listing("Label conflicts (same image in several classes)", [" = ".join(g) for g in dup["across_classes"]])
    lines += _listing("Identical images within a class", [" = ".join(g) for g in dup["within_class"]])
    if report["problems"]:
        lines += ["Problems:"] + [f"  - {p}" for p in report["problems"]]
    else:
        lines.append("No problems found.")
    return "\n".join(lines)


def _listing(title: str, items: list[str]) -> list[str]:
    if not items:
        return []
    shown = [f"  {item}" for item in items[:_LIST_LIMIT]]
    if len(items) > _LIST_LIMIT:
        shown.append(f"  ... and {len(items) - _LIST_LIMIT} more")
    return [f"{title} ({len(items)}):", *shown, ""]
