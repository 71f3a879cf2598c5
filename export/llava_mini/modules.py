"""LLaVA-Mini's vision side in PyTorch: CLIP, compressor, pre-fusion; loaded key by key.

Follows the official inference code (ictnlp/LLaVA-Mini 47da113, llavamini/model/llavamini_arch.py),
which differs from the paper; shared/reference/llava-mini-format.md lists the details relied on:
- CLIP ViT-L/14-336, ``hidden_states[-2]`` (the penultimate layer), CLS dropped -> [576, 1024];
- compressor (the code's ``Resampler``): C*C learned queries, LayerNorms on queries and on the CLIP
  features, ``nn.MultiheadAttention(width, 8 heads)`` whose keys carry the 2D sin-cos position
  embedding bicubically resized to the feature grid, no FFN, no residual; then the projector;
- pre-fusion: fresh Llama decoder layers over [global tokens | compressed | prompt embeddings],
  causal, every prompt id <= 0 masked as a key (the image placeholder, and a real token 0 too),
  positions = cumsum(unmasked) - 1 with masked positions set to 1, no final norm. Masked text rows
  keep their plain embeddings.
Three modules, three ONNX graphs: ``ClipFeatures``, ``Compress`` and ``PreFusion``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

from ...errors import CheckpointError
from ...preprocess import CLIP_MEAN, CLIP_STD
from ..checkpoint import TensorStore, check_shape
from ..config import (LLAVA_MINI_MODEL_TYPES, MAX_COMPRESSOR_SIDE, MAX_HIDDEN, MAX_IMAGE_SIDE, MAX_INTERMEDIATE,
                     MAX_LAYERS, MAX_PATCH, LlmConfig, MultimodalConfig, check_int, get_value, read_json)
from ..projector import build_projector

TOWER_PREFIX = "model.vision_tower.vision_tower."  # + "vision_model.*" (CLIPVisionModel names)
COMPRESSOR_PREFIX = "model.compressor."
PREFUSION_PREFIX = "model.prefusion_layers."
PROJECTOR_PREFIX = "model.mm_projector."
NOT_LLM_PREFIXES = ("model.vision_tower.", "model.mm_projector.", COMPRESSOR_PREFIX, PREFUSION_PREFIX)
COMPRESSOR_HEADS = 8  # hard-coded in the official Resampler construction
MASK_VALUE = -30000.0  # additive attention mask: exp() underflows to 0 in fp32 and fp16 alike, no -inf/NaN


@dataclass(frozen=True)
class LlavaMiniConfig:
    path: Path
    llm: LlmConfig
    mm: MultimodalConfig
    compressor_size: int  # C: C*C compressed tokens per image (released: 1)
    prefusion_layer_num: int
    resolution_ratio: int
    raw: dict[str, Any] = field(repr=False, compare=False)

    @classmethod
    def load(cls, folder: Path) -> "LlavaMiniConfig":
        path = Path(folder) / "config.json"
        cfg = read_json(path)
        if cfg.get("model_type") not in LLAVA_MINI_MODEL_TYPES:
            raise CheckpointError(f"{path}: model_type {cfg.get('model_type')!r} is not LLaVA-Mini")
        mm = MultimodalConfig.from_dict({"mm_vision_select_layer": -2, **cfg}, path)
        if mm.select_layer != -2 or mm.select_feature != "patch":
            raise CheckpointError(f"{path}: LLaVA-Mini uses mm_vision_select_layer -2 and 'patch' features, "
                                  f"got {mm.select_layer} and {mm.select_feature!r}")
        if mm.projector_type != "mlp2x_gelu" and not mm.projector_type.startswith("mlp"):
            raise CheckpointError(f"{path}: unknown mm_projector_type {mm.projector_type!r}")
        ratio = get_value(cfg, "resolution_ratio", path, default=1)
        if ratio != 1:
            raise CheckpointError(f"{path}: resolution_ratio {ratio} (high-resolution mode) is not supported; "
                                  "the released checkpoint uses 1")
        llm = LlmConfig.from_dict(cfg, path)
        compressor = check_int(path, "compressor_size", get_value(cfg, "compressor_size", path, default=1),
                                1, MAX_COMPRESSOR_SIDE)
        prefusion = check_int(path, "prefusion_layer_num", get_value(cfg, "prefusion_layer_num", path, default=4),
                               0, MAX_LAYERS)
        return cls(path=path, llm=llm, mm=mm, compressor_size=compressor, prefusion_layer_num=prefusion,
                   resolution_ratio=ratio, raw=cfg)

    def llama_config(self) -> LlamaConfig:
        llm = self.llm
        config = LlamaConfig(hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
                           num_hidden_layers=llm.num_hidden_layers, num_attention_heads=llm.num_attention_heads,
                           num_key_value_heads=llm.num_key_value_heads, vocab_size=llm.vocab_size,
                           max_position_embeddings=llm.max_position_embeddings, rms_norm_eps=llm.rms_norm_eps,
                           rope_theta=llm.rope_theta, rope_scaling=llm.rope_scaling, head_dim=llm.head_dim,
                           tie_word_embeddings=llm.tie_word_embeddings)
        config._attn_implementation = "eager"  # standalone decoder layers: explicit softmax attention, exportable
        return config


# -- modules -----------------------------------------------------------------------------------
class ClipFeatures(nn.Module):
    """pixel_values [1, 3, S, S] -> CLIP's penultimate hidden states without CLS [1, (S/p)^2, width]."""

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        # transformers 5's CLIPVisionModel holds embeddings/encoder itself; kept under "vision_model" its
        # parameter names are the released ones (CLIPModel's and LLaVA-Mini's shard copy: vision_model.*).
        self.vision_model = CLIPVisionModel(config)
        # hidden_states[-2] is the output of the second-to-last layer: the last layer and the post
        # layernorm never contribute, so they are not part of the graph (and their weights not used).
        self.vision_model.encoder.layers = self.vision_model.encoder.layers[:-1]

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.vision_model.pre_layrnorm(self.vision_model.embeddings(pixel_values))
        hidden = self.vision_model.encoder(inputs_embeds=hidden).last_hidden_state  # = the full tower's hidden_states[-2]
        return hidden[:, 1:]


