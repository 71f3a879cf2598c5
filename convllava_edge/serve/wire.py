"""The OpenAI chat-completions wire format: a request body checked into a ChatRequest, and the error object
(shapes as openai-python's ``types/chat`` declare them; the response and chunk objects: replies.py).

Checked by hand, not by a pydantic model: unknown fields must pass (clients send new ones), and every
known field of the wrong type or out of range is a 400 naming it, in OpenAI's error object.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import MAX_TEMPERATURE, MAX_TOP_LOGPROBS, SEED_LIMIT, SamplingOptions
from ..structured import Constraint, SchemaError, from_schema, json_object
from ..tools import ToolError, Tools, parse_choice, parse_tools, render_calls, render_result
from .media import MediaDir, MediaError

MAX_STOP = 4  # OpenAI's limit on stop sequences
DEFAULT_MAX_IMAGES = 8  # images per request (--max-images)
DATA_URL = re.compile(r"data:(image/[\w.+-]+)?(;[\w=.+-]+)*;base64,", re.IGNORECASE)


class ApiError(Exception):
    """An error the client sees: HTTP status and OpenAI's error object."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


MAX_JSON_DEPTH = 64  # a chat body is 6 levels deep; Python's json parser itself recurses (RecursionError past ~1000)


def check_json(value: Any) -> None:
    """A 400 naming the field for the first string, key or value, that is not text, or for nesting deeper than
    MAX_JSON_DEPTH, anywhere in a parsed body. JSON's ``"\\ud800"`` parses to a lone surrogate, which no
    encoder takes: checked here once, before any parser, so that every text field (system prompts and
    Ollama's prompt included) is refused alike. Iterative: the walk itself cannot exceed the recursion limit."""
    stack = [(value, "", 1)]  # the body itself is level 1
    while stack:
        item, where, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise bad(f"{where or 'the request body'}: JSON nested more than {MAX_JSON_DEPTH} levels deep",
                      where or None, "too_deep")
        if isinstance(item, str):
            bad_at = _not_text(item)
            if bad_at is not None:
                raise bad(f"{where or 'the request body'} is not valid Unicode text (a lone surrogate at character "
                          f"{bad_at})", where or None, "invalid_text")
        elif isinstance(item, dict):
            for key, child in reversed(item.items()):
                if _not_text(key) is not None:
                    raise bad(f"a key of {where or 'the request body'} is not valid Unicode text (a lone surrogate)",
                              where or None, "invalid_text")
                stack.append((child, f"{where}.{key}" if where else key, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{where}[{i}]", depth + 1) for i, child in reversed(list(enumerate(item))))


def _not_text(text: str) -> int | None:
    """Where ``text`` cannot be encoded as UTF-8 (a lone surrogate), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        return e.start


@dataclass
class ChatRequest:
    model: str | None
    turns: list[tuple[str, str | None]]  # (question, earlier answer or None for the one asked)
    images: list[list[bytes]]  # per turn, its images in the order given (before its text, whatever the parts' order)
    system: str | None
    max_tokens: int | None
    sampling: SamplingOptions
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    extra: dict[str, Any] = field(default_factory=dict)
    constraint: Constraint | None = None  # response_format (Ollama: format)
    logprobs: int | None = None  # None: no logprobs; else top_logprobs alternatives (0..20)
    tools: Tools | None = None  # tools, tool_choice, parallel_tool_calls (tools.py)

    @property
    def n_images(self) -> int:
        return sum(len(t) for t in self.images)


# Each field OpenAI's chat-completions request defines (openai-python's CompletionCreateParams) is implemented,
# accepted as changing nothing about the answer, or refused with a 400 naming it unless it holds its neutral
# value: never ignored while the client believes it applied (tests/unit/test_request_fields.py walks them).
OPENAI_IMPLEMENTED = frozenset({"model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p",
                                "seed", "stop", "stream", "stream_options", "n", "response_format", "logprobs",
                                "top_logprobs", "tools", "tool_choice", "parallel_tool_calls"})
OPENAI_NO_EFFECT = {  # bookkeeping of OpenAI's service: nothing of the answer depends on them
    "user": "an end-user id for OpenAI's abuse monitoring", "safety_identifier": "the same, newer name",
    "metadata": "tags for OpenAI's stored completions", "store": "OpenAI's storage (this server stores nothing)",
    "service_tier": "OpenAI's processing tier", "prompt_cache_key": "OpenAI's prompt-cache routing",
    "prompt_cache_retention": "OpenAI's prompt-cache lifetime", "prompt_cache_options": "OpenAI's prompt cache",
}
NOT_YET = "is not supported by this server"
OPENAI_REFUSED = {  # field -> (its neutral values, what it is)
    "functions": ((None, []), "function calling (the deprecated form: use tools)"),
    "function_call": ((None, "none"), "function calling (the deprecated form: use tool_choice)"), "logit_bias": ((None, {}), "logit bias"),
    "frequency_penalty": ((None, 0, 0.0), "a frequency penalty"), "presence_penalty": ((None, 0, 0.0), "a presence penalty"),
    "audio": ((None,), "audio output"), "modalities": ((None, ["text"]), "output modalities other than text"),
    "prediction": ((None,), "predicted outputs"), "web_search_options": ((None,), "web search"),
    "reasoning_effort": ((None,), "reasoning effort"), "verbosity": ((None,), "verbosity"),
    "moderation": ((None,), "moderation"),
}


def refuse_unsupported(body: dict, refused: dict, where: str = "") -> None:
    """A 400 naming the first field of ``refused`` that holds other than its neutral values."""
    for name, (neutral, what) in refused.items():
        if name in body and not any(body[name] == v and type(body[name]) is type(v) for v in neutral):
            param = f"{where}.{name}" if where else name
            raise bad(f"{param}: {what} {NOT_YET}", param, "unsupported_parameter")


def response_format(value: Any, param: str = "response_format") -> Constraint | None:
    """OpenAI's response_format: text (None), json_object, or json_schema {name, schema, strict}."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise bad(f"{param} must be an object", param)
    kind = value.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_object()
    if kind != "json_schema":
        raise bad(f"{param}.type must be text, json_object or json_schema, got {kind!r}", f"{param}.type")
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise bad(f"{param}.json_schema must be an object", f"{param}.json_schema")
    name = spec.get("name")
    if name is not None and not (isinstance(name, str) and re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name)):
        raise bad(f"{param}.json_schema.name must be 1-64 letters, digits, _ or -", f"{param}.json_schema.name")
    strict = spec.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise bad(f"{param}.json_schema.strict must be a boolean", f"{param}.json_schema.strict")
    return schema_constraint(spec.get("schema", {}), f"{param}.json_schema.schema")


def schema_constraint(schema: Any, param: str) -> Constraint:
    """A JSON schema from a request as a Constraint; a 400 naming ``param`` and the place in the schema."""
    if not isinstance(schema, dict):
        raise bad(f"{param} must be a JSON schema object", param, "invalid_schema")
    try:
        return from_schema(schema, param)
    except SchemaError as e:
        raise bad(str(e), param, "invalid_schema") from None


def top_logprobs(body: dict, flag: str = "logprobs", count: str = "top_logprobs") -> int | None:
    """OpenAI's (and Ollama's) logprobs flag and top_logprobs count: None when logprobs are not asked for."""
    wanted = _typed(body, flag, bool, False)
    top = _typed(body, count, int, None)
    if top is not None and not 0 <= top <= MAX_TOP_LOGPROBS:
        raise bad(f"{count} must be in 0..{MAX_TOP_LOGPROBS}, got {top}", count)
    if top is not None and top > 0 and not wanted:
        raise bad(f"{count} needs {flag}: true", count)
    return (top or 0) if wanted else None


def parse_chat(body: Any, max_image_bytes: int, media_dir: MediaDir | None,
               max_images: int = DEFAULT_MAX_IMAGES) -> ChatRequest:
    """The request's body checked, its images read (at most ``max_images``, each at most ``max_image_bytes``)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    refuse_unsupported(body, OPENAI_REFUSED)
    model = _typed(body, "model", str, None)
    n = _typed(body, "n", int, 1)
    if n != 1:
        raise bad(f"n={n}: this server returns one choice per request (n=1)", "n")
    newer, older = _typed(body, "max_completion_tokens", int, None), _typed(body, "max_tokens", int, None)
    for name, value in (("max_completion_tokens", newer), ("max_tokens", older)):  # both: a client may send both
        if value is not None and value < 1:
            raise bad(f"{name} must be at least 1, got {value}", name)
    max_tokens = newer if newer is not None else older
    temperature = _number(body, "temperature", 1.0)
    if not 0 <= temperature <= MAX_TEMPERATURE:
        raise bad(f"temperature must be in [0, {MAX_TEMPERATURE:g}], got {temperature}", "temperature")
    top_p = _number(body, "top_p", 1.0)
    if not 0 < top_p <= 1:
        raise bad(f"top_p must be in (0, 1], got {top_p}", "top_p")
    seed = _typed(body, "seed", int, None)
    if seed is not None and not 0 <= seed < SEED_LIMIT:
        raise bad(f"seed must be in [0, {SEED_LIMIT}), got {seed} (llama.cpp's seeds are 32-bit)", "seed")
    stop = body.get("stop")
    stops = () if stop is None else (stop,) if isinstance(stop, str) else tuple(stop) if isinstance(stop, list) else None
    if stops is None or not all(isinstance(s, str) and s for s in stops) or len(stops) > MAX_STOP:
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP}", "stop")
    stream = _typed(body, "stream", bool, False)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options must be an object", "stream_options")
    include_usage = _typed(options or {}, "include_usage", bool, False, "stream_options.include_usage")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    tools = request_tools(body)
    sent = sum(1 for m in messages if isinstance(m, dict) and isinstance(m.get("content"), list)
               for part in m["content"] if isinstance(part, dict) and part.get("type") == "image_url")
    if sent > max_images:  # counted before any is decoded
        raise bad(f"{sent} images in one request, more than the {max_images} this server takes (--max-images)",
                  "messages", "too_many_images")
    system, turns, images = _conversation(messages, max_image_bytes, media_dir)
    sampling = SamplingOptions(temperature=temperature, top_p=top_p,
                               seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little") % SEED_LIMIT)
    constraint = response_format(body.get("response_format"))
    if constraint is not None and tools is not None and tools.active:
        raise bad("response_format and tools both constrain the answer: send one", "response_format")
    return ChatRequest(model, turns, images, system, max_tokens, sampling, stops, stream, include_usage,
                       constraint=constraint, logprobs=top_logprobs(body), tools=tools)


def request_tools(body: dict) -> Tools | None:
    """tools, tool_choice and parallel_tool_calls as Tools (None: no tools offered); a 400 naming the field."""
    try:
        offered = parse_tools(body.get("tools"))
        choice = parse_choice(body.get("tool_choice"), offered)
    except ToolError as e:
        raise bad(str(e), e.path or "tools", "invalid_tools") from None
    parallel = _typed(body, "parallel_tool_calls", bool, True)
    return Tools(offered, choice, parallel) if offered else None


def _typed(obj: dict, name: str, kind: type, default: Any, param: str | None = None) -> Any:
    value = obj.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; JSON's true is not a number here, and 1 is not a boolean
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise bad(f"{param or name} must be {_article(kind)}, got {type(value).__name__}", param or name)
    return value


def _number(obj: dict, name: str, default: float) -> float:
    value = obj.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise bad(f"{name} must be a finite number, got {value!r}", name)
    return float(value)


def _article(kind: type) -> str:
    return {str: "a string", int: "an integer", bool: "a boolean"}.get(kind, kind.__name__)


def _conversation(messages: list, max_image_bytes: int, media_dir: MediaDir | None):
    """(system text or None, turns, each turn's images): messages merged by role (two user messages in a row are
    one turn, their images in order), the last one the user's."""
    system_parts: list[str] = []
    merged: list[list] = []  # [role, text parts, images]
    calls: dict[str, str] = {}  # tool_call_id -> the function's name, of the assistant turns so far
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise bad(f"{where} must be an object", where)
        role = message.get("role")
        if role not in ("system", "developer", "user", "assistant", "tool"):
            raise bad(f"{where}.role must be system, user, assistant or tool, got {role!r}", f"{where}.role")
        if role == "tool":  # a tool's result: the user's side of the conversation carries it (tools.py)
            texts, images = [_tool_result(message, where, calls)], []
            role = "user"
        else:
            texts, images = _content(message.get("content"), where, max_image_bytes, media_dir)
        if role == "assistant" and message.get("tool_calls") is not None:
            texts.append(_assistant_calls(message["tool_calls"], f"{where}.tool_calls", calls))
        if role in ("system", "developer"):
            if merged or images:
                raise bad(f"{where}: a system message comes first and holds text only", where)
            system_parts += texts
            continue
        if images and role != "user":
            raise bad(f"{where}: only user messages may hold images", where)
        if merged and merged[-1][0] == role:
            merged[-1][1] += texts
            merged[-1][2] += images
        else:
            merged.append([role, texts, images])
    if not merged or merged[0][0] != "user" or merged[-1][0] != "user":
        raise bad("the conversation must start and end with a user message", "messages")
    turns, images = [], []
    for n in range(0, len(merged), 2):
        question = "\n".join(merged[n][1]).strip()
        answer = "\n".join(merged[n + 1][1]) if n + 1 < len(merged) else None
        if not question:
            raise bad(f"user message {n // 2 + 1} has no text: ask something about the image", "messages")
        turns.append((question, answer))
        images.append(merged[n][2])
    return ("\n".join(system_parts) or None), turns, images


def _assistant_calls(value: Any, where: str, calls: dict[str, str]) -> str:
    """An assistant turn's tool_calls, rendered as the model wrote them; their ids noted for the tool results."""
    if not isinstance(value, list) or not value:
        raise bad(f"{where} must be a non-empty list", where)
    out = []
    for j, call in enumerate(value):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str) or not isinstance(fn.get("name"), str):
            raise bad(f'{at} must be {{"id", "type": "function", "function": {{"name", "arguments"}}}}', at)
        arguments = fn.get("arguments", "{}")
        try:
            json.loads(arguments)
        except (TypeError, ValueError):
            raise bad(f"{at}.function.arguments must be JSON text", f"{at}.function.arguments") from None
        calls[call["id"]] = fn["name"]
        out.append((fn["name"], arguments))
    return render_calls(out)


