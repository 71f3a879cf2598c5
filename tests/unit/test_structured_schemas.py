"""Structured answers, without a model: which schemas are enforced or refused (and where), the request fields of
both APIs (each implemented, without effect, or refused unless neutral), and the wire forms of response_format,
format and logprobs."""

from __future__ import annotations

import typing

import ollama._types as ollama_types
import pydantic
import pytest
from openai.types.chat import completion_create_params

from convllava_edge.serve import ollama as ollama_api
from convllava_edge.serve.wire import (OPENAI_IMPLEMENTED, OPENAI_NO_EFFECT, OPENAI_REFUSED, ApiError, parse_chat,
                                       response_format)
from convllava_edge.structured import MAX_SCHEMA_DEPTH, SchemaError, constraint_of, from_gbnf, from_schema, json_object

MESSAGES = [{"role": "user", "content": "How many shapes are there?"}]


class Shape(pydantic.BaseModel):
    kind: typing.Literal["circle", "square", "triangle"]
    color: str = pydantic.Field(max_length=12, description="its color")


class Scene(pydantic.BaseModel):
    count: int
    shapes: list[Shape] = pydantic.Field(max_length=4)
    note: str | None = None


def test_a_pydantic_schema_with_refs_and_annotations_becomes_a_grammar():
    c = from_schema(Scene)
    assert c.kind == "json_schema" and c.schema["$defs"]["Shape"]["title"] == "Shape"
    assert 'root ::= "{" space count-kv' in c.grammar and '"\\"circle\\""' in c.grammar
    # the port's string character admitted raw control characters, which JSON refuses inside strings
    assert 'char ::= [^"\\\\\\x7F\\x00-\\x1F]' in c.grammar
    assert from_schema(Scene).grammar == c.grammar  # the same schema, the same (cached) grammar


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
def _openai_fields() -> set[str]:
    return set(typing.get_type_hints(completion_create_params.CompletionCreateParamsBase)) | {"stream"}


def test_every_openai_request_field_is_implemented_without_effect_or_refused():
    known = OPENAI_IMPLEMENTED | set(OPENAI_NO_EFFECT) | set(OPENAI_REFUSED)
    assert _openai_fields() <= known, sorted(_openai_fields() - known)
    assert not (OPENAI_IMPLEMENTED & set(OPENAI_REFUSED)) and not (OPENAI_IMPLEMENTED & set(OPENAI_NO_EFFECT))


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


def test_every_ollama_request_field_and_option_is_implemented_without_effect_or_refused():
    fields = set(ollama_types.ChatRequest.model_fields) | set(ollama_types.GenerateRequest.model_fields)
    known = ollama_api.OLLAMA_IMPLEMENTED | set(ollama_api.OLLAMA_NO_EFFECT) | set(ollama_api.OLLAMA_REFUSED)
    assert fields <= known, sorted(fields - known)
    options = set(ollama_types.Options.model_fields)
    known = ollama_api.OLLAMA_OPTIONS_IMPLEMENTED | set(ollama_api.OLLAMA_OPTIONS_NO_EFFECT) | \
        set(ollama_api.OLLAMA_OPTIONS_REFUSED)
    assert options <= known, sorted(options - known)


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
    made = response_format({"type": "json_schema", "json_schema": {"name": "Scene", "schema": Scene.model_json_schema(),
                                                                   "strict": True}})
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
