"""The three seams, without torch or llama.cpp: families chosen by name, backends chosen in one place, and
the pipeline's pieces (tokenizer, KV cache record and disk states, decoder, Model) driven through the
LLM-backend interface by a pure-Python backend (support/fake_llm.py), with and without its optional
capabilities."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from convllava_edge.backends import open_llm, open_vision_backend
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.cache import DiskCache
from convllava_edge.decoding import Decoder
from convllava_edge.default_model import DEMO_BUNDLE
from convllava_edge.errors import BundleError, ConfigError
from convllava_edge.families import Family, family_for, known, register, unregister
from convllava_edge.families.convllava import ConvLlava
from convllava_edge.families.llava_mini import LlavaMini
from convllava_edge.kv_cache import KvCache
from convllava_edge.manifest import Manifest, load_manifest
from convllava_edge.model import AskOptions, Model
from convllava_edge.prompt import ImageSlot
from convllava_edge.tokenizer import PromptTokenizer
from support.fake_llm import BOS, EOS, FULL, NONE, OFFSET, FakeLlm

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "shapes-1.png"  # the repository's, installed or not
GREEDY = AskOptions(max_tokens=16, sampling=SamplingOptions(temperature=0.0))


def ids(text: str) -> list[int]:
    return [OFFSET + ord(c) for c in text]


# -- families ------------------------------------------------------------------------------------
def test_family_for_gives_each_builtin_by_its_manifest_name():
    assert isinstance(family_for("convllava"), ConvLlava) and isinstance(family_for("llava-mini"), LlavaMini)
    assert {"convllava", "llava-mini"} <= set(known())


def test_an_unknown_family_is_one_line_naming_the_known_ones():
    with pytest.raises(BundleError, match=r"manifest.json: unknown family 'no-such' \(known: convllava, llava-mini"):
        family_for("no-such")


def test_a_manifest_of_an_unknown_family_is_refused_and_of_a_registered_one_accepted():
    data = load_manifest(DEMO_BUNDLE, verify=False).to_dict()
    data["family"] = "toy-seams"
    with pytest.raises(BundleError, match="unknown family 'toy-seams'"):
        Manifest.from_dict(data)

    class Toy(Family):
        name = "toy-seams"
        graphs = {"vision": (["pixel_values"], ["image_embeds"])}

    register(Toy())
    try:
        assert Manifest.from_dict(data).family == "toy-seams"
    finally:
        unregister("toy-seams")  # registered for this test only: no later test sees it
    with pytest.raises(BundleError, match="unknown family 'toy-seams'"):
        Manifest.from_dict(data)


def test_a_family_with_a_graph_the_entry_lacks_is_refused():
    data = load_manifest(DEMO_BUNDLE, verify=False).to_dict()
    data["family"] = "llava-mini"
    data["tokens_per_image"]["compressed"] = 1
    with pytest.raises(BundleError, match="lacks the clip, compress, prefusion graph"):
        Manifest.from_dict(data)


# -- backends ------------------------------------------------------------------------------------
def test_the_vision_backend_loads_and_runs_a_graph_checking_its_names():
    manifest = load_manifest(DEMO_BUNDLE)
    backend = open_vision_backend("cpu", 1)
    graph = backend.load(DEMO_BUNDLE / manifest.vision[0].graph, ["pixel_values"], ["image_embeds"])
    out = graph.run(["image_embeds"], {"pixel_values": np.zeros((1, 3, 256, 256), np.float32)})[0]
    assert out.shape == (1, 16, manifest.n_embd) and backend.providers == ["CPUExecutionProvider"]
    with pytest.raises(BundleError, match="expected inputs \\['pixels'\\]"):
        backend.load(DEMO_BUNDLE / manifest.vision[0].graph, ["pixels"], ["image_embeds"])


def test_unknown_backends_and_devices_are_refused_by_name():
    with pytest.raises(ConfigError, match="unknown vision backend 'tensorflow' \\(known: onnxruntime, openvino\\)"):
        open_vision_backend(kind="tensorflow")
    with pytest.raises(ConfigError, match="unknown LLM backend 'tensorrt-llm' \\(known: llama.cpp, vllm\\)"):
        open_llm("x.gguf", kind="tensorrt-llm")
    with pytest.raises(ConfigError, match="a vLLM server, not a GGUF file"):
        open_llm("x.gguf", kind="vllm")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        open_vision_backend("tpu")


# -- tokenizer -----------------------------------------------------------------------------------
def test_prompt_tokenizer_splices_the_image_and_parses_specials():
    llm = FakeLlm()
    tok = PromptTokenizer(llm, {"kind": "sentencepiece", "add_space_prefix": True, "space_after_special": True})
    slot = ImageSlot("k", 3)
    items = tok.items("A <image>\nB</s>C", slot)
    assert items[0] == BOS and items.count(BOS) == 1  # the second chunk's BOS is dropped
    at = items.index(slot)
    assert items[1:at] == ids(" A ")
    assert items[at + 1:] == ids(" \nB") + [EOS] + ids(" C")


def test_prompt_tokenizer_adds_no_space_after_a_special_when_the_checkpoint_does_not():
    llm = FakeLlm()
    tok = PromptTokenizer(llm, {"kind": "sentencepiece", "add_space_prefix": True, "space_after_special": False})
    assert tok.chunk("A</s>USER") == [BOS] + ids(" A") + [EOS] + ids("USER")


# -- decoder -------------------------------------------------------------------------------------
def test_decoder_holds_a_stop_string_split_across_tokens_and_never_evaluates_the_last_token():
    llm = FakeLlm(script=list("Hi##there"))
    decoder = Decoder(llm, GREEDY, stops=["##"])
    assert "".join(decoder.run()) == "Hi" and decoder.reason == "stop"
    assert decoder.tokens == ids("Hi##") and llm.n_past == 3  # "H", "i", "#" evaluated; the second "#" not


def test_decoder_hides_a_generated_header_and_reports_eos_and_length():
    llm = FakeLlm(script=["<|eot|>", "O", "K", "</s>"])
    decoder = Decoder(llm, GREEDY, stops=[], hidden_prefix=[3])
    assert "".join(decoder.run()) == "OK" and decoder.reason == "eos" and decoder.visible_tokens == ids("OK")
    llm.script = list("abcdef")
    decoder = Decoder(llm, dataclasses.replace(GREEDY, max_tokens=3), stops=[])
    assert "".join(decoder.run()) == "abc" and decoder.reason == "length"


def test_decoder_without_token_ids_still_streams_text():
    llm = FakeLlm(script=list("yes"), capabilities=NONE)
    decoder = Decoder(llm, GREEDY, stops=[])
    assert "".join(decoder.run()) == "yes" and decoder.tokens == [] and decoder.n_generated == 3


# -- KV cache ------------------------------------------------------------------------------------
def items_with(slot_key: str, question: str) -> list:
    return [BOS, *ids("SYS"), ImageSlot(slot_key, 2), *ids(question)]


ROWS = {"a": np.ones((2, 8), np.float32), "b": np.zeros((2, 8), np.float32)}


def test_kv_cache_evaluates_only_what_differs_from_what_it_holds():
    llm = FakeLlm()
    kv = KvCache(llm, family_for("convllava"), "sha")
    assert kv.prefill(items_with("a", "Q1"), ROWS) == 8
    assert kv.prefill(items_with("a", "Q2"), ROWS) == 1  # only the last token differs
    assert kv.prefill(items_with("b", "Q2"), ROWS) == 4  # another image: from the slot on


def test_kv_cache_of_a_family_that_fuses_the_image_into_the_text_restarts_for_another_image():
    llm = FakeLlm()
    kv = KvCache(llm, family_for("llava-mini"), "sha")
    kv.prefill(items_with("a", "Q1"), ROWS)
    assert kv.prefill(items_with("b", "Q1"), ROWS) == 8


def test_kv_cache_without_kv_reuse_evaluates_every_prompt_whole():
    llm = FakeLlm(capabilities=dataclasses.replace(FULL, kv_reuse=False))
    kv = KvCache(llm, family_for("convllava"), "sha")
    kv.prefill(items_with("a", "Q1"), ROWS)
    assert kv.prefill(items_with("a", "Q1"), ROWS) == 8


def test_kv_states_on_disk_start_a_new_process_after_the_image_and_need_save_state(tmp_path):
    store = DiskCache(tmp_path)
    KvCache(FakeLlm(), family_for("convllava"), "sha", store).prefill(items_with("a", "Q1"), ROWS)
    fresh = FakeLlm()
    assert KvCache(fresh, family_for("convllava"), "sha", store).prefill(items_with("a", "Q2"), ROWS) == 2
    assert fresh.evaluated[-2:] == ids("Q2")
    no_state = FakeLlm(capabilities=dataclasses.replace(FULL, save_state=False))
    assert KvCache(no_state, family_for("convllava"), "sha", store).prefill(items_with("a", "Q2"), ROWS) == 8
    other_gguf = KvCache(FakeLlm(), family_for("convllava"), "other sha", store)
    assert other_gguf.prefill(items_with("a", "Q2"), ROWS) == 8


# -- Model over the LLM-backend interface ---------------------------------------------------------
def demo_model(llm: FakeLlm, tmp_path) -> Model:
    return Model(DEMO_BUNDLE, device="cpu", threads=1, cache=DiskCache(tmp_path), llm=llm)


@pytest.mark.parametrize("capabilities", [FULL, NONE], ids=["every capability", "none (a vLLM server)"])
def test_model_answers_and_chats_through_any_llm_backend(tmp_path, capabilities):
    # " 3": SentencePiece's answers start with a space-prefixed piece, so the next turn's tokens match them
    llm = FakeLlm(n_embd=load_manifest(DEMO_BUNDLE).n_embd, script=list(" 3") + ["</s>"], capabilities=capabilities)
    model = demo_model(llm, tmp_path)
    chat = model.chat(EXAMPLE, GREEDY)
    first = chat.ask("How many shapes?")
    assert first.text == "3" and first.n_image_tokens == 36 and first.stop_reason == "eos"  # 384 px: 6 x 6
    assert first.token_ids == (ids(" 3") if capabilities.token_ids else [])
    assert ("rows", 36) in llm.evaluated  # the image's rows were injected
    llm.script = list("red") + ["</s>"]
    second = chat.ask("Which color?")
    assert second.text == "red" and chat.turns[0] == ("How many shapes?", "3")
    whole = second.n_prompt_positions
    # with kv_reuse: only what follows the first prompt and its evaluated answer (" 3"; "</s>" was never evaluated)
    assert second.n_evaluated == (whole if not capabilities.kv_reuse else whole - first.n_prompt_positions - 2)


def test_a_model_with_a_backend_of_another_width_is_refused(tmp_path):
    with pytest.raises(BundleError, match="embedding width 8 differs"):
        demo_model(FakeLlm(n_embd=8), tmp_path)


def test_one_switch_turns_every_disk_cache_off(tmp_path):
    llm = FakeLlm(n_embd=load_manifest(DEMO_BUNDLE).n_embd, script=list("3") + ["</s>"])
    model = demo_model(llm, tmp_path)
    model.cache = None
    assert model.images.store is None and model.kv.store is None
    model.ask(EXAMPLE, "How many?", GREEDY)
    assert not any(tmp_path.iterdir())


def test_one_question_encodes_first_frees_the_graphs_then_loads_the_llm():
    model = Model(DEMO_BUNDLE, device="cpu", threads=1, cache=False, defer_llm=True,
                  context_for=("How many shapes are there?", 8))
    assert model.llm is None  # nothing of the LLM in memory while the image is encoded
    stream = model.ask_once(EXAMPLE, "How many shapes are there?", dataclasses.replace(GREEDY, max_tokens=8))
    assert model.vision is None and model.llm is not None  # the graphs went before the LLM came
    answer = "".join(stream)
    assert answer == stream.answer.text and stream.answer.n_image_tokens == 36
    # sized to the prompt (36 image rows, the rendered text's bytes, BOS, 8 tokens; rounded up to 256)
    assert model.llm.n_ctx == model.context_bound("How many shapes are there?", 8) == 256 < model.llm.n_ctx_train
    with pytest.raises(ConfigError, match="released its vision graphs"):
        model.embed(EXAMPLE, "crop")
    model.close()
