"""Request bodies are walked once, before any parser (serve/wire.check_json): a string or key that is not text
(JSON's "\\ud800") or nesting past the limit is a 400 naming the field; the walk itself never recurses. And
checked_text's own message never re-encodes the text it refuses."""

from __future__ import annotations

import json

import pytest

from convllava_edge.errors import ConfigError
from convllava_edge.prompt import checked_text
from convllava_edge.serve.wire import MAX_JSON_DEPTH, ApiError, check_json


# -- every string of a body is text, and its depth is bounded ------------------------------------------------
def refused(value) -> ApiError:
    with pytest.raises(ApiError) as caught:
        check_json(value)
    assert caught.value.status == 400
    return caught.value


def test_every_string_of_a_body_must_be_text():
    body = {"messages": [{"role": "user", "content": [{"type": "text", "text": "ok"}, {"type": "text", "text": "a\ud800"}]}]}
    e = refused(body)
    assert e.param == "messages[0].content[1].text" and e.code == "invalid_text" and "character 1" in e.message
    e = refused({"model": "x", "options": {"\udcff": 1}})
    assert e.param == "options" and "a key of options" in e.message
    e = refused("\udfff")
    assert e.param is None and "the request body" in e.message
    check_json({"messages": [{"role": "user", "content": "é 😀 \u2028"}], "n": [1, 2.5, None, True]})


def test_depth_is_bounded_and_the_walk_does_not_recurse():
    check_json(json.loads("[" * MAX_JSON_DEPTH + "]" * MAX_JSON_DEPTH))
    e = refused(json.loads("[" * (MAX_JSON_DEPTH + 1) + "]" * (MAX_JSON_DEPTH + 1)))
    assert e.code == "too_deep"
    deep: list = []
    for _ in range(50_000):  # far past the recursion limit: an iterative walk stops at the limit all the same
        deep = [deep]
    assert refused(deep).code == "too_deep"


def test_the_message_for_a_lone_surrogate_does_not_raise_itself():
    with pytest.raises(ConfigError, match=r"the question is not valid UTF-8 \(at character 2: \\ud800\)"):
        checked_text("ab\ud800", "the question")
    with pytest.raises(ConfigError, match=r"at character 0: b'\\xff'"):  # a non-UTF-8 argument: its byte
        checked_text("\udcff", "the question")
