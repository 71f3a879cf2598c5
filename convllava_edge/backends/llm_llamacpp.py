"""The language backend: llama.cpp through llama-cpp-python's C API, with embedding injection.

A llama_batch carries token ids or embeddings, never both, so a prompt is evaluated as runs:
text tokens, then the image's rows through ``llama_batch.embd``, then text tokens again, at
consecutive positions of one sequence. The high-level ``Llama`` class is not used: its prompt cache
matches on token ids only and cannot tell two images apart, so this class keeps its own record of
what the KV cache holds (see kv_cache.py).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np

from ..errors import BundleError, ConfigError, ConvLlavaEdgeError
from .llama_batch import batch_slot
from ..threads import check_threads, default_threads
from .base import ContextOverflowError, LlmCapabilities, SamplingOptions, Step
from .llama_sampling import Grammar, Sampler, Utf8Pieces

_backend_ready = False


@contextlib.contextmanager
def llama_log(on_line: Callable[[str], None]) -> Iterator[None]:
    """Route llama.cpp's log lines to ``on_line`` for the duration, then restore llama-cpp-python's logger."""
    import llama_cpp
    from llama_cpp import _logger

    pending = [""]

    @llama_cpp.llama_log_callback
    def callback(level, text, user_data):  # runs on the calling thread: quantization is synchronous
        pending[0] += text.decode("utf-8", errors="replace")
        *lines, pending[0] = pending[0].split("\n")
        for line in lines:
            on_line(line)

    llama_cpp.llama_log_set(callback, ctypes.c_void_p(0))
    try:
        yield
    finally:
        if pending[0]:
            on_line(pending[0])
        llama_cpp.llama_log_set(_quiet_callback() if _backend_ready else _logger.llama_log_callback, ctypes.c_void_p(0))


_QUIET = []


def _quiet_callback():
    """llama.cpp's log, errors only, to stderr. llama.cpp also logs from tokenization (e.g. the doubled
    BOS of LLaVA-Mini prompts, which the official code produces on purpose) and when contexts are
    freed; a library printing those on every call is noise."""
    import sys

    import llama_cpp

    if not _QUIET:
        @llama_cpp.llama_log_callback
        def callback(level, text, user_data):
            # GGML_LOG_LEVEL_ERROR; but llama.cpp's "2 BOS tokens" notice, also at that level, describes
            # exactly the prompt LLaVA-Mini's official code builds (its template writes BOS and the
            # tokenizer adds one to each chunk).
            if level == 3 and not text.startswith(b"check_double_bos_eos"):
                sys.stderr.write(text.decode("utf-8", errors="replace"))
        _QUIET.append(callback)  # keep a reference: ctypes callbacks must outlive their registration
    return _QUIET[0]


KV_TYPES = {"f16": 1, "f32": 0, "q8_0": 8}  # name -> ggml_type of the KV cache's keys and values
FLASH_ATTN = {"auto": -1, "off": 0, "on": 1}  # llama_flash_attn_type

def _ensure_backend(quiet: bool) -> None:
    global _backend_ready
    import llama_cpp
    from llama_cpp import _logger

    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True
    if quiet:
        llama_cpp.llama_log_set(_quiet_callback(), ctypes.c_void_p(0))
    else:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


class LlamaVocab:
    """Tokenization by llama.cpp's vocabulary (``self._l``, ``self.vocab``, ``self.n_vocab``): the LLM backend's own,
    and, loaded alone from a bundle's GGUF (``vocab_only``), the vLLM backend's, so that both tokenize alike."""

    def tokenize(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        buf = (self._l.llama_token * capacity)()
        n = self._l.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            buf = (self._l.llama_token * capacity)()
            n = self._l.llama_tokenize(self.vocab, data, len(data), buf, capacity, add_bos, parse_special)
        return list(buf[:n])

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = self._l.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = self._l.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: Sequence[int]) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        return bool(self._l.llama_vocab_is_eog(self.vocab, token))

    def special_tokens(self) -> dict[str, int]:
        """Text -> id for the control tokens (<s>, </s>, <unk>) the prompt may spell out."""
        out = {}
        for token in range(self.n_vocab):
            attr = self._l.llama_vocab_get_attr(self.vocab, token)
            if attr & (1 << 3):  # LLAMA_TOKEN_ATTR_CONTROL
                out[self._l.llama_vocab_get_text(self.vocab, token).decode("utf-8", errors="replace")] = token
        return out


    @classmethod
    def open(cls, path: str | os.PathLike, tensors: bool = True) -> "LlamaVocab":
        """The vocabulary of the GGUF at ``path``, without its weights (llama.cpp's vocab_only load); ``tensors``:
        the file is a whole LLM (False: a vocabulary-only GGUF, llm-vocab.gguf, which has none)."""
        import llama_cpp

        from ..gguf_check import validate_gguf

        validate_gguf(Path(path), tensors=tensors)
        _ensure_backend(True)
        self = cls()
        self._l = llama_cpp
        params = llama_cpp.llama_model_default_params()
        params.vocab_only = True
        with llama_log(lambda line: None):
            self._vocab_model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self._vocab_model:
            raise BundleError(f"{path}: llama.cpp cannot read this GGUF's vocabulary")
        self.vocab = llama_cpp.llama_model_get_vocab(self._vocab_model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        return self

    def close_vocab(self) -> None:
        if getattr(self, "_vocab_model", None):
            self._l.llama_model_free(self._vocab_model)
            self._vocab_model = None


class LlamaCppBackend(LlamaVocab):
    """One model, one context, one sequence (seq 0): every capability of the LLM-backend interface."""

    name = "llama.cpp"
    capabilities = LlmCapabilities(save_state=True, logits=True, token_ids=True, kv_reuse=True, fork=True,
                                   structured_output=True, logprobs=True)
    server_cached_tokens = None  # no server: Model counts what its KV cache reused

    def __init__(self, path: str | os.PathLike, n_ctx: int | None = None, threads: int | None = None,
                 n_gpu_layers: int = 0, n_batch: int = 512, kv_f32: bool = False, quiet: bool = True,
                 trial: bool = True, sha256: str | None = None, extra_bufts: bool | None = None,
                 n_ubatch: int | None = None, kv_type: str | None = None, flash_attn: str = "auto",
                 n_ctx_max: int | None = None, threads_batch: int | None = None):
        """``trial``: load the file in a child process first, the first time it is seen (see native.py);
        False only for files this process wrote itself. ``sha256``: the file's verified hash, if known.
        ``extra_bufts``: None lets the CPU-path probe decide; True/False forces llama.cpp's extra buffer
        types on or off (benchmarks, which run each setting in a child of their own).
        ``n_batch``: positions per llama_decode call; ``n_ubatch``: per graph evaluation (default n_batch).
        ``kv_type``: the KV cache's type, one of KV_TYPES (default f16; ``kv_f32`` is kv_type="f32", the
        parity runs' choice). ``flash_attn``: one of FLASH_ATTN. The defaults are the ones
        benchmarks/llm_build_bench.py --sweep measured fastest (see RESULTS.md); ``settings`` says what ran.
        ``n_ctx_max``: instead of ``n_ctx``, an upper bound: the trained context when that is smaller.
        ``threads_batch``: threads for prompt batches (default ``threads``, which then only decodes): ``serve``
        prefills one slot at a time on every core while each slot decodes on its share."""
        import llama_cpp

        from .. import native
        from ..gguf_check import validate_gguf

        self._l = llama_cpp
        check_threads(threads)
        check_threads(threads_batch)
        kv_type = kv_type or ("f32" if kv_f32 else "f16")
        if kv_type not in KV_TYPES:
            raise ConfigError(f"KV cache type must be one of {', '.join(KV_TYPES)}, got {kv_type!r}")
        if flash_attn not in FLASH_ATTN:
            raise ConfigError(f"flash attention must be one of {', '.join(FLASH_ATTN)}, got {flash_attn!r}")
        n_ubatch = n_ubatch or n_batch
        if not (0 < n_batch <= 8192 and 0 < n_ubatch <= n_batch):
            raise ConfigError(f"batch sizes must satisfy 0 < n_ubatch <= n_batch <= 8192, got {n_ubatch} and {n_batch}")
        self.path = Path(path)
        if not self.path.is_file():
            raise BundleError(f"{self.path}: LLM file not found")
        self.summary = validate_gguf(self.path)  # header checks before native code reads a byte
        if n_ctx is not None and not 0 < n_ctx <= max(self.summary.n_ctx_train, 1 << 20):
            raise ConfigError(f"n_ctx must be in 1..{max(self.summary.n_ctx_train, 1 << 20)}, got {n_ctx}")
        if extra_bufts is None:
            plan = native.load_plan(self.path, self.summary.weight_type)
            extra_bufts, self.extra_bufts_reason = plan.extra_bufts, plan.reason
        else:
            self.extra_bufts_reason = "chosen by the caller"
        if trial:
            planned = extra_bufts
            extra_bufts = native.trial_load(self.path, extra_bufts=extra_bufts, n_gpu_layers=n_gpu_layers, sha256=sha256)
            if planned and not extra_bufts:
                self.extra_bufts_reason = "a trial load of this file crashed with extra buffer types: off"
        self.extra_bufts = extra_bufts
        _ensure_backend(quiet)
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = n_gpu_layers
        mparams.use_extra_bufts = extra_bufts
        log: list[str] = []
        with llama_log(log.append if quiet else print):
            self.model = llama_cpp.llama_model_load_from_file(str(self.path).encode(), mparams)
            if not self.model:
                raise BundleError(f"{self.path}: llama.cpp cannot load this GGUF "
                                  f"({next((l for l in reversed(log) if 'error' in l.lower()), 'see llama.cpp log')})")
            self.vocab = llama_cpp.llama_model_get_vocab(self.model)
            self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.model)
        self._models = [1]  # contexts open on self.model (fork): the last to close frees it
        self.kv_f32 = kv_type == "f32"  # f16 (the default) rounds keys and values
        self.settings = {"threads": threads or default_threads(), "threads_batch": threads_batch or threads or default_threads(),
                         "n_ctx": min(n_ctx_max, self.n_ctx_train) if n_ctx_max else (n_ctx or self.n_ctx_train),
                         "n_batch": n_batch, "n_ubatch": n_ubatch, "kv_type": kv_type, "flash_attn": flash_attn,
                         "extra_bufts": extra_bufts, "extra_bufts_reason": self.extra_bufts_reason,
                         "weight_type": self.summary.weight_type, "n_gpu_layers": n_gpu_layers}
        self.n_embd = llama_cpp.llama_model_n_embd_inp(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.bos = llama_cpp.llama_vocab_bos(self.vocab)
        self.eos = llama_cpp.llama_vocab_eos(self.vocab)
        self.gpu_offload = n_gpu_layers != 0 and llama_cpp.llama_supports_gpu_offload()
        self._open_context(quiet)

    def _open_context(self, quiet: bool = True) -> None:
        """A llama.cpp context on self.model, as ``settings`` say: its KV cache, batches and threads."""
        lib, s = self._l, self.settings
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = s["n_ctx"]
        cparams.n_batch, cparams.n_ubatch = s["n_batch"], s["n_ubatch"]
        cparams.n_threads, cparams.n_threads_batch = s["threads"], s["threads_batch"]
        cparams.type_k = cparams.type_v = KV_TYPES[s["kv_type"]]
        cparams.flash_attn_type = FLASH_ATTN[s["flash_attn"]]
        log: list[str] = []
        with llama_log(log.append if quiet else print):
            self.ctx = lib.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            self._release_model()
            raise BundleError(f"{self.path}: llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.n_ctx = lib.llama_n_ctx(self.ctx)
        self.settings["n_ctx"] = self.n_ctx
        self.n_batch = s["n_batch"]
        self.threads = s["threads"]
        self.n_past = 0
        self._batch_tokens = lib.llama_batch_init(self.n_batch, 0, 1)
        self._batch_embd = lib.llama_batch_init(self.n_batch, self.n_embd, 1)
        self._grammars: dict[str, Grammar] = {}  # compiled grammars by hash, this context's (serve's slots are threads)

    @property
    def where(self) -> str:
        return "GPU" if self.gpu_offload else "CPU"

    def fork(self, threads: int | None = None, n_ctx: int | None = None,
             threads_batch: int | None = None) -> "LlamaCppBackend":
        """Another context (its own KV cache and position count) on the same loaded weights: ``serve``'s
        parallel slots. The weights are freed when the last context closes. Unset values are this one's."""
        if not getattr(self, "ctx", None):
            raise ConfigError("cannot fork a closed LLM backend")
        check_threads(threads)
        check_threads(threads_batch)
        other = object.__new__(type(self))
        other.__dict__.update({k: v for k, v in self.__dict__.items()
                               if k not in ("ctx", "_batch_tokens", "_batch_embd", "n_past", "_grammars")})
        other.settings = {**self.settings, "threads": threads or self.threads, "n_ctx": n_ctx or self.n_ctx,
                          "threads_batch": threads_batch or self.settings["threads_batch"]}
        self._models[0] += 1
        other._open_context()
        return other

    def _release_model(self) -> None:
        self._models[0] -= 1
        if self._models[0] == 0:
            self._l.llama_model_free(self.model)

    # -- evaluation ------------------------------------------------------------------------------
    def truncate(self, n_past: int) -> None:
        """Forget KV entries from position ``n_past`` on (keeps what a later prompt shares)."""
        mem = self._l.llama_get_memory(self.ctx)
        if not self._l.llama_memory_seq_rm(mem, 0, n_past, -1):
            self._l.llama_memory_clear(mem, True)
            n_past = 0
        self.n_past = n_past

    def save_sequence(self) -> bytes:
        """The KV cache of the sequence (every evaluated position), in llama.cpp's own state format."""
        size = self._l.llama_state_seq_get_size(self.ctx, 0)
        buf = (ctypes.c_ubyte * size)()
        written = self._l.llama_state_seq_get_data(self.ctx, buf, size, 0)
        return bytes(memoryview(buf)[:written])

    def load_sequence(self, state: bytes, n_past: int) -> bool:
        """Replace the KV cache with ``state`` (from save_sequence on this model, ``n_past`` positions).

        False, with an empty cache, when llama.cpp refuses it. Logits are not part of the state: the
        caller evaluates at least one more position before sampling.
        """
        self.truncate(0)
        if not state:
            return False
        buf = (ctypes.c_ubyte * len(state)).from_buffer_copy(state)
        if self._l.llama_state_seq_set_data(self.ctx, buf, len(state), 0) == 0:
            self.truncate(0)
            return False
        self.n_past = n_past
        return True

    def _check_room(self, n: int) -> None:
        if self.n_past + n > self.n_ctx:
            raise ContextOverflowError(f"the prompt needs {self.n_past + n} positions but the context holds {self.n_ctx}")

    def eval_tokens(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray | None:
        """Evaluate ``tokens`` at the next positions. Logits are kept for the last one, or with
        ``all_logits`` returned for every position as float32 [len(tokens), n_vocab]."""
        batch = self._batch_tokens

        def fill(part: Sequence[int]) -> None:
            for i, token in enumerate(part):
                batch.token[i] = token
        return self._evaluate(batch, tokens, fill, "tokens", all_logits)

    def eval_embeddings(self, embeds: np.ndarray, all_logits: bool = False) -> np.ndarray | None:
        """Inject rows of ``embeds`` [n, n_embd] as input embeddings at the next positions (logits as
        for eval_tokens)."""
        if embeds.ndim != 2 or embeds.shape[1] != self.n_embd:
            raise ConfigError(f"image embeddings have shape {list(embeds.shape)}, the LLM expects [n, {self.n_embd}]")
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        batch = self._batch_embd
        dst = np.ctypeslib.as_array(batch.embd, shape=(self.n_batch * self.n_embd,))

        def fill(part: np.ndarray) -> None:
            dst[: part.size] = part.reshape(-1)
        return self._evaluate(batch, embeds, fill, "image embeddings", all_logits)

    def _evaluate(self, batch, inputs, fill: Callable, what: str, all_logits: bool) -> np.ndarray | None:
        """``inputs`` (token ids or embedding rows) at the next positions, n_batch at a time through ``batch``:
        ``fill`` writes a part's inputs into it, this sets the positions and which logits to keep."""
        self._check_room(len(inputs))
        rows = []
        for start in range(0, len(inputs), self.n_batch):
            part = inputs[start:start + self.n_batch]
            fill(part)
            for i in range(len(part)):
                batch_slot(batch, i, self.n_past + i, last=all_logits or start + i == len(inputs) - 1)
            batch.n_tokens = len(part)
            self._decode(batch, f"{len(part)} {what}")
            self.n_past += len(part)
            if all_logits:
                rows += [self._logits_at(i) for i in range(len(part))]
        return np.stack(rows) if all_logits else None

    def _decode(self, batch, what: str) -> None:
        rc = self._l.llama_decode(self.ctx, batch)
        if rc != 0:
            raise ConvLlavaEdgeError(f"llama.cpp failed to evaluate {what} at position {self.n_past} (code {rc})")

    def last_logits(self) -> np.ndarray:
        """float32 [n_vocab] after the last evaluated position."""
        return self._logits_at(-1)

    def _logits_at(self, i: int) -> np.ndarray:
        ptr = self._l.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    # -- generation ------------------------------------------------------------------------------
    def generate(self, sampling: SamplingOptions, max_tokens: int, constraint=None,
                 logprobs: int | None = None) -> Iterator[Step]:
        """See LlmBackend.generate: each token is evaluated when the next is asked for, never the last."""
        sampler = Sampler(self, sampling, self.grammar(constraint) if constraint is not None else None, logprobs)
        for n in range(1, max_tokens + 1):
            token, logprob = sampler.sample()
            if self.is_end(token):
                return
            sampler.accept(token)
            yield Step(token, self.piece(token), logprob)
            if n < max_tokens:  # the last token's logits would go unused
                self.eval_tokens([token])

    def utf8_pieces(self) -> Utf8Pieces:
        """The vocabulary's pieces as Utf8Pieces (made once per model: forks share it)."""
        made = self.__dict__.get("_utf8")
        if made is None:
            made = Utf8Pieces([self.piece(t) for t in range(self.n_vocab)],
                              [t for t in range(self.n_vocab) if self.is_end(t)])
            self._utf8 = made
        return made

    def grammar(self, constraint) -> "Grammar":
        """A fresh grammar sampler for ``constraint`` (its parse state at the start), compiled once per grammar
        and model; a ConfigError with llama.cpp's own message for a grammar it cannot parse. Callers compile
        before answering (Model.check_constraint) so that this error comes before the first byte."""
        cache = self._grammars
        compiled = cache.get(constraint.key)
        if compiled is None:
            compiled = Grammar.compile(self._l, self.vocab, constraint.grammar, constraint.kind, llama_log)
            if len(cache) >= 64:
                cache.pop(next(iter(cache))).free()
            cache[constraint.key] = compiled
        return compiled.fresh()

    def close(self) -> None:
        if getattr(self, "ctx", None):
            for compiled in self._grammars.values():
                compiled.free()
            self._grammars.clear()
            self._l.llama_batch_free(self._batch_tokens)
            self._l.llama_batch_free(self._batch_embd)
            self._l.llama_free(self.ctx)
            self.ctx = None
            self._release_model()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


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
