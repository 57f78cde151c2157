"""Decoding, resizing and encoding rules of chexdist.data.images on real PNG/JPEG files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile, ImageOps

from chexdist.errors import ChexdistError
from chexdist.data.images import ImageDecodeError, decode_gray8, encode, load_gray8, resize_shorter, resized_shape

NIH_SAMPLE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "nih-sample" / "images"


def _gradient(h: int = 40, w: int = 60) -> np.ndarray:
    return (np.add.outer(np.arange(h), np.arange(w)) * 255 // (h + w - 2)).astype(np.uint8)


def _save(tmp_path: Path, im: Image.Image, name: str, **kw) -> Path:
    path = tmp_path / name
    im.save(path, **kw)
    return path


def test_gray8_png_is_returned_unchanged_and_writable(tmp_path):
    a = _gradient()
    out = load_gray8(_save(tmp_path, Image.fromarray(a), "l.png"))
    assert out.dtype == np.uint8 and out.shape == (40, 60) and out.flags.writeable
    np.testing.assert_array_equal(out, a)


def test_rgb_becomes_luminance(tmp_path):
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200
    rgb[..., 1] = 100
    rgb[..., 2] = 50
    out = load_gray8(_save(tmp_path, Image.fromarray(rgb), "rgb.png"))
    assert out.shape == (8, 8)
    assert abs(int(out[0, 0]) - round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)) <= 1
    gray_rgb = np.repeat(_gradient()[..., None], 3, axis=2)
    np.testing.assert_array_equal(load_gray8(_save(tmp_path, Image.fromarray(gray_rgb), "g.png")), _gradient())


def test_rgba_opaque_is_exact_and_transparent_composites_on_black(tmp_path):
    a = _gradient()
    rgba = np.dstack([a, a, a, np.full_like(a, 255)])
    np.testing.assert_array_equal(load_gray8(_save(tmp_path, Image.fromarray(rgba), "opaque.png")), a)
    rgba[..., 3] = 0
    rgba[:, :30, 3] = 128
    out = load_gray8(_save(tmp_path, Image.fromarray(rgba), "half.png"))
    assert (out[:, 30:] == 0).all()
    np.testing.assert_allclose(out[:, :30], a[:, :30].astype(float) * 128 / 255, atol=1)


def test_la_mode(tmp_path):
    a = _gradient()
    la = Image.merge("LA", [Image.fromarray(a), Image.fromarray(np.full_like(a, 255))])
    np.testing.assert_array_equal(load_gray8(_save(tmp_path, la, "la.png")), a)


def test_palette_is_mapped_through_the_palette(tmp_path):
    idx = (np.arange(64).reshape(8, 8) % 4).astype(np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([0, 0, 0, 255, 255, 255, 255, 0, 0, 10, 20, 30] + [0] * (256 * 3 - 12))
    out = load_gray8(_save(tmp_path, im, "p.png"))
    expected = np.array([0, 255, round(255 * 0.299), round(10 * 0.299 + 20 * 0.587 + 30 * 0.114)])
    assert np.abs(out.astype(int) - expected[idx]).max() <= 1


def test_16bit_with_12bit_range_is_scaled_to_full_8bit(tmp_path):
    a = np.zeros((4, 4), np.uint16)
    a[0, 0], a[0, 1], a[0, 2], a[0, 3] = 4095, 2048, 16, 0
    path = _save(tmp_path, Image.fromarray(a), "12bit.png")
    assert Image.open(path).mode.startswith("I")
    out = load_gray8(path)
    assert out.dtype == np.uint8
    assert out[0, 0] == 255 and out[0, 1] == 128 and out[0, 2] == 1 and out[0, 3] == 0


def test_16bit_full_range_and_big_endian(tmp_path):
    a = np.linspace(0, 65535, 256, dtype=np.uint16).reshape(16, 16)
    out = load_gray8(_save(tmp_path, Image.fromarray(a), "16bit.png"))
    np.testing.assert_array_equal(out, np.rint(a / 257.0).astype(np.uint8))
    big = Image.frombytes("I;16B", (16, 16), a.astype(">u2").tobytes())
    np.testing.assert_array_equal(load_gray8(_save(tmp_path, big, "16b.png")), out)


def test_32bit_int_and_float(tmp_path):
    a = np.array([[-100, 0], [50, 155]], np.int32)
    out = load_gray8(_save(tmp_path, Image.fromarray(a), "i.tiff"))
    np.testing.assert_array_equal(out, [[0, 100], [150, 255]])
    unsigned = np.array([[0, 1000], [2000, 4095]], np.int32)
    out = load_gray8(_save(tmp_path, Image.fromarray(unsigned), "u.tiff"))
    np.testing.assert_array_equal(out, [[0, 62], [125, 255]])
    f = np.array([[0.0, 0.5], [0.25, 1.0]], np.float32)
    np.testing.assert_array_equal(load_gray8(_save(tmp_path, Image.fromarray(f), "f.tiff")), [[0, 128], [64, 255]])


def test_exif_orientation_is_applied(tmp_path):
    im = Image.fromarray(_gradient(30, 50))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = _save(tmp_path, im, "rot.jpg", quality=95, exif=exif)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("L"))
    out = load_gray8(path)
    assert out.shape == (50, 30)
    np.testing.assert_array_equal(out, expected)


def test_truncated_png_raises_naming_the_path(tmp_path):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    good = _save(tmp_path, Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), np.uint8)), "g.png")
    bad = tmp_path / "cut.png"
    bad.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ImageDecodeError) as err:
        load_gray8(bad)
    assert err.value.path == str(bad) and str(bad) in str(err.value)
    assert isinstance(err.value, ChexdistError)


def test_refuses_when_truncated_loading_was_enabled(tmp_path, monkeypatch):
    path = _save(tmp_path, Image.fromarray(_gradient()), "ok.png")
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(ChexdistError, match="LOAD_TRUNCATED_IMAGES"):
        load_gray8(path)


def test_garbage_and_missing_raise(tmp_path):
    junk = tmp_path / "junk.png"
    junk.write_bytes(b"\x89PNG not really" + bytes(200))
    with pytest.raises(ImageDecodeError, match="junk.png"):
        load_gray8(junk)
    with pytest.raises(ImageDecodeError, match="member.png"):
        load_gray8(b"garbage bytes", name="member.png")
    with pytest.raises(ImageDecodeError, match="not found"):
        load_gray8(tmp_path / "missing.png")
    with pytest.raises(ImageDecodeError):
        decode_gray8(b"\xff\xd8\xff garbage")


def test_resize_keeps_aspect_ratio():
    wide = np.zeros((200, 300), np.uint8)
    assert resize_shorter(wide, 100).shape == (100, 150)
    assert resize_shorter(wide.T.copy(), 100).shape == (150, 100)
    assert resize_shorter(wide, 0) is wide
    assert resize_shorter(wide, 400).shape == (400, 600)
    assert resized_shape(1024, 1024, 512) == (512, 512)
    with pytest.raises(ChexdistError):
        resize_shorter(wide, -1)
    with pytest.raises(ChexdistError):
        resize_shorter(np.zeros((4, 4), np.float32), 2)


def test_resize_is_lanczos_quality():
    a = np.full((90, 90), 100, np.uint8)
    a[:, 45:] = 200
    out = resize_shorter(a, 30)
    assert out[:, :13].max() == 100 and out[:, 17:].min() == 200


def test_png_round_trip_is_lossless_and_jpeg_is_close():
    a = _gradient(64, 96)
    png = encode(a, "png")
    with Image.open(io.BytesIO(png)) as im:
        assert im.format == "PNG" and im.mode == "L" and im.size == (96, 64)
        im.verify()
    np.testing.assert_array_equal(decode_gray8(png), a)
    jpg = encode(a, "jpg", quality=95)
    assert jpg[:2] == b"\xff\xd8" and Image.open(io.BytesIO(jpg)).mode == "L"
    back = decode_gray8(jpg)
    assert back.shape == a.shape and back.flags.writeable
    assert np.abs(back.astype(int) - a).mean() < 1.5
    with pytest.raises(ChexdistError):
        encode(a, "webp")


@pytest.mark.parametrize("shape", [(1, 7), (7, 1), (33, 17)])
def test_png_writer_handles_thin_and_strided_arrays(shape):
    a = np.random.default_rng(1).integers(0, 256, (shape[0], shape[1] * 2), dtype=np.uint8)[:, ::2]
    np.testing.assert_array_equal(decode_gray8(encode(a, "png")), a)


def test_decode_gray8_falls_back_for_non_gray():
    buf = io.BytesIO()
    Image.fromarray(np.array([[4095, 0]], np.uint16)).save(buf, format="PNG")
    np.testing.assert_array_equal(decode_gray8(buf.getvalue()), [[255, 0]])


def test_real_nih_image_decodes_and_resizes():
    path = sorted(NIH_SAMPLE.glob("*.png"))[0]
    img = load_gray8(path)
    assert img.shape == (1024, 1024) and img.dtype == np.uint8 and img.std() > 20
    small = resize_shorter(img, 256)
    assert small.shape == (256, 256)
    assert abs(float(small.mean()) - float(img.mean())) < 2
    np.testing.assert_array_equal(decode_gray8(encode(small, "png")), small)
