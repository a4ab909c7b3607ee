"""R-LoRA+ (Liu et al., 2025, arXiv:2508.05078, the simplified R-LoRA): HydraLoRA without the router.

Every adapted linear layer computes W_res x + s · (1/N) Σ_i B_i drop_i(A x):

- the N heads are averaged with fixed weights 1/N in training and at inference (no router);
- A and every B_i start random (R-LoRA's multi-head randomisation; the scheme of PEERS.md: normal with std
  1/√max(d_in, d_out)), drawn from a generator seeded by ``MethodContext.seed``;
- dropout acts independently per head on A·x (R-LoRA's multi-head dropout);
- the random start would change the model, so the initial update s · mean_i(B_i⁰) · A⁰ is subtracted from W
  (residual base W_res, as PiSSA/CorDA do): the prepared model's outputs equal the base model's.

At inference the layer is ordinary LoRA (mean_i B_i, A) on W_res, so it is mergeable and exported as a stock PEFT LoRA
on the *original* base: ΔW = s·(B̄·A − B̄⁰·A⁰) = s'·[B̄, −B̄⁰]·[A; A⁰] with rank 2r and lora_alpha 2r·s (s' = s), the
conversion PEFT itself applies to PiSSA/CorDA. ``save`` writes that adapter (plus a ``thanora_adapter.json`` sidecar
with the settings and the conversion), ``load`` is `peft.PeftModel.from_pretrained`.

Paper vs code: the paper gives no number of heads or rank of its own for the comparison here; the rank is the
project's LoRA budget (64) and N = 3 (HydraLoRA's 3B1A); the paper's runs used dropout 0.2, the default here is the
project's LoRA dropout 0.05. Targets: every linear layer of the language model, as the other baselines.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import peft
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from thanora.adapters.export import write_lora_adapter
from thanora.adapters.multihead import AdapterContext, HeadConfig, MultiHeadLinear, context_of, inject_, target_names
from thanora.adapters.record import unwrap
from thanora.core.targets import check_rank, find_targets
from thanora.methods.base import Method, MethodContext
from thanora.methods.lora import load_peft_adapter


@dataclass(frozen=True)
class RLoraPlusSettings:
    """Settings of R-LoRA+.

    Attributes:
        rank: rank r of the shared A and of every head (the rank of the merged update, as LoRA's r).
        n_heads: number of heads N, averaged with weights 1/N.
        lora_alpha: alpha; ``None`` means ``rank`` (scaling 1, as the project's LoRA).
        lora_dropout: dropout on A·x during training, an independent mask per head.
        target_modules: module names inside the language model; ``None`` = every linear layer.
    """

    rank: int = 64
    n_heads: int = 3
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        for name in ("rank", "n_heads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"RLoraPlusSettings.{name} must be an integer >= 1, got {value!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"RLoraPlusSettings.lora_alpha must be positive or null, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"RLoraPlusSettings.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        names = target_names(self.target_modules, "RLoraPlusSettings.target_modules")
        object.__setattr__(self, "target_modules", names)

    @property
    def scaling(self) -> float:
        """s = lora_alpha / rank."""
        return (self.rank if self.lora_alpha is None else self.lora_alpha) / self.rank

    def head_config(self) -> HeadConfig:
        """The multi-head layer's configuration: no router, per-head dropout, random init."""
        return HeadConfig(rank=self.rank, n_heads=self.n_heads, scaling=self.scaling, router=None,
                          dropout=self.lora_dropout, head_dropout=True, init="random")


def prepare_rlora_plus(model: nn.Module, settings: RLoraPlusSettings, ctx: MethodContext) -> nn.Module:
    """Wrap every target of ``model`` (in place) with random heads and subtract their initial update from W.

    Args:
        model: a transformers model; its target weights become the residual W − s·B̄⁰·A⁰.
        settings: rank, heads, targets...
        ctx: only ``ctx.seed`` is used (a private generator; the global RNG is left alone).

    Returns:
        ``model``, with the base model's outputs, in the caller's train/eval mode.
    """
    targets = find_targets(model, settings.target_modules)
    check_rank(targets, settings.rank, "RLoraPlusSettings")
    wrappers = inject_(model, targets, settings.head_config(), AdapterContext("rlora_plus", settings), ctx.seed)
    for wrapper in wrappers.values():
        assert isinstance(wrapper, MultiHeadLinear)
        wrapper.subtract_initial_()
    return model


def converted_factors(model: nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per adapted module ``(lora_A' (2r, d_in), lora_B' (d_out, 2r))`` = ([A; A⁰], [B̄, −B̄⁰]): the trained update
    relative to the original weight, detached on CPU in the adapter's dtype."""
    inner = unwrap(model)
    factors = {}
    for name, module in inner.named_modules():
        if isinstance(module, MultiHeadLinear):
            A, B = module.adapter.lora_A.detach(), module.adapter.lora_B.detach().mean(0)
            A0, B0 = module.get_buffer("initial_lora_A"), module.get_buffer("initial_lora_B")
            factors[name] = (torch.cat([A, A0.to(A)]).cpu().contiguous(),
                             torch.cat([B, -B0.to(B)], dim=1).cpu().contiguous())
    if not factors:
        raise TypeError(f"{type(inner).__name__} has no R-LoRA+ layer; prepare it with rlora_plus first")
    return factors


def export_rlora_plus(model: nn.Module, out_dir: Path) -> None:
    """Write a stock PEFT LoRA adapter (rank 2r, alpha 2r·s) that reproduces the model on the original base."""
    inner = unwrap(model)
    settings = context_of(inner).settings
    factors = converted_factors(inner)
    sidecar = {
        "format": "thanora-adapter/1",
        "method": "rlora_plus",
        "peft_version": peft.__version__,
        "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(settings).items()},
        "conversion": "residual base: A'=[A;A0], B'=[mean_i B_i, -mean_i B0_i], r'=2r, lora_alpha'=2r*s",
        "init": "A, B_i ~ N(0, 1/max(d_in, d_out)) (R-LoRA multi-head randomisation), per-head dropout on A x",
    }
    write_lora_adapter(out_dir, factors, settings.scaling, model=inner, dropout=settings.lora_dropout,
                       fan_in_fan_out=any(isinstance(inner.get_submodule(n).base_layer, Conv1D) for n in factors),
                       base_model_name_or_path=getattr(getattr(inner, "config", None), "_name_or_path", None),
                       sidecar=sidecar)


def rlora_plus_param_count(model: nn.Module, settings: RLoraPlusSettings) -> int:
    """Σ over targets of r·d_in + N·r·d_out."""
    cfg = settings.head_config()
    return sum(cfg.param_count(t.d_in, t.d_out) for t in find_targets(model, settings.target_modules).values())


RLORA_PLUS = Method(
    name="rlora_plus",
    paper="Liu, Cheng, Chang and Wu, Align, Don't Divide: Revisiting the LoRA Architecture in Multi-Task Learning "
          "(R-LoRA+), 2025 (arXiv:2508.05078); R-LoRA: Liu, Chang and Wu, 2025 (arXiv:2502.15455)",
    config_cls=RLoraPlusSettings,
    mergeable=True,
    task_id_at_train=False,
    task_id_at_test=False,
    prepare=prepare_rlora_plus,
    regularizer=None,
    export=export_rlora_plus,
    save=export_rlora_plus,
    load=load_peft_adapter,
    param_count=rlora_plus_param_count,
)
