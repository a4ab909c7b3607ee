"""Initialisation cost: thanora's HASI preparation for T = 1, 2, 4 tasks versus PEFT's CorDA (IPM) for one task.

On SmolLM2-135M-Instruct, rank R on q/k/v/o/gate/up/down, the same N real calibration samples per task (CSQA, OBQA,
ARC-Easy, BoolQ, formatted ``<prompt>\\nAnswer: <correct option>`` exactly as in training). Every configuration runs
in a fresh process on a freshly loaded model, timed around the whole preparation (statistics + decomposition +
injection); CPU time is reported beside wall time, as other load on the machine inflates the latter. Memory: peak
RSS above the RSS at the start (psutil, every 10 ms) and, on CUDA, peak allocated. Also: max |logits(prepared) -
logits(base)| on a held-out batch. Target: thanora at T = 2 takes no more wall time than PEFT CorDA at T = 1.

    python benchmarks/init_cost.py [--samples 64] [--batch-size 8] [--repeats 1] [--svd exact|randomized]

Writes benchmarks/results/init_cost[_randomized][_t<threads>].json and .md (atomically); prints the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
import types
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

from common import RssSampler, now, resolve_device, run_metadata, stage_timers, sync
from thanora.artifacts import write_json, write_text

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TASKS = ("csqa", "obqa", "arc_easy", "boolq")
Features = list[list[int]]  # one list of token ids per sample, unpadded
NOTES = [
    "PEFT CorDA's covariance hook assumes batch size 1 and no padding (it squeezes dim 0 and counts calls), so its "
    "run_model feeds the same calibration samples one at a time, unpadded: PEFT's documented usage.",
    "thanora gets the same samples in right-padded batches with an attention mask (padding excluded).",
    "Each configuration runs in a fresh process on a freshly loaded, warmed-up model (one short forward pages the "
    "weights in before the RSS baseline); tokenisation and batching are not timed.",
]


@dataclass(frozen=True)
class Job:
    """One measured preparation: ``method`` on ``tasks``, run in its own process."""

    method: str  # "peft-corda" or "thanora"
    tasks: tuple[str, ...]
    rank: int
    batch_size: int
    svd: str
    device: str
    threads: int  # torch intra-op threads in the worker; 0 keeps torch's default
    calibration: dict[str, Features]
    heldout: Features
    reference: str  # path of the base model's held-out logits

    @property
    def label(self) -> str:
        return f"{self.method} T={len(self.tasks)}"


def load_model(device: torch.device) -> tuple[torch.nn.Module, Any]:
    """A freshly loaded SmolLM2-135M-Instruct (float32, eval mode) and its tokenizer."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thanora.assets import smollm2_dir

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    with torch.no_grad():  # warm-up: pages the memory-mapped weights in, so RSS deltas count only what follows
        model(input_ids=torch.ones(1, 8, dtype=torch.long, device=device))
    return model, AutoTokenizer.from_pretrained(folder)


def build_data(tokenizer: Any, n: int, heldout_per_task: int, max_length: int, seed: int
               ) -> tuple[dict[str, Features], Features]:
    """N calibration samples per task and a disjoint held-out set, tokenised as thanora's training formats them."""
    from thanora.data.formats import encode_example, format_prompt, format_target
    from thanora.data.sources import load_source
    from thanora.data.splits import split_examples

    calibration: dict[str, Features] = {}
    heldout: Features = []
    for task in TASKS:
        split = split_examples(load_source(task), {"train": n, "heldout": heldout_per_task}, seed)
        encode = [encode_example(tokenizer, format_prompt(ex, "ranked"), format_target(ex, "ranked"), max_length)
                  for ex in split["train"] + split["heldout"]]
        calibration[task] = [e["input_ids"] for e in encode[:n]]
        heldout += [e["input_ids"] for e in encode[n:]]
    return calibration, heldout


