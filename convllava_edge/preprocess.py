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
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from PIL import Image

from .errors import ConfigError, unknown_choice

Aspect = Literal["pad", "native", "crop"]
ASPECTS = ("pad", "native", "crop")

# openai/CLIP's normalization, what every ConvLLaVA preprocessor_config.json carries.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
TOTAL_STRIDE = 64  # patch 4 x four 2x downsamplings (stages 2-5) = 64 pixels per token side
PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, the `resample` value in preprocessor configs


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

    @property
    def pad_color(self) -> tuple[int, int, int]:
        """Fill colour of expand2square: int(x * 255) truncates, (122, 116, 104) for CLIP."""
        return tuple(int(m * 255) for m in self.image_mean)

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], stride: int = TOTAL_STRIDE) -> "PreprocessConfig":
        """Read a CLIPImageProcessor preprocessor_config.json (old int or new dict size forms)."""
        size = cfg.get("size", {"shortest_edge": 224})
        if isinstance(size, dict):
            if "shortest_edge" in size:
                edge = int(size["shortest_edge"])
            elif "height" in size and size.get("height") == size.get("width"):
                edge = int(size["height"])
            else:
                raise ConfigError(f"preprocessor size {size!r}: expected shortest_edge or a square height/width")
        else:
            edge = int(size)
        crop = cfg.get("crop_size", edge)
        crop_hw = (int(crop["height"]), int(crop["width"])) if isinstance(crop, dict) else (int(crop), int(crop))
        if not cfg.get("do_center_crop", True):
            crop_hw = (edge, edge)
        if not cfg.get("do_resize", True):
            raise ConfigError("preprocessor config has do_resize false: unsupported (the tower needs a fixed size)")
        resample = int(cfg.get("resample", PIL_BICUBIC))
        mean = tuple(float(x) for x in cfg.get("image_mean", CLIP_MEAN)) if cfg.get("do_normalize", True) else (0.0,) * 3
        std = tuple(float(x) for x in cfg.get("image_std", CLIP_STD)) if cfg.get("do_normalize", True) else (1.0,) * 3
        factor = float(cfg.get("rescale_factor", 1 / 255)) if cfg.get("do_rescale", True) else 1.0
        out = cls(image_size=edge, crop_size=crop_hw, image_mean=mean, image_std=std,
                  rescale_factor=factor, resample=resample, stride=stride)
        out.validate()
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size, "crop_size": list(self.crop_size),
            "image_mean": list(self.image_mean), "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor, "resample": self.resample, "stride": self.stride,
        }

    @classmethod
    def from_manifest(cls, d: dict[str, Any]) -> "PreprocessConfig":
        out = cls(image_size=int(d["image_size"]), crop_size=tuple(d["crop_size"]),
                  image_mean=tuple(d["image_mean"]), image_std=tuple(d["image_std"]),
                  rescale_factor=float(d["rescale_factor"]), resample=int(d["resample"]),
                  stride=int(d["stride"]))
        out.validate()
        return out

    def validate(self) -> None:
        h, w = self.crop_size
        for name, value in (("crop height", h), ("crop width", w)):
            if value <= 0 or value % self.stride:
                raise ConfigError(f"preprocessor {name} {value} is not a positive multiple of the stride {self.stride}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ConfigError(f"preprocessor mean/std must be 3 values with std > 0, got {self.image_mean}/{self.image_std}")


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
    if aspect == "pad":
        square = expand2square(image, config.pad_color)
        edge = config.image_size
        resized = square.resize((edge, edge), resample=config.resample)
        pixels = _center_crop(np.asarray(resized), config.crop_size)
    elif aspect == "crop":
        pixels = _center_crop(np.asarray(image.resize(shortest_edge_size(image.size, config.image_size),
                                                      resample=config.resample)), config.crop_size)
    else:
        h, w = config.crop_size
        size = native_size(image.width, image.height, budget=h * w, stride=config.stride)
        pixels = np.asarray(image.resize(size, resample=config.resample))
    return normalize(pixels, config)[None]


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
