"""A bundle, loaded: image -> vision output -> prompt -> LLM -> streamed answer.

``Model.ask`` and ``Model.ask_stream`` answer one question; ``Model.chat`` keeps a conversation in
the official multi-turn format. A Model composes named pieces, each replaceable: the family
(families/), the vision encoder and the LLM (backends/, chosen once), the prompt (template + the
checkpoint's tokenization: tokenizer.py), the image embeddings and their cache (embedding.py), the KV
cache's record and disk states (kv_cache.py), decoding (decoding.py). ``Model(cache=...)`` is the one
switch for every cache on disk; ``Model(bundle, RuntimeOptions(...))`` takes how to run it (runtime.py).
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Generator, Iterator, Sequence

from .backends import llm_kind, vision_kind
from .backends.base import MAX_TOP_LOGPROBS, ContextOverflowError, LlmBackend, SamplingOptions, TokenLogprob
from .cache import DiskCache
from .decoding import Decoder
from .embedding import Embedded, ImageEmbedder, ImageInput, VideoInput
from .errors import BundleError, ConfigError
from .families import family_for
from .kv_cache import KvCache
from .manifest import Manifest, load_manifest
from .preprocess import ASPECTS
from .prompt import ImageSlot, Item, positions, template_from_dict
from .runtime import RuntimeOptions
from .structured import Constraint, constraint_of
from .tools import ToolAnswer, ToolCall, Tools, parse_choice, parse_tools, render_result
from .tokenizer import PromptTokenizer
from .vision import choose_vision, precision_of, start_deferred_calibrations


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


def check_runnable(bundle: Path, manifest: Manifest, options: RuntimeOptions) -> None:
    """BundleError unless the bundle holds a template and its LLM in a form the options' backend runs."""
    if (manifest.llm is None and manifest.llm_hf is None) or manifest.template is None:
        raise BundleError(f"{bundle}: bundle has no LLM (exported by an older version?)")
    llm_kind(options.llm_backend).check(bundle, manifest)


