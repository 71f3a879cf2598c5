"""The published request schemas (convllava_edge/serve/schema.py) against the parsers they describe, in process:
every body a parser accepts is valid under its route's schema, every body of the wrong type that the schema
refuses the parser refuses too (a 400, never another exception), on bodies generated from the schemas themselves
(tests/support/http_bodies.py) and on valid bodies with one field replaced by arbitrary JSON. Derandomized and bounded."""

from __future__ import annotations

import json

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from support.http_bodies import VALID, from_schema, mutated

from convllava_edge.serve import ollama, schema
from convllava_edge.serve.wire import ApiError, parse_chat

SETTINGS = settings(max_examples=300, derandomize=True, deadline=None, database=None,
                    suppress_health_check=list(HealthCheck))
MAX_IMAGE = 1 << 20


# one field of the wrong type per route: the schema and the parser both refuse each
WRONG = {
    "/v1/chat/completions": [{"messages": "hi"}, {"messages": []}, {"max_tokens": "4"}, {"max_tokens": 0},
                             {"temperature": True}, {"top_p": 0}, {"seed": -1}, {"n": 2}, {"stop": [1]},
                             {"stream": "yes"}, {"stream_options": []}, {"model": 5},
                             {"messages": [{"role": "robot", "content": "x"}]},
                             {"messages": [{"role": "user", "content": [{"type": "audio"}]}]},
                             {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
                             {"messages": [{"role": "user", "content": 3}]},
                             {"response_format": {"type": "yaml"}}, {"response_format": "json"},
                             {"response_format": {"type": "json_schema", "json_schema": {"schema": []}}},
                             {"logprobs": "yes"}, {"top_logprobs": 21}, {"tools": [{"type": "function"}]},
                             {"frequency_penalty": 0.5}],
    "/api/chat": [{"messages": {}}, {"options": []}, {"stream": 1}, {"model": []},
                  {"messages": [{"role": "user", "content": 1}]},
                  {"messages": [{"role": "user", "content": "x", "images": "abc"}]},
                  {"format": "yaml"}, {"format": 3}, {"think": True}, {"tools": [{}]}, {"top_logprobs": -1},
                  {"options": {"top_k": 40}}],
    "/api/generate": [{"prompt": 1}, {"system": 2}, {"images": [1]}, {"options": {"temperature": "hot"}}],
    "/api/show": [{"model": 1}, {"name": ["x"]}, {"model": None}],
}


def parse(path: str, body) -> bool:
    """Whether the route's parser accepts ``body`` (ApiError: refused; anything else raised fails the test)."""
    try:
        if path == "/v1/chat/completions":
            parse_chat(body, MAX_IMAGE, None)
        elif path == "/api/show":
            ollama.show_name(body)
        else:
            ollama.parse(path.rsplit("/", 1)[1], body, MAX_IMAGE)
    except ApiError as e:
        assert e.status in (400, 413), (e.status, e.message)
        return False
    return True


def valid(path: str, body) -> bool:
    return jsonschema.Draft7Validator(schema.REQUESTS[path]).is_valid(body)


@pytest.mark.parametrize("path", list(schema.REQUESTS))
def test_the_valid_examples_pass_both_and_every_wrong_field_fails_both(path):
    assert parse(path, VALID[path]) and valid(path, VALID[path])
    for change in WRONG[path]:
        body = {**VALID[path], **change}
        assert not valid(path, body), change
        assert not parse(path, body), change


@pytest.mark.parametrize("path", list(schema.REQUESTS))
def test_what_a_parser_accepts_its_schema_accepts(path):
    @SETTINGS
    @given(st.one_of(from_schema(schema.REQUESTS[path]), mutated(path)))
    def check(body):
        if parse(path, body):
            assert valid(path, body), json.dumps(body)[:500]

    check()


@pytest.mark.parametrize("path", list(schema.REQUESTS))
def test_the_generator_makes_bodies_its_schema_accepts(path):
    @settings(SETTINGS, max_examples=100)
    @given(from_schema(schema.REQUESTS[path]))
    def check(body):
        assert valid(path, body), json.dumps(body)[:500]

    check()
