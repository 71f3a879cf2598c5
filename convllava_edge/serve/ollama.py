"""Ollama's API on the same server, for the front-ends built on it: /api/chat, /api/generate, /api/tags,
/api/version (shapes as ollama-python's ``_types`` declare them).

A request becomes the same ChatRequest as OpenAI's (its images become data: URLs, checked by the same code),
and runs through the same generation; only the wire differs: NDJSON lines, a final object with ``done: true``
and the timings in nanoseconds, errors as ``{"error": message}``.
"""

from __future__ import annotations

import json
import time
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from .. import __version__
from ..model import Answer
from .generate import STARTED, complete
from .wire import ApiError, ChatRequest, bad, finish_reason, parse_chat

OLLAMA_DEFAULT_TEMPERATURE = 0.8  # Ollama's own default when a request sets none
NS = 1_000_000  # per ms


def chat_body(body: Any) -> dict:
    """An Ollama /api/chat body as the OpenAI chat body parse_chat checks."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    converted = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        converted.append(_message(message, f"messages[{i}]"))
    return {**_options(body), "messages": converted}


def generate_body(body: Any) -> dict:
    """An Ollama /api/generate body (prompt, images, system) as an OpenAI chat body."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    prompt = body.get("prompt")
    if not isinstance(prompt, str):
        raise bad("prompt must be a string", "prompt")
    system = body.get("system")
    if system is not None and not isinstance(system, str):
        raise bad("system must be a string", "system")
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [_message({"role": "user", "content": prompt, "images": body.get("images")}, "")]
    return {**_options(body), "messages": messages}


def _message(message: dict, where: str) -> dict:
    content = message.get("content", "")
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string".lstrip("."), f"{where}.content".lstrip("."))
    images = message.get("images")
    images = [] if images is None else images  # not `or []`: false, 0 and "" are wrong types, not "no images"
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise bad(f"{where}.images must be a list of base64 strings".lstrip("."), f"{where}.images".lstrip("."))
    parts = [{"type": "image_url", "image_url": {"url": "data:;base64," + image}} for image in images]
    return {"role": message.get("role"), "content": parts + [{"type": "text", "text": content}]}


def _options(body: dict) -> dict:
    """Ollama's stream (default true) and options as OpenAI's fields."""
    options = body.get("options")
    options = {} if options is None else options
    if not isinstance(options, dict):
        raise bad("options must be an object", "options")
    for unsupported, what in (("format", "structured output (format)"), ("tools", "tool calling (tools)")):
        if body.get(unsupported):  # refused, not ignored: the client would take free text for what it asked
            raise bad(f"{what} is not supported by this server", unsupported)
    out: dict = {"model": body.get("model"), "stream": body.get("stream", True),
                 "temperature": options.get("temperature", OLLAMA_DEFAULT_TEMPERATURE)}
    for ours, theirs in (("top_p", "top_p"), ("seed", "seed"), ("stop", "stop")):
        if options.get(theirs) is not None:
            out[ours] = options[theirs]
    predict = options.get("num_predict")
    if predict is not None and predict != -1 and predict != -2:  # -1: until the end, -2: fill the context
        out["max_tokens"] = predict
    return out


def parse(kind: str, body: Any, max_image_bytes: int) -> ChatRequest:
    """/api/chat's or /api/generate's body, checked as OpenAI's is (images: base64 only, no file paths)."""
    return parse_chat(chat_body(body) if kind == "chat" else generate_body(body), max_image_bytes, None)


def show_name(body: Any) -> str | None:
    """/api/show's model: ``model`` (or the older ``name``), a string when given; None: the only one served."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    for key in ("model", "name"):
        if key in body:
            if not isinstance(body[key], str):
                raise bad(f"{key} must be a string, got {type(body[key]).__name__}", key)
    return model_name(body["model"] if "model" in body else body.get("name"))


def model_name(name: str | None) -> str | None:
    """Ollama's names carry a tag ("shapes-demo:latest"); a bundle is its folder's name."""
    return name[:-len(":latest")] if name and name.endswith(":latest") else name


def created_at() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def line(kind: str, model: str, text: str, done: bool, **extra) -> str:
    key = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"response": text}
    return json.dumps({"model": model, "created_at": created_at(), **key, "done": done, **extra},
                      ensure_ascii=False) + "\n"


def final_fields(answer: Answer, started: float) -> dict:
    t = answer.timings
    prompt_ms = t.get("preprocess_ms", 0.0) + t.get("encode_ms", 0.0) + t.get("prefill_ms", 0.0)
    return {"done_reason": finish_reason(answer), "total_duration": int((time.perf_counter() - started) * 1e9),
            "load_duration": 0, "prompt_eval_count": answer.n_prompt_positions,
            "prompt_eval_duration": int(prompt_ms * NS), "eval_count": len(answer.token_ids),
            "eval_duration": int(t.get("decode_ms", 0.0) * NS), "token_ids": answer.token_ids}


def error_line(e: ApiError) -> str:
    return json.dumps({"error": e.message}) + "\n"


async def ndjson(kind: str, model: str, gen: AsyncIterator[object], started: float) -> AsyncIterator[str]:
    """The streamed form: one line per piece, the final line with done: true, an error as {"error": ...}."""
    async with aclosing(gen):
        try:
            async for item in gen:
                if isinstance(item, Answer):
                    yield line(kind, model, "", True, **final_fields(item, started))
                elif item is not STARTED:
                    yield line(kind, model, item, False)
        except ApiError as e:
            yield error_line(e)


async def respond(kind: str, model: str, gen: AsyncIterator[object], started: float) -> dict:
    async with aclosing(gen):
        answer = await complete(gen)
    return json.loads(line(kind, model, answer.text, True, **final_fields(answer, started)))


def tags(served: dict) -> dict:
    models = []
    for name, s in served.items():
        m = s.model.manifest
        size = sum(f.size for f in m.files)
        digest = next((f.sha256 for f in m.files if m.llm and f.path == m.llm.file), "")
        models.append({"name": f"{name}:latest", "model": f"{name}:latest",
                       "modified_at": datetime.fromtimestamp(s.path.stat().st_mtime, timezone.utc).isoformat(),
                       "size": size, "digest": digest,
                       "details": {"parent_model": "", "format": "gguf" if m.llm else "safetensors", "family": m.family,
                                   "families": [m.family],
                                   "parameter_size": "", "quantization_level": m.llm_type}})
    return {"models": models}


def show(served) -> dict:
    """/api/show: what front-ends read to know a model (its family, quantization, that it takes images)."""
    m = served.model.manifest
    return {"modelfile": "", "parameters": "", "template": "", "license": "",
            "details": {"parent_model": "", "format": "gguf" if m.llm else "safetensors", "family": m.family,
                        "families": [m.family],
                        "parameter_size": "", "quantization_level": m.llm_type},
            "model_info": {"general.architecture": "llama", "llama.context_length": served.model.llm.n_ctx,
                           "llama.embedding_length": m.n_embd},
            "capabilities": ["completion", "vision"],
            "modified_at": datetime.fromtimestamp(served.path.stat().st_mtime, timezone.utc).isoformat()}


def version() -> dict:
    return {"version": __version__}
