"""Low-precision bases: how far the residual initialisation moves the model at step 0, and what exactness costs.

ThanoRA and CorDA rewrite each base weight as W_res = W − s·B₀A₀ (``residual_mode: rewrite``, the paper's and PEFT's);
in bf16 / fp16 W_res is rounded, and with γ = 5 and several tasks the subtracted part is large, so the rounding does
not cancel against the adapter the way it does in float32. ``residual_mode: branch`` keeps W and subtracts s·B₀A₀
through a frozen second LoRA path in the adapter's float32. For the tiny Llama of the tests and SmolLM2, each dtype
and mode: the init error, max |logits(prepared) − logits(base)| on real CSQA + OBQA batches (the base in the same
dtype), relative to the logits' spread; and, in float32 on SmolLM2, the training step time of ``branch`` over
``rewrite`` (interleaved, median of ``--steps`` steps).

    python benchmarks/low_precision.py [--steps 8]

Writes benchmarks/results/low_precision.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DTYPES = ("float32", "bfloat16", "float16")


def init_errors(model_name: str, calibration: dict[str, list], probe: list[dict[str, Any]]) -> list[dict[str, Any]]:
    import torch

    import thanora
    from thanora.methods.corda import CordaSettings
    from thanora.methods.registry import get_method

    rows = []
    for dtype_name in DTYPES:
        dtype = getattr(torch, dtype_name)
        base = _model(model_name, dtype)
        with torch.no_grad():
            reference = [base(**b).logits.float() for b in probe]
        spread = float(torch.cat([r.flatten() for r in reference]).std())
        for method in ("thanora", "corda"):
            for mode in ("rewrite", "branch"):
                model = _model(model_name, dtype)
                if method == "thanora":
                    cfg = thanora.ThanoraConfig(rank=16, lora_dropout=0.0, residual_mode=mode)
                    prepared = thanora.prepare_model(model, calibration, cfg, progress=False)
                else:
                    from thanora.methods.base import MethodContext

                    prepared = get_method("corda").prepare(model, CordaSettings(rank=16, residual_mode=mode),
                                                           MethodContext(calibration=calibration, progress=False))
                with torch.no_grad():
                    error = max(float((prepared(**b).logits.float() - r).abs().max())
                                for b, r in zip(probe, reference, strict=True))
                rows.append({"model": model_name, "dtype": dtype_name, "method": method, "mode": mode,
                             "max_abs_dlogit": error, "relative_to_spread": error / spread})
                print(f"{model_name} {dtype_name} {method} {mode}: max |Δlogit| {error:.3g}", flush=True)
    return rows


def _model(name: str, dtype: Any) -> Any:
    import torch

    if name == "tiny-llama":
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import tiny_llama

        return tiny_llama(dtype=dtype)
    from workload import load_base

    model, _ = load_base(torch.device("cpu"), dtype)
    return model


def step_cost(calibration: dict[str, list], batches: list[dict[str, Any]], steps: int) -> dict[str, Any]:
    """Float32 SmolLM2: median training step time of ``branch`` and ``rewrite``, interleaved."""
    import torch

    import thanora
    from thanora.training.loss import task_loss

    models, optimizers = {}, {}
    for mode in ("rewrite", "branch"):
        cfg = thanora.ThanoraConfig(rank=16, lora_dropout=0.0, residual_mode=mode)
        models[mode] = thanora.prepare_model(_model("smollm2", torch.float32), calibration, cfg, progress=False)
        models[mode].train()
        optimizers[mode] = torch.optim.AdamW([p for p in models[mode].parameters() if p.requires_grad], lr=1e-5,
                                             fused=True)
    times: dict[str, list[float]] = {"rewrite": [], "branch": []}
    for k in range(steps + 2):
        batch = batches[k % len(batches)]
        for mode in ("rewrite", "branch") if k % 2 else ("branch", "rewrite"):
            start = time.perf_counter()
            loss = task_loss(models[mode], batch)
            loss.backward()
            optimizers[mode].step()
            optimizers[mode].zero_grad(set_to_none=True)
            if k >= 2:
                times[mode].append(time.perf_counter() - start)
    median = {mode: statistics.median(v) for mode, v in times.items()}
    return {"step_s": median, "branch_over_rewrite": median["branch"] / median["rewrite"], "steps": steps}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--out", type=Path, default=RESULTS / "low_precision")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    from common import publish, run_metadata
    from thanora.data.formats import collate
    from workload import MIXTURES, load_base, task_batches

    _, tokenizer = load_base(torch.device("cpu"))
    data = task_batches(tokenizer, MIXTURES[2], 32, 16, 160, torch.device("cpu"))
    probe = [{k: v for k, v in collate(data.features[i:i + 8], tokenizer.pad_token_id).items()
              if k in ("input_ids", "attention_mask")} for i in (0, 8)]
    tiny_calibration = {t: [{k: v % 128 if k == "input_ids" else v for k, v in b.items()} for b in batches]
                        for t, batches in data.calibration.items()}  # the tiny model's 128-word vocabulary
    tiny_probe = [{k: v % 128 if k == "input_ids" else v for k, v in b.items()} for b in probe]
    rows = init_errors("tiny-llama", tiny_calibration, tiny_probe) + init_errors("smollm2", data.calibration, probe)
    train_batches = [{k: v for k, v in collate(data.features[i:i + 8], tokenizer.pad_token_id).items()
                      if k != "task_id"} for i in range(0, 64, 8)]
    cost = step_cost(data.calibration, train_batches, args.steps)
    result = {"benchmark": "low_precision", "meta": run_metadata(vars(args) | {"out": str(args.out)},
                                                                  torch.device("cpu")),
              "init": rows, "cost": cost}
    publish(args.out, result, render(result))
    return result


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Residual init in low precision", "", f"`{meta['command']}`, {meta['timestamp_utc']}. Max |logit "
             "difference| between the prepared model (step 0) and the untouched base in the same dtype, over two "
             "batches of real CSQA + OBQA text; relative = over the standard deviation of the base logits. Rank 16, "
             "2 tasks, γ = 5 (ThanoRA), γ = 1 (CorDA).", "",
             "| model | dtype | method | rewrite (max abs, relative) | branch (max abs, relative) |",
             "|---|---|---|---|---|"]
    init = result["init"]
    for model in dict.fromkeys(r["model"] for r in init):
        for dtype in DTYPES:
            for method in ("thanora", "corda"):
                cells = {r["mode"]: r for r in init if (r["model"], r["dtype"], r["method"]) == (model, dtype, method)}
                lines.append(f"| {model} | {dtype} | {method} | " + " | ".join(
                    f"{cells[m]['max_abs_dlogit']:.3g} ({cells[m]['relative_to_spread']:.2g})"
                    for m in ("rewrite", "branch")) + " |")
    cost = result["cost"]
    lines += ["", f"Training cost (SmolLM2, float32, batch 8, median of {cost['steps']} interleaved steps): branch "
              f"{cost['step_s']['branch']:.3f} s vs rewrite {cost['step_s']['rewrite']:.3f} s per step, "
              f"{cost['branch_over_rewrite']:.2f}x."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
