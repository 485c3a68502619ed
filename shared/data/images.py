"""Decode any image a user may bring into 8-bit RGB, or fail with a message that says what to do.

Everything that reads pixels (dataset check, training cache, prediction) goes through `load_rgb` or
`load_rgb_resized`, so EXIF orientation, odd modes (palette, CMYK, 16-bit) and broken files are handled in
one place. No PIL exception escapes: callers catch `ImageError` only.

Memory is bounded twice: an image whose decode would hold more than MAX_DECODED_BYTES is refused from its
header, before any pixel is decoded (a 160 kB 16-bit PNG can claim 81 million pixels), and all decodes of one
process together hold at most DECODE_MEMORY_BYTES at once (`DECODE_BUDGET`): the dataset check's threads, the
cache build's threads and the page's concurrent predictions wait for each other instead of exhausting memory.
"""

from __future__ import annotations

import io
import itertools
import logging
import math
import os
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator, Union

import numpy as np
from PIL import Image, ImageMode, ImageOps

from shared.fsutil import NotARegularFile, open_regular

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

# Pillow's own default limit (Image.MAX_IMAGE_PIXELS), written out so a caller changing the global does not
# silently change ours. Pillow itself still refuses anything above 2x its global limit at open time.
MAX_PIXELS = 89_478_485
# The most one decode may hold: the decoded pixels plus their RGB copy (see `decode_bytes`). 8-bit RGB images
# within MAX_PIXELS always fit; greyscale ones above 67, 16-bit greyscale above 53, and RGBA or CMYK ones above
# 38 million pixels do not.
MAX_DECODED_BYTES = 256 * 2**20
# The most all decodes of this process may hold at once (4 of the largest images allowed).
DECODE_MEMORY_BYTES = 4 * MAX_DECODED_BYTES
# Rows of a 16-bit or float image scaled to 8 bits per step, as pixels: bounds the float64 temporaries.
_STRIP_PIXELS = 1 << 20

ImageSource = Union[str, os.PathLike, bytes, bytearray, memoryview, BinaryIO, Image.Image]

_FIX = "Delete or replace the file, then try again."


class ImageError(ValueError):
    """An image could not be used; the message names the file, the problem and the fix."""


def is_image_name(path: str | os.PathLike) -> bool:
    """True when the file name has one of IMAGE_EXTENSIONS (case-insensitive)."""
    return Path(os.fspath(path)).suffix.lower() in IMAGE_EXTENSIONS


class TooManyFiles(ValueError):
    """More image files than a batch may hold; the message names the cap and the fix."""


def expand_image_paths(items: Iterable[str | os.PathLike], *, must_exist: bool = True,
                       limit: int | None = None) -> list[Path]:
    """Files as given, folders replaced by the image files inside them (recursively, sorted).

    A broken or looping link is passed on, not dropped: reading it gives its own message. A path that does not
    exist raises FileNotFoundError when `must_exist`; otherwise it is passed on too, so that a long batch
    reports it in its results instead of stopping. With `limit`, more files than that raise TooManyFiles as soon
    as the walk finds one too many (a folder named from the page may be a whole data root: the walk is bounded).
    """
    files: list[Path] = []
    for item in items:
        path = Path(item).expanduser()
        if path.is_dir():
            found = (p for p in path.rglob("*") if (p.is_file() or p.is_symlink()) and is_image_name(p))
            left = None if limit is None else limit - len(files) + 1
            files += sorted(itertools.islice(found, left))
        elif must_exist and not (path.exists() or path.is_symlink()):
            raise FileNotFoundError(f"no such file or folder: {item}")
        else:
            files.append(path)
        if limit is not None and len(files) > limit:
            raise TooManyFiles(f"more than {limit:,} image files in one batch — give a smaller folder (or split "
                               "this one into several)")
    return files


