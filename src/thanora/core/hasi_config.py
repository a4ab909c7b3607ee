"""`ThanoraConfig`: every choice of SPEC.md sections 1-5 and 7 as one validated, serialisable value."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

GammaMode = Literal["sqrt_per_factor", "per_factor"]
SvdMode = Literal["exact", "randomized", "auto"]
StatsDtype = Literal["float32", "float64"]
SprNormalization = Literal["none", "init"]
ResidualMode = Literal["rewrite", "branch"]


@dataclass(frozen=True)
class ThanoraConfig:
    """Settings of ThanoRA's initialisation (HASI) and regulariser (SPR).

    Defaults are the paper's values, with SPEC.md's resolutions of the open choices.

    Attributes:
        rank: LoRA rank budget R per adapted module (task blocks + cooperative block).
        lora_alpha: LoRA alpha; ``None`` means ``rank`` (scaling 1). The initial product s·B·A does not depend on it.
        lora_dropout: dropout on the LoRA input during training (SPEC default 0.05). With the residual base the
            task blocks carry γ × the top components of W, so dropping their input perturbs the training forward by
            that much: on SmolLM2 (γ = 5) 0.05 gave a train loss of 12-17 against ~5 without, and scores below the
            base model. Use 0 with ``residual``; `prepare_model` warns otherwise.
        tau: softmax temperature of the entropy-based rank allocation.
        r_min: smallest rank a task block may get in any module.
        gamma: global factor on the task blocks' initial product.
        gamma_mode: ``"sqrt_per_factor"`` multiplies B_t and A_t by √γ (product × γ); ``"per_factor"`` multiplies
            each factor by γ (product × γ², the paper's literal wording).
        balance_factors: rescale, in every task block, each rank index's column b_i of B_t and row a_i of A_t to
            equal norms (b_i·c, a_i/c with c = √(‖a_i‖/‖b_i‖)); B_t·A_t, so the init and the residual, are unchanged.
            The paper's split gives both factors √S̃, but A_t's rows are √S̃·v̂ᵢ with v̂ᵢ the covariance-whitened
            direction, not a unit vector, so the two factors' norms differ per module (SmolLM2, mean over modules:
            ‖A‖ 30, ‖B‖ 91), and Adam, which moves every entry by about the learning rate, moves s·B·A by an amount
            that grows with the larger factor. Measured (`benchmarks/results/update_size.md`, SmolLM2, CSQA + OBQA,
            rank 16, 50 steps): balancing cuts ThanoRA's per-step ‖ΔW‖/‖W‖ by 31-38 % (still 13-15x LoRA's, whose B
            starts at zero) and at lr 3e-4 its training loss tracks LoRA's and CorDA's, where the paper's split stays
            about a point above them from the fifth step on. In the small accuracy table
            (`benchmarks/results/accuracy_2task_small.md`: 250 steps, 3 seeds, 821 questions, each variant at its
            own best rate 1e-4) it is the nominally best ThanoRA variant, +0.8 points [−1.3, +3.1] over the paper's
            split, with a third less KL to the base model (0.43 vs 0.67 nats/token): not enough evidence to make it
            the default. A thanora option, not in the paper.
        residual: subtract s·B·A from the base weight so the output at step 0 equals the pretrained model's.
        residual_mode: how the residual is held. ``"rewrite"`` (the paper's, PEFT's PiSSA/CorDA): the base weight
            becomes W_res = W − s·B₀A₀, rounded to the base's dtype. ``"branch"`` (a thanora option): the base keeps
            W and a frozen second LoRA path subtracts s·B₀A₀ (computed in the adapter's float32, where it cancels the
            trained path exactly at step 0): exact init in bf16 / fp16 for one more low-rank product per module, and
            ``disable_adapter()`` / ``unload()`` give the original model. Same export and merge.
        spr_lambda: weight λ of the subspace-preserving regulariser (0 disables it: "HASI only"). Measured on
            SmolLM2, CSQA + OBQA, 250 steps (`benchmarks/results/accuracy_2task_small.md`): HASI + SPR minus
            HASI only −0.3 points [−1.6, +0.6] at λ = 1e-3 (init-normalised), −0.7 [−2.1, +0.5] at λ = 0.1; the
            task blocks' overlap stays at its initial 0.832 either way, because Adam moves each factor entry by about
            the learning rate per step, far less than the factors' entries. On the 4-task mixture (372 steps, λ =
            1e-3) it is −0.2 [−1.2, +1.0] at rank 16 and −0.1 [−0.6, +0.4] at rank 64
            (`benchmarks/results/accuracy_4task_small{,_r64}.md`), the overlap again unchanged. SPR needs more or
            larger steps to act.
        spr_normalization: ``"none"`` is the paper's raw sum over modules (SPEC.md §5). Its scale follows the
            covariance: A = √S̃·Vᵀ C⁻¹ grows as C^(-1/2), so modules with small inputs (down_proj) can dominate by
            many orders of magnitude (SmolLM2: λ·SPR ≈ 4e10 at init with λ = 1e-4). ``"init"`` divides each
            module's term by its value at initialisation, so every module starts at 1 and λ weighs the relative
            overlap (a thanora option, not in the paper).
        target_modules: module names (full dotted names or their suffixes such as ``"q_proj"``) inside the language
            model; ``None`` means every linear layer of the language model (never the vision tower, the projector
            or the output head).
        stats_dtype: accumulation dtype of the calibration second moments.
        calibration_memory_gb: at most this many GB of covariance matrices at a time (`covariance_groups`: one
            pass over the calibration batches per group of modules, each pass stopped after its group); ``None``
            holds every module's matrix at once (one pass). The statistics are the same either way.
        damping: initial relative damping δ (C + δ·mean(diag C)·I), doubled until the solve is accurate.
        max_damping_doublings: how many times δ may double before the covariance is declared singular.
        solve_tolerance: relative residual the damped Cholesky solve must reach.
        svd: ``"exact"`` (full SVD, truncated), ``"randomized"`` (``torch.svd_lowrank``, checked against
            ``svd_tolerance``, exact where it misses) or ``"auto"``: exact up to 2,048 on the smaller side (every
            module of SmolLM2-sized models), checked randomized above (7B models' 4096 × 11008 projections).
        svd_tolerance: the a-posteriori residual a randomized SVD must reach (`thanora.core.spectra.svd_residual`:
            max over the top-R triplets of ‖Mv − su‖ and ‖Mᵀu − sv‖, relative to the largest singular value).
        svd_oversample: extra columns of the randomized range finder.
        svd_power_iters: power iterations of the randomized range finder.
        seed: seed of the cooperative block's Kaiming-uniform A.
    """

    rank: int = 64
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    tau: float = 0.2
    r_min: int = 1
    gamma: float = 5.0
    gamma_mode: GammaMode = "sqrt_per_factor"
    balance_factors: bool = False
    residual: bool = True
    residual_mode: ResidualMode = "rewrite"
    spr_lambda: float = 1e-4
    spr_normalization: SprNormalization = "none"
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
    seed: int = 0

    def __post_init__(self) -> None:
        _require(self.rank >= 2, "rank", f"must be >= 2, got {self.rank}")
        _require(self.lora_alpha is None or self.lora_alpha > 0, "lora_alpha", "must be positive or null")
        _require(0.0 <= self.lora_dropout < 1.0, "lora_dropout", f"must be in [0, 1), got {self.lora_dropout}")
        _require(self.tau > 0, "tau", f"must be > 0, got {self.tau}")
        _require(self.r_min >= 1, "r_min", f"must be >= 1, got {self.r_min}")
        _require(self.gamma > 0, "gamma", f"must be > 0, got {self.gamma}")
        _require(self.gamma_mode in ("sqrt_per_factor", "per_factor"), "gamma_mode",
                 f"must be 'sqrt_per_factor' or 'per_factor', got {self.gamma_mode!r}")
        _require(isinstance(self.balance_factors, bool), "balance_factors",
                 f"must be true or false, got {self.balance_factors!r}")
        _require(self.residual_mode in ("rewrite", "branch"), "residual_mode",
                 f"must be 'rewrite' or 'branch', got {self.residual_mode!r}")
        _require(self.spr_lambda >= 0, "spr_lambda", f"must be >= 0, got {self.spr_lambda}")
        _require(self.spr_normalization in ("none", "init"), "spr_normalization",
                 f"must be 'none' or 'init', got {self.spr_normalization!r}")
        _require(self.stats_dtype in ("float32", "float64"), "stats_dtype",
                 f"must be 'float32' or 'float64', got {self.stats_dtype!r}")
        _require(self.calibration_memory_gb is None or self.calibration_memory_gb > 0, "calibration_memory_gb",
                 f"must be null (no bound) or > 0, got {self.calibration_memory_gb}")
        _require(self.damping > 0, "damping", f"must be > 0, got {self.damping}")
        _require(self.max_damping_doublings >= 0, "max_damping_doublings", "must be >= 0")
        _require(self.solve_tolerance > 0, "solve_tolerance", "must be > 0")
        _require(self.svd in ("exact", "randomized", "auto"), "svd",
                 f"must be 'exact', 'randomized' or 'auto', got {self.svd!r}")
        _require(self.svd_tolerance > 0, "svd_tolerance", f"must be > 0, got {self.svd_tolerance}")
        _require(self.svd_oversample >= 0, "svd_oversample", f"must be >= 0, got {self.svd_oversample}")
        _require(self.svd_power_iters >= 0, "svd_power_iters", f"must be >= 0, got {self.svd_power_iters}")
        if self.target_modules is not None:
            names = tuple(self.target_modules)
            _require(len(names) > 0 and all(isinstance(n, str) and n for n in names), "target_modules",
                     "must be null (all linear layers of the language model) or a non-empty list of module names")
            object.__setattr__(self, "target_modules", names)

    @property
    def alpha(self) -> float:
        """The resolved lora_alpha."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    @property
    def scaling(self) -> float:
        """LoRA scaling s = lora_alpha / R."""
        return self.alpha / self.rank

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (the resolved config saved with every artifact)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["lora_alpha"] = self.alpha
        if out["target_modules"] is not None:
            out["target_modules"] = list(out["target_modules"])
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ThanoraConfig:
        """Inverse of `to_dict`; unknown keys raise a `ValueError` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ThanoraConfig field(s) {unknown}; valid fields: {sorted(known)}")
        data = dict(data)
        if data.get("target_modules") is not None:
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data)


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"ThanoraConfig.{field_name} {message}")
