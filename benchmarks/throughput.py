"""Training and scoring throughput: thanora's one training loop against HF Trainer + PEFT, and `thanora eval` against
a plain per-option log-likelihood loop, on the same real examples.

Training (SmolLM2-135M-Instruct, every linear layer of the decoder, batch 8, answer-only labels, one epoch over the
same training examples of the real CSQA + OBQA mixture and the 4-task mixture, at rank 16 and 64): tokens/s (non-padding
tokens of the epoch / wall time of the epoch's training call) and optimiser steps/s of

- ``hf``: `transformers.Trainer` with a PEFT LoRA, its defaults (random order, fused AdamW) and ``hf, grouped`` with
  ``train_sampling_strategy="group_by_length"`` (the anchor: what a plain PEFT script or LLaMA-Factory user gets);
  ``hf, flattened``: the same Trainer with transformers' padding-free ``DataCollatorWithFlattening`` (each batch one
  row of all its sequences, positions restarting, no KV cache: transformers' own packing);
- ``thanora lora, before``: `thanora.training.train.train` as it was before the throughput work (the code at
  ``--baseline-ref``, extracted with ``git archive``; full logits, standard AdamW);
- ``thanora lora, padded`` (``train.pack_sequences: false``: right-padded batches in mixture order), ``thanora lora``
  (the default loop: packed batches, `thanora.training.packing`), ``thanora lora, grouped`` (``data.group_by_length``
  as well), ``thanora thanora`` and ``thanora thanora, grouped`` (HASI + SPR, λ = 1e-4 with
  ``spr_normalization: init``), with this checkout's loop.

All LoRAs: dropout 0, alpha = rank; same learning rate 1e-4, linear schedule, no warm-up, clipping at 1. Each system
runs
in a fresh process (model and data loaded, two warm-up steps, then the timed epoch), ``--rounds`` times in a rotated
order; every ratio is taken to HF Trainer's best, the fastest of the ``hf`` systems within its round, and the table
gives the median and range over rounds (the method of ``train_cost.py``).

Scoring (``--parts eval``): questions/s of `thanora.evaluation.evaluate.evaluate` (batched, options packed) and of a
plain
loop (one forward pass per (prompt, option), batch 1, the same length-normalised log-likelihood), on the same
evaluation questions with the base model; the predictions must agree.

    python benchmarks/throughput.py [--parts train eval] [--rounds 3] [--mixtures 2 4] [--ranks 16 64]

On a GPU, which the real model and data do not reach: ``--model synthetic`` (SmolLM2's configuration with random
weights, random tokens with the real tasks' recorded sequence and answer lengths, `workload.synthetic_base`: the
same compute as the real workload, meaningless losses), training only, e.g.

    python benchmarks/throughput.py --parts train --model synthetic --device cuda --mixed-precision bf16 \
        --epoch-scale 8 --rounds 2 --systems 'hf, grouped' 'hf, flattened' 'thanora lora, padded' 'thanora lora' \
        'thanora thanora' --out benchmarks/results/throughput_cuda

Writes benchmarks/results/throughput.json and .md (atomically); prints the tables. Runs take the machine: run nothing
else meanwhile (a result that overlapped another job is void).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path
from typing import Any

from common import publish, resolve_device, run_metadata, sync

HERE = Path(__file__).parent
RESULTS = HERE / "results"
REPO = HERE.parent
BASELINE_REF = "0582bf9"  # the last commit before the throughput work (full logits, standard AdamW)
SYSTEMS = ("hf", "hf, grouped", "hf, flattened", "thanora lora, before", "thanora lora, padded", "thanora lora",
           "thanora lora, grouped", "thanora thanora", "thanora thanora, grouped")
ANCHOR = "HF Trainer's best"  # per round: the fastest of the "hf" systems measured in that round
N_TRAIN = {2: 96, 4: 48}  # training examples per task: 192 per epoch, 24 optimiser steps at batch 8
LR = 1e-4


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    """In a fresh process: load the model and the examples, two warm-up steps, then time one epoch."""
    import torch

    sys.path.insert(0, str(HERE))
    from workload import MIXTURES, load_base, synthetic_base, synthetic_batches, task_batches

    torch.manual_seed(0)
    device = torch.device(job["device"])
    tasks = MIXTURES[job["mixture"]]
    n_train = N_TRAIN[job["mixture"]] * job["epoch_scale"]
    if job["model"] == "synthetic":
        base, tokenizer = synthetic_base(device)
        data = synthetic_batches(tasks, n_train, 16, base.config.vocab_size, device)
    else:
        base, tokenizer = load_base(device)
        data = task_batches(tokenizer, tasks, n_train, 16, 256, device)
    tokens = sum(len(f["input_ids"]) for f in data.features)
    system, bf16 = job["system"], job["mixed_precision"] == "bf16"
    if system.startswith("hf"):
        seconds, steps = _hf_epoch(base, tokenizer, data.features, job["rank"], system.partition(", ")[2], bf16)
    else:
        seconds, steps = _thanora_epoch(base, tokenizer, data, job["rank"], method=system.split()[1].rstrip(","),
                                        grouped=system.endswith("grouped"), padded=system.endswith("padded"),
                                        bf16=bf16)
    return {**job, "seconds": seconds, "steps": steps, "tokens": tokens, "tokens_per_s": tokens / seconds,
            "steps_per_s": steps / seconds}


def _synchronized_clock(device: Any) -> float:
    """perf_counter after the device's queued work is done (CUDA runs asynchronously)."""
    sync(device)
    return time.perf_counter()


