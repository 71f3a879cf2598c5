"""What a question is asked with (AskOptions) and what comes back (Answer, streamed by AnswerStream)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Generator, Iterator

from .backends.base import MAX_TOP_LOGPROBS, SamplingOptions, TokenLogprob
from .errors import ConfigError
from .preprocess import ASPECTS
from .structured import Constraint, constraint_of
from .tools import ToolAnswer, ToolCall


@dataclass(frozen=True)
class AskOptions:
    max_tokens: int = 512  # the official CLI's max_new_tokens
    sampling: SamplingOptions = SamplingOptions()
    aspect: str | None = None  # None: the bundle's default ("pad", as trained)
    stop: tuple[str, ...] = ()  # text that ends the answer, besides the template's own
    constraint: Constraint | None = None  # what the answer must be (structured.py): a JSON schema, JSON, a grammar
    logprobs: int | None = None  # each token's logprob and this many alternatives (0..20); None: none

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.logprobs is not None and (isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS):
            raise ConfigError(f"top_logprobs must be an integer in 0..{MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        if self.aspect is not None and self.aspect not in ASPECTS:
            raise ConfigError(f"unknown aspect mode {self.aspect!r} (known: {', '.join(ASPECTS)})")
        self.sampling.validate()


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    n_image_tokens: int
    n_prompt_positions: int  # prompt length in KV positions (text tokens + image rows)
    n_evaluated: int  # positions evaluated for this prompt; the rest came from the KV cache
    stop_reason: str  # "eos", "stop" (a stop string such as </s> in the text) or "length"
    cache_hit: bool  # the image embeddings came from the cache (no encoder run)
    timings: dict[str, float] = field(default_factory=dict)
    # prompt positions the LLM did not compute again: ours (n_prompt_positions - n_evaluated) on llama.cpp; on a
    # server backend its own prefix-cache figure, None where it gives none
    cached_tokens: int | None = None
    constraint: Constraint | None = None  # what the answer was constrained to
    logprobs: list[tuple[int, TokenLogprob]] | None = None  # with AskOptions.logprobs: per answer token
    tool_answer: ToolAnswer | None = None  # with tools (Chat.ask(tools=...)): the direct answer or the calls

    @property
    def tool_calls(self) -> list[ToolCall]:
        """The calls of an answer given tools (tools.py); empty when it answered directly or had no tools."""
        return self.tool_answer.calls if self.tool_answer is not None else []

    @property
    def parsed(self):
        """A JSON-constrained answer's value; None when it is not complete JSON (cut by max_tokens: never
        repaired) or the answer was not constrained to JSON."""
        return self.constraint.parse(self.text) if self.constraint is not None else None

    def to_dict(self) -> dict:
        out = {"answer": self.text, "token_ids": self.token_ids, "n_image_tokens": self.n_image_tokens,
               "n_prompt_positions": self.n_prompt_positions, "n_evaluated": self.n_evaluated,
               "stop_reason": self.stop_reason, "cache_hit": self.cache_hit, "timings": self.timings}
        if self.constraint is not None and self.constraint.is_json:
            out["parsed"] = self.parsed
        return out


class AnswerStream:
    """Iterate for text pieces; ``.answer`` holds the Answer once the stream is exhausted."""

    def __init__(self, pieces: Generator[str, None, Answer], on_done: Callable[[Answer], None] = lambda a: None,
                 logprobs: list | None = None):
        self._pieces, self._on_done = pieces, on_done
        self._answer: Answer | None = None
        # with AskOptions.logprobs: (token id, TokenLogprob) of the answer's tokens so far, growing as it streams
        self.logprobs = logprobs if logprobs is not None else []

    def __iter__(self) -> Iterator[str]:
        self._answer = yield from self._pieces
        self._on_done(self._answer)

    @property
    def answer(self) -> Answer:
        if self._answer is None:
            raise RuntimeError("the stream has not been consumed yet")
        return self._answer


def constrained(options: AskOptions, schema=None, grammar: str | None = None) -> AskOptions:
    """``options`` with the constraint ``schema`` or ``grammar`` makes (structured.constraint_of), if any."""
    made = constraint_of(schema, grammar)
    return options if made is None else dataclasses.replace(options, constraint=made)


def _drain(stream: AnswerStream) -> Answer:
    for _ in stream:
        pass
    return stream.answer
