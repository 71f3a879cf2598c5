"""Structured answers: a JSON schema, "any JSON object" or a GBNF grammar, as the grammar llama.cpp's sampler
chain constrains the answer with (``Constraint``).

Schemas become GBNF through llama-cpp-python's own converter (``llama_cpp.llama_grammar.SchemaConverter``, a
port of llama.cpp's json-schema-to-grammar). That converter ignores keywords it does not know (``minimum``,
``multipleOf``, unknown ``format``s...) and asserts on types it does not know, so a schema first passes
``check_schema``: an allowlist of what the grammar really enforces, annotation keywords accepted, anything
else refused naming the keyword and its path. A constrained answer that validates is then guaranteed to fit
the schema, not merely likely to.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from .errors import ConfigError

MAX_SCHEMA_BYTES = 64 * 1024  # a schema is a few hundred bytes; its grammar grows with it
MAX_SCHEMA_DEPTH = 24  # nesting of the schema document itself (properties of items of properties...)
MAX_GRAMMAR_BYTES = 256 * 1024

# What the converter turns into grammar rules, per keyword. Each is enforced token by token.
ENFORCED = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "prefixItems", "minItems", "maxItems",
    "enum", "const", "anyOf", "minLength", "maxLength", "pattern", "format", "$ref", "$defs", "definitions",
})
# Annotations: they constrain nothing (pydantic writes them into every schema).
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$schema", "$id", "$comment",
                         "deprecated", "readOnly", "writeOnly"})
TYPES = frozenset({"string", "number", "integer", "boolean", "null", "object", "array"})
FORMATS = frozenset({"date", "time", "date-time", "uuid"})  # the converter's own string formats
SUBSCHEMA_MAPS = ("properties", "$defs", "definitions")  # keyword -> {name: schema}
WHY_REFUSED = {
    "oneOf": "exactly-one-of is not enforced by a grammar; use anyOf",
    "allOf": "the converter keeps only the properties of allOf's parts",
    "not": "a grammar cannot exclude a schema",
    "if": "conditional schemas are not enforced", "then": "conditional schemas are not enforced",
    "else": "conditional schemas are not enforced",
    "minimum": "numeric bounds are not enforced by the grammar", "maximum": "numeric bounds are not enforced by the grammar",
    "exclusiveMinimum": "numeric bounds are not enforced by the grammar",
    "exclusiveMaximum": "numeric bounds are not enforced by the grammar",
    "multipleOf": "numeric bounds are not enforced by the grammar",
    "uniqueItems": "a grammar cannot compare array items", "contains": "not enforced by the grammar",
    "minProperties": "not enforced by the grammar", "maxProperties": "not enforced by the grammar",
    "patternProperties": "not enforced by the grammar", "propertyNames": "not enforced by the grammar",
    "dependentRequired": "not enforced by the grammar", "dependentSchemas": "not enforced by the grammar",
    "dependencies": "not enforced by the grammar", "unevaluatedProperties": "not enforced by the grammar",
    "unevaluatedItems": "not enforced by the grammar",
}


class SchemaError(ConfigError):
    """A schema or grammar that cannot constrain an answer; ``path`` is where in it (JSON-pointer-like)."""

    def __init__(self, message: str, path: str = ""):
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class Constraint:
    """What an answer must be: ``grammar`` (GBNF, root rule ``root``) and, for JSON, the schema it came from
    (``schema``: None for "any JSON object" and for a grammar of the caller's)."""

    kind: str  # "json_schema" | "json_object" | "grammar"
    grammar: str
    schema: dict | None = None

    @property
    def is_json(self) -> bool:
        return self.kind != "grammar"

    @property
    def key(self) -> str:
        """The grammar's hash: compiled grammars are cached by it."""
        return hashlib.sha256(self.grammar.encode()).hexdigest()

    def parse(self, text: str) -> Any:
        """The answer's JSON value (JSON constraints), or None when the answer is not complete JSON (cut by
        max_tokens) or the constraint is a grammar of the caller's."""
        if not self.is_json:
            return None
        try:
            return json.loads(text)
        except ValueError:
            return None


def json_object() -> Constraint:
    """Any JSON object (OpenAI's ``json_object``, Ollama's ``format: "json"``): llama-cpp-python's JSON grammar."""
    from llama_cpp.llama_grammar import JSON_GBNF

    return Constraint("json_object", JSON_GBNF)


def from_schema(schema: Any, where: str = "schema") -> Constraint:
    """A JSON schema (a dict, a pydantic model class, or JSON text) as a Constraint; a SchemaError naming
    ``where`` and the place in the schema for what cannot be enforced."""
    schema = _as_schema(schema, where)
    text = json.dumps(schema, ensure_ascii=False)  # key order kept: the grammar writes properties in it
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"{where}: the schema is over {MAX_SCHEMA_BYTES:,} bytes")
    return Constraint("json_schema", _grammar_of(text, where), schema)


