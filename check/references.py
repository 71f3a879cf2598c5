"""What ``check`` compares against: the fp32 vision graphs and the unquantized LLM.

A reference is the bundle itself (its fp32 graph; no LLM reference), another bundle (fp32 graphs, an
F16/F32 GGUF), or the checkpoint in PyTorch (torch_reference.py, with the export extra). Every LLM,
reference or candidate, is driven through the same pieces the runtime uses (tokenizer, KV evaluation,
Decoder): a bundle's LLM through its LLM backend, which must report logits for the LLM stage.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..backends import open_llm
from ..backends.base import LlmBackend, SamplingOptions, require
from ..decoding import Decoder
from ..errors import ConfigError
from ..kv_cache import evaluate_items
from ..manifest import Manifest, load_manifest, resolve_inside
from ..prompt import Item, image_end, positions
from ..quantize.accuracy import log_softmax, sequence_logits
from ..vision import open_encoder

MAX_ANSWER_TOKENS = 32


def after_image(items: Sequence[Item]) -> int:
    """KV position right after the (first) image slot."""
    return positions(items[:image_end(items)])


class AnswerOptions:
    """Greedy answers of a bounded length (Decoder's options)."""

    max_tokens = MAX_ANSWER_TOKENS
    sampling = SamplingOptions(temperature=0.0)


class BundleLlm:
    """A bundle's LLM on its backend (F32 KV cache: the measurement should not include KV rounding)."""

    def __init__(self, name: str, path: Path, threads: int | None):
        self.name, self.path = name, path
        self.backend: LlmBackend = open_llm(path, "cpu", n_ctx=2048, threads=threads, kv_f32=True)

    def logits(self, items: list[Item], rows_by_key: dict[str, np.ndarray], rows: np.ndarray | None = None) -> np.ndarray:
        """Logits from right after the image on; ``rows``: the whole prompt as rows (the family's llm_rows)."""
        require(self.backend, "logits", "check's LLM stage")
        if rows is None:
            return sequence_logits(self.backend, items, rows_by_key)
        self.backend.truncate(0)
        return self.backend.eval_embeddings(rows, all_logits=True)[after_image(items):]

    def answer(self, items: list[Item], rows_by_key: dict[str, np.ndarray], stops: Sequence[str],
               hidden_prefix: Sequence[int] = (), rows: np.ndarray | None = None) -> list[int]:
        """The greedy answer's visible token ids (a generated assistant header left out)."""
        require(self.backend, "token_ids", "check's answers stage")
        self.backend.truncate(0)
        if rows is None:
            evaluate_items(self.backend, items, rows_by_key)
        else:
            self.backend.eval_embeddings(rows)
        decoder = Decoder(self.backend, AnswerOptions(), stops, hidden_prefix)
        for _ in decoder.run():
            pass
        return decoder.visible_tokens

    def token_nll(self, tokens: list[int]) -> np.ndarray:
        require(self.backend, "logits", "check's perplexity")
        self.backend.truncate(0)
        logits = self.backend.eval_tokens(tokens[:-1], all_logits=True)
        lp = log_softmax(logits)
        return -lp[np.arange(len(tokens) - 1), tokens[1:]]

    def close(self) -> None:
        self.backend.close()


class Reference:
    """Where the fp32 vision and the unquantized LLM come from: "self", "bundle" or "checkpoint"."""

    kind = "self"

    def __init__(self, path: Path | None, threads: int | None):
        self.path, self.threads = path, threads
        self.manifest: Manifest | None = None

    def vision_encoder(self, bundle: Path, manifest: Manifest) -> tuple[str, Any]:
        """(description, encoder with encode_both) for the fp32 reference graph(s)."""
        source_bundle, source = (self.path, self.manifest) if self.kind == "bundle" else (bundle, manifest)
        fp32 = next((v for v in source.vision if v.variant == "fp32"), None)
        bf16 = next((v for v in source.vision if v.variant == "bf16"), None)
        if fp32 is None and bf16 is not None:  # the bf16 type ships the fp32 graph: run it in fp32
            fp32 = dataclasses.replace(bf16, variant="fp32", accuracy=None)
        if fp32 is None:
            raise ConfigError(f"{source_bundle}: no fp32 vision graph to compare against "
                              "(export one with --vision-type fp32, or pass --reference CHECKPOINT)")
        return f"fp32 graph(s) of {source_bundle}", open_encoder(source_bundle, source, fp32, "cpu", self.threads)

    def llm(self, piece, is_end) -> Any | None:
        return None

    def size(self) -> int | None:
        return None


class BundleReference(Reference):
    kind = "bundle"

    def __init__(self, path: Path, threads: int | None):
        super().__init__(path, threads)
        self.manifest = load_manifest(path)

    def llm(self, piece, is_end) -> BundleLlm | None:
        if self.manifest.llm is None:
            return None
        return BundleLlm(f"{self.manifest.llm.type} ({self.path})", resolve_inside(self.path, self.manifest.llm.file),
                         self.threads)

    def size(self) -> int | None:
        sizes = {f.path: f.size for f in self.manifest.files}
        fp32 = next((v for v in self.manifest.vision if v.variant == "fp32"), None)
        if fp32 is None:
            return None
        return sum(sizes[f] for f in fp32.files) + (sizes[self.manifest.llm.file] if self.manifest.llm else 0)
