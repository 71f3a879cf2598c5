"""Ollama's API on the same server, for the front-ends built on it: /api/chat, /api/generate, /api/tags,
/api/version (shapes as ollama-python's ``_types`` declare them).

A request becomes the same ChatRequest as OpenAI's (its images become data: URLs, checked by the same code),
and runs through the same generation; only the wire differs: NDJSON lines, a final object with ``done: true``
and the timings in nanoseconds, errors as ``{"error": message}``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any, AsyncIterator

from .. import __version__
from ..model import Answer
from .generate import STARTED, complete
from ..structured import Constraint, json_object
from ..tools import dumps
from .replies import finish_reason, logprob_entries
from .wire import (DEFAULT_MAX_IMAGES, ApiError, ChatRequest, bad, parse_chat, refuse_unsupported, schema_constraint,
                   top_logprobs)

OLLAMA_DEFAULT_TEMPERATURE = 0.8  # Ollama's own default when a request sets none
NS = 1_000_000  # per ms


def chat_body(body: Any) -> dict:
    """An Ollama /api/chat body as the OpenAI chat body parse_chat checks."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list", "messages")
    converted, pending = [], []  # pending: (id, name) of calls no tool message has answered yet
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise bad(f"messages[{i}] must be an object", f"messages[{i}]")
        if message.get("role") == "assistant" and message.get("tool_calls") is not None:
            converted.append(_assistant_calls(message, f"messages[{i}]", pending))
        elif message.get("role") == "tool":
            converted.append(_tool_message(message, f"messages[{i}]", pending))
        else:
            converted.append(_message(message, f"messages[{i}]"))
    tools = {"tools": body["tools"]} if body.get("tools") is not None else {}
    return {**_options(body), **tools, "messages": converted}


def _assistant_calls(message: dict, where: str, pending: list) -> dict:
    """Ollama's assistant tool_calls ({"function": {"name", "arguments": {...}}}, no ids) in OpenAI's shape."""
    calls = message["tool_calls"]
    if not isinstance(calls, list) or not calls:
        raise bad(f"{where}.tool_calls must be a non-empty list", f"{where}.tool_calls")
    out = []
    for j, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad(f'{where}.tool_calls[{j}] must be {{"function": {{"name", "arguments"}}}}', f"{where}.tool_calls")
        arguments = fn.get("arguments", {})
        call_id = f"call_{len(pending)}_{j}_{fn['name']}"
        pending.append((call_id, fn["name"]))
        out.append({"id": call_id, "type": "function",
                    "function": {"name": fn["name"], "arguments": dumps(arguments) if not isinstance(arguments, str)
                                 else arguments}})
    content = message.get("content") or None
    return {"role": "assistant", "content": content, "tool_calls": out}


def _tool_message(message: dict, where: str, pending: list) -> dict:
    """A tool result: the earliest unanswered call of ``tool_name`` (or the earliest unanswered one)."""
    name = message.get("tool_name") or message.get("name")
    match = next((c for c in pending if name is None or c[1] == name), None)
    if match is None:
        raise bad(f"{where}: a tool message that answers no earlier tool call" + (f" of {name!r}" if name else ""),
                  f"{where}.tool_name")
    pending.remove(match)
    return {"role": "tool", "tool_call_id": match[0], "content": message.get("content", "")}


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
    refuse_unsupported(body, OLLAMA_REFUSED)
    refuse_unsupported(options, OLLAMA_OPTIONS_REFUSED, "options")
    out: dict = {"model": body.get("model"), "stream": body.get("stream", True),
                 "temperature": options.get("temperature", OLLAMA_DEFAULT_TEMPERATURE)}
    for ours, theirs in (("top_p", "top_p"), ("seed", "seed"), ("stop", "stop")):
        if options.get(theirs) is not None:
            out[ours] = options[theirs]
    predict = options.get("num_predict")
    if predict is not None and predict != -1 and predict != -2:  # -1: until the end, -2: fill the context
        out["max_tokens"] = predict
    return out


def parse(kind: str, body: Any, max_image_bytes: int, max_images: int = DEFAULT_MAX_IMAGES) -> ChatRequest:
    """/api/chat's or /api/generate's body, checked as OpenAI's is (images: base64 only, no file paths)."""
    chat = parse_chat(chat_body(body) if kind == "chat" else generate_body(body), max_image_bytes, None, max_images)
    return dataclasses.replace(chat, constraint=output_format(body.get("format")), logprobs=top_logprobs(body))


def output_format(value: Any) -> Constraint | None:
    """Ollama's format: "json" (any JSON object), a JSON schema object, or none ("" or absent)."""
    if value is None or value == "":
        return None
    if value == "json":
        return json_object()
    if isinstance(value, dict):
        return schema_constraint(value, "format")
    raise bad(f'format must be "json" or a JSON schema object, got {value!r}'[:200], "format")


