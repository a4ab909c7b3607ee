"""HydraLoRA (Tian et al., NeurIPS 2024, arXiv:2404.19245): one shared A, N heads B_i and a per-token router.

Every adapted linear layer computes W x + Σ_i w_i(x) · s · B_i A x with w(x) = softmax(W_r x) (bias-free router on
the layer input, softmax in float32, dense: every head, no top-k), A Kaiming-uniform (PEFT's), B_i zero, router
nn.Linear's default initialisation (all as the reference code). The shared layer is `thanora.adapters.multihead`.

Presets (paper Table 1, the ThanoRA paper's two settings): ``3B1A`` = 3 heads, ``4B1A`` = 4 heads, both per-head
rank 32; YAML ``{name: hydralora, preset: 4B1A}`` or ``{name: hydralora, n_heads: 4, rank: 32}``. Without either,
3B1A. Targets are every linear layer of the language model, as the other baselines.

Paper / LLM reference code vs option: the LLM code has no load-balancing loss (default, ``balance_weight: 0``); its
multimodal variant adds a Switch-Transformer loss N · Σ_i f_i · P_i (f_i: share of tokens whose top head is i, P_i:
mean router probability of head i, over the micro-batch's non-padding tokens, averaged over adapted layers) with
weight 0.05: ``balance_weight: 0.05``. A single head (N = 1) has no router and is plain LoRA.

Not mergeable (the head weights depend on the input): no PEFT export; `save`/`load` use `thanora.adapters.native`, whose
metadata records these settings.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from thanora.adapters.multihead import (
    AdapterContext,
    HeadConfig,
    inject_,
    routed_tokens,
    save_multihead,
    take_routing_probs,
    target_names,
    zero_loss,
)
from thanora.adapters.native import load_native
from thanora.core.targets import check_rank, find_targets
from thanora.methods.base import Method, MethodContext

PRESETS: dict[str, tuple[int, int]] = {"3B1A": (3, 32), "4B1A": (4, 32)}  # name → (n_heads, per-head rank)
DEFAULT_PRESET = "3B1A"


@dataclass(frozen=True)
class HydraLoraSettings:
    """Settings of HydraLoRA.

    Attributes:
        preset: ``"3B1A"`` or ``"4B1A"`` (n_heads 3 or 4, rank 32), or ``None``; an explicit n_heads / rank must
            agree with it.
        n_heads: number of B heads N; ``None`` = from the preset (3B1A when there is none).
        rank: rank r of the shared A and of every head; ``None`` = from the preset (32).
        lora_alpha: alpha; ``None`` means ``rank`` (scaling 1, as the project's LoRA).
        lora_dropout: dropout on the adapter input during training.
        balance_weight: weight of the Switch-style load-balancing loss (0 = the LLM reference code; 0.05 = its
            multimodal variant).
        target_modules: module names inside the language model; ``None`` = every linear layer.
    """

    preset: str | None = None
    n_heads: int | None = None
    rank: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    balance_weight: float = 0.0
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.preset is not None and self.preset not in PRESETS:
            raise ValueError(f"HydraLoraSettings.preset must be one of {sorted(PRESETS)} or null, got {self.preset!r}")
        heads, rank = PRESETS[self.preset or DEFAULT_PRESET]
        for name, value in (("n_heads", heads), ("rank", rank)):
            given = getattr(self, name)
            if given is not None and (isinstance(given, bool) or not isinstance(given, int) or given < 1):
                raise ValueError(f"HydraLoraSettings.{name} must be an integer >= 1 or null, got {given!r}")
            if self.preset is not None and given is not None and given != value:
                raise ValueError(f"HydraLoraSettings.{name}={given} contradicts preset {self.preset} "
                                 f"({name}={value}); give one or the other")
            object.__setattr__(self, name, value if given is None else given)
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"HydraLoraSettings.lora_alpha must be positive or null, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"HydraLoraSettings.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not self.balance_weight >= 0:
            raise ValueError(f"HydraLoraSettings.balance_weight must be >= 0, got {self.balance_weight!r}")
        names = target_names(self.target_modules, "HydraLoraSettings.target_modules")
        object.__setattr__(self, "target_modules", names)

    def head_config(self) -> HeadConfig:
        """The multi-head layer's configuration."""
        rank, heads = int(self.rank), int(self.n_heads)  # type: ignore[arg-type]  # resolved in __post_init__
        alpha = float(rank if self.lora_alpha is None else self.lora_alpha)
        return HeadConfig(rank=rank, n_heads=heads, scaling=alpha / rank, router="token", dropout=self.lora_dropout,
                          stash_probs=self.balance_weight > 0)


def prepare_hydralora(model: nn.Module, settings: HydraLoraSettings, ctx: MethodContext) -> nn.Module:
    """Wrap every target of ``model`` (in place) with a HydraLoRA layer; only A, the B_i and the routers train.

    Args:
        model: a transformers model.
        settings: heads, rank, targets...
        ctx: only ``ctx.seed`` is used (a private generator; the global RNG is left alone).

    Returns:
        ``model``, in the caller's train/eval mode.
    """
    targets = find_targets(model, settings.target_modules)
    check_rank(targets, int(settings.rank), "HydraLoraSettings")  # type: ignore[arg-type]
    inject_(model, targets, settings.head_config(), AdapterContext("hydralora", settings), ctx.seed)
    return model


def switch_balance_loss(probs: Tensor) -> Tensor:
    """Switch-Transformer load balance N · Σ_i f_i · P_i of routing weights ``probs`` (T, N).

    f_i is the share of the T tokens whose largest weight is head i (no gradient), P_i the mean weight of head i.
    It is 1 for a uniform router and N when every token goes to one head.
    """
    n_heads = probs.shape[-1]
    share = torch.nn.functional.one_hot(probs.argmax(-1), n_heads).to(probs.dtype).mean(0)  # (N,)
    return n_heads * (share * probs.mean(0)).sum()


def hydralora_regularizer(model: nn.Module, settings: HydraLoraSettings, batch: dict[str, Any]) -> Tensor:
    """balance_weight · the Switch loss averaged over the adapted layers (of the last training forward); a zero
    scalar when the weight is 0 or nothing was routed."""
    if settings.balance_weight == 0:
        return zero_loss(batch)
    probs = take_routing_probs(model)
    if not probs:
        return zero_loss(batch)
    losses = [switch_balance_loss(routed_tokens(p, batch).flatten(0, -2)) for p in probs]
    return settings.balance_weight * torch.stack(losses).mean()


def hydralora_param_count(model: nn.Module, settings: HydraLoraSettings) -> int:
    """Σ over targets of r·d_in + N·r·d_out + N·d_in (router; none when N = 1)."""
    cfg = settings.head_config()
    return sum(cfg.param_count(t.d_in, t.d_out) for t in find_targets(model, settings.target_modules).values())


def load_hydralora(model: nn.Module, folder: Path) -> nn.Module:
    """Rebuild HydraLoRA on the fresh base ``model`` from a folder written by `save` (`thanora.adapters.native`)."""
    return load_native(model, folder, HYDRALORA)


HYDRALORA = Method(
    name="hydralora",
    paper="Tian et al., HydraLoRA: An Asymmetric LoRA Architecture for Efficient Fine-Tuning, NeurIPS 2024 "
          "(arXiv:2404.19245)",
    config_cls=HydraLoraSettings,
    mergeable=False,
    task_id_at_train=False,
    task_id_at_test=False,
    prepare=prepare_hydralora,
    regularizer=hydralora_regularizer,
    export=None,
    save=save_multihead,
    load=load_hydralora,
    param_count=hydralora_param_count,
)
