"""Checkpoint configs, read from config.json without transformers' AutoConfig.

A ConvLLaVA config.json says ``model_type: "llava"``, which AutoConfig maps to a different class
(transformers' own LlavaForConditionalGeneration), so the keys are read here by hand.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

CONVLLAVA_MODEL_TYPES = ("llava", "llava_llama")
LLAVA_MINI_MODEL_TYPES = ("llava_mini_llama",)
MLP_GELU = re.compile(r"^mlp(\d+)x_gelu$")  # LLaVA's projector family: mlp2x_gelu = Linear, GELU, Linear

# Sane maxima for config values, checked before anything is built or handed to llama.cpp (which
# aborts the whole process on some bad values). Each sits far above every released model, yet low
# enough that a typo or a hostile file cannot make us allocate absurd tables.
# Llama-3.1-405B, the largest Llama: 126 layers, hidden 16384, ffn 53248, 128 heads, 131072 positions.
MAX_LAYERS = 1024  # 8x 126
MAX_HIDDEN = 65536  # 4x 16384
MAX_INTERMEDIATE = 1 << 20  # = 1048576, ~20x 53248
MAX_VOCAB = 1 << 24  # = 16777216; Llama-3: 128256
MAX_POSITIONS = 1 << 24  # = 16777216; Llama-3.1: 131072
MAX_RMS_NORM_EPS = 1.0  # exclusive; released: 1e-5 / 1e-6; an eps near 1 drowns the activations' variance
# Vision towers: ConvLLaVA's largest resolution is 1536 px, CLIP ViT-L/14-336 the LLaVA-Mini one.
MAX_IMAGE_SIDE = 16384  # ~10x 1536
MAX_TOWER_STAGES = 8  # ConvLLaVA: 5 (stride 4 * 2**4 = 64); each stage halves the grid
MAX_PATCH = 64  # ConvNeXt stem: 4, CLIP ViT-L/14: 14
MAX_COMPRESSOR_SIDE = 64  # LLaVA-Mini's C (C*C compressed tokens): released 1


def read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: file not found") from e
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{path}: not UTF-8 text (byte {e.start})") from e
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read: {e.strerror or e}") from e
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
    except RecursionError as e:  # json's parser recurses per nesting level: '[[[[...' thousands deep
        raise CheckpointError(f"{path}: not valid JSON (nested too deeply)") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def get_value(cfg: dict[str, Any], key: str, path: Path, kind=int, default: Any = ...):
    """cfg[key] as ``kind`` (int: a JSON integer, float: a JSON number), or ``default`` when absent or null."""
    if key not in cfg or cfg[key] is None:
        if default is ...:
            raise CheckpointError(f"{path}: missing key {key!r}")
        return default
    value = cfg[key]
    if kind is int:
        return _as_int(value, key, path)
    if kind is float:
        return _as_float(value, key, path)
    try:
        return kind(value)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: key {key!r} = {value!r} is not a valid {kind.__name__}") from e


def _as_int(value: Any, key: str, path: Path) -> int:
    """JSON integers (and integral floats such as 4096.0); not booleans, strings or 4096.5."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not value.is_integer()):  # is_integer() is False for nan and inf
        raise CheckpointError(f"{path}: key {key!r} = {value!r} is not an integer")
    return int(value)


def _as_float(value: Any, key: str, path: Path) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise CheckpointError(f"{path}: key {key!r} = {value!r} is not a number")
    try:
        return float(value)
    except OverflowError as e:  # a JSON integer beyond float range: 1 followed by 400 zeros
        raise CheckpointError(f"{path}: key {key!r} = {value!r} is not a finite number") from e


def check_int(path: Path | str, key: str, value: int, lo: int, hi: int) -> int:
    if not lo <= value <= hi:
        raise CheckpointError(f"{path}: key {key!r} = {value!r}, expected an integer in {lo}..{hi}")
    return value


