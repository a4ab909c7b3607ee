"""Subspace-preserving regularisation (SPR): SPEC.md §5. Pure tensor functions; they never see the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


def task_pair_mask(blocks: Mapping[str, tuple[int, int]], tasks: Sequence[str]) -> torch.Tensor:
    """Boolean (n, n) mask of the upper off-diagonal task-task blocks, n = end of the last task block.

    Entry (i, j) is True when rank index i lies in task t1's block and j in task t2's block with t1 < t2. The
    cooperative block is not included.
    """
    n = max(blocks[t][1] for t in tasks)
    mask = torch.zeros(n, n, dtype=torch.bool)
    for i, t1 in enumerate(tasks):
        for t2 in tasks[i + 1:]:
            (a, b), (c, d) = blocks[t1], blocks[t2]
            mask[a:b, c:d] = True
    return mask


def spr_penalty(lora_A: torch.Tensor, lora_B: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ_{t1<t2} ‖B_t1ᵀ B_t2‖_F² + ‖A_t1 A_t2ᵀ‖_F² of one module, from its Gram matrices.

    The task blocks occupy the first n rank indices (``mask`` is (n, n)); the Gram matrices G_B = BᵀB and G_A = AAᵀ
    of that part hold every cross-task product, so the penalty is the sum of the squared masked entries. Never
    forms a (d_out, d_in) product.

    Args:
        lora_A: (R, d_in).
        lora_B: (d_out, R).
        mask: from `task_pair_mask`.

    Returns:
        A scalar in the factors' dtype, differentiable with respect to both.
    """
    n = mask.shape[0]
    A, B = lora_A[:n], lora_B[:, :n]  # (n, d_in), (d_out, n)
    weights = mask.to(device=A.device, dtype=A.dtype)
    gram_B = B.T @ B  # (n, n)
    gram_A = A @ A.T  # (n, n)
    return (gram_B.square() * weights).sum() + (gram_A.square() * weights).sum()


def block_overlap(lora_A: torch.Tensor, lora_B: torch.Tensor, blocks: Mapping[str, tuple[int, int]],
                  tasks: Sequence[str]) -> list[list[float]]:
    """T×T subspace overlap of the task blocks, mean of the B (column) and A (row) subspaces.

    For orthonormal bases Q_i, Q_j of two blocks' subspaces the overlap is ‖Q_iᵀQ_j‖_F² / min(r_i, r_j): the mean
    squared cosine of the principal angles, 1 on the diagonal and 0 for orthogonal blocks (what SPR drives to).
    Used for the before/after-training figure.

    Args:
        lora_A: (R, d_in).
        lora_B: (d_out, R).
        blocks: the module's block table.
        tasks: task order.
    """
    A, B = lora_A.detach().double(), lora_B.detach().double()
    bases = {t: (_basis(B[:, a:b]), _basis(A[a:b].T)) for t, (a, b) in blocks.items() if t in tasks}
    out = [[0.0] * len(tasks) for _ in tasks]
    for i, ti in enumerate(tasks):
        for j, tj in enumerate(tasks):
            scores = [
                float((qi.T @ qj).square().sum() / min(qi.shape[1], qj.shape[1]))
                for qi, qj in zip(bases[ti], bases[tj], strict=True)
                if qi.shape[1] and qj.shape[1]
            ]
            out[i][j] = sum(scores) / len(scores) if scores else 0.0
    return out


def _basis(M: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, k) of the column space of M (d, r), k = numerical rank."""
    U, S, _ = torch.linalg.svd(M, full_matrices=False)
    keep = S.max() * 1e-10 < S if S.numel() else S.bool()
    return U[:, keep]
