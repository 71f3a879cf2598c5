"""Decoding image files into 8-bit RGB, safely.

What the official code does is ``Image.open(path).convert("RGB")``. We differ on purpose where that
silently damages the picture, and say so here:
- EXIF orientation is applied (phone photos would otherwise reach the model sideways);
- transparency is composited onto white, as transformers' ``convert_to_rgb`` does (plain
  ``convert("RGB")`` exposes whatever colour the fully transparent pixels happen to store);
- 16-bit greyscale (``I;16``) is scaled to 8 bits (PIL's conversion clips every value above 255 to
  white, so a 16-bit scan becomes a blank page).
"""

from __future__ import annotations

import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

# PIL's own default (about 89.5 megapixels, a 9459 x 9459 image). PIL only warns between 1x and 2x
# this; we refuse everything above it, since a decompression bomb is a few kB of PNG that expands to
# gigabytes of RGB.
MAX_IMAGE_PIXELS = 89_478_485

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def open_image(source: str | os.PathLike | bytes | Image.Image, name: str | None = None) -> Image.Image:
    """Open ``source`` (a path, encoded bytes or a PIL image) as an RGB image, upright.

    ``name`` is what error messages call the image (default: its path, or "<bytes>").
    """
    if isinstance(source, Image.Image):
        return to_rgb(ImageOps.exif_transpose(source))
    default_name, data = read_image_bytes(source)
    name = name or default_name
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            _check_pixels(name, image.size)
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: refusing to decode a decompression bomb ({e})") from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{name}: not an image file PIL can read") from e
        except (OSError, SyntaxError, ValueError) as e:
            # Truncated or corrupt data surfaces as OSError ("image file is truncated") or, for some
            # formats, SyntaxError/ValueError from the decoder.
            raise ImageError(f"{name}: cannot decode image: {e}") from e
    return to_rgb(ImageOps.exif_transpose(image))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see the module docstring for the choices)."""
    if image.mode == "RGB":
        return image
    if image.mode in _SIXTEEN_BIT_MODES or image.mode == "I":
        values = np.asarray(image)
        if image.mode == "I" and values.min() >= 0 and values.max() <= 255:
            return Image.fromarray(values.astype(np.uint8)).convert("RGB")  # 8-bit data in a 32-bit mode
        return Image.fromarray(_sixteen_to_eight(values)).convert("RGB")
    if image.mode == "F":
        values = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float32)), 0.0, 255.0)
        return Image.fromarray(np.round(values).astype(np.uint8)).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_to_eight(values: np.ndarray) -> np.ndarray:
    """Map 0..65535 onto 0..255 with rounding (65535 / 257 = 255 exactly)."""
    values = np.clip(values.astype(np.int64), 0, 65535)
    return ((values * 255 + 32767) // 65535).astype(np.uint8)


def read_image_bytes(source: str | os.PathLike | bytes) -> tuple[str, bytes]:
    """(name for messages, encoded bytes) of a path or bytes, with the same checks as decoding."""
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError("<bytes>: empty image data")
        return "<bytes>", bytes(source)
    path = Path(source)
    if not path.exists():
        raise ImageError(f"{path}: no such file")
    if not path.is_file():
        raise ImageError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: cannot read: {e.strerror or e}") from e
    if not data:
        raise ImageError(f"{path}: empty file")
    return str(path), data


def _check_pixels(name: str, size: tuple[int, int]) -> None:
    width, height = size
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, more than the "
            f"{MAX_IMAGE_PIXELS:,} allowed (a decompression bomb, or downscale it first)"
        )


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def image_files(folder: str | os.PathLike) -> list[Path]:
    """The image files of ``folder`` by suffix, sorted by name; an error when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(f"{folder}: not a folder of images")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths:
        raise ImageError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths
