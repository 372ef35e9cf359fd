"""Image decoding and validation: every mode to 8-bit grayscale, every kind of bad file to BadImageError."""

import hashlib
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pneumo_exp.core.files import sha256_file
from pneumo_exp.data.images import BadImageError, check_image, decode_grayscale, standardize_intensity

GRADIENT = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))  # 64x64, columns 0..252


def save(image: Image.Image, path, **options):
    image.save(path, **options)
    return path


def png_with_header(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with no real pixel data: opening it costs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def mode_of(path) -> str:
    with Image.open(path) as image:
        return image.mode


def snapshot(path):
    return sha256_file(path), path.stat().st_mtime_ns


# --- hashing and plain decoding ---------------------------------------------------------------------------------

def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "bytes.bin"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


def test_grayscale_png_round_trips_exactly(tmp_path):
    path = save(Image.fromarray(GRADIENT), tmp_path / "g.png")
    out = decode_grayscale(path, 64)
    assert out.dtype == np.uint8 and out.shape == (64, 64)
    assert np.array_equal(out, GRADIENT)


def test_resize_squashes_without_cropping(tmp_path):
    wide = np.zeros((20, 80), dtype=np.uint8)
    wide[:, 40:] = 255  # right half white: a crop to the centre would keep both halves, a squash keeps them too
    wide[:, :10] = 128  # a left stripe that a centre crop would cut off
    out = decode_grayscale(save(Image.fromarray(wide), tmp_path / "wide.png"), 16)
    assert out.shape == (16, 16)
    assert abs(int(out[8, 0]) - 128) < 20 and out[8, 15] > 240


@pytest.mark.parametrize("size", [0, -3, 2.5])
def test_size_must_be_a_positive_integer(tmp_path, size):
    path = save(Image.fromarray(GRADIENT), tmp_path / "g.png")
    with pytest.raises(ValueError, match="size"):
        decode_grayscale(path, size)


# --- every mode -------------------------------------------------------------------------------------------------

def test_bilevel_image(tmp_path):
    path = save(Image.fromarray(np.eye(8, dtype=bool)), tmp_path / "b.png")
    assert np.array_equal(decode_grayscale(path, 8), np.eye(8, dtype=np.uint8) * 255)


def test_rgb_uses_luma(tmp_path):
    rgb = np.zeros((8, 8, 3), dtype=np.uint8)
    rgb[..., 1] = 200  # pure green: luma 0.587 * 200
    out = decode_grayscale(save(Image.fromarray(rgb), tmp_path / "rgb.png"), 8)
    assert np.all(np.abs(out.astype(int) - 117) <= 1)


@pytest.mark.parametrize("transparency", [False, True])
def test_palette_image(tmp_path, transparency):
    image = Image.fromarray(GRADIENT).convert("P")
    options = {"transparency": 0} if transparency else {}
    out = decode_grayscale(save(image, tmp_path / "p.png", **options), 64)
    assert np.abs(out.astype(int) - GRADIENT).max() <= 2


def test_rgba_drops_alpha(tmp_path):
    rgba = np.full((8, 8, 4), 200, dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent: compositing on black would give 0
    out = decode_grayscale(save(Image.fromarray(rgba), tmp_path / "rgba.png"), 8)
    assert np.all(out == 200)


def test_la_drops_alpha(tmp_path):
    la = Image.merge("LA", (Image.fromarray(GRADIENT), Image.new("L", (64, 64), 10)))
    out = decode_grayscale(save(la, tmp_path / "la.png"), 64)
    assert np.array_equal(out, GRADIENT)


def test_cmyk_jpeg(tmp_path):
    rgb = Image.fromarray(np.stack([GRADIENT] * 3, axis=-1))
    path = save(rgb.convert("CMYK"), tmp_path / "cmyk.jpg", quality=95)
    assert mode_of(path) == "CMYK"
    assert np.abs(decode_grayscale(path, 64).astype(int) - GRADIENT).max() <= 6


def test_16_bit_gradient_fills_0_to_255(tmp_path):
    values = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    path = save(Image.fromarray(values), tmp_path / "g16.png")
    assert mode_of(path).startswith("I;16")
    row = decode_grayscale(path, 256)[0].astype(int)
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0) and len(np.unique(row)) > 200  # a gradient, not saturated


def test_12_bit_data_in_16_bit_png_is_scaled_by_4095(tmp_path):
    values = np.tile(np.linspace(0, 4095, 256).astype(np.uint16), (4, 1))
    row = decode_grayscale(save(Image.fromarray(values), tmp_path / "g12.png"), 256)[0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 2


def test_16_bit_big_endian_tiff(tmp_path):
    values = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (4, 1))
    image = Image.frombytes("I;16B", (256, 4), values.astype(">u2").tobytes())
    path = save(image, tmp_path / "g16b.tif")
    row = decode_grayscale(path, 256)[0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 2


def test_32_bit_integer_and_float_images(tmp_path):
    ints = np.tile(np.linspace(0, 65535, 256).astype(np.int32), (4, 1))
    floats = np.tile(np.linspace(0, 1, 256).astype(np.float32), (4, 1))
    for name, values in (("i.tif", ints), ("f.tif", floats)):
        row = decode_grayscale(save(Image.fromarray(values), tmp_path / name), 256)[0].astype(int)
        assert row[0] == 0 and row[-1] == 255 and abs(row[128] - 128) <= 2, name


# --- bad files --------------------------------------------------------------------------------------------------

def assert_bad(path, problem, call=check_image, **kwargs):
    with pytest.raises(BadImageError, match=problem) as error:
        call(path, **kwargs)
    assert path.name in str(error.value)


@pytest.mark.parametrize("call", [check_image, lambda path, **kw: decode_grayscale(path, 16, **kw)])
def test_missing_and_empty_files(tmp_path, call):
    assert_bad(tmp_path / "absent.jpg", "does not exist", call)
    (tmp_path / "empty.jpg").touch()
    assert_bad(tmp_path / "empty.jpg", "empty file", call)


def test_text_file_named_jpg(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is not an image\n")
    assert_bad(path, "not an image")


@pytest.mark.parametrize("call", [check_image, lambda path, **kw: decode_grayscale(path, 16, **kw)])
def test_truncated_jpeg(tmp_path, call):
    data = (save(Image.fromarray(GRADIENT), tmp_path / "full.jpg", quality=95)).read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    assert_bad(path, "truncated", call)


def test_truncated_png(tmp_path):
    data = save(Image.fromarray(GRADIENT), tmp_path / "full.png").read_bytes()
    path = tmp_path / "truncated.png"
    path.write_bytes(data[: len(data) - 30])
    assert_bad(path, "truncated or corrupt")


def test_corrupt_png_data(tmp_path):
    data = bytearray(save(Image.fromarray(GRADIENT), tmp_path / "full.png").read_bytes())
    data[60] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    path = tmp_path / "corrupt.png"
    path.write_bytes(bytes(data))
    assert_bad(path, "corrupt")


def test_truncated_images_refused_even_if_pil_was_told_to_load_them(tmp_path, monkeypatch):
    data = save(Image.fromarray(GRADIENT), tmp_path / "full.jpg").read_bytes()
    path = tmp_path / "truncated.jpg"
    path.write_bytes(data[: len(data) // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    assert_bad(path, "truncated", lambda p: decode_grayscale(p, 16))
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the caller's setting is restored


@pytest.mark.parametrize("call", [check_image, lambda path, **kw: decode_grayscale(path, 16, **kw)])
def test_more_pixels_than_max_pixels(tmp_path, call):
    path = save(Image.fromarray(GRADIENT), tmp_path / "g.png")
    assert_bad(path, "more than the limit", call, max_pixels=64 * 64 - 1)
    call(path, max_pixels=64 * 64)


def test_oversized_header_is_refused_before_decoding(tmp_path):
    path = tmp_path / "huge.png"
    path.write_bytes(png_with_header(7000, 7000))  # 49 MP > 40 MP default, below PIL's own limit
    assert_bad(path, "7000x7000")
    assert_bad(path, "7000x7000", lambda p: decode_grayscale(p, 16))


@pytest.mark.parametrize("pil_limit", [1000, 3000])  # 64*64 = 4096 px: above 2x limit (error), above limit (warning)
def test_pil_decompression_bomb_guard_maps_to_bad_image(tmp_path, monkeypatch, pil_limit):
    path = save(Image.fromarray(GRADIENT), tmp_path / "g.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pil_limit)
    assert_bad(path, "decompression-bomb", max_pixels=None)


def test_zero_size_dimension(tmp_path):
    path = tmp_path / "zero.png"
    path.write_bytes(png_with_header(0, 10))
    assert_bad(path, "zero-size|not an image")


def test_source_files_are_never_modified(tmp_path):
    paths = [save(Image.fromarray(GRADIENT), tmp_path / "g.jpg"), save(Image.fromarray(GRADIENT), tmp_path / "g.png")]
    before = [snapshot(path) for path in paths]
    for path in paths:
        check_image(path)
        decode_grayscale(path, 32)
    assert [snapshot(path) for path in paths] == before


# --- orientation and minimum size -------------------------------------------------------------------------------

def test_exif_orientation_is_applied_before_caching(tmp_path):
    from PIL import ImageOps

    from pneumo_exp.data.cache import open_or_build
    from pneumo_exp.data.manifest import Record

    pixels = np.zeros((40, 64), dtype=np.uint8)
    pixels[:, :16] = 255  # a white band on the left: sideways once rotated
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = save(Image.fromarray(pixels), tmp_path / "rotated.jpg", exif=exif, quality=95)
    with Image.open(path) as image:
        shown = np.asarray(ImageOps.exif_transpose(image).convert("L").resize((32, 32), Image.Resampling.LANCZOS))
        stored = np.asarray(image.convert("L").resize((32, 32), Image.Resampling.LANCZOS))
    assert not np.array_equal(shown, stored)
    cache = open_or_build([Record(str(path), "NORMAL", "p", "train", sha256=sha256_file(path))], 32,
                          tmp_path / "cache", progress=False)
    assert np.array_equal(np.asarray(cache.pixels[0]), shown)


def test_images_below_the_minimum_side_are_refused(tmp_path):
    thin = save(Image.fromarray(np.zeros((200, 20), dtype=np.uint8)), tmp_path / "thin.png")
    assert_bad(thin, "20 px.* minimum of 32")
    check_image(thin, min_side=16)
    tiny = save(Image.fromarray(np.zeros((1, 1), dtype=np.uint8)), tmp_path / "tiny.png")
    assert_bad(tiny, "1x1")
    check_image(save(Image.fromarray(np.zeros((32, 32), dtype=np.uint8)), tmp_path / "ok.png"))


def test_equalize_undoes_a_monotone_exposure_change():
    from pneumo_exp.data.phantom import phantom_records, render

    image = render(phantom_records(patients_per_class=1, test_patients_per_class=0, images_per_patient=1)[0].path, 96)
    darker = np.round(255 * (image / 255) ** 1.5).astype(np.uint8)  # gamma 1.5 and a narrower window
    flatter = np.round(64 + 0.5 * darker).astype(np.uint8)
    raw_gap = np.abs(image.astype(int) - flatter).mean()
    equalized_gap = np.abs(standardize_intensity(image, "equalize").astype(int)
                           - standardize_intensity(flatter, "equalize")).mean()
    assert raw_gap > 20 and equalized_gap < 0.25 * raw_gap, (raw_gap, equalized_gap)
    assert standardize_intensity(image, "none") is image
    with pytest.raises(ValueError, match="unknown intensity"):
        standardize_intensity(image, "clahe")
