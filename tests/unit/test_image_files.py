"""Image files cannot make the runtime read, allocate or decode without bound: sizes refused before reading,
formats before decoding, pixel counts and the padded square or resized copy from the header, before a pixel is
decoded (a 16383x5000 WebP, a 60000x1 strip); EXIF, transparency and 16-bit images converted as the module says."""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import textwrap
import time
import tracemalloc
import warnings
import zlib
from pathlib import Path

import pytest
from PIL import Image, WebPImagePlugin

from convllava_edge import image as image_mod
from convllava_edge import preprocess as preprocess_mod
from convllava_edge.errors import ImageError
from convllava_edge.image import MAX_IMAGE_BYTES, MAX_IMAGE_PIXELS, open_image, read_image_bytes
from convllava_edge.preprocess import PreprocessConfig, preprocess, size_check

ROOT = Path(__file__).resolve().parents[2]


def _png(size=(16, 12), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (10, 200, 30) if mode == "RGB" else 0).save(buf, format="PNG")
    return buf.getvalue()


CONFIG = PreprocessConfig.from_dict({"size": {"shortest_edge": 64}, "crop_size": {"height": 64, "width": 64},
                                     "image_mean": [0.5] * 3, "image_std": [0.5] * 3})


# -- image files -------------------------------------------------------------------------------------------
def _peak_bytes(fn) -> tuple[int, BaseException | None]:
    """Peak Python allocation while ``fn`` runs, and what it raised."""
    tracemalloc.start()
    try:
        fn()
        error = None
    except BaseException as e:  # noqa: BLE001 - returned for the caller to check
        error = e
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak, error


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reader", [read_image_bytes, open_image])
def test_a_3_gb_file_is_refused_without_being_read(tmp_path, reader):
    path = tmp_path / "huge.png"
    with open(path, "wb") as f:
        f.write(_png())
        f.truncate(3 << 30)  # sparse: 3 GB to stat, nothing on disk
    t0 = time.perf_counter()
    peak, error = _peak_bytes(lambda: reader(path))
    assert isinstance(error, ImageError), error
    assert str(path) in str(error) and f"{3 << 30:,}" in str(error) and f"{MAX_IMAGE_BYTES:,}" in str(error)
    assert peak < 1 << 20 and time.perf_counter() - t0 < 5  # reading it would take 3 GB and seconds


@pytest.mark.timeout(60)
def test_a_large_non_image_file_is_refused_from_its_header(tmp_path):
    path = tmp_path / "movie.png"
    with open(path, "wb") as f:
        f.write(b"\x00\x00\x00\x20ftypisom" + b"\x00" * 100)
        f.truncate(64 << 20)  # under the byte limit: only the header says it is no image
    peak, error = _peak_bytes(lambda: open_image(path))
    assert isinstance(error, ImageError) and "not an image" in str(error), error
    assert peak < 4 << 20  # 64 MB were not read
    # read_image_bytes without sniff reads it (video.py's path): the size check alone lets it through
    assert len(read_image_bytes(path)[1]) == 64 << 20


@pytest.mark.timeout(30)
def test_the_byte_limit_applies_to_paths_and_bytes_alike(tmp_path, monkeypatch):
    data = _png((64, 64))
    monkeypatch.setattr(image_mod, "MAX_IMAGE_BYTES", len(data) - 1)
    path = tmp_path / "a.png"
    path.write_bytes(data)
    for source in (path, data):
        with pytest.raises(ImageError, match=f"{len(data):,} bytes"):
            open_image(source)
    monkeypatch.setattr(image_mod, "MAX_IMAGE_BYTES", len(data))
    assert open_image(path).size == open_image(data).size == (64, 64)


@pytest.mark.timeout(30)
def test_fifos_devices_and_folders_are_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), tmp_path):
        with pytest.raises(ImageError, match="not a file"):
            open_image(path)


