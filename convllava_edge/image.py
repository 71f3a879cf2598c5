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

import contextlib
import io
import os
import stat
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError

# PIL's own default (about 89.5 megapixels, a 9459 x 9459 image; PIL derives it as 1 GiB // 4 // 3).
# PIL only warns between 1x and 2x this; we refuse everything above it, since a decompression bomb
# is a few kB of PNG that expands to gigabytes of RGB.
MAX_IMAGE_PIXELS = 89_478_485
# 256 MiB = 3 bytes x MAX_IMAGE_PIXELS (+1): the largest image we decode, 8-bit RGB, stored with no
# compression at all. Compressed encodings of it are smaller, so a larger file is not an image we
# would decode (16-bit or RGBA files that large: convert them first); refused before it is read.
MAX_IMAGE_BYTES = 1 << 28
# The encodings image_files lists (PIL's JPEG opener also returns the MPO files many phones write).
# PIL can open ~40 more, some through external programs (EPS runs Ghostscript): a file that is none
# of these is refused rather than handed to every decoder PIL has.
FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP", "DIB", "TIFF")
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF, BMP or TIFF"
# What PIL raises on corrupt data: OSError ("image file is truncated"), SyntaxError/ValueError from
# decoders, EOFError, and what Image.open itself treats as "not this format" (struct.error, IndexError,
# TypeError): load() can raise those too, e.g. TypeError on a TIFF whose strip offset is stored as a
# fraction (found by tests/fuzz/test_fuzz_image_cache.py, Pillow 13).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error, IndexError, TypeError)
# Open without blocking on a FIFO swapped in after the stat (a regular file ignores O_NONBLOCK).
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0)

_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


# fits(name, (width, height)): raises ImageError for a size the caller cannot use (preprocess.size_check).
SizeCheck = Callable[[str, tuple[int, int]], None]


def open_image(source: str | os.PathLike | bytes | Image.Image, name: str | None = None,
               fits: SizeCheck | None = None) -> Image.Image:
    """Open ``source`` (a path, encoded bytes or a PIL image) as an RGB image, upright.

    ``name`` is what error messages call the image (default: its path, or "<bytes>"). ``fits`` is called
    with the size the header declares, before any pixel is decoded: what the caller would refuse at that
    size (a 16383x5000 WebP padded to a square) costs no decoding (1.4 GB for that one).
    """
    if isinstance(source, Image.Image):
        name = name or "<image>"
        _check_pixels(name, source.size, fits)  # a lazily opened PIL image is not decoded yet: it may be a bomb
        with _decoding(name):
            return to_rgb(ImageOps.exif_transpose(source))
    name, data = _read(source, sniff=True, name=name)
    with _decoding(name):
        image = Image.open(io.BytesIO(data), formats=FORMATS)
        _check_pixels(name, image.size, fits)
        image.load()
        # EXIF is parsed here: a malformed tag is a corrupt file too
        return to_rgb(ImageOps.exif_transpose(image))


@contextlib.contextmanager
def _decoding(name: str) -> Iterator[None]:
    """Turn what PIL raises on a hostile or damaged file into one ImageError line naming it."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            yield
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageError(f"{name}: refusing to decode a decompression bomb ({e})") from e
        except UnidentifiedImageError as e:
            raise ImageError(f"{name}: not an image file this reads ({_FORMAT_NAMES})") from e
        except DECODE_ERRORS as e:
            raise ImageError(f"{name}: cannot decode image: {e}") from e


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


def read_image_bytes(source: str | os.PathLike | bytes, *, sniff: bool = False) -> tuple[str, bytes]:
    """(name for messages, encoded bytes) of a path or bytes.

    Refused before the file is read: not a regular file, empty, or over MAX_IMAGE_BYTES. With
    ``sniff``, also a header that is not one of FORMATS or declares more than MAX_IMAGE_PIXELS (PIL
    reads the header only); video.py reads video files through here without it.
    """
    return _read(source, sniff)


def _read(source: str | os.PathLike | bytes, sniff: bool, name: str | None = None) -> tuple[str, bytes]:
    """read_image_bytes, with every message naming ``name`` when given."""
    if isinstance(source, (bytes, bytearray)):
        name = name or "<bytes>"
        if not source:
            raise ImageError(f"{name}: empty image data")
        _check_size(name, len(source))
        if sniff:
            _sniff(name, io.BytesIO(source))
        return name, bytes(source)
    path = Path(source)
    name = name or str(path)
    try:
        if not path.exists():
            raise ImageError(f"{name}: no such file")
        if not path.is_file():  # a folder, FIFO or device: reading it would fail, block or never end
            raise ImageError(f"{name}: not a file")
        fd = os.open(path, _OPEN_FLAGS)
    except (OSError, ValueError) as e:  # ValueError: a NUL in the name
        raise ImageError(f"{name}: cannot read: {getattr(e, 'strerror', None) or e}") from e
    with os.fdopen(fd, "rb") as f:
        try:
            st = os.fstat(fd)  # of the file actually opened, which may have been swapped since is_file
            if not stat.S_ISREG(st.st_mode):
                raise ImageError(f"{name}: not a file")
            if st.st_size == 0:
                raise ImageError(f"{name}: empty file")
            _check_size(name, st.st_size)
            if sniff:
                _sniff(name, f)
                f.seek(0)
            data = f.read(MAX_IMAGE_BYTES + 1)  # bounded: the file may have grown since the fstat
        except OSError as e:
            raise ImageError(f"{name}: cannot read: {e.strerror or e}") from e
    if not data:
        raise ImageError(f"{name}: empty file")
    _check_size(name, len(data))
    return name, data


def _check_size(name: str, size: int) -> None:
    if size > MAX_IMAGE_BYTES:
        raise ImageError(
            f"{name}: file is {size:,} bytes, more than the {MAX_IMAGE_BYTES:,} (256 MiB) an image may have "
            "(an uncompressed 8-bit RGB image at the pixel limit)"
        )


def _sniff(name: str, f: BinaryIO) -> None:
    """Identify the image and read its size from the header only: PIL decodes nothing until load()."""
    with _decoding(name):
        image = Image.open(f, formats=FORMATS)
        _check_pixels(name, image.size)


def _check_pixels(name: str, size: tuple[int, int], fits: SizeCheck | None = None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"{name}: image is {width}x{height}: no pixels")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageError(
            f"{name}: image is {width}x{height} = {width * height:,} pixels, more than the "
            f"{MAX_IMAGE_PIXELS:,} allowed (a decompression bomb, or downscale it first)"
        )
    if fits is not None:
        fits(name, (width, height))  # EXIF may turn it later: the callers' bounds are the same either way round


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
