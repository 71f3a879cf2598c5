"""What a quantized LLM costs: next-token distributions against a reference, on image-conditioned prompts.

Both models see the same sequence (prompt tokens with the same image embeddings injected); at every
text position after the image, the candidate's next-token distribution is compared with the
reference's: KL(reference || candidate) and whether their most likely tokens agree.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ..kv_cache import evaluate_items
from ..prompt import Item


@dataclass(frozen=True)
class LlmAgreement:
    kl_mean: float  # nats, mean over positions
    kl_p99: float  # 99th percentile over positions
    top1: float  # fraction of positions where both pick the same most likely token
    n_positions: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def compare_logits(reference: Sequence[np.ndarray], candidate: Sequence[np.ndarray]) -> LlmAgreement:
    """Each element [positions, n_vocab]; pooled over all elements."""
    kls, agree = [], []
    for ref, cand in zip(reference, candidate, strict=True):
        if ref.shape != cand.shape:
            raise ValueError(f"logit shapes differ: {ref.shape} vs {cand.shape}")
        lp, lq = log_softmax(ref), log_softmax(cand)
        kls.append((np.exp(lp) * (lp - lq)).sum(-1))
        agree.append(ref.argmax(-1) == cand.argmax(-1))
    kl = np.maximum(np.concatenate(kls), 0.0)  # tiny negatives are rounding
    top = np.concatenate(agree)
    return LlmAgreement(kl_mean=float(kl.mean()), kl_p99=float(np.percentile(kl, 99)), top1=float(top.mean()),
                        n_positions=int(kl.size))


def sequence_logits(backend, items: Sequence[Item], embeds: dict[str, np.ndarray]) -> np.ndarray:
    """Logits at every text position after the first image, evaluating ``items`` from position 0.

    ``backend`` is a convllava_edge.backends.llm_llamacpp.LlamaCppBackend (any object with truncate, eval_tokens and
    eval_embeddings of the same meaning will do).
    """
    backend.truncate(0)
    rows: list[np.ndarray] = []
    evaluate_items(backend, items, embeds, on_logits=rows.append)
    return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)
