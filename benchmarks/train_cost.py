"""Training cost (paper Table 5): step time and peak memory of every method relative to PEFT LoRA at the same rank,
and what SPR costs compared with a full-update orthogonality penalty (PEGO-style).

Part 1, methods: SmolLM2-135M-Instruct, every linear layer of the decoder, rank 64 (HydraLoRA presets at their own
budget), task-stratified batches of real CSQA + OBQA training examples (batch 8, answer-only labels). Each method
runs in a fresh process: prepare (not timed), then ``--warmup`` + ``--steps`` optimiser steps of the loop
`thanora.training.train.train` runs (forward with task ids where the method trains with them, task loss + the method's
regulariser, backward, clipping, AdamW); the median step time and the peak memory of all the steps above the
prepared model's (optimiser state, gradients, activations; RSS on CPU after returning freed memory to the OS,
allocated on CUDA) are reported as ratios to LoRA's, measured in the same run: ``--rounds`` times (3), every
method once per round in a rotated order, each ratio taken within its round; the table gives the median ratio and
its range over rounds (a single sequential pass on a shared 2-core machine was seen to be off by 2x when a short
job overlapped LoRA's run). Two more rows train LoRA and ThanoRA
with gradient checkpointing (`TrainConfig.gradient_checkpointing`): its memory saving and time cost.

Part 2, SPR vs PEGO: ThanoRA prepared for 2 and 4 tasks, on all linear layers and on q/k/v only; in the same
process, interleaved, steps with no regulariser, with SPR (SPEC §5: Gram-block form, never forms a d_out × d_in
product) and with a PEGO-style penalty Σ_{i<j} ‖ΔW_iᵀ ΔW_j‖_F² on the materialised task updates ΔW_t = B_t A_t.
Reported: the step-time overhead of each penalty over the unregularised step, and the penalty's own forward +
backward time and peak memory. Target: SPR adds under 5 % step time.

    python benchmarks/train_cost.py [--steps 6] [--warmup 2] [--rounds 3] [--parts methods spr] [--device auto]

Writes benchmarks/results/train_cost.json and .md (atomically); prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import RssSampler, now, publish, resolve_device, run_metadata, sync
from thanora.training.train import recomputed_activations
from workload import MIXTURES, load_base, prepare, stratified_batches, task_batches, trainable_count

RESULTS = Path(__file__).parent / "results"
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {"rank": 64, "lora_dropout": 0.0}),
    "dora": ("dora", {"rank": 64, "lora_dropout": 0.0}),
    "corda": ("corda", {"rank": 64}),
    "dare": ("dare", {}),
    "hydralora 3B1A": ("hydralora", {"preset": "3B1A"}),
    "hydralora 4B1A": ("hydralora", {"preset": "4B1A"}),
    "rlora_plus": ("rlora_plus", {}),
    "align_lora": ("align_lora", {"rank": 64, "lora_dropout": 0.0}),
    "mtlora": ("mtlora", {}),
    "thanora (HASI only)": ("thanora", {"rank": 64, "lora_dropout": 0.0, "spr_lambda": 0.0}),
    "thanora (HASI + SPR)": ("thanora", {"rank": 64, "lora_dropout": 0.0, "spr_lambda": 1e-4}),
}
# extra rows: a METHODS row trained again with gradient checkpointing (label -> that row's label)
CHECKPOINTED = {f"{label}, gradient checkpointing": label for label in ("lora", "thanora (HASI + SPR)")}
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Job:
    label: str
    method: str
    settings: dict[str, Any]
    device: str
    steps: int
    warmup: int
    batch_size: int
    max_length: int
    gradient_checkpointing: bool = False


def _memory_scope(device: torch.device):
    if device.type == "cuda":
        return _CudaPeak(device)
    return RssSampler()


class _CudaPeak:
    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.base = 0
        self.peak = 0

    def __enter__(self) -> _CudaPeak:
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        self.base = torch.cuda.memory_allocated(self.device)
        return self

    def __exit__(self, *exc: Any) -> None:
        torch.cuda.synchronize(self.device)
        self.peak = torch.cuda.max_memory_allocated(self.device)

    @property
    def peak_delta_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def release_freed_memory() -> None:
    """Hand memory that is free but still mapped back to the OS (glibc ``malloc_trim``), so a later RSS delta
    counts what the measured block allocates rather than what it happens to reuse (no-op off glibc)."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def train_steps(model: nn.Module, method: Any, settings: Any, batches: list[dict[str, torch.Tensor]],
                optimizer: torch.optim.Optimizer, device: torch.device,
                penalty: Any = None) -> list[float]:
    """One timed optimiser step per batch, as `thanora.training.train.train` does it; ``penalty`` (model -> scalar)
    replaces
    the method's regulariser when given. Returns the seconds of every step."""
    params = [p for p in model.parameters() if p.requires_grad]
    times = []
    model.train()
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = batch if method.task_id_at_train else {k: v for k, v in batch.items() if k != "task_id"}
        sync(device)
        start = now()
        loss = model(**inputs).loss
        if penalty is not None:
            loss = loss + penalty(model)
        elif method.regularizer is not None:
            loss = loss + method.regularizer(model, settings, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        times.append(now() - start)
    model.eval()
    return times


def run_method(job: Job) -> dict[str, Any]:
    """Worker: prepare one method on a fresh model, then time its steps and measure their peak memory."""
    from thanora.methods.registry import get_method

    device = torch.device(job.device)
    base, tokenizer = load_base(device)
    tasks = MIXTURES[2]
    data = task_batches(tokenizer, tasks, 32, 16, job.max_length, device)
    batches = stratified_batches(data.features, job.batch_size, len(tasks), tokenizer.pad_token_id,
                                 job.warmup + job.steps)
    model, settings = prepare(job.method, job.settings, base, data.calibration)
    method = get_method(job.method)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    release_freed_memory()  # calibration buffers freed by prepare must not be reused unseen by the RSS delta
    recompute = recomputed_activations(model) if job.gradient_checkpointing else nullcontext()
    with recompute, _memory_scope(device) as memory:  # optimiser state, gradients, activations, method buffers
        train_steps(model, method, settings, batches[: job.warmup], optimizer, device)
        times = train_steps(model, method, settings, batches[job.warmup:], optimizer, device)
    return {"label": job.label, "method": job.method, "settings": job.settings, "params": trainable_count(model),
            "step_s": statistics.median(times), "step_s_all": times, "peak_mb": memory.peak_delta_mb}


def pego_penalty(model: nn.Module) -> torch.Tensor:
    """PEGO-style full-update orthogonality: Σ_modules Σ_{i<j} ‖(B_i A_i)ᵀ (B_j A_j)‖_F² on the materialised task
    updates (d_out × d_in each): what SPR avoids by working on the r × r Gram blocks."""
    from thanora.adapters.record import adapter_of, lora_factors

    adapter = adapter_of(model)
    tasks = list(adapter.plan.tasks)
    terms = []
    for name in adapter.targets:
        A, B = lora_factors(model, name)
        blocks = adapter.blocks[name]
        updates = [B[:, a:b] @ A[a:b] for a, b in (blocks[t] for t in tasks)]
        for i in range(len(updates)):
            for j in range(i + 1, len(updates)):
                terms.append((updates[i].T @ updates[j]).square().sum())
    return torch.stack(terms).sum()


def run_spr(job: Job, n_tasks: int, targets: tuple[str, ...] | None) -> dict[str, Any]:
    """Worker: ThanoRA for ``n_tasks`` tasks on ``targets``; steps without / with SPR / with PEGO, interleaved."""
    from thanora.adapters.record import adapter_of
    from thanora.methods.registry import get_method
    from thanora.methods.thanora import spr_loss

    device = torch.device(job.device)
    base, tokenizer = load_base(device)
    tasks = MIXTURES[n_tasks]
    data = task_batches(tokenizer, tasks, 32, 16, job.max_length, device)
    settings = {"rank": 64, "lora_dropout": 0.0, "spr_lambda": 1e-4, "target_modules": targets}
    model, config = prepare("thanora", settings, base, data.calibration)
    method = get_method("thanora")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-12)  # keeps the init
    penalties = {"none": lambda m: torch.zeros(()), "spr": lambda m: 1e-4 * spr_loss(m),
                 "pego": lambda m: 1e-4 * pego_penalty(m)}
    batches = stratified_batches(data.features, job.batch_size, n_tasks, tokenizer.pad_token_id,
                                 job.warmup + job.steps)
    for fn in penalties.values():  # warm-up
        train_steps(model, method, config, batches[: job.warmup], optimizer, device, fn)
    steps: dict[str, list[float]] = {name: [] for name in penalties}
    for batch in batches[job.warmup:]:
        for name, fn in penalties.items():
            steps[name] += train_steps(model, method, config, [batch], optimizer, device, fn)
    alone: dict[str, dict[str, float]] = {}
    for name in ("spr", "pego"):
        times, peaks = [], []
        for _ in range(job.steps):
            with _memory_scope(device) as memory:
                sync(device)
                start = now()
                penalties[name](model).backward()
                sync(device)
                times.append(now() - start)
            peaks.append(memory.peak_delta_mb)
            model.zero_grad(set_to_none=True)
        alone[name] = {"seconds": statistics.median(times), "peak_mb": max(peaks)}
    median = {name: statistics.median(v) for name, v in steps.items()}
    return {"tasks": n_tasks, "targets": "q/k/v" if targets else "all linear",
            "modules": len(adapter_of(model).targets), "step_s": median, "steps_all": steps,
            "overhead": {name: median[name] / median["none"] - 1 for name in ("spr", "pego")}, "alone": alone}


