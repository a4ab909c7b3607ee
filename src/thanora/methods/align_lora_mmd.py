"""Align-LoRA's penalty as pure tensor functions: multi-kernel MMD² between the tasks of one layer's A·x.

The choices (kernel, pooling, bandwidths, the biased estimator, the reduction over task pairs) are documented in
`thanora.methods.align_lora`, which calls `layer_alignment` once per adapted layer and micro-batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

Kernel = Literal["paper", "code"]
Pooling = Literal["mean", "tokens"]


def mean_pool(a: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``a`` over each sample's non-padding positions.

    Args:
        a: (B, L, r) activations.
        mask: (B, L) attention mask, 1 on real tokens; a sample without any gets the zero vector.

    Returns:
        (B, r), in ``a``'s dtype.
    """
    weights = mask.to(a.dtype).unsqueeze(-1)  # (B, L, 1)
    return (a * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def kernel_matrix(x: Tensor, y: Tensor, bandwidths: Sequence[float], kernel: Kernel = "paper") -> Tensor:
    """Sum of Gaussian kernels between every sample of ``x`` and every sample of ``y``.

    k(u, v) = Σ_σ exp(−‖u − v‖² / (2σ²)) (``"paper"``) or Σ_σ exp(−‖u − v‖² / (2σ)) (``"code"``). With 3-D inputs
    position s of one sample is compared with position s of the other, and the kernel is averaged over positions.
    Distances come from explicit differences, so identical samples are at distance exactly 0 (the narrowest
    bandwidths turn any rounding error of a Gram-matrix expansion into a missing 1).

    Args:
        x: (n, r) or (n, L, r).
        y: (m, r) or (m, L, r), same layout as ``x``.
        bandwidths: the σ values.
        kernel: ``"paper"`` or ``"code"``.

    Returns:
        (n, m) kernel values, in the promoted dtype of the inputs and float32.
    """
    dtype = torch.promote_types(torch.promote_types(x.dtype, y.dtype), torch.float32)
    sq = (x.to(dtype).unsqueeze(1) - y.to(dtype).unsqueeze(0)).square().sum(-1)  # (n, m) or (n, m, L)
    sigma = torch.tensor(bandwidths, dtype=dtype, device=sq.device)
    gamma = 1.0 / (2.0 * (sigma.square() if kernel == "paper" else sigma))  # (S,)
    k = torch.exp(-sq.unsqueeze(-1) * gamma).sum(-1)  # (n, m[, L])
    return k.mean(-1) if k.dim() == 3 else k


def mk_mmd2(x: Tensor, y: Tensor, bandwidths: Sequence[float], kernel: Kernel = "paper") -> Tensor:
    """Biased multi-kernel MMD²: mean K(x, x) + mean K(y, y) − 2 mean K(x, y), diagonals included.

    Args:
        x: (n, r) or (n, L, r) representations of one task.
        y: (m, r) or (m, L, r) representations of another.
        bandwidths: the σ values of `kernel_matrix`.
        kernel: ``"paper"`` or ``"code"``.

    Returns:
        A scalar ≥ 0 (up to rounding).
    """
    return (kernel_matrix(x, x, bandwidths, kernel).mean() + kernel_matrix(y, y, bandwidths, kernel).mean()
            - 2.0 * kernel_matrix(x, y, bandwidths, kernel).mean())


def task_averaging(task_id: Tensor, dtype: torch.dtype = torch.float64) -> Tensor | None:
    """Row t averages over the samples of the t-th task present: W (T, B), W[t, b] = [task_id[b] = t] / n_t.

    Args:
        task_id: (B,) integer task ids.
        dtype: dtype of the result (float64 by default: cast exactly-rounded to the kernel's dtype later).

    Returns:
        W, or ``None`` if fewer than 2 tasks are present (no pair to compare).
    """
    tasks = task_id.unique()  # (T,)
    if tasks.numel() < 2:
        return None
    member = (task_id.unsqueeze(0) == tasks.unsqueeze(1)).to(dtype)  # (T, B)
    return member / member.sum(1, keepdim=True)


def layer_alignment(a: Tensor, mask: Tensor, weights: Tensor, bandwidths: Sequence[float], kernel: Kernel = "paper",
                    pooling: Pooling = "mean") -> Tensor:
    """MK-MMD² of one layer's A·x averaged over the task pairs of ``weights`` (`task_averaging`, T >= 2).

    With K the (B, B) kernel matrix, M = W K Wᵀ holds the mean of K over each (task i, task j) block, so the biased
    MMD² of the pair is M_ii + M_jj − 2 M_ij.

    Args:
        a: (B, L, r) outputs of one ``lora_A``, any float dtype (computed in at least float32).
        mask: (B, L) attention mask.
        weights: (T, B) task-averaging matrix.
        bandwidths: the σ values.
        kernel: ``"paper"`` or ``"code"``.
        pooling: ``"mean"`` (per sample over non-padding tokens) or ``"tokens"`` (position by position).

    Returns:
        A scalar in float32 (float64 for float64 inputs).
    """
    a = a.to(torch.promote_types(a.dtype, torch.float32))  # pool bf16 activations in float32
    feats = mean_pool(a, mask) if pooling == "mean" else a  # (B, r) or (B, L, r)
    k = kernel_matrix(feats, feats, bandwidths, kernel)  # (B, B)
    weights = weights.to(k.dtype)
    block_means = weights @ k @ weights.T  # (T, T)
    within = block_means.diagonal()
    mmd = within.unsqueeze(0) + within.unsqueeze(1) - 2.0 * block_means  # (T, T), symmetric, zero diagonal
    i, j = torch.triu_indices(len(weights), len(weights), offset=1, device=k.device)
    return mmd[i, j].mean()


def alignment_loss(a: Tensor, mask: Tensor, task_id: Tensor, bandwidths: Sequence[float], kernel: Kernel = "paper",
                   pooling: Pooling = "mean") -> Tensor:
    """MK-MMD² between the tasks of one layer's A·x, averaged over the pairs of tasks present.

    Args:
        a: (B, L, r) outputs of one ``lora_A``.
        mask: (B, L) attention mask.
        task_id: (B,) integer task ids.
        bandwidths: the σ values.
        kernel: ``"paper"`` or ``"code"``.
        pooling: ``"mean"`` (per sample over non-padding tokens) or ``"tokens"`` (position by position).

    Returns:
        A scalar in float32 (float64 for float64 inputs); 0 without gradient if fewer than 2 tasks are present.
    """
    weights = task_averaging(task_id)
    if weights is None:
        return torch.zeros((), dtype=torch.promote_types(a.dtype, torch.float32), device=a.device)
    return layer_alignment(a, mask, weights, bandwidths, kernel, pooling)