@pytest.mark.timeout(30)
def test_only_the_listed_encodings_are_decoded(tmp_path):
    image = Image.new("RGB", (8, 8), (1, 2, 3))
    for fmt, ok in (("PNG", True), ("BMP", True), ("TIFF", True), ("PPM", False), ("TGA", False), ("PCX", False)):
        buf = io.BytesIO()
        image.save(buf, format=fmt)
        if ok:
            assert open_image(buf.getvalue()).getpixel((0, 0)) == (1, 2, 3), fmt
        else:
            with pytest.raises(ImageError, match="not an image file"):
                open_image(buf.getvalue())
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"  # would run Ghostscript on load
    with pytest.raises(ImageError, match="not an image file"):
        open_image(eps)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG signature, IHDR and IEND: PIL opens it lazily and knows its size without any pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


@pytest.mark.timeout(30)
def test_a_lazily_opened_pil_image_over_the_pixel_limit_is_refused_before_decoding():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        lazy = Image.open(io.BytesIO(_png_header_only(20000, 5000)))  # 100 MP: PIL itself only warns
    peak, error = _peak_bytes(lambda: open_image(lazy))
    assert isinstance(error, ImageError) and "100,000,000 pixels, more than" in str(error), error
    assert peak < 1 << 20  # 100 MP of RGB were never allocated


# -- preprocessing bounds ----------------------------------------------------------------------------------
CONVLLAVA = PreprocessConfig(image_size=1536, crop_size=(1536, 1536))
MINI = PreprocessConfig(image_size=336, crop_size=(336, 336), stride=14)


@pytest.mark.timeout(30)
@pytest.mark.parametrize("aspect,config,message", [
    ("pad", CONVLLAVA, "60000x60000 = 3,600,000,000 pixels"),
    ("crop", MINI, "20160000x336"),
])
def test_a_strip_image_is_refused_before_padding_or_resizing(aspect, config, message):
    strip = Image.new("RGB", (60000, 1), (5, 6, 7))
    t0 = time.perf_counter()
    with pytest.raises(ImageError, match=message) as info:
        preprocess(strip, config, aspect)
    assert f"{MAX_IMAGE_PIXELS:,}" in str(info.value) and "\n" not in str(info.value)
    assert time.perf_counter() - t0 < 2
    tall = strip.transpose(Image.Transpose.ROTATE_90)  # 1x60000: the same in the other orientation
    with pytest.raises(ImageError):
        preprocess(tall, config, aspect)


@pytest.mark.timeout(30)
def test_the_bounds_allow_up_to_the_limit_and_refuse_past_it(monkeypatch):
    monkeypatch.setattr(preprocess_mod, "MAX_IMAGE_PIXELS", 200 * 200)  # the comparison, at a cheap scale
    config = PreprocessConfig(image_size=64, crop_size=(64, 64))
    assert preprocess(Image.new("RGB", (200, 3), (9, 9, 9)), config, "pad").shape == (1, 3, 64, 64)
    with pytest.raises(ImageError, match="201x201 = 40,401 pixels, more than the 40,000"):
        preprocess(Image.new("RGB", (201, 3), (9, 9, 9)), config, "pad")
    # crop: the shortest edge 2 goes to 64, the longest 20 to int(64 * 20 / 2) = 640: exactly the limit
    monkeypatch.setattr(preprocess_mod, "MAX_IMAGE_PIXELS", 640 * 64)
    assert preprocess(Image.new("RGB", (20, 2), (9, 9, 9)), config, "crop").shape == (1, 3, 64, 64)
    with pytest.raises(ImageError, match="672x64 = 43,008 pixels"):
        preprocess(Image.new("RGB", (21, 2), (9, 9, 9)), config, "crop")


