"""LLaVA's projector (vision features -> the LLM's embeddings), as every LLaVA family builds it."""

from __future__ import annotations

from torch import nn

from ..errors import CheckpointError
from .config import MLP_GELU


def build_projector(projector_type: str, in_dim: int, out_dim: int) -> nn.Module:
    """LLaVA's projectors (llava/model/multimodal_projector/builder.py); GELU is the exact erf form."""
    if projector_type == "linear":
        return nn.Linear(in_dim, out_dim)
    if projector_type == "identity":
        if in_dim != out_dim:
            raise CheckpointError(f"identity projector needs mm_hidden_size == hidden_size, got {in_dim} and {out_dim}")
        return nn.Identity()
    match = MLP_GELU.match(projector_type)
    if not match:
        raise CheckpointError(f"unknown mm_projector_type {projector_type!r}")
    layers: list[nn.Module] = [nn.Linear(in_dim, out_dim)]
    for _ in range(int(match.group(1)) - 1):
        layers += [nn.GELU(approximate="none"), nn.Linear(out_dim, out_dim)]
    return nn.Sequential(*layers)
