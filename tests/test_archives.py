"""One set of archive rules (shared/data/archives.py) for both ways an archive reaches the disk: the page's .zip
upload (ui.paths.extract_zip) and a downloaded .tar (shared.data.download). Every hostile entry is refused by
both, with the same words, and nothing is written."""

from __future__ import annotations

import hashlib
import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from shared.data.download import DownloadError, download_flowers
from tests.imagegen import jpeg_bytes
from ui.paths import PathError, extract_zip

IMAGE = jpeg_bytes(16, seed=1)
# (entry name, kind, what the refusal says)
HOSTILE = [
    ("../evil.jpg", "file", "climbs out of its folder"),
    ("flower_photos/../../evil.jpg", "file", "climbs out of its folder"),
    ("a\\..\\..\\evil.jpg", "file", "climbs out of its folder"),
    ("/tmp/resnet-lab-evil.jpg", "file", "has an absolute path"),
    ("C:/evil.jpg", "file", "has an absolute path"),
    ("\\evil.jpg", "file", "has an absolute path"),
    ("/".join(["d"] * 40) + "/evil.jpg", "file", "nests folders more than 32 deep"),
    ("flower_photos/a/passwd.jpg", "symlink", "is a link"),
]


def _zip(path: Path, name: str, kind: str) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("flower_photos/a/ok.jpg", IMAGE)
        zf.writestr("flower_photos/b/ok.jpg", IMAGE)
        info = zipfile.ZipInfo("placeholder")
        info.filename = name  # the constructor normalises separators; the raw name is what an attacker writes
        if kind == "symlink":
            info.create_system = 3
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, "/etc/passwd")
        else:
            zf.writestr(info, IMAGE)
    return path


def _tar(path: Path, name: str, kind: str) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for ok in ("flower_photos/a/ok.jpg", "flower_photos/b/ok.jpg"):
            info = tarfile.TarInfo(ok)
            info.size = len(IMAGE)
            tar.addfile(info, io.BytesIO(IMAGE))
        info = tarfile.TarInfo(name)
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        elif kind == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "flower_photos/a/ok.jpg"
            tar.addfile(info)
        elif kind == "fifo":
            info.type = tarfile.FIFOTYPE
            tar.addfile(info)
        else:
            info.size = len(IMAGE)
            tar.addfile(info, io.BytesIO(IMAGE))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.mark.parametrize("name, kind, problem", HOSTILE)
def test_a_hostile_zip_entry_is_refused_and_nothing_is_written(tmp_path, name, kind, problem):
    dest = tmp_path / "deep" / "data"
    with pytest.raises(PathError, match=f"entry .* {problem}") as caught:
        extract_zip(_zip(tmp_path / "upload.zip", name, kind), dest)
    assert "zip the real image files again" in str(caught.value)
    assert _files(dest) == [] and not (tmp_path / "deep" / "evil.jpg").exists()
    assert not Path("/tmp/resnet-lab-evil.jpg").exists()


@pytest.mark.parametrize("name, kind, problem", HOSTILE + [
    ("flower_photos/a/hard.jpg", "hardlink", "is a link"),
    ("flower_photos/a/pipe.jpg", "fifo", "is a device or other special file"),
])
def test_a_hostile_tar_member_is_refused_and_nothing_is_written(tmp_path, name, kind, problem):
    dest = tmp_path / "deep" / "data"
    dest.mkdir(parents=True)
    sha = _tar(dest / "flower_photos.tgz", name, kind)  # placed by hand: the same extraction, no network
    with pytest.raises(DownloadError, match=f"refusing to extract flower_photos.tgz: entry .* {problem}"):
        download_flowers(dest, url="http://127.0.0.1:9/flower_photos.tgz", sha256=sha, progress=False)
    assert _files(dest) == ["flower_photos.tgz"] and not (tmp_path / "deep" / "evil.jpg").exists()
    assert not Path("/tmp/resnet-lab-evil.jpg").exists()


def test_the_same_archive_content_extracts_both_ways(tmp_path):
    # the rules refuse only what is hostile: the same two images arrive through either path
    zipped = extract_zip(_zip(tmp_path / "ok.zip", "flower_photos/c/ok.jpg", "file"), tmp_path / "up")
    assert sorted(p.name for p in zipped.folder.iterdir()) == ["a", "b", "c"]
    dest = tmp_path / "dl"
    dest.mkdir()
    sha = _tar(dest / "flower_photos.tgz", "flower_photos/c/ok.jpg", "file")
    folder = download_flowers(dest, url="http://127.0.0.1:9/flower_photos.tgz", sha256=sha, progress=False)
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == ["a", "b", "c"]
