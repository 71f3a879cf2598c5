"""The LLM side: ConvLLaVA checkpoint -> GGUF -> llama.cpp, against transformers and SentencePiece.

Reference: transformers' LlamaForCausalLM built from config.json, filled with the shard tensors the
test reads itself (bf16 values, computed in fp32). Tolerances (max |logit difference| relative to
the largest |logit|): 1e-4 with llama.cpp's KV cache in F32; 2e-3 with its default F16 KV cache,
which rounds keys and values to 11 significant bits (measured ~3e-4 on these models).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import pytest
import sentencepiece as spm
import torch
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizer

from convllava_edge.errors import CheckpointError
from convllava_edge.export.gguf_convert import convert_llm
from convllava_edge.quantize.gguf_quant import quantize_gguf, tensor_types

from convllava_edge.export.convllava import synthetic as S

F32_KV_TOLERANCE = 1e-4
F16_KV_TOLERANCE = 2e-3
GGML_TYPE_F32 = 0
PROMPTS = [
    "A chat between a curious user and an artificial intelligence assistant. USER: what color is the circle? ASSISTANT:",
    "USER: how many shapes are there? ASSISTANT: two",
    "the red square is on the left",
    " 12345 yes no",
]
TRICKY = ["Hello world", " leading space", "double  space", "\nnewline first", "trailing space ", "digits 0123456789",
          "accents: café naïve", "CJK 漢字かな", "emoji 😀🎉", "USER:", " ASSISTANT:", "USER: hi ASSISTANT: yes</s>",
          "", " ", "\n\n", "tabs\tand\rreturns"]


def reference_model(folder: Path) -> LlamaForCausalLM:
    cfg = json.loads((folder / "config.json").read_text())
    keys = ["hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "vocab_size", "rms_norm_eps", "rope_theta", "max_position_embeddings", "tie_word_embeddings"]
    model = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keys})).eval()
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin")):
        part = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, weights_only=True)
        tensors.update({k: v.float() for k, v in part.items() if not k.startswith(("model.vision_tower.", "model.mm_projector."))})
    model.load_state_dict(tensors, strict=True)
    return model


@pytest.fixture(scope="module", params=["mha-bin", "gqa-safetensors"])
def converted(request, tiny, tiny_gqa, tmp_path_factory):
    folder = tiny.bin_ckpt if request.param == "mha-bin" else tiny_gqa
    out = tmp_path_factory.mktemp("gguf") / "llm-f32.gguf"
    convert_llm(folder, out, "F32")
    return folder, out


def _llama(path: Path, f32_kv: bool) -> llama_cpp.Llama:
    kw = {"type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if f32_kv else {}
    return llama_cpp.Llama(str(path), n_ctx=512, n_batch=512, logits_all=True, verbose=False, seed=0, **kw)


def _sp_ids(folder: Path, text: str) -> list[int]:
    return [1] + spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).encode(text)


@pytest.mark.parametrize("f32_kv,tolerance", [(True, F32_KV_TOLERANCE), (False, F16_KV_TOLERANCE)])
def test_next_token_logits_match_transformers(converted, f32_kv, tolerance):
    folder, path = converted
    model, llm = reference_model(folder), _llama(path, f32_kv)
    for prompt in PROMPTS:
        ids = _sp_ids(folder, prompt)
        llm.reset()
        llm.eval(ids)
        ours = np.array(llm.scores[: len(ids)])
        with torch.no_grad():
            ref = model(torch.tensor([ids])).logits[0].numpy()
        rel = np.abs(ours - ref).max() / np.abs(ref).max()
        assert rel <= tolerance, f"{prompt!r}: relative logit error {rel:.2e} > {tolerance:.0e}"
        assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_greedy_continuations_are_identical(converted):
    folder, path = converted
    model, llm = reference_model(folder), _llama(path, f32_kv=False)
    for prompt in PROMPTS:
        ids = _sp_ids(folder, prompt)
        with torch.no_grad():
            ref = model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)[0, len(ids):].tolist()
        llm.reset()
        ours = []
        for token in llm.generate(ids, temp=0.0, top_k=1):
            ours.append(token)
            if len(ours) == 16:
                break
        assert ours == ref, prompt


@pytest.mark.parametrize("text", TRICKY)
def test_tokenization_through_the_gguf_matches_sentencepiece(converted, text):
    folder, path = converted
    vocab_only = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    ours = vocab_only.tokenize(text.encode(), add_bos=True, special=False)
    assert ours == _sp_ids(folder, text)


@pytest.mark.parametrize("text", ["</s>", "USER: a ASSISTANT: b</s>", "<s>x"])
def test_special_tokens_parse_like_the_hf_tokenizer(converted, text):
    folder, path = converted
    hf = LlamaTokenizer.from_pretrained(str(folder), legacy=True)  # llama.cpp re-adds the space prefix after specials
    vocab_only = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    assert vocab_only.tokenize(text.encode(), add_bos=True, special=True) == hf(text).input_ids


def test_metadata(converted):
    folder, path = converted
    reader = gguf.GGUFReader(str(path))
    fields = {name: f for name, f in reader.fields.items()}
    cfg = json.loads((folder / "config.json").read_text())

    def value(key):
        f = fields[key]
        return f.parts[f.data[0]].tolist()[0] if len(f.data) == 1 else None

    assert bytes(fields["general.architecture"].parts[-1]).decode() == "llama"
    assert value("llama.embedding_length") == cfg["hidden_size"]
    assert value("llama.attention.head_count_kv") == cfg["num_key_value_heads"]
    assert value("llama.context_length") == 2048
    assert value("llama.rope.freq_base") == pytest.approx(cfg["rope_theta"])
    assert value("llama.attention.layer_norm_rms_epsilon") == pytest.approx(cfg["rms_norm_eps"])
    assert value("tokenizer.ggml.bos_token_id") == 1 and value("tokenizer.ggml.eos_token_id") == 2
    assert value("tokenizer.ggml.add_bos_token") is True and value("tokenizer.ggml.add_space_prefix") is True
    assert len(fields["tokenizer.ggml.tokens"].data) == cfg["vocab_size"]
    names = {t.name for t in reader.tensors}
    assert "output.weight" in names and not any("vision" in n or "mm_projector" in n for n in names)


@pytest.fixture(scope="module")
def f32_gguf(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "llm-f32.gguf"
    convert_llm(tiny.bin_ckpt, out, "F32")
    return out


@pytest.mark.parametrize("quant,main_type", [("Q4_K_M", "Q4_K"), ("Q4_0", "Q4_0"), ("Q5_K_M", "Q5_K"),
                                             ("Q6_K", "Q6_K"), ("Q8_0", "Q8_0")])
def test_quantized_files_hold_the_requested_types(f32_gguf, tmp_path, quant, main_type):
    seen = []
    report = quantize_gguf(f32_gguf, tmp_path / f"{quant}.gguf", quant, progress=lambda i, n, name: seen.append((i, n)))
    assert report.fallbacks == [] and report.warning() is None
    assert report.tensor_types[main_type] >= 10  # the 7 block weights x 2 layers, minus llama.cpp's Q6_K picks
    assert tensor_types(report.path) == report.tensor_types
    assert seen and seen[-1][0] == seen[-1][1] == 21  # progress reached the last of 21 tensors
    llm = llama_cpp.Llama(str(report.path), n_ctx=128, verbose=False)
    assert len(list(zip(range(4), llm.generate(llm.tokenize(b"USER: hi"), temp=0.0)))) == 4


def test_fallback_is_reported_when_rows_do_not_fit(tmp_path, tiny):
    spec = S.LlamaSpec(hidden_size=384, intermediate_size=768, num_attention_heads=6, num_key_value_heads=6)
    llm = S.random_llama_state(spec, seed=5)
    vision = S.random_vision_state(S.TINY_TOWER, "mlp2x_gelu", spec.hidden_size, seed=0)
    folder = S.write_convllava_checkpoint(tmp_path / "ck", spec, S.TINY_TOWER, vision_state=vision, llm_state=llm,
                                          shards=1)
    S.write_llama_tokenizer(folder, spec.vocab_size)
    convert_llm(folder, tmp_path / "f32.gguf", "F32")
    report = quantize_gguf(tmp_path / "f32.gguf", tmp_path / "q.gguf", "Q4_K_M")
    # every 2-D tensor with rows of 384 (all but ffn_down, whose rows are 768) leaves the k-quant family
    fell = {f.tensor for f in report.fallbacks}
    assert fell == {"token_embd.weight", "output.weight"} | {
        f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up")}
    assert {f.used for f in report.fallbacks} <= {"Q5_0", "Q5_1", "Q8_0"}
    assert all("rows of 384 are not a multiple of 256" in f.reason for f in report.fallbacks)
    message = report.warning()
    assert message.startswith("llama.cpp did not use Q4_K_M for ") and "not a multiple of 256" in message


def test_unknown_tensor_fails_with_its_name(tiny, tmp_path):
    llm = S.random_llama_state(tiny.spec, seed=1)
    llm["model.layers.0.self_attn.q_norm.weight"] = torch.ones(256)
    folder = S.write_convllava_checkpoint(tmp_path / "ck", tiny.spec, S.TINY_TOWER, vision_state=tiny.vision_state,
                                          llm_state=llm, shards=1)
    S.write_llama_tokenizer(folder, tiny.spec.vocab_size)
    with pytest.raises(CheckpointError, match="cannot map tensor 'model.layers.0.self_attn.q_norm.weight'"):
        convert_llm(folder, tmp_path / "x.gguf", "F32")


def test_missing_tokenizer_is_a_clear_error(tiny, tmp_path):
    llm = S.random_llama_state(tiny.spec, seed=1)
    folder = S.write_convllava_checkpoint(tmp_path / "ck", tiny.spec, S.TINY_TOWER, vision_state=tiny.vision_state,
                                          llm_state=llm, shards=1)
    with pytest.raises(CheckpointError, match="no tokenizer.model"):
        convert_llm(folder, tmp_path / "x.gguf", "F16")


# The bf16 checkpoint's weights are exact in F16 and BF16 alike; the difference is llama.cpp rounding the
# activations to the weight's type inside each matmul (measured: F16 4.4e-4, BF16 3.1e-3 of the logits' scale).
@pytest.mark.parametrize("out_type,tolerance", [("F16", 2e-3), ("BF16", 1e-2)])
def test_half_precision_outputs_agree_with_f32(f32_gguf, tiny, tmp_path, out_type, tolerance):
    path = tmp_path / f"{out_type}.gguf"
    convert_llm(tiny.bin_ckpt, path, out_type)
    types = tensor_types(path)
    assert types[out_type] == 14 + 2 and types["F32"] == 5  # 2-D weights and token/output matrices; norms stay F32
    ids = _sp_ids(tiny.bin_ckpt, PROMPTS[0])
    logits = []
    for p in (f32_gguf, path):
        llm = _llama(p, f32_kv=True)
        llm.eval(ids)
        logits.append(np.array(llm.scores[: len(ids)]))
    assert np.abs(logits[0] - logits[1]).max() / np.abs(logits[0]).max() < tolerance
    assert (logits[0].argmax(-1) == logits[1].argmax(-1)).all()
