"""A bundle, loaded: image -> vision output -> prompt -> LLM -> streamed answer.

``Model.ask`` and ``Model.ask_stream`` answer one question (about one image or several); ``Model.chat``
keeps a conversation in the official multi-turn format (chat.py). A Model composes named pieces, each replaceable: the family
(families/), the vision encoder and the LLM (backends/, chosen once), the prompt (template + the
checkpoint's tokenization: tokenizer.py), the image embeddings and their cache (embedding.py), the KV
cache's record and disk states (kv_cache.py), decoding (decoding.py). ``Model(cache=...)`` is the one
switch for every cache on disk; ``Model(bundle, RuntimeOptions(...))`` takes how to run it (runtime.py).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Generator, Sequence

from .backends import llm_kind, vision_kind
from .answers import Answer, AnswerStream, AskOptions, _drain, constrained
from .backends.base import ContextOverflowError, LlmBackend
from .cache import DiskCache
from .decoding import Decoder
from .embedding import Embedded, ImageEmbedder, ImageInput, VideoInput, images_summary
from .errors import BundleError, ConfigError
from .families import family_for
from .kv_cache import KvCache
from .manifest import Manifest, load_manifest
from .prompt import ImageSlot, Item, describe_positions, positions, slots_of, template_from_dict
from .runtime import RuntimeOptions
from .tokenizer import PromptTokenizer
from .chat import Chat
from .vision import choose_vision, precision_of, start_deferred_calibrations


def check_runnable(bundle: Path, manifest: Manifest, options: RuntimeOptions) -> None:
    """BundleError unless the bundle holds a template and its LLM in a form the options' backend runs."""
    if (manifest.llm is None and manifest.llm_hf is None) or manifest.template is None:
        raise BundleError(f"{bundle}: bundle has no LLM (exported by an older version?)")
    llm_kind(options.llm_backend).check(bundle, manifest)


