"""The request bodies and error shapes of serve's routes as JSON Schema, published at /openapi.json.

The routes take raw requests and check them by hand (wire.py, ollama.py: unknown fields pass, each known field
of the wrong type is a 400 naming it), so FastAPI can infer nothing; these schemas say what those parsers take.
Every object allows additional properties (clients send fields newer than ours). A schema states the types and
ranges the parser checks; what a schema cannot say (a conversation must end with the user's turn, text that is
valid Unicode, the server's caps: --max-images per request, --max-image-bytes each) the parser still refuses: whatever the parser accepts, the schema
accepts (tests/fuzz/test_fuzz_http_schema.py checks both directions on generated bodies).
"""

from __future__ import annotations

from ..backends.base import MAX_TEMPERATURE, MAX_TOP_LOGPROBS, SEED_LIMIT
from .ollama import OLLAMA_OPTIONS_REFUSED, OLLAMA_REFUSED
from .wire import MAX_STOP, OPENAI_REFUSED

SEED_MAX = SEED_LIMIT - 1  # wire.py: seed in [0, SEED_LIMIT)


def _object(properties: dict, required: tuple[str, ...] = ()) -> dict:
    out = {"type": "object", "properties": properties, "additionalProperties": True}
    if required:
        out["required"] = list(required)
    return out


_NULLABLE_INT = {"type": ["integer", "null"]}
_TEXT = {"type": "string"}
_STOP = {"oneOf": [{"type": "null"}, {"type": "string", "minLength": 1},
                   {"type": "array", "items": {"type": "string", "minLength": 1}, "maxItems": MAX_STOP}]}
_SAMPLING = {
    "temperature": {"type": ["number", "null"], "minimum": 0, "maximum": MAX_TEMPERATURE},
    "top_p": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": 1},
    "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": SEED_MAX},
}

def _refused(fields: dict) -> dict:
    """A field this server refuses unless it holds a neutral value: the schema allows those values only."""
    return {name: {"description": f"{what}: not supported; only a client's neutral default is accepted",
                   "enum": list(neutral)} for name, (neutral, what) in fields.items()}


JSON_SCHEMA = {"type": "object", "additionalProperties": True,
               "description": "a JSON schema of the supported subset (docs/structured.md); other keywords are a 400 "
                              "naming them"}
# -- OpenAI: /v1/chat/completions ------------------------------------------------------------------------
RESPONSE_FORMAT = {"oneOf": [
    {"type": "null"},
    _object({"type": {"const": "text"}}, ("type",)),
    _object({"type": {"const": "json_object"}}, ("type",)),
    _object({"type": {"const": "json_schema"}, "json_schema": _object({
        "name": {"type": ["string", "null"], "description": "1-64 letters, digits, _ or -"},
        "schema": JSON_SCHEMA, "strict": {"type": ["boolean", "null"]}, "description": {"type": ["string", "null"]},
    })}, ("type", "json_schema")),
]}
IMAGE_URL = {"description": "a data:image/...;base64, URL, or file:// inside --media-dir", "type": "string"}
CONTENT_PART = {"oneOf": [
    _object({"type": {"const": "text"}, "text": _TEXT}, ("type", "text")),
    _object({"type": {"const": "image_url"},
             "image_url": {"oneOf": [IMAGE_URL, _object({"url": IMAGE_URL}, ("url",))]}}, ("type", "image_url")),
]}
TOOL = _object({"type": {"const": "function"}, "function": _object({
    "name": {"type": "string", "description": "1-64 letters, digits, _ or -; unique among the tools"},
    "description": {"type": ["string", "null"]}, "parameters": {"oneOf": [{"type": "null"}, JSON_SCHEMA]}},
    ("name",))}, ("function",))
TOOL_CALL = _object({"id": _TEXT, "type": {"const": "function"}, "function": _object({
    "name": _TEXT, "arguments": {"type": "string", "description": "JSON text"}}, ("name",))}, ("id", "function"))
