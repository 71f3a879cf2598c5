"""`export --llm-type hf`: the LLM as a Hugging Face LlamaForCausalLM folder (llm-hf/) in the bundle, for engines
that load HF weights (vLLM). Checked against transformers (the folder loads with every key and no other, its
logits are the reference Llama's, its tokenizer tokenizes as the checkpoint's) and against the llama.cpp
path of the same bundle (greedy tokens from the F32 GGUF); both families; hf alone and beside a GGUF."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from support.reference import reference_llm, shard_tensors
from transformers import AutoTokenizer, LlamaForCausalLM

import convllava_edge
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.cli.main import main
from convllava_edge.errors import BundleError
from convllava_edge.manifest import load_manifest

TEXT = "A chat about shapes: how many are there? Three, 3 circles."


@pytest.fixture(scope="module")
def bundle(tiny, exported):
    """ConvLLaVA, bf16 safetensors shards: hf beside an F32 GGUF."""
    return exported(tiny.st_ckpt, vision_types=("fp32",), llm_type="F32", hf=True)


def load_hf(folder: Path) -> LlamaForCausalLM:
    model, info = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def test_the_folder_is_a_llama_transformers_loads_with_the_reference_logits(bundle, tiny):
    manifest = load_manifest(bundle, verify=True)  # every file of llm-hf/ is hashed in the manifest
    hf = manifest.llm_hf
    assert hf.folder == "llm-hf" and hf.dtype == "bfloat16" and manifest.llm.type == "F32"
    assert {Path(f).name for f in hf.files} >= {"config.json", "model.safetensors", "tokenizer.model",
                                                 "tokenizer_config.json", "generation_config.json"}
    assert json.loads((bundle / "llm-hf" / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    ids = torch.tensor([[1, 5, 77, 300, 12, 480, 2, 9]])
    with torch.no_grad():
        ours, reference = load_hf(bundle / "llm-hf")(ids).logits, reference_llm(tiny.st_ckpt)(ids).logits
    assert torch.equal(ours, reference)  # the same bf16 values, the same fp32 arithmetic
    ours_tok, theirs = AutoTokenizer.from_pretrained(bundle / "llm-hf"), AutoTokenizer.from_pretrained(tiny.st_ckpt)
    assert ours_tok(TEXT).input_ids == theirs(TEXT).input_ids


def test_greedy_tokens_in_transformers_are_the_f32_ggufs(bundle):
    model = convllava_edge.load(bundle, cache=False)
    llm = model.llm
    ids = llm.tokenize(TEXT, add_bos=True)
    llm.eval_tokens(ids)
    ours = [step.token for step in llm.generate(SamplingOptions(temperature=0.0), 12)]
    model.close()
    hf = load_hf(bundle / "llm-hf")
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), max_new_tokens=len(ours), do_sample=False, eos_token_id=None)
    assert out[0, len(ids):].tolist() == ours


def test_llava_mini_hf_alone_and_what_the_runtime_says_of_it(mini, tmp_path):
    sft, clip = mini
    out = tmp_path / "mini-hf"
    assert main(["export", str(sft), "--out", str(out), "--vision-tower", str(clip), "--llm-type", "hf"]) == 0
    manifest = load_manifest(out, verify=True)
    assert manifest.llm is None and manifest.llm_hf is not None and manifest.tokenizer["kind"] == "bpe"
    assert [p.name for p in out.glob("*.gguf")] == ["llm-vocab.gguf"]  # the vocabulary alone, for vLLM
    expected = shard_tensors(sft, lambda k: k.startswith(("model.layers.", "model.embed_tokens.", "model.norm.",
                                                           "lm_head.")))
    hf = load_hf(out / "llm-hf")
    for name, value in expected.items():  # the LLM's tensors, none of the compressor's or pre-fusion's
        assert torch.equal(hf.state_dict()[name], value.float()), name
    assert "chat_template" in json.loads((out / "llm-hf" / "tokenizer_config.json").read_text())
    assert main(["info", str(out)]) == 0
    with pytest.raises(BundleError, match="llm-hf"):
        convllava_edge.load(out, cache=False)


def test_two_gguf_types_or_none_are_refused_in_one_line(tiny, tmp_path, capsys):
    assert main(["export", str(tiny.st_ckpt), "--out", str(tmp_path / "x"), "--llm-type", "F32",
                 "--llm-type", "Q8_0"]) != 0
    assert "one GGUF type per bundle" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
