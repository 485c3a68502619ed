"""Image-folder datasets: scan the layout, check the images, and freeze a reproducible train/val/test split.

A dataset is a folder with one sub-folder per class (torchvision `ImageFolder` layout); images may sit in
nested folders inside a class folder. The split is a JSON manifest (path, label, sha256, split of every file)
saved with each run, so a run can always be evaluated on exactly the images it never trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from shared.fsutil import open_regular, write_atomic
from shared.data.images import IMAGE_EXTENSIONS, ImageError, is_image_name, verify_image

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1
# Folder names that are never classes: macOS zip residue and hidden folders (".git", ".cache", ...).
_JUNK_DIRS = frozenset({"__MACOSX"})
# Thresholds for the human summary in `problems`; the raw numbers are always in the report.
_IMBALANCE_WARN = 3.0
_SMALL_CLASS = 10
_TINY_SIDE = 32
_LIST_LIMIT = 10


class DatasetError(ValueError):
    """The dataset cannot be used as given; the message names the folder and says what to do."""


@dataclass
class DatasetScan:
    root: Path
    # sorted class folder names; the index in this list is the label
    classes: list[str]
    # (path relative to root with '/', class index), sorted by path
    files: list[tuple[str, int]]
    # (relative path, reason) for files and folders that were not taken
    ignored: list[tuple[str, str]]


# --- scan ----------------------------------------------------------------------------------------------------

def scan_dataset(root: str | os.PathLike, *, link_roots: Sequence[Path] | None = None) -> DatasetScan:
    """List classes (sub-folders) and image files (found recursively) without decoding anything.

    `link_roots`: when given (the page and the worker pass their data roots), a class folder or image file that is
    a symbolic link is taken only if it leads inside one of these folders; other links are listed as ignored and
    never read. A link is how someone who may write into a data folder would make the page read a picture it may
    not serve. None (the CLI, on the user's own files) follows links wherever they lead.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetError(f"dataset folder {root} does not exist — check the path; expected a folder with one "
                           f"sub-folder of images per class.")
    if not root.is_dir():
        hint = ("extract the archive and point at the extracted folder" if _looks_like_archive(root)
                else "point at the folder that holds one sub-folder of images per class")
        raise DatasetError(f"{root} is a file, not a folder — {hint}.")
    root = root.resolve()
    try:
        entries = sorted(os.scandir(root), key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot read dataset folder {root} ({e.strerror or e}) — check its permissions.") from None
    classes: list[str] = []
    ignored: list[tuple[str, str]] = []
    allowed = None if link_roots is None else [Path(r).resolve() for r in link_roots]
    for entry in entries:
        if _hidden(entry.name):
            continue
        if _is_dir(entry):
            if _links_out(Path(entry.path), allowed):
                ignored.append((entry.name + "/", LINK_OUT))
                continue
            classes.append(entry.name)
        else:
            ignored.append((entry.name, "not inside a class folder"))
    if len(classes) < 2:
        raise DatasetError(_too_few_classes(root, classes, ignored))

    files: list[tuple[str, int]] = []
    empty: list[str] = []
    for index, name in enumerate(classes):
        found = _walk_class(root, name, ignored, allowed)
        if not found:
            empty.append(name)
        files.extend((path, index) for path in found)
    if empty:
        raise DatasetError(_empty_classes(root, empty, ignored))
    files.sort()
    ignored.sort()
    return DatasetScan(root=root, classes=classes, files=files, ignored=ignored)


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_DIRS


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a symlinked class folder; loops are impossible at this depth
    except OSError:
        return False


def _looks_like_archive(path: Path) -> bool:
    return path.name.lower().endswith((".zip", ".tar", ".tgz", ".tar.gz", ".tar.bz2", ".tar.xz", ".7z", ".rar"))


LINK_OUT = "a link that leads outside the data folders — not read"


def _links_out(path: Path, allowed: list[Path] | None) -> bool:
    """True when `path` is a link whose target lies outside every allowed folder (never with allowed=None)."""
    if allowed is None or not path.is_symlink():
        return False
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # dangling or looping: nothing to read anyway
        return True
    return not any(target == r or r in target.parents for r in allowed)


def _walk_class(root: Path, name: str, ignored: list[tuple[str, str]], allowed: list[Path] | None = None
                ) -> list[str]:
    """Image paths (relative, '/') under root/name. Symlinked sub-folders are not followed (no loops)."""
    def rel(path: str) -> str:
        return Path(os.path.relpath(path, root)).as_posix()

    def unreadable(err: OSError) -> None:
        ignored.append((rel(err.filename) + "/", f"cannot read folder ({err.strerror or err})"))

    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root / name, followlinks=False, onerror=unreadable):
        kept = []
        for d in sorted(dirnames):
            full = os.path.join(dirpath, d)
            if _hidden(d):
                continue
            if os.path.islink(full):
                ignored.append((rel(full) + "/", "symlinked folder not followed"))
                continue
            kept.append(d)
        dirnames[:] = kept  # os.walk descends only into what is left here
        for f in filenames:
            if _hidden(f):
                continue
            path = rel(os.path.join(dirpath, f))
            if _links_out(Path(dirpath, f), allowed):
                ignored.append((path, LINK_OUT))
            elif is_image_name(f):
                found.append(path)
            else:
                ignored.append((path, f"not an image file ({Path(f).suffix or 'no extension'})"))
    return sorted(found)


