"""Image -> pixel_values, exactly as the official ConvLLaVA code, plus an aspect-preserving mode.

"pad" (what the checkpoints were trained with; llava/mm_utils.py `process_images`):
  1. expand2square: paste the image centred on a square of side max(W, H), offset (W-H)//2 or
     (H-W)//2, filled with int(mean * 255) per channel = (122, 116, 104) for CLIP's mean;
  2. CLIPImageProcessor: resize the shortest edge to R with PIL's antialiased bicubic, centre-crop
     R x R (a no-op after padding), rescale by 1/255, normalize with the CLIP mean/std.
"native": keep the aspect ratio; resize (PIL bicubic) straight to W' x H', both multiples of the
  tower's total stride (64) and W' * H' <= R * R, so the token count never exceeds the square one.
  The network is fully convolutional, but the released models never trained on such shapes.
"crop": CLIPImageProcessor alone (LLaVA-Mini: image_aspect_ratio "square"): resize the shortest
  edge to R keeping the aspect ratio, then centre-crop R x R.

Only numpy and Pillow: PIL's bicubic is the one the model saw; other libraries' bicubic differs.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from .errors import ConfigError, ImageError, unknown_choice
from .image import MAX_IMAGE_PIXELS

Aspect = Literal["pad", "native", "crop"]
ASPECTS = ("pad", "native", "crop")

# openai/CLIP's normalization, what every ConvLLaVA preprocessor_config.json carries.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOTAL_STRIDE = 64  # patch 4 x four 2x downsamplings (stages 2-5) = 64 pixels per token side
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the `resample` value in preprocessor configs
RESAMPLE_FILTERS = tuple(int(f) for f in Image.Resampling)  # NEAREST 0, LANCZOS 1, BILINEAR 2, BICUBIC 3, BOX 4, HAMMING 5
# Largest image_size / crop side / stride a config may set. ConvLLaVA's largest tower is 1536 and
# LLaVA-Mini's CLIP 336; 4096 leaves room for larger towers while bounding what a manifest can make
# us allocate: pixel_values of 3 x 4096 x 4096 float32 = 192 MiB.
MAX_IMAGE_SIDE = 4096
# Normalized pixels are (x * rescale - mean) / std with |x * rescale - mean| <= 256 (x <= 255,
# rescale <= 1, 0 <= mean <= 1); a std of at least 1e-30 keeps them under 2.6e32, finite in float32.
MIN_STD = 1e-30
PREPROCESS_KEYS = ("image_size", "crop_size", "image_mean", "image_std", "rescale_factor", "resample", "stride")


@dataclass(frozen=True)
class PreprocessConfig:
    """What the tower's preprocessor_config.json says, reduced to what is used."""

    image_size: int  # R: shortest edge after resize and side of the centre crop (768/1024/1536)
    crop_size: tuple[int, int]  # (height, width) of the centre crop, (R, R) in released configs
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    rescale_factor: float = 1 / 255
    resample: int = PIL_BICUBIC
    stride: int = TOTAL_STRIDE  # output H and W must be multiples of this
    aspect: Aspect = "pad"  # the bundle's default mode (ConvLLaVA's training: pad; LLaVA-Mini's: crop)

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Fill colour of expand2square: int(x * 255) truncates, (122, 116, 104) for CLIP."""
        return tuple(int(m * 255) for m in self.image_mean)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], stride: int = TOTAL_STRIDE) -> "PreprocessConfig":
        """Read a CLIPImageProcessor preprocessor_config.json (old int or new dict size forms)."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"preprocessor config must be a JSON object, got {type(cfg).__name__}")
        size = cfg.get("size", {"shortest_edge": 224})
        if isinstance(size, dict):
            if "shortest_edge" in size:
                edge = _integer("preprocessor size shortest_edge", size["shortest_edge"])
            elif "height" in size and size.get("height") == size.get("width"):
                edge = _integer("preprocessor size height", size["height"])
            else:
                raise ConfigError(f"preprocessor size {size!r}: expected shortest_edge or a square height/width")
        else:
            edge = _integer("preprocessor size", size)
        crop = cfg.get("crop_size", edge)
        if isinstance(crop, dict):
            if "height" not in crop or "width" not in crop:
                raise ConfigError(f"preprocessor crop_size {crop!r}: expected height and width")
            crop_hw = (_integer("preprocessor crop height", crop["height"]),
                       _integer("preprocessor crop width", crop["width"]))
        else:
            crop_hw = (_integer("preprocessor crop_size", crop),) * 2
        if not cfg.get("do_center_crop", True):
            crop_hw = (edge, edge)
        if not cfg.get("do_resize", True):
            raise ConfigError("preprocessor config has do_resize false: unsupported (the tower needs a fixed size)")
        resample = _integer("preprocessor resample", cfg.get("resample", PIL_BICUBIC))
        normalize = cfg.get("do_normalize", True)
        mean = _triple("preprocessor image_mean", cfg.get("image_mean", CLIP_MEAN)) if normalize else (0.0,) * 3
        std = _triple("preprocessor image_std", cfg.get("image_std", CLIP_STD)) if normalize else (1.0,) * 3
        factor = (_number("preprocessor rescale_factor", cfg.get("rescale_factor", 1 / 255))
                  if cfg.get("do_rescale", True) else 1.0)
        out = cls(image_size=edge, crop_size=crop_hw, image_mean=mean, image_std=std,
                  rescale_factor=factor, resample=resample, stride=stride)
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size, "crop_size": list(self.crop_size),
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor, "resample": self.resample, "stride": self.stride,
            "aspect": self.aspect,
        }

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> "PreprocessConfig":
        """The manifest's ``preprocess`` object (what to_dict wrote); ConfigError naming any bad value."""
        if not isinstance(d, dict):
            raise ConfigError(f"manifest preprocess must be a JSON object, got {type(d).__name__}")
        missing = [k for k in PREPROCESS_KEYS if k not in d]
        if missing:
            raise ConfigError(f"manifest preprocess lacks {', '.join(missing)}")
        crop = d["crop_size"]
        if not isinstance(crop, (list, tuple)) or len(crop) != 2:
            raise ConfigError(f"manifest preprocess crop_size must be [height, width], got {crop!r}")
        out = cls(image_size=_integer("manifest preprocess image_size", d["image_size"]),
                  crop_size=(_integer("manifest preprocess crop height", crop[0]),
                             _integer("manifest preprocess crop width", crop[1])),
                  image_mean=_triple("manifest preprocess image_mean", d["image_mean"]),
                  image_std=_triple("manifest preprocess image_std", d["image_std"]),
                  rescale_factor=_number("manifest preprocess rescale_factor", d["rescale_factor"]),
                  resample=_integer("manifest preprocess resample", d["resample"]),
                  stride=_integer("manifest preprocess stride", d["stride"]),
                  aspect=d.get("aspect", "pad"))  # older manifests name none: pad, as ConvLLaVA trained
        out.validate()
        return out

    def validate(self) -> None:
        """ConfigError unless every size is an integer in 1..MAX_IMAGE_SIDE and every value is usable."""
        for name, value in (("stride", self.stride), ("image_size", self.image_size)):
            _check_int(f"preprocessor {name}", value)
            if not 0 < value <= MAX_IMAGE_SIDE:
                raise ConfigError(f"preprocessor {name} must be in 1..{MAX_IMAGE_SIDE}, got {value}")
        if not isinstance(self.crop_size, tuple) or len(self.crop_size) != 2:
            raise ConfigError(f"preprocessor crop_size must be (height, width), got {self.crop_size!r}")
        for name, value in (("crop height", self.crop_size[0]), ("crop width", self.crop_size[1])):
            _check_int(f"preprocessor {name}", value)
            if value <= 0 or value % self.stride:
                raise ConfigError(f"preprocessor {name} {value} is not a positive multiple of the stride {self.stride}")
            if value > MAX_IMAGE_SIDE:
                raise ConfigError(f"preprocessor {name} must be at most {MAX_IMAGE_SIDE}, got {value}")
        mean = _triple("preprocessor image_mean", self.image_mean)
        std = _triple("preprocessor image_std", self.image_std)
        if not all(0.0 <= m <= 1.0 for m in mean):  # a fraction of full scale: the pad fill is int(mean * 255)
            raise ConfigError(f"preprocessor image_mean must be 3 values in 0..1, got {self.image_mean}")
        if not all(s >= MIN_STD for s in std):
            raise ConfigError(f"preprocessor mean/std must be 3 values with std >= {MIN_STD}, got "
                              f"{self.image_mean}/{self.image_std}")
        factor = _number("preprocessor rescale_factor", self.rescale_factor)
        if not 0.0 < factor <= 1.0:
            raise ConfigError(f"preprocessor rescale_factor must be in (0, 1], got {self.rescale_factor}")
        if isinstance(self.resample, bool) or self.resample not in RESAMPLE_FILTERS:
            raise unknown_choice("preprocessor resample filter", self.resample, RESAMPLE_FILTERS)
        if not isinstance(self.aspect, str) or self.aspect not in ASPECTS:
            raise unknown_choice("preprocess aspect", self.aspect, ASPECTS)