def _hf_epoch(base: Any, tokenizer: Any, features: list[dict[str, Any]], rank: int, variant: str, bf16: bool
              ) -> tuple[float, int]:
    """One timed epoch of HF Trainer + PEFT LoRA; ``variant``: "" (defaults), "grouped" or "flattened"."""
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithFlattening, Trainer, TrainingArguments

    from thanora.core.targets import find_targets

    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, task_type="CAUSAL_LM",
                                            target_modules=list(find_targets(base))))
    rows = [{k: f[k] for k in ("input_ids", "attention_mask", "labels")} for f in features]
    collator = DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100)
    if variant == "flattened":
        rows = [{k: r[k] for k in ("input_ids", "labels")} for r in rows]
        collator = DataCollatorWithFlattening()
        base.config.use_cache = False  # transformers reads packed sequences from the position ids only without one

    def trainer(max_steps: int) -> Any:
        args = TrainingArguments(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=8, learning_rate=LR,
                                 num_train_epochs=1, max_steps=max_steps, lr_scheduler_type="linear", warmup_steps=0,
                                 max_grad_norm=1.0, logging_steps=10_000, save_strategy="no", report_to=[],
                                 use_cpu=base.device.type == "cpu", bf16=bf16, dataloader_num_workers=0,
                                 disable_tqdm=True, seed=0,
                                 train_sampling_strategy="group_by_length" if variant == "grouped" else "random")
        return Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)

    trainer(2).train()  # warm-up
    timed = trainer(-1)
    start = _synchronized_clock(base.device)
    out = timed.train()
    return _synchronized_clock(base.device) - start, int(out.global_step)


def _thanora_epoch(base: Any, tokenizer: Any, data: Any, rank: int, method: str, grouped: bool, padded: bool,
                   bf16: bool) -> tuple[float, int]:
    import dataclasses

    from thanora.data import tasks as task_module
    from thanora.data.formats import collate
    from thanora.methods.base import MethodContext
    from thanora.methods.registry import get_method
    from thanora.training.train import TrainConfig, train

    try:  # where the sampler lives, and whether it groups, depends on the version under test
        from thanora.data.mixture import MixtureSampler
    except ImportError:
        MixtureSampler = task_module.MixtureSampler
    settings = {"rank": rank, "lora_dropout": 0.0}
    if method == "thanora":
        settings |= {"spr_lambda": 1e-4, "spr_normalization": "init"}
    spec = get_method(method)
    config = spec.config_cls(**settings)
    model = spec.prepare(base, config, MethodContext(calibration=data.calibration, progress=False, seed=0))
    fields = {f.name for f in dataclasses.fields(task_module.DataConfig)}
    sampling = task_module.DataConfig(**({"group_by_length": True} if grouped else {}))
    if grouped and "group_by_length" not in fields:
        raise ValueError("this version of thanora has no data.group_by_length")
    features = data.features
    sizes = [sum(f["task_id"] == t for f in features) for t in range(len(data.calibration))]
    kwargs = {"lengths": [len(f["input_ids"]) for f in features]} if grouped else {}
    sampler = MixtureSampler(sizes, 8, sampling, 0, **kwargs)

    def factory(epoch: int) -> list[dict[str, Any]]:
        return [collate([features[i] for i in batch], tokenizer.pad_token_id) for batch in sampler.batches(epoch)]

    loop = {"pack_sequences": False} if padded else {}  # "before" predates the option (and packing)

    def cfg(steps: int) -> TrainConfig:
        return TrainConfig(max_steps=steps, batch_size=8, grad_accum=1, lr=LR, schedule="linear", warmup_ratio=0.0,
                           mixed_precision="bf16" if bf16 else "no", log_every=10_000, **loop)

    train(model, spec, config, factory, cfg(2), progress=False)  # warm-up
    steps = len(sampler)
    device = next(model.parameters()).device
    start = _synchronized_clock(device)
    result = train(model, spec, config, factory, cfg(steps), progress=False)
    return _synchronized_clock(device) - start, result.steps


