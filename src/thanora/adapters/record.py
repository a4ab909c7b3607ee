"""What a method keeps beside a prepared model's layers, and the one way to attach it to the model and find it again.

A method with per-model state (ThanoRA's block tables and initial factors, DARE's task adapters and merge, Align-LoRA's
activation capture) attaches one record with `attach_record` and reads it back with `find_record`; no other code sets
attributes on a model. The records live in one plain dict in the model's ``__dict__`` under `RECORDS` (not a
submodule, buffer or parameter: invisible to ``state_dict``, ``named_modules`` and PEFT), keyed by the record's type,
so they follow the model through ``copy.deepcopy``. DDP / accelerate wrappers are looked through with accelerate's
`extract_model_from_parallel`.

This module also holds ThanoRA's record, `ThanoraAdapter`, and the accessors of its live factors (`lora_factors`,
`spr_terms`): a leaf below the injection (`thanora.adapters.layers`), the export and the save/unload policy, which all
read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TypeVar

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn

from thanora.core.allocation import RankPlan
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.regularizers import task_pair_mask
from thanora.core.targets import Target

ADAPTER_NAME = "default"  # PEFT's adapter name of ThanoRA's single LoRA adapter
RECORDS = "_thanora_records"

R = TypeVar("R")


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without its DDP / DataParallel / ``torch.compile`` wrapper (accelerate's own unwrapping)."""
    return extract_model_from_parallel(model)


def attach_record(model: nn.Module, record: object) -> None:
    """Attach ``record`` to ``model`` (replacing a record of the same type)."""
    unwrap(model).__dict__.setdefault(RECORDS, {})[type(record)] = record


def find_record(model: nn.Module, kind: type[R], prepared_by: str) -> R:
    """The record of type ``kind`` attached to ``model``.

    Args:
        model: a prepared model, possibly wrapped by DDP / accelerate.
        kind: the record's type.
        prepared_by: what prepares such a model, for the error message.

    Raises:
        TypeError: ``model`` has no such record.
    """
    record = unwrap(model).__dict__.get(RECORDS, {}).get(kind)
    if record is None:
        raise TypeError(f"{type(unwrap(model)).__name__} was not prepared by {prepared_by} (no {kind.__name__})")
    return record


@dataclass(frozen=True)
class ThanoraAdapter:
    """What thanora keeps beside the PEFT LoRA layers of a model prepared by `thanora.prepare_model` (or CorDA).

    Attributes:
        config: the resolved `ThanoraConfig`.
        plan: the rank plan (tasks, per-module ranks, entropies).
        targets: the adapted modules.
        blocks: ``{module: {task: (start, stop), COOP: (start, stop)}}``.
        initial: ``{module: (A₀ (R, d_in), B₀ (d_out, R))}`` on CPU; empty when ``config.residual`` is False.
        base_model_name_or_path: the original base model id or path (written into exported adapters).
        spr_weights: per-module factor of the SPR term (1, or 1/SPR at init with ``spr_normalization="init"``).
        layers: ``{module: its PEFT LoraLayer}`` in target order (resolved once, not on every training step).
    """

    config: ThanoraConfig
    plan: RankPlan
    targets: dict[str, Target]
    blocks: dict[str, dict[str, tuple[int, int]]]
    initial: dict[str, tuple[torch.Tensor, torch.Tensor]]
    base_model_name_or_path: str | None
    spr_weights: dict[str, float]
    layers: dict[str, nn.Module] = field(default_factory=dict, repr=False, compare=False)
    _gram_weights: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False)

    def spr_mask(self, name: str) -> torch.Tensor:
        """The (n, n) boolean task-pair mask of module ``name`` (n = end of its last task block)."""
        return task_pair_mask(self.blocks[name], self.plan.tasks)

    def gram_weights(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(M, R, R): each module's SPR weight on its task-pair mask, zero elsewhere, in target order; built once per
        device and dtype (in float64 first: a normalised weight can be ~1e-14)."""
        key = (device, dtype)
        if key not in self._gram_weights:
            rank = self.config.rank
            stack = torch.zeros(len(self.targets), rank, rank, dtype=torch.float64)
            for i, name in enumerate(self.targets):
                mask = self.spr_mask(name)
                stack[i, : mask.shape[0], : mask.shape[1]] = self.spr_weights[name] * mask.to(torch.float64)
            self._gram_weights[key] = stack.to(device=device, dtype=dtype)
        return self._gram_weights[key]


def adapter_of(model: nn.Module) -> ThanoraAdapter:
    """The `ThanoraAdapter` of a model returned by `prepare_model` (also through DDP/accelerate wrappers).

    Raises:
        TypeError: the model was not prepared by thanora.
    """
    return find_record(model, ThanoraAdapter, "thanora.prepare_model")


def lora_layer(model: nn.Module, name: str) -> nn.Module:
    """The PEFT `LoraLayer` that wraps target ``name`` of a prepared model."""
    return adapter_of(model).layers[name]


def lora_factors(model: nn.Module, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The live (trainable) ``(lora_A (R, d_in), lora_B (d_out, R))`` parameters of target ``name``."""
    layer = lora_layer(model, name)
    return layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight


def spr_terms(model: nn.Module) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Every target's live ``(lora_A, lora_B)`` in target order and the (M, R, R) weights of their Gram entries
    (`ThanoraAdapter.gram_weights`, on the factors' device and dtype): what `thanora.spr_loss` needs."""
    adapter = adapter_of(model)
    factors = [(layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight)
               for layer in adapter.layers.values()]
    A = factors[0][0]
    return factors, adapter.gram_weights(A.device, A.dtype)
