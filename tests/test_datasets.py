"""shared.data scan, check, split and manifest: layout scan, image check, deterministic stratified split manifest."""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import pytest

from shared.data.check import check_dataset, format_check_report
from shared.data.manifest import duplicates_across_splits, read_manifest, split_counts, write_manifest
from shared.data.scan import DatasetError, scan_dataset
from shared.data.split import make_split
from tests import imagegen


@pytest.fixture
def dataset(tmp_path) -> Path:
    return imagegen.make_image_folder(tmp_path / "ds", classes=["cat", "dog", "eel"], per_class=[14, 12, 10], size=32)


def _names(scan):
    return [p for p, _ in scan.files]


# --- scan ---------------------------------------------------------------------------------------------------

def test_scan_layout_recursion_and_case(tmp_path):
    root = tmp_path / "ds"
    imagegen.make_image(root / "b" / "x.PNG", 8)
    imagegen.make_image(root / "b" / "deep" / "er" / "y.JpEg", 8)
    imagegen.make_image(root / "a" / "z.jpg", 8)
    (root / "a" / "notes.txt").write_text("hi")
    (root / "a" / ".DS_Store").write_bytes(b"junk")
    (root / "README.md").write_text("about")
    imagegen.make_image(root / ".hidden" / "h.jpg", 8)
    imagegen.make_image(root / "__MACOSX" / "m.jpg", 8)
    scan = scan_dataset(root)
    assert scan.root == root.resolve()
    assert scan.classes == ["a", "b"]
    assert scan.files == [("a/z.jpg", 0), ("b/deep/er/y.JpEg", 1), ("b/x.PNG", 1)]
    assert dict(scan.ignored) == {"README.md": "not inside a class folder", "a/notes.txt": "not an image file (.txt)"}


def test_scan_unicode_and_spaces(tmp_path):
    root = tmp_path / "my data"
    imagegen.make_image(root / "crème brûlée" / "photo 1.jpg", 8)
    imagegen.make_image(root / "日本" / "写真.png", 8)
    scan = scan_dataset(root)
    assert scan.classes == ["crème brûlée", "日本"]
    assert _names(scan) == ["crème brûlée/photo 1.jpg", "日本/写真.png"]
    report = check_dataset(root)
    assert report["total"] == 2 and json.loads(json.dumps(report)) == report


def test_missing_root_and_file_root(tmp_path):
    with pytest.raises(DatasetError, match=r"nope does not exist"):
        scan_dataset(tmp_path / "nope")
    archive = tmp_path / "data.zip"
    archive.write_bytes(b"PK")
    with pytest.raises(DatasetError, match=r"data\.zip is a file.*extract the archive"):
        scan_dataset(archive)


def test_single_class_refused_naming_folder(tmp_path):
    root = tmp_path / "one"
    imagegen.make_image(root / "only" / "a.jpg", 8)
    with pytest.raises(DatasetError, match=r"one has only one class folder \('only'\).*at least 2"):
        scan_dataset(root)


def test_wrapper_folder_hint(tmp_path):
    root = imagegen.make_image_folder(tmp_path / "outer" / "flower_photos", classes=2, per_class=1, size=8)
    with pytest.raises(DatasetError, match=r"did you mean the dataset folder .*flower_photos"):
        scan_dataset(root.parent)


def test_images_without_class_folders(tmp_path):
    imagegen.make_image(tmp_path / "flat" / "a.jpg", 8)
    with pytest.raises(DatasetError, match=r"1 image files but no class sub-folders"):
        scan_dataset(tmp_path / "flat")
    (tmp_path / "void").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        scan_dataset(tmp_path / "void")


def test_empty_class_refused_naming_folder(dataset):
    (dataset / "fox").mkdir()
    (dataset / "fox" / "readme.txt").write_text("todo")
    with pytest.raises(DatasetError, match=r"without any image file: .*ds/fox \(1 other files, e\.g\. fox/readme\.txt\)"):
        scan_dataset(dataset)