def from_gbnf(text: str, where: str = "grammar") -> Constraint:
    """A GBNF grammar of the caller's (root rule ``root``). Its syntax is llama.cpp's to judge: the backend
    compiles it before the first token and reports llama.cpp's message."""
    if not isinstance(text, str) or not text.strip():
        raise SchemaError(f"{where}: the grammar is empty")
    if len(text.encode("utf-8", errors="replace")) > MAX_GRAMMAR_BYTES:
        raise SchemaError(f"{where}: the grammar is over {MAX_GRAMMAR_BYTES:,} bytes")
    if "\x00" in text:
        raise SchemaError(f"{where}: the grammar holds a NUL character")
    return Constraint("grammar", text)


def constraint_of(schema: Any = None, grammar: str | None = None, where: str = "") -> Constraint | None:
    """The Constraint a caller asks for: a schema, or a grammar, or neither (None); both is an error."""
    if schema is not None and grammar is not None:
        raise SchemaError("a JSON schema or a grammar constrains an answer, not both")
    if schema is not None:
        return from_schema(schema, where or "schema")
    if grammar is not None:
        return from_gbnf(grammar, where or "grammar")
    return None


def load(value: str, what: str) -> Any:
    """A CLI value: a file's path or the JSON / GBNF text itself (``what``: "--json-schema" or "--grammar")."""
    from .files import read_text_file

    def read(limit: int) -> str:
        return "\n".join(line for _, line in read_text_file(Path(value), what, limit, limit))

    if what == "--grammar":
        return read(MAX_GRAMMAR_BYTES)
    text = value if value.lstrip().startswith("{") else read(MAX_SCHEMA_BYTES)
    try:
        return json.loads(text)
    except ValueError as e:
        raise SchemaError(f"{what} {value if len(value) < 80 else value[:77] + '...'}: not JSON ({e})") from None


def _as_schema(schema: Any, where: str) -> dict:
    if isinstance(schema, type) and hasattr(schema, "model_json_schema"):  # a pydantic model class
        schema = schema.model_json_schema()
    elif isinstance(schema, (str, bytes)):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise SchemaError(f"{where}: not JSON ({e})") from None
    if not isinstance(schema, dict):
        raise SchemaError(f"{where}: a JSON schema is an object, got {type(schema).__name__}")
    check_schema(schema, where)
    return schema


def check_schema(schema: dict, where: str = "schema") -> None:
    """A SchemaError for the first keyword the grammar would not enforce, naming it and its path."""
    stack: list[tuple[Any, str, int]] = [(schema, "", 1)]
    while stack:
        node, path, depth = stack.pop()
        at = f"{where} at {path or '/'}"
        if depth > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"{at}: nested more than {MAX_SCHEMA_DEPTH} levels deep", path)
        if isinstance(node, bool):  # true / false schemas: only as additionalProperties
            continue
        if not isinstance(node, dict):
            raise SchemaError(f"{at}: a schema must be an object, got {type(node).__name__}", path)
        for key, value in node.items():
            here = f"{path}/{key}"
            if key in ANNOTATIONS:
                continue
            if key not in ENFORCED:
                why = WHY_REFUSED.get(key, "unknown to the grammar converter")
                raise SchemaError(f"{where}: keyword {key!r} at {here} is not supported ({why})", here)
            _check_keyword(key, value, here, where, node)
            if key in SUBSCHEMA_MAPS:
                stack += [(sub, f"{here}/{name}", depth + 1) for name, sub in value.items()]
            elif key in ("items", "additionalProperties") and isinstance(value, dict):
                stack.append((value, here, depth + 1))
            elif key in ("anyOf", "prefixItems") or (key == "items" and isinstance(value, list)):
                stack += [(sub, f"{here}/{i}", depth + 1) for i, sub in enumerate(value)]


