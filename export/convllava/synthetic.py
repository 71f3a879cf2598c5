"""Random ConvLLaVA checkpoints in the exact released layouts, for tests, benchmarks, demo/train.py and anyone
trying a pipeline without downloading weights (it ships with the exporter).

No weights can be downloaded, so tests make their own. What "exact layout" means here (see
shared/reference/convllava-format.md): the sft folder holds config.json (model_type "llava" and the
real keys), sharded ``pytorch_model-0000i-of-0000n.bin`` with ``pytorch_model.bin.index.json`` (or
the safetensors equivalents), bf16 storage, the LLM under HF Llama names, the projector under
``model.mm_projector.{0,2}``, and a copy of the tower under ``model.vision_tower.vision_tower.``
including the unused final ``layernorm``; the tower folder holds config.json,
preprocessor_config.json and ``pytorch_model.bin`` with unprefixed ConvNextModel names.

Random values are chosen so that every weight matters and the tower still depends on its input: a
deep ConvNeXt with large biases or LayerNorm gains far from 1 maps every image to nearly the same
features (measured: cosine 0.998 between unrelated images), which would make parity tests vacuous.
Hence small biases (std 0.01), gains 1 +- 0.05, and layer scales drawn in [0.1, 0.4] instead of
transformers' 1e-6 (which makes every block a near no-op).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch

from ..checkpoint import BIN_INDEX, BIN_SINGLE, SAFETENSORS_INDEX, SAFETENSORS_SINGLE, write_index
from .tower import TowerConfig
from .vision_model import ConvLlavaVision, TOWER_PREFIX
from ...preprocess import CLIP_MEAN, CLIP_STD

# Real ConvLLaVA towers (ConvLLaVA-ConvNeXt-{768,1024,1536}/config.json): ConvNeXt-Large + a 5th stage.
CONVLLAVA_DEPTHS = (3, 3, 27, 3, 6)
CONVLLAVA_WIDTHS = (192, 384, 768, 1536, 3072)
# A tiny tower of the same shape: 5 stages, total stride 64; 256 px -> 4 x 4 = 16 tokens.
TINY_TOWER = TowerConfig(depths=(2, 2, 3, 2, 2), hidden_sizes=(32, 48, 64, 96, 128), image_size=256)


def convllava_tower(image_size: int) -> TowerConfig:
    return TowerConfig(depths=CONVLLAVA_DEPTHS, hidden_sizes=CONVLLAVA_WIDTHS, image_size=image_size)


@dataclass(frozen=True)
class LlamaSpec:
    """A Llama of the given shape; widths multiples of 256 so llama.cpp's k-quants apply."""

    hidden_size: int = 256
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    vocab_size: int = 512
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    logit_scale: float = 1.0  # multiplies lm_head so greedy decoding has clear winners


# -- random weights ---------------------------------------------------------------------------------
def _normal(gen: torch.Generator, shape, std: float, mean: float = 0.0) -> torch.Tensor:
    return torch.randn(shape, generator=gen) * std + mean


def _randomize(name: str, shape: torch.Size, gen: torch.Generator) -> torch.Tensor:
    """A value for one parameter, by role (recognised from its name and rank)."""
    if name.endswith("layer_scale_parameter"):
        return torch.rand(shape, generator=gen) * 0.3 + 0.1
    is_norm = "norm" in name or ".downsampling_layer.0." in name  # the downsampling LayerNorm has no "norm" in its name
    if is_norm:
        return _normal(gen, shape, 0.05, 1.0) if name.endswith("weight") else _normal(gen, shape, 0.01)
    if name.endswith("bias"):
        return _normal(gen, shape, 0.01)
    fan_in = math.prod(shape[1:])  # conv [out, in/groups, k, k] and linear [out, in] alike
    return _normal(gen, shape, 1.0 / math.sqrt(fan_in))


