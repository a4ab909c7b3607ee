"""The only training loop: task loss + the method's regulariser, accumulation, clipping, schedule, exact resume.

One `train` for every method (DESIGN.md): no per-method branch, only ``method.regularizer``. One process, or DDP under
``accelerate launch`` / ``torchrun`` (gloo on CPU). Checkpoints hold the trainable parameters (``prepare`` rebuilds the
frozen base), optimizer, scheduler and each process's RNG; the data order depends on the epoch only, so a resumed run
skips the consumed batches and repeats the uninterrupted run's losses.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from accelerate import Accelerator, skip_first_batches
from accelerate.utils import send_to_device, set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm
from transformers import PreTrainedModel, get_scheduler

from thanora.artifacts import write_json
from thanora.methods.base import Method
from thanora.training.checkpoints import (
    CHECKPOINTS,
    FORMAT,
    LATEST,
    load_checkpoint,
    load_method_state,
    remove_checkpoints,
    save_checkpoint,
    set_rng_state,
)
from thanora.training.distributed import check_accelerator, check_sharding, make_accelerator
from thanora.training.loss import task_loss
from thanora.training.packing import Packer, packing_conflict

logger = logging.getLogger(__name__)

LoaderFactory = Callable[[int], Iterable[dict[str, Tensor]]]  # epoch -> CPU batches (must support len())
EvalFn = Callable[[nn.Module, int], Mapping[str, Any]]  # (model, optimizer step) -> metrics

_SCHEDULERS = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}
HISTORY = "history.json"


class NonFiniteLossError(RuntimeError):
    """The loss (or, without a loss scaler, the gradient norm) became NaN/Inf; nothing was updated or saved."""

    def __init__(self, step: int, what: str) -> None:
        self.step = step
        super().__init__(f"non-finite {what} at optimizer step {step}; training stopped before the update, and the "
                         "last good checkpoint is kept (check the data, lower lr, or use bf16 instead of fp16)")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of the training loop (SPEC.md §6 defaults).

    Attributes:
        epochs: passes over the data (ignored when ``max_steps`` is set).
        max_steps: optimizer steps in total; ``None`` means ``epochs`` full epochs.
        batch_size: per-process micro-batch size (used by whoever builds the loader factory).
        grad_accum: micro-batches per optimizer step; global batch = batch_size · grad_accum · processes.
        lr: peak learning rate of AdamW.
        weight_decay: AdamW weight decay.
        max_grad_norm: gradient clipping norm; 0 disables clipping (the norm is still logged).
        schedule: ``cosine`` | ``linear`` | ``constant`` (all after a linear warm-up).
        warmup_ratio: fraction of the optimizer steps spent warming up.
        mixed_precision: ``no`` | ``bf16`` | ``fp16``; ``auto`` = bf16 on CUDA with bf16 support, else no.
        seed: seed of torch, random and numpy (offset by the process index) and of the data order.
        log_every: append to the history every this many optimizer steps (and at the last one).
        eval_every: call ``eval_fn`` every this many optimizer steps; 0 = never.
        save_every: checkpoint every this many optimizer steps; 0 = only at the end.
        gradient_checkpointing: recompute each decoder layer's activations during backward instead of keeping them
            (transformers' activation checkpointing, non-reentrant): far less activation memory for about one more
            forward pass of time, the same gradients. Methods whose forward keeps per-call state refuse it (DARE).
        labelled_logits_only: apply the output head to the positions that predict a labelled token only
            (`thanora.training.loss.task_loss`): the same loss and gradients as the full logits to float rounding,
            for about a fifth less compute on SmolLM2; false = the model's own loss over every position.
        pack_sequences: lay each right-padded text micro-batch out as a few rows of whole sequences with no padding
            between them (`thanora.training.packing`): the same loss and gradients to float rounding (with dropout,
            other draws of the same distribution), without the padding's compute. Batches it cannot lay out (images,
            a method that reads task ids, a model whose attention crosses the packed sequences) stay padded, said
            once.
    """

    epochs: int = 1
    max_steps: int | None = None
    batch_size: int = 4
    grad_accum: int = 8
    lr: float = 2e-5
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    warmup_ratio: float = 0.03
    mixed_precision: Literal["no", "bf16", "fp16", "auto"] = "auto"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 0
    save_every: int = 0
    gradient_checkpointing: bool = False
    labelled_logits_only: bool = True
    pack_sequences: bool = True

    def __post_init__(self) -> None:
        for name, least in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("log_every", 1), ("seed", 0),
                            ("eval_every", 0), ("save_every", 0)):
            _require(_int_at_least(getattr(self, name), least), name, f"must be an integer >= {least}")
        _require(self.max_steps is None or _int_at_least(self.max_steps, 1), "max_steps",
                 "must be null (use epochs) or an integer >= 1")
        _require(self.lr > 0, "lr", "must be > 0")
        _require(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _require(self.max_grad_norm >= 0, "max_grad_norm", "must be >= 0 (0 disables clipping)")
        _require(self.schedule in _SCHEDULERS, "schedule", f"must be one of {sorted(_SCHEDULERS)}")
        _require(0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)")
        _require(self.mixed_precision in ("no", "bf16", "fp16", "auto"), "mixed_precision", "must be no|bf16|fp16|auto")
        _require(isinstance(self.gradient_checkpointing, bool), "gradient_checkpointing", "must be true or false")
        _require(isinstance(self.labelled_logits_only, bool), "labelled_logits_only", "must be true or false")
        _require(isinstance(self.pack_sequences, bool), "pack_sequences", "must be true or false")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Inverse of `to_dict`; unknown keys raise a `ValueError` naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}; valid fields: {sorted(known)}")
        return cls(**data)


