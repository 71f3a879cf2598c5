"""The LLM of a ConvLLaVA or LLaVA-Mini checkpoint -> a GGUF file llama.cpp runs as a plain Llama.

llama.cpp's own HF converter (convert_hf_to_gguf.py) is not in any installable package, so this
writes the file with the ``gguf`` package, streaming: tensor infos are declared from shapes alone,
then the data goes out one tensor at a time in shard order, so at most one shard (memory-mapped)
and one tensor in fp32 are resident. Vision-side tensors (tower copy, projector, LLaVA-Mini's
compressor and pre-fusion layers) are skipped: the vision export handles them.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import gguf
import numpy as np
import torch

from ..errors import CheckpointError, ConfigError
from .checkpoint import TensorStore
from .config import LlmConfig
from .vocab import Vocab, read_vocab

OUT_TYPES = {  # --llm-type value -> (GGUF file type, type of 2-D weights); 1-D tensors stay F32 as llama.cpp's converter writes them
    "F32": (gguf.LlamaFileType.ALL_F32, gguf.GGMLQuantizationType.F32),
    "F16": (gguf.LlamaFileType.MOSTLY_F16, gguf.GGMLQuantizationType.F16),
    "BF16": (gguf.LlamaFileType.MOSTLY_BF16, gguf.GGMLQuantizationType.BF16),
}
NOT_LLM_PREFIXES = ("model.mm_projector.", "model.vision_tower.")  # handled by the vision export
T = gguf.MODEL_TENSOR
# HF Llama names -> llama.cpp tensors. Written out rather than taken from gguf.TensorNameMap, which
# accepts the names of ~50 architectures: a tensor from anything but a Llama must fail here.
GLOBAL_TENSORS = {"model.embed_tokens.weight": T.TOKEN_EMBD, "model.norm.weight": T.OUTPUT_NORM,
                  "lm_head.weight": T.OUTPUT}
BLOCK_TENSORS = {
    "input_layernorm.weight": T.ATTN_NORM, "self_attn.q_proj.weight": T.ATTN_Q, "self_attn.k_proj.weight": T.ATTN_K,
    "self_attn.v_proj.weight": T.ATTN_V, "self_attn.o_proj.weight": T.ATTN_OUT,
    "post_attention_layernorm.weight": T.FFN_NORM, "mlp.gate_proj.weight": T.FFN_GATE,
    "mlp.up_proj.weight": T.FFN_UP, "mlp.down_proj.weight": T.FFN_DOWN,
}
DROPPED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")  # recomputed by llama.cpp
_BLOCK = re.compile(r"^model\.layers\.(\d+)\.(.+)$")

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


@dataclass(frozen=True)
class PlannedTensor:
    source: str  # HF name
    name: str  # GGUF name
    shape: tuple[int, ...]
    gguf_type: gguf.GGMLQuantizationType
    file: Path | None  # None for tensors computed here (rope_freqs)
    data: np.ndarray | None = None  # their values

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        return n * (4 if self.gguf_type == gguf.GGMLQuantizationType.F32 else 2)


@dataclass
class GgufConversion:
    path: Path
    out_type: str
    n_tensors: int
    n_params: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    vocab: Vocab | None = None
    context_length: int = 0


def gguf_name(hf_name: str) -> str | None:
    """The llama.cpp name for an HF Llama tensor, or None for tensors llama.cpp recomputes."""
    if DROPPED.match(hf_name):
        return None
    if hf_name in GLOBAL_TENSORS:
        return gguf.TENSOR_NAMES[GLOBAL_TENSORS[hf_name]] + ".weight"
    if (m := _BLOCK.match(hf_name)) and m.group(2) in BLOCK_TENSORS:
        return gguf.TENSOR_NAMES[BLOCK_TENSORS[m.group(2)]].format(bid=int(m.group(1))) + ".weight"
    raise CheckpointError(f"cannot map tensor {hf_name!r} to a llama.cpp tensor (not a Llama weight)")


def permute_for_rope(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF's rotate-half q/k rows -> llama.cpp's interleaved pairs, per head: [n_head*d, in] kept.

    Rows of a head are (first halves, second halves); llama.cpp rotates adjacent pairs, so each
    head's rows [2, d/2] are transposed to [d/2, 2] (what convert_hf_to_gguf.py does).
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def plan_tensors(store: TensorStore, llm: LlmConfig, out_type: str,
                 skip: tuple[str, ...] = NOT_LLM_PREFIXES) -> list[PlannedTensor]:
    """Every LLM tensor with its GGUF name and type, in shard order; checks the set is complete."""
    _, weight_type = OUT_TYPES[out_type]
    plan = []
    for path in store.files:
        for key in store.keys():
            if store.file_of(key) != path or key.startswith(skip):
                continue
            name = gguf_name(key)
            if name is None:
                continue
            shape = tuple(store.info(key).shape)
            kind = weight_type if len(shape) > 1 else gguf.GGMLQuantizationType.F32
            plan.append(PlannedTensor(key, name, shape, kind, path))
    _check_complete(plan, llm, store)
    factors = llama3_rope_factors(llm)
    if factors is not None:
        plan.append(PlannedTensor("(computed)", gguf.TENSOR_NAMES[T.ROPE_FREQS] + ".weight", factors.shape,
                                  gguf.GGMLQuantizationType.F32, None, factors))
    return plan


def llama3_rope_factors(llm: LlmConfig) -> np.ndarray | None:
    """Llama-3.1's rope scaling as llama.cpp takes it: a per-frequency divisor tensor (rope_freqs).

    transformers scales each inverse frequency by 1/factor (long wavelengths), 1 (short ones) or a
    smooth blend in between; llama.cpp divides theta by these factors (convert_hf_to_gguf.py does the same).
    """
    scaling = llm.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "llama3":
        return None
    dim = llm.head_dim
    freqs = 1.0 / (llm.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def _check_complete(plan: list[PlannedTensor], llm: LlmConfig, store: TensorStore) -> None:
    d, f, v = llm.hidden_size, llm.intermediate_size, llm.vocab_size
    q_rows, kv_rows = llm.num_attention_heads * llm.head_dim, llm.num_key_value_heads * llm.head_dim
    expected = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not llm.tie_word_embeddings:
        expected["lm_head.weight"] = (v, d)
    for i in range(llm.num_hidden_layers):
        p = f"model.layers.{i}."
        expected.update({p + "input_layernorm.weight": (d,), p + "post_attention_layernorm.weight": (d,),
                         p + "self_attn.q_proj.weight": (q_rows, d), p + "self_attn.k_proj.weight": (kv_rows, d),
                         p + "self_attn.v_proj.weight": (kv_rows, d), p + "self_attn.o_proj.weight": (d, q_rows),
                         p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                         p + "mlp.down_proj.weight": (d, f)})
    found = {t.source: t for t in plan}
    for key, shape in expected.items():
        if key not in found:
            raise CheckpointError(f"{store.index_path or store.folder}: missing tensor {key!r}")
        if found[key].shape != shape:
            raise CheckpointError(f"{found[key].file}: tensor {key!r} has shape {list(found[key].shape)}, "
                                  f"expected {list(shape)} from config.json")
    extra = sorted(set(found) - set(expected))
    if extra:
        raise CheckpointError(f"{found[extra[0]].file}: tensor {extra[0]!r} is not part of a "
                              f"{llm.num_hidden_layers}-layer Llama as config.json describes it")


def _add_metadata(writer: gguf.GGUFWriter, llm: LlmConfig, vocab: Vocab, out_type: str | None, name: str,
                  context_length: int) -> None:
    writer.add_name(name)
    writer.add_context_length(context_length)
    writer.add_embedding_length(llm.hidden_size)
    writer.add_block_count(llm.num_hidden_layers)
    writer.add_feed_forward_length(llm.intermediate_size)
    writer.add_head_count(llm.num_attention_heads)
    writer.add_head_count_kv(llm.num_key_value_heads)
    writer.add_rope_dimension_count(llm.head_dim)
    if llm.head_dim * llm.num_attention_heads != llm.hidden_size:
        writer.add_key_length(llm.head_dim)
        writer.add_value_length(llm.head_dim)
    writer.add_layer_norm_rms_eps(llm.rms_norm_eps)
    writer.add_rope_freq_base(llm.rope_theta)
    _add_rope_scaling(writer, llm)
    writer.add_vocab_size(len(vocab.tokens))
    if out_type is not None:  # None: a vocabulary-only file, no tensors to type
        writer.add_file_type(OUT_TYPES[out_type][0])
    vocab.add_to(writer, pad_override=llm.pad_token_id)


def _add_rope_scaling(writer: gguf.GGUFWriter, llm: LlmConfig) -> None:
    scaling = llm.rope_scaling
    if not scaling:
        return
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    elif kind not in (None, "default", "llama3"):  # llama3 travels as the rope_freqs tensor
        raise ConfigError(f"rope_scaling type {kind!r} is not supported by the converter (linear, llama3 are)")


def convert_llm(checkpoint: Path, out: Path, out_type: str = "F16", progress: Progress = lambda *a: None,
                name: str | None = None, config: tuple[LlmConfig, int, tuple[str, ...]] | None = None) -> GgufConversion:
    """Write the checkpoint's Llama to ``out`` as GGUF (F32, F16 or BF16). ``config``: (LLM config, sequence
    cap, tensor prefixes that are not the LLM's), by default its family's (export/families.py)."""
    if out_type not in OUT_TYPES:
        raise ConfigError(f"unknown GGUF output type {out_type!r} (known: {', '.join(OUT_TYPES)})")
    checkpoint = Path(checkpoint)
    if config is None:
        from .families import export_family_for

        config = export_family_for(checkpoint).llm_config(checkpoint)
    llm, max_length, skip = config
    store = TensorStore(checkpoint)
    vocab = read_vocab(checkpoint, llm.vocab_size)
    plan = plan_tensors(store, llm, out_type, skip)
    # The official code caps sequences at tokenizer_model_max_length; llama.cpp's context default
    # comes from context_length, so use the smaller of the two.
    context = min(llm.max_position_embeddings, max_length)
    writer = gguf.GGUFWriter(str(out), "llama")
    _add_metadata(writer, llm, vocab, out_type, name or checkpoint.name, context)
    for t in plan:
        numpy_dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16,
                       gguf.GGMLQuantizationType.BF16: np.uint16}[t.gguf_type]
        writer.add_tensor_info(t.name, t.shape, np.dtype(numpy_dtype), t.nbytes,
                               raw_dtype=t.gguf_type if t.gguf_type == gguf.GGMLQuantizationType.BF16 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for i, t in enumerate(plan):
        if t.data is not None:
            writer.write_tensor_data(t.data)
            continue
        tensor = store.get(t.source)  # shards are visited in order: the previous one is released
        if t.name.endswith("attn_q.weight"):
            tensor = permute_for_rope(tensor, llm.num_attention_heads)
        elif t.name.endswith("attn_k.weight"):
            tensor = permute_for_rope(tensor, llm.num_key_value_heads)
        writer.write_tensor_data(_as_gguf(tensor, t.gguf_type))
        del tensor
        progress(i + 1, len(plan), t.name)
    writer.close()
    types = Counter(t.gguf_type.name for t in plan)
    return GgufConversion(path=Path(out), out_type=out_type, n_tensors=len(plan),
                          n_params=sum(int(np.prod(t.shape)) for t in plan), tensor_types=dict(types), vocab=vocab,
                          context_length=context)


def write_vocab_gguf(checkpoint: Path, out: Path, config: tuple[LlmConfig, int, tuple[str, ...]],
                     name: str | None = None) -> Vocab:
    """A GGUF with the LLM's metadata and vocabulary and no tensors (what llama.cpp's converter writes with
    --vocab-only): llama.cpp loads it ``vocab_only`` to tokenize for an LLM held in another form (llm-hf/)."""
    llm, max_length, _ = config
    vocab = read_vocab(checkpoint, llm.vocab_size)
    writer = gguf.GGUFWriter(str(out), "llama")
    _add_metadata(writer, llm, vocab, None, name or Path(checkpoint).name, min(llm.max_position_embeddings, max_length))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return vocab


def _as_gguf(tensor: torch.Tensor, kind: gguf.GGMLQuantizationType) -> np.ndarray:
    if kind == gguf.GGMLQuantizationType.F32:
        return tensor.to(torch.float32).contiguous().numpy()
    if kind == gguf.GGMLQuantizationType.F16:
        return tensor.to(torch.float16).contiguous().numpy()
    # bf16 bits as uint16: exact for bf16 checkpoints, round-to-nearest-even otherwise
    return tensor.to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
