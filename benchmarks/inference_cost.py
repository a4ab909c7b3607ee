"""Inference cost (paper Table 3): latency and throughput of merged vs routed methods, as ratios to the base model.

On SmolLM2-135M-Instruct and the same evaluation examples (CSQA + OBQA eval splits, prompt + correct answer):

- throughput: forward passes over every example in right-padded batches (``--batch-size``), samples/s;
- latency: greedy generation of ``--new-tokens`` tokens for ``--latency-prompts`` prompts at batch size 1,
  median ms per prompt (what a user waits for).

Variants: the base model; merged ThanoRA (prepared, trained weights simulated by seeded noise, exported as stock
PEFT and merged by PEFT into a plain transformers model: the deployment path); unmerged PEFT LoRA and DoRA (adapter
kept beside W); HydraLoRA 3B1A and 4B1A and mtLoRA (routers kept: they cannot be merged). Every variant is measured
in every round, interleaved, and each ratio is taken to the base model within the same round; the table gives the
median ratio over rounds and its range. Expectation from the paper: merged ThanoRA within noise of the base model,
HydraLoRA 20-35 % slower.

    python benchmarks/inference_cost.py [--rounds 3] [--n-eval 100] [--device auto]

Writes benchmarks/results/inference_cost.json and .md (atomically); prints the table.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common import now, publish, resolve_device, run_metadata, sync
from workload import MIXTURES, eval_features, load_base, prepare, simulate_training_, task_batches

RESULTS = Path(__file__).parent / "results"
VARIANTS: dict[str, tuple[str, dict[str, Any]] | None] = {
    "base": None,
    "thanora (merged)": ("thanora", {"rank": 64, "lora_dropout": 0.0}),
    "lora (unmerged)": ("lora", {"rank": 64, "lora_dropout": 0.0}),
    "dora (unmerged)": ("dora", {"rank": 64, "lora_dropout": 0.0}),
    "hydralora 3B1A": ("hydralora", {"preset": "3B1A"}),
    "hydralora 4B1A": ("hydralora", {"preset": "4B1A"}),
    "mtlora": ("mtlora", {"rank": 16, "n_heads": 16, "groups": 18}),  # configs/csqa_obqa_mtlora.yaml
}


def build_variant(label: str, device: torch.device, calibration: dict[str, list], workdir: Path
                  ) -> tuple[nn.Module, dict[str, Any]]:
    """The model of one variant and facts about it (trainable parameters; merged-vs-unmerged check)."""
    from transformers import AutoModelForCausalLM

    from thanora.adapters.merge import merge_adapter_into
    from thanora.methods.registry import get_method

    base, _ = load_base(device)
    spec = VARIANTS[label]
    if spec is None:
        return base, {"params": 0}
    name, settings = spec
    model, _ = prepare(name, settings, base, calibration)
    simulate_training_(model)
    info = {"params": sum(p.numel() for p in model.parameters() if p.requires_grad)}
    if label.endswith("(merged)"):
        adapter = workdir / label.replace(" ", "_").replace("(", "").replace(")", "")
        get_method(name).export(model, adapter)
        folder = merge_adapter_into(load_base(device)[0], adapter, adapter.with_name(adapter.name + "_merged"))
        merged = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
        probe = torch.randint(3, 1000, (2, 24), device=device)
        with torch.no_grad():
            reference = model(probe).logits
            info["max_abs_dlogits_merged_vs_unmerged"] = float((merged(probe).logits - reference).abs().max())
            info["max_abs_logits"] = float(reference.abs().max())
        return merged, info
    return model.eval(), info


def throughput(model: nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> float:
    """Samples per second of plain forward passes over ``batches``."""
    n = sum(b["input_ids"].shape[0] for b in batches)
    sync(device)
    start = now()
    with torch.inference_mode():
        for batch in batches:
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    sync(device)
    return n / (now() - start)


def latency_ms(model: nn.Module, prompts: list[torch.Tensor], new_tokens: int, pad_id: int,
               device: torch.device) -> float:
    """Median milliseconds per prompt of greedy generation at batch size 1."""
    times = []
    with torch.inference_mode():
        for ids in prompts:
            sync(device)
            start = now()
            model.generate(input_ids=ids[None], attention_mask=torch.ones_like(ids)[None], max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=pad_id)
            sync(device)
            times.append(now() - start)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n-eval", type=int, default=100, help="evaluation examples per task (CSQA, OBQA)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--latency-prompts", type=int, default=12)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=160)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help=f"subset of {list(VARIANTS)}")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "inference_cost")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    torch.manual_seed(0)
    from thanora.data.formats import collate

    _, tokenizer = load_base(device)
    tasks = MIXTURES[2]
    features = eval_features(tokenizer, tasks, args.n_eval, args.max_length)
    features.sort(key=lambda f: len(f["input_ids"]))  # length-bucketed batches: padding does not dominate
    batches = [{k: v.to(device) for k, v in collate(features[i:i + args.batch_size], tokenizer.pad_token_id).items()}
               for i in range(0, len(features), args.batch_size)]
    step = max(1, len(features) // args.latency_prompts)
    prompts = [torch.tensor(f["input_ids"][: len(f["input_ids"]) - sum(1 for x in f["labels"] if x != -100)],
                            device=device) for f in features[::step][: args.latency_prompts]]
    calibration = task_batches(tokenizer, tasks, 16, 16, args.max_length, device).calibration
    with tempfile.TemporaryDirectory() as tmp:
        models, facts = {}, {}
        for label in args.variants:
            models[label], facts[label] = build_variant(label, device, calibration, Path(tmp))
            print(f"built {label}: {facts[label]}", flush=True)
        measures: dict[str, dict[str, list[float]]] = {v: {"throughput": [], "latency_ms": []} for v in models}
        for round_ in range(args.rounds):
            for label, model in models.items():
                measures[label]["throughput"].append(throughput(model, batches, device))
                measures[label]["latency_ms"].append(latency_ms(model, prompts, args.new_tokens,
                                                                tokenizer.pad_token_id, device))
            print(f"round {round_ + 1}/{args.rounds} done", flush=True)
    rows = []
    for label, m in measures.items():
        thr_ratio = [b / v for v, b in zip(m["throughput"], measures["base"]["throughput"], strict=True)]
        lat_ratio = [v / b for v, b in zip(m["latency_ms"], measures["base"]["latency_ms"], strict=True)]
        rows.append({"variant": label, **facts[label],
                     "throughput_samples_s": statistics.median(m["throughput"]),
                     "latency_ms": statistics.median(m["latency_ms"]),
                     "time_ratio_throughput": statistics.median(thr_ratio),
                     "time_ratio_throughput_range": [min(thr_ratio), max(thr_ratio)],
                     "latency_ratio": statistics.median(lat_ratio),
                     "latency_ratio_range": [min(lat_ratio), max(lat_ratio)],
                     "raw": m})
    result = {"benchmark": "inference_cost", "meta": run_metadata(vars(args) | {"out": str(args.out)}, device),
              "n_examples": len(features), "n_latency_prompts": len(prompts), "rows": rows}
    publish(args.out, result, render(result))
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown table of the ratios (time per sample relative to the base model: 1.00 = as fast)."""
    meta = result["meta"]
    lines = [
        "# Inference cost (paper Table 3)",
        "",
        f"`{meta['command']}` on {meta['machine']['device']} ({meta['machine']['processor']}, "
        f"{meta['machine']['torch_threads']} threads), {meta['timestamp_utc']}. {result['n_examples']} evaluation "
        f"examples (CSQA + OBQA); latency over {result['n_latency_prompts']} prompts, "
        f"{meta['args']['new_tokens']} new tokens, batch 1. Medians over {meta['args']['rounds']} interleaved rounds; "
        "ratios are taken to the base model within each round (range in brackets).",
        "",
        "| variant | trainable params | forward time × base | generation latency × base | samples/s | latency ms |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lo, hi = r["time_ratio_throughput_range"]
        llo, lhi = r["latency_ratio_range"]
        lines.append(f"| {r['variant']} | {r['params']:,} | {r['time_ratio_throughput']:.2f} [{lo:.2f}, {hi:.2f}] | "
                     f"{r['latency_ratio']:.2f} [{llo:.2f}, {lhi:.2f}] | {r['throughput_samples_s']:.1f} | "
                     f"{r['latency_ms']:.0f} |")
    merged = [r for r in result["rows"] if "max_abs_dlogits_merged_vs_unmerged" in r]
    for r in merged:
        lines.append(f"\n{r['variant']}: max |logits(merged) − logits(unmerged)| = "
                     f"{r['max_abs_dlogits_merged_vs_unmerged']:.1e} (the merged model is the trained one).")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
