"""Decoding: sampled tokens -> the text a user sees, stopped where the template says an answer ends."""

from __future__ import annotations

import codecs
import time
from typing import Iterator, Sequence

from .backends.base import LlmBackend, Step


class TextStream:
    """Token pieces -> text, holding back incomplete UTF-8 and stop strings that may still complete."""

    def __init__(self, stops: Sequence[str]):
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.stops = [s for s in stops if s]
        self.text = ""  # everything decoded so far
        self._emitted = 0
        self.stopped = False

    def push(self, piece: bytes) -> str:
        """Add a token's bytes; return the text that is now safe to show."""
        self.text += self._decoder.decode(piece)
        for stop in self.stops:
            at = self.text.find(stop)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        hold = 0 if self.stopped else max((self._partial_stop(s) for s in self.stops), default=0)
        return self._take(len(self.text) - hold)

    def finish(self) -> str:
        if not self.stopped:
            self.text += self._decoder.decode(b"", final=True)
        return self._take(len(self.text))

    def _partial_stop(self, stop: str) -> int:
        """Length of the longest proper prefix of ``stop`` that the text ends with."""
        for k in range(min(len(stop) - 1, len(self.text)), 0, -1):
            if self.text.endswith(stop[:k]):
                return k
        return 0

    def _take(self, end: int) -> str:
        if self._emitted == 0:  # the answer's leading space (from SentencePiece's '▁') is not shown
            stripped = len(self.text) - len(self.text.lstrip())
            if stripped >= end:
                return ""
            self._emitted = stripped
        out = self.text[self._emitted:end]
        self._emitted = max(self._emitted, end)
        return out


def without_header(tokens: Sequence[int], header: Sequence[int]) -> list[int]:
    """``tokens`` without a generated assistant header at their start (what a user is shown)."""
    n = len(header)
    return list(tokens[n:]) if n and list(tokens[:n]) == list(header) else list(tokens)


class Decoder:
    """Generate an answer after an evaluated prompt: stops at the end-of-generation token, a stop string
    (the template's), or ``options.max_tokens`` (``options``: max_tokens and sampling)."""

    def __init__(self, llm: LlmBackend, options, stops: Sequence[str], hidden_prefix: Sequence[int] = ()):
        self.llm, self.options = llm, options
        # generated header tokens (LLaVA-Mini: the assistant header): kept in the KV cache, not shown
        self.hidden_prefix = list(hidden_prefix)
        self._hiding = bool(self.hidden_prefix)
        self.stream = TextStream(stops)
        self.tokens: list[int] = []  # every generated token's id (where the backend reports ids)
        self.n_generated = 0
        self.reason = "length"  # "eos", "stop" (a stop string in the text) or "length"
        self.first_token_at: float | None = None
        # (token id, TokenLogprob) of each token of the answer (not of a hidden header), with options.logprobs;
        # filled as they are generated (AnswerStream.logprobs is this list)
        self.logprobs: list = []
        self._pending: list = []  # those of tokens that may still be the hidden header

    @property
    def visible_tokens(self) -> list[int]:
        """The answer's ids without a generated hidden header."""
        return without_header(self.tokens, self.hidden_prefix)

    def run(self) -> Iterator[str]:
        constraint, logprobs = getattr(self.options, "constraint", None), getattr(self.options, "logprobs", None)
        if constraint is not None and self._hiding:
            # The header the model writes before its answer (LLaVA-Mini's), evaluated as the model would write
            # it: a grammar for the answer would forbid it. It stays hidden and in the KV cache, as generated.
            self.llm.eval_tokens(self.hidden_prefix)
            self.tokens, self._hiding = list(self.hidden_prefix), False
        extra = {"constraint": constraint} if constraint is not None else {}
        if logprobs is not None:
            extra["logprobs"] = logprobs
        steps = self.llm.generate(self.options.sampling, self.options.max_tokens, **extra)
        try:
            for step in steps:
                if self.first_token_at is None:
                    self.first_token_at = time.perf_counter()
                self.n_generated += 1
                if step.token is not None:
                    self.tokens.append(step.token)
                if step.logprob is not None:
                    self._pending.append((step.token, step.logprob))
                text = self._shown(step)
                if text:
                    yield text
                if self.stream.stopped:
                    self.reason = "stop"
                    break
            else:
                self.reason = "length" if self.n_generated >= self.options.max_tokens else "eos"
        finally:
            steps.close()  # a stop leaves the last token unevaluated
        tail = self.stream.finish()
        if tail:
            yield tail

    def _shown(self, step: Step) -> str:
        if self._hiding and step.token is not None and self.tokens == self.hidden_prefix[:len(self.tokens)]:
            self._hiding = len(self.tokens) < len(self.hidden_prefix)  # the whole header seen: hidden for good
            if not self._hiding:
                self._pending.clear()
            return ""
        self.logprobs += self._pending
        self._pending.clear()
        if self._hiding and step.token is not None:  # it was not the header after all: show it
            self._hiding = False
            return "".join(self.stream.push(self.llm.piece(t)) for t in self.tokens)
        self._hiding = False
        return self.stream.push(step.piece)
