"""The split manifest: one JSON file (path, label, sha256, split of every file) saved with each run, so a run can
always be evaluated on exactly the images it never trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from shared.fsutil import write_atomic
from shared.data.scan import DatasetError


SPLITS = ("train", "val", "test")
MANIFEST_VERSION = 1


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


def split_hash(classes: Sequence[str], files: Sequence[dict]) -> str:
    """sha256 of the canonical JSON of (classes, files): identifies a split independent of where root lives."""
    canonical = json.dumps({"classes": list(classes), "files": list(files)}, sort_keys=True,
                           separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


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