def _integer(what: str, value: Any) -> int:
    """``value`` read from JSON as an int: integers, and floats with an integral value (some writers emit 336.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    _check_int(what, value)
    return int(value)


def _check_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):  # True is an int to Python, not a size
        raise ConfigError(f"{what} must be an integer, got {value!r}")


def _number(what: str, value: Any) -> float:
    try:
        number = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer too large for a float
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"{what} must be a finite number, got {value!r}")
    return number


def _triple(what: str, value: Any) -> tuple[float, float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 3:
        raise ConfigError(f"{what} must be 3 numbers, got {value!r}")
    return tuple(_number(what, x) for x in value)


def expand2square(image: Image.Image, fill: tuple[int, int, int]) -> Image.Image:
    """Centre ``image`` on a square canvas of side max(W, H) (official llava/mm_utils.py)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), fill)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def native_size(width: int, height: int, budget: int, stride: int) -> tuple[int, int]:
    """(W', H'): multiples of ``stride``, aspect close to W:H, W' * H' <= budget pixels."""
    scale = math.sqrt(budget / (width * height))
    w = max(stride, round(width * scale / stride) * stride)
    h = max(stride, round(height * scale / stride) * stride)
    while w * h > budget:  # rounding up may overshoot: shrink the side that gained most
        if (w > stride and w / (width * scale) >= h / (height * scale)) or h == stride:
            w -= stride
        else:
            h -= stride
    return w, h


