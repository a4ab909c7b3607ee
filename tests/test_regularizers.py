"""SPR penalty from Gram matrices equals the naive pairwise sum (SPEC.md §5)."""

from __future__ import annotations

import pytest
import torch

import thanora
from conftest import random_batch, tiny_llama
from thanora.adapters.record import lora_factors
from thanora.core.allocation import COOP
from thanora.core.regularizers import spr_penalty, task_pair_mask

F64 = torch.float64
TASKS = ("a", "b", "c")
BLOCKS = {"a": (0, 3), "b": (3, 5), "c": (5, 9), COOP: (9, 12)}
D_OUT, D_IN, R = 20, 16, 12


def naive(A: torch.Tensor, B: torch.Tensor, blocks, tasks) -> torch.Tensor:
    """Σ_{t1<t2} ‖B_t1ᵀ B_t2‖_F² + ‖A_t1 A_t2ᵀ‖_F², one pair at a time."""
    total = torch.zeros((), dtype=A.dtype)
    for i, t1 in enumerate(tasks):
        for t2 in tasks[i + 1:]:
            (a, b), (c, d) = blocks[t1], blocks[t2]
            total = total + (B[:, a:b].T @ B[:, c:d]).square().sum() + (A[a:b] @ A[c:d].T).square().sum()
    return total