class Model:
    """A loaded bundle. Not thread-safe: one conversation at a time per Model."""

    def __init__(self, bundle: str | os.PathLike, options: RuntimeOptions | None = None, *,
                 llm: LlmBackend | None = None, defer_llm: bool = False, context_for: tuple[str, int] | None = None,
                 progress: Callable[[str], None] | None = None, verify: bool = True, **changes):
        """``options``: how to run (runtime.RuntimeOptions; ``changes``: its fields over it, for Python callers:
        ``Model(bundle, device="cpu", cache=False)``).
        ``llm``: an LLM backend already open on this bundle's LLM (default: the one ``options`` name).
        ``defer_llm``: load the LLM when a prompt first needs it, not now: a one-shot ``ask`` encodes its
        image and frees the graphs (``release_vision``) before the LLM takes its memory.
        ``context_for``: (question, max_tokens) of the one image question this Model will answer (the CLI's
        ``ask``): the LLM's context, and so its KV cache, is sized to the most that prompt can take (the
        image's token budget, one position per byte of the rendered text, the answer) instead of the
        model's trained context (a 7B Llama's 4096 positions hold 2 GB of f16 keys and values).
        ``progress`` hears about vision's auto choice timing the bundle's types (vision.choose_vision)."""
        self.options = options = (options or RuntimeOptions()).with_(**changes).validate()
        self.bundle = Path(bundle)
        self.manifest: Manifest = load_manifest(self.bundle, verify=verify)
        check_runnable(self.bundle, self.manifest, options)
        self.family = family_for(self.manifest.family)
        self.template = template_from_dict(self.manifest.template)
        self.vision_choice, self.vision = choose_vision(self.bundle, self.manifest, options.vision_type, options.device,
                                                        options.batch_threads, options.vision_backend, progress,
                                                        url=options.vision_url, calibrate=options.calibrate)
        self.vision_entry, self.vision_backend = self.vision_choice.entry, self.vision_choice.kind
        self.images_note = self.vision.note
        store = DiskCache() if options.cache is True else (options.cache or None)
        self.images = ImageEmbedder(self.manifest, self.family, self.vision, self._vision_identity(), store)
        self.vision_providers = list(self.vision.providers)
        self._llm_sha = self._llm_identity()
        self._open_llm = self._llm_opener(context_for, verify)
        self.llm: LlmBackend | None = None
        if llm is not None or not defer_llm:
            self._attach(llm or self._open_llm())

    def _vision_identity(self) -> str:
        """What the cached embeddings were computed by: every graph that shapes them, and what ran them where
        the result differs by it."""
        shas = {f.path: f.sha256 for f in self.manifest.files}
        identity = "+".join(shas[f] for f in self.vision_entry.files)
        return identity + vision_kind(self.vision_backend).identity(precision_of(self.vision_entry))

    def _llm_identity(self) -> str:
        """What a cached KV state was computed by: the weights the backend runs (the GGUF, the HF files)."""
        return llm_kind(self.options.llm_backend).identity(self.manifest)

    def _llm_opener(self, context_for: tuple[str, int] | None, verify: bool) -> Callable[[], LlmBackend]:
        """How to open the LLM the options name, now or when first needed."""
        kind, o = llm_kind(self.options.llm_backend), self.options
        fitted = context_for is not None and o.n_ctx is None and self.family.fit_context \
            and self.manifest.tokens_per_image.square is not None
        sha = kind.identity(self.manifest) if verify else None
        return lambda: kind.open(self.bundle, self.manifest, o, n_ctx=None if fitted else o.n_ctx,
                                 n_ctx_max=self.context_bound(*context_for) if fitted else None, sha256=sha)

    def _attach(self, llm: LlmBackend) -> None:
        if llm.n_embd != self.manifest.n_embd:
            llm.close()
            raise BundleError(f"{self.bundle}: the LLM's embedding width {llm.n_embd} differs from the "
                              f"vision graph's {self.manifest.n_embd}")
        self.llm = llm
        self.kv = KvCache(llm, self.family, self._llm_sha, self.images.store)
        self.tokenizer = PromptTokenizer(llm, self.manifest.tokenizer)
        header = getattr(self.template, "answer_header", "")
        self.hidden_prefix = llm.tokenize(header, parse_special=True) if header else []

    def _need_llm(self) -> LlmBackend:
        """The LLM, loaded now if it was deferred."""
        if self.llm is None:
            self._attach(self._open_llm())
        return self.llm

    @property
    def note(self) -> str:
        """Where the graphs and the LLM run, in one line (loads a deferred LLM)."""
        llm = self._need_llm()
        return f"{self.images_note}; LLM on {llm.where} ({llm.name})"

    @property
    def preprocess_config(self):
        """How images become pixel values for this bundle's graphs (the manifest's)."""
        return self.images.preprocess_config

    @property
    def cache(self) -> DiskCache | None:
        return self.images.store

    @cache.setter
    def cache(self, store: DiskCache | None) -> None:
        """Swap the disk cache (None: none), for the embeddings and the KV states alike."""
        self.images.store = store
        if self.llm is not None:
            self.kv.store = store

    def context_bound(self, question: str, max_tokens: int) -> int:
        """Positions a one-question image prompt can take, at most, rounded up to 256: the image's token
        budget (pad, crop and native aspect all stay within the square's), a token per byte of the rendered
        text (SentencePiece and byte-level BPE never spend a token on less than a byte), BOS, the answer."""
        text = self.template.render([(question, None)], image=True)
        bound = self.manifest.tokens_per_image.square + len(text.encode("utf-8")) + 1 + max_tokens
        return -(-bound // 256) * 256

    def prompt_items(self, turns: Sequence[tuple[str, str | None]], slot: ImageSlot | None, image_turn: int = 0,
                     system: str | None = None) -> list[Item]:
        """The conversation rendered by the bundle's template, as token ids with the image's slot (in the
        question of turn ``image_turn``; ``system`` replaces the template's system prompt)."""
        self._need_llm()
        return self.tokenizer.items(self.template.render(turns, image=slot is not None, image_turn=image_turn,
                                                         system=system), slot)

    def fork(self, threads: int | None = None, n_ctx: int | None = None, threads_batch: int | None = None) -> "Model":
        """Another conversation slot on the same bundle: the vision graphs and embeddings shared, the LLM's
        weights shared, a KV cache of its own (``serve --parallel``). Needs an LLM backend with ``fork``."""
        llm = self._need_llm()
        if not llm.capabilities.fork:
            raise ConfigError(f"the {llm.name} backend holds one context: it cannot serve parallel slots")
        other = object.__new__(Model)
        other.__dict__.update(self.__dict__)
        other._attach(llm.fork(threads=threads, n_ctx=n_ctx, threads_batch=threads_batch))
        return other

    def embed(self, image: ImageInput, aspect: str | None = None) -> Embedded:
        return self.images.embed(image, aspect)

    def embed_video(self, video: VideoInput) -> Embedded:
        return self.images.embed_video(video)

    # -- answering ---------------------------------------------------------------------------------
    def answer(self, items: list[Item], embedded: Embedded | None, options: AskOptions,
               on_done: Callable[[Answer], None] = lambda answer: None) -> AnswerStream:
        """The answer to a prompt already built (``prompt_items``), as a stream; ``on_done`` sees the Answer."""
        logprobs: list = []
        return AnswerStream(self._answer(items, embedded, options, logprobs), on_done, logprobs)

    def check_constraint(self, options: AskOptions) -> None:
        """Before any answer: the LLM backend can constrain and give logprobs as asked, and llama.cpp parses the
        constraint's grammar (compiled once, then cached): each failure is a one-line ConfigError."""
        if options.constraint is None and options.logprobs is None:
            return
        llm = self._need_llm()
        if options.constraint is not None:
            if not llm.capabilities.structured_output:
                raise ConfigError(f"the {llm.name} backend cannot constrain an answer (a JSON schema, JSON or a "
                                  "grammar): use --llm-backend llama.cpp")
            llm.grammar(options.constraint)
        if options.logprobs is not None and not llm.capabilities.logprobs:
            raise ConfigError(f"the {llm.name} backend gives no logprobs of the distribution its tokens are drawn "
                              "from: use --llm-backend llama.cpp")

    def _answer(self, items: list[Item], embedded: Embedded | None, options: AskOptions,
                logprobs: list | None = None) -> Generator[str, None, Answer]:
        options.validate()
        self._need_llm()
        self.check_constraint(options)
        embedded = embedded or Embedded.none()
        if embedded.slot.key:
            self.images.keep(embedded)
        needed = positions(items)
        if needed + options.max_tokens > self.llm.n_ctx:
            raise ContextOverflowError(
                f"the prompt takes {needed} positions ({embedded.slot.n_tokens} image + {needed - embedded.slot.n_tokens} "
                f"text) and the answer up to {options.max_tokens} more, but the context holds {self.llm.n_ctx}; "
                "use fewer --max-tokens, a smaller image (--aspect native), or a shorter conversation")
        t0 = time.perf_counter()
        rows = self.family.llm_rows(self.vision, items, self.images.memory)
        evaluated = self.kv.prefill(items, self.images.memory, rows)
        t1 = time.perf_counter()
        decoder = Decoder(self.llm, options, tuple(self.template.stop) + tuple(options.stop), self.hidden_prefix)
        if logprobs is not None:
            decoder.logprobs = logprobs
        yield from decoder.run()
        t2 = time.perf_counter()
        start_deferred_calibrations()  # auto's timing, deferred until an answer is out (vision.defer_calibration)
        self.kv.record_answer(decoder.tokens)
        first_token_at = decoder.first_token_at or t2
        decode_s = t2 - t1
        return Answer(
            text=decoder.stream.text.strip(), token_ids=decoder.tokens, n_image_tokens=embedded.slot.n_tokens,
            n_prompt_positions=needed, n_evaluated=evaluated, stop_reason=decoder.reason, cache_hit=embedded.hit,
            constraint=options.constraint, logprobs=decoder.logprobs if options.logprobs is not None else None,
            cached_tokens=self.llm.server_cached_tokens if self.llm.capabilities.server_cache else needed - evaluated,
            timings={"preprocess_ms": embedded.preprocess_ms, "encode_ms": embedded.encode_ms,
                     "prefill_ms": (t1 - t0) * 1e3, "prefill_positions": evaluated,
                     "time_to_first_token_ms": embedded.preprocess_ms + embedded.encode_ms + (first_token_at - t0) * 1e3,
                     "decode_ms": decode_s * 1e3,
                     "decode_tokens_per_s": decoder.n_generated / decode_s if decode_s > 0 and decoder.n_generated else 0.0})

    def _question(self, embedded: Embedded | None, question: str, options: AskOptions) -> AnswerStream:
        """One question about ``embedded`` (None: no image), as a stream."""
        return self.answer(self.prompt_items([(question, None)], embedded.slot if embedded else None), embedded, options)

    def ask_stream(self, image: ImageInput, question: str, options: AskOptions = AskOptions(), *,
                   schema=None, grammar: str | None = None) -> AnswerStream:
        """Yields text pieces as they are generated; ``.answer`` holds the Answer once exhausted. ``schema``: a
        JSON schema (a dict, JSON text or a pydantic model class) the answer fits (``.answer.parsed`` is its
        value); ``grammar``: GBNF text the answer follows instead."""
        options = constrained(options, schema, grammar)
        self.check_constraint(options)  # before the image is encoded
        return self._question(self.embed(image, options.aspect), question, options)

    def ask(self, image: ImageInput, question: str, options: AskOptions = AskOptions(), *,
            schema=None, grammar: str | None = None) -> Answer:
        return _drain(self.ask_stream(image, question, options, schema=schema, grammar=grammar))

    def ask_once(self, image: ImageInput, question: str, options: AskOptions = AskOptions()) -> AnswerStream:
        """``ask_stream`` for a Model that answers one question: the image is encoded, the graphs are freed
        where the family allows (release_vision), then the LLM (deferred: ``defer_llm``) loads and answers."""
        embedded = self.embed(image, options.aspect)
        self.release_vision()
        return self._question(embedded, question, options)

    def ask_video_stream(self, video: VideoInput, question: str, options: AskOptions = AskOptions()) -> AnswerStream:
        return self._question(self.embed_video(video), question, options)

    def ask_text_stream(self, question: str, options: AskOptions = AskOptions()) -> AnswerStream:
        """A question with no image: the template without "<image>", plain tokens."""
        return self._question(None, question, options)

    def ask_text(self, question: str, options: AskOptions = AskOptions()) -> Answer:
        return _drain(self.ask_text_stream(question, options))

    def chat(self, image: ImageInput, options: AskOptions = AskOptions()) -> "Chat":
        return Chat(self, self.embed(image, options.aspect), options)

    def release_vision(self) -> None:
        """Free the vision graphs' memory once the image is encoded: a one-shot ``ask`` on a family whose
        prompt needs no graph (``Family.vision_in_prompt``) holds only the LLM while it answers."""
        if not self.family.vision_in_prompt:
            self.vision = self.images.encoder = None

    def reset(self) -> None:
        """Forget the KV cache and in-memory embeddings (benchmarks: every run starts cold)."""
        if self.llm is not None:
            self.kv.reset()
        self.images.forget()

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()


class Chat:
    """A multi-turn conversation about one image (``... ASSISTANT: A1</s>USER: Q2 ASSISTANT:``)."""

    def __init__(self, model: Model, embedded: Embedded, options: AskOptions):
        self.model, self.embedded, self.options = model, embedded, options
        self.turns: list[tuple[str, str]] = []
        self.tools: Tools | None = None  # offered from the turn that first gave them on (tools.py)

    def ask_stream(self, question: str, options: AskOptions | None = None, *, schema=None,
                   grammar: str | None = None, tools: Sequence[dict] | Tools | None = None,
                   tool_choice=None, parallel_tool_calls: bool = True) -> AnswerStream:
        """As Model.ask_stream, for the next turn (``schema``, ``grammar``: this turn's answer). ``tools``: OpenAI's
        function tools (or a Tools), offered from this turn on; the answer is then a direct answer or calls
        (``.answer.tool_calls``; results go back with ``send_tool_results``)."""
        if tools is not None and not isinstance(tools, Tools):
            offered_tools = parse_tools(list(tools))
            tools = Tools(offered_tools, parse_choice(tool_choice, offered_tools), parallel_tool_calls)
        if tools is not None:
            self.tools = tools
        options = constrained(options or self.options, schema, grammar)
        offered = self.tools if self.tools is not None and self.tools.active else None
        system = None
        if offered is not None:
            if options.constraint is not None:
                raise ConfigError("a schema or grammar and tools both constrain the answer: give one")
            options = dataclasses.replace(options, constraint=offered.constraint())
            system = offered.system_prompt(self.model.template.system)
        items = self.model.prompt_items([*self.turns, (question, None)], self.embedded.slot, system=system)

        def done(answer: Answer) -> None:
            self.turns.append((question, answer.text))  # as generated: the KV cache holds it so
            if offered is not None:
                answer.tool_answer = offered.read(answer.text)
        stream = self.model.answer(items, self.embedded, options, on_done=done)
        # Later turns reuse the embeddings in hand: no preprocessing or encoding to report.
        self.embedded = self.embedded.reused()
        return stream

    def ask(self, question: str, options: AskOptions | None = None, *, schema=None,
            grammar: str | None = None, tools: Sequence[dict] | Tools | None = None, tool_choice=None,
            parallel_tool_calls: bool = True) -> Answer:
        return _drain(self.ask_stream(question, options, schema=schema, grammar=grammar, tools=tools,
                                      tool_choice=tool_choice, parallel_tool_calls=parallel_tool_calls))

    def send_tool_results(self, results: Sequence[tuple[ToolCall, str]], options: AskOptions | None = None) -> Answer:
        """The results of the last answer's calls ((call, result text) pairs) as the next turn; its answer."""
        if not results:
            raise ConfigError("send_tool_results needs at least one (call, result) pair")
        return self.ask("\n".join(render_result(call.name, content) for call, content in results), options)


def constrained(options: AskOptions, schema=None, grammar: str | None = None) -> AskOptions:
    """``options`` with the constraint ``schema`` or ``grammar`` makes (structured.constraint_of), if any."""
    made = constraint_of(schema, grammar)
    return options if made is None else dataclasses.replace(options, constraint=made)


def _drain(stream: AnswerStream) -> Answer:
    for _ in stream:
        pass
    return stream.answer


def load(bundle: str | os.PathLike | None = None, **kwargs) -> Model:
    """Load a bundle (default: the demo model shipped with the package)."""
    if bundle is None:
        from .default_model import default_bundle

        bundle = default_bundle()
    return Model(bundle, **kwargs)
