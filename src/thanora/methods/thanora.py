"""ThanoRA (Liang et al., 2025): the public entry points `prepare_model` and `spr_loss`, and the `Method` value.

`prepare_model` chains the stages of SPEC.md §1-4: per task, calibration statistics → task-aware spectra (statistics
freed before the next task) → entropy-guided rank plan → HASI factors → PEFT LoRA layers with a residual base.
`spr_loss` is SPEC.md §5's regulariser. As a `Method` (``THANORA``) the settings are `thanora.ThanoraConfig`;
``spr_lambda: 0`` is the "HASI only" ablation. CorDA (`thanora.methods.corda`) reuses `task_spectra`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import Tensor, nn

from thanora.adapters.export import export_adapter
from thanora.adapters.layers import first_batch, inject_
from thanora.adapters.record import adapter_of, lora_factors, spr_groups
from thanora.core.allocation import RankPlan, allocate_ranks, min_budget, normalized_entropy
from thanora.core.covariance import Batch, collect_covariances, covariance_groups
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.initialize import hasi_factors
from thanora.core.regularizers import block_overlap, grouped_spr
from thanora.core.spectra import Spectrum, decompose_task, load_spectra, save_spectra
from thanora.core.targets import Target, check_rank, find_targets, weight_matrix
from thanora.methods.base import Method, MethodContext
from thanora.methods.lora import load_peft_adapter, lora_param_count

logger = logging.getLogger(__name__)

TaskBatches = Mapping[str, Iterable[Batch]]


def prepare_model(
    model: nn.Module,
    calibration: TaskBatches,
    config: ThanoraConfig | None = None,
    *,
    cache_dir: str | Path | None = None,
    calibration_key: str = "",
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> PeftModel:
    """Turn a pretrained model into a ThanoRA multi-task LoRA model, ready to train.

    Args:
        model: any transformers model (causal LM, LLaVA-style VLM, GPT-2 with `Conv1D`...), modified in place.
        calibration: ``{task name: iterable of tokenised batches}`` (``input_ids``, ``attention_mask``, and image
            inputs for VLMs), on the model's device, formatted exactly as in training. Task order = block order.
        config: a `ThanoraConfig` (defaults: the paper's settings).
        cache_dir: if given, each task's spectra are saved there and reused by later calls with the same model,
            target modules, decomposition settings and ``calibration_key`` (so τ / r_min / γ sweeps need no
            forward pass).
        calibration_key: identifies the calibration data in the cache (e.g. a fingerprint of the split).
        all_reduce: for multi-process runs, sums a tensor across processes (the statistics then equal a
            single-process run over all processes' batches).
        progress: show progress bars.

    Returns:
        The `PeftModel` with only the LoRA factors trainable; see `spr_loss`, `merge_`, `export_adapter`.

    Raises:
        ValueError: no task, a bad task name, unknown target modules, an empty task, NaN activations, or a rank
            budget too small for the tasks (`RankBudgetError`).
    """
    config = config or ThanoraConfig()
    _check_tasks(calibration)
    if config.residual and config.lora_dropout > 0:
        logger.warning("lora_dropout=%g with the residual base: dropout on the task blocks (gamma=%g x the top "
                       "components of W) perturbs the training forward heavily; lora_dropout=0 is recommended",
                       config.lora_dropout, config.gamma)
    targets = find_targets(model, config.target_modules)
    check_rank(targets, config.rank, "ThanoraConfig")
    spectra = {
        task: task_spectra(model, targets, task, batches, config, cache_dir, calibration_key, all_reduce, progress)
        for task, batches in calibration.items()
    }
    plan = plan_ranks(spectra, config)
    logger.info("%s", plan.summary())
    inits = hasi_factors(spectra, plan, targets, config)
    was_training = model.training
    peft_model = inject_(model, targets, inits, plan, config, first_batch(calibration))
    peft_model.train(was_training)  # get_peft_model switches to train mode; keep the caller's mode
    return peft_model


def plan_ranks(spectra: Mapping[str, Mapping[str, Spectrum]], config: ThanoraConfig) -> RankPlan:
    """Normalised spectral entropies of the top-R singular values, then the rank plan (SPEC.md §3)."""
    entropies = {
        task: {name: normalized_entropy(s.S[: config.rank]) for name, s in by_module.items()}
        for task, by_module in spectra.items()
    }
    return allocate_ranks(entropies, config.rank, config.tau, config.r_min)


def task_spectra(
    model: nn.Module,
    targets: Mapping[str, Target],
    task: str,
    batches: Iterable[Batch],
    config: ThanoraConfig,
    cache_dir: str | Path | None = None,
    calibration_key: str = "",
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
) -> dict[str, Spectrum]:
    """One task's spectra: from the cache when it matches, else calibration statistics → decomposition."""
    path = Path(cache_dir) / f"spectra-{task}.safetensors" if cache_dir is not None else None
    key = _cache_key(model, targets, config, calibration_key) if path is not None else ""
    if path is not None and path.is_file():
        try:
            cached, meta = load_spectra(path)
        except ValueError as err:
            logger.warning("ignoring unreadable spectra cache %s (%s)", path, err)
        else:
            if meta.get("key") == key and int(meta.get("rank", 0)) >= config.rank:
                logger.info("task %s: spectra loaded from %s (no forward pass)", task, path)
                return {name: s.truncate(config.rank) for name, s in cached.items()}
    dtype = torch.float64 if config.stats_dtype == "float64" else torch.float32
    budget = None if config.calibration_memory_gb is None else int(config.calibration_memory_gb * 2**30)
    groups = covariance_groups(targets, budget, dtype)
    batches = list(batches) if len(groups) > 1 else batches  # several passes
    spectra: dict[str, Spectrum] = {}
    for group in groups:  # at most one group's covariances at a time; each decomposed, then freed
        stats = collect_covariances(model, group, task, batches, dtype, all_reduce, progress, len(groups) > 1)
        spectra |= decompose_task(model, group, stats, config, progress)
        del stats
    if path is not None:
        save_spectra(spectra, path, {"key": key, "rank": config.rank, "task": task})
    return spectra


def spr_loss(model: nn.Module) -> torch.Tensor:
    """The SPR term Σ_modules Σ_{t1<t2} ‖B_t1ᵀB_t2‖_F² + ‖A_t1A_t2ᵀ‖_F² of a prepared model (without λ).

    Add ``config.spr_lambda * spr_loss(model)`` to the task loss of each micro-batch, before dividing by the
    gradient-accumulation steps. A single task gives zero. With ``spr_normalization="init"`` each module's term is
    divided by its value at initialisation.
    """
    # The same sum as Σ_modules spr_weight · spr_penalty(A, B, mask) (tested), from the cross-task products only and
    # batched over modules of the same layout (`grouped_spr`). SmolLM2, 2 tasks, 2 CPU cores, forward + backward:
    # 25 -> 18 ms at rank 16, 75 -> 40 ms at rank 64 (benchmarks/README.md, throughput).
    return grouped_spr(spr_groups(model))


def _check_tasks(calibration: TaskBatches) -> None:
    if not calibration:
        raise ValueError("calibration must map at least one task name to its batches")
    for task in calibration:
        if not isinstance(task, str) or not task.isidentifier():
            raise ValueError(f"task name {task!r} must be an identifier (letters, digits, underscores)")


def _cache_key(model: nn.Module, targets: Mapping[str, Target], config: ThanoraConfig, calibration_key: str) -> str:
    """Fingerprint of everything the spectra depend on (weights summarised by their norms)."""
    fields = {k: v for k, v in config.to_dict().items()
              if k in ("stats_dtype", "damping", "max_damping_doublings", "solve_tolerance", "svd",
                       "svd_oversample", "svd_power_iters", "svd_tolerance")}
    norms = [round(float(weight_matrix(model.get_submodule(n)).detach().float().norm()), 4) for n in targets]
    blob = json.dumps([list(targets), norms, fields, calibration_key], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()

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
    export_adapter(model, out_dir)


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


def check_thanora_tasks(config: ThanoraConfig, tasks: Sequence[str]) -> list[str]:
    """The rank budget must hold every task's minimum rank; SPR does nothing with one task.

    Raises:
        ValueError: ``rank`` below the budget T·r_min needs after the cooperative block (`RankBudgetError`'s rule,
            checked before any calibration).
    """
    needed = min_budget(len(tasks), config.r_min)
    if config.rank < needed:
        raise ValueError(f"rank={config.rank} cannot give each of the {len(tasks)} tasks r_min={config.r_min} ranks "
                         f"beside the cooperative block; raise rank to at least {needed} or lower r_min")
    notes = []
    if len(tasks) == 1 and config.spr_lambda > 0:
        notes.append(f"spr_lambda={config.spr_lambda:g} has no effect with a single task: SPR penalises the overlap "
                     "of different tasks' blocks, so it is identically zero (set spr_lambda: 0)")
    if config.spr_lambda == 0 and config.spr_normalization != "none":
        notes.append(f"spr_normalization={config.spr_normalization} has no effect with spr_lambda=0")
    return notes


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
    check_tasks=check_thanora_tasks,
)