def preprocess(image: Image.Image, config: PreprocessConfig, aspect: Aspect = "pad") -> np.ndarray:
    """RGB image -> float32 pixel_values [1, 3, H, W] for the vision graph."""
    if aspect not in ASPECTS:
        raise unknown_choice("aspect mode", aspect, ASPECTS)
    if image.mode != "RGB":
        raise ConfigError(f"preprocess expects an RGB image, got mode {image.mode!r} (use image.open_image)")
    check_size(image.size, config, aspect)
    if aspect == "pad":
        square = expand2square(image, config.pad_color)
        edge = config.image_size
        resized = square.resize((edge, edge), resample=config.resample)
        pixels = _center_crop(np.asarray(resized), config.crop_size)
    elif aspect == "crop":
        width, height = shortest_edge_size(image.size, config.image_size)
        pixels = _center_crop(np.asarray(image.resize((width, height), resample=config.resample)), config.crop_size)
    else:
        h, w = config.crop_size
        size = native_size(image.width, image.height, budget=h * w, stride=config.stride)
        pixels = np.asarray(image.resize(size, resample=config.resample))
    return normalize(pixels, config)[None]


def check_size(size: tuple[int, int], config: PreprocessConfig, aspect: Aspect = "pad") -> None:
    """ImageError for a (width, height) that ``preprocess`` would refuse: known from the header alone, so
    ``image.open_image(..., fits=size_check(...))`` refuses it before decoding a pixel."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ImageError(f"image is {width}x{height}: no pixels")
    if aspect == "pad":
        side = max(size)
        if width != height and side * side > MAX_IMAGE_PIXELS:
            # expand2square allocates the whole canvas: a 60000x1 strip would be 60000x60000 (14 GB)
            raise ImageError(f"image is {width}x{height}: padding it to a square makes {side}x{side} = "
                             f"{side * side:,} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed "
                             "(crop or downscale it, or use --aspect native)")
    elif aspect == "crop":
        w, h = shortest_edge_size(size, config.image_size)
        if w * h > MAX_IMAGE_PIXELS:  # the resize allocates all of it before the crop
            raise ImageError(f"image is {width}x{height}: resizing its shortest edge to {config.image_size} "
                             f"makes {w}x{h} = {w * h:,} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed "
                             "(crop or downscale it first)")


def size_check(config: PreprocessConfig, aspect: Aspect = "pad"):
    """``check_size`` as image.open_image's ``fits``: its message names the image."""
    if aspect not in ASPECTS:
        raise unknown_choice("aspect mode", aspect, ASPECTS)

    def fits(name: str, size: tuple[int, int]) -> None:
        try:
            check_size(size, config, aspect)
        except ImageError as e:
            raise ImageError(f"{name}: {e}") from None
    return fits


def shortest_edge_size(size: tuple[int, int], edge: int) -> tuple[int, int]:
    """(W, H) with the shorter side = ``edge`` and the longer scaled (transformers: int(edge * long / short))."""
    width, height = size
    short, long = min(width, height), max(width, height)
    long_new = int(edge * long / short)
    return (edge, long_new) if width <= height else (long_new, edge)


def normalize(pixels: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 [H, W, 3] -> float32 [3, H, W]: rescale, then (x - mean) / std.

    Same arithmetic as transformers (rescale in float64, round to float32, normalize in float32),
    so the pixels match CLIPImageProcessor bit for bit rather than to within float noise.
    """
    x = (pixels.astype(np.float64) * config.rescale_factor).astype(np.float32)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    return np.ascontiguousarray(((x - mean) / std).transpose(2, 0, 1))


def _center_crop(pixels: np.ndarray, crop_hw: tuple[int, int]) -> np.ndarray:
    """Centre crop of an [H, W, C] array; transformers' offsets: (H - h) // 2, (W - w) // 2."""
    height, width = pixels.shape[:2]
    ch, cw = crop_hw
    if ch > height or cw > width:
        raise ConfigError(f"crop {ch}x{cw} is larger than the resized image {height}x{width}")
    top, left = (height - ch) // 2, (width - cw) // 2
    return pixels[top:top + ch, left:left + cw]
