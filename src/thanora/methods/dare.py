"""DARE (Yu et al., 2024): one LoRA per task, trained on its own task's samples, then merged by drop-and-rescale.

Training: T PEFT LoRA adapters, one per task (adapter name ``task_<name>``, task order = ``ctx.calibration``'s order =
the ``task_id`` of the training batches), all active in one model and trained jointly in the one training loop, but
each sample goes through its own task's adapter only: every LoRA layer gets PEFT's mixed-batch ``adapter_names`` (the
rows of task t through adapter t only; one adapter pass per sample, LoRA's cost and memory at any T), and the
"regulariser" is a zero touching the adapters of tasks absent from the batch, so they get zero gradients (DDP needs a
gradient for every parameter). So adapter t's gradient comes only from task t's samples, as if the adapters were
trained separately on the same data; the remaining couplings are the optimiser's: one global gradient-clipping norm,
one learning-rate schedule, the task loss averaged over all tokens of a mixed batch (a task's gradient is scaled by
its share of the batch's tokens), and Adam moving an adapter by its momentum on a step without its task's samples.
(PEFT refuses ``adapter_names`` in training at the PeftModel level because its own hooks are inference-only; the
layer-level mixed-batch forward it calls is plain differentiable indexing, used here through our own pre-hook.)
A forward without ``task_id`` (evaluation before `finalize`, ``generate``) sends every sample through Σ_t w_t·ΔW_t,
the merge's expectation.

Merge (`finalize`, in ΔW space, per module): ΔW_t = s_t·B_t·A_t; every entry kept with probability p = ``density``
and rescaled by 1/p (masks drawn from a generator seeded by ``drop_seed`` and the module index); ΔW = Σ_t w_t·ΔW̃_t
with w_t = 1/T by default; then the best rank-``svd_rank`` approximation (truncated SVD, default rank = Σ_t r_t = the
``rank`` budget, capped at min(d_in, d_out), zero-padded back to it so every module has one rank and one scale, what
serving engines read) becomes one ordinary PEFT LoRA adapter on the original base (alpha = rank, B = U·√S, A = √S·Vᵀ).
The relative Frobenius error of that truncation is recorded per module (``dare.json`` in the
run folder and ``dare_merge.json`` beside the exported adapter). The model `finalize` returns holds exactly the
exported adapter, so what is evaluated is what is exported.

Paper vs code: the paper merges fully fine-tuned task vectors with task arithmetic and a scaling searched on
validation data; PEERS.md fixes the LoRA variant (ΔW_t of per-task LoRAs, weights 1/T, density 0.5). PEFT's
``add_weighted_adapter(combination_type="dare_linear")`` drops entries of the stacked A and B factors, not of ΔW
(wrong), and breaks with ``rank_pattern`` (PEERS.md). PEFT's ``dare_linear_svd`` computes the same ΔW-space merge
as here (``random_pruning`` with rescale, weighted sum, SVD), but draws its masks from the global RNG and does not
report the truncation error, so the merge is written here (a test checks it against ``dare_linear_svd`` at p = 1).

Defaults: ``rank`` 64 is the budget summed over the task adapters (T = 2 → 32 each; r_t = ⌊R/T⌋, the first R mod T
tasks one more), so DARE trains as many parameters as LoRA at the same rank and its merged adapter has that rank; alpha
= rank (scaling 1 for every task adapter: alpha_t = r_t·alpha/rank), dropout 0.05, density 0.5, weights 1/T,
drop_seed 0.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import Tensor, nn

from thanora.adapters.peft_config import lora_config
from thanora.adapters.record import attach_record, find_record, unwrap
from thanora.artifacts import atomic_dir
from thanora.core.targets import Target, check_rank, find_targets
from thanora.methods.base import Method, MethodContext, consume_task_ids
from thanora.methods.dare_merge import dare_merge, low_rank
from thanora.methods.lora import LoraSettings, load_peft_adapter, seeded_rng

SIDECAR = "dare_merge.json"
MERGED = "default"  # PEFT writes the adapter called "default" at the top of the folder


@dataclass(frozen=True)
class DareSettings(LoraSettings):
    """Settings of DARE.

    Attributes:
        rank: rank budget R per module, summed over the T task adapters (r_t = ⌊R/T⌋, the first R mod T tasks get one
            more); also the default rank of the merged adapter.
        lora_alpha: LoRA alpha of the budget; ``None`` means ``rank``. Every task adapter gets the scaling
            alpha / rank (alpha_t = r_t · alpha / rank).
        lora_dropout: dropout on each adapter's input during training.
        target_modules: as `LoraSettings.target_modules`.
        density: probability p that an entry of ΔW_t is kept (kept entries are multiplied by 1/p); 1 = no drop.
        weights: merge weight w_t of each task, in task order; ``None`` means 1/T each.
        svd_rank: rank of the merged adapter; ``None`` means ``rank`` (Σ_t r_t). Capped at min(d_in, d_out).
        drop_seed: seed of the drop masks (a setting of its own, saved with the run config and recorded with the
            merge, so the merge can be redrawn or varied without retraining; `finalize` has no `MethodContext`).
    """

    density: float = 0.5
    weights: tuple[float, ...] | None = None
    svd_rank: int | None = None
    drop_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.density, bool) or not isinstance(self.density, int | float) or not 0 < self.density <= 1:
            raise ValueError(f"DareSettings.density must be in (0, 1], got {self.density!r}")
        if self.weights is not None:
            values = tuple(self.weights) if isinstance(self.weights, list | tuple) else ()
            if not values or not all(isinstance(w, int | float) and not isinstance(w, bool) and math.isfinite(w)
                                     for w in values):
                raise ValueError(f"DareSettings.weights must be null (1/T each) or a non-empty list of finite numbers, "
                                 f"got {self.weights!r}")
            object.__setattr__(self, "weights", tuple(float(w) for w in values))
        if self.svd_rank is not None and not _is_int_at_least(self.svd_rank, 1):
            raise ValueError(f"DareSettings.svd_rank must be null (= rank) or an integer >= 1, got {self.svd_rank!r}")
        if not _is_int_at_least(self.drop_seed, 0):
            raise ValueError(f"DareSettings.drop_seed must be an integer >= 0, got {self.drop_seed!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (lora_alpha resolved)."""
        out = super().to_dict()
        if out["weights"] is not None:
            out["weights"] = list(out["weights"])
        return out


