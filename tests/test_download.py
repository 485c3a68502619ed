"""shared.data.download against a local HTTP server serving archives the tests build (never the internet)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import socket
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest

from shared.data import download
from shared.data.scan import scan_dataset
from shared.data.download import COMPLETE_MARKER, FLOWERS_SHA256, DownloadError, download_flowers
from tests import imagegen


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


class _Truncating(_Quiet):
    """Announces the full length, sends half, hangs up: an interrupted download."""

    def do_GET(self):
        data = (Path(self.directory) / self.path.lstrip("/")).read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve(tmp_path):
    """serve(handler=_Quiet) -> base URL of a server on 127.0.0.1 for tmp_path/'www'."""
    www = tmp_path / "www"
    www.mkdir()
    servers = []

    def start(handler=_Quiet):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(www)))
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    start.www = www
    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _tgz(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> str:
    """Write a .tgz of name -> bytes (and symlinks name -> target); return its sha256."""
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        for name, link_target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type = tarfile.SYMTYPE
            info.linkname = link_target
            tar.addfile(info)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _flower_members(prefix="flower_photos/") -> dict[str, bytes]:
    members = {f"{prefix}LICENSE.txt": b"CC-BY 2.0\n"}
    for cls in ("daisy", "roses"):
        for k in range(2):
            members[f"{prefix}{cls}/{cls}_{k}.jpg"] = imagegen.jpeg_bytes(16, seed=k + len(cls))
    return members


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_known_checksum_constant():
    assert len(FLOWERS_SHA256) == 64 and int(FLOWERS_SHA256, 16)


def test_download_extract_and_skip_when_present(serve, tmp_path):
    base = serve()
    sha = _tgz(serve.www / "flower_photos.tgz", _flower_members())
    dest = tmp_path / "data"
    path = download_flowers(dest, url=f"{base}/flower_photos.tgz", sha256=sha, progress=False)
    assert path == dest.resolve() / "flower_photos"
    assert sorted(p.name for p in dest.iterdir()) == ["flower_photos"]  # no temp files or archive left
    assert (path / COMPLETE_MARKER).is_file() and (path / "LICENSE.txt").read_bytes() == b"CC-BY 2.0\n"
    scan = scan_dataset(path)
    assert scan.classes == ["daisy", "roses"] and len(scan.files) == 4
    # present and complete: no network needed
    again = download_flowers(dest, url=f"http://127.0.0.1:{_free_port()}/flower_photos.tgz", sha256=sha,
                             progress=False)
    assert again == path


def test_progress_bar_does_not_break(serve, tmp_path, capsys):
    base = serve()
    sha = _tgz(serve.www / "flower_photos.tgz", _flower_members())
    download_flowers(tmp_path / "d", url=f"{base}/flower_photos.tgz", sha256=sha, progress=True)
    assert "flower_photos.tgz" in capsys.readouterr().err


def test_checksum_mismatch_leaves_nothing(serve, tmp_path):
    base = serve()
    _tgz(serve.www / "flower_photos.tgz", _flower_members())
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match=r"checksum mismatch .* expected sha256 0{64}, got [0-9a-f]{64}"):
        download_flowers(dest, url=f"{base}/flower_photos.tgz", sha256="0" * 64, progress=False)
    assert list(dest.iterdir()) == []


def test_unreachable_url_explains_manual_steps(tmp_path):
    url = f"http://127.0.0.1:{_free_port()}/flower_photos.tgz"
    dest = tmp_path / "data"
    with pytest.raises(DownloadError) as info:
        download_flowers(dest, url=url, progress=False)
    message = str(info.value)
    assert url in message and "browser" in message and f"tar xzf flower_photos.tgz -C {dest.resolve()}" in message
    assert list(dest.iterdir()) == []


def test_http_404(serve, tmp_path):
    base = serve()
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_flowers(tmp_path / "d", url=f"{base}/missing.tgz", progress=False)


def test_interrupted_download_leaves_nothing(serve, tmp_path):
    base = serve(_Truncating)
    sha = _tgz(serve.www / "flower_photos.tgz", _flower_members())
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="interrupted|stopped after"):
        download_flowers(dest, url=f"{base}/flower_photos.tgz", sha256=sha, progress=False)
    assert list(dest.iterdir()) == []


@pytest.mark.parametrize("members, links, problem", [
    ({"flower_photos/a/x.jpg": b"x", "../evil.txt": b"pwned"}, None, "climbs out of its folder"),
    ({"flower_photos/a/x.jpg": b"x", "flower_photos/../../evil.txt": b"pwned"}, None, "climbs out of its folder"),
    ({"flower_photos/a/x.jpg": b"x", "/tmp/evil.txt": b"pwned"}, None, "absolute path"),
    ({"flower_photos/a/x.jpg": b"x"}, {"flower_photos/a/passwd": "/etc/passwd"}, "is a link"),
])
def test_escaping_members_refused(serve, tmp_path, members, links, problem):
    base = serve()
    sha = _tgz(serve.www / "flower_photos.tgz", members, links)
    dest = tmp_path / "deep" / "data"
    with pytest.raises(DownloadError, match=f"refusing to extract .*{problem}"):
        download_flowers(dest, url=f"{base}/flower_photos.tgz", sha256=sha, progress=False)
    assert list(dest.iterdir()) == []
    assert not (tmp_path / "deep" / "evil.txt").exists() and not (tmp_path / "evil.txt").exists()


def test_corrupt_archive(serve, tmp_path):
    base = serve()
    (serve.www / "flower_photos.tgz").write_bytes(b"<html>not a tarball</html>")
    dest = tmp_path / "data"
    with pytest.raises(DownloadError, match="not a valid .tar.gz archive"):
        download_flowers(dest, url=f"{base}/flower_photos.tgz", sha256=None, progress=False)
    assert list(dest.iterdir()) == []


def test_existing_incomplete_folder_refused(tmp_path):
    (tmp_path / "flower_photos" / "daisy").mkdir(parents=True)
    with pytest.raises(DownloadError, match="already exists but was not made by a complete download"):
        download_flowers(tmp_path, url=f"http://127.0.0.1:{_free_port()}/flower_photos.tgz", progress=False)


def test_archive_placed_by_hand_is_used_offline(tmp_path):
    dest = tmp_path / "data"
    dest.mkdir()
    sha = _tgz(dest / "flower_photos.tgz", _flower_members())
    url = f"http://127.0.0.1:{_free_port()}/flower_photos.tgz"
    path = download_flowers(dest, url=url, sha256=sha, progress=False)
    assert len(scan_dataset(path).files) == 4
    assert (dest / "flower_photos.tgz").exists()  # the user's file is left alone
    other = tmp_path / "other"
    other.mkdir()
    _tgz(other / "flower_photos.tgz", _flower_members())
    with pytest.raises(DownloadError, match="placed by hand"):
        download_flowers(other, url=url, sha256="1" * 64, progress=False)


def test_flat_archive_becomes_the_folder(serve, tmp_path):
    base = serve()
    sha = _tgz(serve.www / "shapes.tar.gz", _flower_members(prefix=""))
    path = download_flowers(tmp_path, url=f"{base}/shapes.tar.gz", sha256=sha, progress=False)
    assert path.name == "shapes" and scan_dataset(path).classes == ["daisy", "roses"]


def test_flowers102_export(tmp_path, monkeypatch):
    scipy_io = pytest.importorskip("scipy.io")
    from torchvision.datasets import Flowers102

    raw = tmp_path / "fake" / "flowers-102"
    labels = np.array([1, 102, 1, 77])
    for i in range(len(labels)):
        imagegen.make_image(raw / "jpg" / f"image_{i + 1:05d}.jpg", 8)
    scipy_io.savemat(str(raw / "imagelabels.mat"), {"labels": labels})
    monkeypatch.setattr(download, "_fetch_flowers102_raw", lambda _raw: raw)
    path = download.download_flowers102(tmp_path / "data")
    names = Flowers102.classes
    assert sorted(p.name for p in path.iterdir() if not p.name.startswith(".")) == sorted({names[0], names[101],
                                                                                           names[76]})
    assert sorted(p.name for p in (path / names[0]).iterdir()) == ["image_00001.jpg", "image_00003.jpg"]
    assert (path / COMPLETE_MARKER).is_file() and names[0] == "pink primrose"
