"""Structured answers, without a model: which schemas are enforced or refused (and where), the request fields
this server refuses unless neutral, and the wire forms of response_format, format and logprobs. (That every field
of both clients' request types is listed, and pydantic's schemas, are checked in tests/e2e/test_structured.py: the
unit tier runs without those clients.)"""

from __future__ import annotations

import pytest

from convllava_edge.serve import ollama as ollama_api
from convllava_edge.serve.wire import OPENAI_NO_EFFECT, OPENAI_REFUSED, ApiError, parse_chat, response_format
from convllava_edge.structured import MAX_SCHEMA_DEPTH, SchemaError, constraint_of, from_gbnf, from_schema, json_object

MESSAGES = [{"role": "user", "content": "How many shapes are there?"}]


@pytest.mark.parametrize("schema, keyword, path", [
    ({"type": "integer", "minimum": 0}, "minimum", "/minimum"),
    ({"type": "object", "properties": {"a": {"oneOf": [{"type": "string"}]}}}, "oneOf", "/properties/a/oneOf"),
    ({"type": "array", "items": {"type": "number", "multipleOf": 2}}, "multipleOf", "/items/multipleOf"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems", "/uniqueItems"),
    ({"type": "object", "properties": {"x": {"type": "string", "x-custom": 1}}}, "x-custom", "/properties/x/x-custom"),
    ({"allOf": [{"type": "object"}]}, "allOf", "/allOf"),
])
def test_keywords_the_grammar_would_not_enforce_are_refused_by_name_and_path(schema, keyword, path):
    with pytest.raises(SchemaError) as e:
        from_schema(schema)
    assert repr(keyword) in str(e.value) and e.value.path == path


@pytest.mark.parametrize("schema, needle", [
    ({"type": "strin"}, "type must be one of"),
    ({"type": "string", "format": "email"}, "format 'email' is not enforced"),
    ({"type": "string", "pattern": "[a-z]+"}, "anchored"),
    ({"type": "integer", "maxLength": 3}, "type string only"),
    ({"$ref": "https://example.com/s.json"}, "nothing is fetched"),
    ({"$ref": "#/$defs/Missing"}, "cannot be turned into a grammar"),
    ({"type": "array", "maxItems": 10**6}, "0..10000"),
    ([1, 2], "a JSON schema is an object"),
    ("{not json", "not JSON"),
])
def test_malformed_schemas_are_one_clear_error(schema, needle):
    with pytest.raises(SchemaError, match=None) as e:
        from_schema(schema)
    assert needle in str(e.value)


def test_schema_size_and_depth_are_capped():
    deep: dict = {"type": "string"}
    for _ in range(MAX_SCHEMA_DEPTH + 1):
        deep = {"type": "array", "items": deep}
    with pytest.raises(SchemaError, match="nested more than"):
        from_schema(deep)
    with pytest.raises(SchemaError, match="bytes"):
        from_schema({"type": "object", "properties": {f"p{i}": {"type": "string", "description": "x" * 100}
                                                      for i in range(1000)}})


def test_json_object_grammar_and_constraint_choices():
    assert json_object().grammar.startswith("\nroot   ::= object") or "root   ::= object" in json_object().grammar
    assert constraint_of() is None
    assert constraint_of(grammar='root ::= "yes"').kind == "grammar"
    with pytest.raises(SchemaError, match="not both"):
        constraint_of({"type": "object"}, 'root ::= "x"')
    with pytest.raises(SchemaError, match="empty"):
        from_gbnf("  ")
    assert from_schema({"type": "object"}).parse('{"a": 1}') == {"a": 1}
    assert from_schema({"type": "object"}).parse('{"a": ') is None  # cut by max_tokens: not repaired
    assert from_gbnf('root ::= "x"').parse("x") is None  # a grammar of the caller's: no JSON to parse


# -- the request fields of both APIs ------------------------------------------------------------------------
NON_NEUTRAL = {"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto",
               "parallel_tool_calls": True, "functions": [{"name": "f"}], "function_call": "auto",
               "logit_bias": {"1": 5}, "frequency_penalty": 0.5, "presence_penalty": 1, "audio": {"voice": "x"},
               "modalities": ["text", "audio"], "prediction": {"type": "content", "content": "x"},
               "web_search_options": {}, "reasoning_effort": "low", "verbosity": "low", "moderation": {}}


@pytest.mark.parametrize("field", sorted(OPENAI_REFUSED))
def test_each_refused_openai_field_is_a_400_naming_it_unless_neutral(field):
    with pytest.raises(ApiError) as e:
        parse_chat({"messages": MESSAGES, field: NON_NEUTRAL[field]}, 1000, None)
    assert e.value.status == 400 and e.value.param == field and field in e.value.message
    for neutral in OPENAI_REFUSED[field][0]:
        parse_chat({"messages": MESSAGES, field: neutral}, 1000, None)  # a client's defaults pass


def test_openai_fields_without_effect_pass():
    parse_chat({"messages": MESSAGES, **{name: "x" for name in OPENAI_NO_EFFECT}}, 1000, None)


OLLAMA_NON_NEUTRAL = {"tools": [{"type": "function"}], "think": True, "raw": True, "template": "{{ .Prompt }}",
                      "suffix": "x", "context": [1, 2], "width": 512, "height": 512, "steps": 4}


@pytest.mark.parametrize("field", sorted(ollama_api.OLLAMA_REFUSED))
def test_each_refused_ollama_field_is_a_400_naming_it(field):
    with pytest.raises(ApiError) as e:
        ollama_api.parse("generate", {"prompt": "hi", field: OLLAMA_NON_NEUTRAL[field]}, 1000)
    assert e.value.status == 400 and e.value.param == field


@pytest.mark.parametrize("option", sorted(ollama_api.OLLAMA_OPTIONS_REFUSED))
def test_each_refused_ollama_option_is_a_400_naming_it(option):
    value = True if option == "penalize_newline" else 2
    with pytest.raises(ApiError) as e:
        ollama_api.parse("chat", {"messages": MESSAGES, "options": {option: value}}, 1000)
    assert e.value.status == 400 and e.value.param == f"options.{option}"


# -- response_format, format, logprobs on the wire ----------------------------------------------------------
def test_response_format_forms():
    assert response_format(None) is None and response_format({"type": "text"}) is None
    assert response_format({"type": "json_object"}).kind == "json_object"
    scene = {"title": "Scene", "type": "object", "properties": {"count": {"type": "integer", "title": "Count"}},
             "required": ["count"]}
    made = response_format({"type": "json_schema", "json_schema": {"name": "Scene", "schema": scene, "strict": True}})
    assert made.kind == "json_schema" and made.schema["title"] == "Scene"
    for bad, param in [({"type": "yaml"}, "response_format.type"),
                       ({"type": "json_schema"}, "response_format.json_schema"),
                       ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "response_format.json_schema.name"),
                       ({"type": "json_schema", "json_schema": {"schema": {"type": "integer", "minimum": 1}}},
                        "response_format.json_schema.schema")]:
        with pytest.raises(ApiError) as e:
            response_format(bad)
        assert e.value.status == 400 and e.value.param == param, (bad, e.value.param)


