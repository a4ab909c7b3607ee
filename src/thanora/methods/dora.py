"""DoRA (Liu et al., 2024) through PEFT's own ``LoraConfig(use_dora=True)``: LoRA plus a learned magnitude.

Paper and code (PEFT) agree: W' = m · (W + s·B·A) / ‖W + s·B·A‖, the norm taken per output feature (over the input
dimension: one value per row of the (d_out, d_in) weight; PEFT transposes `Conv1D` first) and detached from the
gradient, m (d_out) initialised to the norms of W, A Kaiming-uniform, B zero, so the start equals the base model.
Nothing is re-implemented here: `thanora.methods.lora.prepare_lora` with ``use_dora=True`` builds it, and merging,
saving and loading are PEFT's. Defaults are LoRA's (rank 64, alpha = rank, dropout 0.05, every linear layer of the
language model); trainable parameters per module: r·(d_in + d_out) + d_out.
"""

from __future__ import annotations

from dataclasses import dataclass

from peft import PeftModel
from torch import nn

from thanora.core.targets import find_targets
from thanora.methods.base import Method, MethodContext
from thanora.methods.lora import LoraSettings, load_peft_adapter, lora_param_count, prepare_lora, save_lora


@dataclass(frozen=True)
class DoraSettings(LoraSettings):
    """Settings of DoRA: exactly LoRA's (`LoraSettings`: rank, lora_alpha, lora_dropout, target_modules)."""


def prepare_dora(model: nn.Module, settings: DoraSettings, ctx: MethodContext) -> PeftModel:
    """PEFT LoRA layers with DoRA's magnitude vector (A seeded by ``ctx.seed``, global RNG untouched)."""
    return prepare_lora(model, settings, ctx, use_dora=True)


def dora_param_count(model: nn.Module, settings: DoraSettings) -> int:
    """r·(d_in + d_out) + d_out summed over the targets (the LoRA factors and the magnitude vector)."""
    targets = find_targets(model, settings.target_modules)
    return lora_param_count(model, settings) + sum(t.d_out for t in targets.values())


DORA = Method(
    name="dora",
    paper="Liu et al., DoRA: Weight-Decomposed Low-Rank Adaptation, ICML 2024 (arXiv:2402.09353)",
    config_cls=DoraSettings,
    mergeable=True,
    task_id_at_train=False,
    task_id_at_test=False,
    prepare=prepare_dora,
    regularizer=None,
    export=save_lora,
    save=save_lora,
    load=load_peft_adapter,
    param_count=dora_param_count,
)