@dataclass
class TrainResult:
    """Outcome of `train`.

    Attributes:
        history: per logged step ``{"step", "epoch", "loss", "reg", "lr", "grad_norm"}``: task loss and λ-weighted
            regulariser averaged over micro-batches and processes; ``"eval"`` holds the ``eval_fn`` metrics.
        steps: optimizer steps done in total (including those before a resume).
        resumed_from: the step of the checkpoint resumed from, or ``None``.
        checkpoint: the last checkpoint folder written or loaded, or ``None``.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    steps: int = 0
    resumed_from: int | None = None
    checkpoint: Path | None = None


def make_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW with ``cfg``'s rate and weight decay: torch's fused kernel where the parameters allow it (CPU or CUDA
    floating point: one kernel for all parameters, 23 -> 4 ms per step for SmolLM2's rank-16 adapter on 2 CPU cores;
    HF Trainer's default too), else the standard implementation. The same update to float rounding (tested)."""
    fusable = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)
    devices = {p.device for p in params}
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                             fused=True if fusable and len(devices) == 1 else None)


def make_loader_factory(dataset: Sequence[Any], batch_size: int, collate_fn: Callable[[list[Any]], dict[str, Tensor]],
                        seed: int, *, num_processes: int = 1, process_index: int = 0, shuffle: bool = True,
                        drop_last: bool = False) -> LoaderFactory:
    """A seeded ``epoch -> DataLoader`` whose order depends only on (seed, epoch, process), never on global RNG.

    ``dataset`` is indexable (e.g. a list of features), ``collate_fn`` pads a list of them
    (`thanora.data.formats.collate`);
    process ``process_index`` of ``num_processes`` gets every num_processes-th example of one shared permutation.
    """

    def factory(epoch: int) -> DataLoader:
        sampler = DistributedSampler(dataset, num_replicas=num_processes, rank=process_index,  # type: ignore[arg-type]
                                     shuffle=shuffle, seed=seed)
        sampler.set_epoch(epoch)
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate_fn,  # type: ignore
                          drop_last=drop_last, generator=torch.Generator().manual_seed(seed + epoch))

    return factory


