"""Task-aware SVD W = U diag(S) V̂ᵀ with damped C (SPEC.md §2), randomized SVD, damping loop, I/O."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import random_batch, tiny_gpt2, tiny_llama
from thanora.core.covariance import CovarianceStats, collect_covariances
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.spectra import (
    SingularCovarianceError,
    Spectrum,
    decompose_task,
    load_spectra,
    save_spectra,
    task_aware_svd,
)
from thanora.core.targets import find_targets, weight_matrix

F64 = torch.float64
CFG = ThanoraConfig()


def random_spd(d: int, seed: int, rank: int | None = None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(rank or 3 * d, d, generator=g, dtype=F64)  # (N, d)
    return X.T @ X / X.shape[0]


def damped(C: torch.Tensor, delta: float) -> torch.Tensor:
    return C + delta * torch.diagonal(C).mean() * torch.eye(C.shape[0], dtype=C.dtype)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def rebuild(s: Spectrum) -> torch.Tensor:
    return s.U @ torch.diag(s.S) @ s.Vh


@pytest.mark.parametrize(("d_out", "d_in"), [(12, 8), (6, 10), (9, 9)])
def test_full_rank_rebuilds_w(d_out: int, d_in: int) -> None:
    W = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(d_out), dtype=F64)
    C = random_spd(d_in, seed=1)
    s = task_aware_svd(W, C, min(d_out, d_in), CFG)
    assert s.U.dtype == F64 and s.damping == CFG.damping  # well conditioned: no extra damping
    assert rel(rebuild(s), W) < 1e-8
    # the factors are those of svd(W C_d): U orthonormal, S descending = its singular values, V̂ᵀ C_d = Vᵀ orthonormal
    C_d = damped(C, s.damping)
    eye = torch.eye(s.rank, dtype=F64)
    torch.testing.assert_close(s.U.T @ s.U, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(s.S, torch.linalg.svdvals(W @ C_d)[: s.rank], rtol=1e-10, atol=0)
    V_t = s.Vh @ C_d  # (R, d_in)
    torch.testing.assert_close(V_t @ V_t.T, eye, rtol=0, atol=1e-10)
    torch.testing.assert_close(s.U @ torch.diag(s.S) @ V_t, W @ C_d, rtol=0, atol=1e-10)


@pytest.mark.parametrize("kind", ["low_rank", "dead_feature"])
def test_singular_covariance_is_damped(kind: str) -> None:
    d_in = 10
    if kind == "low_rank":
        C = random_spd(d_in, seed=2, rank=3)  # rank 3 < d_in
    else:
        C = random_spd(d_in, seed=2)
        C[4, :], C[:, 4] = 0.0, 0.0  # an input feature that is always zero
    assert torch.linalg.matrix_rank(C) < d_in
    W = torch.randn(7, d_in, generator=torch.Generator().manual_seed(3), dtype=F64)
    s = task_aware_svd(W, C, 7, CFG)
    assert torch.isfinite(s.Vh).all()
    assert rel(rebuild(s), W) < 1e-8


def test_truncated_rank_is_top_of_full() -> None:
    W = torch.randn(16, 12, generator=torch.Generator().manual_seed(4), dtype=F64)
    C = random_spd(12, seed=5)
    full = task_aware_svd(W, C, 12, CFG)
    top = task_aware_svd(W, C, 4, CFG)
    assert (top.U.shape, top.S.shape, top.Vh.shape) == ((16, 4), (4,), (4, 12))
    torch.testing.assert_close(top.S, full.S[:4], rtol=1e-12, atol=0)
    torch.testing.assert_close(rebuild(top), rebuild(full.truncate(4)), rtol=0, atol=1e-10)
    assert rel(rebuild(top), W) > 0.1  # a real truncation


def test_randomized_svd_top_values_within_tolerance() -> None:
    g = torch.Generator().manual_seed(6)
    Q1, _ = torch.linalg.qr(torch.randn(64, 48, generator=g, dtype=F64))
    Q2, _ = torch.linalg.qr(torch.randn(48, 48, generator=g, dtype=F64))
    sigma = 0.8 ** torch.arange(48, dtype=F64)  # decaying spectrum
    W = Q1 @ torch.diag(sigma) @ Q2.T
    C = random_spd(48, seed=7)
    exact = task_aware_svd(W, C, 8, ThanoraConfig(svd="exact"))
    fast = task_aware_svd(W, C, 8, ThanoraConfig(svd="randomized", svd_oversample=16, svd_power_iters=4))
    assert fast.S.shape == (8,)
    assert float(((fast.S - exact.S).abs() / exact.S).max()) < 1e-3
    assert rel(rebuild(fast), rebuild(exact)) < 1e-3


def test_randomized_svd_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    W, C = torch.randn(40, 32, dtype=F64), random_spd(32, seed=3)
    cfg = ThanoraConfig(svd="randomized", svd_oversample=4, svd_power_iters=1)
    torch.manual_seed(123)
    first = task_aware_svd(W, C, 6, cfg)
    after_first = torch.rand(3)
    torch.manual_seed(321)
    second = task_aware_svd(W, C, 6, cfg)
    torch.manual_seed(123)
    assert torch.equal(torch.rand(3), after_first)  # the caller's RNG stream did not move
    assert torch.equal(first.S, second.S) and torch.equal(first.U, second.U)


def test_zero_covariance_raises() -> None:
    with pytest.raises(SingularCovarianceError, match="zero"):
        task_aware_svd(torch.randn(4, 4, dtype=F64), torch.zeros(4, 4, dtype=F64), 2, CFG)


def test_damping_loop_doubles_until_accurate() -> None:
    g = torch.Generator().manual_seed(8)
    Q, _ = torch.linalg.qr(torch.randn(8, 8, generator=g))
    C = Q @ torch.diag(torch.tensor([1e4] + [1e-6] * 7)) @ Q.T  # float32, condition number 1e10
    W = torch.randn(12, 8, generator=g)
    cfg = ThanoraConfig(solve_tolerance=1e-6)
    s = task_aware_svd(W, C, 8, cfg)
    doublings = math.log2(s.damping / cfg.damping)
    assert doublings >= 1 and doublings == round(doublings)
    C_d = damped(C.double(), s.damping)
    X = s.Vh.double().T  # (d_in, R) = C_d⁻¹ V
    V = C_d @ X
    torch.testing.assert_close(V.T @ V, torch.eye(8, dtype=F64), rtol=0, atol=1e-3)


def test_unreachable_tolerance_raises_naming_the_cap() -> None:
    C = random_spd(8, seed=9).float()
    with pytest.raises(SingularCovarianceError) as info:
        task_aware_svd(torch.randn(8, 8), C, 4, ThanoraConfig(solve_tolerance=1e-30, max_damping_doublings=3))
    message = str(info.value)
    assert "3 times" in message and "solve_tolerance=1e-30" in message and "δ=0.08" in message
    assert isinstance(info.value, ValueError)


def test_rank_above_min_dimension_raises() -> None:
    with pytest.raises(ValueError, match="rank 5 exceeds"):
        task_aware_svd(torch.randn(4, 6, dtype=F64), random_spd(6, seed=0), 5, CFG)


def test_decompose_task_tiny_llama() -> None:
    model = tiny_llama()
    targets = find_targets(model)
    stats = collect_covariances(model, targets, "t", [random_batch(0), random_batch(1)], dtype=F64,
                                progress=False)
    cfg = ThanoraConfig(rank=8)
    spectra = decompose_task(model, targets, stats, cfg, progress=False)
    assert list(spectra) == list(targets)
    for name, target in targets.items():
        s = spectra[name]
        assert (s.U.shape, s.S.shape, s.Vh.shape) == ((target.d_out, 8), (8,), (8, target.d_in))
        assert s.U.dtype == torch.float32 and s.U.device.type == "cpu"
        assert torch.all(s.S[:-1] >= s.S[1:]) and torch.all(s.S > 0)
        direct = task_aware_svd(weight_matrix(model.get_submodule(name)), stats.of(name), 8, cfg)
        torch.testing.assert_close(s.S, direct.S.float(), rtol=1e-6, atol=0)
        torch.testing.assert_close(rebuild(s).double(), rebuild(direct), rtol=0, atol=1e-5)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_decompose_task_full_rank_rebuilds_weight(builder) -> None:
    model = builder()
    targets = {n: t for n, t in find_targets(model).items() if min(t.d_out, t.d_in) == 32}
    stats = collect_covariances(model, targets, "t", [random_batch(0)], dtype=F64, progress=False)
    spectra = decompose_task(model, targets, stats, ThanoraConfig(rank=32), progress=False)
    for name, s in spectra.items():
        W = weight_matrix(model.get_submodule(name)).detach()  # (d_out, d_in), transposed for Conv1D
        assert rel(rebuild(s), W) < 1e-4, name


def test_decompose_task_names_task_and_module() -> None:
    model = tiny_llama()
    targets = find_targets(model, ["model.layers.0.self_attn.o_proj"])
    stats = CovarianceStats("qa", {"model.layers.0.self_attn.o_proj": torch.zeros(32, 32)},
                            {"model.layers.0.self_attn.o_proj": "model.layers.0.self_attn.o_proj"},
                            {"model.layers.0.self_attn.o_proj": 10})
    with pytest.raises(SingularCovarianceError, match=r"task 'qa', module 'model\.layers\.0\.self_attn\.o_proj'"):
        decompose_task(model, targets, stats, ThanoraConfig(rank=8), progress=False)


def test_save_load_spectra_roundtrip(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(10)
    spectra = {
        "a.q_proj": Spectrum(torch.randn(6, 3, generator=g), torch.rand(3, generator=g), torch.randn(3, 5), 0.01),
        "a.down_proj": Spectrum(torch.randn(5, 3, generator=g), torch.rand(3, generator=g), torch.randn(3, 6), 0.08),
    }
    save_spectra(spectra, tmp_path / "s.safetensors", {"task": "a", "rank": 3})
    back, meta = load_spectra(tmp_path / "s.safetensors")
    assert meta == {"task": "a", "rank": 3}
    assert set(back) == set(spectra)
    for name, s in spectra.items():
        b = back[name]
        assert torch.equal(b.U, s.U) and torch.equal(b.S, s.S) and torch.equal(b.Vh, s.Vh)
        assert b.damping == s.damping


def test_truncate() -> None:
    s = Spectrum(torch.randn(6, 4), torch.tensor([4.0, 3.0, 2.0, 1.0]), torch.randn(4, 5), 0.02)
    t = s.truncate(2)
    assert t.rank == 2 and t.damping == 0.02
    assert torch.equal(t.U, s.U[:, :2]) and torch.equal(t.S, s.S[:2]) and torch.equal(t.Vh, s.Vh[:2])
    assert s.truncate(4).rank == 4
    with pytest.raises(ValueError, match="holds 4 triplets, 5 requested"):
        s.truncate(5)


def test_the_randomized_svd_is_checked_a_posteriori_and_falls_back_to_exact() -> None:
    from thanora.core.spectra import _top_svd, svd_residual

    g = torch.Generator().manual_seed(0)
    M = torch.randn(300, 200, generator=g, dtype=torch.float64)  # flat spectrum: the hardest case for sketching
    U, S, V = _top_svd(M, 8, ThanoraConfig(rank=8, svd="exact"))
    assert svd_residual(M, U, S, V) < 1e-10
    cheap = ThanoraConfig(rank=8, svd="randomized", svd_oversample=0, svd_power_iters=0, svd_tolerance=1e-12)
    _, Sr, _ = _top_svd(M, 8, cheap)  # misses the tolerance twice: the exact result
    torch.testing.assert_close(Sr, S)
    loose = ThanoraConfig(rank=8, svd="randomized", svd_oversample=0, svd_power_iters=0, svd_tolerance=10.0)
    Ul, Sl, Vl = _top_svd(M, 8, loose)  # accepted as it is: a real approximation
    assert 0 < svd_residual(M, Ul, Sl, Vl) <= 10.0 and not torch.allclose(Sl, S)


def test_auto_svd_is_exact_for_small_modules() -> None:
    from thanora.core.spectra import AUTO_EXACT_UP_TO, _top_svd

    M = torch.randn(64, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert min(M.shape) <= AUTO_EXACT_UP_TO
    for a, b in zip(_top_svd(M, 4, ThanoraConfig(rank=4, svd="auto")), _top_svd(M, 4, ThanoraConfig(rank=4,
    svd="exact")),
                    strict=True):
        assert torch.equal(a, b)
