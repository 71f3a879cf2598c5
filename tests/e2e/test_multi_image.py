"""Several images in one conversation (ConvLLaVA), token-exact against the reference's multi-image data flow.

LLaVA's convention: "<image>\\n" once per image before the text of the turn it came with, in the order given; every
placeholder replaced by its image's projected rows as prepare_inputs_labels_for_multimodal does (the reference,
tests/support/reference.py, splits the ids at each IMAGE_TOKEN_INDEX itself). The bundle: F32 GGUF + fp32 ONNX from
the tiny bf16 .bin checkpoint, greedy; exactness as in test_e2e.py. Through Python, ``ask``, ``chat`` and ``serve``
with the openai client (the ``token_ids`` field).
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

import convllava_edge
from convllava_edge.backends.base import SamplingOptions
from convllava_edge.cli.main import main
from convllava_edge.export.probe_images import probe_images
from convllava_edge.model import AskOptions

from support.reference import ReferencePipeline
from support.serving import Server

GREEDY = AskOptions(max_tokens=12, sampling=SamplingOptions(temperature=0.0))
KEY = "multi-image-key"


@pytest.fixture(scope="module")
def f32_bundle(tiny, exported):
    return exported(tiny.bin_ckpt, vision_types=("fp32",), llm_type="F32")  # shared with test_e2e.py


@pytest.fixture(scope="module")
def reference(tiny):
    return ReferencePipeline(tiny.bin_ckpt, tiny.tower)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict:
    """Three images of different shapes and contents, as files."""
    folder = tmp_path_factory.mktemp("pictures")
    made = {"a": probe_images(5, seed=40)[3], "b": probe_images(5, seed=41)[4], "c": probe_images(5, seed=42)[1]}
    for name, image in made.items():
        image.save(folder / f"{name}.png")
    return {name: folder / f"{name}.png" for name in made}


@pytest.fixture(scope="module")
def model(f32_bundle):
    return convllava_edge.load(f32_bundle, cache=False)


def opened(path) -> Image.Image:
    return Image.open(path)


def test_two_images_in_one_question_are_token_exact(model, reference, pictures):
    question = "Which picture has more shapes?"
    answer = model.ask([pictures["a"], pictures["b"]], question, GREEDY)
    assert answer.token_ids == reference.generate([[opened(pictures["a"]), opened(pictures["b"])]],
                                                  [(question, None)], 12)
    assert answer.n_image_tokens == 32  # 16 each
    swapped = model.ask([pictures["b"], pictures["a"]], question, GREEDY)  # the order given is the order placed
    assert swapped.token_ids == reference.generate([[opened(pictures["b"]), opened(pictures["a"])]],
                                                   [(question, None)], 12)


def test_three_images_across_two_turns_are_token_exact_and_reuse_the_first_turn(model, reference, pictures):
    a, b, c = (opened(pictures[k]) for k in "abc")
    chat = model.chat([pictures["a"], pictures["b"]], GREEDY)
    first = chat.ask("Compare the two pictures.")
    expected1 = reference.generate([[a, b]], [("Compare the two pictures.", None)], 12)
    assert first.token_ids == expected1
    second = chat.ask("And this one?", image=pictures["c"])
    turns = [("Compare the two pictures.", reference.decode(expected1)), ("And this one?", None)]
    assert second.token_ids == reference.generate([[a, b], [c]], turns, 12)
    # the follow-up evaluates only what follows the first turn: its two images and text come from the KV cache
    assert second.cached_tokens >= first.n_prompt_positions and second.n_image_tokens == 48
    assert second.n_evaluated == second.n_prompt_positions - second.cached_tokens
    assert second.timings["encode_ms"] > 0  # c is new; a and b were not encoded again (their rows in hand)


def test_a_second_image_after_an_answer_is_token_exact(model, reference, pictures):
    a, b = opened(pictures["a"]), opened(pictures["b"])
    chat = model.chat(pictures["a"], GREEDY)
    first = chat.ask("How many shapes are there?")
    expected1 = reference.generate(a, [("How many shapes are there?", None)], 12)
    assert first.token_ids == expected1
    second = chat.ask("Is this one different?", image=pictures["b"])
    turns = [("How many shapes are there?", reference.decode(expected1)), ("Is this one different?", None)]
    assert second.token_ids == reference.generate([[a], [b]], turns, 12)
    assert second.cached_tokens >= first.n_prompt_positions  # everything before the new image, reused


def test_an_image_seen_before_in_the_conversation_is_not_encoded_again(model, pictures):
    chat = model.chat(pictures["a"], GREEDY)  # the model has no disk cache: only the embeddings in memory
    chat.ask("What is in the image?")
    again = chat.ask("Look at it once more.", image=pictures["a"])
    assert again.timings["encode_ms"] == 0.0 and again.cache_hit
    assert again.n_image_tokens == 32  # placed twice, as sent


def test_native_aspect_applies_per_image(model, pictures):
    native = AskOptions(max_tokens=2, sampling=SamplingOptions(temperature=0.0), aspect="native")
    each = [model.embed(pictures[k], "native") for k in "ab"]
    # a wide and a tall image: each its own grid (6 x 2 and 2 x 6 here, not the square's 4 x 4)
    assert [e.embeds.shape[0] for e in each] == [12, 12] and each[0].slot != each[1].slot
    assert model.ask([pictures["a"], pictures["b"]], "Which is wider?", native).n_image_tokens == 24


def test_cli_ask_takes_several_images_and_chat_adds_one_later(f32_bundle, reference, pictures, capsys, monkeypatch,
                                                              tmp_path):
    monkeypatch.setenv("CONVLLAVA_EDGE_CACHE", str(tmp_path / "cache"))
    question = "Which picture has more shapes?"
    assert main(["ask", str(pictures["a"]), str(pictures["b"]), question, "--model", str(f32_bundle), "--json",
                 "--temperature", "0", "--max-tokens", "12", "--no-cache"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["token_ids"] == reference.generate([[opened(pictures["a"]), opened(pictures["b"])]],
                                                     [(question, None)], 12)
    lines = io.StringIO("How many shapes are there?\n/image " + str(pictures["b"]) + "\nIs this one different?\n\n")
    monkeypatch.setattr("sys.stdin", lines)
    assert main(["chat", str(pictures["a"]), "--model", str(f32_bundle), "--temperature", "0", "--max-tokens", "12",
                 "--no-cache"]) == 0
    out, err = capsys.readouterr()
    expected1 = reference.generate(opened(pictures["a"]), [("How many shapes are there?", None)], 12)
    turns = [("How many shapes are there?", reference.decode(expected1)), ("Is this one different?", None)]
    expected2 = reference.generate([[opened(pictures["a"])], [opened(pictures["b"])]], turns, 12)
    assert out.splitlines() == [reference.decode(expected1), reference.decode(expected2)]
    assert "b.png added" in err and "2 images in this conversation" in err


def test_too_many_images_for_the_context_is_one_line_with_the_arithmetic(f32_bundle, pictures, capsys):
    args = ["ask", str(pictures["a"]), str(pictures["b"]), str(pictures["c"]), "hi", "--model", str(f32_bundle),
            "--max-tokens", "2020", "--no-cache"]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 3 images x 16 tokens + ") and "+ up to 2020 answer tokens > the context's 2048" in err


def _url(path) -> dict:
    data = base64.b64encode(path.read_bytes()).decode()
    return {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}}


@pytest.fixture(scope="module")
def server(f32_bundle, tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("multi-serve"), "--model", str(f32_bundle), "--api-key", KEY,
               "--max-images", "3")
    yield s
    s.stop()


def test_serve_takes_several_images_per_turn_and_in_later_turns(server, reference, pictures):
    a, b, c = (opened(pictures[k]) for k in "abc")
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    # the parts in any order: a turn's images go before its text, in the order given
    first_turn = {"role": "user", "content": [_url(pictures["a"]), {"type": "text", "text": "Compare them."},
                                              _url(pictures["b"])]}
    r1 = client.chat.completions.create(model="tiny", messages=[first_turn], temperature=0, max_tokens=12)
    expected1 = reference.generate([[a, b]], [("Compare them.", None)], 12)
    assert r1.model_extra["token_ids"] == expected1 and r1.usage.prompt_tokens_details.image_tokens == 32
    follow = [first_turn, {"role": "assistant", "content": r1.choices[0].message.content},
              {"role": "user", "content": [{"type": "text", "text": "And this one?"}, _url(pictures["c"])]}]
    r2 = client.chat.completions.create(model="tiny", messages=follow, temperature=0, max_tokens=12)
    turns = [("Compare them.", reference.decode(expected1)), ("And this one?", None)]
    assert r2.model_extra["token_ids"] == reference.generate([[a, b], [c]], turns, 12)
    assert r2.usage.prompt_tokens_details.cached_tokens >= r1.usage.prompt_tokens  # the first turn, from the slot
    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).text
    cached = next(float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("convllava_edge_cached_prompt_tokens_total"))
    assert cached >= r2.usage.prompt_tokens_details.cached_tokens  # /metrics counts the reuse
    too_many = [{"role": "user", "content": [_url(pictures[k]) for k in "abca"] + [{"type": "text", "text": "?"}]}]
    with pytest.raises(openai.BadRequestError, match="4 images in one request, more than the 3"):
        client.chat.completions.create(model="tiny", messages=too_many, max_tokens=2)


def test_ollama_takes_several_images_on_a_message(server, reference, pictures):
    a, b = opened(pictures["a"]), opened(pictures["b"])
    images = [base64.b64encode(pictures[k].read_bytes()).decode() for k in "ab"]
    body = {"model": "tiny", "stream": False, "options": {"temperature": 0, "num_predict": 12},
            "messages": [{"role": "user", "content": "Compare them.", "images": images}]}
    r = httpx.post(server.url + "/api/chat", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["token_ids"] == reference.generate([[a, b]], [("Compare them.", None)], 12)