class Model:
    """A loaded bundle. Not thread-safe: one conversation at a time per Model."""

    def __init__(self, bundle: str | os.PathLike, options: RuntimeOptions | None = None, *,
                 llm: LlmBackend | None = None, defer_llm: bool = False, context_for: tuple | None = None,
                 progress: Callable[[str], None] | None = None, verify: bool = True, **changes):
        """``options``: how to run (runtime.RuntimeOptions; ``changes``: its fields over it, for Python callers:
        ``Model(bundle, device="cpu", cache=False)``).
        ``llm``: an LLM backend already open on this bundle's LLM (default: the one ``options`` name).
        ``defer_llm``: load the LLM when a prompt first needs it, not now: a one-shot ``ask`` encodes its
        image and frees the graphs (``release_vision``) before the LLM takes its memory.
        ``context_for``: (question, max_tokens[, images]) of the one image question this Model will answer (the
        CLI's ``ask``): the LLM's context, and so its KV cache, is sized to the most that prompt can take (the
        images' token budget, one position per byte of the rendered text, the answer) instead of the
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

    def _llm_opener(self, context_for: tuple | None, verify: bool) -> Callable[[], LlmBackend]:
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

    def context_bound(self, question: str, max_tokens: int, images: int = 1) -> int:
        """Positions a one-question prompt with ``images`` images can take, at most, rounded up to 256: each
        image's token budget (pad, crop and native aspect all stay within the square's), a token per byte of the
        rendered text (SentencePiece and byte-level BPE never spend a token on less than a byte), BOS, the answer."""
        text = self.template.render([(question, None)], counts=[images])
        bound = images * self.manifest.tokens_per_image.square + len(text.encode("utf-8")) + 1 + max_tokens
        return -(-bound // 256) * 256

    def prompt_items(self, turns: Sequence[tuple[str, str | None]],
                     images: ImageSlot | Sequence[Sequence[ImageSlot]] | None, image_turn: int = 0,
                     system: str | None = None) -> list[Item]:
        """The conversation rendered by the bundle's template, as token ids with the images' slots: ``images``
        one slot (in the question of turn ``image_turn``), or per turn the slots of its images, in order (see
        ``place``); ``system`` replaces the template's system prompt."""
        self._need_llm()
        if images is None or isinstance(images, ImageSlot):
            counts = [int(images is not None and i == image_turn) for i in range(len(turns))]
            slots = [] if images is None else [images]
        else:
            counts, slots = [len(t) for t in images], [slot for t in images for slot in t]
        return self.tokenizer.items(self.template.render(turns, system=system, counts=counts), slots)

    def place(self, per_turn: Sequence[Sequence[Embedded]]) -> list[list[Embedded]]:
        """Where a conversation's images (per turn, in order) go in its prompt: each at a placeholder of its own
        in its turn (LLaVA's ``<image>\\n`` per image), or, for a family whose several images are a video's frames
        (LLaVA-Mini), all of them as one video at the first turn that has an image."""
        placed = [list(turn) for turn in per_turn]
        flat = [e for turn in placed for e in turn]
        if not self.family.images_as_frames or len(flat) < 2:
            return placed
        first = next(i for i, turn in enumerate(placed) if turn)
        return [[self.images.as_frames(flat)] if i == first else [] for i in range(len(placed))]

    def embed_all(self, images: "ImageInput | Sequence[ImageInput]", aspect: str | None = None) -> list[Embedded]:
        """Each image of one or several (a list or tuple of them), encoded in order (an image seen before: from
        the cache)."""
        return [self.embed(image, aspect) for image in image_list(images)]

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
    def answer(self, items: list[Item], embedded: Embedded | Sequence[Embedded] | None, options: AskOptions,
               on_done: Callable[[Answer], None] = lambda answer: None) -> AnswerStream:
        """The answer to a prompt already built (``prompt_items``), as a stream; ``embedded``: the prompt's images
        (one, or those its slots name); ``on_done`` sees the Answer."""
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

    def _answer(self, items: list[Item], embedded: Embedded | Sequence[Embedded] | None, options: AskOptions,
                logprobs: list | None = None) -> Generator[str, None, Answer]:
        options.validate()
        self._need_llm()
        self.check_constraint(options)
        given = [] if embedded is None else [embedded] if isinstance(embedded, Embedded) else list(embedded)
        rows_by_key = {e.slot.key: e.embeds for e in given if e.slot.key}
        for e in given:
            if e.slot.key:
                self.images.keep(e)
        missing = [slot for slot in slots_of(items) if slot.key not in rows_by_key]
        if missing:
            raise ConfigError(f"the prompt holds {len(missing)} image slot(s) whose images were not given")
        n_image_tokens, hit, preprocess_ms, encode_ms = images_summary(given)
        needed = positions(items)
        if needed + options.max_tokens > self.llm.n_ctx:
            raise ContextOverflowError(
                f"{describe_positions(items)} + up to {options.max_tokens} answer tokens > the context's "
                f"{self.llm.n_ctx} positions; use fewer --max-tokens, fewer or smaller images (--aspect native), or a "
                "shorter conversation")
        t0 = time.perf_counter()
        rows = self.family.llm_rows(self.vision, items, rows_by_key)
        evaluated = self.kv.prefill(items, rows_by_key, rows)
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
            text=decoder.stream.text.strip(), token_ids=decoder.tokens, n_image_tokens=n_image_tokens,
            n_prompt_positions=needed, n_evaluated=evaluated, stop_reason=decoder.reason, cache_hit=hit,
            constraint=options.constraint, logprobs=decoder.logprobs if options.logprobs is not None else None,
            cached_tokens=self.llm.server_cached_tokens if self.llm.capabilities.server_cache else needed - evaluated,
            timings={"preprocess_ms": preprocess_ms, "encode_ms": encode_ms,
                     "prefill_ms": (t1 - t0) * 1e3, "prefill_positions": evaluated,
                     "time_to_first_token_ms": preprocess_ms + encode_ms + (first_token_at - t0) * 1e3,
                     "decode_ms": decode_s * 1e3,
                     "decode_tokens_per_s": decoder.n_generated / decode_s if decode_s > 0 and decoder.n_generated else 0.0})

    def _question(self, embedded: Embedded | Sequence[Embedded] | None, question: str,
                  options: AskOptions) -> AnswerStream:
        """One question about ``embedded``'s images (None: no image), as a stream."""
        given = [] if embedded is None else [embedded] if isinstance(embedded, Embedded) else list(embedded)
        (placed,) = self.place([given])
        return self.answer(self.prompt_items([(question, None)], [[e.slot for e in placed]]), placed, options)

    def ask_stream(self, image: "ImageInput | Sequence[ImageInput]", question: str,
                   options: AskOptions = AskOptions(), *, schema=None, grammar: str | None = None) -> AnswerStream:
        """Yields text pieces as they are generated; ``.answer`` holds the Answer once exhausted. ``image``: one
        image, or several (a list or tuple), each placed before the question as the family's official code puts
        them (``place``). ``schema``: a JSON schema (a dict, JSON text or a pydantic model class) the answer fits
        (``.answer.parsed`` is its value); ``grammar``: GBNF text the answer follows instead."""
        options = constrained(options, schema, grammar)
        self.check_constraint(options)  # before the images are encoded
        return self._question(self.embed_all(image, options.aspect), question, options)

    def ask(self, image: "ImageInput | Sequence[ImageInput]", question: str, options: AskOptions = AskOptions(), *,
            schema=None, grammar: str | None = None) -> Answer:
        return _drain(self.ask_stream(image, question, options, schema=schema, grammar=grammar))

    def ask_once(self, image: "ImageInput | Sequence[ImageInput]", question: str,
                 options: AskOptions = AskOptions()) -> AnswerStream:
        """``ask_stream`` for a Model that answers one question: the images are encoded, the graphs are freed
        where the family allows (release_vision), then the LLM (deferred: ``defer_llm``) loads and answers."""
        embedded = self.embed_all(image, options.aspect)
        self.release_vision()
        return self._question(embedded, question, options)

    def ask_video_stream(self, video: VideoInput, question: str, options: AskOptions = AskOptions()) -> AnswerStream:
        return self._question(self.embed_video(video), question, options)

    def ask_text_stream(self, question: str, options: AskOptions = AskOptions()) -> AnswerStream:
        """A question with no image: the template without "<image>", plain tokens."""
        return self._question(None, question, options)

    def ask_text(self, question: str, options: AskOptions = AskOptions()) -> Answer:
        return _drain(self.ask_text_stream(question, options))

    def chat(self, image: "ImageInput | Sequence[ImageInput] | None" = None, options: AskOptions = AskOptions()) -> "Chat":
        """A conversation; ``image``: the image(s) of its first question (more come with ``Chat.ask(image=)``)."""
        return Chat(self, [] if image is None else self.embed_all(image, options.aspect), options)

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


def image_list(images: "ImageInput | Sequence[ImageInput]") -> list[ImageInput]:
    """One image or several (a list or tuple of them) as a list; none is a ConfigError."""
    listed = list(images) if isinstance(images, (list, tuple)) else [images]
    if not listed:
        raise ConfigError("no image given (a question without one: ask_text)")
    return listed


def load(bundle: str | os.PathLike | None = None, **kwargs) -> Model:
    """Load a bundle (default: the demo model shipped with the package)."""
    if bundle is None:
        from .default_model import default_bundle

        bundle = default_bundle()
    return Model(bundle, **kwargs)
