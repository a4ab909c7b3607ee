"""Put ThanoRA's factors into a model as ordinary PEFT LoRA layers. The only file that sets attributes on modules.

ThanoRA is a rank-R LoRA per module whose rank dimension is cut into task blocks and a cooperative block (SPEC.md
§7), so PEFT's `LoraLayer` already does the forward pass, dropout, `Conv1D` transposes, merging and unmerging. What
thanora adds lives in a `ThanoraAdapter` record attached to the returned `PeftModel`: the block tables, the rank plan
and, for the residual base, the initial factors needed to export relative to the original weights.

The residual base (W_res = W − s·B₀A₀) makes the in-memory adapter wrong on the original model. So the returned
model's class is a thin subclass whose `save_pretrained` writes the *converted* adapter (`thanora.export_adapter`)
and whose `unload` is refused: the unconverted adapter can never be written, and the residual base never passes
for the original one.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from thanora.allocation import RankPlan
from thanora.hasi_config import ThanoraConfig
from thanora.initialize import ModuleInit
from thanora.regularizers import spr_penalty, task_pair_mask
from thanora.targets import Target, set_weight_matrix_, weight_matrix

logger = logging.getLogger(__name__)

ADAPTER_NAME = "default"
_MASK_BUFFER = "thanora_spr_mask"
_SPR_WEIGHTS_BUFFER = "thanora_spr_weights"  # (M, R, R) on the PeftModel: spr weight × task-pair mask, zero-padded
_LAYERS_ATTR = "_thanora_lora_layers"  # the M LoRA layers in target order (resolved once, not per step)


class ResidualBaseError(RuntimeError):
    """An operation would treat the residual base as the original model."""


@dataclass(frozen=True)
class ThanoraAdapter:
    """What thanora keeps beside the PEFT LoRA layers of a prepared model.

    Attributes:
        config: the resolved `ThanoraConfig`.
        plan: the rank plan (tasks, per-module ranks, entropies).
        targets: the adapted modules.
        blocks: ``{module: {task: (start, stop), COOP: (start, stop)}}``.
        initial: ``{module: (A₀ (R, d_in), B₀ (d_out, R))}`` on CPU; empty when ``config.residual`` is False.
        spr_weights: per-module factor of the SPR term (1, or 1/SPR at init with ``spr_normalization="init"``).
        base_model_name_or_path: the original base model id or path (written into exported adapters).
    """

    config: ThanoraConfig
    plan: RankPlan
    targets: dict[str, Target]
    blocks: dict[str, dict[str, tuple[int, int]]]
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_model_name_or_path: str | None
    spr_weights: dict[str, float]


def inject_(
    model: nn.Module,
    targets: Mapping[str, Target],
    inits: Mapping[str, ModuleInit],
    plan: RankPlan,
    cfg: ThanoraConfig,
) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA layers holding the HASI factors (and the residual base if configured).

    Args:
        model: the pretrained model (modified in place, as `get_peft_model` does).
        targets: the adapted modules.
        inits: the initial factors from `hasi_factors`.
        plan: the rank plan.
        cfg: rank, alpha, dropout, residual switch.

    Returns:
        The `PeftModel` (only the LoRA factors are trainable), with its `ThanoraAdapter` attached.
    """
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    lora_config = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=list(targets),
        fan_in_fan_out=any(t.fan_in_fan_out for t in targets.values()),
        bias="none",
        task_type=_task_type(model),
        base_model_name_or_path=name_or_path,
    )
    peft_model = get_peft_model(model, lora_config)
    base = peft_model.base_model.model
    with torch.no_grad():
        for name, init in inits.items():
            layer = base.get_submodule(name)
            lora_A, lora_B = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            lora_A.copy_(init.lora_A.to(lora_A))
            lora_B.copy_(init.lora_B.to(lora_B))
            layer.register_buffer(_MASK_BUFFER, task_pair_mask(init.blocks, plan.tasks), persistent=False)
            if cfg.residual:
                W = weight_matrix(layer.base_layer)
                W = W.to(torch.promote_types(W.dtype, torch.float32))  # at least float32; float64 stays float64
                delta = cfg.scaling * (init.lora_B.to(W) @ init.lora_A.to(W))  # (d_out, d_in)
                set_weight_matrix_(layer.base_layer, W - delta)
    adapter = ThanoraAdapter(
        config=cfg,
        plan=plan,
        targets=dict(targets),
        blocks={name: dict(init.blocks) for name, init in inits.items()},
        initial={n: (i.lora_A.clone(), i.lora_B.clone()) for n, i in inits.items()} if cfg.residual else {},
        base_model_name_or_path=name_or_path,
        spr_weights={name: _spr_weight(init, plan, cfg) for name, init in inits.items()},
    )
    peft_model.__class__ = _guarded_class(type(peft_model))
    peft_model.thanora_adapter = adapter
    layers = [base.get_submodule(name) for name in inits]
    object.__setattr__(peft_model, _LAYERS_ATTR, layers)  # a plain list: not registered as submodules twice
    stack = torch.zeros(len(layers), cfg.rank, cfg.rank, dtype=torch.float64)  # weights can be ~1e-14
    for i, (name, layer) in enumerate(zip(inits, layers, strict=True)):
        mask = getattr(layer, _MASK_BUFFER)
        stack[i, : mask.shape[0], : mask.shape[1]] = adapter.spr_weights[name] * mask.to(torch.float64)
    peft_model.register_buffer(_SPR_WEIGHTS_BUFFER, stack.to(next(iter(layers)).lora_A[ADAPTER_NAME].weight.device),
                               persistent=False)
    logger.info("injected ThanoRA (R=%d, %d modules, %d tasks, residual=%s)", cfg.rank, len(inits),
                len(plan.tasks), cfg.residual)
    return peft_model


