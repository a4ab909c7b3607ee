"""Worker of tests/test_distributed.py, run as ``torchrun --standalone --nproc_per_node 2 _dist_worker.py OUT``.

Each process (gloo on CPU):
(a) prepares ThanoRA from its shard of the calibration batches with ``all_reduce`` = sum across processes, and,
    as the reference, from all batches with no ``all_reduce``: rank plans and initial factors must agree;
(b) trains the sharded-calibration model for 2 optimizer steps under DDP (``train`` with checkpoints in OUT);
(c) trains DARE under DDP with one task per process (adapters without rows on a process).
Rank 0 writes OUT/result.json; the test compares it (and the step-2 checkpoint) with a single-process run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from accelerate import Accelerator
from accelerate.utils import gather_object

from test_train import (
    calibration_batches,
    collate_features,
    learnable_llama,
    synthetic_features,
)
from thanora import ThanoraConfig, adapter_of
from thanora.adapters.record import lora_factors
from thanora.methods.base import MethodContext
from thanora.methods.dare import DareSettings
from thanora.methods.registry import METHODS
from thanora.training.train import TrainConfig, make_loader_factory, train

# float64 statistics: a sum split across processes differs from the sequential one only by round-off, which the
# C^(-1/2) of a badly conditioned tiny-model covariance amplifies to ~1e-4 in float32.
THANORA_CONFIG = ThanoraConfig(rank=8, lora_dropout=0.0, spr_lambda=1e-4, stats_dtype="float64")
TRAIN_CONFIG = TrainConfig(max_steps=2, batch_size=4, grad_accum=2, lr=1e-2, warmup_ratio=0.0, mixed_precision="no",
                           log_every=1)
N_FEATURES = 32
CALIBRATION_BATCH = 4  # several batches per task, dealt round-robin to the processes


def calibration(features: list[dict]) -> dict[str, list[dict[str, torch.Tensor]]]:
    """Per task, the calibration examples cut into batches of `CALIBRATION_BATCH`."""
    out: dict[str, list[dict[str, torch.Tensor]]] = {}
    for task, (batch,) in calibration_batches(features, per_task=16).items():
        out[task] = [{k: v[i:i + CALIBRATION_BATCH] for k, v in batch.items()}
                     for i in range(0, len(batch["input_ids"]), CALIBRATION_BATCH)]
    return out


def main(out_dir: Path) -> None:
    accelerator = Accelerator(cpu=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    features = synthetic_features(N_FEATURES)
    batches = calibration(features)
    shard = {task: b[rank::world] for task, b in batches.items()}

    def all_reduce(tensor: torch.Tensor) -> torch.Tensor:
        return accelerator.reduce(tensor, "sum")

    method = METHODS["thanora"]
    model = method.prepare(learnable_llama(), THANORA_CONFIG,
                           MethodContext(calibration=shard, all_reduce=all_reduce, progress=False))
    single = method.prepare(learnable_llama(), THANORA_CONFIG, MethodContext(calibration=batches, progress=False))
    plan, single_plan = adapter_of(model).plan, adapter_of(single).plan
    ranks = {n: (p.task_ranks, p.coop_rank) for n, p in plan.modules.items()}
    single_ranks = {n: (p.task_ranks, p.coop_rank) for n, p in single_plan.modules.items()}
    entropy_diff = max(abs(a - b) for n, p in plan.modules.items()
                       for a, b in zip(p.entropies, single_plan.modules[n].entropies, strict=True))
    diff = 0.0
    for name in adapter_of(model).targets:
        for a, b in zip(lora_factors(model, name), lora_factors(single, name), strict=True):
            diff = max(diff, float((a - b).abs().max().detach() / b.abs().max().detach().clamp_min(1e-12)))

    factory = make_loader_factory(features, TRAIN_CONFIG.batch_size, collate_features, seed=0,
                                  num_processes=world, process_index=rank)
    result = train(model, method, THANORA_CONFIG, factory, TRAIN_CONFIG, accelerator, out_dir=out_dir,
                   progress=False)
    flat = torch.cat([p.detach().flatten() for p in model.parameters() if p.requires_grad])
    spread = float((accelerator.reduce(flat, "max") + accelerator.reduce(-flat, "max")).max())  # max - min

    # (c) DARE with each process's batches holding one task only (rank r: task r): the adapter of the other task has
    # no rows on that process; it must still get a (zero) gradient there, or DDP's reducer fails on the next step.
    dare, dare_settings = METHODS["dare"], DareSettings(rank=4, lora_dropout=0.0)
    dare_model = dare.prepare(learnable_llama(), dare_settings, MethodContext(calibration=batches, progress=False))
    own_task = make_loader_factory([f for f in features if f["task_id"] == rank], TRAIN_CONFIG.batch_size,
                                   collate_features, seed=0)
    dare_result = train(dare_model, dare, dare_settings, own_task, TRAIN_CONFIG, accelerator, progress=False)
    dare_flat = torch.cat([p.detach().flatten() for p in dare_model.parameters() if p.requires_grad])
    dare_spread = float((accelerator.reduce(dare_flat, "max") + accelerator.reduce(-dare_flat, "max")).max())

    report = {
        "dare_history": dare_result.history, "dare_spread": dare_spread,
        "world": world, "distributed_type": str(accelerator.distributed_type),
        "tasks_equal": plan.tasks == single_plan.tasks, "ranks_equal": ranks == single_ranks,
        "max_entropy_diff": entropy_diff, "max_rel_factor_diff": diff,
        "history": result.history, "replica_spread": spread,
    }
    reports = gather_object([report])
    if accelerator.is_main_process:
        (out_dir / "result.json").write_text(json.dumps(reports, indent=1), encoding="utf-8")
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