def train(model: nn.Module, method: Method, method_cfg: Any, loader_factory: LoaderFactory, cfg: TrainConfig,
          accelerator: Accelerator | None = None, out_dir: str | Path | None = None, resume: bool = False,
          eval_fn: EvalFn | None = None, *, progress: bool = True) -> TrainResult:
    """Train ``model``'s trainable parameters in place: AdamW on task loss + ``method.regularizer`` per micro-batch.

    Args:
        model: the model returned by ``method.prepare`` (only the method's parameters require grad).
        method: supplies the regulariser (``None`` = task loss only); its name is recorded in checkpoints.
        method_cfg: the method's settings, passed to the regulariser.
        loader_factory: ``epoch -> sized iterable of CPU batches`` (``input_ids``, ``attention_mask``, ``labels``,
            ``task_id``...) whose order depends only on the epoch (`make_loader_factory`).
        cfg: the loop's settings.
        accelerator: with ``cfg``'s mixed precision, no accumulation (default `make_accelerator`); freed at the end.
        out_dir: where ``checkpoints/step-<N>/`` and ``history.json`` go; ``None`` saves nothing.
        resume: continue exactly from ``out_dir/checkpoints/latest`` if there is one; else old checkpoints go.
        eval_fn: ``(unwrapped model, step) -> metrics`` on every process every ``cfg.eval_every`` steps (eval mode,
            ``torch.no_grad``).
        progress: show a tqdm bar (main process only).

    Returns:
        The `TrainResult`; ``model`` holds the trained weights, unwrapped, in the caller's train/eval mode.

    Raises:
        NonFiniteLossError: NaN/Inf loss; the parameters and the checkpoints are those of the last good step.
        CheckpointError: ``resume`` found a missing, corrupt or mismatched checkpoint (the message names it).
    """
    if cfg.gradient_checkpointing and not method.supports_gradient_checkpointing:
        raise ValueError(f"TrainConfig.gradient_checkpointing is not supported by {method.name} (its forward keeps "
                         "per-call state that a recomputation in backward would miss); set it to false")
    accelerator = accelerator or make_accelerator(cfg)
    check_accelerator(accelerator, cfg)
    check_sharding(accelerator.distributed_type)
    set_seed(cfg.seed, device_specific=True)
    n_batches = len(loader_factory(0))  # type: ignore[arg-type]
    if n_batches < cfg.grad_accum:
        raise ValueError(f"an epoch has {n_batches} micro-batches < TrainConfig.grad_accum={cfg.grad_accum}")
    steps_per_epoch = n_batches // cfg.grad_accum  # an incomplete last accumulation group is not used
    total = cfg.max_steps or cfg.epochs * steps_per_epoch
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not trainable:
        raise ValueError(f"{type(model).__name__} has no trainable parameter; prepare it with the method first")
    params = list(trainable.values())
    optimizer = make_optimizer(params, cfg)
    warmup = math.ceil(cfg.warmup_ratio * total)
    scheduler = get_scheduler(_SCHEDULERS[cfg.schedule], optimizer, num_warmup_steps=warmup, num_training_steps=total)
    wrapped, optimizer = accelerator.prepare(model, optimizer)
    unwrapped = accelerator.unwrap_model(wrapped)
    meta = {"format": FORMAT, "method": method.name, "config": cfg.to_dict(), "steps_per_epoch": steps_per_epoch,
            "num_processes": accelerator.num_processes, "trainable": {n: list(p.shape) for n, p in trainable.items()}}
    root = Path(out_dir) / CHECKPOINTS if out_dir is not None else None
    result = TrainResult()
    rng: dict[str, Any] | None = None
    if resume and root is not None and (root / LATEST).is_file():
        result.checkpoint, result.steps, result.history, rng = load_checkpoint(
            root, meta, trainable, optimizer, scheduler, accelerator.process_index)
        if method.load_train_state is not None:
            method.load_train_state(unwrapped, load_method_state(result.checkpoint))
        result.resumed_from = result.steps
        logger.info("resuming %s from %s (step %d of %d)", method.name, result.checkpoint, result.steps, total)
    elif root is not None and root.exists() and accelerator.is_main_process:
        logger.warning("removing old checkpoints in %s (resume=%s)", root, resume)
        remove_checkpoints(root)
    accelerator.wait_for_everyone()

    bar = tqdm(total=total, initial=result.steps, desc=f"train [{method.name}]", dynamic_ncols=True,
               disable=not (progress and accelerator.is_local_main_process))
    batches: Iterator[dict[str, Tensor]] | None = None
    was_training = model.training
    wrapped.train()
    cleanup = ExitStack()
    packer = Packer(cfg.pack_sequences, packing_conflict(method, method_cfg))
    try:
        if cfg.gradient_checkpointing:
            cleanup.enter_context(recomputed_activations(unwrapped))
        while result.steps < total:
            step = result.steps + 1
            epoch, position = divmod(result.steps, steps_per_epoch)
            if batches is None or position == 0:
                batches, rng = _epoch_batches(loader_factory, epoch, position * cfg.grad_accum, rng), None
            sums = torch.zeros(2, device=accelerator.device)  # (task loss, λ·regulariser) summed over micro-batches
            for micro in range(cfg.grad_accum):
                batch = next(batches, None)
                if batch is None:
                    raise RuntimeError(f"epoch {epoch} ran out of batches at step {step}: fewer than len(loader)")
                batch = send_to_device(batch, accelerator.device)
                inputs = batch if method.task_id_at_train else {k: v for k, v in batch.items() if k != "task_id"}
                inputs, batch = packer(unwrapped, inputs, batch)
                with nullcontext() if micro == cfg.grad_accum - 1 else accelerator.no_sync(wrapped):
                    loss = task_loss(wrapped, inputs, cfg.labelled_logits_only)
                    reg = method.regularizer(unwrapped, method_cfg, batch) if method.regularizer else loss.new_zeros(())
                    # λ·regulariser once per micro-batch, before the 1/grad_accum scaling: λ means the same at any.
                    accelerator.backward((loss + reg) / cfg.grad_accum)
                sums += torch.stack([loss.detach().float(), reg.detach().float()])
            loss_value, reg_value = (float(v) for v in accelerator.reduce(sums / cfg.grad_accum, "mean"))
            if not math.isfinite(loss_value + reg_value):
                raise NonFiniteLossError(step, f"loss (task {loss_value}, regulariser {reg_value})")
            grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm or math.inf))
            if not math.isfinite(grad_norm) and accelerator.scaler is None:
                raise NonFiniteLossError(step, f"gradient norm ({grad_norm})")
            lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            result.steps = step
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", reg=f"{reg_value:.3g}", lr=f"{lr:.2e}")
            if step % cfg.log_every == 0 or step == total:
                result.history.append({"step": step, "epoch": step / steps_per_epoch, "loss": loss_value,
                                       "reg": reg_value, "lr": lr, "grad_norm": grad_norm})
            if eval_fn is not None and cfg.eval_every and step % cfg.eval_every == 0:
                _evaluate(wrapped, unwrapped, eval_fn, step, result.history)
            if root is not None and ((cfg.save_every and step % cfg.save_every == 0) or step == total):
                method_state = method.train_state(unwrapped) if method.train_state is not None else None
                result.checkpoint = save_checkpoint(root, step, trainable, optimizer, scheduler, result.history,
                                                    meta, accelerator, method_state)
        if out_dir is not None and accelerator.is_main_process:
            write_json(Path(out_dir) / HISTORY, result.history)
        accelerator.wait_for_everyone()
    finally:
        cleanup.close()
        bar.close()
        accelerator.unwrap_model(wrapped, keep_fp32_wrapper=False)  # removes the autocast forward patch
        accelerator.free_memory()
        model.train(was_training)
    return result


