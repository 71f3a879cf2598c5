"""A bundle, loaded: image -> embeddings -> spliced prompt -> llama.cpp -> streamed answer.

``Model.ask`` and ``Model.ask_stream`` answer one question; ``Model.chat`` keeps a conversation in
the official multi-turn format. The KV cache is reused across calls: the model remembers which
tokens and which image (by content key) fill it, evaluates only what differs from that record,
and re-tokenizes the whole conversation as the official code does, so reuse never changes ids.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from .cache import EmbeddingCache, cache_key
from .errors import BundleError, ConfigError
from .image import open_image, read_image_bytes
from .llm import ContextOverflowError, LlamaCppBackend, SamplingOptions, TextStream
from .manifest import Manifest, load_manifest, resolve_inside
from .preprocess import ASPECTS, PreprocessConfig, preprocess
from .prompt import IMAGE_TOKEN, ImageSlot, Item, common_prefix, image_end, positions, splice, template_from_dict
from .vision import DEVICES, OnnxVisionEncoder

ImageInput = str | os.PathLike | bytes | Image.Image
_SENTINEL = "\x01"  # see _ids_without_prefix


@dataclass(frozen=True)
class AskOptions:
    max_tokens: int = 512  # the official CLI's max_new_tokens
    sampling: SamplingOptions = SamplingOptions()
    aspect: str | None = None  # None: the bundle's default ("pad", as trained)

    def validate(self) -> None:
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
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

    def to_dict(self) -> dict:
        return {"answer": self.text, "token_ids": self.token_ids, "n_image_tokens": self.n_image_tokens,
                "n_prompt_positions": self.n_prompt_positions, "n_evaluated": self.n_evaluated,
                "stop_reason": self.stop_reason, "cache_hit": self.cache_hit, "timings": self.timings}


@dataclass
class _Embedded:
    slot: ImageSlot
    embeds: np.ndarray
    hit: bool
    preprocess_ms: float
    encode_ms: float


class Model:
    """A loaded bundle. Not thread-safe: one conversation at a time per Model."""

    def __init__(self, bundle: str | os.PathLike, *, device: str = "auto", threads: int | None = None,
                 vision_type: str | None = None, n_ctx: int | None = None, cache: EmbeddingCache | None | bool = True,
                 kv_f32: bool = False, verify: bool = True, context_for: tuple[str, int] | None = None):
        """``context_for``: (question, max_tokens) of the one image question this Model will answer (the CLI's
        ``ask``): the LLM's context, and so its KV cache, is sized to the most that prompt can take (the
        image's token budget, one position per byte of the rendered text, the answer) instead of the
        model's trained context (a 7B Llama's 4096 positions hold 2 GB of f16 keys and values)."""
        if device not in DEVICES:
            raise ConfigError(f"unknown device {device!r} (known: {', '.join(DEVICES)})")
        self.bundle = Path(bundle)
        self.manifest: Manifest = load_manifest(self.bundle, verify=verify)
        if self.manifest.llm is None or self.manifest.template is None:
            raise BundleError(f"{self.bundle}: bundle has no LLM (exported by an older version?)")
        entry = self.manifest.vision_entry(vision_type)
        self.vision_entry = entry
        self.family = self.manifest.family
        self.preprocess_config = PreprocessConfig.from_manifest(self.manifest.preprocess)
        self.template = template_from_dict(self.manifest.template)
        if self.family == "llava-mini":
            from .mini import MiniEncoder

            self.vision = MiniEncoder({role: resolve_inside(self.bundle, f) for role, f in entry.parts.items()},
                                      device=device, threads=threads)
        else:
            self.vision = OnnxVisionEncoder(resolve_inside(self.bundle, entry.graph), device=device, threads=threads)
        shas = {f.path: f.sha256 for f in self.manifest.files}
        fitted = context_for is not None and n_ctx is None and self.family != "llava-mini" \
            and "square" in self.manifest.tokens_per_image
        if fitted:
            n_ctx = self._context_bound(*context_for)
        self.llm = LlamaCppBackend(resolve_inside(self.bundle, self.manifest.llm.file), n_ctx=n_ctx, n_ctx_cap=fitted,
                                   threads=threads, n_gpu_layers=gpu_layers(device), kv_f32=kv_f32,
                                   sha256=shas[self.manifest.llm.file] if verify else None)
        self.note = f"{self.vision.note}; LLM on {'GPU' if self.llm.gpu_offload else 'CPU'} (llama.cpp)"
        if self.llm.n_embd != self.manifest.n_embd:
            raise BundleError(f"{self.bundle}: the LLM's embedding width {self.llm.n_embd} differs from the "
                              f"vision graph's {self.manifest.n_embd}")
        self.cache = EmbeddingCache() if cache is True else (cache or None)
        self._graph_sha = "+".join(shas[f] for f in entry.files)  # every graph that shapes the cached tokens
        self._llm_sha = shas[self.manifest.llm.file]  # shapes the cached KV states
        self.tokenizer = PromptTokenizer(self.llm, self.manifest.tokenizer)
        header = getattr(self.template, "answer_header", "")
        self._hidden_prefix = self.llm.tokenize(header, parse_special=True) if header else []
        self._kv: list[Item] = []  # what the KV cache holds, item by item
        self._memory: dict[str, np.ndarray] = {}  # embeddings of recent images, by slot key

    def _context_bound(self, question: str, max_tokens: int) -> int:
        """Positions a one-question image prompt can take, at most, rounded up to 256: the image's token
        budget (pad, crop and native aspect all stay within the square's), a token per byte of the rendered
        text (SentencePiece and byte-level BPE never spend a token on less than a byte), BOS, the answer."""
        text = self.template.render([(question, None)], image=True)
        bound = int(self.manifest.tokens_per_image["square"]) + len(text.encode("utf-8")) + 1 + max_tokens
        return -(-bound // 256) * 256

    def prompt_items(self, turns: Sequence[tuple[str, str | None]], slot: ImageSlot | None) -> list[Item]:
        return self.tokenizer.items(self.template.render(turns, image=slot is not None), slot)

    # -- image -------------------------------------------------------------------------------------
    def embed(self, image: ImageInput, aspect: str | None = None, use_cache: bool = True) -> _Embedded:
        aspect = aspect or self.manifest.preprocess.get("aspect", "pad")
        t0 = time.perf_counter()
        picture, digest, name = _load(image)
        key = cache_key(digest, self.manifest.preprocess, aspect, self._graph_sha)
        embeds = self._memory.get(key)
        if embeds is None and use_cache and self.cache is not None:
            embeds = self._usable(self.cache.get(key))
        if embeds is not None:
            t1 = time.perf_counter()
            return _Embedded(ImageSlot(key, self._slot_size(embeds)), embeds, True, (t1 - t0) * 1e3, 0.0)
        pixels = preprocess(open_image(picture, name=name), self.preprocess_config, aspect)
        t1 = time.perf_counter()
        embeds = self.vision.encode(pixels)
        t2 = time.perf_counter()
        if use_cache and self.cache is not None:
            self.cache.put(key, embeds)
        self._memory = {key: embeds}  # one image at a time in memory is what chat needs
        return _Embedded(ImageSlot(key, self._slot_size(embeds)), embeds, False, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    def embed_video(self, video: str | os.PathLike | bytes, use_cache: bool = True) -> _Embedded:
        """LLaVA-Mini: ~1 frame per second, each through CLIP and the compressor (one token per frame)."""
        from .video import read_frames

        if self.family != "llava-mini":
            raise ConfigError(f"{self.bundle}: video needs a LLaVA-Mini bundle (this one is {self.family})")
        t0 = time.perf_counter()
        frames, data = read_frames(video, self.preprocess_config.image_size)
        key = cache_key(hashlib.sha256(data).hexdigest(), self.manifest.preprocess, "video-1fps", self._graph_sha)
        embeds = self._memory.get(key)
        if embeds is None and use_cache and self.cache is not None:
            embeds = self._usable(self.cache.get(key), video=True)
        if embeds is not None:
            return _Embedded(ImageSlot(key, self._slot_size(embeds)), embeds, True, (time.perf_counter() - t0) * 1e3, 0.0)
        pixels = [preprocess(f, self.preprocess_config, "crop") for f in frames]
        t1 = time.perf_counter()
        embeds = np.stack([self.vision.encode(p) for p in pixels])  # [frames, N + C*C, d]
        t2 = time.perf_counter()
        if use_cache and self.cache is not None:
            self.cache.put(key, embeds)
        self._memory = {key: embeds}
        return _Embedded(ImageSlot(key, self._slot_size(embeds)), embeds, False, (t1 - t0) * 1e3, (t2 - t1) * 1e3)

    def ask_video_stream(self, video: str | os.PathLike | bytes, question: str, options: AskOptions = AskOptions(),
                         use_cache: bool = True) -> "AnswerStream":
        embedded = self.embed_video(video, use_cache)
        return AnswerStream(self, self.prompt_items([(question, None)], embedded.slot), embedded, options)

    def _usable(self, embeds: np.ndarray | None, video: bool = False) -> np.ndarray | None:
        """A cached array the LLM can take ([n > 0, n_embd] float32; [frames, n, n_embd] for video), else
        None: a miss, so the image is encoded again and the entry rewritten. (EmbeddingCache.get already
        checked the entry's checksum and that its values are finite; this checks it is the shape this
        bundle makes.)"""
        if embeds is None:
            return None
        ndim = 3 if video else 2
        if embeds.dtype != np.float32 or embeds.ndim != ndim or embeds.shape[-1] != self.manifest.n_embd \
                or 0 in embeds.shape:
            return None
        return embeds

    def _slot_size(self, embeds: np.ndarray) -> int:
        """LLM positions the image takes: ConvLLaVA one per embedding row; LLaVA-Mini C*C per frame."""
        if self.family != "llava-mini":
            return len(embeds)
        frames = embeds.shape[0] if embeds.ndim == 3 else 1
        return frames * int(self.manifest.tokens_per_image["compressed"])

    def _mini_rows(self, items: Sequence[Item]) -> np.ndarray:
        """The LLM's input rows for a LLaVA-Mini prompt (see mini.prompt_rows)."""
        from .mini import prompt_rows

        return prompt_rows(self.vision, items, self._memory)

    # -- generation --------------------------------------------------------------------------------
    def _kv_key(self, prefix: Sequence[Item]) -> str:
        """Cache key of the KV state after ``prefix`` (tokens and the image slot, whose key names the image,
        preprocessing and graphs), for this GGUF and KV type."""
        text = ",".join(f"i{it.key}" if isinstance(it, ImageSlot) else str(it) for it in prefix)
        return hashlib.sha256(f"kv2|{self._llm_sha}|{self.llm.settings['kv_type']}|{text}".encode()).hexdigest()

    def _run(self, items: list[Item], embedded: _Embedded | None, options: AskOptions,
             answer_out: list[Answer], use_cache: bool = True) -> Iterator[str]:
        options.validate()
        embedded = embedded or _Embedded(ImageSlot("", 0), np.zeros((0, 0), np.float32), False, 0.0, 0.0)  # text only
        if embedded.slot.key:
            self._memory[embedded.slot.key] = embedded.embeds
        needed = positions(items)
        if needed + options.max_tokens > self.llm.n_ctx:
            raise ContextOverflowError(
                f"the prompt takes {needed} positions ({embedded.slot.n_tokens} image + {needed - embedded.slot.n_tokens} "
                f"text) and the answer up to {options.max_tokens} more, but the context holds {self.llm.n_ctx}; "
                "use fewer --max-tokens, a smaller image (--aspect native), or a shorter conversation")
        t0 = time.perf_counter()
        keep = common_prefix(self._kv, items)
        if self.family == "llava-mini" and _slot(self._kv) != _slot(items):
            # pre-fusion lets every text row see the image, the rows before <image> included: the same
            # token prefix with another image is another sequence of embeddings
            keep = 0
        keep = min(keep, len(items) - 1)  # the last prompt item is always evaluated: its logits start the answer
        # ConvLLaVA: the KV state up to the image (system prompt, image rows) does not depend on the question,
        # and the state of the text before the image (the system prompt) depends on nothing but the GGUF and
        # the template. The disk cache keeps both, so a later `ask`, even in another process, starts after
        # the image it saw before, or else after the system prompt. (LLaVA-Mini pre-fuses the question into
        # every row: nothing to share.)
        end = image_end(items)
        to_store: list[tuple[int, str]] = []  # (boundary, key) states to save on the way
        if use_cache and self.cache is not None and self.family != "llava-mini":
            for boundary in (end, end - 1):  # after the image; after the text before it
                if not keep < boundary < len(items):
                    continue
                key = self._kv_key(items[:boundary])
                state = self.cache.get(key)
                if state is not None and state.dtype == np.uint8 and state.ndim == 1:
                    if self.llm.load_sequence(state.tobytes(), positions(items[:boundary])):
                        keep = boundary
                        break
                    keep = 0  # a refused state leaves the KV cache empty
                to_store.append((boundary, key))
        start = positions(items[:keep])
        self.llm.truncate(start)
        self._kv = list(items[:keep])
        if self.family == "llava-mini" and _slot(items) is not None:  # the whole prompt as embeddings: fused text
            # and compressed token(s); a prompt without an image skips pre-fusion (plain tokens, as official)
            rows = self._mini_rows(items)
            self.llm.eval_embeddings(rows[start:])
            self._kv.extend(items[keep:])
            evaluated = len(rows) - start
        else:
            evaluated, done = 0, keep
            for boundary, key in sorted(to_store):
                if boundary > done:
                    evaluated += evaluate_items(self.llm, items[done:boundary], self._memory, self._kv.append)
                    self.cache.put(key, np.frombuffer(self.llm.save_sequence(), np.uint8))
                    done = boundary
            evaluated += evaluate_items(self.llm, items[done:], self._memory, self._kv.append)
        t1 = time.perf_counter()
        decoder = Decoder(self.llm, options, self.template.stop, self._kv.append, self._hidden_prefix)
        yield from decoder.run()
        t2 = time.perf_counter()
        first_token_at = decoder.first_token_at or t2
        decode_s = t2 - t1
        answer_out.append(Answer(
            text=decoder.stream.text.strip(), token_ids=decoder.tokens, n_image_tokens=embedded.slot.n_tokens,
            n_prompt_positions=needed, n_evaluated=evaluated, stop_reason=decoder.reason, cache_hit=embedded.hit,
            timings={"preprocess_ms": embedded.preprocess_ms, "encode_ms": embedded.encode_ms,
                     "prefill_ms": (t1 - t0) * 1e3, "prefill_positions": evaluated,
                     "time_to_first_token_ms": embedded.preprocess_ms + embedded.encode_ms + (first_token_at - t0) * 1e3,
                     "decode_ms": decode_s * 1e3,
                     "decode_tokens_per_s": len(decoder.tokens) / decode_s if decode_s > 0 and decoder.tokens else 0.0}))

    def ask_stream(self, image: ImageInput, question: str, options: AskOptions = AskOptions(),
                   use_cache: bool = True) -> "AnswerStream":
        """Yields text pieces as they are generated; ``.answer`` holds the Answer once exhausted."""
        embedded = self.embed(image, options.aspect, use_cache)
        items = self.prompt_items([(question, None)], embedded.slot)
        return AnswerStream(self, items, embedded, options, use_cache=use_cache)

    def ask(self, image: ImageInput, question: str, options: AskOptions = AskOptions(), use_cache: bool = True) -> Answer:
        stream = self.ask_stream(image, question, options, use_cache)
        for _ in stream:
            pass
        return stream.answer

    def ask_text_stream(self, question: str, options: AskOptions = AskOptions()) -> "AnswerStream":
        """A question with no image: the template without "<image>", plain tokens (LLaVA-Mini: no pre-fusion)."""
        return AnswerStream(self, self.prompt_items([(question, None)], None), None, options)

    def ask_text(self, question: str, options: AskOptions = AskOptions()) -> Answer:
        stream = self.ask_text_stream(question, options)
        for _ in stream:
            pass
        return stream.answer

    def chat(self, image: ImageInput, options: AskOptions = AskOptions(), use_cache: bool = True) -> "Chat":
        return Chat(self, self.embed(image, options.aspect, use_cache), options, use_cache)

    def reset(self) -> None:
        """Forget the KV cache and in-memory embeddings (benchmarks: every run starts cold)."""
        self.llm.truncate(0)
        self._kv = []
        self._memory = {}

    def close(self) -> None:
        self.llm.close()


class PromptTokenizer:
    """``tokenizer(chunk).input_ids`` of the checkpoint's tokenizer, computed with the GGUF's vocabulary."""

    def __init__(self, llm: LlamaCppBackend, info: dict):
        self.llm = llm
        self.bpe = info.get("kind") == "bpe"  # Llama-3: HF's fast tokenizer, whose chunks need no dummy-prefix rules
        self.add_space_prefix = info.get("add_space_prefix", True)
        self.space_after_special = info.get("space_after_special", True)
        self.specials = llm.special_tokens()  # "<s>", "</s>", "<unk>" -> ids, as the HF tokenizer parses them
        names = sorted(self.specials, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def chunk(self, text: str) -> list[int]:
        """BOS, then the text's ids; special tokens written in the text become their ids."""
        if self.bpe:
            return self.llm.tokenize(text, add_bos=True, parse_special=True)
        ids = [self.llm.bos]
        after_special = False
        for part in self._split.split(text) if self._split else [text]:
            if part in self.specials:
                ids.append(self.specials[part])
                after_special = True
            elif part:
                prefix = not after_special or self.space_after_special
                ids += self.llm.tokenize(part) if prefix else self._ids_without_prefix(part)
                after_special = False
        return ids

    def items(self, prompt: str, slot: ImageSlot | None) -> list[Item]:
        """The rendered prompt as token ids with the image slot where ``<image>`` was (no slot: text only)."""
        if slot is None:
            return self.chunk(prompt)
        return splice([self.chunk(c) for c in prompt.split(IMAGE_TOKEN)], slot, self.llm.bos)

    def _ids_without_prefix(self, text: str) -> list[int]:
        """Tokenize ``text`` without SentencePiece's dummy-prefix space.

        HF's tokenizer with ``legacy: false`` adds no space to text that follows a special token
        (``</s>USER:`` -> ``US ER :``); llama.cpp always does. A leading control byte cannot merge with
        any piece, so tokenizing it first and dropping its tokens leaves the text's own ids -- the
        same trick HF itself plays with ``<unk>``.
        """
        if not self.add_space_prefix:
            return self.llm.tokenize(text)
        probe = self.llm.tokenize(_SENTINEL)
        ids = self.llm.tokenize(_SENTINEL + text)
        if ids[: len(probe)] != probe:
            raise BundleError("the vocabulary merges a control byte with text; cannot tokenize without a prefix")
        return ids[len(probe):]


def evaluate_items(llm: LlamaCppBackend, items: Sequence[Item], embeds: dict[str, np.ndarray],
                   on_item: Callable[[Item], None] = lambda item: None) -> int:
    """Evaluate ``items`` at the next positions: runs of tokens batched, image slots injected.

    Returns the number of positions evaluated; ``on_item`` sees each item once it is in the KV cache.
    """
    evaluated, i = 0, 0
    while i < len(items):
        if isinstance(items[i], ImageSlot):
            llm.eval_embeddings(embeds[items[i].key])
            evaluated += items[i].n_tokens
            on_item(items[i])
            i += 1
            continue
        j = i
        while j < len(items) and not isinstance(items[j], ImageSlot):
            j += 1
        llm.eval_tokens(items[i:j])
        evaluated += j - i
        for token in items[i:j]:
            on_item(token)
        i = j
    return evaluated


class Decoder:
    """Sample an answer after an evaluated prompt: stops at EOS, a stop string, or max_tokens."""

    def __init__(self, llm: LlamaCppBackend, options: AskOptions, stops: Sequence[str],
                 on_token: Callable[[int], None] = lambda token: None, hidden_prefix: Sequence[int] = ()):
        self.llm, self.options, self.on_token = llm, options, on_token
        self.hidden_prefix = list(hidden_prefix)  # generated header tokens (LLaVA-Mini: the assistant header): kept, not shown
        self._hiding = bool(self.hidden_prefix)
        self.stream = TextStream(stops)
        self.tokens: list[int] = []
        self.reason = "length"
        self.first_token_at: float | None = None

    def run(self) -> Iterator[str]:
        sampler = self.llm.sampler(self.options.sampling)
        while len(self.tokens) < self.options.max_tokens:
            token = sampler.sample()
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            if self.llm.is_end(token):
                self.reason = "eos"
                break
            self.tokens.append(token)
            if self._hiding and self.tokens == self.hidden_prefix[:len(self.tokens)]:
                self._hiding = len(self.tokens) < len(self.hidden_prefix)  # the whole header seen: hidden for good
                text = ""
            else:
                held = self.tokens[:-1] if self._hiding else []  # it was not the header after all: show it
                self._hiding = False
                text = "".join(self.stream.push(self.llm.piece(t)) for t in held + [token])
            if text:
                yield text
            if self.stream.stopped:
                self.reason = "stop"
                break
            if len(self.tokens) < self.options.max_tokens:  # the last token's logits would go unused
                self.llm.eval_tokens([token])
                self.on_token(token)
        tail = self.stream.finish()
        if tail:
            yield tail


class AnswerStream:
    """Iterate for text pieces; ``.answer`` holds the Answer once the stream is exhausted."""

    def __init__(self, model: Model, items: list[Item], embedded: _Embedded, options: AskOptions,
                 on_done: Callable[[Answer], None] = lambda answer: None, use_cache: bool = True):
        self._out: list[Answer] = []
        self._gen = model._run(items, embedded, options, self._out, use_cache)
        self._on_done = on_done

    def __iter__(self) -> Iterator[str]:
        yield from self._gen
        self._on_done(self.answer)

    @property
    def answer(self) -> Answer:
        if not self._out:
            raise RuntimeError("the stream has not been consumed yet")
        return self._out[0]


class Chat:
    """A multi-turn conversation about one image (``... ASSISTANT: A1</s>USER: Q2 ASSISTANT:``)."""

    def __init__(self, model: Model, embedded: _Embedded, options: AskOptions, use_cache: bool = True):
        self.model, self.embedded, self.options, self.use_cache = model, embedded, options, use_cache
        self.turns: list[tuple[str, str]] = []

    def ask_stream(self, question: str, options: AskOptions | None = None) -> AnswerStream:
        items = self.model.prompt_items([*self.turns, (question, None)], self.embedded.slot)
        stream = AnswerStream(self.model, items, self.embedded, options or self.options,
                              on_done=lambda answer: self.turns.append((question, answer.text)), use_cache=self.use_cache)
        # Later turns reuse the embeddings in hand: no preprocessing or encoding to report.
        self.embedded = _Embedded(self.embedded.slot, self.embedded.embeds, True, 0.0, 0.0)
        return stream

    def ask(self, question: str, options: AskOptions | None = None) -> Answer:
        stream = self.ask_stream(question, options)
        for _ in stream:
            pass
        return stream.answer


def _slot(items: Sequence[Item]) -> ImageSlot | None:
    return next((i for i in items if isinstance(i, ImageSlot)), None)


def gpu_layers(device: str) -> int:
    """llama.cpp layers to offload: all on a GPU build unless --device cpu."""
    import llama_cpp

    if device == "cpu":
        return 0
    if not llama_cpp.llama_supports_gpu_offload():
        if device == "cuda":
            raise ConfigError("--device cuda: this llama-cpp-python was built without GPU support "
                              "(reinstall it with CMAKE_ARGS=\"-DGGML_CUDA=on\")")
        return 0
    return -1


def _load(image: ImageInput) -> tuple[ImageInput, str, str | None]:
    """The image source, a digest of its content (file bytes, or pixels for a PIL image) and its name
    for messages (None: no name)."""
    if isinstance(image, Image.Image):
        h = hashlib.sha256(f"{image.mode}{image.size}".encode())
        h.update(image.tobytes())
        return image, h.hexdigest(), None
    if isinstance(image, (bytes, bytearray)):
        return bytes(image), hashlib.sha256(image).hexdigest(), None
    name, data = read_image_bytes(image, sniff=True)
    return data, hashlib.sha256(data).hexdigest(), name


def load(bundle: str | os.PathLike | None = None, **kwargs) -> Model:
    """Load a bundle (default: the demo model shipped with the package)."""
    if bundle is None:
        from .default_model import default_bundle

        bundle = default_bundle()
    return Model(bundle, **kwargs)