def factors(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(R, D_IN, generator=g, dtype=F64), torch.randn(D_OUT, R, generator=g, dtype=F64)


def test_mask_marks_upper_cross_task_blocks() -> None:
    mask = task_pair_mask(BLOCKS, TASKS)
    assert mask.shape == (9, 9) and mask.dtype == torch.bool
    assert int(mask.sum()) == 3 * 2 + 3 * 4 + 2 * 4
    assert mask[0, 3] and mask[2, 8] and mask[4, 5]
    assert not mask[3, 0] and not mask[0, 2] and not mask[5, 8]  # lower triangle and within-task entries


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_penalty_equals_naive_double_loop(seed: int) -> None:
    A, B = factors(seed)
    got = spr_penalty(A, B, task_pair_mask(BLOCKS, TASKS))
    want = naive(A, B, BLOCKS, TASKS)
    assert got.dtype == F64
    assert float(want) > 1.0
    assert float(abs(got - want) / want) < 1e-10


def test_zero_for_orthogonal_task_blocks() -> None:
    g = torch.Generator().manual_seed(3)
    Q_A, _ = torch.linalg.qr(torch.randn(D_IN, 9, generator=g, dtype=F64))  # (d_in, 9) orthonormal columns
    Q_B, _ = torch.linalg.qr(torch.randn(D_OUT, 9, generator=g, dtype=F64))
    A, B = factors(4)
    for task in TASKS:  # each task's block lives in its own orthogonal subspace, with arbitrary mixing inside
        a, b = BLOCKS[task]
        mix = torch.randn(b - a, b - a, generator=g, dtype=F64)
        A[a:b] = mix @ Q_A[:, a:b].T
        B[:, a:b] = Q_B[:, a:b] @ mix.T
    mask = task_pair_mask(BLOCKS, TASKS)
    assert float(spr_penalty(A, B, mask)) < 1e-24
    assert float(naive(A, B, BLOCKS, TASKS)) < 1e-24
    B[:, 3] += 0.1 * B[:, 0]  # task b's block now overlaps task a's
    assert float(spr_penalty(A, B, mask)) > 1e-4


def test_ignores_the_coop_block() -> None:
    A, B = factors(5)
    mask = task_pair_mask(BLOCKS, TASKS)
    before = spr_penalty(A, B, mask)
    A2, B2 = A.clone(), B.clone()
    A2[9:], B2[:, 9:] = 10 * A[:3], 10 * B[:, :3]  # the coop block now fully overlaps task a's
    assert float(spr_penalty(A2, B2, mask)) == float(before)


def test_single_task_is_zero() -> None:
    A, B = factors(6)
    blocks = {"only": (0, 8), COOP: (8, 12)}
    assert float(spr_penalty(A, B, task_pair_mask(blocks, ("only",)))) == 0.0


def test_gradients_are_finite_and_match_naive() -> None:
    A, B = factors(7)
    A1, B1 = A.clone().requires_grad_(), B.clone().requires_grad_()
    A2, B2 = A.clone().requires_grad_(), B.clone().requires_grad_()
    spr_penalty(A1, B1, task_pair_mask(BLOCKS, TASKS)).backward()
    naive(A2, B2, BLOCKS, TASKS).backward()
    for got, want in ((A1.grad, A2.grad), (B1.grad, B2.grad)):
        assert got is not None and torch.isfinite(got).all()
        assert float(got.abs().max()) > 0
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert float(A1.grad[9:].abs().max()) == 0.0 and float(B1.grad[:, 9:].abs().max()) == 0.0  # coop untouched


def _prepared(n_tasks: int):
    calib = {f"t{i}": [random_batch(i)] for i in range(n_tasks)}
    return thanora.prepare_model(tiny_llama(), calib, thanora.ThanoraConfig(rank=8), progress=False)


def test_spr_loss_is_the_sum_over_modules() -> None:
    model = _prepared(3)
    adapter = thanora.adapter_of(model)
    loss = thanora.spr_loss(model)
    want = sum(
        float(naive(*(t.detach().double() for t in lora_factors(model, name)), adapter.blocks[name],
                    adapter.plan.tasks))
        for name in adapter.targets
    )
    assert want > 0
    assert float(loss.detach()) == pytest.approx(want, rel=1e-5)
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


@pytest.mark.parametrize(("n_tasks", "rank"), [(2, 8), (3, 8), (4, 12), (2, 5)])
def test_batched_spr_loss_equals_the_weighted_per_module_loop_with_gradients(n_tasks: int, rank: int) -> None:
    """spr_loss forms only the cross-task products, batched over modules of one layout; value and gradients equal
    Σ weight · spr_penalty per module (spr_normalization init: per-module weights), also after the model moves to
    float64."""
    from thanora.core.regularizers import spr_penalty

    calib = {f"t{i}": [random_batch(i)] for i in range(n_tasks)}
    model = thanora.prepare_model(tiny_llama(), calib, thanora.ThanoraConfig(rank=rank, spr_normalization="init"),
                                  progress=False).double()
    layouts = {tuple(table.values()) for table in thanora.adapter_of(model).blocks.values()}
    assert len(layouts) > 1 or rank == 5  # several groups of modules, so the grouping is exercised
    adapter = thanora.adapter_of(model)
    params = [p for p in model.parameters() if p.requires_grad]
    batched = thanora.spr_loss(model)
    batched_grads = torch.autograd.grad(batched, params)
    loop = sum(adapter.spr_weights[name] * spr_penalty(*lora_factors(model, name), adapter.spr_mask(name))
               for name in adapter.targets)
    loop_grads = torch.autograd.grad(loop, params)
    assert batched.dtype == torch.float64 and float(loop) > 0
    torch.testing.assert_close(batched, loop, rtol=1e-12, atol=0)
    for got, want in zip(batched_grads, loop_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def test_spr_loss_single_task_is_zero() -> None:
    assert float(thanora.spr_loss(_prepared(1))) == 0.0


def test_block_overlap_is_one_on_the_diagonal_and_zero_for_orthogonal_blocks() -> None:
    from thanora.core.regularizers import block_overlap

    torch.manual_seed(0)
    Q, _ = torch.linalg.qr(torch.randn(20, 20, dtype=torch.float64))
    blocks = {"a": (0, 3), "b": (3, 5), "__coop__": (5, 6)}
    B = Q[:, :6].clone()
    A = Q[:6].clone()
    overlap = block_overlap(A, B, blocks, ["a", "b"])
    assert overlap[0][0] == pytest.approx(1.0) and overlap[1][1] == pytest.approx(1.0)
    assert overlap[0][1] == pytest.approx(0.0, abs=1e-12) and overlap[1][0] == pytest.approx(0.0, abs=1e-12)
    B[:, 3] = B[:, 0]  # block b now shares a direction with block a
    A[3] = A[0]
    shared = block_overlap(A, B, blocks, ["a", "b"])
    assert 0.0 < shared[0][1] <= 1.0 and shared[0][1] == pytest.approx(shared[1][0])


def test_init_normalization_makes_every_module_start_at_one() -> None:
    calibration = {"a": [random_batch(1)], "b": [random_batch(2)]}
    raw = thanora.prepare_model(tiny_llama(), calibration, thanora.ThanoraConfig(rank=8), progress=False)
    normalized = thanora.prepare_model(tiny_llama(), calibration,
                                       thanora.ThanoraConfig(rank=8, spr_normalization="init"), progress=False)
    n_modules = len(thanora.adapter_of(normalized).targets)
    assert float(thanora.spr_loss(normalized)) == pytest.approx(n_modules, rel=1e-4)
    # The weights are constants: the raw per-module terms divided by their initial values.
    adapter = thanora.adapter_of(normalized)
    expected = sum(adapter.spr_weights[n] * float(spr_penalty(*lora_factors(raw, n), task_pair_mask(
        adapter.blocks[n], list(adapter.plan.tasks)))) for n in adapter.targets)
    assert float(thanora.spr_loss(normalized)) == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError, match="spr_normalization"):
        thanora.ThanoraConfig(spr_normalization="max")  # type: ignore[arg-type]