def task_ranks(budget: int, n_tasks: int) -> list[int]:
    """Split the rank budget over the tasks: ⌊R/T⌋ each, the first R mod T tasks one more (Σ = R).

    Raises:
        ValueError: more tasks than the budget (a task would get rank 0).
    """
    if n_tasks > budget:
        raise ValueError(f"DareSettings.rank={budget} is the budget summed over the task adapters; it must be at "
                         f"least the number of tasks ({n_tasks})")
    return [budget // n_tasks + (i < budget % n_tasks) for i in range(n_tasks)]


def task_weights(settings: DareSettings, n_tasks: int) -> list[float]:
    """The merge weights: ``settings.weights`` (one per task) or 1/T each."""
    if settings.weights is None:
        return [1.0 / n_tasks] * n_tasks
    if len(settings.weights) != n_tasks:
        raise ValueError(f"DareSettings.weights has {len(settings.weights)} values for {n_tasks} tasks")
    return list(settings.weights)


@dataclass(frozen=True)
class DareRecord:
    """What DARE keeps beside the PEFT layers: the task adapters, and after `finalize` the merge it made.

    Attributes:
        tasks: adapter (= task) names in task-id order.
        ranks: r_t per task.
        weights: merge weights w_t (also the weights of a forward without task ids).
        targets: the adapted modules.
        merge: after `finalize`: settings used, merged rank and truncation error per module; empty before.
    """

    tasks: tuple[str, ...]
    ranks: tuple[int, ...]
    weights: tuple[float, ...]
    targets: dict[str, Target]
    merge: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``dare.json``, ``dare_merge.json``)."""
        return {"tasks": list(self.tasks), "task_ranks": dict(zip(self.tasks, self.ranks, strict=True)),
                "weights": dict(zip(self.tasks, self.weights, strict=True)), **self.merge}


class _TaskRouter:
    """Per-sample routing of the training forward, and the merge's expectation without task ids.

    With task ids (``set`` from the model's forward pre-hook), every LoRA layer gets PEFT's ``adapter_names`` keyword
    (`route`, a forward pre-hook), so its mixed-batch forward runs adapter t on the rows of task t only: one adapter
    pass per sample, as in separate training, instead of T passes masked to one (which held T dropout copies of every
    layer input: 2x LoRA's activation memory at T = 4, measured). Without task ids each ``lora_B[t]`` output is scaled
    by w_t (`weigh`, a forward hook), so every sample gets Σ_t w_t·ΔW_t.
    """

    def __init__(self, names: Sequence[str], weights: Sequence[float]) -> None:
        self.names, self.weights = list(names), list(weights)
        self.adapter_names: list[str] | None = None

    def set(self, task_ids: Tensor | None) -> None:
        if task_ids is None:
            self.adapter_names = None
            return
        ids = task_ids.tolist()
        if task_ids.dim() != 1 or not all(0 <= i < len(self.names) for i in ids):
            raise RuntimeError(f"DARE: task_id must be (batch,) ids in [0, {len(self.names)}), got {ids}")
        self.adapter_names = [self.names[i] for i in ids]

    def clear(self, *_: Any) -> None:
        self.adapter_names = None  # after every forward: a later generate() (no PeftModel.forward) sees no stale ids

    def route(self, _module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        if self.adapter_names is not None:
            x = args[0] if args else kwargs["x"]
            if x.shape[0] != len(self.adapter_names):
                raise RuntimeError(f"DARE: task_id holds {len(self.adapter_names)} ids but the layer input has "
                                   f"leading dimension {x.shape[0]}; task_id must be (batch,)")
            kwargs["adapter_names"] = self.adapter_names
        return args, kwargs

    def weigh(self, task: int) -> Callable[[nn.Module, tuple[Any, ...], Tensor], Tensor | None]:
        """The forward hook of task ``task``'s ``lora_B``: times w_t without task ids, else unchanged."""
        def scale(_module: nn.Module, _args: tuple[Any, ...], output: Tensor) -> Tensor | None:
            return output * self.weights[task] if self.adapter_names is None else None

        return scale


def adapter_name(task: str) -> str:
    """The PEFT adapter name of ``task``'s adapter: prefixed, so no task name clashes with PEFT's "default" or is a
    substring of its parameter prefix "lora_" (which PEFT warns about)."""
    return f"task_{task}"


def prepare_dare(model: nn.Module, settings: DareSettings, ctx: MethodContext) -> PeftModel:
    """One PEFT LoRA adapter per task (`adapter_name`), all trainable, each fed its own task's samples only.

    Args:
        model: a transformers model, modified in place.
        settings: DARE's settings.
        ctx: ``calibration`` supplies the task names in task-id order (its batches are not used); ``seed`` seeds the
            adapters' Kaiming-uniform A (the global RNG is left as it was).

    Returns:
        The `PeftModel` in the caller's train/eval mode; its forward takes ``task_id`` (LongTensor (B,)).
    """
    if not ctx.calibration:
        raise ValueError("DARE needs the task names, in task-id order: MethodContext.calibration is empty")
    tasks = list(ctx.calibration)
    bad = [t for t in tasks if not t.isidentifier()]
    if bad:
        raise ValueError(f"DARE names its adapters after the tasks: task name {bad[0]!r} must be an identifier")
    ranks = task_ranks(settings.rank, len(tasks))
    weights = task_weights(settings, len(tasks))
    targets = find_targets(model, settings.target_modules)
    check_rank(targets, max(ranks), "DareSettings")
    scaling = settings.alpha / settings.rank
    fan_in_fan_out = any(t.fan_in_fan_out for t in targets.values())
    configs = [lora_config(model, targets, r, scaling * r, settings.lora_dropout, fan_in_fan_out=fan_in_fan_out)
               for r in ranks]
    was_training = model.training
    with seeded_rng(model, ctx.seed):
        peft_model = get_peft_model(model, configs[0], adapter_name=adapter_name(tasks[0]))
        for task, config in zip(tasks[1:], configs[1:], strict=True):
            peft_model.add_adapter(adapter_name(task), config)
    peft_model.base_model.set_adapter([adapter_name(t) for t in tasks])  # all active, all trainable
    router = _TaskRouter([adapter_name(t) for t in tasks], weights)
    for name in targets:
        layer = peft_model.base_model.model.get_submodule(name)
        layer.register_forward_pre_hook(router.route, with_kwargs=True)
        for index, task in enumerate(tasks):
            layer.lora_B[adapter_name(task)].register_forward_hook(router.weigh(index))
    consume_task_ids(peft_model, router.set)
    peft_model.register_forward_hook(router.clear)
    attach_record(peft_model, DareRecord(tuple(tasks), tuple(ranks), tuple(weights), dict(targets)))
    peft_model.train(was_training)
    return peft_model


def record_of(model: nn.Module) -> DareRecord:
    """The `DareRecord` of a model from `prepare_dare` or `finalize_dare` (also through DDP wrappers)."""
    return find_record(model, DareRecord, "DARE")


def finalize_dare(model: nn.Module, settings: DareSettings) -> PeftModel:
    """Merge the task adapters (drop-and-rescale in ΔW space, weighted sum, truncated SVD) into one PEFT LoRA adapter.

    Args:
        model: the trained model from `prepare_dare` (its task adapters are removed).
        settings: density, weights (these, not those given to `prepare_dare`, are used), svd_rank, drop_seed,
            dropout.

    Returns:
        A new `PeftModel` on the original base with one adapter (``"default"``), frozen, in eval mode: exactly what
        `export_dare` writes.
    """
    inner = unwrap(model)
    record = record_of(inner)
    if record.merge:
        raise ValueError("this DARE model is already merged (finalize was applied)")
    base = inner.base_model.model
    weights = task_weights(settings, len(record.tasks))
    target_rank = settings.svd_rank or sum(record.ranks)
    factors: dict[str, tuple[Tensor, Tensor]] = {}
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}  # the rank of each module's truncated SVD (below target_rank: zero-padded)
    with torch.no_grad():
        for index, name in enumerate(record.targets):
            layer = base.get_submodule(name)
            deltas = []
            for task in map(adapter_name, record.tasks):
                A, B = layer.lora_A[task].weight, layer.lora_B[task].weight
                dtype = torch.promote_types(A.dtype, torch.float32)
                deltas.append(layer.scaling[task] * (B.to(dtype) @ A.to(dtype)))  # (d_out, d_in)
            generator = torch.Generator(device=deltas[0].device).manual_seed(settings.drop_seed * 1_000_003 + index)
            merged = dare_merge(deltas, weights, settings.density, generator)
            rank = min(target_rank, *merged.shape)
            A, B, errors[name] = low_rank(merged, rank)
            # one rank for every module (what serving engines read): a module narrower than the target rank gets
            # zero rows / columns, exact no-ops
            A = torch.cat([A, A.new_zeros(target_rank - rank, A.shape[1])])
            B = torch.cat([B, B.new_zeros(B.shape[0], target_rank - rank)], dim=1)
            factors[name] = (A, B)
            ranks[name] = rank
    first = inner.peft_config[adapter_name(record.tasks[0])]
    config = lora_config(inner, record.targets, target_rank, target_rank, settings.lora_dropout,
                         fan_in_fan_out=any(t.fan_in_fan_out for t in record.targets.values()),
                         base_model_name_or_path=getattr(first, "base_model_name_or_path", None))
    original = inner.unload()  # LoRA layers removed, base weights untouched (DARE has no residual base)
    with seeded_rng(original, settings.drop_seed):  # PEFT's own init is overwritten below; keep the global RNG
        merged_model = get_peft_model(original, config)
    with torch.no_grad():
        for name, (A, B) in factors.items():
            layer = merged_model.base_model.model.get_submodule(name)
            lora_A, lora_B = layer.lora_A[MERGED].weight, layer.lora_B[MERGED].weight
            lora_A.copy_(A.to(lora_A))
            lora_B.copy_(B.to(lora_B))
    merged_model.requires_grad_(False)
    merged_model.eval()
    merge = {
        "density": settings.density, "drop_seed": settings.drop_seed, "svd_rank": target_rank,
        "merged_ranks": ranks,
        "relative_frobenius_error": errors,
        "mean_relative_frobenius_error": sum(errors.values()) / len(errors),
        "max_relative_frobenius_error": max(errors.values()),
    }
    attach_record(merged_model, DareRecord(record.tasks, record.ranks, tuple(weights), record.targets, merge))
    return merged_model


def export_dare(model: nn.Module, out_dir: Path) -> None:
    """Write the merged adapter (stock PEFT, original base) and ``dare_merge.json``; only after `finalize_dare`."""
    inner = unwrap(model)
    record = record_of(inner)
    if not record.merge:
        raise ValueError("DARE exports the merged adapter: apply DARE.finalize (finalize_dare) to the trained model "
                         "first")
    with atomic_dir(out_dir, "adapter") as tmp:
        inner.save_pretrained(str(tmp))
        (tmp / SIDECAR).write_text(json.dumps(record.to_dict(), indent=2) + "\n", encoding="utf-8")


def describe_dare(model: nn.Module) -> dict[str, Any]:
    """``dare.json``: tasks, ranks and weights; after `finalize`, the merge settings and truncation errors."""
    return {"dare.json": record_of(model).to_dict()}


def _is_int_at_least(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def touch_absent_adapters(model: nn.Module, settings: DareSettings, batch: dict[str, Tensor]) -> Tensor:
    """0 · Σ of the parameters of every task adapter with no sample in ``batch``: a zero that puts them in the
    backward, so they get a zero gradient instead of none. DDP requires a gradient for every parameter, and AdamW
    treats every adapter on every step alike (as the masked forward this replaced did). Nothing to touch (a zero
    without graph) when every task is present."""
    present = set(batch["task_id"].tolist())
    absent = [f".{adapter_name(t)}." for i, t in enumerate(record_of(model).tasks) if i not in present]
    params = [p for n, p in model.named_parameters() if p.requires_grad and any(a in n for a in absent)]
    if not params:
        return torch.zeros((), device=batch["task_id"].device)
    return torch.stack([p.sum() for p in params]).sum() * 0.0


def dare_param_count(model: nn.Module, settings: DareSettings) -> int:
    """R · (d_in + d_out) summed over the targets: the T task adapters share the rank budget R."""
    return sum(settings.rank * (t.d_in + t.d_out) for t in find_targets(model, settings.target_modules).values())


def check_dare_tasks(settings: DareSettings, tasks: Sequence[str]) -> list[str]:
    """Every task needs an adapter of rank >= 1 and, when given, a merge weight.

    Raises:
        ValueError: the budget is below the number of tasks, or ``weights`` has another length.
    """
    task_ranks(settings.rank, len(tasks))
    task_weights(settings, len(tasks))
    return []


DARE = Method(
    name="dare",
    paper="Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free Lunch, "
          "ICML 2024 (arXiv:2311.03099)",
    config_cls=DareSettings,
    mergeable=True,
    task_id_at_train=True,
    task_id_at_test=False,
    prepare=prepare_dare,
    regularizer=touch_absent_adapters,
    export=export_dare,
    save=export_dare,
    load=load_peft_adapter,
    param_count=dare_param_count,
    describe=describe_dare,
    finalize=finalize_dare,
    check_tasks=check_dare_tasks,
    # The per-sample routing lives from the model's forward pre-hook to its forward hook (which clears it, so a later
    # generate() cannot see stale ids); a backward-time recomputation of a layer would run every adapter on every row.
    supports_gradient_checkpointing=False,
)