def test_symlink_loop_does_not_hang(dataset):
    os.symlink(dataset / "cat", dataset / "cat" / "loop")
    os.symlink(dataset, dataset / "dog" / "up")
    result = {}
    t = threading.Thread(target=lambda: result.setdefault("scan", scan_dataset(dataset)), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "scan_dataset hangs on a symlink loop"
    scan = result["scan"]
    assert len(scan.files) == 36
    assert ("cat/loop/", "symlinked folder not followed") in scan.ignored


def test_unreadable_subfolder_reported(dataset, monkeypatch):
    locked = dataset / "cat" / "locked"
    imagegen.make_image(locked / "x.jpg", 8)
    real_scandir = os.scandir

    def scandir(path="."):  # tests run as root, where chmod 0 does not lock anything
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    scan = scan_dataset(dataset)
    assert ("cat/locked/", "cannot read folder (Permission denied)") in scan.ignored
    assert len(scan.files) == 36


# --- check --------------------------------------------------------------------------------------------------

def test_check_counts_sizes_and_ok(dataset):
    report = check_dataset(dataset, workers=2)
    assert report["classes"] == ["cat", "dog", "eel"]
    assert report["counts"] == {"cat": 14, "dog": 12, "eel": 10}
    assert report["total"] == 36 and report["imbalance_ratio"] == 1.4
    assert report["sizes"]["width"] == {"min": 32, "median": 32, "max": 32}
    assert report["sizes"]["aspect"]["median"] == 1.0
    assert report["unreadable"] == [] and report["ok"] and report["problems"] == []
    assert len(report["hashes"]) == 36
    json.dumps(report)
    text = format_check_report(report)
    assert "cat" in text and "36" in text and "No problems found." in text


def test_check_unreadable_are_skipped(tmp_path):
    root = imagegen.make_image_folder(tmp_path / "ds", classes=2, per_class=5, size=16, corrupt=5)
    report = check_dataset(root)
    assert report["counts"] == {"class_0": 5, "class_1": 5}
    reasons = {u["path"]: u["reason"] for u in report["unreadable"]}
    assert len(reasons) == 5
    assert reasons["class_0/broken_000.jpg"].startswith("truncated image")
    assert "contains text" in reasons["class_1/broken_001.jpg"]
    assert "HTML" in reasons["class_0/broken_002.jpg"]
    assert reasons["class_1/broken_003.jpg"].startswith("empty file")
    assert "SVG" in reasons["class_0/broken_004.jpg"]
    assert not report["ok"] and "5 files could not be decoded" in report["problems"][0]
    assert "Unreadable (skipped) (5)" in format_check_report(report)
    quick = check_dataset(root, decode=False)  # only empty files are caught without decoding
    assert len(quick["unreadable"]) == 1 and quick["sizes"] is None


def test_class_with_no_decodable_image_raises(dataset):
    for f in (dataset / "eel").iterdir():
        f.write_bytes(b"<html>nope</html>")
    with pytest.raises(DatasetError, match=r"without any usable image: .*ds/eel \(10 image files, none decodable"):
        check_dataset(dataset)


def test_check_duplicates_within_and_across(dataset):
    shutil.copy(dataset / "cat" / "cat_000.jpg", dataset / "cat" / "copy of cat_000.jpg")
    shutil.copy(dataset / "dog" / "dog_001.jpg", dataset / "eel" / "dog_001.jpg")
    report = check_dataset(dataset)
    assert report["duplicates"] == {
        "within_class": [["cat/cat_000.jpg", "cat/copy of cat_000.jpg"]],
        "across_classes": [["dog/dog_001.jpg", "eel/dog_001.jpg"]],
    }
    assert any("label conflict" in p and "eel/dog_001.jpg" in p for p in report["problems"])
    assert any("identical images inside a class" in p for p in report["problems"])
    assert not report["ok"]


def test_check_flags_small_class_and_imbalance(tmp_path):
    root = imagegen.make_image_folder(tmp_path / "ds", classes=2, per_class=[30, 3], size=16)
    problems = " ".join(check_dataset(root)["problems"])
    assert "imbalanced" in problems and "'class_1' has only 3 usable images" in problems


# --- split --------------------------------------------------------------------------------------------------

def test_split_deterministic_byte_identical(dataset, tmp_path):
    a = make_split(dataset, seed=3)
    copy = shutil.copytree(dataset, tmp_path / "elsewhere")
    b = make_split(dataset, seed=3, report=check_dataset(dataset, workers=1))
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    moved = make_split(copy, seed=3)
    assert moved["split_hash"] == a["split_hash"]  # the hash does not depend on where the folder lives
    other = make_split(dataset, seed=4)
    assert other["split_hash"] != a["split_hash"]
    assert [f["path"] for f in a["files"]] == sorted(f["path"] for f in a["files"])
    assert "time" not in json.dumps(a)


def test_split_stratified_with_minimums(dataset):
    manifest = make_split(dataset, ratios=(0.5, 0.25, 0.25), seed=0)
    counts = split_counts(manifest)
    assert counts == {"train": {"cat": 7, "dog": 6, "eel": 5},
                      "val": {"cat": 4, "dog": 3, "eel": 3},
                      "test": {"cat": 3, "dog": 3, "eel": 2}}
    tiny = imagegen.make_image_folder(dataset.parent / "tiny", classes=2, per_class=3, size=8)
    counts = split_counts(make_split(tiny, ratios=(0.8, 0.1, 0.1)))
    assert all(counts[s][c] == 1 for s in counts for c in counts[s])
    no_test = split_counts(make_split(tiny, ratios=(0.7, 0.3, 0.0)))
    assert sum(no_test["test"].values()) == 0


def test_split_manifest_fields(dataset):
    m = make_split(dataset)
    assert m["classes"] == ["cat", "dog", "eel"] and m["seed"] == 0 and m["ratios"] == [0.7, 0.15, 0.15]
    f = m["files"][0]
    assert set(f) == {"path", "label", "sha256", "split"} and f["label"] == 0 and len(f["sha256"]) == 64
    assert m["skipped"] == [] and len(m["split_hash"]) == 64


def test_identical_images_share_a_split(dataset):
    for k in range(6):  # many copies, within and across classes
        shutil.copy(dataset / "cat" / "cat_000.jpg", dataset / "cat" / f"dup_{k}.jpg")
        shutil.copy(dataset / "dog" / f"dog_00{k}.jpg", dataset / "eel" / f"conflict_{k}.jpg")
    for seed in range(5):
        m = make_split(dataset, seed=seed)
        assert duplicates_across_splits(m) == []
        split_of = {f["path"]: f["split"] for f in m["files"]}
        assert len({split_of["cat/cat_000.jpg"]} | {split_of[f"cat/dup_{k}.jpg"] for k in range(6)}) == 1
        for k in range(6):  # label conflicts: both entries kept, together
            assert split_of[f"dog/dog_00{k}.jpg"] == split_of[f"eel/conflict_{k}.jpg"]


def test_duplicates_across_splits_detects_leakage(dataset):
    m = make_split(dataset)
    m["files"][1]["sha256"] = m["files"][0]["sha256"]
    m["files"][1]["split"] = "test" if m["files"][0]["split"] != "test" else "train"
    leaks = duplicates_across_splits(m)
    assert len(leaks) == 1 and leaks[0]["paths"] == [m["files"][0]["path"], m["files"][1]["path"]]
    report = check_dataset(dataset, manifest=m)
    assert report["manifest"]["duplicates_across_splits"] == leaks
    assert any("more than one split" in p for p in report["problems"])


def test_check_with_manifest_sees_changes(dataset):
    m = make_split(dataset)
    (dataset / "cat" / "cat_000.jpg").unlink()
    imagegen.make_image(dataset / "dog" / "new.jpg", 32, seed=99)
    report = check_dataset(dataset, manifest=m)
    assert report["manifest"]["missing"] == ["cat/cat_000.jpg"] and report["manifest"]["new"] == ["dog/new.jpg"]
    assert any("changed since the split" in p for p in report["problems"])


def test_split_skips_unreadable(tmp_path):
    root = imagegen.make_image_folder(tmp_path / "ds", classes=2, per_class=6, size=16, corrupt=2)
    m = make_split(root)
    assert [s["path"] for s in m["skipped"]] == ["class_0/broken_000.jpg", "class_1/broken_001.jpg"]
    assert all("broken" not in f["path"] for f in m["files"]) and len(m["files"]) == 12


@pytest.mark.parametrize("ratios, message", [
    ((0.7, 0.3), "three numbers"),
    ((0.5, 0.5, 0.5), "sum 1.5"),
    ((1.2, -0.1, -0.1), "three numbers"),
    ((0.0, 0.5, 0.5), "train and val must be > 0"),
    ((0.8, 0.0, 0.2), "train and val must be > 0"),
    (("a", "b", "c"), "three numbers"),
    ((float("nan"), 0.5, 0.5), "three numbers"),
    (0.7, "three numbers"),
])
def test_ratio_validation(dataset, ratios, message):
    with pytest.raises(DatasetError, match=message):
        make_split(dataset, ratios=ratios)


def test_report_for_other_root_refused(dataset, tmp_path):
    other = imagegen.make_image_folder(tmp_path / "other", classes=2, per_class=3, size=8)
    with pytest.raises(DatasetError, match="not a check_dataset report of"):
        make_split(dataset, report=check_dataset(other))


def test_manifest_roundtrip_and_tamper(dataset, tmp_path):
    m = make_split(dataset)
    path = write_manifest(m, tmp_path / "run" / "split.json")
    assert read_manifest(path) == m
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # no temp file left behind
    data = json.loads(path.read_text())
    data["files"][0]["split"] = "test" if data["files"][0]["split"] != "test" else "train"
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match="modified after it was made"):
        read_manifest(path)
    with pytest.raises(DatasetError, match="not found"):
        read_manifest(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(DatasetError, match="unreadable"):
        read_manifest(tmp_path / "bad.json")
