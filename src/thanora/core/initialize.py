"""Heterogeneity-aware subspace initialisation (HASI): SPEC.md §4. Builds the LoRA factors without touching a model.

The cooperative block's A is drawn here, U(±1/√d_in) (what PEFT's ``kaiming_uniform_(a=√5)`` of ``lora_A`` draws),
rather than left to PEFT: PEFT initialises the whole A from the global RNG on the device of the weights, so the
values would depend on the device, on whatever consumed the global RNG before, and on PEFT's init order; here they
come from a CPU generator seeded by ``ThanoraConfig.seed`` only (the same plan and seed give the same factors on
any machine, tested), and only the coop rows are random.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from thanora.core.allocation import COOP, RankPlan
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.spectra import Spectrum
from thanora.core.targets import Target


@dataclass(frozen=True)
class ModuleInit:
    """Initial factors of one module, blocks laid out along the rank dimension.

    Attributes:
        lora_A: (R, d_in) = [A_1; …; A_T; A_coop].
        lora_B: (d_out, R) = [B_1, …, B_T, B_coop].
        blocks: ``{task: (start, stop)}`` plus ``COOP`` (the block table).
    """

    lora_A: torch.Tensor
    lora_B: torch.Tensor
    blocks: dict[str, tuple[int, int]]


def hasi_factors(
    spectra: Mapping[str, Mapping[str, Spectrum]],
    plan: RankPlan,
    targets: Mapping[str, Target],
    cfg: ThanoraConfig,
) -> dict[str, ModuleInit]:
    """Initial LoRA factors of every module from the task spectra and the rank plan.

    Task block t: B_t = U_t[:, :r_t]·diag(√S̃), A_t = diag(√S̃)·V̂_tᵀ[:r_t] with S̃ = S/s, both multiplied by √γ
    (``gamma_mode="sqrt_per_factor"``) or γ (``"per_factor"``); so s·B_t·A_t = γ·U_t S_t V̂_tᵀ (top r_t), whatever
    lora_alpha is; with ``balance_factors`` each index's column of B_t and row of A_t are rescaled to equal norms
    (same product). Cooperative block: A Kaiming-uniform (LoRA's init, seeded by ``cfg.seed``), B zero.

    Args:
        spectra: ``{task: {module: Spectrum}}`` with at least R triplets each.
        plan: the rank plan (its task order is the block order).
        targets: from `find_targets` (module order and shapes).
        cfg: scaling, γ and seed.

    Returns:
        ``{module: ModuleInit}`` in float32 on CPU.
    """
    factor_gain = math.sqrt(cfg.gamma) if cfg.gamma_mode == "sqrt_per_factor" else cfg.gamma
    generator = torch.Generator().manual_seed(cfg.seed)
    inits: dict[str, ModuleInit] = {}
    for name, target in targets.items():
        module_plan = plan.modules[name]
        blocks = module_plan.slices(plan.tasks)
        A = torch.zeros(plan.budget, target.d_in)  # (R, d_in)
        B = torch.zeros(target.d_out, plan.budget)  # (d_out, R)
        for task in plan.tasks:
            start, stop = blocks[task]
            s = spectra[task][name].truncate(stop - start)
            root = (s.S.float() / cfg.scaling).sqrt() * factor_gain  # (r_t,)
            B[:, start:stop] = s.U.float() * root
            A[start:stop] = root[:, None] * s.Vh.float()
            if cfg.balance_factors:  # column i of B and row i of A to equal norms; the product is unchanged
                c = (A[start:stop].norm(dim=1) / B[:, start:stop].norm(dim=0)).sqrt()
                B[:, start:stop] *= c
                A[start:stop] /= c[:, None]
        start, stop = blocks[COOP]
        bound = 1.0 / math.sqrt(target.d_in)  # kaiming_uniform_(a=√5), as PEFT/LoRA initialise A
        A[start:stop].uniform_(-bound, bound, generator=generator)
        inits[name] = ModuleInit(lora_A=A, lora_B=B, blocks=blocks)
    return inits
