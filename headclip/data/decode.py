"""Decoding image bytes into upright RGB images, with clear errors.

Every failure is an :class:`ImageDecodeError` whose message is one line, so a
scoring job turns it into an error row and goes on.
"""

from __future__ import annotations

import io
import warnings
from typing import Optional

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError
from .transforms import to_rgb

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own bomb limit (2 x MAX_IMAGE_PIXELS)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")
ORIENTATION_TAG = 0x0112  # EXIF Orientation


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open ``data`` and check its header: no pixel is decoded yet.

    Raises:
        ImageDecodeError: empty or unrecognised data, an unreadable header, or
            more than ``max_pixels`` pixels (a decompression bomb).
    """
    if not data:
        raise ImageDecodeError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"decompression bomb: {err}") from None
    except UnidentifiedImageError:
        raise ImageDecodeError(f"not a recognised image ({len(data)} bytes, starts {data[:8]!r})") from None
    except Exception as err:  # PIL raises many types on malformed headers
        message = _one_line(err)
        kind = "truncated image" if "truncated" in message.lower() else "unreadable image header"
        raise ImageDecodeError(f"{kind}: {message}") from None
    width, height = image.size
    if width * height > max_pixels:
        raise ImageDecodeError(
            f"decompression bomb: {width}x{height} = {width * height} pixels exceeds the limit of {max_pixels}",
            width, height,
        )
    if width <= 0 or height <= 0:
        raise ImageDecodeError(f"image has no pixels ({width}x{height})", width, height)
    return image


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 where there is none or it cannot be read."""
    try:
        orientation = int(image.getexif().get(ORIENTATION_TAG, 1))
    except Exception:  # noqa: BLE001 - unreadable EXIF: exif_transpose leaves the image as it is
        return 1
    return orientation if 1 <= orientation <= 8 else 1


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of an opened image once its EXIF orientation is applied."""
    width, height = image.size
    return (height, width) if exif_orientation(image) in (5, 6, 7, 8) else (width, height)


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into a fully loaded, EXIF-upright, 8-bit RGB PIL image.

    Raises:
        ImageDecodeError: empty or unrecognised data, truncated files, images
            larger than ``max_pixels`` (checked from the header, before any
            pixel is decoded), or any decoder failure.
    """
    return decode_scaled(data, max_pixels)[0]


def decode_scaled(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                  reduce_to: Optional[int] = None) -> tuple[Image.Image, tuple[int, int]]:
    """(EXIF-upright 8-bit RGB image, its full upright (width, height)).

    With ``reduce_to``, a JPEG at least twice that size on both sides is
    decoded at a reduced DCT scale (1/2, 1/4 or 1/8) that keeps both sides at
    least ``reduce_to``: much less work for an image that is resized to the
    model's input anyway. The size returned is always the full image's.
    Raises ImageDecodeError as :func:`decode_image` does.
    """
    image = open_image(data, max_pixels)
    width, height = image.size
    full_size = upright_size(image)
    if reduce_to and image.format == "JPEG" and min(width, height) >= 2 * reduce_to:
        image.draft(None, (reduce_to, reduce_to))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image), full_size
    except OSError as err:
        message = _one_line(err)
        if "truncated" in message.lower() or "broken data stream" in message.lower():
            raise ImageDecodeError(f"truncated image: {message}", width, height) from None
        raise ImageDecodeError(f"cannot decode image: {message}", width, height) from None
    except Exception as err:
        raise ImageDecodeError(f"cannot decode image: {type(err).__name__}: {_one_line(err)}", width, height) from None


def _one_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    return " ".join(text.split())[:300]
