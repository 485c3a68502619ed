"""Memory and disk exhaustion (hardening issue, item 8), pushed the way an unlucky user or an attacker would.

- A 160 kB 16-bit PNG claiming 9000x9000 pixels (and a 630 kB 16-bit RGBA one) is refused from its header, by
  `shared.data.images` and by the real page's /predict and /check_dataset over HTTP, without decoding a pixel;
  16-bit images under the cap decode in bounded memory, and parallel decodes share one byte budget.
- The decoded-image cache keeps under its cap (least recently used first, never an array in use) and a full disk
  is a clear "disk full" failure — in a subprocess, in a real worker (the run FAILED, the worker alive, earlier
  runs untouched) — instead of a SIGBUS. The full disk is a real 20 MB tmpfs (we run as root; skipped where
  mounting is not allowed) and, everywhere, a refused `posix_fallocate`.
- Uploaded .zip files: zip bombs, the upload folder's total cap, leftovers of crashed extractions, the uploaded
  archive itself, through the page's own upload event over HTTP.

Memory is measured as the peak resident size (`ru_maxrss`, `VmHWM`) of a separate process.
"""

from __future__ import annotations

import errno
import http.client
import io
import json
import os
import re
import struct
import subprocess
import sys
import threading
import time
import uuid
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared.data import images
from shared.data.cache import CacheFullError, load_image_array
from shared.data.images import ByteBudget, ImageError, load_rgb, load_rgb_resized, verify_image
from tests.imagegen import make_image_folder
from tests.procs import REPO, Processes, wait_for
from tests.tiny import TINY_TRAIN, train_tiny

pytestmark = pytest.mark.timeout(300)


# --- crafted images ------------------------------------------------------------------------------------------------