class ByteBudget:
    """At most `capacity` bytes reserved at once across threads, granted first come, first served.

    Like a BoundedSemaphore counting bytes. A request larger than the capacity waits until it runs alone.
    """

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError(f"capacity must be a positive number of bytes, got {capacity!r}")
        self.capacity = int(capacity)
        self.in_use = 0
        self._cond = threading.Condition()
        self._next_ticket = 0
        self._serving = 0  # tickets are granted in order, so a large request is not starved by small ones
        self._abandoned: set[int] = set()  # tickets whose waiter was interrupted: skipped, or all would hang

    @contextmanager
    def reserve(self, nbytes: int) -> Iterator[None]:
        nbytes = max(0, min(int(nbytes), self.capacity))
        with self._cond:
            ticket = self._next_ticket
            self._next_ticket += 1
            try:
                self._cond.wait_for(lambda: self._serving == ticket and self.in_use + nbytes <= self.capacity)
            except BaseException:
                self._abandoned.add(ticket)
                self._next_turn(advance=False)
                raise
            self.in_use += nbytes
            self._next_turn(advance=True)
        try:
            yield
        finally:
            with self._cond:
                self.in_use -= nbytes
                self._cond.notify_all()

    def _next_turn(self, *, advance: bool) -> None:
        if advance:
            self._serving += 1
        while self._serving in self._abandoned:
            self._abandoned.discard(self._serving)
            self._serving += 1
        self._cond.notify_all()


# One per process: every decode below reserves its `decode_bytes` here while it runs.
DECODE_BUDGET = ByteBudget(DECODE_MEMORY_BYTES)


def decode_bytes(img: Image.Image) -> int:
    """Bytes that decoding `img` to RGB holds at once, from its header: width x height x bands x bytes per band
    (2 for 16-bit, 4 for 32-bit integer or float modes), plus the 8-bit RGB copy unless it is RGB already."""
    w, h = img.size
    mode = ImageMode.getmode(img.mode)
    decoded = w * h * len(mode.bands) * max(1, np.dtype(mode.typestr).itemsize)
    return decoded + (0 if img.mode == "RGB" else 3 * w * h)