def test_ollama_format_and_logprobs():
    chat = ollama_api.parse("chat", {"messages": MESSAGES, "format": "json", "logprobs": True, "top_logprobs": 3}, 1000)
    assert chat.constraint.kind == "json_object" and chat.logprobs == 3
    chat = ollama_api.parse("generate", {"prompt": "hi", "format": {"type": "object", "properties": {"n": {"type": "integer"}}}}, 1000)
    assert chat.constraint.kind == "json_schema" and chat.logprobs is None
    assert ollama_api.parse("generate", {"prompt": "hi", "format": ""}, 1000).constraint is None
    with pytest.raises(ApiError) as e:
        ollama_api.parse("generate", {"prompt": "hi", "format": {"type": "string", "format": "email"}}, 1000)
    assert e.value.param == "format" and "email" in e.value.message
    with pytest.raises(ApiError) as e:
        ollama_api.parse("generate", {"prompt": "hi", "format": "yaml"}, 1000)
    assert e.value.param == "format"


def test_openai_logprobs_fields():
    assert parse_chat({"messages": MESSAGES}, 1000, None).logprobs is None
    assert parse_chat({"messages": MESSAGES, "logprobs": True}, 1000, None).logprobs == 0
    assert parse_chat({"messages": MESSAGES, "logprobs": True, "top_logprobs": 20}, 1000, None).logprobs == 20
    for body, param in [({"logprobs": True, "top_logprobs": 21}, "top_logprobs"), ({"top_logprobs": 2}, "top_logprobs"),
                        ({"logprobs": "yes"}, "logprobs")]:
        with pytest.raises(ApiError) as e:
            parse_chat({"messages": MESSAGES, **body}, 1000, None)
        assert e.value.param == param
