"""Export a prepared (and trained) model as a stock PEFT LoRA adapter on the *original* base: SPEC.md §7.

With a residual base the trained update relative to the original weight is ΔW = s·(B·A − B₀·A₀), written as one LoRA
with A' = [A; A₀] and B' = [B, −B₀] (PEFT's own PiSSA/CorDA conversion): rank 2R and ``lora_alpha`` = s·2R for every
module, the cooperative block's columns of B₀ kept as exact zeros. One rank and one scale is what serving engines
read: vLLM keeps only ``r`` / ``lora_alpha`` (it drops ``rank_pattern`` / ``alpha_pattern`` silently), SGLang refuses
patterns that change a module's rank, llama.cpp's converter scales each tensor by the global alpha over its own rank,
LoRAX / TGI stack the layers' tensors. ``trimmed=True`` drops the zero columns instead (rank 2R − r_coop per module,
kept right for PEFT by ``rank_pattern`` / ``alpha_pattern``): smaller, but read correctly by PEFT only. A sidecar
``thanora_adapter.json`` (ignored by PEFT) holds the block table, rank plan, entropies and resolved config.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import save_file
from torch import nn

from thanora.adapters.peft_config import lora_config
from thanora.adapters.record import adapter_of, lora_factors
from thanora.artifacts import atomic_dir
from thanora.core.allocation import COOP

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
SIDECAR = "thanora_adapter.json"


def converted_factors(model: nn.Module, trimmed: bool = False) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module ``(lora_A', lora_B')`` expressing the trained update relative to the original base weight.

    Args:
        model: a model returned by `prepare_model`.
        trimmed: drop the cooperative block's zero columns of B₀ (rank 2R − r_coop per module) instead of keeping
            every module at rank 2R.

    Returns:
        ``{module: (A' (r', d_in), B' (d_out, r'))}`` detached on CPU, in the adapter's dtype.
    """
    adapter = adapter_of(model)
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in adapter.targets:
        A, B = (t.detach().cpu() for t in lora_factors(model, name))
        if adapter.config.residual:
            A0, B0 = adapter.initial[name]
            keep = adapter.blocks[name][COOP][0] if trimmed else A0.shape[0]  # B₀[:, n_task:] (coop) is zero
            A = torch.cat([A, A0[:keep].to(A)], dim=0)
            B = torch.cat([B, -B0[:, :keep].to(B)], dim=1)
        factors[name] = (A.contiguous(), B.contiguous())
    return factors


def export_adapter(model: nn.Module, out_dir: str | Path, trimmed: bool = False) -> Path:
    """Write a PEFT LoRA adapter that stock `PeftModel.from_pretrained` loads on the original base model.

    Args:
        model: a model returned by `prepare_model` (merged or not).
        out_dir: destination folder (replaced atomically if it exists).
        trimmed: the smaller per-module-rank form (see the module docstring: PEFT reads it, serving engines do not).

    Returns:
        ``out_dir``.
    """
    adapter = adapter_of(model)
    cfg = adapter.config
    return write_lora_adapter(out_dir, converted_factors(model, trimmed), cfg.scaling, model=model,
                              dropout=cfg.lora_dropout,
                              fan_in_fan_out=any(t.fan_in_fan_out for t in adapter.targets.values()),
                              base_model_name_or_path=adapter.base_model_name_or_path,
                              sidecar=sidecar(model, trimmed))


def write_lora_adapter(out_dir: str | Path, factors: Mapping[str, tuple[torch.Tensor, torch.Tensor]], scaling: float,
                       *, model: nn.Module, dropout: float, fan_in_fan_out: bool,
                       base_model_name_or_path: str | None, sidecar: Mapping[str, Any]) -> Path:
    """Write ``factors`` as a stock PEFT LoRA adapter with scaling ``scaling`` for every module, plus a sidecar.

    The most common rank is the config's ``r`` (``lora_alpha = scaling · r``); modules of another rank get
    ``rank_pattern`` / ``alpha_pattern`` entries (full dotted names) that keep alpha'/r' = ``scaling``. Every
    exporting method writes its adapter through here (ThanoRA and CorDA, R-LoRA+).

    Args:
        out_dir: destination folder (replaced atomically if it exists).
        factors: ``{module: (lora_A (r, d_in), lora_B (d_out, r))}`` relative to the original base weights.
        scaling: s of every module.
        model: the model the adapter belongs to (task type).
        dropout: recorded lora_dropout.
        fan_in_fan_out: the targets store their weight (d_in, d_out).
        base_model_name_or_path: recorded in ``adapter_config.json``.
        sidecar: written as ``thanora_adapter.json`` (ignored by PEFT).

    Returns:
        ``out_dir``.
    """
    ranks = {name: A.shape[0] for name, (A, _) in factors.items()}
    default_rank = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {name: r for name, r in ranks.items() if r != default_rank}
    config = lora_config(model, factors, default_rank, scaling * default_rank, dropout, fan_in_fan_out=fan_in_fan_out,
                         rank_pattern=rank_pattern, alpha_pattern={n: scaling * r for n, r in rank_pattern.items()},
                         base_model_name_or_path=base_model_name_or_path)
    state = {}
    for name, (A, B) in factors.items():
        state[f"base_model.model.{name}.lora_A.weight"] = A
        state[f"base_model.model.{name}.lora_B.weight"] = B
    out_dir = Path(out_dir)
    with atomic_dir(out_dir, "adapter") as tmp:
        save_file(state, str(tmp / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        config.save_pretrained(str(tmp))
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=2) + "\n", encoding="utf-8")
    return out_dir


def sidecar(model: nn.Module, trimmed: bool = False) -> dict[str, Any]:
    """The metadata written next to the adapter: config, rank plan, entropies, block tables, conversion."""
    adapter = adapter_of(model)
    return {
        "format": "thanora-adapter/1",
        "peft_version": peft.__version__,
        "base_model_name_or_path": adapter.base_model_name_or_path,
        "conversion": (f"residual A'=[A;A0], B'=[B,-B0] ("
                       f"{'coop columns of B0 dropped' if trimmed else 'rank 2R, coop columns of B0 kept as zeros'})"
                       if adapter.config.residual else "none (no residual base)"),
        "config": adapter.config.to_dict(),
        "rank_plan": adapter.plan.to_dict(),
        "blocks": {name: {k: list(v) for k, v in table.items()} for name, table in adapter.blocks.items()},
    }