def _tool_result(message: dict, where: str, calls: dict[str, str]) -> str:
    """A tool message: the result of an earlier call (``tool_call_id``), as the user's turn carries it."""
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or call_id not in calls:
        raise bad(f"{where}.tool_call_id {call_id!r} answers no earlier tool call"[:200], f"{where}.tool_call_id")
    content = message.get("content")
    if isinstance(content, list):  # text parts
        texts, _ = _content(content, where, 0, None)
        content = "\n".join(texts)
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string", f"{where}.content")
    return render_result(calls[call_id], content)


def _content(content: Any, where: str, max_image_bytes: int, media_dir: MediaDir | None) -> tuple[list[str], list[bytes]]:
    if isinstance(content, str):
        return [content], []
    if content is None:
        return [], []
    if not isinstance(content, list):
        raise bad(f"{where}.content must be a string or a list of parts", f"{where}.content")
    texts, images = [], []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if not isinstance(part, dict):
            raise bad(f"{at} must be an object", at)
        kind = part.get("type")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise bad(f"{at}.text must be a string", f"{at}.text")
            texts.append(text)
        elif kind == "image_url":
            url = part.get("image_url")
            url = url.get("url") if isinstance(url, dict) else url
            if not isinstance(url, str):
                raise bad(f"{at}.image_url.url must be a string", f"{at}.image_url")
            images.append(read_image_url(url, at, max_image_bytes, media_dir))
        else:
            raise bad(f"{at}.type {kind!r} is not supported (text, image_url)", f"{at}.type")
    return texts, images