def load_rgb(src: ImageSource, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Decode `src` (path, bytes, binary file object or PIL image) into a fully loaded 8-bit RGB image.

    EXIF orientation is applied, transparency is composited on white, animated images give their first
    frame. Raises ImageError for empty, non-image, truncated, oversized or unsupported files.
    """
    if isinstance(src, Image.Image):
        name = "<PIL image>"
        _check_pixels(src.size, name, max_pixels)
        return _finish(src, name, in_place=False)
    with _opened(src, max_pixels) as (name, img), _reserved(img):
        return _finish(img, name, in_place=True)


def load_rgb_resized(path: str | os.PathLike, short_side: int, *, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Like `load_rgb`, then resized (antialiased, aspect kept) so the shorter side is `short_side` pixels.

    JPEGs are decoded at reduced scale with `Image.draft` (DCT scaling), which is several times faster for
    large photos and is what makes building the training cache cheap.
    """
    if not isinstance(short_side, int) or short_side < 1:
        raise ValueError(f"short_side must be a positive integer, got {short_side!r}")
    with _opened(path, max_pixels) as (name, img):
        w, h = img.size
        scale = short_side / min(w, h)
        if scale < 1:
            # draft only ever picks a decoded size >= the requested one, so the final resize still sees enough
            _guard(name, img.draft, "RGB", (math.ceil(w * scale), math.ceil(h * scale)))
        with _reserved(img):
            return resize_short_side(_finish(img, name, in_place=True), short_side)


def verify_image(src: ImageSource, *, max_pixels: int = MAX_PIXELS, name: str | None = None) -> tuple[int, int]:
    """Decode `src` fully (JPEGs at reduced scale) and return its upright (width, height); ImageError if unusable.

    Used by the dataset check: every byte of the compressed data is still decoded, so truncation is caught,
    but large JPEGs cost a fraction of a full decode. `name` overrides the file name used in messages
    (e.g. a path relative to the dataset).
    """
    if isinstance(src, Image.Image):
        load_rgb(src, max_pixels=max_pixels)
        return _upright_size(src)
    with _opened(src, max_pixels, name) as (name, img):
        w, h = img.size
        _guard(name, img.draft, "RGB", (64, 64))
        with _reserved(img):
            swapped = _orientation(img) in (5, 6, 7, 8)  # inside: reading a PNG's EXIF decodes the whole image
            _finish(img, name, in_place=True)
    return (h, w) if swapped else (w, h)


def resize_short_side(img: Image.Image, short_side: int) -> Image.Image:
    """Resize so min(width, height) == short_side, keeping the aspect ratio (antialiased bilinear)."""
    w, h = img.size
    if min(w, h) == short_side:
        return img
    scale = short_side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if w <= h:
        size = (short_side, size[1])
    else:
        size = (size[0], short_side)
    # Pillow's bilinear filter widens its support when downscaling, i.e. it is antialiased (like torchvision's
    # Resize(antialias=True)), so the cache and the eval transform see the same kind of pixels.
    return img.resize(size, Image.Resampling.BILINEAR)


# --- reading ---------------------------------------------------------------------------------------------

@contextmanager
def _opened(src, max_pixels: int, name: str | None = None) -> Iterator[tuple[str, Image.Image]]:
    """(display name, header-only PIL image) for a path, bytes or file object; refuses oversized images.

    A path is decoded straight from the file, never read into memory whole; the file is closed on exit.
    """
    source_name, fp = _source_file(src)
    name = name or source_name
    try:
        yield name, _open(fp, name, max_pixels)
    finally:
        fp.close()


def _source_file(src) -> tuple[str, BinaryIO]:
    """(display name, readable binary file positioned at 0) for a path, bytes or file object."""
    if isinstance(src, (bytes, bytearray, memoryview)):
        return "<uploaded bytes>", io.BytesIO(bytes(src))
    if isinstance(src, (str, os.PathLike)):
        name = os.fspath(src)
        try:
            return name, open_regular(name)
        except NotARegularFile as e:
            raise ImageError(f"{name}: {e.strerror} — expected an image file.") from None
        except FileNotFoundError:
            raise ImageError(f"{name}: file not found — check the path.") from None
        except IsADirectoryError:
            raise ImageError(f"{name}: is a folder, expected an image file.") from None
        except PermissionError:
            raise ImageError(f"{name}: permission denied — make the file readable.") from None
        except OSError as e:
            raise ImageError(f"{name}: cannot read the file ({e.strerror or e}). {_FIX}") from None
    if hasattr(src, "read"):
        name = str(getattr(src, "name", "<file object>"))
        try:
            data = src.read()
        except OSError as e:
            raise ImageError(f"{name}: cannot read the file ({e}). {_FIX}") from None
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError(f"expected a binary file object, got one returning {type(data).__name__}")
        return name, io.BytesIO(bytes(data))
    raise TypeError(f"expected a path, bytes, a binary file object or a PIL image, got {type(src).__name__}")


def _open(fp: BinaryIO, name: str, max_pixels: int) -> Image.Image:
    """Open (header only) and refuse empty, non-image and oversized images before any pixel is decoded."""
    head = _head(fp, name)
    if not head:
        raise ImageError(f"{name}: empty file (0 bytes) — probably an interrupted copy or download. {_FIX}")
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: refused — its dimensions exceed Pillow's safety limit "
                         f"(possible decompression bomb). Use a smaller image.") from None
    except Exception as e:  # noqa: BLE001 — PIL raises many types for bad input; all mean "not an image"
        if isinstance(e, MemoryError):
            raise
        raise ImageError(f"{name}: {_describe_non_image(head)}. {_FIX}") from None
    _check_pixels(img.size, name, max_pixels)
    _check_decoded_size(img, name)
    return img


