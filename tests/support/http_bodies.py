"""Request bodies for fuzzing serve's routes: a valid body per POST route, arbitrary JSON values, and a valid body
with one place (a field, an item, the whole) replaced by one (tests/fuzz)."""

from __future__ import annotations

import base64
import io
import json

from hypothesis import strategies as st
from PIL import Image


def _png() -> str:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(out, "PNG")
    return base64.b64encode(out.getvalue()).decode()


PNG = _png()
VALID = {
    "/v1/chat/completions": {"model": "shapes-demo", "max_tokens": 4, "temperature": 0.5, "top_p": 0.9, "seed": 1, "n": 1,
                             "stop": ["\n"], "stream": True, "stream_options": {"include_usage": True},
                             "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": [  # several images, in several turns
                                              {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}},
                                              {"type": "text", "text": "How many?"},
                                              {"type": "image_url", "image_url": {"url": "data:image/png;base64," + PNG}}]},
                                          {"role": "assistant", "content": "2"},
                                          {"role": "user", "content": [
                                              {"type": "text", "text": "Colors?"},
                                              {"type": "image_url", "image_url": "data:image/png;base64," + PNG}]}]},
    "/api/chat": {"model": "shapes-demo:latest", "stream": False, "options": {"temperature": 0, "seed": 3, "num_predict": 5,
                                                                      "stop": ["x"], "top_p": 0.5},
                  "messages": [{"role": "user", "content": "How many?", "images": [PNG, PNG]}]},
    "/api/generate": {"model": "shapes-demo", "prompt": "How many?", "system": "Be brief.", "images": [PNG], "stream": True,
                      "options": {"num_predict": -1}},
    "/api/show": {"model": "shapes-demo"},
}
# Text with a lone surrogate now and then: JSON's "\\ud800" escapes parse to one (issue 32: 500s), and Hypothesis'
# own text() never draws one.
lone_surrogates = st.builds(lambda head, bad: head + bad, st.text(max_size=5), st.sampled_from(["\ud800", "\udfff", "\udcff"]))
texts = st.text(max_size=8) | lone_surrogates
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | texts,
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
                           max_leaves=8)
# Nesting past the server's limit (64) and past Python's parser (~1000: RecursionError, issue 32: 500s)
deep_json = st.integers(60, 3000).map(lambda n: b"[" * n + b"]" * n)


def places(value, prefix=()):
    """Every place in a JSON value: tuples of keys and indices."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from places(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from places(v, prefix + (i,))


def replaced(value, path, new):
    if not path:
        return new
    copy = json.loads(json.dumps(value))
    target = copy
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = new
    return copy


@st.composite
def mutated(draw, path: str):
    base = VALID[path]
    where = draw(st.sampled_from(list(places(base))))
    return replaced(base, where, draw(json_values))


# JSON Schema keywords from_schema reads: those convllava_edge/serve/schema.py uses. A strategy of our own because
# hypothesis-jsonschema (0.23, 2024) fails on current Hypothesis' internals; any other keyword is an error here, so
# a schema that grows one is not fuzzed with it silently ignored.
KEYWORDS = {"type", "properties", "required", "additionalProperties", "items", "minItems", "maxItems", "enum",
            "const", "oneOf", "minimum", "maximum", "exclusiveMinimum", "minLength", "description"}
_SCALARS = {"null": st.none(), "boolean": st.booleans(), "string": st.text(max_size=12)}


def from_schema(schema: dict) -> st.SearchStrategy:
    """Values valid under ``schema`` (for the keywords above), with arbitrary extra properties where allowed."""
    unknown = set(schema) - KEYWORDS
    if unknown:
        raise ValueError(f"from_schema: keywords {sorted(unknown)} are not generated")
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "oneOf" in schema:
        return st.one_of([from_schema(s) for s in schema["oneOf"]])
    kinds = schema.get("type", ["null", "boolean", "integer", "number", "string", "array", "object"])
    return st.one_of([_typed(schema, kind) for kind in ([kinds] if isinstance(kinds, str) else kinds)])


def _typed(schema: dict, kind: str) -> st.SearchStrategy:
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=max(12, schema.get("minLength", 0)))
    if kind in ("integer", "number"):
        low, high = schema.get("minimum"), schema.get("maximum")
        if kind == "integer":
            return st.integers(min_value=low, max_value=high)
        return st.floats(min_value=low if low is not None else schema.get("exclusiveMinimum"), max_value=high,
                         exclude_min="exclusiveMinimum" in schema, allow_nan=False, allow_infinity=False)
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=schema.get("maxItems", max(3, schema.get("minItems", 0))))
    if kind == "object":
        properties = schema.get("properties", {})
        required = set(schema.get("required", ()))
        fixed = st.fixed_dictionaries({k: from_schema(v) for k, v in properties.items() if k in required},
                                      optional={k: from_schema(v) for k, v in properties.items() if k not in required})
        if schema.get("additionalProperties") is not True:
            return fixed
        extra = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in properties), json_values, max_size=2)
        return st.builds(lambda a, b: {**b, **a}, fixed, extra)
    return _SCALARS[kind]