def read_image_url(url: str, where: str, max_image_bytes: int, media_dir: MediaDir | None) -> bytes:
    """A data: URL's bytes, or a file:// URL's inside ``media_dir`` (media.py). Nothing is fetched from the network."""
    param = f"{where}.image_url"
    match = DATA_URL.match(url)
    if match:
        encoded = url[match.end():]
        if len(encoded) * 3 // 4 > max_image_bytes:
            raise ApiError(413, f"{param}: the image is over {max_image_bytes:,} bytes (--max-image-bytes)", param,
                           "image_too_large")
        try:
            return base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise bad(f"{param}: the data URL's base64 is malformed", param, "invalid_image_url") from None
    if url.startswith("file://"):
        if media_dir is None:
            raise bad(f"{param}: file:// URLs need the server started with --media-dir", param, "invalid_image_url")
        try:
            return media_dir.read(url, max_image_bytes)
        except MediaError as e:
            if e.too_large:
                raise ApiError(413, f"{param}: {e}", param, "image_too_large") from None
            raise bad(f"{param}: {e}", param, "invalid_image_url") from None
    if url.split(":", 1)[0].lower() in ("http", "https"):
        raise bad(f"{param}: this server does not fetch images from the network; send the image as a "
                  "data:image/...;base64, URL", param, "invalid_image_url")
    raise bad(f"{param}: expected a data:image/...;base64, URL", param, "invalid_image_url")
