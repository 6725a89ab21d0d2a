"""Decoding image bytes into upright RGB images, with clear errors.

Every failure is an :class:`ImageDecodeError` whose message is one line, so a
scoring job turns it into an error row and goes on.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import ImageDecodeError
from .transforms import to_rgb

DEFAULT_MAX_PIXELS = 178_956_970  # PIL's own bomb limit (2 x MAX_IMAGE_PIXELS)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


def decode_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``data`` into a fully loaded, EXIF-upright, 8-bit RGB PIL image.

    Raises:
        ImageDecodeError: empty or unrecognised data, truncated files, images
            larger than ``max_pixels`` (checked from the header, before any
            pixel is decoded), or any decoder failure.
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
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
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