@contextmanager
def recomputed_activations(model: nn.Module) -> Iterator[None]:
    """Gradient checkpointing (`TrainConfig.gradient_checkpointing`) of the transformers model under ``model``'s
    adapters: its activation checkpointing, non-reentrant (no input needs ``requires_grad``; gradients may flow
    through tensors a method keeps aside), and no KV cache; both as they were on exit. Not hand-written: the decoder
    layers' own `GradientCheckpointingLayer` wrapper does the recomputation."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model  # PeftModel → transformers model
    if not isinstance(inner, PreTrainedModel) or not inner.supports_gradient_checkpointing:
        raise ValueError(f"TrainConfig.gradient_checkpointing needs a transformers model that supports it; "
                         f"{type(inner).__name__} does not: set it to false")
    use_cache = getattr(inner.config, "use_cache", None)
    had_input_grad_hooks = bool(getattr(inner, "_require_grads_hooks", None))
    inner.activation_checkpointing_enable({"use_reentrant": False})
    if not had_input_grad_hooks:
        # transformers also makes every input embedding's output require grad: reentrant checkpointing needs that,
        # non-reentrant does not, and on a vision-language model it would run the frozen vision tower's backward.
        inner.disable_input_require_grads()
    inner.config.use_cache = False
    try:
        yield
    finally:
        inner.activation_checkpointing_disable()
        inner.config.use_cache = use_cache


def _evaluate(wrapped: nn.Module, unwrapped: nn.Module, eval_fn: EvalFn, step: int, log: list[dict[str, Any]]) -> None:
    wrapped.eval()
    with torch.no_grad():
        metrics = dict(eval_fn(unwrapped, step))
    wrapped.train()
    if not log or log[-1]["step"] != step:
        log.append({"step": step})
    log[-1]["eval"] = metrics


def _epoch_batches(loader_factory: LoaderFactory, epoch: int, skip: int,
                   rng: dict[str, Any] | None) -> Iterator[dict[str, Tensor]]:
    """The epoch's batches after the first ``skip``; a resumed ``rng`` (saved after the last step) is restored where
    the uninterrupted run stood then: before building a new epoch's loader, after building the current one's."""
    if rng is not None and not skip:
        set_rng_state(rng)
    loader = loader_factory(epoch)
    if skip and isinstance(loader, DataLoader):
        iterator = iter(skip_first_batches(loader, skip))  # skips indices, loads nothing
    else:
        iterator = iter(loader)
        collections.deque(itertools.islice(iterator, skip), maxlen=0)  # consumed now, as in the uninterrupted run
    if rng is not None and skip:
        set_rng_state(rng)
    return iterator


def _int_at_least(value: Any, least: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def _require(ok: bool, field_name: str, message: str) -> None:
    if not ok:
        raise ValueError(f"TrainConfig.{field_name} {message}")
