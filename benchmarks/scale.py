"""The paper's scale: memory and time of calibration + HASI on a Llama-2-7B-width model, bounded vs one-pass.

A model with Llama-2-7B's widths (hidden 4096, FFN 11008, 32 heads, vocabulary 32,000) and ``--layers`` decoder layers
(4 and 8: random weights built from the config), every linear layer adapted, rank 64, real-text calibration batches
(CSQA questions with their answers, SmolLM2's token ids folded into the 32,000-entry vocabulary: the statistics'
shapes and costs are those of real text; their values do not matter here). For T = ``--tasks`` tasks, each
configuration in a fresh process:

- ``bounded``: `thanora.prepare_model` with ``calibration_memory_gb`` (one group of modules' covariances at a time,
  one stopped pass per group) and the size-aware SVD (``svd: auto``: checked randomized above 2,048);
- ``one pass``: the same with every covariance held at once (``calibration_memory_gb: null``), the behaviour before;

and reports the peak RSS above the loaded model and the wall time of calibration + decomposition + HASI. The figure
that must not grow with depth is the memory each added layer costs beyond its own weights: (peak(8) − peak(4)) / 4
minus a layer's weight bytes. The 32-layer (7B) extrapolation adds 24 such layers, plus the weights of a bf16 model
(13.5 GB), for the one-GPU question. PEFT's CorDA keeps every covariance at once as the ``one pass`` row does (its
documentation: "roughly another 2 × MODEL_SIZE"); it is not run here (an exact 4096 × 11008 SVD per module is minutes
on 2 CPU cores).

    python benchmarks/scale.py [--layers 4 8] [--tasks 2] [--budget-gb 1.0] [--samples 16] [--tokens 64]

Writes benchmarks/results/scale.json and .md. Takes the whole machine (run nothing else meanwhile).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
WIDTHS = {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32,
          "vocab_size": 32000, "max_position_embeddings": 4096}
# bytes of one decoder layer's weights at these widths in float32: q, k, v, o (4096²) + gate, up, down (4096×11008)
LAYER_BYTES_F32 = 4 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 2 * 4 * 4096
BF16_7B_GB = 13.5


def _worker(job: dict[str, Any]) -> dict[str, Any]:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(HERE))
    import thanora
    from common import RssSampler
    from thanora.data.formats import collate
    from workload import load_base, task_batches

    torch.manual_seed(0)
    _, tokenizer = load_base(torch.device("cpu"))
    tasks = ("csqa", "obqa", "arc_easy", "boolq")[: job["tasks"]]
    data = task_batches(tokenizer, tasks, job["samples"], 1, job["tokens"], torch.device("cpu"))
    calibration = {}
    for t, name in enumerate(tasks):
        feats = [{"input_ids": [i % WIDTHS["vocab_size"] for i in f["input_ids"]],
                  "attention_mask": f["attention_mask"]} for f in data.features if f["task_id"] == t]
        calibration[name] = [{k: v for k, v in collate(feats[i:i + 8], 0).items() if k != "labels"}
                             for i in range(0, len(feats), 8)]
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(num_hidden_layers=job["layers"], **WIDTHS))
    model = model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.eval()
    import ctypes
    import gc

    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    budget = job["budget_gb"] if job["mode"] == "bounded" else None
    cfg = thanora.ThanoraConfig(rank=64, lora_dropout=0.0, calibration_memory_gb=budget, svd="auto")
    start = time.perf_counter()
    with RssSampler() as memory:
        thanora.prepare_model(model, calibration, cfg, progress=False)
    return {**job, "seconds": time.perf_counter() - start, "peak_mb": memory.peak_delta_mb,
            "model_mb": memory.baseline_mb}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="*", default=[4, 8])
    parser.add_argument("--tasks", type=int, nargs="*", default=[2])
    parser.add_argument("--modes", nargs="*", default=["bounded", "one pass"], choices=["bounded", "one pass"])
    parser.add_argument("--budget-gb", type=float, default=1.0)
    parser.add_argument("--samples", type=int, default=16, help="calibration samples per task")
    parser.add_argument("--tokens", type=int, default=64, help="at most this many tokens per sample")
    parser.add_argument("--out", type=Path, default=RESULTS / "scale")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    from common import publish, run_metadata

    rows = []
    for tasks in args.tasks:
        for layers in args.layers:
            for mode in args.modes:
                job = {"mode": mode, "layers": layers, "tasks": tasks, "budget_gb": args.budget_gb,
                       "samples": args.samples, "tokens": args.tokens}
                done = subprocess.run([sys.executable, __file__, "--worker", json.dumps(job)], capture_output=True,
                                      text=True, timeout=6 * 3600)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-3000:])
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
                r = rows[-1]
                print(f"T={tasks} L={layers} {mode}: +{r['peak_mb']:.0f} MiB over the model, {r['seconds']:.0f} s",
                      flush=True)
    result = {"benchmark": "scale", "meta": run_metadata(vars(args) | {"out": str(args.out)}, torch.device("cpu")),
              "rows": rows, "extrapolation": extrapolate(rows)}
    publish(args.out, result, render(result))
    return result


def extrapolate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (tasks, mode): the memory an added layer costs beyond its weights, and the 32-layer estimate."""
    out = []
    for tasks in sorted({r["tasks"] for r in rows}):
        for mode in sorted({r["mode"] for r in rows}):
            points = sorted((r["layers"], r["peak_mb"], r["seconds"]) for r in rows
                            if r["tasks"] == tasks and r["mode"] == mode)
            if len(points) < 2:
                continue
            (l1, m1, s1), (l2, m2, s2) = points[0], points[-1]
            per_layer = (m2 - m1) / (l2 - l1)
            peak_32 = m2 + per_layer * (32 - l2)
            out.append({"tasks": tasks, "mode": mode, "extra_mb_per_layer": per_layer,
                        "peak_mb_32_layers": peak_32, "seconds_32_layers": s2 + (s2 - s1) / (l2 - l1) * (32 - l2),
                        "fits_24gb_bf16": BF16_7B_GB + peak_32 / 1024 < 24})
    return out


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Calibration + HASI at 7B width", "",
             f"`{meta['command']}`, {meta['timestamp_utc']}, {meta['machine']['processor']} "
             f"({meta['machine']['torch_threads']} threads). Peak RSS above the loaded model (float32 weights; "
             f"a layer's weights are {LAYER_BYTES_F32 / 2**20:.0f} MiB), rank 64, every linear layer.", "",
             "| tasks | layers | mode | peak above the model (MiB) | seconds |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['tasks']} | {r['layers']} | {r['mode']} | {r['peak_mb']:.0f} | {r['seconds']:.0f} |")
    lines += ["", "Extrapolated to 32 layers (Llama-2-7B) from the two depths: the memory an added layer costs "
              "beyond what the model already holds, and whether a bf16 7B model (13.5 GB) plus that peak (float32 "
              "statistics and decomposition, as measured) fits one 24 GB GPU.", "",
              "| tasks | mode | extra MiB per added layer | peak at 32 layers (MiB) | seconds at 32 layers | fits 24 GB"
              " with a bf16 7B |", "|---|---|---|---|---|---|"]
    for e in result["extrapolation"]:
        lines.append(f"| {e['tasks']} | {e['mode']} | {e['extra_mb_per_layer']:.0f} | {e['peak_mb_32_layers']:.0f} | "
                     f"{e['seconds_32_layers']:.0f} | {'yes' if e['fits_24gb_bf16'] else 'no'} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(_worker(json.loads(sys.argv[2]))))
    else:
        main()