def _head(fp: BinaryIO, name: str) -> bytes:
    """The first bytes of the file (for messages about what it is instead), leaving it at position 0."""
    try:
        head = fp.read(2048)
        fp.seek(0)
    except OSError as e:
        raise ImageError(f"{name}: cannot read the file ({e.strerror or e}). {_FIX}") from None
    return head


def _check_decoded_size(img: Image.Image, name: str) -> None:
    needed = decode_bytes(img)
    if needed > MAX_DECODED_BYTES:
        w, h = img.size
        raise ImageError(f"{name}: refused — decoding this {w}x{h} {img.mode} image would take "
                         f"{needed / 2**20:,.0f} MB of memory, more than the limit of "
                         f"{MAX_DECODED_BYTES / 2**20:,.0f} MB per image "
                         "(possible decompression bomb). Downscale it or save it as 8-bit RGB first.")


@contextmanager
def _reserved(img: Image.Image) -> Iterator[None]:
    """Hold this image's share of the process-wide decode memory while it is decoded and converted."""
    with DECODE_BUDGET.reserve(decode_bytes(img)):
        yield


def _check_pixels(size: tuple[int, int], name: str, max_pixels: int) -> None:
    w, h = size
    if w < 1 or h < 1:
        raise ImageError(f"{name}: image has no pixels ({w}x{h}). {_FIX}")
    if w * h > max_pixels:
        raise ImageError(f"{name}: refused — {w}x{h} = {w * h:,} pixels is more than the limit of "
                         f"{max_pixels:,} (possible decompression bomb). Downscale the image first.")


def _describe_non_image(data: bytes) -> str:
    """What the first bytes of a file that Pillow cannot open look like instead of an image."""
    head = data[:512].lstrip(b"\xef\xbb\xbf").lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")) or b"<html" in head:
        return "not an image — it is an HTML page (often a login or error page saved instead of the picture)"
    if head.startswith(b"<svg") or (head.startswith(b"<?xml") and b"<svg" in data[:2048].lower()):
        return "not a supported image — it is an SVG (vector) file; export it as PNG or JPEG"
    if head.startswith(b"<?xml"):
        return "not an image — it is an XML file"
    sample = data[:512]
    if not sample.strip(b"\x00"):
        # space reserved by a downloader or copier that never wrote the content
        return "not an image — it begins with nothing but zero bytes (an unfinished download or copy)"
    if b"\x00" not in sample:  # NUL is valid UTF-8 but never part of text
        try:
            sample.decode("utf-8")
            return "not an image — it contains text"
        except UnicodeDecodeError:
            pass
    return "not a recognised image format (unknown or corrupt content)"


# --- decoding and conversion ---------------------------------------------------------------------------

def _finish(img: Image.Image, name: str, *, in_place: bool) -> Image.Image:
    """Load pixels (first frame), apply EXIF orientation, convert to RGB."""
    _load(img, name)
    try:
        if in_place:
            ImageOps.exif_transpose(img, in_place=True)
            upright = img
        else:
            upright = ImageOps.exif_transpose(img)
    except Exception as e:  # noqa: BLE001 — a broken EXIF block should not make the pixels unusable
        if isinstance(e, MemoryError):
            raise
        log.debug("%s: ignoring unreadable EXIF orientation (%s)", name, e)
        upright = img if in_place else img.copy()
    rgb = _guard(name, _to_rgb, upright, name)
    if rgb is img and not in_place:
        rgb = rgb.copy()  # never hand back the caller's own object
    return rgb


