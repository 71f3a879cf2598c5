"""Checkpoint configs, read from config.json without transformers' AutoConfig.

A ConvLLaVA config.json says ``model_type: "llava"``, which AutoConfig maps to a different class
(transformers' own LlavaForConditionalGeneration), so the keys are read here by hand.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

CONVLLAVA_MODEL_TYPES = ("llava", "llava_llama")
LLAVA_MINI_MODEL_TYPES = ("llava_mini_llama",)
MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")  # LLaVA's projector family: mlp2x_gelu = Linear, GELU, Linear


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _get(cfg: dict[str, Any], key: str, path: Path, kind=int, default: Any = ...):
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise CheckpointError(f"{path}: missing key {key!r}")
        return default
    try:
        return kind(cfg[key])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: key {key!r} = {cfg[key]!r} is not a valid {kind.__name__}") from e


@dataclass(frozen=True)
class LlmConfig:
    """The Llama part of the config (HF LlamaConfig keys)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    rms_norm_eps: float
    rope_theta: float
    vocab_size: int
    tie_word_embeddings: bool
    bos_token_id: int | None
    eos_token_id: int | list[int] | None
    pad_token_id: int | None
    head_dim: int
    rope_scaling: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], path: Path) -> "LlmConfig":
        heads = _get(cfg, "num_attention_heads", path)
        hidden = _get(cfg, "hidden_size", path)
        out = cls(
            hidden_size=hidden,
            intermediate_size=_get(cfg, "intermediate_size", path),
            num_hidden_layers=_get(cfg, "num_hidden_layers", path),
            num_attention_heads=heads,
            num_key_value_heads=_get(cfg, "num_key_value_heads", path, default=heads),
            max_position_embeddings=_get(cfg, "max_position_embeddings", path, default=2048),
            rms_norm_eps=_get(cfg, "rms_norm_eps", path, kind=float, default=1e-6),
            rope_theta=_get(cfg, "rope_theta", path, kind=float, default=10000.0),
            vocab_size=_get(cfg, "vocab_size", path),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=cfg.get("eos_token_id"),
            pad_token_id=cfg.get("pad_token_id"),
            head_dim=_get(cfg, "head_dim", path, default=hidden // heads if heads else 0),
            rope_scaling=cfg.get("rope_scaling") or None,
        )
        if out.num_attention_heads % out.num_key_value_heads:
            raise CheckpointError(f"{path}: num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {out.num_key_value_heads}")
        return out


@dataclass(frozen=True)
class MultimodalConfig:
    """The LLaVA keys that decide how images reach the LLM."""

    vision_tower: str  # mm_vision_tower: a hub id in released configs
    mm_hidden_size: int  # width of the tower's features (3072 for the 5-stage ConvNeXt)
    projector_type: str
    select_layer: int
    select_feature: str
    image_aspect_ratio: str
    use_im_start_end: bool
    use_im_patch_token: bool
    max_length: int  # tokenizer_model_max_length: the official code truncates sequences here
    vision_resolution: int | None  # mm_vision_resolution, when the config carries it

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], path: Path) -> "MultimodalConfig":
        return cls(
            vision_tower=str(cfg.get("mm_vision_tower") or cfg.get("vision_tower") or ""),
            mm_hidden_size=_get(cfg, "mm_hidden_size", path),
            projector_type=str(cfg.get("mm_projector_type", "linear")),
            select_layer=_get(cfg, "mm_vision_select_layer", path, default=-1),
            select_feature=str(cfg.get("mm_vision_select_feature", "patch")),
            image_aspect_ratio=str(cfg.get("image_aspect_ratio", "square")),
            use_im_start_end=bool(cfg.get("mm_use_im_start_end", False)),
            use_im_patch_token=bool(cfg.get("mm_use_im_patch_token", False)),
            max_length=_get(cfg, "tokenizer_model_max_length", path, default=2048),
            vision_resolution=_get(cfg, "mm_vision_resolution", path, default=None),
        )

    def check_supported(self, path: Path) -> None:
        """Refuse configurations whose data flow the exporter does not reproduce."""
        if not (self.projector_type in ("linear", "identity") or MLP_GELU.match(self.projector_type)):
            raise CheckpointError(f"{path}: unknown mm_projector_type {self.projector_type!r} "
                                  "(known: linear, identity, mlpNx_gelu such as mlp2x_gelu)")
        if self.select_layer != -1:
            raise CheckpointError(f"{path}: mm_vision_select_layer {self.select_layer} is not supported "
                                  "(ConvLLaVA uses -1, the last stage's output)")
        if self.select_feature != "patch":
            raise CheckpointError(f"{path}: mm_vision_select_feature {self.select_feature!r} is not supported "
                                  "(a ConvNeXt has no CLS token; expected 'patch')")
        if self.use_im_start_end:
            raise CheckpointError(f"{path}: mm_use_im_start_end true is not supported (ConvLLaVA uses false)")


