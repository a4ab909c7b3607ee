"""Why ThanoRA moves differently: the size of each optimiser step's weight update and the loss curve, per method, at
the same learning rate, over the first steps of training.

SmolLM2-135M-Instruct, the real CSQA + OBQA mixture (the accuracy benchmark's small-scale training examples), every
linear layer, rank 16, batch 8, AdamW, constant rate after no warm-up; LoRA, CorDA and ThanoRA (HASI + SPR, the demo's
settings) each at every ``--lrs`` rate. After every optimiser step (`thanora.training.train.train`'s ``eval_fn``) the
effective update of every module, ΔW = s·(B·A − B_prev·A_prev), is measured relative to the module's original weight:
‖ΔW‖_F / ‖W‖_F, and the distance travelled, ‖s·(B·A − B₀·A₀)‖_F / ‖W‖_F. Also recorded at initialisation: the mean
Frobenius norms of A and B (ThanoRA's task blocks carry √γ·√(S/s) of the top singular directions, and A grows as
C^(-1/2) with the damped covariance: `spr_normalization`'s reason), which set how far one Adam step moves s·B·A:
Adam moves every entry by about the learning rate, so ΔW ≈ s·(ΔB·A + B·ΔA) grows with the factors' norms.

    python benchmarks/update_size.py [--steps 50] [--lrs 1e-4 3e-4]

Writes benchmarks/results/update_size.json, .md and figures/update_size.png.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
RESULTS = HERE / "results"
METHODS: dict[str, tuple[str, dict[str, Any]]] = {
    "lora": ("lora", {"rank": 16, "lora_dropout": 0.0}),
    "corda": ("corda", {"rank": 16}),
    "thanora": ("thanora", {"rank": 16, "lora_dropout": 0.0, "spr_lambda": 1e-3, "spr_normalization": "init"}),
    "thanora_balanced": ("thanora", {"rank": 16, "lora_dropout": 0.0, "spr_lambda": 1e-3, "spr_normalization": "init",
                                     "balance_factors": True}),
}


def lora_layers(model: Any) -> dict[str, Any]:
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in model.named_modules() if isinstance(m, LoraLayer)}


def products(model: Any) -> dict[str, Any]:
    """s·B·A of every LoRA layer (float64, CPU)."""
    out = {}
    for name, layer in lora_layers(model).items():
        key = layer.active_adapters[0]
        A, B = layer.lora_A[key].weight.detach().double(), layer.lora_B[key].weight.detach().double()
        out[name] = layer.scaling[key] * (B @ A)
    return out


def measure(method_label: str, lr: float, steps: int, features: list[dict[str, Any]], calibration: Any,
            tokenizer: Any, base: Any) -> dict[str, Any]:
    from thanora.core.targets import weight_matrix
    from thanora.data.formats import collate
    from thanora.data.mixture import MixtureSampler
    from thanora.data.tasks import DataConfig
    from thanora.methods.base import MethodContext
    from thanora.methods.registry import get_method
    from thanora.training.train import TrainConfig, train

    name, settings = METHODS[method_label]
    method = get_method(name)
    config = method.config_cls(**settings)
    model = method.prepare(base, config, MethodContext(calibration=calibration, progress=False, seed=0))
    initial = products(model)
    layers = lora_layers(model)
    # the original weight: the base layer holds W_res = W − s·B₀A₀ for residual methods
    norms = {n: float((weight_matrix(layers[n].base_layer).detach().double() + initial[n]).norm())
             for n in layers} if name != "lora" else {
        n: float(weight_matrix(layers[n].base_layer).detach().double().norm()) for n in layers}
    factor_norms = {"A": statistics.mean(float(layers[n].lora_A[layers[n].active_adapters[0]].weight.norm())
                                         for n in layers),
                    "B": statistics.mean(float(layers[n].lora_B[layers[n].active_adapters[0]].weight.norm())
                                         for n in layers)}
    previous = dict(initial)
    per_step: list[dict[str, float]] = []

    def after_step(trained: Any, step: int) -> dict[str, float]:
        now = products(trained)
        step_sizes = [float((now[n] - previous[n]).norm()) / norms[n] for n in now]
        travelled = [float((now[n] - initial[n]).norm()) / norms[n] for n in now]
        previous.update(now)
        record = {"step": step, "update_median": statistics.median(step_sizes), "update_max": max(step_sizes),
                  "travelled_median": statistics.median(travelled)}
        per_step.append(record)
        return record

    sizes = [sum(f["task_id"] == t for f in features) for t in range(2)]
    sampler = MixtureSampler(sizes, 8, DataConfig(), 0)

    def factory(epoch: int) -> list[dict[str, Any]]:
        return [collate([features[i] for i in b], tokenizer.pad_token_id) for b in sampler.batches(epoch)]

    cfg = TrainConfig(max_steps=steps, batch_size=8, grad_accum=1, lr=lr, schedule="constant", warmup_ratio=0.0,
                      mixed_precision="no", log_every=1, eval_every=1)
    history = train(model, method, config, factory, cfg, eval_fn=after_step, progress=False).history
    return {"method": method_label, "lr": lr, "factor_norms": factor_norms, "steps": per_step,
            "loss": [h["loss"] for h in history if "loss" in h]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--lrs", type=float, nargs="*", default=[1e-4, 3e-4])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=RESULTS / "update_size")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(HERE))
    import torch

    from common import publish, run_metadata
    from workload import MIXTURES, load_base, task_batches

    torch.manual_seed(0)
    device = torch.device("cpu")
    _, tokenizer = load_base(device)
    data = task_batches(tokenizer, MIXTURES[2], 400, 64, 160, device)
    runs = []
    for lr in args.lrs:
        for label in args.methods:
            base, _ = load_base(device)
            runs.append(measure(label, lr, args.steps, data.features, data.calibration, tokenizer, base))
            last = runs[-1]["steps"][-1]
            print(f"lr {lr:g} {label}: step update {last['update_median']:.2e}, travelled "
                  f"{last['travelled_median']:.2e}, loss {runs[-1]['loss'][0]:.2f} -> {runs[-1]['loss'][-1]:.2f}",
                  flush=True)
    result = {"benchmark": "update_size", "meta": run_metadata(vars(args) | {"out": str(args.out)}, device),
              "runs": runs}
    figure(result, RESULTS / "figures" / f"{args.out.name}.png")
    publish(args.out, result, render(result))
    return result


def figure(result: dict[str, Any], path: Path) -> None:
    from matplotlib.figure import Figure

    from thanora.artifacts import atomic_path

    lrs = sorted({r["lr"] for r in result["runs"]})
    fig = Figure(figsize=(4.2 * len(lrs), 6.4), dpi=150, layout="constrained")
    axes = fig.subplots(2, len(lrs), squeeze=False)
    for col, lr in enumerate(lrs):
        for run in (r for r in result["runs"] if r["lr"] == lr):
            steps = [s["step"] for s in run["steps"]]
            axes[0][col].plot(range(1, len(run["loss"]) + 1), run["loss"], label=run["method"])
            axes[1][col].semilogy(steps, [s["update_median"] for s in run["steps"]], label=run["method"])
        axes[0][col].set_title(f"lr {lr:g}")
        axes[0][col].set_ylabel("training loss")
        axes[1][col].set_ylabel("median ‖ΔW‖/‖W‖ per step")
        axes[1][col].set_xlabel("optimiser step")
        for ax in axes[:, col]:
            ax.grid(alpha=0.3)
    axes[0][0].legend(frameon=False)
    fig.suptitle("Per-step update size and loss, same learning rate (SmolLM2, CSQA + OBQA, rank 16)")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = ["# Update size per step (why ThanoRA moves differently)", "",
             f"`{meta['command']}`, {meta['timestamp_utc']}. Median over the 210 modules of ‖ΔW‖_F/‖W‖_F of one "
             "step (first, mean of steps 1-10, last), distance travelled after the last step, mean factor norms at "
             "initialisation, and the training loss of the first and last steps. Figure: "
             "`figures/update_size.png`.", "",
             "| lr | method | ‖A‖ at init | ‖B‖ at init | step 1 | steps 1-10 | last step | travelled | loss first → "
             "last |", "|---|---|---|---|---|---|---|---|---|"]
    for run in result["runs"]:
        s = run["steps"]
        early = statistics.mean(x["update_median"] for x in s[:10])
        lines.append(f"| {run['lr']:g} | {run['method']} | {run['factor_norms']['A']:.3g} | "
                     f"{run['factor_norms']['B']:.3g} | {s[0]['update_median']:.2e} | {early:.2e} | "
                     f"{s[-1]['update_median']:.2e} | {s[-1]['travelled_median']:.2e} | "
                     f"{run['loss'][0]:.2f} → {run['loss'][-1]:.2f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