STRIP_SCRIPT = textwrap.dedent("""
    import io, resource, sys, time
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))  # 2 GiB: the unbounded pad needs 14 GB
    from PIL import Image, WebPImagePlugin
    from convllava_edge.errors import ImageError
    from convllava_edge.image import open_image
    from convllava_edge.preprocess import PreprocessConfig, preprocess, size_check

    buf = io.BytesIO()
    Image.new("RGB", (60000, 1), (5, 6, 7)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 1000, len(buf.getvalue())
    image = open_image(buf.getvalue())
    convllava = PreprocessConfig(image_size=1536, crop_size=(1536, 1536))
    mini = PreprocessConfig(image_size=336, crop_size=(336, 336), stride=14)
    t0 = time.perf_counter()
    for aspect, config in (("pad", convllava), ("crop", mini), ("pad", mini), ("crop", convllava)):
        try:
            preprocess(image, config, aspect)
        except ImageError as e:
            print(aspect, "refused:", e)
        else:
            sys.exit(f"{aspect}: no ImageError")
    # native keeps its own bound (W' * H' <= the crop's area): a valid, small array
    pixels = preprocess(image, convllava, "native")
    assert pixels.shape[2] * pixels.shape[3] <= 1536 * 1536, pixels.shape
    print("native", pixels.shape, f"{time.perf_counter() - t0:.2f} s")
""")


@pytest.mark.timeout(120)
def test_a_60000x1_png_fails_fast_with_bounded_memory_in_every_mode():
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", STRIP_SCRIPT], capture_output=True, text=True, timeout=100,
                            cwd=ROOT, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("refused:") == 4


# -- a size the preprocessing refuses, refused from the header -----------------------------------------------
@pytest.fixture
def decodes(monkeypatch):
    """How many times a WebP's pixels were decoded."""
    calls = []
    real = WebPImagePlugin.WebPImageFile.load
    monkeypatch.setattr(WebPImagePlugin.WebPImageFile, "load", lambda self: calls.append(1) or real(self))
    return calls


def webp(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 200, 10)).save(out, "WEBP", lossless=True)
    return out.getvalue()


def test_a_size_the_padding_refuses_is_refused_before_decoding(monkeypatch, decodes):
    # The sweep's 16383x5000 WebP (1.38 GB decoded) at a scale a test affords: the same rule with a smaller limit.
    monkeypatch.setattr(preprocess_mod, "MAX_IMAGE_PIXELS", 1_000_000)
    data = webp(3000, 100)  # padded: 3000 x 3000 = 9 M pixels > 1 M
    with pytest.raises(ImageError, match=r"wide.webp: image is 3000x100: padding it to a square makes 3000x3000"):
        open_image(data, name="wide.webp", fits=size_check(CONFIG, "pad"))
    assert decodes == []
    with pytest.raises(ImageError, match="resizing its shortest edge"):
        open_image(webp(16000, 8), name="x", fits=size_check(CONFIG, "crop"))
    assert decodes == []
    image = open_image(data, name="wide.webp", fits=size_check(CONFIG, "native"))  # native keeps the ratio: decoded
    assert image.size == (3000, 100) and decodes


def test_the_command_lines_precheck_uses_the_bundles_preprocessing(monkeypatch, decodes, tmp_path):
    from convllava_edge.cli import main as cli_main
    from convllava_edge.default_model import DEMO_BUNDLE

    monkeypatch.setattr(preprocess_mod, "MAX_IMAGE_PIXELS", 1_000_000)
    path = tmp_path / "wide.webp"
    path.write_bytes(webp(3000, 100))
    with pytest.raises(ImageError, match="padding it to a square"):
        cli_main._checked_image(path, DEMO_BUNDLE, None)
    assert decodes == []
    cli_main._checked_image(path, DEMO_BUNDLE, "native")
    assert decodes


@pytest.mark.timeout(30)
def test_every_image_error_names_what_the_caller_called_the_image(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    for source in (path, b"hello", _png_header_only(20000, 20000)):
        with pytest.raises(ImageError) as info:
            open_image(source, name="photo.jpg")
        assert str(info.value).startswith("photo.jpg: "), info.value
