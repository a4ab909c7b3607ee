"""Subspace-preserving regularisation (SPR): SPEC.md §5. Pure tensor functions; they never see the model."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

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


def later_task_spans(blocks: Mapping[str, tuple[int, int]], tasks: Sequence[str]) -> tuple[tuple[int, int], ...]:
    """For every task but the last, ``(start, stop)`` of its block; the blocks of the tasks after it run from ``stop``
    to `task_end` (task blocks are contiguous, in task order)."""
    return tuple(blocks[t] for t in tasks[:-1])


def task_end(blocks: Mapping[str, tuple[int, int]], tasks: Sequence[str]) -> int:
    """The end of the last task block (the cooperative block starts there)."""
    return max(blocks[t][1] for t in tasks)


@dataclass(frozen=True)
class SprGroup:
    """Modules whose factors of one kind have the same shape, and whose SPR terms are computed together
    (`grouped_spr`): either with the same task blocks (``masks`` None: the cross-task products of ``spans``) or with
    blocks that differ (``masks``: each module's weighted task-pair mask on the Gram matrix of its first n indices).

    Attributes:
        kind: ``"A"`` (factors (R, d_in), rows are rank indices) or ``"B"`` (factors (d_out, R), columns).
        factors: one factor per module.
        spans: `later_task_spans` of the group's block table (``masks`` None).
        end: `task_end` of the group's block table (``masks`` None).
        weights: (g,) the modules' SPR weights, in the factors' dtype and device.
        masks: (g, n, n) weight × `task_pair_mask` of each module, zero-padded to the group's largest n; or None.
    """

    kind: str
    factors: tuple[torch.Tensor, ...]
    spans: tuple[tuple[int, int], ...]
    end: int
    weights: torch.Tensor
    masks: torch.Tensor | None = None


def grouped_spr(groups: Sequence[SprGroup]) -> torch.Tensor:
    """Σ over groups and modules of weight · Σ_{t1<t2} ‖X_t1ᵀ X_t2‖_F² (X = B's columns, or A's rows, of each task):
    the weighted sum of every module's `spr_penalty` (tested).

    Groups of one layout form only the cross-task products (d·Σ_{t1<t2} r_t1·r_t2 multiply-adds per factor, not the
    d·R² of a full Gram matrix: 9x fewer at R = 64 with two tasks); groups of many layouts the Gram matrix of the
    task indices under each module's mask (fewer, larger kernels: with four tasks the cross products are most of it
    anyway). Either way batched over the modules of the group (a stack and a few batched products instead of a dozen
    small kernels per module: on SmolLM2's 210 modules the per-module form spent most of its time dispatching).
    """
    total = groups[0].weights.new_zeros(()) if groups else torch.zeros(())
    for group in groups:
        # Whole factors stacked, then split into the task blocks (and the rest): the backward of a split is one
        # concatenation, where a slice's would zero-fill and copy the whole stack for every block.
        X = torch.stack(group.factors)  # (g, d_out, R) or (g, R, d_in)
        dim = 2 if group.kind == "B" else 1
        if group.masks is not None:  # blocks differ between the modules: the masked Gram of the task indices
            n = group.masks.shape[-1]
            head = X.split([n, X.shape[dim] - n], dim)[0]
            gram = head.mT @ head if group.kind == "B" else head @ head.mT  # (g, n, n)
            total = total + (gram.square() * group.masks).sum()
            continue
        if not group.spans:  # a single task: no pair
            continue
        sizes = [b - a for a, b in group.spans] + [group.end - group.spans[-1][1]]
        blocks = X.split([*sizes, X.shape[dim] - group.end], dim)[: len(sizes)]  # task blocks in order
        if group.kind == "B":
            products = [blocks[i].mT @ blocks[j] for i in range(len(blocks)) for j in range(i + 1, len(blocks))]
        else:
            products = [blocks[i] @ blocks[j].mT for i in range(len(blocks)) for j in range(i + 1, len(blocks))]
        per_module = sum(p.square().sum((1, 2)) for p in products)  # (g,)
        total = total + (per_module * group.weights).sum()
    return total


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
