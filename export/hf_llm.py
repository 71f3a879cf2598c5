"""The bundle's LLM in Hugging Face form (``--llm-type hf``): a plain ``LlamaForCausalLM`` folder, ``llm-hf/``,
for engines that load Hugging Face weights (vLLM) rather than GGUF.

The tensors are the ones the GGUF converter takes (the same plan, so the same completeness and shape checks
against config.json), written under their own names in the checkpoint's dtype by safetensors; the config is
LlamaConfig's keys from the validated LlmConfig; the tokenizer and generation files are the checkpoint's own.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import CheckpointError
from .checkpoint import TensorStore
from .config import LlmConfig
from .gguf_convert import plan_tensors

HF_FOLDER = "llm-hf"
SHARD_BYTES = 2 << 30  # at most per safetensors file: no file a 32-bit tool or a FAT32 stick cannot hold
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json")
DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def llama_config(llm: LlmConfig, dtype: torch.dtype) -> dict:
    """config.json of a LlamaForCausalLM with these shapes (transformers' and vLLM's key names)."""
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
              "hidden_size": llm.hidden_size, "intermediate_size": llm.intermediate_size,
              "num_hidden_layers": llm.num_hidden_layers, "num_attention_heads": llm.num_attention_heads,
              "num_key_value_heads": llm.num_key_value_heads, "head_dim": llm.head_dim,
              "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.rms_norm_eps,
              "rope_theta": llm.rope_theta, "vocab_size": llm.vocab_size,
              "tie_word_embeddings": llm.tie_word_embeddings, "attention_bias": False, "mlp_bias": False,
              "bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id, "pad_token_id": llm.pad_token_id,
              "torch_dtype": DTYPE_NAMES[dtype], "use_cache": True}
    if llm.rope_scaling is not None:  # Llama-3.1's: written as the checkpoint has it
        config["rope_scaling"] = llm.rope_scaling
    return config


def write_hf_llm(checkpoint: Path, bundle: Path, llm: LlmConfig, skip: tuple[str, ...],
                 progress=lambda i, n, name: None) -> tuple[list[Path], str]:
    """``bundle/llm-hf/`` from the checkpoint's LLM tensors; returns (the files written, the dtype's name)."""
    store = TensorStore(checkpoint)
    plan = [t for t in plan_tensors(store, llm, "F32", skip) if t.file is not None]  # not the computed rope factors
    dtypes = {store.info(t.source).dtype for t in plan}
    if len(dtypes) != 1 or next(iter(dtypes)) not in DTYPE_NAMES:
        raise CheckpointError(f"{checkpoint}: the LLM's tensors are {sorted(map(str, dtypes))}; --llm-type hf "
                              "writes one of float32, float16, bfloat16")
    dtype = dtypes.pop()
    shards: list[list] = [[]]
    size = 0
    for t in plan:
        nbytes = store.info(t.source).dtype.itemsize * math.prod(t.shape)
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += nbytes
    out = bundle / HF_FOLDER
    out.mkdir()
    written, weight_map, total, done = [], {}, 0, 0
    for i, shard in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for t in shard:
            tensor = store.get(t.source).contiguous()
            tensors[t.source] = tensor
            weight_map[t.source] = name
            total += tensor.numel() * tensor.element_size()
            done += 1
            progress(done, len(plan), t.source)
        save_file(tensors, str(out / name), metadata={"format": "pt"})
        written.append(out / name)
        del tensors
    if len(shards) > 1:
        index = out / "model.safetensors.index.json"
        index.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
        written.append(index)
    config = out / "config.json"
    config.write_text(json.dumps(llama_config(llm, dtype), indent=2) + "\n")
    written.append(config)
    for name in TOKENIZER_FILES + ("generation_config.json",):
        source = Path(checkpoint) / name
        if source.is_file():
            shutil.copyfile(source, out / name)
            written.append(out / name)
    if not (out / "generation_config.json").exists():
        generation = {"bos_token_id": llm.bos_token_id, "eos_token_id": llm.eos_token_id,
                      "pad_token_id": llm.pad_token_id}
        (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
        written.append(out / "generation_config.json")
    if not any(p.name in ("tokenizer.model", "tokenizer.json") for p in written):
        raise CheckpointError(f"{checkpoint}: no tokenizer.model or tokenizer.json to put beside the HF weights")
    return written, DTYPE_NAMES[dtype]
