"""The `Method` type (a frozen dataclass of functions: one fine-tuning method as a value) and its `MethodContext`.

There is no base class and no registration at import: a method is added by writing ``methods/<name>.py`` with one
`Method` value and listing it in `thanora.methods.registry.METHODS`. The pipeline only ever calls the fields of a
`Method`:
``prepare`` turns the base model into the trainable one, ``regularizer`` (if any) adds its λ-weighted term to every
micro-batch's task loss in `thanora.training.train.train`, ``finalize`` (if any) turns the trained model into the one
that is
evaluated (DARE's merge of its task adapters), ``export`` writes a stock PEFT adapter, ``save`` / ``load`` the
method's own reloadable format and ``param_count`` its trainable parameter count.

Task ids: a method with ``task_id_at_train`` receives the batch's ``task_id`` (LongTensor (B,)) as a keyword of the
model's forward during training; its ``prepare`` consumes it with `consume_task_ids` (a forward pre-hook that pops
the keyword, so the transformers model never sees it). At evaluation no ``task_id`` is passed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

Batch = Mapping[str, Any]


@dataclass(frozen=True)
class MethodContext:
    """What `Method.prepare` may need besides the model and the method's settings.

    Attributes:
        tokenizer: the tokenizer (or processor) of the base model; ``None`` where not needed.
        calibration: ``{task: list of batches}`` (``input_ids`` (B, L), ``attention_mask`` (B, L), image inputs for
            VLMs) already on the model's device, in task order. In a multi-process run, each process holds its shard.
        cache_dir: folder for reusable intermediate results (ThanoRA's spectra), or ``None``.
        all_reduce: sums a tensor across processes (multi-process runs), or ``None`` for a single process.
        progress: show progress bars.
        seed: seed of any random initialisation the method does itself.
        calibration_key: identifies the calibration data in ``cache_dir`` (e.g. a fingerprint of the split), so
            cached results are never reused for other data.
    """

    tokenizer: Any = None
    calibration: Mapping[str, Sequence[Batch]] | None = None
    cache_dir: Path | None = None
    all_reduce: Callable[[Tensor], Tensor] | None = None
    progress: bool = True
    seed: int = 0
    calibration_key: str = ""


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its metadata and the functions the pipeline calls.

    Attributes:
        name: identifier used in configs and run folders (``"lora"``, ``"thanora"``...).
        paper: citation.
        config_cls: the dataclass of its settings (YAML ``methods: - name: x, <fields>``).
        mergeable: whether the trained update can be merged into the base weights (zero inference overhead).
        task_id_at_train: whether training batches must carry ``task_id`` for the method itself.
        task_id_at_test: whether inference needs the task id.
        prepare: ``(base model, settings, ctx) -> trainable model`` (only the method's parameters trainable).
        regularizer: ``(model, settings, batch) -> λ-weighted extra loss`` (a scalar tensor), or ``None``.
        export: ``(model, folder)`` writing a stock PEFT adapter on the original base; ``None`` = not exportable.
        save: ``(model, folder)`` writing the method's own reloadable format (the PEFT adapter for PEFT methods).
        load: ``(fresh base model, folder written by save) -> model`` giving the same outputs as the saved one.
        param_count: ``(base model, settings) -> int``, the trainable parameters ``prepare`` would create (analytic:
            works on a model built on the ``meta`` device, no calibration needed).
        describe: ``model -> {file name: JSON content}``, the method's own artifacts written into its run folder
            before and after training (ThanoRA: ``rank_plan.json``, ``overlap.json``), or ``None``.
        finalize: ``(trained model, settings) -> model to evaluate, export and save``, or ``None`` (identity).
        stratified_batches: training batches must hold samples of every task (`thanora.data.tasks.DataConfig.stratified`
            is switched on for this method).
        train_state: ``model -> {name: tensor}``, running state the regulariser keeps between steps besides the
            parameters (mtLoRA: its call counter and spectral weights), saved in every training checkpoint so a
            resumed run continues bit for bit; ``None`` = none.
        load_train_state: ``(model, tensors from train_state)`` restoring it on resume (with ``train_state``).
        check_tasks: ``(settings, task names) -> lines`` checked when a run config is loaded, before any work:
            raises `ValueError` for settings that cannot work with these tasks (ThanoRA's rank budget below
            T·r_min), returns one line per setting that would have no effect with them (SPR with one task), which
            the run says once at the start; ``None`` = nothing to check.
        supports_gradient_checkpointing: the training forward may be recomputed during backward
            (`thanora.training.train.TrainConfig.gradient_checkpointing`): no per-forward state that a replay would
            miss.
        packing_conflict: ``settings -> reason or None``: why training batches must stay padded with these settings
            although the method reads no task ids (its layers carry state along a row's positions, as mtLoRA's
            ``sequence`` router does, which a packed row would carry from one sequence into the next;
            `thanora.training.packing`); ``None`` = packing applies whenever the method reads no task ids.
    """

    name: str
    paper: str
    config_cls: type
    mergeable: bool
    task_id_at_train: bool
    task_id_at_test: bool
    prepare: Callable[[nn.Module, Any, MethodContext], nn.Module]
    regularizer: Callable[[nn.Module, Any, dict[str, Tensor]], Tensor] | None
    export: Callable[[nn.Module, Path], None] | None
    save: Callable[[nn.Module, Path], None]
    load: Callable[[nn.Module, Path], nn.Module]
    param_count: Callable[[nn.Module, Any], int]
    describe: Callable[[nn.Module], dict[str, Any]] | None = None
    finalize: Callable[[nn.Module, Any], nn.Module] | None = None
    stratified_batches: bool = False
    train_state: Callable[[nn.Module], dict[str, Tensor]] | None = None
    load_train_state: Callable[[nn.Module, Mapping[str, Tensor]], None] | None = None
    check_tasks: Callable[[Any, Sequence[str]], list[str]] | None = None
    supports_gradient_checkpointing: bool = True
    packing_conflict: Callable[[Any], str | None] | None = None

    def __post_init__(self) -> None:
        if (self.train_state is None) != (self.load_train_state is None):
            raise ValueError(f"Method {self.name!r}: train_state and load_train_state go together")


def consume_task_ids(model: nn.Module, sink: Callable[[Tensor | None], None]) -> None:
    """Pop the ``task_id`` keyword of every forward call of ``model`` and hand it (or ``None``) to ``sink`` first.

    Registered by the ``prepare`` of methods with ``task_id_at_train``; ``sink(None)`` on a call without task ids
    (evaluation) lets the method clear any per-batch state.
    """

    def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        sink(kwargs.pop("task_id", None))
        return args, kwargs

    model.register_forward_pre_hook(hook, with_kwargs=True)


__all__ = ["Batch", "Method", "MethodContext", "consume_task_ids"]