def in_fresh_process(worker: Callable[..., Any], *args: Any) -> Any:
    """``worker(*args)`` in a new spawned process (nothing shared: comparable peak memory, no warm caches)."""
    with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
        return pool.submit(worker, *args).result()


def measure_methods(jobs: list[Job], rounds: int,
                    measure: Callable[[Job], dict[str, Any]]) -> list[dict[str, Any]]:
    """Measure every job ``rounds`` times (``measure(job)``: a `run_method` result) and pair each round with LoRA's.

    Each round runs every job once, in an order rotated by one per round, so that no method always runs first (on a
    machine still busy with whatever ran before); the ratios to LoRA (the ``lora`` job, else the first) are taken
    within a round and their median and range over rounds reported, so slow drift of the machine cancels and its
    noise shows.
    """
    labels = [job.label for job in jobs]
    runs: dict[str, list[dict[str, Any]]] = {label: [] for label in labels}
    for k in range(rounds):
        shift = k % len(jobs)
        for job in jobs[shift:] + jobs[:shift]:
            run = measure(job)
            runs[job.label].append(run)
            print(f"round {k + 1}/{rounds}, {job.label}: {run['step_s']:.3f} s/step, +{run['peak_mb']:.0f} MiB",
                  flush=True)
    reference = runs["lora" if "lora" in runs else labels[0]]
    rows = []
    for label in labels:
        first = runs[label][0]
        row = {key: first[key] for key in ("label", "method", "settings", "params")}
        row["step_s"] = statistics.median(r["step_s"] for r in runs[label])
        row["peak_mb"] = statistics.median(r["peak_mb"] for r in runs[label])
        for key, field in (("step_ratio", "step_s"), ("memory_ratio", "peak_mb")):
            ratios = [r[field] / ref[field] if ref[field] > 0 else math.nan
                      for r, ref in zip(runs[label], reference, strict=True)]
            row[key], row[f"{key}_range"] = statistics.median(ratios), [min(ratios), max(ratios)]
        row["rounds"] = [{key: r[key] for key in ("step_s", "step_s_all", "peak_mb")} for r in runs[label]]
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="methods part: measure every method this many times (interleaved), report the median "
                             "ratio to LoRA and its range")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--parts", nargs="*", default=["methods", "spr"], choices=["methods", "spr"])
    parser.add_argument("--methods", nargs="*", default=[*METHODS, *CHECKPOINTED],
                        help=f"subset of {[*METHODS, *CHECKPOINTED]}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "train_cost")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1, got {args.rounds}")
    device = resolve_device(args.device)
    meta = run_metadata(vars(args) | {"out": str(args.out)}, device)
    previous = args.out.parent / f"{args.out.name}.json"
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}  # parts accumulate
    result |= {"benchmark": "train_cost", "meta": meta}
    if "methods" in args.parts:
        jobs = [Job(label, *METHODS[CHECKPOINTED.get(label, label)], str(device), args.steps, args.warmup,
                    args.batch_size, args.max_length, gradient_checkpointing=label in CHECKPOINTED)
                for label in args.methods]
        result["methods"] = measure_methods(jobs, args.rounds, lambda job: in_fresh_process(run_method, job))
        result["meta_methods"] = meta
    if "spr" in args.parts:
        rows = []
        for n_tasks in (2, 4):
            for targets in (None, QKV):
                job = Job("thanora", "thanora", {}, str(device), args.steps, args.warmup, args.batch_size,
                          args.max_length)
                rows.append(in_fresh_process(run_spr, job, n_tasks, targets))
                r = rows[-1]
                print(f"T={n_tasks} {r['targets']}: SPR +{100 * r['overhead']['spr']:.1f} %, PEGO "
                      f"+{100 * r['overhead']['pego']:.1f} %", flush=True)
        result["spr"] = rows
        result["meta_spr"] = meta
    publish(args.out, result, render(result))
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown tables: per-method ratios to LoRA; SPR vs PEGO overheads (each part with the command that made it)."""
    meta = result["meta"]
    memory = "peak allocated" if meta["machine"]["device"].startswith("cuda") else "peak RSS"
    lines = ["# Training cost (paper Table 5)"]
    if "methods" in result:
        methods_meta = result.get("meta_methods", meta)
        rounds = methods_meta["args"].get("rounds", 1)
        paired = (f" Each method measured in {rounds} interleaved rounds (a fresh process each time); ratios: median "
                  "over rounds of the ratio to LoRA's run in the same round, with the range." if rounds > 1 else "")
        lines += ["", _provenance(methods_meta) + paired, "",
                  f"| method | trainable params | step time × LoRA | {memory} of the steps × LoRA | s/step | MiB |",
                  "|---|---|---|---|---|---|"]
        for r in result["methods"]:
            lines.append(f"| {r['label']} | {r['params']:,} | {_ratio(r, 'step_ratio')} | "
                         f"{_ratio(r, 'memory_ratio')} | {r['step_s']:.3f} | {r['peak_mb']:.0f} |")
    if "spr" in result:
        lines += ["", "SPR (Gram blocks) vs PEGO-style full-update penalty on ThanoRA (rank 64). "
                  + _provenance(result.get("meta_spr", meta)), "",
                  "| tasks | modules | step, no penalty (s) | SPR step overhead | PEGO step overhead | "
                  "SPR alone: ms / MiB | PEGO alone: ms / MiB |", "|---|---|---|---|---|---|---|"]
        for r in result["spr"]:
            spr, pego = r["alone"]["spr"], r["alone"]["pego"]
            lines.append(f"| {r['tasks']} | {r['targets']} | {r['step_s']['none']:.3f} | "
                         f"{100 * r['overhead']['spr']:+.1f} % | {100 * r['overhead']['pego']:+.1f} % | "
                         f"{1000 * spr['seconds']:.1f} / {spr['peak_mb']:.0f} | "
                         f"{1000 * pego['seconds']:.1f} / {pego['peak_mb']:.0f} |")
    return "\n".join(lines) + "\n"


def _ratio(row: dict[str, Any], key: str) -> str:
    """``median (min-max)`` over rounds; the bare value for a single round (or a result from before rounds)."""
    low, high = row.get(f"{key}_range", [row[key], row[key]])
    return f"{row[key]:.2f}" if low == high else f"{row[key]:.2f} ({low:.2f}-{high:.2f})"


def _provenance(meta: dict[str, Any]) -> str:
    return (f"`{meta['command']}` on {meta['machine']['device']} ({meta['machine']['processor']}, "
            f"{meta['machine']['torch_threads']} threads), {meta['timestamp_utc']}; medians over "
            f"{meta['args']['steps']} steps after {meta['args']['warmup']} warm-up steps, batch "
            f"{meta['args']['batch_size']}, max length {meta['args']['max_length']}.")


if __name__ == "__main__":
    main()