def _check_positive_float(path: Path | str, key: str, value: float, below: float = math.inf) -> float:
    if not (math.isfinite(value) and 0 < value < below):  # False for nan, which fails every comparison
        bound = f"0 < {key} < {below:g}" if math.isfinite(below) else f"{key} > 0"
        raise CheckpointError(f"{path}: key {key!r} = {value!r}, expected a finite number with {bound}")
    return value


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
        """Read and validate: every value llama.cpp or the converter relies on is checked here, by name."""
        def count(key: str, hi: int, default: Any = ...) -> int:
            return check_int(path, key, get_value(cfg, key, path, default=default), 1, hi)

        hidden = count("hidden_size", MAX_HIDDEN)
        heads = count("num_attention_heads", MAX_HIDDEN)
        kv_heads = count("num_key_value_heads", MAX_HIDDEN, default=heads)
        if "head_dim" in cfg and cfg["head_dim"] is not None:
            # An explicit head_dim may differ from hidden / heads: the GGUF then carries key/value lengths.
            head_dim = count("head_dim", MAX_HIDDEN)
        else:
            if hidden % heads:  # hidden // heads would silently drop the remainder
                raise CheckpointError(f"{path}: hidden_size {hidden} is not a multiple of "
                                      f"num_attention_heads {heads}")
            head_dim = hidden // heads
        if heads % kv_heads:
            raise CheckpointError(f"{path}: num_attention_heads {heads} is not a multiple of "
                                  f"num_key_value_heads {kv_heads}")
        if head_dim % 2:  # rotary embeddings rotate pairs of dimensions
            raise CheckpointError(f"{path}: head dimension {head_dim} is odd (rotary embeddings need an even one)")
        vocab = count("vocab_size", MAX_VOCAB)
        return cls(
            hidden_size=hidden,
            intermediate_size=count("intermediate_size", MAX_INTERMEDIATE),
            num_hidden_layers=count("num_hidden_layers", MAX_LAYERS),
            num_attention_heads=heads,
            num_key_value_heads=kv_heads,
            max_position_embeddings=count("max_position_embeddings", MAX_POSITIONS, default=2048),
            # llama.cpp aborts the process (SIGABRT) on a GGUF whose epsilon is <= 0 or not finite.
            rms_norm_eps=_check_positive_float(path, "rms_norm_eps",
                                               get_value(cfg, "rms_norm_eps", path, kind=float, default=1e-6),
                                               below=MAX_RMS_NORM_EPS),
            rope_theta=_check_positive_float(path, "rope_theta",
                                             get_value(cfg, "rope_theta", path, kind=float, default=10000.0)),
            vocab_size=vocab,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            bos_token_id=_token_id(cfg, "bos_token_id", vocab, path),
            eos_token_id=_token_id(cfg, "eos_token_id", vocab, path, many=True),
            pad_token_id=_token_id(cfg, "pad_token_id", vocab, path),
            head_dim=head_dim,
            rope_scaling=_rope_scaling(cfg.get("rope_scaling") or None, path),
        )


def _token_id(cfg: dict[str, Any], key: str, vocab: int, path: Path, many: bool = False) -> Any:
    """A special token id (or, with ``many``, a list of them, as Llama-3's eos_token_id) inside the vocabulary."""
    value = cfg.get(key)
    if value is None:
        return None
    ids = value if many and isinstance(value, list) else [value]
    for token in ids:
        check_int(path, key, _as_int(token, key, path), 0, vocab - 1)
    return [int(t) for t in ids] if isinstance(value, list) else int(value)


# The keys each rope_scaling type's converter reads (gguf_convert: _add_rope_scaling, llama3_rope_factors).
_ROPE_SCALING_KEYS = {"linear": ("factor",),
                      "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")}


def _rope_scaling(scaling: Any, path: Path) -> dict[str, Any] | None:
    if scaling is None:
        return None
    if not isinstance(scaling, dict):
        raise CheckpointError(f"{path}: key 'rope_scaling' = {scaling!r} is not an object")
    kind = scaling.get("rope_type", scaling.get("type"))
    for key in _ROPE_SCALING_KEYS.get(kind, ()):
        if key not in scaling:
            raise CheckpointError(f"{path}: rope_scaling of type {kind!r} has no {key!r}")
        _check_positive_float(path, f"rope_scaling.{key}", _as_float(scaling[key], f"rope_scaling.{key}", path))
    if kind == "llama3" and not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        # transformers and llama3_rope_factors blend over 1 / (high - low)
        raise CheckpointError(f"{path}: rope_scaling high_freq_factor {scaling['high_freq_factor']} must exceed "
                              f"low_freq_factor {scaling['low_freq_factor']}")
    return scaling


def _optional_int(cfg: dict[str, Any], key: str, path: Path, lo: int, hi: int) -> int | None:
    value = get_value(cfg, key, path, default=None)
    return None if value is None else check_int(path, key, value, lo, hi)


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
            mm_hidden_size=check_int(path, "mm_hidden_size", get_value(cfg, "mm_hidden_size", path), 1, MAX_HIDDEN),
            projector_type=str(cfg.get("mm_projector_type", "linear")),
            select_layer=get_value(cfg, "mm_vision_select_layer", path, default=-1),
            select_feature=str(cfg.get("mm_vision_select_feature", "patch")),
            image_aspect_ratio=str(cfg.get("image_aspect_ratio", "square")),
            use_im_start_end=bool(cfg.get("mm_use_im_start_end", False)),
            use_im_patch_token=bool(cfg.get("mm_use_im_patch_token", False)),
            # No upper bound: the GGUF's context is min(max_position_embeddings, this), and tokenizers
            # write 1e30 for "no limit".
            max_length=check_int(path, "tokenizer_model_max_length",
                                  get_value(cfg, "tokenizer_model_max_length", path, default=2048), 1, 10 ** 30),
            vision_resolution=_optional_int(cfg, "mm_vision_resolution", path, 1, MAX_IMAGE_SIDE),
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
        if model_type not in CONVLLAVA_MODEL_TYPES:
            raise CheckpointError(f"{path}: model_type {model_type!r} is not a ConvLLaVA checkpoint "
                                  f"(expected one of {', '.join(CONVLLAVA_MODEL_TYPES)})")
        mm = MultimodalConfig.from_dict(cfg, path)
        mm.check_supported(path)
        return cls(path=path, model_type=model_type, llm=LlmConfig.from_dict(cfg, path), mm=mm, raw=cfg)
