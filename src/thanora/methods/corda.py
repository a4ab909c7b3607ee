"""CorDA (Yang et al., 2024), instruction-previewed mode (IPM), as the single-task baseline of ThanoRA's machinery.

CorDA is "one pooled task, no allocation, no SPR" (PEERS.md): the calibration batches of *all* tasks are pooled into
one second moment C = Σ x xᵀ / n_tokens over every non-padding token of the mixture (`thanora.core.covariance`, SPEC.md
§1:
token-weighted, so a task with more calibration tokens weighs more), each weight gets the damped task-aware SVD
U S V̂ᵀ = SVD(W C_d) C_d⁻¹ (SPEC.md §2, `thanora.core.spectra`), and the top-r triplets become the adapter:
B = U_r·√(S_r/s), A = √(S_r/s)·V̂_rᵀ, W_res = W − s·B·A (SPEC.md §4, `thanora.core.initialize.hasi_factors` with the
whole
rank in one block and γ = 1, `thanora.adapters.layers.inject_`). So s·B·A = U_r S_r V̂_rᵀ whatever lora_alpha is and
W_res + s·B·A = W exactly at init: the paper's IPM and PEFT's ``corda_init`` (which also divides S by the scaling).
γ = 1 is deliberate: the ×γ of ThanoRA's HASI is not part of CorDA. Export converts the residual base to a stock PEFT
adapter on the original base (A' = [A; A₀], B' = [B, −B₀], rank 2r; `thanora.export_adapter`).

Paper / PEFT code vs this file: PEFT's `preprocess_corda` hook assumes batch size 1 without padding, divides each call's
input by its maximum, and averages XᵀX over calls (not tokens); here the statistics are masked, token-normalised and
batch-size independent (they equal PEFT's when a single unpadded sample is used: a constant factor does not change
the decomposition). PEFT damps until ‖C_d C_d⁻¹ − I‖ < 0.05 with an explicit inverse; here a Cholesky solve with
``solve_tolerance`` (SPEC.md §2). The knowledge-preserved mode (KPM: bottom-r components) is not offered.

Defaults: rank 64, alpha = rank, dropout 0 (dropout on the adapter input of a residual-initialised adapter perturbs the
top components of W: see `thanora.ThanoraConfig.lora_dropout`), every linear layer of the language model, float32
statistics, δ = 0.01 doubled at most 20 times, size-aware SVD (`svd: auto`: exact up to 2,048 on the smaller side,
checked randomized above). The pooled spectra are cached in ``ctx.cache_dir`` as
``spectra-<task1>+<task2>….safetensors`` (not a valid task name, so never confused with ThanoRA's per-task files) and
reused by later runs with the same model, targets, decomposition settings and ``ctx.calibration_key``.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Any

from peft import PeftModel
from torch import nn

from thanora.adapters.layers import first_batch, inject_
from thanora.core.allocation import ModulePlan, RankPlan, normalized_entropy
from thanora.core.hasi_config import ResidualMode, StatsDtype, SvdMode, ThanoraConfig
from thanora.core.initialize import hasi_factors
from thanora.core.targets import check_rank, find_targets
from thanora.methods.base import Method, MethodContext
from thanora.methods.lora import load_peft_adapter, lora_param_count, seeded_rng
from thanora.methods.thanora import export_thanora, task_spectra


@dataclass(frozen=True)
class CordaSettings:
    """Settings of CorDA (IPM). Every field means what the `ThanoraConfig` field of the same name means.

    Attributes:
        rank: LoRA rank r of every adapted module (>= 2, the shared machinery's minimum).
        lora_alpha: LoRA alpha; ``None`` means ``rank`` (scaling 1). The initial product s·B·A does not depend on it.
        lora_dropout: dropout on the adapter input during training (0 recommended with the residual base).
        target_modules: module names (full dotted names or suffixes) inside the language model; ``None`` means every
            linear layer of the language model.
        stats_dtype: accumulation dtype of the pooled second moment.
        calibration_memory_gb: at most this many GB of covariances at a time (several passes); ``None``: one pass.
        damping: initial relative damping δ (C + δ·mean(diag C)·I), doubled until the solve is accurate.
        max_damping_doublings: how many times δ may double before the covariance is declared singular.
        solve_tolerance: relative residual the damped Cholesky solve must reach.
        svd: ``"exact"``, ``"randomized"`` (``torch.svd_lowrank``, checked) or ``"auto"`` (size-aware).
        svd_tolerance: the a-posteriori residual a randomized SVD must reach.
        svd_oversample: extra columns of the randomized range finder.
        svd_power_iters: power iterations of the randomized range finder.
        residual_mode: ``"rewrite"`` W_res in the base weight, or ``"branch"`` a frozen −s·B₀A₀ path (exact init in
            low precision; see `thanora.ThanoraConfig.residual_mode`).
    """

    rank: int = 64
    lora_alpha: float | None = None
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] | None = None
    stats_dtype: StatsDtype = "float32"
    calibration_memory_gb: float | None = None
    damping: float = 0.01
    max_damping_doublings: int = 20
    solve_tolerance: float = 1e-3
    svd: SvdMode = "auto"
    svd_oversample: int = 16
    svd_power_iters: int = 4
    svd_tolerance: float = 1e-3
    residual_mode: ResidualMode = "rewrite"

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", (self.target_modules,))
        try:  # one validation, ThanoraConfig's, with messages naming this class's fields
            config = self.thanora_config()
        except ValueError as err:
            raise ValueError(str(err).replace("ThanoraConfig.", "CordaSettings.", 1)) from None
        object.__setattr__(self, "target_modules", config.target_modules)

    def thanora_config(self) -> ThanoraConfig:
        """The `ThanoraConfig` driving the shared machinery: these fields, γ = 1, residual base, no SPR."""
        return ThanoraConfig(**dataclasses.asdict(self), gamma=1.0, residual=True, spr_lambda=0.0)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (lora_alpha resolved)."""
        out = dataclasses.asdict(self)
        out["lora_alpha"] = self.thanora_config().alpha
        if out["target_modules"] is not None:
            out["target_modules"] = list(out["target_modules"])
        return out


def pooled_task_name(tasks: list[str]) -> str:
    """The name of the pooled mixture, ``"a+b"``: never a valid task name, so its cache file is its own."""
    return "+".join(tasks)


def prepare_corda(model: nn.Module, settings: CordaSettings, ctx: MethodContext) -> PeftModel:
    """Pooled calibration statistics → task-aware SVD → top-r adapter on the residual base (PEFT LoRA layers).

    Args:
        model: a transformers model, modified in place.
        settings: CorDA's settings.
        ctx: ``calibration`` (required: ``{task: batches}``, all pooled), ``cache_dir``, ``calibration_key``,
            ``all_reduce``, ``progress`` and ``seed`` (randomized SVD only; the global RNG is left as it was).

    Returns:
        The prepared `PeftModel` (only lora_A / lora_B trainable), in the caller's train/eval mode; its
        ``save_pretrained`` writes the converted adapter, as for ThanoRA.

    Raises:
        ValueError: no calibration batches, a rank above a module's min(d_in, d_out), or a singular covariance.
    """
    if not ctx.calibration:
        raise ValueError("CorDA needs calibration batches: MethodContext.calibration is empty")
    config = settings.thanora_config()
    targets = find_targets(model, config.target_modules)
    check_rank(targets, config.rank, "CordaSettings")
    pooled = pooled_task_name(list(ctx.calibration))
    batches = itertools.chain.from_iterable(ctx.calibration.values())  # lazy: not iterated on a cache hit
    was_training = model.training
    # Randomness (svd="randomized", PEFT's throw-away init of the factors) is seeded and kept off the global RNG.
    with seeded_rng(model, ctx.seed):
        spectra = task_spectra(model, targets, pooled, batches, config, ctx.cache_dir, ctx.calibration_key,
                               ctx.all_reduce, ctx.progress)
        # The whole rank goes to the one pooled task: no cooperative block, no allocation.
        plan = RankPlan((pooled,), config.rank, config.tau, config.r_min,
                        {name: ModulePlan((config.rank,), 0, (normalized_entropy(s.S[: config.rank]),))
                         for name, s in spectra.items()})
        inits = hasi_factors({pooled: spectra}, plan, targets, config)
        peft_model = inject_(model, targets, inits, plan, config, first_batch(ctx.calibration))
    peft_model.train(was_training)  # get_peft_model switches to train mode; keep the caller's mode
    return peft_model


CORDA = Method(
    name="corda",
    paper="Yang et al., CorDA: Context-Oriented Decomposition Adaptation of Large Language Models for "
          "Task-Aware Parameter-Efficient Fine-tuning, NeurIPS 2024 (arXiv:2406.05223)",
    config_cls=CordaSettings,
    mergeable=True,
    task_id_at_train=False,
    task_id_at_test=False,
    prepare=prepare_corda,
    regularizer=None,
    export=export_thanora,
    save=export_thanora,
    load=load_peft_adapter,
    param_count=lora_param_count,
)