def random_vision_state(tower: TowerConfig, projector_type: str, n_embd: int, seed: int) -> dict[str, torch.Tensor]:
    """{"vision_tower.<ConvNextModel name>": ..., "mm_projector.<i>.<w|b>": ...} in fp32."""
    gen = torch.Generator().manual_seed(seed)
    names = ConvLlavaVision(tower, projector_type, n_embd).state_dict()
    state = {name: _randomize(name, p.shape, gen) for name, p in names.items()}
    last = tower.out_channels
    # The final pooled-output norm that ConvNextModel checkpoints carry and ConvLLaVA never uses.
    state["vision_tower.layernorm.weight"] = _normal(gen, (last,), 0.05, 1.0)
    state["vision_tower.layernorm.bias"] = _normal(gen, (last,), 0.01)
    return state


def random_llama_state(spec: LlamaSpec, seed: int) -> dict[str, torch.Tensor]:
    """HF LlamaForCausalLM names and shapes, in the order save_pretrained writes them."""
    gen = torch.Generator().manual_seed(seed)
    d, f, head_dim = spec.hidden_size, spec.intermediate_size, spec.hidden_size // spec.num_attention_heads
    kv = spec.num_key_value_heads * head_dim
    state = {"model.embed_tokens.weight": _normal(gen, (spec.vocab_size, d), 1.0)}
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}."
        for name, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (kv, d)), ("self_attn.v_proj", (kv, d)),
                            ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (f, d)), ("mlp.up_proj", (f, d)),
                            ("mlp.down_proj", (d, f))):
            state[p + name + ".weight"] = _normal(gen, shape, 1.0 / math.sqrt(shape[1]))
        state[p + "input_layernorm.weight"] = _normal(gen, (d,), 0.05, 1.0)
        state[p + "post_attention_layernorm.weight"] = _normal(gen, (d,), 0.05, 1.0)
    state["model.norm.weight"] = _normal(gen, (d,), 0.05, 1.0)
    state["lm_head.weight"] = _normal(gen, (spec.vocab_size, d), spec.logit_scale / math.sqrt(d))
    return state


# -- configs ----------------------------------------------------------------------------------------
def llava_config(spec: LlamaSpec, tower: TowerConfig, *, projector_type: str = "mlp2x_gelu",
                 vision_tower: str | None = None, max_length: int = 2048) -> dict:
    """config.json of a ConvLLaVA sft model, with the released keys and values."""
    # Released configs name the tower's hub repo, whose name ends in the resolution.
    vision_tower = vision_tower or f"ConvLLaVA/ConvLLaVA-ConvNeXt-{tower.image_size or 768}"
    return {
        "_name_or_path": "lmsys/vicuna-7b-v1.5", "architectures": ["LlavaLlamaForCausalLM"],
        "attention_bias": False, "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
        "freeze_mm_mlp_adapter": False, "hidden_act": "silu", "hidden_size": spec.hidden_size,
        "image_aspect_ratio": "pad", "initializer_range": 0.02, "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings, "mm_hidden_size": tower.out_channels,
        "mm_patch_merge_type": "flat", "mm_projector_lr": None, "mm_projector_type": projector_type,
        "mm_use_im_patch_token": False, "mm_use_im_start_end": False, "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -1, "mm_vision_tower": vision_tower, "model_type": "llava",
        "num_attention_heads": spec.num_attention_heads, "num_hidden_layers": spec.num_hidden_layers,
        "num_key_value_heads": spec.num_key_value_heads, "pad_token_id": 0, "pretraining_tp": 1,
        "rms_norm_eps": spec.rms_norm_eps, "rope_scaling": None, "rope_theta": spec.rope_theta,
        "tie_word_embeddings": False, "tokenizer_model_max_length": max_length, "tokenizer_padding_side": "right",
        "torch_dtype": "bfloat16", "transformers_version": "4.37.2", "tune_mm_mlp_adapter": False,
        "use_cache": True, "use_mm_proj": True, "vocab_size": spec.vocab_size,
    }