class Compressor(nn.Module):
    """The official Resampler: C*C queries cross-attend to the CLIP features (no kv projection)."""

    def __init__(self, n_queries: int, width: int, heads: int = COMPRESSOR_HEADS):
        super().__init__()
        self.query = nn.Parameter(torch.zeros(n_queries, width))
        self.pos_embed = nn.Parameter(torch.zeros(n_queries, width), requires_grad=False)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_q = nn.LayerNorm(width)
        self.ln_kv = nn.LayerNorm(width)

    def key_pos_embed(self, n_keys: int) -> torch.Tensor:
        """pos_embed resized (bicubic, as get_abs_pos) from its C x C grid to the features' grid."""
        src, tgt = int(math.sqrt(self.pos_embed.shape[0])), int(math.sqrt(n_keys))
        if src == tgt:
            return self.pos_embed
        grid = self.pos_embed.float().reshape(1, src, src, -1).permute(0, 3, 1, 2)
        return F.interpolate(grid, size=(tgt, tgt), mode="bicubic", align_corners=False).permute(0, 2, 3, 1) \
            .flatten(0, 2).to(self.pos_embed.dtype)

    def forward(self, features: torch.Tensor, key_pos: torch.Tensor | None = None) -> torch.Tensor:
        """features [B, N, width] -> [B, C*C, width]."""
        key_pos = self.key_pos_embed(features.shape[1]) if key_pos is None else key_pos
        kv = self.ln_kv(features)
        q = (self.ln_q(self.query) + self.pos_embed)[None].expand(features.shape[0], -1, -1)
        out, _ = self.attn(q, kv + key_pos[None], kv, need_weights=False)
        return out


class Compress(nn.Module):
    """features [1, N, width] -> (global tokens [1, N, d], compressed [1, C*C, d]), both projected."""

    def __init__(self, n_queries: int, width: int, projector_type: str, n_embd: int, n_features: int):
        super().__init__()
        self.compressor = Compressor(n_queries, width)
        self.mm_projector = build_projector(projector_type, width, n_embd)
        self.n_features = n_features

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        compressed = self.compressor(features)
        return self.mm_projector(features), self.mm_projector(compressed)


