"""Reading image files safely: validation and decoding to 8-bit grayscale.

Every failure raises :class:`BadImageError` with a message that names the file and the problem: a missing or empty
file, one that is not a regular file (a folder, a FIFO, a device), something that is not an image, a truncated or
corrupt image, a zero-size image, one whose shorter side is below ``min_side`` (checked by :func:`check_image`), or
one whose header claims more than ``max_pixels`` pixels (checked before any pixel is decoded). Images are decoded
as a viewer shows them: EXIF orientation applied. PIL's own decompression-bomb error and warning
are mapped to the same error, and truncated images are always refused, even when some other code has set
``PIL.ImageFile.LOAD_TRUNCATED_IMAGES``. Files are only ever opened for reading.
"""

from __future__ import annotations

import os
import struct
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pneumo_exp.errors import UserError

MAX_IMAGE_PIXELS: int = 40_000_000
MIN_IMAGE_SIDE: int = 32  # the phantom demo draws 64-128 px, the shared Kermany copies are 224 px
IMAGE_SUFFIXES: tuple[str, ...] = (".jpeg", ".jpg", ".png")
INTENSITY_METHODS: tuple[str, ...] = ("none", "equalize")  # dataset.intensity

# What PIL raises on broken input, besides the errors above. Anything else (MemoryError, bugs) propagates.
_DECODER_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, zlib.error, IndexError, KeyError,
                   TypeError, Image.DecompressionBombError, Image.DecompressionBombWarning)


class BadImageError(UserError, ValueError):
    """A file that cannot be used as an image; the message names the file and the problem."""


def check_image(path: str | os.PathLike, max_pixels: int | None = MAX_IMAGE_PIXELS,
                min_side: int = MIN_IMAGE_SIDE) -> None:
    """Raise BadImageError unless ``path`` is a complete, decodable image of acceptable size.

    Cheaper than a full decode: the header is checked first, ``verify()`` checks the container (PNG chunk CRCs),
    then the pixel data is read in full but decoded at reduced scale where the format allows it (JPEG draft mode
    decodes at 1/8 scale), which is what catches truncated and corrupt JPEGs.
    """
    path = readable_file(path)
    with _open_image(path, max_pixels) as image:
        _require_min_side(path, image, min_side)
        image.verify()
    with _open_image(path, max_pixels) as image:
        if image.format == "JPEG":
            image.draft("L", (1, 1))
        image.load()


