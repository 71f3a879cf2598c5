"""serve's request conversions without a server: Ollama's bodies as the chat requests OpenAI's become, and the
image-token rule /v1/models publishes for the page (checked against the runtime's own preprocessing)."""

from __future__ import annotations

import base64
import io
from types import SimpleNamespace

import pytest
from PIL import Image

from convllava_edge.manifest import TokensPerImage
from convllava_edge.preprocess import PreprocessConfig
from convllava_edge.serve import ollama
from convllava_edge.serve.engine import image_token_rule
from convllava_edge.serve.wire import ApiError, parse_chat


def png(size=(8, 6)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, (10, 20, 30)).save(out, "PNG")
    return out.getvalue()


def test_an_ollama_chat_is_the_chat_request_of_its_openai_form():
    image, other, third = png(), png((4, 4)), png((5, 3))
    b64 = [base64.b64encode(i).decode() for i in (image, other, third)]
    chat = ollama.parse("chat", {
        "model": "demo:latest", "stream": False,
        "messages": [{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "How many?", "images": b64[:2]},
                     {"role": "assistant", "content": "3"}, {"role": "user", "content": "Colors?", "images": b64[2:]}],
        "options": {"temperature": 0, "top_p": 0.5, "seed": 7, "stop": ["\n"], "num_predict": 12, "num_ctx": 99}},
        max_image_bytes=1 << 20)
    assert chat.model == "demo:latest" and ollama.model_name(chat.model) == "demo" and not chat.stream
    assert chat.system == "Be brief." and chat.turns == [("How many?", "3"), ("Colors?", None)]
    assert chat.images == [[image, other], [third]] and chat.n_images == 3  # each message's, in order
    assert (chat.sampling.temperature, chat.sampling.top_p, chat.sampling.seed) == (0.0, 0.5, 7)
    assert chat.stop == ("\n",) and chat.max_tokens == 12


def test_ollama_defaults_and_generate():
    chat = ollama.parse("generate", {"model": "m", "prompt": "Hi?", "system": "S", "options": {"num_predict": -1}},
                        max_image_bytes=100)
    assert chat.stream and chat.max_tokens is None and chat.sampling.temperature == ollama.OLLAMA_DEFAULT_TEMPERATURE
    assert chat.system == "S" and chat.turns == [("Hi?", None)] and chat.images == [[]]


def test_openai_images_go_with_their_turn_in_the_order_given_and_are_capped():
    a, b, c = png(), png((4, 4)), png((5, 3))
    part = lambda data: {"type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(data).decode()}}
    body = {"messages": [{"role": "user", "content": [part(a), {"type": "text", "text": "Which?"}, part(b)]},
                         {"role": "assistant", "content": "the first"},
                         {"role": "user", "content": "And now?"}, {"role": "user", "content": [part(c)]}]}
    chat = parse_chat(body, 1 << 20, None)
    assert chat.images == [[a, b], [c]] and chat.turns == [("Which?", "the first"), ("And now?", None)]
    assert parse_chat(body, 1 << 20, None, max_images=3).n_images == 3
    with pytest.raises(ApiError) as e:
        parse_chat(body, 1 << 20, None, max_images=2)
    assert e.value.status == 400 and "3 images in one request, more than the 2" in e.value.message
    assert e.value.code == "too_many_images"


@pytest.mark.parametrize("kind, body, needle", [
    ("chat", {"messages": [{"role": "user", "content": "x", "images": "abc"}]}, "images must be a list"),
    ("chat", {"messages": [{"role": "user", "content": "x", "images": ["@@"]}]}, "base64 is malformed"),
    ("chat", {"messages": [{"role": "user", "content": 3}]}, "content must be a string"),
    ("chat", {"messages": []}, "messages must be a non-empty list"),
    ("chat", {"messages": [{"role": "user", "content": "x"}], "options": {"temperature": "hot"}}, "temperature"),
    ("generate", {"prompt": None}, "prompt must be a string"),
    ("generate", {"prompt": "x", "images": [base64.b64encode(b"x" * 200).decode()]}, "over 100 bytes"),
])
def test_bad_ollama_bodies_are_errors_naming_the_field(kind, body, needle):
    with pytest.raises(ApiError) as e:
        ollama.parse(kind, body, max_image_bytes=100)
    assert needle in e.value.message and e.value.status in (400, 413)


def test_the_published_image_token_rule():
    def manifest(aspect, **rule):
        return SimpleNamespace(tokens_per_image=TokensPerImage(**rule),
                               preprocess=PreprocessConfig(image_size=768, crop_size=(768, 768), aspect=aspect))
    assert image_token_rule(manifest("pad", stride=64, square=144))["per_image"] == 144
    assert image_token_rule(manifest("crop", stride=14, square=576, compressed=1))["per_image"] == 1
    native = image_token_rule(manifest("native", stride=64, square=144))
    assert "per_image" not in native and native["budget"] == 768 * 768 and native["stride"] == 64


def test_one_seed_range_everywhere():
    """llama.cpp's sampler seed is 32-bit (0xFFFFFFFF: random); seeds past it were masked, so s and s + 2**32 drew
    the same samples. Now the CLI's options, Python's and the server's all accept [0, SEED_LIMIT) and no more."""
    from convllava_edge.backends.base import SEED_LIMIT, SamplingOptions
    from convllava_edge.errors import ConfigError
    from convllava_edge.serve.wire import parse_chat

    SamplingOptions(0.5, 1.0, SEED_LIMIT - 1).validate()
    for seed in (SEED_LIMIT, 2**32, 2**40, -1, True):
        with pytest.raises(ConfigError, match="seed must be an integer"):
            SamplingOptions(0.5, 1.0, seed).validate()
    body = {"messages": [{"role": "user", "content": "hi"}]}
    assert parse_chat({**body, "seed": SEED_LIMIT - 1}, 1 << 20, None).sampling.seed == SEED_LIMIT - 1
    with pytest.raises(ApiError, match="seed must be in") as caught:
        parse_chat({**body, "seed": 2**32 + 5}, 1 << 20, None)
    assert caught.value.param == "seed"
    assert 0 <= parse_chat(body, 1 << 20, None).sampling.seed < SEED_LIMIT  # the server's own random seed