def _too_few_classes(root: Path, classes: list[str], ignored: list[tuple[str, str]]) -> str:
    loose_images = sum(1 for path, _ in ignored if is_image_name(path))
    if not classes:
        if loose_images:
            return (f"{root} has {loose_images} image files but no class sub-folders — put each class's images in "
                    f"its own sub-folder, e.g. {root}/cats/1.jpg and {root}/dogs/2.jpg.")
        return (f"{root} has no class sub-folders — expected one sub-folder of images per class, "
                f"e.g. {root}/cats/ and {root}/dogs/.")
    only = root / classes[0]
    nested = [p.name for p in _safe_subdirs(only)]
    if len(nested) >= 2:
        return (f"{root} has a single sub-folder '{classes[0]}', which itself holds {len(nested)} folders "
                f"({', '.join(sorted(nested)[:5])}) — did you mean the dataset folder {only}?")
    return (f"{root} has only one class folder ('{classes[0]}') — a classifier needs at least 2 classes; "
            f"add one sub-folder of images per class.")


def _safe_subdirs(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir() and not _hidden(p.name)]
    except OSError:
        return []


def _empty_classes(root: Path, empty: list[str], ignored: list[tuple[str, str]]) -> str:
    parts = []
    for name in empty:
        others = [p for p, _ in ignored if p.startswith(name + "/")]
        note = f" ({len(others)} other files, e.g. {others[0]})" if others else ""
        parts.append(f"{root / name}{note}")
    exts = ", ".join(sorted(IMAGE_EXTENSIONS))
    return (f"class folder{'s' if len(empty) > 1 else ''} without any image file: {'; '.join(parts)} — add images "
            f"({exts}) or remove the folder.")


# --- check ---------------------------------------------------------------------------------------------------

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


def _class_of(path: str) -> str:
    return path.split("/", 1)[0]


def _classify_duplicates(groups: dict[str, list[str]]) -> dict[str, list[list[str]]]:
    within, across = [], []
    for paths in groups.values():
        (within if len({_class_of(p) for p in paths}) == 1 else across).append(paths)
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


# --- split manifest ------------------------------------------------------------------------------------------