# Each field of Ollama's /api/chat and /api/generate requests (ollama-python's ChatRequest, GenerateRequest and
# Options): implemented, accepted as changing nothing about the answer, or refused unless neutral (wire.py).
OLLAMA_IMPLEMENTED = frozenset({"model", "messages", "prompt", "system", "images", "stream", "options", "format",
                                "logprobs", "top_logprobs", "tools"})
OLLAMA_NO_EFFECT = {"keep_alive": "how long Ollama keeps a model loaded (serve keeps its bundles loaded)"}
OLLAMA_REFUSED = {
    "think": ((None, False), "thinking"), "raw": ((None, False), "raw prompts"),
    "template": ((None, ""), "a prompt template of the request's"), "suffix": ((None, ""), "fill-in-the-middle"),
    "context": ((None, []), "the deprecated context tokens"), "width": ((None,), "image generation"),
    "height": ((None,), "image generation"), "steps": ((None,), "image generation"),
}
OLLAMA_OPTIONS_IMPLEMENTED = frozenset({"temperature", "top_p", "seed", "stop", "num_predict"})
OLLAMA_OPTIONS_NO_EFFECT = {  # how Ollama runs a model; serve's own flags decide that here (--ctx, --threads...)
    name: "a runtime setting (serve's own options decide it)"
    for name in ("num_ctx", "num_batch", "num_gpu", "main_gpu", "low_vram", "f16_kv", "use_mmap", "use_mlock",
                 "num_thread", "numa", "num_keep", "vocab_only", "embedding_only", "logits_all")}
OLLAMA_OPTIONS_REFUSED = {
    "top_k": ((None, 0), "top-k sampling"), "min_p": ((None, 0, 0.0), "min-p sampling"),
    "typical_p": ((None, 1, 1.0), "typical sampling"), "tfs_z": ((None, 1, 1.0), "tail-free sampling"),
    "repeat_penalty": ((None, 1, 1.0), "a repeat penalty"), "repeat_last_n": ((None,), "a repeat penalty"),
    "presence_penalty": ((None, 0, 0.0), "a presence penalty"),
    "frequency_penalty": ((None, 0, 0.0), "a frequency penalty"), "penalize_newline": ((None, False), "a newline penalty"),
    "mirostat": ((None, 0), "mirostat sampling"), "mirostat_tau": ((None,), "mirostat sampling"),
    "mirostat_eta": ((None,), "mirostat sampling"),
}


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


def line(kind: str, model: str, text: str, done: bool, tool_calls: list | None = None, **extra) -> str:
    key = {"message": {"role": "assistant", "content": text}} if kind == "chat" else {"response": text}
    if tool_calls:
        key["message"]["tool_calls"] = tool_calls
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


def tool_fields(tools, answer: Answer) -> tuple[str, list | None]:
    """A tools answer as Ollama writes it: the direct answer's text, or the calls (arguments as objects)."""
    read = tools.read(answer.text)
    if not read.calls:
        return read.content or "", None
    return "", [{"function": {"name": c.name, "arguments": c.parsed_arguments()}} for c in read.calls]


async def ndjson(kind: str, model: str, gen: AsyncIterator[object], started: float,
                 tools=None) -> AsyncIterator[str]:
    """The streamed form: one line per piece, the final line with done: true, an error as {"error": ...}.
    With active ``tools`` the answer is read whole: its text or its calls in one line before the final one."""
    async with aclosing(gen):
        try:
            async for item in gen:
                if isinstance(item, Answer):
                    if tools is not None:
                        text, calls = tool_fields(tools, item)
                        yield line(kind, model, text, False, calls)
                    yield line(kind, model, "", True, **final_fields(item, started))
                elif tools is not None:
                    continue
                elif item is not STARTED:
                    logprobs = getattr(item, "logprobs", None)
                    yield line(kind, model, item, False, **({"logprobs": logprobs} if logprobs is not None else {}))
        except ApiError as e:
            yield error_line(e)


async def respond(kind: str, model: str, gen: AsyncIterator[object], started: float, llm=None,
                  tools=None) -> dict:
    """The answer as one object; ``llm``: the model's, to write its logprobs (None: not asked for); ``tools``:
    active tools, whose answer is read as text or calls."""
    async with aclosing(gen):
        answer = await complete(gen)
    logprobs = {"logprobs": logprob_entries(llm, answer.logprobs)} if llm is not None else {}
    text, calls = tool_fields(tools, answer) if tools is not None else (answer.text, None)
    return json.loads(line(kind, model, text, True, calls, **final_fields(answer, started), **logprobs))


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