def adapter_of(model: nn.Module) -> ThanoraAdapter:
    """The `ThanoraAdapter` of a model returned by `prepare_model` (also through DDP/accelerate wrappers).

    Raises:
        TypeError: the model was not prepared by thanora.
    """
    inner = getattr(model, "module", model)  # DistributedDataParallel
    adapter = getattr(inner, "thanora_adapter", None)
    if not isinstance(adapter, ThanoraAdapter):
        raise TypeError(f"{type(model).__name__} was not prepared by thanora.prepare_model (no ThanoraAdapter)")
    return adapter


def lora_layer(model: nn.Module, name: str) -> nn.Module:
    """The PEFT `LoraLayer` that wraps target ``name`` of a prepared model."""
    inner = getattr(model, "module", model)
    return inner.base_model.model.get_submodule(name)


def lora_factors(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The live (trainable) ``(lora_A (R, d_in), lora_B (d_out, R))`` parameters of target ``name``."""
    layer = lora_layer(model, name)
    return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight


def spr_terms(model: nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every target's live ``(lora_A, lora_B)`` in target order and the (M, R, R) weights of their Gram entries
    (the module's SPR weight on its task-pair mask, zero elsewhere): what `thanora.prepare.spr_loss` needs, without
    resolving module names on every training step."""
    inner = getattr(model, "module", model)
    adapter_of(inner)
    layers = getattr(inner, _LAYERS_ATTR)
    factors = [(layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight) for layer in layers]
    return factors, getattr(inner, _SPR_WEIGHTS_BUFFER)


def spr_mask(model: nn.Module, name: str) -> torch.Tensor:
    """The (n, n) task-pair mask of target ``name`` (a non-persistent buffer: it follows the model's device)."""
    return getattr(lora_layer(model, name), _MASK_BUFFER)


def _spr_weight(init: ModuleInit, plan: RankPlan, cfg: ThanoraConfig) -> float:
    if cfg.spr_normalization == "none":
        return 1.0
    value = float(spr_penalty(init.lora_A.double(), init.lora_B.double(), task_pair_mask(init.blocks, plan.tasks)))
    return 1.0 / value if value > 0 else 1.0


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None


@functools.cache
def _guarded_class(cls: type[PeftModel]) -> type[PeftModel]:
    """A subclass of ``cls`` whose save writes the converted adapter and whose unload refuses a residual base."""

    def save_pretrained(self: PeftModel, save_directory: str | Path, **kwargs: Any) -> None:
        from thanora.export import export_adapter  # export builds on this module

        if kwargs:
            logger.warning("save_pretrained: ignoring %s; thanora writes the converted adapter", sorted(kwargs))
        export_adapter(self, save_directory)

    def unload(self: PeftModel, *args: Any, **kwargs: Any) -> nn.Module:
        if not adapter_of(self).config.residual:
            return self.base_model.unload(*args, **kwargs)  # PeftModel forwards unload to its LoraModel
        raise ResidualBaseError(
            "unload() would return the residual base W - s·B0·A0, not the original model; use "
            "thanora.merge_(model) then model.merge_and_unload() for a merged model, or reload the original base"
        )

    return type(f"Thanora{cls.__name__}", (cls,), {
        "save_pretrained": save_pretrained, "unload": unload, "__module__": __name__,
    })