MESSAGE = _object({
    "role": {"enum": ["system", "developer", "user", "assistant", "tool"]},
    "content": {"oneOf": [{"type": "string"}, {"type": "null"}, {
        "type": "array", "items": CONTENT_PART,
        "description": "text and image_url parts; a user turn's images go before its text, in the order given "
                       "(at most --max-images, 8 by default, in the whole request)"}]},
    "tool_calls": {"oneOf": [{"type": "null"}, {"type": "array", "items": TOOL_CALL, "minItems": 1}],
                   "description": "an assistant turn's calls, sent back"},
    "tool_call_id": {"type": ["string", "null"], "description": "a tool message: the call it answers"},
}, ("role",))
TOOLS = {"type": ["array", "null"], "items": TOOL, "description": "docs/structured.md: the generic tool format"}
CHAT_REQUEST = _object({
    "model": {"type": ["string", "null"]},
    "messages": {"type": "array", "items": MESSAGE, "minItems": 1},
    "max_tokens": {"type": ["integer", "null"], "minimum": 1},
    "max_completion_tokens": {"type": ["integer", "null"], "minimum": 1},
    "n": {"type": ["integer", "null"], "minimum": 1, "maximum": 1},
    **_SAMPLING,
    "stop": _STOP,
    "stream": {"type": ["boolean", "null"]},
    "stream_options": {"oneOf": [{"type": "null"}, _object({"include_usage": {"type": ["boolean", "null"]}})]},
    "response_format": RESPONSE_FORMAT,
    "tools": TOOLS,
    "tool_choice": {"oneOf": [{"type": "null"}, {"enum": ["none", "auto", "required"]},
                              _object({"type": {"const": "function"}, "function": _object({"name": _TEXT}, ("name",))},
                                      ("function",))]},
    "parallel_tool_calls": {"type": ["boolean", "null"]},
    "logprobs": {"type": ["boolean", "null"]},
    "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS,
                     "description": "with logprobs: true"},
    **_refused(OPENAI_REFUSED),
}, ("messages",))
OPENAI_ERROR = _object({"error": _object({
    "message": _TEXT, "type": _TEXT, "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]},
}, ("message", "type", "param", "code"))}, ("error",))

# -- Ollama: /api/chat, /api/generate, /api/show -----------------------------------------------------------
_IMAGES = {"type": ["array", "null"], "items": {"type": "string", "description": "base64 of an image file"},
           "description": "this message's images, in order (at most --max-images, 8 by default, in the request)"}
OLLAMA_OPTIONS = {"oneOf": [{"type": "null"}, _object({
    **_SAMPLING, "stop": _STOP,
    "num_predict": {"type": ["integer", "null"], "description": "-1 or -2: until the end", "minimum": -2},
    **_refused(OLLAMA_OPTIONS_REFUSED),
})]}
_OLLAMA_COMMON = {"model": {"type": ["string", "null"]}, "stream": {"type": ["boolean", "null"]},
                  "options": OLLAMA_OPTIONS,
                  "format": {"oneOf": [{"type": "null"}, {"enum": ["", "json"]}, JSON_SCHEMA]},
                  "logprobs": {"type": ["boolean", "null"]},
                  "top_logprobs": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
                  **_refused(OLLAMA_REFUSED)}
OLLAMA_CHAT = _object({
    **_OLLAMA_COMMON,
    "messages": {"type": "array", "minItems": 1, "items": _object({
        "role": {"enum": ["system", "user", "assistant", "tool"]}, "content": _TEXT, "images": _IMAGES,
        "tool_calls": {"type": ["array", "null"], "items": _object({"function": _object({
            "name": _TEXT, "arguments": {"type": ["object", "string"]}}, ("name",))}, ("function",))},
        "tool_name": {"type": ["string", "null"]}}, ("role",))},
    "tools": TOOLS,
}, ("messages",))
OLLAMA_GENERATE = _object({**_OLLAMA_COMMON, "prompt": _TEXT, "system": {"type": ["string", "null"]},
                           "images": _IMAGES}, ("prompt",))
OLLAMA_SHOW = _object({"model": _TEXT, "name": _TEXT})
OLLAMA_ERROR = _object({"error": _TEXT}, ("error",))

REQUESTS = {"/v1/chat/completions": CHAT_REQUEST, "/api/chat": OLLAMA_CHAT, "/api/generate": OLLAMA_GENERATE,
            "/api/show": OLLAMA_SHOW}
ERROR_STATUSES = {400: "a field of the wrong type or out of range (param names it)", 401: "no valid API key",
                  403: "a Host or Origin that may not use this server", 404: "a model not served here",
                  408: "the request was not received in time", 413: "a body or image over the limits",
                  503: "loading, or the queue is full (Retry-After)", 504: "the request took too long"}


def route_docs(path: str) -> dict:
    """What a POST route's decorator adds to the OpenAPI document (FastAPI's ``openapi_extra``)."""
    error = OLLAMA_ERROR if path.startswith("/api/") else OPENAI_ERROR
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": REQUESTS[path]}}},
            "responses": {str(status): {"description": text, "content": {"application/json": {"schema": error}}}
                          for status, text in ERROR_STATUSES.items()}}


__all__ = ["CHAT_REQUEST", "OLLAMA_CHAT", "OLLAMA_ERROR", "OLLAMA_GENERATE", "OLLAMA_SHOW", "OPENAI_ERROR",
           "REQUESTS", "route_docs"]
