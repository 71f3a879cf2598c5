"""OpenAI's response and chunk objects (openai-python's ``types/chat``): an Answer as a chat completion, its
stream's chunks, tool calls and logprob entries; Ollama's front-end reads the same pieces."""

from __future__ import annotations

import time
import uuid

from ..tools import Tools

def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex


FINISH = {"eos": "stop", "stop": "stop", "length": "length"}


def finish_reason(answer) -> str:
    return FINISH.get(answer.stop_reason, "stop")


def usage(answer) -> dict:
    prompt, generated = answer.n_prompt_positions, len(answer.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated,
            "prompt_tokens_details": {"cached_tokens": answer.cached_tokens, "image_tokens": answer.n_image_tokens}}


def timings(answer) -> dict:
    t = answer.timings
    return {"preprocess_ms": t.get("preprocess_ms", 0.0), "encode_ms": t.get("encode_ms", 0.0),
            "prefill_ms": t.get("prefill_ms", 0.0), "time_to_first_token_ms": t.get("time_to_first_token_ms", 0.0),
            "decode_tokens_per_s": t.get("decode_tokens_per_s", 0.0), "image_cache_hit": answer.cache_hit}


def completion(cid: str, created: int, model: str, answer, logprobs: list | None = None, tools: Tools | None = None) -> dict:
    """``logprobs``: the answer's tokens as logprob_entries made (None: not asked for); ``tools``: the request's,
    when active the answer is read as a direct answer or calls (tools.py)."""
    message, finish = {"role": "assistant", "content": answer.text, "refusal": None}, finish_reason(answer)
    if tools is not None and tools.active:
        message, finish = tool_message(tools.read(answer.text), finish)
    return {"id": cid, "object": "chat.completion", "created": created, "model": model, "system_fingerprint": None,
            "choices": [{"index": 0, "message": message,
                         "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
                         "finish_reason": finish}],
            "usage": usage(answer), "timings": timings(answer), "token_ids": answer.token_ids}


def tool_message(read, finish: str) -> tuple[dict, str]:
    """The assistant message of a tools answer, and its finish reason: tool_calls when it calls."""
    if not read.calls:
        return {"role": "assistant", "content": read.content, "refusal": None}, finish
    calls = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in read.calls]
    return {"role": "assistant", "content": None, "refusal": None, "tool_calls": calls}, "tool_calls"


def tool_chunks(read) -> list[dict]:
    """The deltas OpenAI streams a tools answer in: each call's index, id, type and name, then its arguments;
    a direct answer as one content delta."""
    if not read.calls:
        return [{"content": read.content}] if read.content else []
    out = []
    for i, c in enumerate(read.calls):
        out.append({"tool_calls": [{"index": i, "id": c.id, "type": "function",
                                    "function": {"name": c.name, "arguments": ""}}]})
        out.append({"tool_calls": [{"index": i, "function": {"arguments": c.arguments}}]})
    return out


def chunk(cid: str, created: int, model: str, delta: dict, finish: str | None = None, logprobs: list | None = None,
          **extra) -> dict:
    return {"id": cid, "object": "chat.completion.chunk", "created": created, "model": model,
            "system_fingerprint": None,
            "choices": [{"index": 0, "delta": delta,
                         "logprobs": {"content": logprobs, "refusal": None} if logprobs is not None else None,
                         "finish_reason": finish}], **extra}


class Piece(str):
    """A streamed piece of the answer's text and, when asked for, the logprob entries of the tokens it ends."""

    logprobs: list | None = None

    @classmethod
    def of(cls, text: str, logprobs: list | None) -> "Piece":
        piece = cls(text)
        piece.logprobs = logprobs
        return piece


def logprob_entries(llm, pairs) -> list[dict]:
    """(token id, TokenLogprob) pairs as OpenAI's ChatCompletionTokenLogprob objects (Ollama reads the same)."""
    def entry(token: int, logprob: float) -> dict:
        data = llm.piece(token)
        return {"token": data.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(data)}

    return [{**entry(token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]} for token, lp in pairs]


def now() -> int:
    return int(time.time())
