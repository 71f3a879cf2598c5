"""Tiny checkpoints in the exact released layouts, as the session fixtures in tests/conftest.py make them.

Every one writes real files (bf16 shards, index JSON, real config keys) with random weights chosen so
every weight matters (see convllava_edge/export/convllava/synthetic.py). Importing this imports torch: only fixture bodies and
the parity and e2e tiers do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from convllava_edge.export.convllava import synthetic as S

# hidden 256, ffn 512, 2 layers, 4 heads: rows are multiples of 256 so llama.cpp's k-quants apply.
# lm_head scaled x4 so greedy decoding has clear winners (token-exact tests are not decided by noise).
SPEC = S.LlamaSpec(logit_scale=4.0)
GQA_SPEC = S.LlamaSpec(num_attention_heads=4, num_key_value_heads=2, logit_scale=4.0)


@dataclass
class TinyConvLlava:
    root: Path
    bin_ckpt: Path  # sharded bf16 .bin with the tower copy
    st_ckpt: Path  # sharded bf16 safetensors with the tower copy
    tower: Path  # ConvLLaVA-ConvNeXt-style tower folder
    vision_state: dict[str, torch.Tensor]  # fp32 values before bf16 storage
    spec: S.LlamaSpec


def write_tiny(root: Path) -> TinyConvLlava:
    vision = S.random_vision_state(S.TINY_TOWER, "mlp2x_gelu", SPEC.hidden_size, seed=0)
    llm = S.random_llama_state(SPEC, seed=1)
    tower = S.write_tower_folder(root / "ConvLLaVA-ConvNeXt-256", S.TINY_TOWER, vision)
    bin_ckpt = S.write_convllava_checkpoint(root / "sft-bin", SPEC, S.TINY_TOWER, vision_state=vision, llm_state=llm,
                                            fmt="bin", shards=2)
    st_ckpt = S.write_convllava_checkpoint(root / "sft-st", SPEC, S.TINY_TOWER, vision_state=vision, llm_state=llm,
                                           fmt="safetensors", shards=3)
    for folder in (bin_ckpt, st_ckpt):
        S.write_llama_tokenizer(folder, SPEC.vocab_size)
    return TinyConvLlava(root, bin_ckpt, st_ckpt, tower, vision, SPEC)


def write_tiny_gqa(root: Path, tiny: TinyConvLlava) -> Path:
    """A grouped-query-attention LLM (4 query heads, 2 kv heads) in bf16 safetensors shards."""
    llm = S.random_llama_state(GQA_SPEC, seed=3)
    folder = S.write_convllava_checkpoint(root / "sft", GQA_SPEC, S.TINY_TOWER, vision_state=tiny.vision_state,
                                          llm_state=llm, fmt="safetensors", shards=2)
    S.write_llama_tokenizer(folder, GQA_SPEC.vocab_size)
    return folder


# A bigger LLM for the page's Stop test: long answers that take seconds (8 layers of width 768 decode at a few
# hundred tokens/s on one thread), in a 4096-position context.
ENDLESS_SPEC = S.LlamaSpec(hidden_size=768, intermediate_size=2048, num_hidden_layers=8, num_attention_heads=6,
                           num_key_value_heads=6, max_position_embeddings=4096, logit_scale=4.0)


def write_endless(root: Path) -> Path:
    """A ConvLLaVA checkpoint whose LLM never ends an answer: the lm_head row of </s> (id 2) is zero, so its
    logit is 0 while the largest of the other 511 random logits is always above it (greedy never picks it)."""
    vision = S.random_vision_state(S.TINY_TOWER, "mlp2x_gelu", ENDLESS_SPEC.hidden_size, seed=5)
    llm = S.random_llama_state(ENDLESS_SPEC, seed=6)
    llm["lm_head.weight"][2] = 0.0
    folder = S.write_convllava_checkpoint(root / "endless", ENDLESS_SPEC, S.TINY_TOWER, vision_state=vision,
                                          llm_state=llm, fmt="safetensors", shards=1)
    S.write_llama_tokenizer(folder, ENDLESS_SPEC.vocab_size)
    return folder
