"""Preprocessing parity with transformers' CLIPImageProcessor after the official pad-to-square.

Reference: transformers' PIL-backed CLIPImageProcessor (``CLIPImageProcessorPil``; in transformers 5
the class named ``CLIPImageProcessor`` is the torchvision one, and the official code ran the PIL
path), loaded from the tower's own preprocessor_config.json, applied after llava's expand2square as
written out in tests/support/reference.py from llava/mm_utils.py. Tolerance 1e-6 absolute on normalized pixels.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from transformers.image_transforms import convert_to_rgb
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from convllava_edge.errors import ImageError
from convllava_edge.image import MAX_IMAGE_PIXELS, open_image
from convllava_edge.preprocess import PreprocessConfig, native_size, preprocess
from convllava_edge.export.config import read_json

from support.reference import official_expand2square

TOLERANCE = 1e-6


@pytest.fixture(scope="module")
def processor(tiny):
    return CLIPImageProcessorPil.from_pretrained(str(tiny.tower))


@pytest.fixture(scope="module")
def config(tiny):
    return PreprocessConfig.from_dict(read_json(tiny.tower / "preprocessor_config.json"))


def reference_pixels(image: Image.Image, processor) -> np.ndarray:
    rgb = convert_to_rgb(image, return_numpy=False) if image.mode != "RGB" else image
    fill = tuple(int(x * 255) for x in processor.image_mean)
    square = official_expand2square(rgb, fill)
    return processor(square, return_tensors="np")["pixel_values"]


def _photo(width, height, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (5, 5, 3), dtype=np.uint8)
    smooth = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.int16)
    return Image.fromarray(np.clip(smooth + rng.integers(-30, 30, smooth.shape), 0, 255).astype(np.uint8))


def _modes():
    rgb = _photo(300, 200)
    rgba = rgb.convert("RGBA")
    alpha = np.asarray(_photo(300, 200, seed=5).convert("L"))
    rgba.putalpha(Image.fromarray(alpha))
    p_trans = rgb.convert("P", palette=Image.Palette.ADAPTIVE, colors=32)
    p_trans.info["transparency"] = 3
    return {
        "RGB": rgb, "RGBA": rgba, "LA": rgba.convert("LA"), "P": rgb.convert("P", palette=Image.Palette.ADAPTIVE),
        "P+transparency": p_trans, "CMYK": rgb.convert("CMYK"), "L": rgb.convert("L"), "1": rgb.convert("1"),
        "1x1": Image.new("RGB", (1, 1), (200, 10, 90)), "wide": _photo(640, 96, seed=2), "tall": _photo(90, 500, seed=3),
        "square": _photo(256, 256, seed=4),
    }


@pytest.mark.parametrize("name", list(_modes()))
def test_pad_mode_matches_clip_image_processor(name, processor, config):
    image = _modes()[name]
    ours = preprocess(open_image(image), config, "pad")
    ref = reference_pixels(image, processor)
    assert ours.shape == ref.shape == (1, 3, 256, 256)
    assert ours.dtype == np.float32
    assert np.max(np.abs(ours - ref)) <= TOLERANCE


def test_pad_fill_is_the_truncated_clip_mean(config):
    assert config.pad_color == (122, 116, 104)


def test_sixteen_bit_images_scale_instead_of_clipping(processor, config):
    # PIL's own I;16 -> RGB clips everything above 255 to white. An 8-bit picture stored as 16 bits
    # (v * 257 maps 0..255 onto 0..65535 exactly) must come back as the same 8-bit picture.
    eight = np.asarray(_photo(200, 120, seed=7).convert("L"))
    sixteen = Image.fromarray((eight.astype(np.uint16) * 257))
    assert sixteen.mode.startswith("I;16")
    ours = preprocess(open_image(sixteen), config, "pad")
    ref = reference_pixels(Image.fromarray(eight), processor)
    assert np.max(np.abs(ours - ref)) <= TOLERANCE


def test_exif_orientation_is_applied():
    raw = np.asarray(_photo(64, 32, seed=8))
    image = Image.fromarray(raw)
    exif = image.getexif()
    exif[0x0112] = 6  # orientation 6: the stored pixels must be turned 90 degrees clockwise to display
    buf = io.BytesIO()
    image.save(buf, format="PNG", exif=exif.tobytes())
    upright = np.asarray(open_image(buf.getvalue()))
    assert upright.shape == (64, 32, 3)
    assert np.array_equal(upright, np.rot90(raw, k=-1))


@pytest.mark.parametrize("size", [(640, 480), (480, 640), (1000, 200), (64, 4000), (1, 1), (256, 256)])
def test_native_mode_keeps_aspect_under_the_square_budget(size, config):
    w, h = native_size(*size, budget=256 * 256, stride=64)
    assert w % 64 == 0 and h % 64 == 0 and w >= 64 and h >= 64
    assert w * h <= 256 * 256
    pixels = preprocess(Image.new("RGB", size, (10, 200, 30)), config, "native")
    assert pixels.shape == (1, 3, h, w)
    if min(size) * 4 >= max(size):  # aspect ratios up to 4:1 survive rounding to 64-pixel steps
        assert abs(np.log((w / h) / (size[0] / size[1]))) < 0.35


def test_native_mode_of_a_wide_image_gives_a_wide_grid(config):
    pixels = preprocess(_photo(640, 320), config, "native")
    assert pixels.shape[3] > pixels.shape[2]


@pytest.mark.parametrize("data,message", [(b"", "empty"), (b"not an image at all", "not an image"),
                                           (None, "truncated")])
def test_bad_image_files_give_one_clear_error(tmp_path, data, message):
    path = tmp_path / "bad.png"
    if data is None:  # a real PNG cut in half
        buf = io.BytesIO()
        _photo(128, 128).save(buf, format="PNG")
        data = buf.getvalue()[: len(buf.getvalue()) // 2]
        message = "cannot decode"
    path.write_bytes(data)
    with pytest.raises(ImageError, match=message) as info:
        open_image(path)
    assert str(path) in str(info.value)


def test_missing_image_names_the_file(tmp_path):
    with pytest.raises(ImageError, match="no such file"):
        open_image(tmp_path / "nope.jpg")


def test_decompression_bomb_is_refused(tmp_path):
    side = int(MAX_IMAGE_PIXELS ** 0.5) + 10  # just over the limit; a 1-bit PNG of it is a few kB
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path, optimize=True)
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ImageError, match="decompression bomb"):
        open_image(path)
