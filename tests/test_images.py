"""shared.data.images: every odd image a user may bring comes out as 8-bit RGB, or fails with a message."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from shared.data.images import (IMAGE_EXTENSIONS, MAX_PIXELS, ImageError, is_image_name, load_rgb, load_rgb_resized,
                           verify_image)
from tests import imagegen


def _px(img: Image.Image, xy=(0, 0)) -> tuple[int, int, int]:
    return img.getpixel(xy)


def _close(a, b, tol=6):
    return all(abs(int(x) - int(y)) <= tol for x, y in zip(a, b))


def test_extensions_case_insensitive():
    assert ".jpg" in IMAGE_EXTENSIONS and ".tiff" in IMAGE_EXTENSIONS
    assert is_image_name("a/b/PHOTO.JPG") and is_image_name("x.Jpeg") and is_image_name("x.TiF")
    assert not is_image_name("notes.txt") and not is_image_name("jpg") and not is_image_name("archive.jpg.zip")


def test_exif_rotation_applied(tmp_path):
    path = imagegen.write_exif_rotated_jpeg(tmp_path / "rot.jpg", orientation=6, size=(40, 20))
    assert Image.open(path).size == (40, 20)  # stored landscape
    img = load_rgb(path)
    assert img.size == (20, 40)  # displayed portrait
    # orientation 6 = rotate 90 clockwise: the left (red) half ends up on top
    assert _close(_px(img, (10, 5)), (255, 0, 0), 40)
    assert _close(_px(img, (10, 35)), (0, 0, 255), 40)
    assert verify_image(path) == (20, 40)
    small = load_rgb_resized(path, 10)
    assert small.size == (10, 20)


def test_all_sources_give_same_pixels(tmp_path):
    path = imagegen.make_image(tmp_path / "a.png", 16)
    data = path.read_bytes()
    ref = np.asarray(load_rgb(path))
    assert ref.shape == (16, 16, 3) and ref.dtype == np.uint8
    for src in (str(path), data, bytearray(data), io.BytesIO(data), Image.open(path)):
        assert np.array_equal(np.asarray(load_rgb(src)), ref)


def test_pil_input_not_mutated():
    original = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    out = load_rgb(original)
    assert out.mode == "RGB" and original.mode == "RGBA" and out is not original
    rgb = Image.new("RGB", (4, 4), (1, 2, 3))
    assert load_rgb(rgb) is not rgb


def test_grayscale(tmp_path):
    p = tmp_path / "g.png"
    Image.new("L", (4, 4), 100).save(p)
    img = load_rgb(p)
    assert img.mode == "RGB" and _px(img) == (100, 100, 100)


def test_palette_with_transparency_composited_on_white(tmp_path):
    p = tmp_path / "p.png"
    img = Image.new("P", (4, 4), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((1, 1), 1)
    img.info["transparency"] = 0  # colour 0 (black) is transparent
    img.save(p, transparency=0)
    out = load_rgb(p)
    assert _px(out, (0, 0)) == (255, 255, 255)  # transparent -> white, not black
    assert _px(out, (1, 1)) == (255, 0, 0)


def test_rgba_and_la_on_white(tmp_path):
    p = tmp_path / "rgba.png"
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(p)
    assert _px(load_rgb(p)) == (255, 255, 255)
    p2 = tmp_path / "half.png"
    Image.new("RGBA", (4, 4), (0, 0, 0, 128)).save(p2)
    assert _close(_px(load_rgb(p2)), (127, 127, 127), 2)
    p3 = tmp_path / "la.png"
    Image.new("LA", (4, 4), (0, 0)).save(p3)
    assert _px(load_rgb(p3)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    p = tmp_path / "cmyk.jpg"
    Image.new("CMYK", (8, 8), (255, 0, 0, 0)).save(p, "JPEG", quality=95)  # pure cyan ink
    assert Image.open(p).mode == "CMYK"
    assert _close(_px(load_rgb(p)), (0, 255, 255))


def test_16bit_png_scaled_not_clipped(tmp_path):
    p = tmp_path / "16.png"
    Image.fromarray(np.array([[0, 32768, 65535, 1028]], dtype=np.uint16)).save(p)
    assert Image.open(p).mode.startswith("I")
    out = np.asarray(load_rgb(p))[0, :, 0]
    assert out.tolist() == [0, 128, 255, 4]


def test_32bit_int_tiff(tmp_path):
    p = tmp_path / "i.tif"
    Image.fromarray(np.array([[0, 65535]], dtype=np.int32)).save(p)
    assert Image.open(p).mode == "I"
    assert np.asarray(load_rgb(p))[0, :, 0].tolist() == [0, 255]


def test_animated_gif_first_frame(tmp_path):
    p = tmp_path / "anim.gif"
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    frames[0].save(p, save_all=True, append_images=frames[1:], duration=50, loop=0)
    assert Image.open(p).n_frames == 3
    assert _close(_px(load_rgb(p)), (255, 0, 0))


@pytest.mark.parametrize("fmt", [".bmp", ".webp", ".tif", ".jpeg"])
def test_other_formats(tmp_path, fmt):
    p = imagegen.make_image(tmp_path / f"x{fmt.upper()}", 20)
    assert load_rgb(p).size == (20, 20)


def test_zero_byte(tmp_path):
    p = imagegen.write_zero_byte(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match=r"empty\.jpg: empty file \(0 bytes\)"):
        load_rgb(p)
    with pytest.raises(ImageError, match="empty file"):
        load_rgb(b"")


def test_truncated_jpeg(tmp_path):
    p = imagegen.write_truncated_jpeg(tmp_path / "cut.jpg")
    with pytest.raises(ImageError, match=r"cut\.jpg: truncated image"):
        load_rgb(p)
    with pytest.raises(ImageError, match="truncated"):
        load_rgb_resized(p, 16)
    with pytest.raises(ImageError, match="truncated"):
        verify_image(p)  # the reduced-scale decode still reads all the data


@pytest.mark.parametrize("kind, expected", [("text", "contains text"), ("html", "HTML page"),
                                            ("svg", "SVG")])
def test_text_named_jpg(tmp_path, kind, expected):
    p = imagegen.write_text_as_image(tmp_path / f"{kind}.jpg", kind)
    with pytest.raises(ImageError, match=expected) as info:
        load_rgb(p)
    assert f"{kind}.jpg" in str(info.value) and "Delete or replace" in str(info.value)


def test_random_binary_is_not_an_image():
    with pytest.raises(ImageError, match="not a recognised image format"):
        load_rgb(bytes(range(256)) * 4)


def test_decompression_bomb_header(tmp_path):
    p = imagegen.write_bomb_png(tmp_path / "bomb.png", 30_000, 30_000)
    assert p.stat().st_size < 200
    with pytest.raises(ImageError, match=r"bomb\.png: refused.*decompression bomb"):
        load_rgb(p)
    with pytest.raises(ImageError, match="decompression bomb"):
        load_rgb_resized(p, 32)


def test_bomb_just_above_our_limit(tmp_path):
    # between Pillow's warning and error thresholds: Pillow only warns, we must refuse
    p = imagegen.write_bomb_png(tmp_path / "big.png", 10_000, 9_000)
    assert 10_000 * 9_000 > MAX_PIXELS
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="90,000,000 pixels"):
        load_rgb(p)


def test_small_max_pixels(tmp_path):
    p = imagegen.make_image(tmp_path / "a.png", 20)
    with pytest.raises(ImageError, match="400 pixels is more than the limit of 100"):
        load_rgb(p, max_pixels=100)
    with pytest.raises(ImageError, match="limit"):
        load_rgb(Image.new("RGB", (20, 20)), max_pixels=100)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ImageError, match="file not found"):
        load_rgb(tmp_path / "nope.jpg")
    with pytest.raises(ImageError, match="is a folder"):
        load_rgb(tmp_path)
    with pytest.raises(TypeError):
        load_rgb(123)


def test_resized_short_side_and_draft(tmp_path):
    p = imagegen.make_image(tmp_path / "big.jpg", (800, 600), colour=(30, 160, 40), pattern="plain", noise=0)
    img = load_rgb_resized(p, 96)
    assert img.mode == "RGB" and img.size == (128, 96)
    assert _close(_px(img, (64, 48)), np.asarray(load_rgb(p))[300, 400], 12)
    portrait = imagegen.make_image(tmp_path / "tall.png", (30, 90))
    assert load_rgb_resized(portrait, 60).size == (60, 180)  # upscales small images too
    with pytest.raises(ValueError):
        load_rgb_resized(p, 0)


def test_unicode_and_spaces_in_name(tmp_path):
    p = imagegen.make_image(tmp_path / "fleur été 1.JPG", 12)
    assert load_rgb(p).size == (12, 12)


def test_float_image_scaled():
    img = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32), "F")
    assert np.asarray(load_rgb(img))[0, :, 0].tolist() == [0, 128, 255]


def test_unsupported_mode_is_an_image_error(monkeypatch):
    lab = Image.new("LAB", (2, 2))

    def refuse(self, mode=None, *args, **kwargs):
        raise ValueError(f"conversion from {self.mode} to {mode} not supported")

    monkeypatch.setattr(Image.Image, "convert", refuse)  # as older Pillows do for LAB
    with pytest.raises(ImageError, match="unsupported colour mode 'LAB'.*re-save"):
        load_rgb(lab)


def test_expand_image_paths_walks_folders_and_keeps_what_it_cannot_judge(tmp_path):
    from shared.data.images import expand_image_paths

    imagegen.make_image(tmp_path / "album" / "b.png")
    imagegen.make_image(tmp_path / "album" / "sub" / "a.JPG")
    (tmp_path / "album" / "notes.txt").write_text("not an image")
    (tmp_path / "album" / "gone.jpg").symlink_to(tmp_path / "nowhere.jpg")  # broken link: reported when read
    single = imagegen.make_image(tmp_path / "single.webp")
    found = expand_image_paths([tmp_path / "album", single])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "album/b.png", "album/gone.jpg", "album/sub/a.JPG", "single.webp"]
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        expand_image_paths([single, tmp_path / "missing.jpg"])
    assert expand_image_paths([tmp_path / "missing.jpg"], must_exist=False) == [tmp_path / "missing.jpg"]