def padded(features: Features, pad_id: int, device: torch.device) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` (B, L) on ``device``."""
    from thanora.data.formats import collate

    batch = collate([{"input_ids": f} for f in features], pad_id)
    return {k: v.to(device) for k, v in batch.items()}


def import_corda() -> tuple[types.ModuleType, bool]:
    """(``peft.tuners.lora.corda``, shimmed). It imports the undeclared ``attrs`` for one three-field record; if that
    is missing, a stand-in mapping ``attr.dataclass`` to `dataclasses.dataclass` is registered (nothing installed)."""
    shimmed = False
    try:
        import attr  # noqa: F401
    except ModuleNotFoundError:
        shim = types.ModuleType("attr")
        shim.dataclass = dataclasses.dataclass  # type: ignore[attr-defined]
        sys.modules["attr"] = shim
        shimmed = True
    from peft.tuners.lora import corda

    return corda, shimmed


def run_job(job: Job) -> dict[str, Any]:
    """Load a fresh model, run one preparation under the timers, and measure Δlogits (in a worker process)."""
    warnings.filterwarnings("ignore", category=FutureWarning)  # peft/transformers deprecation chatter
    if job.threads:
        torch.set_num_threads(job.threads)
    device = torch.device(job.device)
    model, tokenizer = load_model(device)
    pad_id = tokenizer.pad_token_id
    if job.method == "thanora":
        import thanora
        import thanora.methods.thanora as tp

        batches = {t: [padded(f[i:i + job.batch_size], pad_id, device) for i in range(0, len(f), job.batch_size)]
                   for t, f in job.calibration.items() if t in job.tasks}
        config = thanora.ThanoraConfig(rank=job.rank, target_modules=PROJECTIONS, svd=job.svd)  # type: ignore[arg-type]
        hooks = {"forward": (tp, "collect_covariances"), "decompose": (tp, "decompose_task"),
                 "inject": (tp, "inject_")}
        shimmed = False

        def prepare() -> torch.nn.Module:
            return tp.prepare_model(model, batches, config, progress=False)
    else:
        import peft
        from peft.tuners.lora.config import CordaConfig

        corda, shimmed = import_corda()
        (task,) = job.tasks
        samples = [torch.tensor([f], device=device) for f in job.calibration[task]]
        lora_config = peft.LoraConfig(r=job.rank, lora_alpha=job.rank, lora_dropout=0.05,
                                      target_modules=list(PROJECTIONS), init_lora_weights="corda",
                                      corda_config=CordaConfig(corda_method="ipm"))

        def run_model() -> None:
            for ids in samples:  # batch size 1, no padding: what PEFT's hook supports
                model(input_ids=ids)

        def prepare() -> torch.nn.Module:
            corda.preprocess_corda(model, lora_config, run_model=run_model)
            return peft.get_peft_model(model, lora_config)

        hooks = {"forward": (corda, "calib_cov_distribution"), "decompose": (corda, "collect_eigens"),
                 "inject": (peft, "get_peft_model")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    cuda_base = torch.cuda.memory_allocated(device) if device.type == "cuda" else 0
    with stage_timers(device, hooks) as stages, RssSampler() as rss:
        t0, cpu0 = now(), time.process_time()
        prepared = prepare()
        sync(device)
        wall, cpu = now() - t0, time.process_time() - cpu0  # CPU time: all threads; robust to other load
    cuda_peak = (torch.cuda.max_memory_allocated(device) - cuda_base) / 2**20 if device.type == "cuda" else None
    held = padded(job.heldout, pad_id, device)
    with torch.no_grad():
        logits = prepared.eval()(**held).logits.float().cpu()
    reference = torch.load(job.reference)
    mask = held["attention_mask"].bool().cpu()
    delta = float((logits - reference)[mask].abs().max())
    return {"label": job.label, "method": job.method, "tasks": list(job.tasks), "wall_s": wall, "cpu_s": cpu,
            "stages_s": dict(stages), "peak_rss_delta_mb": rss.peak_delta_mb, "rss_before_mb": rss.baseline_mb,
            "cuda_peak_alloc_delta_mb": cuda_peak, "max_abs_dlogits": delta, "torch_threads": torch.get_num_threads(),
            "attr_shim": shimmed, "load_avg_1m": os.getloadavg()[0]}


def run_isolated(job: Job) -> dict[str, Any]:
    """`run_job` in a fresh spawned process, so no allocator state or weights are shared between configurations."""
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn")) as pool:
        return pool.submit(run_job, job).result()


METRICS = {"wall_s": ("wall s", ".2f"), "cpu_s": ("CPU s", ".1f"), "peak_rss_delta_mb": ("peak RSS Δ MB", ".0f"),
           "cuda_peak_alloc_delta_mb": ("CUDA peak Δ MB", ".0f")}


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median, min and max over the repeats of one configuration (max for Δlogits)."""
    out: dict[str, Any] = {"stages_s": {k: statistics.median([r["stages_s"][k] for r in runs])
                                        for k in runs[0]["stages_s"]},
                           "max_abs_dlogits": max(r["max_abs_dlogits"] for r in runs)}
    for key in METRICS:
        if runs[0][key] is not None:
            values = [r[key] for r in runs]
            out[key] = {"median": statistics.median(values), "min": min(values), "max": max(values)}
    return out


def table(summary: dict[str, dict[str, Any]], repeats: int) -> str:
    """Markdown table: each metric with its ratio to PEFT CorDA (T = 1), Δlogits and the stage times."""
    ref = summary["peft-corda T=1"]
    metrics = [key for key in METRICS if key in ref]
    head = ["config", *(h for key in metrics for h in (METRICS[key][0], "× PEFT")), "max abs Δlogits",
            "forward s", "decompose s", "inject s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, s in summary.items():
        row = [label]
        for key in metrics:
            m, fmt = s[key], METRICS[key][1]
            spread = f" ({m['min']:{fmt}}-{m['max']:{fmt}})" if repeats > 1 else ""
            row += [f"{m['median']:{fmt}}{spread}", f"{m['median'] / max(ref[key]['median'], 1e-9):.2f}"]
        row += [f"{s['max_abs_dlogits']:.1e}", *(f"{s['stages_s'][k]:.1f}" for k in ("forward", "decompose", "inject"))]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=64, help="calibration samples per task (paper: 500)")
    p.add_argument("--batch-size", type=int, default=8, help="thanora's calibration batch size")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--task-counts", type=int, nargs="+", default=[1, 2, 4], choices=[1, 2, 3, 4])
    p.add_argument("--svd", choices=["exact", "randomized"], default="exact", help="ThanoraConfig.svd")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=0, help="torch threads per worker (0: torch's default)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1 ...")
    p.add_argument("--max-length", type=int, default=256, help="token cap per sample (prompt cut from the left)")
    p.add_argument("--heldout", type=int, default=2, help="held-out prompts per task for Δlogits")
    p.add_argument("--seed", type=int, default=0, help="seed of the calibration / held-out split")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, tokenizer = load_model(device)
    calibration, heldout = build_data(tokenizer, args.samples, args.heldout, args.max_length, args.seed)
    with tempfile.TemporaryDirectory(prefix="init_cost.") as tmp:
        reference = Path(tmp) / "base_logits.pt"
        with torch.no_grad():
            torch.save(model(**padded(heldout, tokenizer.pad_token_id, device)).logits.float().cpu(), reference)
        del model
        common = {"rank": args.rank, "batch_size": args.batch_size, "svd": args.svd, "device": str(device),
                  "threads": args.threads, "calibration": calibration, "heldout": heldout, "reference": str(reference)}
        jobs = [Job("peft-corda", TASKS[:1], **common)]
        jobs += [Job("thanora", TASKS[:t], **common) for t in args.task_counts]
        runs: dict[str, list[dict[str, Any]]] = {job.label: [] for job in jobs}
        for rep in range(args.repeats):
            for job in jobs:
                r = run_isolated(job)
                runs[job.label].append(r)
                print(f"[{rep + 1}/{args.repeats}] {job.label}: {r['wall_s']:.1f} s ({r['cpu_s']:.0f} CPU s), "
                      f"RSS +{r['peak_rss_delta_mb']:.0f} MB, max|Δlogits| {r['max_abs_dlogits']:.1e}",
                      file=sys.stderr, flush=True)
    summary = {label: summarise(r) for label, r in runs.items()}
    t2, ref = summary.get("thanora T=2"), summary["peft-corda T=1"]
    target = None if t2 is None else {k: t2["wall_s"][k] <= ref["wall_s"][k] for k in ("median", "min")}
    notes = [*NOTES]
    if any(r["attr_shim"] for r in runs["peft-corda T=1"]):
        notes.append("peft 0.21.2's corda.py imports `attr` (the attrs package), which peft does not declare and "
                     "which is not installed here; the benchmark registered a stand-in mapping attr.dataclass to "
                     "dataclasses.dataclass for that import (nothing installed).")
    md = table(summary, args.repeats)
    tokens = {t: sum(map(len, f)) for t, f in calibration.items()}
    verdict = "n/a" if target is None else ", ".join(f"{'met' if ok else 'NOT met'} on the {k} over repeats"
                                                     for k, ok in target.items())
    text = (f"# Initialisation cost (SmolLM2-135M-Instruct, rank {args.rank}, {len(PROJECTIONS)} projection types, "
            f"{args.samples} samples/task, svd={args.svd}, device {device}, "
            f"{torch.get_num_threads()} torch threads)\n\n{md}\n\n"
            f"Target (thanora T=2 wall <= PEFT CorDA T=1 wall): {verdict}.\n"
            f"Calibration tokens per task: {tokens}.\n\n" + "\n".join(f"- {n}" for n in notes) + "\n")
    print(text)
    stem = "init_cost" + ("" if args.svd == "exact" else f"_{args.svd}") + (f"_t{args.threads}" if args.threads else "")
    args_json = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    result = {**run_metadata(args_json, device), "tasks": list(TASKS), "projections": list(PROJECTIONS),
              "calibration_tokens": tokens, "summary": summary, "runs": runs, "target_met": target, "notes": notes}
    write_json(args.out / f"{stem}.json", result)
    write_text(args.out / f"{stem}.md", text)
    return result


if __name__ == "__main__":
    main()
