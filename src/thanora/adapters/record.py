"""What a method keeps beside a prepared model's layers, and the one way to attach it to the model and find it again.

A method with per-model state (ThanoRA's block tables and initial factors, DARE's task adapters and merge, Align-LoRA's
activation capture) attaches one record with `attach_record` and reads it back with `find_record`; no other code sets
attributes on a model. The records live in one plain dict in the model's ``__dict__`` under `RECORDS` (not a
submodule, buffer or parameter: invisible to ``state_dict``, ``named_modules`` and PEFT), keyed by the record's type,
so they follow the model through ``copy.deepcopy``. DDP / DataParallel / ``torch.compile`` wrappers are looked
through (`unwrap`).

This module also holds ThanoRA's record, `ThanoraAdapter`, and the accessors of its live factors (`lora_factors`,
`spr_terms`): a leaf below the injection (`thanora.adapters.layers`), the export and the save/unload policy, which all
read it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn
from torch.nn.parallel import DataParallel, DistributedDataParallel

from thanora.core.allocation import RankPlan
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.regularizers import SprGroup, later_task_spans, task_end, task_pair_mask
from thanora.core.targets import Target

ADAPTER_NAME = "default"  # PEFT's adapter name of ThanoRA's trained LoRA adapter
RESIDUAL_ADAPTER = "thanora_residual"  # the frozen −s·B₀A₀ adapter of residual_mode "branch"
RECORDS = "_thanora_records"
MAX_LAYOUTS = 4  # block layouts per factor shape up to which SPR forms the cross-task products of each layout

R = TypeVar("R")


def unwrap(model: nn.Module) -> nn.Module:
    """``model`` without its DDP / DataParallel / ``torch.compile`` wrappers.

    Not accelerate's ``extract_model_from_parallel``, which does the same and then scans every submodule for
    compiled regions on each call (2 ms on SmolLM2, measured): this runs on every training step, through the records
    of the methods' regularisers.
    """
    while True:
        if isinstance(model, DistributedDataParallel | DataParallel):
            model = model.module
        elif isinstance(model.__dict__.get("_orig_mod"), nn.Module):  # torch.compile's OptimizedModule
            model = model.__dict__["_orig_mod"]
        else:
            return model


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
    _spr_groups: dict[tuple[torch.device, torch.dtype], list[tuple[str, tuple[str, ...], torch.Tensor]]] = field(
        default_factory=dict, repr=False, compare=False)

    def spr_mask(self, name: str) -> torch.Tensor:
        """The (n, n) boolean task-pair mask of module ``name`` (n = end of its last task block)."""
        return task_pair_mask(self.blocks[name], self.plan.tasks)

    def spr_groups(self, device: torch.device, dtype: torch.dtype) -> list[tuple[str, tuple[str, ...], Any]]:
        """``(kind, module names, weights (g,) or masks (g, n, n))`` per group of modules whose ``kind`` factor ("A"
        or "B") has the same shape: one group per block layout where a shape has at most `MAX_LAYOUTS` of them
        (cross-task products), else one masked group (`thanora.core.regularizers.SprGroup`); built once per device
        and dtype (in float64 first: a normalised weight can be ~1e-14)."""
        key = (device, dtype)
        if key not in self._spr_groups:
            tasks = self.plan.tasks
            by_shape: dict[tuple[str, int], dict[tuple[Any, ...], list[str]]] = {}
            for name, target in self.targets.items():
                layout = tuple(self.blocks[name][t] for t in tasks)
                for kind, dim in (("A", target.d_in), ("B", target.d_out)):
                    by_shape.setdefault((kind, dim), {}).setdefault(layout, []).append(name)
            groups: list[tuple[str, tuple[str, ...], Any]] = []
            for (kind, _), layouts in by_shape.items():
                if len(layouts) <= MAX_LAYOUTS:
                    for names in layouts.values():
                        weights = torch.tensor([self.spr_weights[n] for n in names], dtype=torch.float64)
                        groups.append((kind, tuple(names), weights.to(device=device, dtype=dtype)))
                    continue
                names = [n for members in layouts.values() for n in members]
                n_max = max(self.spr_mask(n).shape[0] for n in names)
                masks = torch.zeros(len(names), n_max, n_max, dtype=torch.float64)
                for i, name in enumerate(names):
                    mask = self.spr_mask(name)
                    masks[i, : mask.shape[0], : mask.shape[1]] = self.spr_weights[name] * mask.to(torch.float64)
                groups.append((kind, tuple(names), masks.to(device=device, dtype=dtype)))
            self._spr_groups[key] = groups
        return self._spr_groups[key]


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


def spr_groups(model: nn.Module) -> list[SprGroup]:
    """The live factors of every target, grouped for `thanora.core.regularizers.grouped_spr` (what
    `thanora.spr_loss` computes), without resolving module names on every training step."""
    adapter = adapter_of(model)
    first = next(iter(adapter.layers.values())).lora_A[ADAPTER_NAME].weight
    groups = []
    for kind, names, weights in adapter.spr_groups(first.device, first.dtype):
        table = adapter.blocks[names[0]]
        factors = tuple(lora_factors(model, n)[0 if kind == "A" else 1] for n in names)
        masked = weights.dim() == 3  # a group of several layouts: its weighted masks
        groups.append(SprGroup(kind, factors, later_task_spans(table, adapter.plan.tasks),
                               task_end(table, adapter.plan.tasks), weights.new_zeros(0) if masked else weights,
                               weights if masked else None))
    return groups