def make_split(root: str | os.PathLike, *, ratios: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0,
               report: dict | None = None, link_roots: Sequence[Path] | None = None) -> dict:
    """A seeded, stratified, deterministic train/val/test split of the usable images of `root`.

    Identical files (same sha256, even under different classes) always land in the same split, so a test image
    never has a copy in train. Pass the `report` of `check_dataset(root)` to avoid reading the images twice.
    """
    ratios = validate_ratios(ratios)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise DatasetError(f"seed must be an integer, got {seed!r}")
    if report is None:
        report = check_dataset(root, link_roots=link_roots)
    elif report.get("root") != str(Path(root).expanduser().resolve()) or "hashes" not in report:
        raise DatasetError(f"the report passed to make_split is not a check_dataset report of {root} "
                           f"(it is for {report.get('root')!r}) — call check_dataset({str(root)!r}) first.")
    classes = list(report["classes"])
    hashes: dict[str, str] = report["hashes"]
    assignment = _assign_splits(classes, hashes, ratios, seed)
    files = [{"path": path, "label": classes.index(_class_of(path)), "sha256": hashes[path],
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


def split_hash(classes: Sequence[str], files: Sequence[dict]) -> str:
    """sha256 of the canonical JSON of (classes, files): identifies a split independent of where root lives."""
    canonical = json.dumps({"classes": list(classes), "files": list(files)}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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


def _assign_splits(classes: list[str], hashes: dict[str, str], ratios: tuple[float, float, float],
                   seed: int) -> dict[str, str]:
    """path -> split. Units are groups of identical files; each unit belongs to the class of its first path."""
    members: dict[str, list[str]] = defaultdict(list)
    for path in sorted(hashes):
        members[hashes[path]].append(path)
    units_of_class: dict[str, list[tuple[str, list[str]]]] = defaultdict(list)
    for sha, paths in members.items():
        units_of_class[_class_of(paths[0])].append((sha, paths))

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


def write_manifest(manifest: dict, path: str | os.PathLike) -> Path:
    """Write the manifest as JSON atomically (`shared.fsutil`): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(path, json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n")


def read_manifest(path: str | os.PathLike) -> dict:
    """Load a manifest written by `write_manifest`; DatasetError if missing, malformed or edited."""
    path = Path(path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"split manifest {path} not found — make one with make_split().") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"split manifest {path} is unreadable ({e}) — delete it and make a new split.") from None
    missing = [k for k in ("classes", "files", "split_hash") if not isinstance(manifest, dict) or k not in manifest]
    if missing:
        raise DatasetError(f"{path} is not a split manifest (missing {', '.join(missing)}) — make one with "
                           f"make_split().")
    if split_hash(manifest["classes"], manifest["files"]) != manifest["split_hash"]:
        raise DatasetError(f"split manifest {path} was modified after it was made (its split_hash no longer "
                           f"matches) — make a new split instead of editing the file.")
    return manifest


def split_counts(manifest: dict) -> dict[str, dict[str, int]]:
    """{split: {class: number of images}} for train, val and test (zeros included)."""
    classes = manifest["classes"]
    counts = {split: {name: 0 for name in classes} for split in SPLITS}
    for f in manifest["files"]:
        counts[f["split"]][classes[f["label"]]] += 1
    return counts


def duplicates_across_splits(manifest: dict) -> list[dict]:
    """Groups of identical files (same sha256) found in more than one split: [{sha256, paths, splits}].

    Empty for manifests made by make_split; a non-empty answer means train/test leakage.
    """
    by_sha: dict[str, list[dict]] = defaultdict(list)
    for f in manifest["files"]:
        by_sha[f["sha256"]].append(f)
    out = []
    for sha, group in sorted(by_sha.items()):
        splits = sorted({f["split"] for f in group}, key=SPLITS.index)
        if len(splits) > 1:
            out.append({"sha256": sha, "paths": sorted(f["path"] for f in group), "splits": splits})
    return out


def compare_manifest(manifest: dict, report: dict) -> dict:
    """How a manifest relates to the dataset as checked now: leakage and files missing, changed or new."""
    now: dict[str, str] = report["hashes"]
    then = {f["path"]: f["sha256"] for f in manifest["files"]}
    return {
        "split_hash": manifest.get("split_hash"),
        "duplicates_across_splits": duplicates_across_splits(manifest),
        "missing": sorted(set(then) - set(now)),
        "changed": sorted(p for p in set(then) & set(now) if then[p] != now[p]),
        "new": sorted(set(now) - set(then)),
    }
