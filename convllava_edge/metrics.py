"""Accuracy figures comparing a variant's output with a reference output (numpy only)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np


@dataclass(frozen=True)
class EmbeddingAgreement:
    """How close ``candidate`` [n_tokens, n_embd] is to ``reference``, over one or more images."""

    cosine_mean: float  # mean over tokens of the per-token cosine similarity
    cosine_min: float  # the worst token
    rel_l2: float  # ||candidate - reference|| / ||reference|| over everything
    max_abs_diff: float
    n_tokens: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def per_token_cosine(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows; [..., n_embd] -> [...]. NaN/inf rows give -1."""
    a = candidate.astype(np.float64).reshape(-1, candidate.shape[-1])
    b = reference.astype(np.float64).reshape(-1, reference.shape[-1])
    num = (a * b).sum(-1)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(den > 0, num / den, np.where(np.linalg.norm(a - b, axis=-1) == 0, 1.0, 0.0))
    return np.where(np.isfinite(cos), cos, -1.0)


def compare_embeddings(candidates: list[np.ndarray], references: list[np.ndarray]) -> EmbeddingAgreement:
    """Pool the figures over several images (each pair [n_tokens, n_embd], shapes must match)."""
    if len(candidates) != len(references) or not candidates:
        raise ValueError(f"need matching non-empty lists, got {len(candidates)} and {len(references)}")
    cosines, sq_err, sq_ref, max_diff = [], 0.0, 0.0, 0.0
    for cand, ref in zip(candidates, references):
        if cand.shape != ref.shape:
            raise ValueError(f"shape mismatch: candidate {cand.shape}, reference {ref.shape}")
        cosines.append(per_token_cosine(cand, ref))
        diff = cand.astype(np.float64) - ref.astype(np.float64)
        sq_err += float(np.sum(diff * diff))
        sq_ref += float(np.sum(ref.astype(np.float64) ** 2))
        max_diff = max(max_diff, float(np.max(np.abs(diff))) if diff.size else 0.0)
    cos = np.concatenate(cosines)
    rel = float(np.sqrt(sq_err / sq_ref)) if sq_ref > 0 else float(np.sqrt(sq_err))
    if not np.isfinite(rel) or not np.isfinite(max_diff):
        rel, max_diff = float("inf"), float("inf")
    return EmbeddingAgreement(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), rel_l2=rel,
                              max_abs_diff=max_diff, n_tokens=int(cos.size))


def relative_max_error(candidate: np.ndarray, reference: np.ndarray) -> float:
    """max |candidate - reference| / max |reference|: the parity measure "relative to the output's scale"."""
    scale = float(np.max(np.abs(reference)))
    err = float(np.max(np.abs(candidate.astype(np.float64) - reference.astype(np.float64))))
    return err / scale if scale > 0 else err


def convllava_vision_macs(depths, hidden_sizes, patch_size: int, height: int, width: int, n_embd: int,
                          projector: str = "mlp2x_gelu") -> int:
    """Multiply-accumulates of tower + projector for one H x W image (convs and matmuls only).

    Per block of width C on an h x w grid: depthwise 7x7 (49 C per position) plus the two pointwise
    layers (C -> 4C -> C: 8 C^2 per position). Stem: 4x4 patches, 3 -> C0. Downsampling: 2x2, C_in ->
    C_out at the output grid. E.g. the 5-stage tower at 768 px: ~472 GMACs, stage 3 the largest part.
    """
    h, w = height // patch_size, width // patch_size
    macs = h * w * hidden_sizes[0] * 3 * patch_size * patch_size
    prev = hidden_sizes[0]
    for stage, (depth, c) in enumerate(zip(depths, hidden_sizes)):
        if stage > 0:
            h, w = h // 2, w // 2
            macs += h * w * c * prev * 4
        macs += depth * h * w * (49 * c + 8 * c * c)
        prev = c
    tokens = h * w
    n_linear = int(projector[3:-6]) if projector.startswith("mlp") else (1 if projector == "linear" else 0)
    if n_linear:
        macs += tokens * (prev * n_embd + (n_linear - 1) * n_embd * n_embd)
    return macs