def decode_grayscale(path: str | os.PathLike, size: int, max_pixels: int | None = MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode any supported image, turned upright by its EXIF orientation, to a ``(size, size)`` uint8 grayscale array.

    Colour is reduced with ITU-R 601-2 luma; palette images go through RGB(A); CMYK through RGB. Alpha is dropped,
    not composited: the grey values stored in the colour channels are kept as they are, since compositing would
    invent a background. 16-bit and 32-bit integer images are scaled by the smallest power-of-two range that holds
    their maximum (12-bit data by 4095, full 16-bit data by 65535), so they are neither clipped to white nor
    stretched by their own contrast; integer images with negative values and float images outside 0..1 are
    stretched from their minimum to their maximum; float images within 0..1 are multiplied by 255.
    The image is then squashed (no crop, aspect ratio not kept) to ``size`` x ``size`` with LANCZOS, as the shared
    dataset was.
    """
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"size must be a positive integer, got {size!r}")
    path = readable_file(path)
    with _open_image(path, max_pixels) as image:
        image.load()
        gray = _to_uint8_gray(ImageOps.exif_transpose(image), path)
    if gray.shape != (size, size):
        gray = np.asarray(Image.fromarray(gray, mode="L").resize((size, size), Image.Resampling.LANCZOS))
    return gray


def readable_file(path: str | os.PathLike) -> Path:
    """``path`` if it is an existing, non-empty regular file; a BadImageError saying which of these it is not."""
    path = Path(path)
    if not path.exists():
        raise BadImageError(f"{path}: file does not exist")
    if not path.is_file():
        raise BadImageError(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise BadImageError(f"{path}: empty file (0 bytes)")
    return path


@contextmanager
def _open_image(path: Path, max_pixels: int | None) -> Iterator[Image.Image]:
    """Open ``path`` with its header checked; any decoding error inside the block becomes a BadImageError."""
    with warnings.catch_warnings(), _truncated_images_refused():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            with Image.open(path) as image:
                _check_dimensions(path, image, max_pixels)
                yield image
        except BadImageError:
            raise
        except UnidentifiedImageError as error:
            raise BadImageError(f"{path}: not an image (format not recognised)") from error
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
            raise BadImageError(f"{path}: too many pixels (PIL decompression-bomb guard: {error})") from error
        except _DECODER_ERRORS as error:
            raise BadImageError(f"{path}: truncated or corrupt image ({type(error).__name__}: {error})") from error


def _require_min_side(path: Path, image: Image.Image, min_side: int) -> None:
    width, height = image.size
    if min(width, height) < min_side:
        raise BadImageError(f"{path}: image is {width}x{height}, its shorter side of {min(width, height)} px is below "
                            f"the minimum of {min_side} px (dataset.min_image_side)")


def _check_dimensions(path: Path, image: Image.Image, max_pixels: int | None) -> None:
    width, height = image.size
    if width <= 0 or height <= 0:
        raise BadImageError(f"{path}: zero-size image ({width}x{height})")
    if max_pixels is not None and width * height > max_pixels:
        raise BadImageError(f"{path}: image is {width}x{height} = {width * height:,} pixels, "
                            f"more than the limit of {max_pixels:,} (possible decompression bomb)")


@contextmanager
def _truncated_images_refused() -> Iterator[None]:
    previous = ImageFile.LOAD_TRUNCATED_IMAGES
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = previous


def _to_uint8_gray(image: Image.Image, path: Path) -> np.ndarray:
    mode = image.mode
    if mode == "L":
        return np.asarray(image, dtype=np.uint8)
    if mode.startswith("I") or mode == "F":
        return _scale_to_uint8(image, path)
    if mode in ("1", "LA", "RGB", "RGBA"):
        return np.asarray(image.convert("L"), dtype=np.uint8)
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in image.info
        return np.asarray(image.convert("RGBA" if has_alpha else "RGB").convert("L"), dtype=np.uint8)
    try:  # CMYK, YCbCr, premultiplied modes and the rest: through RGB
        return np.asarray(image.convert("RGB").convert("L"), dtype=np.uint8)
    except ValueError as error:
        raise BadImageError(f"{path}: cannot convert image mode {mode!r} to grayscale") from error


def _scale_to_uint8(image: Image.Image, path: Path) -> np.ndarray:
    """16/32-bit integer or float pixels to 0..255, as described in decode_grayscale."""
    values = np.asarray(image).astype(np.float64)
    if not np.isfinite(values).all():
        raise BadImageError(f"{path}: image contains NaN or infinite values")
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and low >= 0 and high <= 1:
        scaled = values * 255.0
    elif image.mode == "F" or low < 0:
        scaled = (values - low) * (255.0 / (high - low)) if high > low else np.zeros_like(values)
    else:
        full_scale = 2 ** max(8, int(high).bit_length()) - 1
        scaled = values * (255.0 / full_scale)
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def standardize_intensity(pixels: np.ndarray, method: str) -> np.ndarray:
    """`dataset.intensity` on one decoded uint8 image: "none" keeps it; "equalize" maps its grey levels through
    their own cumulative histogram (PIL's ImageOps.equalize), so any monotone exposure or contrast change of the
    input (gamma, window, gain) gives almost the same output."""
    if method == "none":
        return pixels
    if method == "equalize":
        return np.asarray(ImageOps.equalize(Image.fromarray(pixels, mode="L")), dtype=np.uint8)
    raise ValueError(f"unknown intensity method {method!r}; expected one of {INTENSITY_METHODS}")
