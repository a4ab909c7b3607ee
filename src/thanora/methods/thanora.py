"""ThanoRA (Liang et al., 2025) as a `Method`: HASI initialisation from calibration data, SPR during training.

Settings are `thanora.ThanoraConfig`; ``spr_lambda: 0`` is the "HASI only" ablation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from thanora.export import export_adapter
from thanora.hasi_config import ThanoraConfig
from thanora.layers import adapter_of, lora_factors
from thanora.methods import Method, MethodContext
from thanora.methods.lora import load_peft_adapter, lora_param_count
from thanora.prepare import prepare_model, spr_loss
from thanora.regularizers import block_overlap


def prepare_thanora(model: nn.Module, config: ThanoraConfig, ctx: MethodContext) -> nn.Module:
    """Calibration statistics → spectra → rank plan → HASI factors in PEFT LoRA layers (`thanora.prepare_model`).

    Args:
        model: a transformers model, modified in place.
        config: ThanoRA's settings.
        ctx: ``calibration`` (required: ``{task: batches}`` on the model's device, this process's shard),
            ``cache_dir``, ``calibration_key``, ``all_reduce`` and ``progress``.

    Returns:
        The prepared `PeftModel`.
    """
    if not ctx.calibration:
        raise ValueError("ThanoRA needs calibration batches: MethodContext.calibration is empty")
    return prepare_model(model, ctx.calibration, config, cache_dir=ctx.cache_dir, calibration_key=ctx.calibration_key,
                         all_reduce=ctx.all_reduce, progress=ctx.progress)


def spr_regularizer(model: nn.Module, config: ThanoraConfig, batch: dict[str, Any]) -> Tensor:
    """λ · SPR of the model (SPEC.md §5); the batch is not used. A zero scalar when λ = 0 (nothing computed).

    Returns:
        A float32 scalar tensor on the device of ``batch["input_ids"]`` (λ = 0), else in the factors' dtype.
    """
    if config.spr_lambda == 0:
        ids = batch.get("input_ids")
        return torch.zeros((), device=ids.device if isinstance(ids, Tensor) else None)
    return config.spr_lambda * spr_loss(model)


def export_thanora(model: nn.Module, out_dir: Path) -> None:
    """Write the converted stock PEFT adapter on the original base (`thanora.export_adapter`)."""
    export_adapter(getattr(model, "module", model), out_dir)


def describe_thanora(model: nn.Module) -> dict[str, Any]:
    """``rank_plan.json`` (plan + entropies) and ``overlap.json`` (task-block overlap at init and now, per module)."""
    adapter = adapter_of(model)
    tasks = list(adapter.plan.tasks)
    before, after = {}, {}
    for name in adapter.targets:
        blocks = adapter.blocks[name]
        A, B = lora_factors(model, name)
        after[name] = block_overlap(A, B, blocks, tasks)
        if adapter.initial:
            before[name] = block_overlap(*adapter.initial[name], blocks, tasks)
    overlap = {"tasks": tasks, "after": after, **({"before": before} if before else {})}
    return {"rank_plan.json": adapter.plan.to_dict(), "overlap.json": overlap}


THANORA = Method(
    name="thanora",
    paper="Liang et al., ThanoRA: Task Heterogeneity-Aware Multi-Task Low-Rank Adaptation, 2025 (arXiv:2505.18640)",
    config_cls=ThanoraConfig,
    mergeable=True,
    task_id_at_train=False,
    task_id_at_test=False,
    prepare=prepare_thanora,
    regularizer=spr_regularizer,
    export=export_thanora,
    save=export_thanora,
    load=load_peft_adapter,
    param_count=lora_param_count,
    describe=describe_thanora,
)