def baseline_source(ref: str) -> Path:
    """``src/`` of commit ``ref`` (``git archive``), extracted once under ``runs/benchmarks/throughput``."""
    folder = REPO / "runs" / "benchmarks" / "throughput" / f"baseline-{ref}"
    if not (folder / "src" / "thanora").is_dir():
        archive = subprocess.run(["git", "-C", str(REPO), "archive", ref, "src"], capture_output=True, check=True)
        folder.mkdir(parents=True, exist_ok=True)
        with tarfile.open(fileobj=BytesIO(archive.stdout)) as tar:
            tar.extractall(folder, filter="data")
    return folder / "src"


def run_job(job: dict[str, Any], baseline: Path) -> dict[str, Any]:
    """``job`` in a fresh interpreter (the baseline system imports thanora from ``baseline``)."""
    env = dict(os.environ)
    if job["system"].endswith("before"):
        env["PYTHONPATH"] = os.pathsep.join([str(baseline), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True, text=True,
                          env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{job} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_training(args: argparse.Namespace) -> list[dict[str, Any]]:
    baseline = baseline_source(args.baseline_ref)
    rows = []
    for mixture in args.mixtures:
        for rank in args.ranks:
            systems = list(args.systems)
            runs: dict[str, list[dict[str, Any]]] = {s: [] for s in systems}
            for k in range(args.rounds):
                shift = k % len(systems)
                for system in systems[shift:] + systems[:shift]:
                    job = {"system": system, "mixture": mixture, "rank": rank, "model": args.model,
                           "device": args.device, "mixed_precision": args.mixed_precision,
                           "epoch_scale": args.epoch_scale}
                    run = run_job(job, baseline)
                    runs[system].append(run)
                    print(f"{mixture}-task r{rank} round {k + 1}: {system}: {run['tokens_per_s']:.0f} tok/s, "
                          f"{run['steps_per_s']:.2f} steps/s", flush=True)
            anchor = [max((runs[s][k] for s in systems if s.startswith("hf")), key=lambda r: r["tokens_per_s"],
                          default=runs[systems[0]][k]) for k in range(args.rounds)]
            for system in systems:
                ratios = [r["tokens_per_s"] / a["tokens_per_s"] for r, a in zip(runs[system], anchor, strict=True)]
                rows.append({"system": system, "mixture": mixture, "rank": rank,
                             "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[system]),
                             "steps_per_s": statistics.median(r["steps_per_s"] for r in runs[system]),
                             "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
                             "runs": runs[system]})
    return rows


def _eval_worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch

    sys.path.insert(0, str(HERE))
    from thanora.data.formats import encode_example, format_prompt, option_targets
    from thanora.data.tasks import TaskConfig, build_task
    from thanora.evaluation.evaluate import EvalConfig, EvalTask, evaluate
    from workload import MIXTURES, load_base

    device = torch.device("cpu")
    model, tokenizer = load_base(device)
    tasks = [build_task(TaskConfig(n, n, n_train=1, n_eval=job["n_eval"], n_calibration=1), 0) for n in MIXTURES[2]]
    eval_tasks = [EvalTask(t.name, t.eval, "ranked", "accuracy") for t in tasks]
    questions = sum(len(t.eval) for t in tasks)
    out: dict[str, Any] = {"questions": questions}
    for name, cfg in (("thanora eval", EvalConfig(batch_size=16)),
                      ("thanora eval, unpacked", EvalConfig(batch_size=16, pack_options=False))):
        start = time.perf_counter()
        results = evaluate(model, tokenizer, eval_tasks, cfg, device, progress=False)
        out[name] = {"seconds": time.perf_counter() - start,
                     "correct": [c for t in results.values() for c in t["correct"]]}
    start = time.perf_counter()
    correct = []
    with torch.inference_mode():
        for task in tasks:
            for ex in task.eval:
                prompt = format_prompt(ex, "ranked")
                scores = []
                for target in option_targets(ex, "ranked"):
                    enc = encode_example(tokenizer, prompt, target, 2048)
                    ids = torch.tensor([enc["input_ids"]])
                    labels = torch.tensor(enc["labels"][1:])
                    logp = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                    keep = labels != -100
                    scores.append(float(logp[keep].gather(-1, labels[keep, None]).mean()))
                correct.append(float(max(range(len(scores)), key=scores.__getitem__) == ex.answer))
    out["plain loop"] = {"seconds": time.perf_counter() - start, "correct": correct}
    return out


def measure_eval(args: argparse.Namespace) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--eval-worker", json.dumps({"n_eval": args.n_eval})],
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    raw = json.loads(done.stdout.strip().splitlines()[-1])
    n = raw.pop("questions")
    reference = raw["plain loop"]["correct"]
    return {"questions": n, "systems": {
        name: {"seconds": r["seconds"], "questions_per_s": n / r["seconds"],
               "agrees_with_plain_loop": sum(a == b for a, b in zip(r["correct"], reference, strict=True)) / n,
               "accuracy": sum(r["correct"]) / n}
        for name, r in raw.items()}}


def render(result: dict[str, Any]) -> str:
    lines = ["# Training and scoring throughput", ""]
    meta = result["meta"]
    lines.append(f"`{meta['command']}` on {meta['machine']['device']} ({meta['machine']['processor']}, "
                 f"{meta['machine']['torch_threads']} threads), {meta['timestamp_utc']}.")
    if "training" in result:
        args = meta["args"]
        model = ("SmolLM2-135M" if args.get("model", "smollm2") == "smollm2"
                 else "SmolLM2-135M's shape with random weights and tokens (synthetic)")
        precision = " in bf16 autocast" if args.get("mixed_precision") == "bf16" else ""
        lines += ["", f"Training: one epoch of batch 8 ({model}{precision}, all linear layers, {args['rounds']} "
                  "interleaved rounds, "
                  f"a fresh process each); ratio = tokens/s over {ANCHOR} (the fastest `hf` system) in the same round, "
                  "median (range).", "",
                  "| mixture | rank | system | tokens/s | steps/s | × HF Trainer's best |",
                  "|---|---|---|---|---|---|"]
        for r in result["training"]:
            low, high = r["ratio_range"]
            lines.append(f"| {r['mixture']}-task | {r['rank']} | {r['system']} | {r['tokens_per_s']:.0f} | "
                         f"{r['steps_per_s']:.2f} | {r['ratio']:.2f} ({low:.2f}-{high:.2f}) |")
    if "eval" in result:
        e = result["eval"]
        lines += ["", f"Scoring: {e['questions']} CSQA + OBQA evaluation questions, base model, ranked options by "
                  "length-normalised log-likelihood.", "",
                  "| system | questions/s | × plain loop | same answers as the plain loop |", "|---|---|---|---|"]
        plain = e["systems"]["plain loop"]["questions_per_s"]
        for name, r in e["systems"].items():
            lines.append(f"| {name} | {r['questions_per_s']:.1f} | {r['questions_per_s'] / plain:.2f} | "
                         f"{100 * r['agrees_with_plain_loop']:.1f} % |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="*", default=["train", "eval"], choices=["train", "eval"])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--mixtures", nargs="*", type=int, default=[2, 4], choices=[2, 4])
    parser.add_argument("--ranks", nargs="*", type=int, default=[16, 64])
    parser.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=list(SYSTEMS))
    parser.add_argument("--n-eval", type=int, default=100, help="evaluation questions per task (scoring part)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--model", choices=["smollm2", "synthetic"], default="smollm2",
                        help="synthetic: SmolLM2's shape with random weights and the real tasks' recorded lengths "
                             "(results/workload_shape.json), for machines the assets do not reach (a lent GPU)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mixed-precision", choices=["no", "bf16"], default="no", help="for every system alike")
    parser.add_argument("--epoch-scale", type=int, default=1,
                        help="training examples per task x this (a GPU needs longer epochs to time)")
    parser.add_argument("--out", type=Path, default=RESULTS / "throughput")
    args = parser.parse_args(argv)
    if args.model == "synthetic" and "eval" in args.parts:
        parser.error("--parts eval scores real questions: use --model smollm2 (the synthetic model has no text)")
    sys.path.insert(0, str(HERE))
    import torch

    args.device = str(resolve_device(args.device))
    meta = run_metadata(vars(args) | {"out": str(args.out)}, torch.device(args.device))
    previous = args.out.parent / f"{args.out.name}.json"
    result: dict[str, Any] = json.loads(previous.read_text()) if previous.is_file() else {}  # parts accumulate
    result |= {"benchmark": "throughput", "meta": meta}
    if "train" in args.parts:
        result["training"] = measure_training(args)
    if "eval" in args.parts:
        result["eval"] = measure_eval(args)
    publish(args.out, result, render(result))
    return result


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    elif len(sys.argv) == 3 and sys.argv[1] == "--eval-worker":
        print(json.dumps(_eval_worker(json.loads(sys.argv[2]))))
    else:
        main()
