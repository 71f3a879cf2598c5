"""llama.cpp's sampling for the LLM backend: the sampler chain, a constraint's grammar, logprobs.

- ``Sampler``: greedy, or top-p, temperature and a seeded draw (llama.cpp's own samplers); with a ``Grammar``
  the candidates are masked first, as llama.cpp's common sampler does, then drawn by the same chain.
- ``Grammar``: a compiled GBNF grammar (``llama_sampler_init_grammar``); llama.cpp's parse errors as one line.
- ``Utf8Pieces``: under a constraint, only tokens that keep the answer valid UTF-8.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import threading
from typing import Iterator, Sequence

import numpy as np

from ..errors import ConfigError
from .base import MAX_TOP_LOGPROBS, SamplingOptions, TokenLogprob


class Grammar:
    """One llama.cpp grammar sampler (``llama_sampler_init_grammar``): its rules and its parse state."""

    def __init__(self, lib, sampler):
        self._lib, self.sampler = lib, sampler

    @classmethod
    def compile(cls, lib, vocab, text: str, kind: str, llama_log) -> "Grammar":
        """llama.cpp reports a grammar it cannot parse by a NULL sampler and a log line ("failed to parse
        grammar"); the reason itself its parser writes to stderr (fprintf, not the log), so stderr is read
        for the call's duration (_captured_stderr). ``llama_log``: the backend's log router (llm_llamacpp)."""
        log: list[str] = []
        with llama_log(log.append), _captured_stderr() as err:
            sampler = lib.llama_sampler_init_grammar(vocab, text.encode("utf-8"), b"root")
        if not sampler:
            what = "the grammar" if kind == "grammar" else "the schema's grammar"
            raise ConfigError(f"{what} does not parse: {parse_error(err.text, text, log)}"[:400])
        return cls(lib, sampler)

    def fresh(self) -> "Grammar":
        """A copy at the start of the grammar: one per answer (it accepts each token of that answer)."""
        return Grammar(self._lib, self._lib.llama_sampler_clone(self.sampler))

    def free(self) -> None:
        if self.sampler:
            self._lib.llama_sampler_free(self.sampler)
            self.sampler = None

    def __del__(self):
        try:
            self.free()
        except Exception:
            pass


class Utf8Pieces:
    """Which tokens keep a constrained answer valid UTF-8.

    llama.cpp's grammar decodes a token's bytes leniently: it takes F7 80 81 BF (no character: past U+10FFFF)
    or a lead byte followed by ASCII as one character, so a string that the grammar counted as 12 characters
    could decode to 18, or JSON text the grammar accepted could hold bytes no decoder takes. Here, under a
    constraint, a token is allowed only where the bytes so far plus its own are UTF-8 (whole, or a valid
    beginning of a character), and the answer may only end on a whole character. Pieces that are whole text
    on their own (nearly all) are checked once per vocabulary; the others (byte tokens, split characters)
    each step, against the bytes still waiting for their character's end."""

    def __init__(self, pieces: Sequence[bytes], eog: Sequence[int]):
        self.pieces = pieces
        self.whole = np.array([_utf8_state(p) == "whole" for p in pieces])
        self.others = np.flatnonzero(~self.whole)
        self.eog = np.asarray(list(eog), dtype=np.int64)

    def mask(self, logits: np.ndarray, partial: bytes) -> None:
        """Set to -inf the logits of tokens that would break UTF-8 after ``partial`` (in place)."""
        if partial:
            logits[self.whole] = -np.inf
            logits[self.eog] = -np.inf
        for i in self.others:
            if np.isfinite(logits[i]) and _utf8_state(partial + self.pieces[i]) == "invalid":
                logits[i] = -np.inf

    def tail(self, partial: bytes, token: int) -> bytes:
        """The bytes still waiting for their character's end after ``token``."""
        data = partial + self.pieces[token]
        if _utf8_state(data) == "whole":
            return b""
        for cut in range(1, 4):  # an unfinished character is at most 3 bytes of a 4-byte sequence
            if len(data) >= cut and _utf8_state(data[:-cut]) == "whole":
                return data[-cut:]
        return data


def _utf8_state(data: bytes) -> str:
    """"whole": valid UTF-8; "partial": valid but ends inside a character; "invalid"."""
    try:
        data.decode("utf-8")
        return "whole"
    except UnicodeDecodeError as e:
        return "partial" if e.reason == "unexpected end of data" and e.end == len(data) else "invalid"


_STDERR_LOCK = threading.Lock()


class _Captured:
    text = ""


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """What native code writes to file descriptor 2 meanwhile, in ``.text`` afterwards (a grammar's
    compilation takes well under a millisecond; other threads' lines of that moment go there too)."""
    import sys
    import tempfile

    out = _Captured()
    with _STDERR_LOCK, tempfile.TemporaryFile() as tmp:
        sys.stderr.flush()
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield out
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            out.text = tmp.read(64 * 1024).decode("utf-8", errors="replace")


def parse_error(stderr: str, grammar: str, log: Sequence[str]) -> str:
    """llama.cpp's reason for refusing ``grammar`` (its parser's "error parsing grammar: ..." line), with the
    line of the grammar it points at where its "at <text>" can be found there."""
    found = re.search(r"error parsing grammar: (.*)", stderr)
    if not found:
        lines = [line.strip() for line in log if line.strip()]
        return next((line for line in lines if "error" in line.lower()), "llama.cpp gave no reason")
    detail = found.group(1).strip()
    if detail.endswith(" at"):
        return detail[:-3] + " (at the end of the grammar)"
    at = re.search(r" at (.+)$", detail)
    if at:
        offset = grammar.find(at.group(1)[:40])
        if offset >= 0:
            return f"{detail[:at.start()]} (line {grammar.count(chr(10), 0, offset) + 1})"
    return detail


class Sampler:
    """A llama.cpp sampler chain: greedy at temperature 0, else top-p, temperature, seeded draw; with a
    ``grammar``, its mask first (as llama.cpp's own common sampler applies it), and with ``logprobs``, each
    token's TokenLogprob (``backend``: the LlamaCppBackend whose context it samples). Unconstrained, the chain
    samples from the context's logits itself
    (``llama_sampler_sample``), token for token what it did before constraints existed."""

    def __init__(self, backend, options: SamplingOptions, grammar: Grammar | None = None,
                 logprobs: int | None = None):
        options.validate()
        if logprobs is not None and not 0 <= logprobs <= MAX_TOP_LOGPROBS:
            raise ConfigError(f"top_logprobs must be in 0..{MAX_TOP_LOGPROBS}, got {logprobs}")
        lib = self._lib = backend._l
        self._ctx = backend.ctx
        self.n_vocab, self._eos = backend.n_vocab, backend.eos
        self.grammar, self.logprobs = grammar, logprobs
        self._utf8 = backend.utf8_pieces() if grammar is not None else None
        self._partial = b""  # the answer's trailing bytes that do not yet make a whole character
        self.chain = lib.llama_sampler_chain_init(lib.llama_sampler_chain_default_params())
        if options.temperature == 0:
            lib.llama_sampler_chain_add(self.chain, lib.llama_sampler_init_greedy())
        else:
            if options.top_p < 1:
                lib.llama_sampler_chain_add(self.chain, lib.llama_sampler_init_top_p(options.top_p, 1))
            lib.llama_sampler_chain_add(self.chain, lib.llama_sampler_init_temp(options.temperature))
            lib.llama_sampler_chain_add(self.chain, lib.llama_sampler_init_dist(options.seed))  # < SEED_LIMIT
        if grammar is not None:
            # llama_token_data {int32 id; float logit; float p}: the candidates, filled from the logits each step
            self._data = np.zeros(self.n_vocab, dtype=np.dtype([("id", "<i4"), ("logit", "<f4"), ("p", "<f4")]))
            self._ids = np.arange(self.n_vocab, dtype=np.int32)
            self._array = lib.llama_token_data_array(
                data=self._data.ctypes.data_as(ctypes.POINTER(lib.llama_token_data)), size=self.n_vocab,
                selected=-1, sorted=False)

    def _logits(self) -> np.ndarray:
        ptr = self._lib.llama_get_logits_ith(self._ctx, -1)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def sample(self) -> tuple[int, TokenLogprob | None]:
        """The next token and, when asked for, its TokenLogprob. ``accept`` it unless it ends the answer."""
        if self.grammar is None:
            token = self._lib.llama_sampler_sample(self.chain, self._ctx, -1)
            return token, (self._logprob(self._logits(), token) if self.logprobs is not None else None)
        data = self._data
        data["id"], data["logit"], data["p"] = self._ids, self._logits(), 0.0
        self._array.data = data.ctypes.data_as(ctypes.POINTER(self._lib.llama_token_data))
        self._array.size, self._array.selected, self._array.sorted = self.n_vocab, -1, False
        self._lib.llama_sampler_apply(self.grammar.sampler, ctypes.byref(self._array))  # -inf where not allowed
        self._utf8.mask(data["logit"], self._partial)
        allowed = data["logit"].copy() if self.logprobs is not None else None
        if not np.isfinite(data["logit"]).any():  # nothing allowed (cannot happen with a parsed grammar): end
            return self._eos, None
        self._lib.llama_sampler_apply(self.chain, ctypes.byref(self._array))
        token = int(self._array.data[self._array.selected].id)
        return token, (self._logprob(allowed, token) if allowed is not None else None)

    def accept(self, token: int) -> None:
        if self.grammar is not None:
            self._partial = self._utf8.tail(self._partial, token)
            self._lib.llama_sampler_accept(self.grammar.sampler, token)
            self._lib.llama_sampler_accept(self.chain, token)  # llama_sampler_sample accepts into the chain itself

    def _logprob(self, logits: np.ndarray, token: int) -> TokenLogprob:
        """log-softmax of ``logits`` (-inf for tokens a constraint masks), at ``token`` and its top alternatives."""
        z = logits.astype(np.float64)
        finite = np.isfinite(z)
        top = z.max(where=finite, initial=-np.inf)
        logp = z - (top + np.log(np.exp(z - top, where=finite, out=np.zeros_like(z)).sum()))
        logp[~finite] = -np.inf
        k = min(self.logprobs, int(finite.sum()))
        best = np.argpartition(-logp, k - 1)[:k] if k else np.empty(0, dtype=np.int64)
        best = best[np.lexsort((best, -logp[best]))]  # most likely first, ties by id
        return TokenLogprob(float(logp[token]), tuple((int(i), float(logp[i])) for i in best))

    def __del__(self):
        try:
            self._lib.llama_sampler_free(self.chain)
            if self.grammar is not None:
                self.grammar.free()
        except Exception:
            pass
