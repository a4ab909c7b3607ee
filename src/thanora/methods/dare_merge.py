"""DARE's merge as pure tensor functions: drop-and-rescale in ΔW space, the weighted sum over tasks and the truncated
SVD back to LoRA factors (`thanora.methods.dare` documents the choices and applies them per module)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


def drop_and_rescale(delta: Tensor, density: float, generator: torch.Generator) -> Tensor:
    """DARE's drop: each entry kept with probability ``density`` and divided by it (E[result] = delta).

    Args:
        delta: any tensor (ΔW_t, (d_out, d_in)).
        density: keep probability p in (0, 1]; 1 returns ``delta`` unchanged.
        generator: on ``delta``'s device; consumed.
    """
    if density >= 1.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device=delta.device, dtype=delta.dtype) < density
    return delta * keep / density


def dare_merge(deltas: Sequence[Tensor], weights: Sequence[float], density: float, generator: torch.Generator
               ) -> Tensor:
    """Σ_t w_t · drop_and_rescale(ΔW_t): the merged update of one module (masks drawn in task order)."""
    merged = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas, strict=True):
        merged += weight * drop_and_rescale(delta, density, generator)
    return merged


def low_rank(delta: Tensor, rank: int) -> tuple[Tensor, Tensor, float]:
    """Best rank-``rank`` factors of ``delta`` (d_out, d_in) by truncated SVD.

    Returns:
        ``(A (rank, d_in), B (d_out, rank), relative Frobenius error ‖ΔW − B·A‖ / ‖ΔW‖)``, B = U·√S, A = √S·Vᵀ
        (0 error for a zero ΔW).
    """
    U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
    root = S[:rank].sqrt()
    total = float(S.square().sum())
    error = math.sqrt(float(S[rank:].square().sum()) / total) if total > 0 else 0.0
    return root[:, None] * Vh[:rank], U[:, :rank] * root, error