def write_zero_png(path: Path, width: int, height: int, *, bit_depth: int = 16, colour_type: int = 0) -> Path:
    """A valid PNG of all-zero pixels, written row by row (the image itself is never in memory): 9000x9000
    16-bit greyscale is about 160 kB. colour_type 0 = greyscale, 2 = RGB, 6 = RGBA."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    rows = b"\x00" * (1 + width * channels * bit_depth // 8) * 32  # 32 rows of filter byte + samples
    deflate = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_RLE)  # on zeros: level 9's size in under half its time
    idat = b"".join([deflate.compress(rows) for _ in range(height // 32)]
                    + [deflate.compress(rows[: len(rows) // 32 * (height % 32)]), deflate.flush()])

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path


def run_python(code: str, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter of this checkout (its peak memory is its own)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env})


@pytest.fixture(scope="module")
def bombs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("bombs")
    return {"grey16": write_zero_png(root / "deep 16-bit.png", 9000, 9000),
            "rgba16": write_zero_png(root / "rgba16.png", 9000, 9000, colour_type=6)}


# --- shared.data.images ---------------------------------------------------------------------------------------------------

def test_a_160_kb_16bit_png_is_refused_from_its_header(bombs):
    grey, rgba = bombs["grey16"], bombs["rgba16"]
    assert grey.stat().st_size < 200_000 and rgba.stat().st_size < 700_000
    assert 9000 * 9000 < images.MAX_PIXELS  # under Pillow's pixel cap: the old check let it through
    expected = r"deep 16-bit\.png: refused — decoding this 9000x9000 I;16 image would take 386 MB of memory, " \
               r"more than the limit of 256 MB per image .*Downscale it"
    for call in (lambda: load_rgb(grey), lambda: load_rgb_resized(grey, 64), lambda: verify_image(grey)):
        with pytest.raises(ImageError, match=expected):
            call()
    with pytest.raises(ImageError, match="9000x9000 I;16 image would take 386 MB"):
        load_rgb(grey.read_bytes())
    with pytest.raises(ImageError, match=r"rgba16\.png: refused — decoding this 9000x9000 RGBA image .* 541 MB"):
        load_rgb(rgba)


def test_refusing_the_bombs_costs_no_memory(bombs):
    """Measured in a fresh process: the old code decoded the 160 kB file into about 1.6 GB."""
    done = run_python(
        "import resource, sys\n"
        "from shared.data.images import ImageError, load_rgb\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "for path in sys.argv[1:]:\n"
        "    try:\n"
        "        load_rgb(path)\n"
        "    except ImageError as exc:\n"
        "        print('refused', exc)\n"
        "print('grew_mb', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\n",
        str(bombs["grey16"]), str(bombs["rgba16"]))
    assert done.returncode == 0, done.stderr
    assert sum(line.startswith("refused ") for line in done.stdout.splitlines()) == 2, done.stdout
    grew = float(done.stdout.split("grew_mb")[1])
    assert grew < 50, f"refusing two bombs grew the process by {grew:.0f} MB"


def test_16bit_images_under_the_cap_decode_in_bounded_memory(tmp_path):
    """16-bit greyscale is scaled to 8 bits in strips: the peak stays near the decoded size (the old float64
    conversion took 4x it, 720 MB for this image)."""
    path = write_zero_png(tmp_path / "6000.png", 6000, 6000)
    done = run_python(
        "import resource, sys\n"
        "from PIL import Image\n"
        "from shared.data.images import decode_bytes, load_rgb\n"
        "need = decode_bytes(Image.open(sys.argv[1]))\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n"
        "img = load_rgb(sys.argv[1])\n"
        "grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base\n"
        "print(img.mode, img.size, need, grew)\n", str(path))
    assert done.returncode == 0, done.stderr
    mode, w, h, need, grew = done.stdout.replace("(", "").replace(")", "").replace(",", "").split()
    assert (mode, w, h) == ("RGB", "6000", "6000")
    assert int(grew) < 2 * int(need), f"decoding took {int(grew) / 2**20:.0f} MB for {int(need) / 2**20:.0f} MB"


def test_strip_scaling_gives_the_same_pixels(tmp_path):
    rows = np.arange(1200, dtype=np.uint32)[:, None] * 54 % 65536  # several strips of 3000-pixel rows
    values = np.broadcast_to(rows, (1200, 3000)).astype(np.uint16)
    path = tmp_path / "gradient.png"
    Image.fromarray(values).save(path)
    out = np.asarray(load_rgb(path))
    assert out.shape == (1200, 3000, 3)
    assert np.array_equal(out[..., 0], np.round(values / 257.0).astype(np.uint8))
    wide_range = Image.fromarray((np.arange(-1000, 2000, dtype=np.int32)[None, :] * np.ones((600, 1), np.int32)))
    grey = np.asarray(load_rgb(wide_range))[..., 0]
    assert grey[0, 0] == 0 and grey[0, -1] == 255 and np.all(np.diff(grey[0].astype(int)) >= 0)


def test_the_byte_budget_never_overcommits_and_serves_in_order():
    budget = ByteBudget(100)
    peak, order, lock = [0], [], threading.Lock()

    def use(tag: str, nbytes: int, hold: float) -> None:
        with budget.reserve(nbytes):
            with lock:
                peak[0] = max(peak[0], budget.in_use)
                order.append(tag)
            time.sleep(hold)

    first = threading.Thread(target=use, args=("first", 60, 0.3))
    first.start()
    wait_for(lambda: budget.in_use == 60, 5, "the first reservation")
    threads = [threading.Thread(target=use, args=("big", 500, 0.05))]  # more than the capacity: runs alone
    threads += [threading.Thread(target=use, args=(f"small{i}", 30, 0.05)) for i in range(6)]
    for t in threads:
        t.start()
        time.sleep(0.02)  # arrive in this order
    for t in [first, *threads]:
        t.join(10)
    assert peak[0] <= 100
    assert order[:2] == ["first", "big"], order  # the small ones that would fit beside `first` wait their turn
    assert budget.in_use == 0


PARALLEL_DECODES = (
    "import resource, sys\n"
    "from concurrent.futures import ThreadPoolExecutor\n"
    "from pathlib import Path\n"
    "from PIL import Image\n"
    "from shared.data import images\n"
    "paths = sorted(Path(sys.argv[1]).glob('*.png'))\n"
    "one = images.decode_bytes(Image.open(paths[0]))\n"
    "images.DECODE_BUDGET = images.ByteBudget(int(one * float(sys.argv[2])))\n"
    "def kb(field):\n"
    "    return next(int(line.split()[1]) for line in open('/proc/self/status') if line.startswith(field)) * 1024\n"
    # the peak so far (imports) must not hide the decodes' peak: reset VmHWM to the current RSS, then measure from there
    "open('/proc/self/clear_refs', 'w').write('5')\n"
    "base = kb('VmRSS:')\n"
    "with ThreadPoolExecutor(int(sys.argv[3])) as pool:\n"
    "    sizes = list(pool.map(images.verify_image, paths))\n"
    "print(len(sizes), one, kb('VmHWM:') - base)\n"
)


@pytest.mark.slow  # three processes decoding six 9-megapixel images each
def test_parallel_decodes_share_one_memory_budget(tmp_path):
    """Six threads decode six 16-bit images at once. With a budget of one image's decode they take turns and the
    process grows as much as when one thread decodes them in a row; with room for all six it grows several times
    more. glibc is told to return large freed blocks at once (MALLOC_MMAP_THRESHOLD_): otherwise each thread's
    arena keeps what its last decode freed, and the peak measures that cache instead of what decodes hold."""
    for i in range(6):
        write_zero_png(tmp_path / f"{i}.png", 3000, 3000)
    grew = {}
    for name, budget, threads in (("budget of one", 1.2, 6), ("budget of six", 6.5, 6), ("one thread", 6.5, 1)):
        done = run_python(PARALLEL_DECODES, str(tmp_path), str(budget), str(threads),
                          MALLOC_MMAP_THRESHOLD_="131072")
        assert done.returncode == 0, done.stderr
        count, one, grew[name] = map(int, done.stdout.split())
        assert count == 6
    mb = ", ".join(f"{k}: {v / 2**20:.0f} MB" for k, v in grew.items())
    assert grew["budget of one"] < 1.5 * grew["one thread"] + 10 * 2**20, mb
    assert grew["budget of six"] > 3 * grew["one thread"], mb  # they overlap without the budget


# --- the decoded-image cache -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_dataset(tmp_path_factory) -> tuple[Path, list[dict]]:
    root = make_image_folder(tmp_path_factory.mktemp("ds") / "data", classes=2, per_class=3, size=40, ext=".png")
    files = [{"path": str(p.relative_to(root)), "sha256": f"{i:064x}"} for i, p in enumerate(sorted(root.rglob("*.png")))]
    return root, files


def arrays_in(cache_dir: Path) -> dict[int, Path]:
    """side -> array file, read from the sidecars."""
    out = {}
    for meta in cache_dir.glob("*.json"):
        out[json.loads(meta.read_text())["shape"][-1]] = meta.with_suffix(".u8")
    return out


def set_age(path: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    os.utime(path, (t, t))


def test_the_cache_evicts_the_least_recently_used_array_to_stay_under_its_cap(tmp_path, small_dataset):
    root, files = small_dataset
    cache = tmp_path / "cache"
    size = {side: len(files) * 3 * side * side for side in (32, 48, 64)}  # 18 kB, 41 kB, 74 kB
    cap = size[32] + size[64] + 1000
    for side in (32, 48):
        load_image_array(root, files, side, cache, max_bytes=cap)
    made = arrays_in(cache)
    set_age(made[32], 300)
    set_age(made[48], 200)
    hit = load_image_array(root, files, 32, cache, max_bytes=cap)  # a hit marks 32 as just used
    del hit
    assert time.time() - made[32].stat().st_mtime < 60
    load_image_array(root, files, 64, cache, max_bytes=cap)
    assert sorted(arrays_in(cache)) == [32, 64]  # 48 went: least recently used
    assert not made[48].exists()
    assert sum(p.stat().st_size for p in cache.glob("*.u8")) <= cap


def test_an_array_in_use_is_never_evicted_and_a_dead_builds_leftover_is(tmp_path, small_dataset):
    import fcntl

    root, files = small_dataset
    cache = tmp_path / "cache"
    size = {side: len(files) * 3 * side * side for side in (32, 64)}
    in_use = load_image_array(root, files, 48, cache)  # a running training maps it
    expected = np.array(in_use[0])
    set_age(arrays_in(cache)[48], 3600)
    dead = cache / "0123456789abcdef01234567.u8-tmp99999"  # a build killed mid-way
    building = cache / "0123456789abcdef01234567.u8-tmp88888"  # a build running in another process
    for path in (dead, building):
        path.write_bytes(b"\0" * 50_000)
        set_age(path, 3600)
    with open(building, "rb") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        load_image_array(root, files, 32, cache, max_bytes=size[32] + 1000)  # a cap with room for 32 only
        assert not dead.exists() and building.exists()
    assert arrays_in(cache)[48].exists() and np.array_equal(in_use[0], expected)
    del in_use  # the training ended
    load_image_array(root, files, 64, cache, max_bytes=size[64] + 1000)
    assert sorted(arrays_in(cache)) == [64] and sorted(p.suffix for p in cache.iterdir()) == [".json", ".u8"]


def test_a_cache_bigger_than_its_cap_is_refused_before_decoding(tmp_path, small_dataset):
    root, files = small_dataset
    with pytest.raises(CacheFullError, match=r"needs 0\.07 MB, more than the cache's cap of 0\.07 MB "
                                             r"\(RESNET_LAB_CACHE_MAX_GB\) — raise the cap"):
        load_image_array(root, files, 64, tmp_path / "cache", max_bytes=len(files) * 3 * 64 * 64 - 1)
    assert list((tmp_path / "cache").iterdir()) == []


def test_a_refused_allocation_is_a_disk_full_error(tmp_path, small_dataset, monkeypatch):
    """Where no tmpfs can be mounted: the filesystem refuses the blocks (ENOSPC) although free space looked fine."""
    root, files = small_dataset

    def no_space(fd, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "posix_fallocate", no_space)
    cache = tmp_path / "cache"
    with pytest.raises(CacheFullError, match=rf"^disk full: [\d.]+ [MG]B needed in {re.escape(str(cache))}, [\d.]+ "
                                             r"[MG]B free — free space or set RESNET_LAB_CACHE_DIR / "
                                             r"RESNET_LAB_CACHE_MAX_GB$"):
        load_image_array(root, files, 32, cache)
    assert list(cache.iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A real 20 MB filesystem (tmpfs), unmounted afterwards; skipped where mounting is not allowed."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode}); "
                    "test_a_refused_allocation_is_a_disk_full_error covers the error path")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


BUILD_CACHE = (
    "import sys\n"
    "from pathlib import Path\n"
    "from shared.data import cache\n"
    "root, cache_dir, side, lie = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == 'lie'\n"
    "if lie:  # the free-space check is fooled: posix_fallocate must still stop it\n"
    "    import collections, shutil\n"
    "    Usage = collections.namedtuple('Usage', 'total used free')\n"
    "    cache.shutil.disk_usage = lambda p: Usage(10**12, 0, 10**12)\n"
    "files = [{'path': str(p.relative_to(root)), 'sha256': str(i)} for i, p in enumerate(sorted(root.rglob('*.png')))]\n"
    "try:\n"
    "    cache.load_image_array(root, files, side, cache_dir)\n"
    "    print('built')\n"
    "except cache.CacheFullError as exc:\n"
    "    print('refused:', exc)\n"
)


@pytest.mark.parametrize("free_space_check", ["honest", "lie"])
def test_a_full_disk_is_a_clear_error_not_a_sigbus(small_disk, small_dataset, free_space_check):
    """The array (6 x 3 x 1100 x 1100 = 22 MB) does not fit on the 20 MB disk. The old code grew a
    sparse memory-mapped file and died of SIGBUS when a page could not be backed."""
    root, _ = small_dataset
    done = run_python(BUILD_CACHE, str(root), str(small_disk), "1100", free_space_check)
    assert done.returncode == 0, f"killed by signal {-done.returncode}" if done.returncode < 0 else done.stderr
    assert done.stdout.startswith(f"refused: disk full: ") and f"needed in {small_disk}, " in done.stdout, done.stdout
    assert done.stdout.strip().endswith("— free space or set RESNET_LAB_CACHE_DIR / RESNET_LAB_CACHE_MAX_GB")
    assert list(small_disk.iterdir()) == []  # nothing half-written left behind


# --- the worker on a full cache disk -------------------------------------------------------------------------------

@pytest.mark.slow  # a real worker process
def test_a_run_whose_cache_does_not_fit_fails_once_with_disk_full(small_disk, tmp_path, redis_url, start_worker):
    from shared.training.config import TrainConfig
    from shared.settings import Settings
    from ui.client import QueueClient

    data = make_image_folder(tmp_path / "data", classes=2, per_class=6, size=40)
    models = tmp_path / "models"
    client = QueueClient(Settings(models_dir=models, redis_url=redis_url, visibility_timeout=3600))
    tiny = dict(TINY_TRAIN, batch_size=4)
    worker = start_worker(models, RESNET_LAB_CACHE_DIR=small_disk, RESNET_LAB_LEASE_SECONDS=3)
    [earlier] = client.submit([TrainConfig(data_dir=str(data), **tiny)])
    wait_for(lambda: client.registry.get(earlier)["status"] == "succeeded", 180, "the earlier run to succeed")
    before = {p: p.read_bytes() for p in (models / earlier).rglob("*") if p.is_file()}

    # 12 images x 3 x 1170 x 1170 (image size 1024) = 49 MB: over the 20 MB disk
    [doomed] = client.submit([TrainConfig(data_dir=str(data), **{**tiny, "image_size": 1024})])
    wait_for(lambda: client.registry.get(doomed)["status"] not in ("queued", "running") or not worker.alive(),
             120, "the run to end")
    record = client.registry.get(doomed)
    assert worker.alive(), f"the worker died:\n{worker.log()[-3000:]}"
    assert record["status"] == "failed", record
    assert record["error"].startswith("disk full: ") and f"GB needed in {small_disk}, " in record["error"]
    assert record["error"].endswith("— free space or set RESNET_LAB_CACHE_DIR / RESNET_LAB_CACHE_MAX_GB")
    assert client.store.status(doomed)["error"] == record["error"]
    assert int(record.get("crashes") or 0) == 0 and int(record.get("attempt") or 0) == 1  # no crash loop
    after = {p: p.read_bytes() for p in (models / earlier).rglob("*") if p.is_file()}
    assert after == before  # the earlier run is untouched
    assert client.registry.get(earlier)["status"] == "succeeded"


# --- the page over HTTP: /predict, /check_dataset and .zip uploads -------------------------------------------------

UPLOADS_MAX_GB = 0.002  # 2 MB for everything under the upload folder


class Page:
    """A trained tiny run, a data root holding a dataset with one 16-bit bomb, and the page over them."""

    def __init__(self, root: Path, bomb: Path):
        self.models = root / "models"
        self.data_root = root / "data"
        self.dataset = make_image_folder(self.data_root / "shapes", classes=2, per_class=6, size=40)
        self.stale = self.data_root / ".upload-crashed"  # what an extraction killed mid-way left
        (self.stale / "ds" / "a").mkdir(parents=True)
        (self.stale / "ds" / "a" / "x.png").write_bytes(b"\0" * 1000)
        set_age(self.stale, 3600)
        self.procs = Processes(root / "logs")
        self.gradio_tmp = root / "logs" / "gradio-tmp"
        # the page starts (seconds of imports) while the run trains: it looks for runs when asked, not at start
        self.server = self.procs.page(self.models, self.data_root, wait=False, RESNET_LAB_UPLOADS_MAX_GB=UPLOADS_MAX_GB)
        self.port = int(self.server.url.rsplit(":", 1)[1])
        try:
            train_tiny(self.models, self.dataset, batch_size=4)
            (self.dataset / "class_0" / bomb.name).write_bytes(bomb.read_bytes())  # after training: the check finds it
            wait_for(self._answers, 120, "the page to answer HTTP", interval=0.2,
                     describe=lambda: self.server.log()[-3000:])
        except BaseException:
            self.close()
            raise

    def _answers(self) -> bool:
        from shared.launch.services import http_ok

        assert self.server.alive(), f"the page exited with {self.server.proc.returncode}:\n{self.server.log()[-3000:]}"
        return http_ok(self.server.url + "/gradio_api/info")

    def vm_hwm_mb(self) -> float:
        """The page process's peak resident size so far."""
        for line in Path(f"/proc/{self.server.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmHWM in /proc")

    def http(self, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> bytes:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers=headers or {})
            response = conn.getresponse()
            data = response.read()
            assert response.status == 200, (response.status, data[:500])
            return data
        finally:
            conn.close()

    def upload_zip(self, data: bytes, name: str) -> dict:
        """Drop a .zip on the Data tab as the browser does: upload the file, then run the upload event by its
        index (it is private: not offered to API clients, but any browser can trigger it)."""
        boundary = uuid.uuid4().hex
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{name}\"\r\n"
                "Content-Type: application/zip\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
        [path] = json.loads(self.http("POST", "/gradio_api/upload", body,
                                      {"Content-Type": f"multipart/form-data; boundary={boundary}"}))
        config = json.loads(self.http("GET", "/config"))
        [component] = [c["id"] for c in config["components"] if c.get("props", {}).get("elem_id") == "zip-upload"]
        [fn_index] = [d["id"] for d in config["dependencies"] if [component, "upload"] in d["targets"]]
        session = uuid.uuid4().hex
        payload = {"data": [{"path": path, "orig_name": name, "meta": {"_type": "gradio.FileData"}}],
                   "fn_index": fn_index, "trigger_id": component, "session_hash": session, "event_data": None}
        self.http("POST", "/gradio_api/queue/join", json.dumps(payload).encode(), {"Content-Type": "application/json"})
        stream = self.http("GET", f"/gradio_api/queue/data?session_hash={session}").decode()
        for line in stream.splitlines():
            if line.startswith("data: "):
                message = json.loads(line[6:])
                if message.get("msg") == "process_completed":
                    return {**message["output"], "success": message["success"], "uploaded": path}
        raise AssertionError(f"no result in the event stream:\n{stream[-2000:]}")

    def close(self) -> None:
        self.procs.close()


