"""The vLLM backend on a LLaVA-Mini bundle (`--llm-type hf --llm-type F32`): the pre-fused prompt rows go to a real
vLLM server (one for the module, loopback, stopped by its PID) and the answers are the llama.cpp backend's and the
transformers reference's, token for token, for a wide and a tall image, and in a second chat turn."""

from __future__ import annotations

import pytest
from support.reference_mini import ReferenceMini
from support.vllm_server import VllmServer

import convllava_edge
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.export.probe_images import probe_images
from convllava_edge.model import AskOptions

GREEDY = AskOptions(max_tokens=10, sampling=SamplingOptions(temperature=0.0))
QUESTIONS = ["What is in the picture?", "How many shapes are there?"]


@pytest.fixture(scope="module")
def bundle(mini, exported):
    sft, clip = mini
    return exported(sft, clip, vision_types=("fp32",), llm_type="F32", hf=True)


@pytest.fixture(scope="module")
def models(bundle, tmp_path_factory):
    server = VllmServer(bundle / "llm-hf", tmp_path_factory.mktemp("vllm-log") / "vllm.log", "mini",
                        "--enable-prompt-embeds")
    here = convllava_edge.load(bundle, cache=False)
    there = convllava_edge.load(bundle, cache=False, llm_backend="vllm", llm_url=server.url)
    yield here, there
    here.close()
    there.close()
    server.stop()


def test_prefused_rows_answer_token_exact(models, mini):
    here, there = models
    reference = ReferenceMini(*mini)
    wide, tall = probe_images(5, seed=40)[3], probe_images(5, seed=41)[4]
    for image in (wide, tall):
        for question in QUESTIONS:
            ours = there.ask(image, question, GREEDY)
            assert ours.n_image_tokens == 1 and ours.token_ids
            assert ours.token_ids == here.ask(image, question, GREEDY).token_ids, question
            assert ours.token_ids == reference.generate([image], [(question, None)], GREEDY.max_tokens), question


def test_a_second_chat_turn_is_the_llamacpp_backends(models):
    here, there = models
    image = probe_images(5, seed=40)[3]
    turns = [[chat.ask(q).token_ids for q in QUESTIONS] for chat in (m.chat(image, GREEDY) for m in (here, there))]
    assert turns[0] == turns[1] and all(turns[1])
