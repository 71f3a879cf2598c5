"""An LLM backend in pure Python for the unit tier: characters are tokens, answers are scripted.

It implements backends/base.py's LlmBackend with whichever capabilities a test declares, so the
pipeline's pieces (tokenizer, KV cache record, decoder, Model) are tested without llama.cpp, and a
backend that can do none of the optional things (a vLLM server) is tested too.
"""

from __future__ import annotations

import numpy as np

from convllava_edge.backends.base import LlmCapabilities, Step

FULL = LlmCapabilities(save_state=True, logits=True, token_ids=True, kv_reuse=True)
NONE = LlmCapabilities()

BOS, EOS = 1, 2
SPECIALS = {"<s>": BOS, "</s>": EOS, "<|eot|>": 3}
OFFSET = 16  # token id = OFFSET + code point


class FakeLlm:
    name = "fake"

    def __init__(self, n_embd: int = 8, script: list[str] = (), capabilities: LlmCapabilities = FULL,
                 n_ctx: int = 4096, space_prefix: bool = True):
        self.n_embd, self.n_ctx, self.capabilities = n_embd, n_ctx, capabilities
        self.script = list(script)  # the next answer's pieces: token texts, "</s>" ends it
        self.space_prefix = space_prefix
        self.bos, self.threads, self.gpu_offload = BOS, 1, False
        self.where, self.server_cached_tokens = "CPU", None
        self.settings = {"kv_type": "f16"}
        self.n_past = 0
        self.evaluated: list = []  # everything evaluated into the sequence: ids, ("rows", n) for embeddings
        self.closed = False

    def tokenize(self, text: str, add_bos: bool = False, parse_special: bool = False) -> list[int]:
        ids = [BOS] if add_bos else []
        if self.space_prefix and text and not parse_special:
            text = " " + text  # SentencePiece's dummy prefix
        i = 0
        while i < len(text):
            special = next((s for s in SPECIALS if parse_special and text.startswith(s, i)), None)
            if special:
                ids.append(SPECIALS[special])
                i += len(special)
            else:
                ids.append(OFFSET + ord(text[i]))
                i += 1
        return ids

    def piece(self, token: int) -> bytes:
        return b"" if token < OFFSET else chr(token - OFFSET).encode("utf-8")

    def detokenize(self, tokens) -> str:
        return b"".join(self.piece(t) for t in tokens).decode("utf-8", errors="replace")

    def is_end(self, token: int) -> bool:
        return token == EOS

    def special_tokens(self) -> dict[str, int]:
        return dict(SPECIALS)

    def truncate(self, n_past: int) -> None:
        if not self.capabilities.kv_reuse:
            n_past = 0
        self.n_past = n_past
        kept, n = [], 0
        for item in self.evaluated:
            size = item[1] if isinstance(item, tuple) else 1
            if n + size > n_past:
                break
            kept.append(item)
            n += size
        self.evaluated = kept

    def eval_tokens(self, tokens, all_logits: bool = False):
        self.evaluated.extend(tokens)
        self.n_past += len(tokens)
        return np.zeros((len(tokens), 4), np.float32) if all_logits else None

    def eval_embeddings(self, rows: np.ndarray, all_logits: bool = False):
        assert rows.ndim == 2 and rows.shape[1] == self.n_embd
        self.evaluated.append(("rows", len(rows)))
        self.n_past += len(rows)
        return np.zeros((len(rows), 4), np.float32) if all_logits else None

    def generate(self, sampling, max_tokens: int):
        script, self.script = self.script, []
        for n, text in enumerate(script[:max_tokens], 1):
            token = SPECIALS[text] if text in SPECIALS else OFFSET + ord(text)
            if self.is_end(token):
                return
            yield Step(token if self.capabilities.token_ids else None, self.piece(token))
            if n < max_tokens:
                self.eval_tokens([token])

    def save_sequence(self) -> bytes:
        assert self.capabilities.save_state
        return repr((self.n_past, self.evaluated)).encode()

    def load_sequence(self, state: bytes, n_past: int) -> bool:
        assert self.capabilities.save_state
        import ast

        self.n_past, evaluated = ast.literal_eval(state.decode())
        self.evaluated = [tuple(e) if isinstance(e, (list, tuple)) else e for e in evaluated]
        return self.n_past == n_past

    def last_logits(self) -> np.ndarray:
        return np.zeros(4, np.float32)

    def close(self) -> None:
        self.closed = True