class PreFusion(nn.Module):
    """Modality pre-fusion: (vision [1, V, d], input_ids [1, L]) -> (fused text [1, L, d], compressed [1, C*C, d]).

    ``vision`` is [global tokens | compressed tokens]; ``input_ids`` is the prompt with the image
    placeholder as any id <= 0 (the official -200). The token-embedding table is part of the module
    (llama.cpp does not hand out input embeddings), masks and positions are built explicitly.
    """

    def __init__(self, llama: LlamaConfig, n_layers: int, n_compressed: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(llama.vocab_size, llama.hidden_size)
        self.prefusion_layers = nn.ModuleList([LlamaDecoderLayer(llama, layer_idx=i) for i in range(n_layers)])
        self.rotary = LlamaRotaryEmbedding(llama)
        self.n_compressed = n_compressed

    def forward(self, vision: torch.Tensor, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_vision, n_text = vision.shape[1], input_ids.shape[1]
        text = self.embed_tokens(input_ids.clamp(min=0))  # [1, L, d]; the placeholder reads row 0, as official
        masked_text = input_ids <= 0  # [1, L]
        masked = torch.cat([torch.zeros_like(vision[:, :, 0], dtype=torch.bool), masked_text], dim=1)  # [1, T]
        visible = (~masked).long()
        positions = torch.where(masked, torch.ones_like(visible), visible.cumsum(-1) - 1)  # [1, T]
        total = n_vision + n_text
        idx = torch.arange(total, device=input_ids.device)
        allowed = (idx[None, :] <= idx[:, None])[None] & ~masked[:, None, :]  # [1, T, T]: causal, masked keys out
        bias = torch.where(allowed, 0.0, MASK_VALUE).to(vision.dtype)[:, None]  # [1, 1, T, T]
        hidden = torch.cat([vision, text], dim=1)
        cos_sin = self.rotary(hidden, positions)
        for layer in self.prefusion_layers:
            out = layer(hidden, attention_mask=bias, position_ids=positions, position_embeddings=cos_sin)
            hidden = out[0] if isinstance(out, tuple) else out
        fused = hidden[:, n_vision:]
        fused = torch.where(masked_text[..., None], text, fused)  # masked rows keep their plain embeddings
        compressed = hidden[:, n_vision - self.n_compressed:n_vision]
        return fused, compressed


# -- loading -------------------------------------------------------------------------------------
@dataclass
class LlavaMiniCheckpoint:
    config: LlavaMiniConfig
    store: TensorStore
    clip_store: TensorStore
    clip_prefix: str  # "" in a CLIP folder, TOWER_PREFIX inside the shards
    clip_config: CLIPVisionConfig
    preprocess: dict[str, Any]
    notes: list[str]


def open_llava_mini(checkpoint: Path, vision_tower: Path | None = None) -> LlavaMiniCheckpoint:
    checkpoint = Path(checkpoint)
    config = LlavaMiniConfig.load(checkpoint)
    store = TensorStore(checkpoint)
    if vision_tower is not None:
        vision_tower = Path(vision_tower)
        clip_config = read_clip_config(vision_tower / "config.json")
        clip_store = TensorStore(vision_tower)
        has_prefix = any(k.startswith("vision_model.") for k in clip_store.keys())
        prefix = "" if has_prefix else None
        if prefix is None:
            raise CheckpointError(f"{vision_tower}: no vision_model.* tensors (not a CLIP checkpoint)")
        pre_path = vision_tower / "preprocessor_config.json"
        notes = [f"CLIP tower from --vision-tower {vision_tower}"]
    elif any(k.startswith(TOWER_PREFIX + "vision_model.") for k in store.keys()):
        clip_config = infer_clip_config(store, TOWER_PREFIX)
        check_clip_config({key: getattr(clip_config, key) for key in _CLIP_LIMITS},
                          f"{checkpoint}: CLIP tower inferred from the shards' {TOWER_PREFIX}* shapes")
        clip_store, prefix = store, TOWER_PREFIX
        pre_path = checkpoint / "preprocessor_config.json"
        notes = [f"CLIP tower from the copy in the checkpoint's shards ({TOWER_PREFIX}vision_model.*)"]
    else:
        raise CheckpointError(f"{checkpoint}: no vision tower in the shards and no --vision-tower DIR given "
                              f"(the config names {config.mm.vision_tower!r})")
    size = clip_config.image_size
    preprocess = read_json(pre_path) if pre_path.is_file() else {
        "size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size},
        "image_mean": list(CLIP_MEAN), "image_std": list(CLIP_STD), "resample": 3}
    if clip_config.hidden_size != config.mm.mm_hidden_size:
        raise CheckpointError(f"{config.path}: mm_hidden_size {config.mm.mm_hidden_size} but the CLIP tower is "
                              f"{clip_config.hidden_size} wide")
    return LlavaMiniCheckpoint(config, store, clip_store, prefix, clip_config, preprocess, notes)


def read_clip_config(path: Path) -> CLIPVisionConfig:
    """A CLIP folder's config.json (a CLIPModel's, with vision_config, or a CLIPVisionModel's), checked."""
    raw = read_json(path)
    vision = raw.get("vision_config", raw)
    if not isinstance(vision, dict):
        raise CheckpointError(f"{path}: key 'vision_config' = {vision!r} is not an object")
    # Our checks first, on the values as given (defaults for absent keys), so that the message names
    # the file and key; transformers' own validation raises its own exception types.
    values = {key: get_value(vision, key, path) for key in _CLIP_LIMITS if vision.get(key) is not None}
    defaults = CLIPVisionConfig()
    check_clip_config({**{key: getattr(defaults, key) for key in _CLIP_LIMITS}, **values}, path)
    try:
        return CLIPVisionConfig(**{**vision, **values})
    except Exception as e:  # TypeError, ValueError, huggingface_hub's StrictDataclassError...
        raise CheckpointError(f"{path}: not a CLIP vision config ({_one_line(e)})") from e


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split()) or type(e).__name__


# CLIPVisionConfig key -> (min, max); ViT-L/14-336: 1024 wide, 24 layers, 16 heads, 4096 ffn, 336 px, patch 14.
_CLIP_LIMITS = {"hidden_size": (1, MAX_HIDDEN), "intermediate_size": (1, MAX_INTERMEDIATE),
                "num_hidden_layers": (1, MAX_LAYERS), "num_attention_heads": (1, MAX_HIDDEN),
                "image_size": (1, MAX_IMAGE_SIDE), "patch_size": (1, MAX_PATCH)}


def check_clip_config(values: dict[str, Any], where: Path | str) -> None:
    """{key: value} for the keys of _CLIP_LIMITS: in range, and the grid and heads dividing evenly."""
    for key, (lo, hi) in _CLIP_LIMITS.items():
        value = values[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise CheckpointError(f"{where}: key {key!r} = {value!r} is not an integer")
        check_int(where, key, value, lo, hi)
    if values["image_size"] % values["patch_size"]:
        raise CheckpointError(f"{where}: image_size {values['image_size']} is not a multiple of "
                              f"patch_size {values['patch_size']}")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise CheckpointError(f"{where}: hidden_size {values['hidden_size']} is not a multiple of "
                              f"num_attention_heads {values['num_attention_heads']}")


def infer_clip_config(store: TensorStore, prefix: str) -> CLIPVisionConfig:
    """CLIPVisionConfig from the shard copy's shapes (the shards carry no tower config)."""
    p = prefix + "vision_model."
    patch = store.info(p + "embeddings.patch_embedding.weight").shape  # [width, 3, patch, patch]
    n_pos = store.info(p + "embeddings.position_embedding.weight").shape[0]  # 1 + (S/patch)^2
    layers = {int(m.group(1)) for k in store.keys() if (m := re.match(re.escape(p) + r"encoder\.layers\.(\d+)\.", k))}
    ffn = store.info(p + "encoder.layers.0.mlp.fc1.weight").shape[0]
    width, grid = patch[0], int(math.isqrt(n_pos - 1))
    heads = max(1, width // 64)  # not in any shape: CLIP towers use heads of 64 (ViT-L/14: 1024 wide, 16 heads)
    return CLIPVisionConfig(hidden_size=width, intermediate_size=ffn, num_hidden_layers=len(layers),
                            num_attention_heads=heads, image_size=grid * patch[-1], patch_size=patch[-1],
                            hidden_act="quick_gelu", layer_norm_eps=1e-5)


def _load(module: nn.Module, sources: dict[str, tuple[TensorStore, str]]) -> None:
    state = {}
    for name, param in module.state_dict().items():
        store, key = sources[name]
        tensor = store.get(key)
        check_shape(key, tensor, tuple(param.shape), store.file_of(key))
        state[name] = tensor.to(torch.float32)
    module.load_state_dict(state, strict=True)


def load_modules(ckpt: LlavaMiniCheckpoint) -> tuple[ClipFeatures, Compress, PreFusion]:
    cfg = ckpt.config
    clip = ClipFeatures(ckpt.clip_config)
    _load(clip, {n: (ckpt.clip_store, ckpt.clip_prefix + n) for n in clip.state_dict()})
    width = ckpt.clip_config.hidden_size
    n_queries = cfg.compressor_size ** 2
    n_features = (ckpt.clip_config.image_size // ckpt.clip_config.patch_size) ** 2
    compress = Compress(n_queries, width, cfg.mm.projector_type, cfg.llm.hidden_size, n_features)
    _load(compress, {n: (ckpt.store, "model." + n) for n in compress.state_dict()})
    prefusion = PreFusion(cfg.llama_config(), cfg.prefusion_layer_num, n_queries)
    _load(prefusion, {n: (ckpt.store, "model." + n) for n in prefusion.state_dict()})  # rotary inv_freq: computed
    extra = [k for k in ckpt.store.keys() if k.startswith((COMPRESSOR_PREFIX, PREFUSION_PREFIX, PROJECTOR_PREFIX))
             and k.removeprefix("model.") not in compress.state_dict() and k.removeprefix("model.") not in prefusion.state_dict()]
    if extra:
        raise CheckpointError(f"{ckpt.store.file_of(extra[0])}: unexpected tensor {extra[0]!r} "
                              f"({len(extra)} unused): the config does not describe these weights")
    return clip.eval(), compress.eval(), prefusion.eval()