def _load(img: Image.Image, name: str) -> None:
    try:
        img.seek(0)
        img.load()
    except Image.DecompressionBombError:
        raise ImageError(f"{name}: refused — a frame exceeds Pillow's safety limit (possible decompression bomb).") \
            from None
    except Exception as e:  # noqa: BLE001
        if isinstance(e, MemoryError):
            raise
        text = str(e)
        if "truncated" in text or isinstance(e, EOFError) or "broken data stream" in text:
            raise ImageError(f"{name}: truncated image — the file ends before the picture does "
                             f"(interrupted copy or download). {_FIX}") from None
        raise ImageError(f"{name}: corrupt image data ({text or type(e).__name__}). {_FIX}") from None


def _to_rgb(img: Image.Image, name: str) -> Image.Image:
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in img.info
        return _on_white(img.convert("RGBA")) if has_alpha else img.convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La"):
        return _on_white(img.convert("RGBA"))
    if mode in ("L", "1", "CMYK", "YCbCr", "RGBX"):
        if mode == "L" and "transparency" in img.info:
            return _on_white(img.convert("RGBA"))
        return img.convert("RGB")
    if mode.startswith("I;16") or mode in ("I", "F"):
        return _high_depth_to_rgb(img)
    try:
        return img.convert("RGB")
    except Exception:  # noqa: BLE001
        raise ImageError(f"{name}: unsupported colour mode {mode!r}; re-save the image as 8-bit RGB PNG or JPEG.") \
            from None


def _on_white(rgba: Image.Image) -> Image.Image:
    # the same pixels as alpha_composite over opaque white, without two more full-size RGBA copies
    out = Image.new("RGB", rgba.size, (255, 255, 255))
    out.paste(rgba, mask=rgba.getchannel("A"))
    return out


def _high_depth_to_rgb(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer / float greyscale to 8-bit RGB by scaling, not clipping.

    Pillow's own convert("L") clips 16-bit values at 255, which turns almost every pixel white. The scaling runs
    over strips of rows, so its float64 temporaries stay small whatever the image size.
    """
    w, h = img.size
    rows = max(1, _STRIP_PIXELS // w)
    strips = [(top, min(h, top + rows)) for top in range(0, h, rows)]

    def strip(top: int, bottom: int) -> np.ndarray:
        return np.asarray(img.crop((0, top, w, bottom)))

    lo, hi = math.inf, -math.inf
    for top, bottom in strips:
        a = strip(top, bottom)
        lo, hi = min(lo, float(np.nanmin(a))), max(hi, float(np.nanmax(a)))
    if img.mode.startswith("I;16") or (img.mode == "I" and lo >= 0 and hi <= 65535):
        def to_8bit(a):
            return np.round(a.astype(np.float64) / 257.0)  # 65535 / 257 == 255 exactly
    elif img.mode == "F" and lo >= 0 and hi <= 1:
        def to_8bit(a):
            return np.nan_to_num(np.round(a * 255.0))
    else:  # arbitrary range: stretch what is there
        def to_8bit(a):
            if not hi > lo:
                return np.zeros(a.shape, dtype=np.float64)
            return np.nan_to_num(np.round((a - lo) * (255.0 / (hi - lo))))
    grey = np.empty((h, w), dtype=np.uint8)
    for top, bottom in strips:
        grey[top:bottom] = np.clip(to_8bit(strip(top, bottom)), 0, 255)
    return Image.fromarray(grey, "L").convert("RGB")


def _upright_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed: EXIF orientations 5-8 swap the axes."""
    w, h = img.size
    return (h, w) if _orientation(img) in (5, 6, 7, 8) else (w, h)


def _orientation(img: Image.Image) -> int:
    try:
        return img.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 — broken EXIF: orientation is ignored when loading too
        return 1


def _guard(name: str, fn, *args):
    """Call a PIL function, turning anything it raises into ImageError."""
    try:
        return fn(*args)
    except ImageError:
        raise
    except Exception as e:  # noqa: BLE001
        if isinstance(e, MemoryError):
            raise
        raise ImageError(f"{name}: cannot decode image ({e or type(e).__name__}). {_FIX}") from None
