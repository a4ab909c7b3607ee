"""The one place a PEFT `LoraConfig` is built: every method's injection, DARE's merged adapter and every export.

Callers give the targets (full dotted names, so PEFT never matches a suffix elsewhere, e.g. in a vision tower), the
rank and alpha, and optionally per-module patterns; this module fills in what follows from the model: the task type
and ``fan_in_fan_out`` (GPT-2's `Conv1D` stores its weight (d_in, d_out)).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from peft import LoraConfig, PeftModel
from torch import nn

from thanora.adapters.record import unwrap


def task_type(model: nn.Module) -> str | None:
    """PEFT's task type of ``model`` (a transformers model, or a `PeftModel` around one): ``"CAUSAL_LM"`` for a
    ``*ForCausalLM``, else ``None`` (vision-language models: PEFT's generic `PeftModel`)."""
    inner = unwrap(model)
    if isinstance(inner, PeftModel):
        inner = inner.get_base_model()
    return "CAUSAL_LM" if type(inner).__name__.endswith("ForCausalLM") else None


def lora_config(model: nn.Module, targets: Iterable[str], rank: int, alpha: float, dropout: float, *,
                fan_in_fan_out: bool, use_dora: bool = False, rank_pattern: Mapping[str, int] | None = None,
                alpha_pattern: Mapping[str, float] | None = None, base_model_name_or_path: str | None = None
                ) -> LoraConfig:
    """PEFT's `LoraConfig` for ``targets`` of ``model``.

    Args:
        model: the model the adapter is for (its class gives the task type).
        targets: full dotted module names.
        rank: default rank r.
        alpha: default lora_alpha (scaling alpha / r).
        dropout: dropout on the adapter input during training.
        fan_in_fan_out: the targets store their weight (d_in, d_out) (GPT-2's `Conv1D`).
        use_dora: PEFT's DoRA (a trainable magnitude per output feature).
        rank_pattern: ``{module: rank}`` where it differs from ``rank``.
        alpha_pattern: ``{module: alpha}`` where it differs from ``alpha``.
        base_model_name_or_path: recorded in ``adapter_config.json`` (``None``: PEFT fills it in on injection).
    """
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(targets),
        fan_in_fan_out=fan_in_fan_out,
        bias="none",
        use_dora=use_dora,
        rank_pattern=dict(rank_pattern or {}),
        alpha_pattern=dict(alpha_pattern or {}),
        task_type=task_type(model),
        base_model_name_or_path=base_model_name_or_path,
    )