def preprocessor_config(image_size: int) -> dict:
    """preprocessor_config.json of a ConvLLaVA-ConvNeXt tower (a CLIPImageProcessor)."""
    return {
        "crop_size": {"height": image_size, "width": image_size}, "do_center_crop": True, "do_convert_rgb": True,
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": list(CLIP_MEAN),
        "image_processor_type": "CLIPImageProcessor", "image_std": list(CLIP_STD), "resample": 3,
        "rescale_factor": 0.00392156862745098, "size": {"shortest_edge": image_size},
    }


# -- writing ----------------------------------------------------------------------------------------
def save_tensors(folder: Path, tensors: dict[str, torch.Tensor], *, fmt: str = "bin", shards: int = 1,
                 dtype: torch.dtype = torch.bfloat16) -> list[Path]:
    """Write ``tensors`` as HF shards (+ index when shards > 1), in insertion order, split by size."""
    if fmt not in ("bin", "safetensors"):
        raise ValueError(f"fmt must be 'bin' or 'safetensors', got {fmt!r}")
    folder.mkdir(parents=True, exist_ok=True)
    items = [(k, v.detach().to(dtype).contiguous().clone()) for k, v in tensors.items()]
    total = sum(v.numel() * v.element_size() for _, v in items)
    groups = _split_by_size(items, shards, total)
    ext = "bin" if fmt == "bin" else "safetensors"
    stem = "pytorch_model" if fmt == "bin" else "model"
    paths, weight_map = [], {}
    for i, group in enumerate(groups, 1):
        name = (BIN_SINGLE if fmt == "bin" else SAFETENSORS_SINGLE) if len(groups) == 1 \
            else f"{stem}-{i:05d}-of-{len(groups):05d}.{ext}"
        path = folder / name
        part = dict(group)
        if fmt == "bin":
            torch.save(part, path)
        else:
            from safetensors.torch import save_file

            save_file(part, str(path), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
        paths.append(path)
    if len(groups) > 1:
        write_index(folder, BIN_INDEX if fmt == "bin" else SAFETENSORS_INDEX, weight_map, total)
    return paths


def _split_by_size(items: list, shards: int, total: int) -> list[list]:
    if shards <= 1:
        return [items]
    target = total / shards
    groups: list[list] = [[]]
    size = 0
    for key, value in items:
        nbytes = value.numel() * value.element_size()
        if groups[-1] and size + nbytes > target * len(groups) and len(groups) < shards:
            groups.append([])
        groups[-1].append((key, value))
        size += nbytes
    return groups


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def write_tower_folder(folder: Path, tower: TowerConfig, vision_state: dict[str, torch.Tensor], *,
                       dtype: torch.dtype = torch.bfloat16) -> Path:
    """A ConvLLaVA-ConvNeXt-* folder: config, preprocessor config, pytorch_model.bin (unprefixed names)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", tower.to_hf_dict())
    write_json(folder / "preprocessor_config.json", preprocessor_config(tower.image_size or 224))
    tower_tensors = {k.removeprefix("vision_tower."): v for k, v in vision_state.items() if k.startswith("vision_tower.")}
    save_tensors(folder, tower_tensors, fmt="bin", shards=1, dtype=dtype)
    return folder


def write_convllava_checkpoint(folder: Path, spec: LlamaSpec, tower: TowerConfig, *,
                               vision_state: dict[str, torch.Tensor], llm_state: dict[str, torch.Tensor],
                               fmt: str = "bin", shards: int = 2, dtype: torch.dtype = torch.bfloat16,
                               include_tower_copy: bool = True, projector_type: str = "mlp2x_gelu",
                               extra_files: Iterable[tuple[str, bytes]] = ()) -> Path:
    """An sft folder: config.json + shards in LlavaLlamaForCausalLM's state_dict order."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_json(folder / "config.json", llava_config(spec, tower, projector_type=projector_type))
    tensors: dict[str, torch.Tensor] = {k: v for k, v in llm_state.items() if k != "lm_head.weight"}
    if include_tower_copy:
        tensors.update({TOWER_PREFIX + k.removeprefix("vision_tower."): v
                        for k, v in vision_state.items() if k.startswith("vision_tower.")})
    tensors.update({"model." + k: v for k, v in vision_state.items() if k.startswith("mm_projector.")})
    tensors["lm_head.weight"] = llm_state["lm_head.weight"]
    save_tensors(folder, tensors, fmt=fmt, shards=shards, dtype=dtype)
    for name, data in extra_files:
        (folder / name).write_bytes(data)
    return folder


def write_tiny_convllava(out: Path, *, seed: int = 0, fmt: str = "bin", shards: int = 2) -> tuple[Path, Path]:
    """A tiny random ConvLLaVA: ``out/sft`` (checkpoint) and ``out/tower`` (ConvNeXt folder)."""
    out = Path(out)
    spec = LlamaSpec()
    vision = random_vision_state(TINY_TOWER, "mlp2x_gelu", spec.hidden_size, seed=seed)
    llm = random_llama_state(spec, seed=seed + 1)
    tower = write_tower_folder(out / "tower", TINY_TOWER, vision)
    sft = write_convllava_checkpoint(out / "sft", spec, TINY_TOWER, vision_state=vision, llm_state=llm, fmt=fmt,
                                     shards=shards)
    return sft, tower


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Write a tiny random ConvLLaVA checkpoint in the released layout.")
    parser.add_argument("out", type=Path)
    parser.add_argument("--format", choices=("bin", "safetensors"), default="bin")
    parser.add_argument("--shards", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sft_dir, tower_dir = write_tiny_convllava(args.out, seed=args.seed, fmt=args.format, shards=args.shards)
    print(f"checkpoint: {sft_dir}\ntower:      {tower_dir}")


# -- tokenizer --------------------------------------------------------------------------------------
# The trainer options of Llama-2 / Vicuna's tokenizer.model (its trainer_spec and normalizer_spec):
# BPE, byte fallback, digits split, no normalization, a dummy-prefix space, unk/bos/eos = 0/1/2.
LLAMA_SENTENCEPIECE_OPTIONS = dict(
    model_type="bpe", byte_fallback=True, split_digits=True, split_by_unicode_script=True, split_by_number=True,
    split_by_whitespace=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
    normalization_rule_name="identity", add_dummy_prefix=True, max_sentencepiece_length=16,
    character_coverage=0.99995, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
    unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>", hard_vocab_limit=False,
)
VICUNA_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
                 "detailed, and polite answers to the user's questions.")


def default_corpus() -> list[str]:
    """English-ish lines around the vicuna_v1 template: enough for a few hundred merges."""
    words = ("the a an image picture photo shows what is are there how many color colour shape left right red green "
             "blue yellow circle square triangle yes no one two three of in on and with describe question answer "
             "this that it small large bright dark above below next to where which who why when does do can see").split()
    rng = torch.Generator().manual_seed(1234)
    lines = [VICUNA_SYSTEM, "USER: <image>\nWhat is in the image? ASSISTANT: A picture.</s>USER: Why? ASSISTANT:"]
    for _ in range(400):
        n = int(torch.randint(3, 12, (1,), generator=rng))
        idx = torch.randint(0, len(words), (n,), generator=rng).tolist()
        lines.append("USER: " + " ".join(words[i] for i in idx) + "? ASSISTANT: " + str(int(idx[0]) * 7) + ".")
    return lines


def write_llama_tokenizer(folder: Path, vocab_size: int, corpus: list[str] | None = None, *,
                          legacy: bool = False) -> Path:
    """tokenizer.model (SentencePiece, Llama's options) + tokenizer_config / special_tokens_map / generation_config."""
    import io

    import sentencepiece as spm

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(corpus or default_corpus()), model_writer=model,
                                   vocab_size=vocab_size, num_threads=1, minloglevel=2, **LLAMA_SENTENCEPIECE_OPTIONS)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    special = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    write_json(folder / "special_tokens_map.json", special)
    write_json(folder / "tokenizer_config.json", {
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False, "legacy": legacy,
        "model_max_length": 2048, "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
        **special,
    })
    write_json(folder / "generation_config.json", {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                                   "max_length": 4096, "temperature": 0.9, "top_p": 0.6})
    return folder / "tokenizer.model"
