"""How the one training loop runs on one device or several: the `Accelerator` it is given, mixed precision, and the
refusal of sharded training (`check_sharding`: why is in its docstring)."""

from __future__ import annotations

from typing import Protocol

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType


class TrainConfig(Protocol):
    """What this module reads of `thanora.training.train.TrainConfig` (a protocol, so the two modules do not import
    each other)."""

    mixed_precision: str

_SHARDED = {"FSDP", "DEEPSPEED", "MEGATRON_LM"}  # see check_sharding


def resolve_mixed_precision(value: str) -> str:
    """``auto`` → ``bf16`` on CUDA with bf16 support, else ``no``; other values unchanged."""
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return ("bf16" if bf16 else "no") if value == "auto" else value


def make_accelerator(cfg: TrainConfig, cpu: bool = False) -> Accelerator:
    """An `Accelerator` matching ``cfg`` (mixed precision resolved; accumulation is done by `train` itself)."""
    return Accelerator(mixed_precision=resolve_mixed_precision(cfg.mixed_precision), cpu=cpu)


def check_accelerator(accelerator: Accelerator, cfg: TrainConfig) -> None:
    wanted = resolve_mixed_precision(cfg.mixed_precision)
    if str(accelerator.mixed_precision) != wanted or accelerator.gradient_accumulation_steps != 1:
        raise ValueError(f"the accelerator must have mixed_precision={wanted!r} (TrainConfig.mixed_precision) and "
                         "gradient_accumulation_steps=1 (train() accumulates TrainConfig.grad_accum itself); build "
                         "it with thanora.training.distributed.make_accelerator(cfg)")


def check_sharding(distributed_type: DistributedType | str) -> None:
    """Refuse sharded training (FSDP, DeepSpeed, Megatron-LM) for every method.

    A decision, not an accident. The loop keeps references to the trainable parameters taken before
    ``accelerator.prepare`` (checkpoints, resume, gradient clipping), regularisers read whole factors from the
    unwrapped model after the forward pass, and export reads whole parameters: under FSDP / ZeRO-3 each of these would
    see stale tensors or shards and save or penalise the wrong values without an error. accelerate switches FSDP on
    only for accelerator devices (on CPU ``ACCELERATE_USE_FSDP`` leaves the run ``MULTI_CPU``). torch's own FSDP2
    (``fully_shard``) does run on CPU with gloo; the two designs measured there (sharding everything: SPR, checkpoints,
    export and clipping would each need a DTensor form; sharding only the frozen base with the adapters in
    ``ignored_params``: it trains, but leaves a model whose ``state_dict()`` holds DTensors and that PEFT cannot merge)
    and why the gain is small (a frozen base: calibration, evaluation and merge need it whole on one device anyway)
    are in docs/DESIGN.md, the bullet on sharded training, and ``docs/probes/fsdp2_frozen_base.py``. A 7B base in
    bf16 fits one GPU, so DDP (the default of ``accelerate launch``) is the multi-GPU / multi-node mode.

    Raises:
        ValueError: a sharded distributed type (the message says what to use instead).
    """
    kind = distributed_type.value if isinstance(distributed_type, DistributedType) else str(distributed_type)
    kind = kind.rsplit(".", 1)[-1].upper()
    if kind in _SHARDED:
        raise ValueError(f"sharded training ({kind}) is not supported (checkpoints, regularisers and "
                         "export read whole parameters); run with DDP (`accelerate launch` without "
                         "--use_fsdp/--use_deepspeed, or `torchrun`) or on one device")