@pytest.fixture(scope="module")
def page(tmp_path_factory, bombs):
    p = Page(tmp_path_factory.mktemp("page"), bombs["grey16"])
    yield p
    p.close()


@pytest.mark.slow
def test_the_page_refuses_the_16bit_bomb_without_decoding_it(page, bombs):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    client = page.server.client()
    client.predict(handle_file(str(page.dataset / "class_0" / "class_0_000.jpg")), "latest", api_name="/predict")
    before = page.vm_hwm_mb()
    errors: list[str] = []

    def predict(path: Path) -> None:
        try:
            page.server.client().predict(handle_file(str(path)), "latest", api_name="/predict")
        except AppError as exc:
            errors.append(str(exc))

    threads = [threading.Thread(target=predict, args=(bombs[kind],)) for kind in ("grey16", "grey16", "grey16",
                                                                                   "rgba16")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(errors) == 4, errors
    assert sum("deep 16-bit.png: refused — decoding this 9000x9000 I;16 image would take 386 MB" in e
               for e in errors) == 3, errors
    assert any("rgba16.png: refused" in e and "Downscale it" in e for e in errors), errors
    grew = page.vm_hwm_mb() - before
    assert grew < 150, f"the page's peak memory grew by {grew:.0f} MB (the old code decoded 1.6 GB per request)"
    assert page.server.alive()


@pytest.mark.slow
def test_the_dataset_check_lists_the_bomb_as_unusable(page, bombs):
    summary, _, problems, _ = page.server.client().predict(str(page.dataset), api_name="/check_dataset")
    assert "12 usable images" in summary, summary
    assert bombs["grey16"].name in problems and "386 MB" in problems and "256 MB per image" in problems, problems


def _zip(entries: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in entries.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def _noise_png(seed: int, side: int = 160) -> bytes:
    buffer = io.BytesIO()
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()  # noise does not compress: ~77 kB


@pytest.mark.slow
def test_the_page_removed_what_crashed_extractions_left(page):
    assert not page.stale.exists()
    assert (page.data_root / "shapes").is_dir()


@pytest.mark.slow
def test_a_zip_bomb_is_refused_and_nothing_stays_on_disk(page):
    bomb = _zip({"ds/a/zeros.png": b"\0" * 3_000_000, "ds/b/ok.png": _noise_png(0)})
    assert len(bomb) < 100_000
    result = page.upload_zip(bomb, "bomb.zip")
    assert not result["success"] and "more than 200 times" in result["error"] and "zeros.png" in result["error"], result
    assert sorted(p.name for p in page.data_root.iterdir()) == ["shapes"]
    assert not (page.gradio_tmp / result["uploaded"]).exists() and not Path(result["uploaded"]).exists()


@pytest.mark.slow
def test_uploads_stop_at_the_upload_folders_cap(page):
    archive = _zip({f"ds/c{i % 2}/{i}.png": _noise_png(i) for i in range(10)})  # ~770 kB of images
    first = page.upload_zip(archive, "one.zip")
    assert first["success"], first
    assert (page.data_root / "one" / "ds").is_dir()
    assert not Path(first["uploaded"]).exists()  # the archive itself is not kept once extracted
    second = page.upload_zip(archive, "two.zip")
    assert second["success"], second  # about 1.9 MB in all: still under 2 MB
    third = page.upload_zip(archive, "three.zip")
    assert not third["success"], third
    assert "would pass its cap of 2.00 MB (RESNET_LAB_UPLOADS_MAX_GB) — delete datasets" in third["error"], third
    assert sorted(p.name for p in page.data_root.iterdir()) == ["one", "shapes", "two"]


def test_an_interrupted_wait_does_not_block_the_budget_for_everyone():
    budget = ByteBudget(100)

    class Interrupt(Exception):
        pass

    def interrupted_wait(self, predicate, timeout=None):
        raise Interrupt()

    with budget.reserve(100):
        original = threading.Condition.wait_for
        threading.Condition.wait_for = interrupted_wait  # as a KeyboardInterrupt while waiting would
        try:
            with pytest.raises(Interrupt):
                with budget.reserve(10):
                    pass
        finally:
            threading.Condition.wait_for = original
    done = threading.Event()

    def later():
        with budget.reserve(50):
            done.set()

    threading.Thread(target=later, daemon=True).start()
    assert done.wait(5), "the next reservation waits forever behind the abandoned one"


def test_the_limits_are_settings():
    from shared.settings import Settings

    assert (Settings().cache_max_gb, Settings().uploads_max_gb) == (20.0, 20.0)
    settings = Settings.from_env({"RESNET_LAB_CACHE_MAX_GB": "0.5", "RESNET_LAB_UPLOADS_MAX_GB": "0"})
    assert (settings.cache_max_gb, settings.uploads_max_gb) == (0.5, 0.0)
    for bad in ("lots", "-1", "nan", "inf"):
        with pytest.raises(ValueError, match=rf"RESNET_LAB_CACHE_MAX_GB must be a number of gigabytes >= 0 .*{bad!r}"):
            Settings.from_env({"RESNET_LAB_CACHE_MAX_GB": bad})