def _check_keyword(key: str, value: Any, here: str, where: str, node: dict) -> None:
    def refuse(message: str):
        raise SchemaError(f"{where}: {here}: {message}", here)

    if key == "type":
        types = value if isinstance(value, list) else [value]
        unknown = [t for t in types if not isinstance(t, str) or t not in TYPES]
        if unknown or not types:
            refuse(f"type must be one of {', '.join(sorted(TYPES))} (or a list of them), got {value!r}")
    elif key in SUBSCHEMA_MAPS:
        if not isinstance(value, dict):
            refuse(f"{key} must be an object")
    elif key == "required":
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            refuse("required must be a list of property names")
    elif key == "additionalProperties":
        if not isinstance(value, (bool, dict)):
            refuse("additionalProperties must be a boolean or a schema")
    elif key in ("items", "prefixItems"):
        if not isinstance(value, (dict, list)) or (key == "prefixItems" and not isinstance(value, list)):
            refuse(f"{key} must be a schema" + (" list" if key == "prefixItems" else " or a list of schemas"))
        if key == "prefixItems" and "items" in node:
            refuse("prefixItems beside items is not enforced")
    elif key in ("minItems", "maxItems", "minLength", "maxLength"):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 10_000:
            refuse(f"{key} must be an integer in 0..10000, got {value!r}")
        if key in ("minLength", "maxLength") and node.get("type") != "string":
            refuse(f"{key} is enforced on a schema of type string only")
    elif key == "enum":
        if not isinstance(value, list) or not value:
            refuse("enum must be a non-empty list")
    elif key == "anyOf":
        if not isinstance(value, list) or not value:
            refuse("anyOf must be a non-empty list of schemas")
    elif key == "pattern":
        if not isinstance(value, str) or not value.startswith("^") or not value.endswith("$"):
            refuse("pattern must be a string anchored with ^ and $ (the whole value matches it)")
    elif key == "format":
        if value not in FORMATS:
            refuse(f"format {value!r} is not enforced (enforced: {', '.join(sorted(FORMATS))})")
    elif key == "$ref":
        if not isinstance(value, str) or not value.startswith("#/"):
            refuse("only references inside the schema (#/...) are followed; nothing is fetched")


# The port's string character admits raw control characters, which JSON forbids inside strings (json.loads
# refuses them): llama.cpp's C++ converter excludes them, and so does this rule, written over the port's.
_PORT_CHAR = 'char ::= [^"\\\\] |'
_JSON_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] |'


def _json_chars(grammar: str) -> str:
    lines = grammar.split("\n")
    return "\n".join(_JSON_CHAR + line[len(_PORT_CHAR):] if line.startswith(_PORT_CHAR) else line for line in lines)


@lru_cache(maxsize=256)
def _grammar_of(text: str, where: str) -> str:
    """The converter's GBNF for a checked schema (cached by the schema's canonical text)."""
    from llama_cpp.llama_grammar import SchemaConverter

    converter = SchemaConverter(prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False)
    try:
        schema = converter.resolve_refs(json.loads(text), "schema")
        converter.visit(schema, "")
        return _json_chars(converter.format_grammar())
    except (AssertionError, AttributeError, IndexError, KeyError, ValueError, TypeError, RecursionError) as e:
        # the converter's own refusals (an unresolvable $ref, a pattern it cannot translate) are asserts
        detail = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        raise SchemaError(f"{where}: the schema cannot be turned into a grammar ({detail})") from None