@dataclass(frozen=True)
class LlavaConfig:
    """A ConvLLaVA checkpoint's config.json."""

    path: Path
    model_type: str
    llm: LlmConfig
    mm: MultimodalConfig
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def load(cls, folder: Path) -> "LlavaConfig":
        path = Path(folder) / "config.json"
        cfg = read_json(path)
        model_type = str(cfg.get("model_type", ""))
        if model_type in LLAVA_MINI_MODEL_TYPES:
            raise CheckpointError(f"{path}: model_type {model_type!r} is a LLaVA-Mini checkpoint, not ConvLLaVA")
        if model_type not in CONVLLAVA_MODEL_TYPES:
            raise CheckpointError(f"{path}: model_type {model_type!r} is not a ConvLLaVA checkpoint "
                                  f"(expected one of {', '.join(CONVLLAVA_MODEL_TYPES)})")
        mm = MultimodalConfig.from_dict(cfg, path)
        mm.check_supported(path)
        return cls(path=path, model_type=model_type, llm=LlmConfig.from_dict(cfg, path), mm=mm, raw=cfg)


@dataclass(frozen=True)
class TowerConfig:
    """A ConvNeXt tower (HF ConvNextConfig keys); ConvLLaVA's has 5 stages."""

    depths: tuple[int, ...]
    hidden_sizes: tuple[int, ...]
    patch_size: int = 4
    num_channels: int = 3
    image_size: int | None = None
    hidden_act: str = "gelu"

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def stride(self) -> int:
        """Pixels per output token side: the patch stem, then a 2x downsampling per later stage."""
        return self.patch_size * 2 ** (self.num_stages - 1)

    @property
    def out_channels(self) -> int:
        return self.hidden_sizes[-1]

    @classmethod
    def load(cls, folder: Path) -> "TowerConfig":
        path = Path(folder) / "config.json"
        cfg = read_json(path)
        if cfg.get("model_type", "convnext") != "convnext":
            raise CheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not a ConvNeXt tower")
        depths = tuple(int(d) for d in cfg.get("depths", ()))
        sizes = tuple(int(h) for h in cfg.get("hidden_sizes", ()))
        if not depths or len(depths) != len(sizes):
            raise CheckpointError(f"{path}: depths {list(depths)} and hidden_sizes {list(sizes)} must be "
                                  "non-empty and of equal length")
        if "num_stages" in cfg and int(cfg["num_stages"]) != len(depths):
            raise CheckpointError(f"{path}: num_stages {cfg['num_stages']} but {len(depths)} depths")
        act = str(cfg.get("hidden_act", "gelu"))
        if act != "gelu":
            raise CheckpointError(f"{path}: hidden_act {act!r} is not supported (expected 'gelu')")
        size = cfg.get("image_size")
        return cls(depths=depths, hidden_sizes=sizes, patch_size=_get(cfg, "patch_size", path, default=4),
                   num_channels=_get(cfg, "num_channels", path, default=3),
                   image_size=int(size) if isinstance(size, int) else None, hidden_act=act)

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json a ConvNextModel of this shape would carry."""
        return {
            "model_type": "convnext", "architectures": ["ConvNextModel"], "num_stages": self.num_stages,
            "depths": list(self.depths), "hidden_sizes": list(self.hidden_sizes), "patch_size": self.patch_size,
            "num_channels": self.num_channels, "hidden_act": self.hidden_act, "layer_norm_eps": 1e-12,
            "layer_scale_init_value": 1e-6, "drop_path_rate": 0.0, "image_size": self.image_size or 224,
        }
