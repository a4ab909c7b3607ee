"""HASI factors from spectra and a rank plan (SPEC.md §4), without a model."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from thanora.core.allocation import COOP, allocate_ranks
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.initialize import hasi_factors
from thanora.core.spectra import Spectrum, task_aware_svd
from thanora.core.targets import Target

F64 = torch.float64
R = 8
TASKS = ("alpha", "beta", "gamma_task")
TARGETS = {"m.wide": Target("m.wide", d_out=24, d_in=16, fan_in_fan_out=False),
           "m.tall": Target("m.tall", d_out=12, d_in=20, fan_in_fan_out=True)}


def _spectra() -> dict[str, dict[str, Spectrum]]:
    g = torch.Generator().manual_seed(0)
    weights = {n: torch.randn(t.d_out, t.d_in, generator=g, dtype=F64) for n, t in TARGETS.items()}
    out: dict[str, dict[str, Spectrum]] = {}
    for task in TASKS:
        out[task] = {}
        for name, t in TARGETS.items():
            X = torch.randn(50, t.d_in, generator=g, dtype=F64) * torch.rand(t.d_in, generator=g, dtype=F64)
            s = task_aware_svd(weights[name], X.T @ X / 50, R, ThanoraConfig(rank=R))
            out[task][name] = Spectrum(s.U.float(), s.S.float(), s.Vh.float(), s.damping)
    return out


SPECTRA = _spectra()
ENTROPIES = {"alpha": {"m.wide": 0.9, "m.tall": 0.2}, "beta": {"m.wide": 0.5, "m.tall": 0.6},
             "gamma_task": {"m.wide": 0.1, "m.tall": 0.7}}
PLAN = allocate_ranks(ENTROPIES, budget=R, tau=0.2, r_min=1)


def task_product(spectrum: Spectrum, r: int) -> torch.Tensor:
    """U[:, :r] diag(S[:r]) V̂ᵀ[:r] (d_out, d_in) in float64."""
    s = spectrum.truncate(r)
    return s.U.double() @ torch.diag(s.S.double()) @ s.Vh.double()


def test_task_blocks_are_gamma_times_top_spectrum() -> None:
    cfg = ThanoraConfig(rank=R, gamma=5.0)
    inits = hasi_factors(SPECTRA, PLAN, TARGETS, cfg)
    for name, init in inits.items():
        assert init.lora_A.shape == (R, TARGETS[name].d_in) and init.lora_B.shape == (TARGETS[name].d_out, R)
        assert init.lora_A.dtype == torch.float32
        for task in TASKS:
            a, b = init.blocks[task]
            assert b - a == PLAN.rank(task, name)
            got = cfg.scaling * init.lora_B[:, a:b].double() @ init.lora_A[a:b].double()
            want = 5.0 * task_product(SPECTRA[task][name], b - a)
            assert float((got - want).norm() / want.norm()) < 1e-6, (name, task)
            # B_t = U·diag(√(γS/s)): its columns are orthogonal with squared norms γ·S/s
            gram = init.lora_B[:, a:b].double().T @ init.lora_B[:, a:b].double()
            expected = torch.diag(5.0 * SPECTRA[task][name].S[: b - a].double() / cfg.scaling)
            torch.testing.assert_close(gram, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 3.0, 32.0])
def test_product_does_not_depend_on_lora_alpha(alpha: float) -> None:
    ref_cfg = ThanoraConfig(rank=R)
    cfg = ThanoraConfig(rank=R, lora_alpha=alpha)
    ref, other = hasi_factors(SPECTRA, PLAN, TARGETS, ref_cfg), hasi_factors(SPECTRA, PLAN, TARGETS, cfg)
    for name in TARGETS:
        p_ref = ref_cfg.scaling * ref[name].lora_B.double() @ ref[name].lora_A.double()
        p_other = cfg.scaling * other[name].lora_B.double() @ other[name].lora_A.double()
        torch.testing.assert_close(p_other, p_ref, rtol=1e-5, atol=1e-6)
        if alpha != R:
            ratio = other[name].lora_B[:, 0].norm() / ref[name].lora_B[:, 0].norm()
            assert float(ratio) == pytest.approx(math.sqrt(R / alpha), rel=1e-5)


def test_per_factor_gamma_squares_the_product() -> None:
    gamma = 3.0
    sqrt_mode = hasi_factors(SPECTRA, PLAN, TARGETS, ThanoraConfig(rank=R, gamma=gamma))
    per_factor = hasi_factors(SPECTRA, PLAN, TARGETS, ThanoraConfig(rank=R, gamma=gamma, gamma_mode="per_factor"))
    for name in TARGETS:
        for task in TASKS:
            a, b = PLAN.modules[name].slices(PLAN.tasks)[task]
            want = gamma**2 * task_product(SPECTRA[task][name], b - a)
            got = per_factor[name].lora_B[:, a:b].double() @ per_factor[name].lora_A[a:b].double()
            assert float((got - want).norm() / want.norm()) < 1e-6
            got_sqrt = sqrt_mode[name].lora_B[:, a:b].double() @ sqrt_mode[name].lora_A[a:b].double()
            torch.testing.assert_close(got, gamma * got_sqrt, rtol=1e-5, atol=1e-5)


def test_balanced_factors_keep_every_product_and_equalise_each_index() -> None:
    paper = hasi_factors(SPECTRA, PLAN, TARGETS, ThanoraConfig(rank=R))
    balanced = hasi_factors(SPECTRA, PLAN, TARGETS, ThanoraConfig(rank=R, balance_factors=True))
    unbalanced_somewhere = False
    for name in TARGETS:
        p, b = paper[name], balanced[name]
        torch.testing.assert_close(b.lora_B.double() @ b.lora_A.double(), p.lora_B.double() @ p.lora_A.double(),
                                   rtol=1e-5, atol=1e-6)
        for task in TASKS:
            start, stop = b.blocks[task]
            torch.testing.assert_close(b.lora_B[:, start:stop].norm(dim=0), b.lora_A[start:stop].norm(dim=1),
                                       rtol=1e-5, atol=0)
            ratio = p.lora_A[start:stop].norm(dim=1) / p.lora_B[:, start:stop].norm(dim=0)
            unbalanced_somewhere |= bool((ratio - 1).abs().max() > 0.1)  # the paper's split is not balanced
        start, stop = b.blocks[COOP]
        torch.testing.assert_close(b.lora_A[start:stop], p.lora_A[start:stop], rtol=0, atol=0)  # coop untouched
        torch.testing.assert_close(b.lora_B[:, start:stop], p.lora_B[:, start:stop], rtol=0, atol=0)
    assert unbalanced_somewhere
    with pytest.raises(ValueError, match="balance_factors"):
        ThanoraConfig(rank=R, balance_factors="yes")


def test_coop_block_zero_b_seeded_a() -> None:
    a1 = hasi_factors(SPECTRA, PLAN, TARGETS, ThanoraConfig(rank=R, seed=3))
    a2 = hasi_factors(SPECTRA, PLAN, TARGETS, ThanoraConfig(rank=R, seed=3))
    b = hasi_factors(SPECTRA, PLAN, TARGETS, ThanoraConfig(rank=R, seed=4))
    for name, target in TARGETS.items():
        start, stop = a1[name].blocks[COOP]
        assert stop == R and stop > start
        assert torch.count_nonzero(a1[name].lora_B[:, start:stop]) == 0
        coop_A = a1[name].lora_A[start:stop]
        assert torch.count_nonzero(coop_A) == coop_A.numel()
        assert float(coop_A.abs().max()) <= 1 / math.sqrt(target.d_in)
        assert torch.equal(coop_A, a2[name].lora_A[start:stop])
        assert not torch.equal(coop_A, b[name].lora_A[start:stop])
        assert torch.equal(a1[name].lora_A[:start], b[name].lora_A[:start])  # task blocks do not use the seed
        assert torch.equal(a1[name].lora_B, b[name].lora_B)


def test_block_table_is_contiguous_in_task_order() -> None:
    inits = hasi_factors(SPECTRA, PLAN, TARGETS, ThanoraConfig(rank=R))
    for name, init in inits.items():
        keys = list(init.blocks)
        assert keys == [*TASKS, COOP]
        edges = [init.blocks[k] for k in keys]
        assert edges[0][0] == 0 and edges[-1][1] == R
        assert all(prev[1] == nxt[0] for prev, nxt in itertools.pairwise(edges))
        assert [init.blocks[t][1] - init.blocks[t][0] for t in TASKS] == list(PLAN.modules[name].task_ranks)
        assert init.blocks[COOP][1] - init.blocks[COOP][0] == PLAN.modules[name].coop_rank
