"""Figures: rank allocation and spectral entropy per layer (paper Figures 4 and 1c), accuracy vs rank budget
(Figure 5) and sensitivity to λ, γ, τ (Figure 3), on the real SmolLM2 and the offline tasks.

Parts (``--parts``):

- ``allocation``: ThanoRA's calibration + rank plan on the 4-task mixture (CSQA, OBQA, ARC-Easy, BoolQ), rank 64,
  every linear layer; `thanora.plots` draws the per-layer allocation per task and the normalised entropies.
  No training: minutes on a CPU.
- ``rank``: LoRA, HASI only and HASI + SPR on CSQA + OBQA at rank budgets ``--ranks`` (one seed, fixed lr).
- ``sensitivity``: ThanoRA on CSQA + OBQA with one of λ (spr_lambda), γ (gamma), τ (tau) varied at a time.

The training parts go through `thanora.pipeline.run` (run folders under ``runs/benchmarks/figures/``) at the sizes
of ``benchmarks/accuracy.py --scale``.

    python benchmarks/figures.py --parts allocation
    python benchmarks/figures.py --parts rank sensitivity --scale tiny

Writes benchmarks/results/figures/*.png and figures.json / figures.md.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from accuracy import SCALES, run, run_config, task_configs
from common import resolve_device, run_metadata, write_atomic

RESULTS = Path(__file__).parent / "results"
FIGURES = RESULTS / "figures"
RUNS = Path(__file__).parent.parent / "runs" / "benchmarks" / "figures"
SENSITIVITY = {"spr_lambda": [0.0, 1e-4, 1e-3, 1e-2], "gamma": [1.0, 2.0, 5.0, 10.0], "tau": [0.05, 0.2, 1.0]}
THANORA = {"name": "thanora", "spr_lambda": 1e-3, "spr_normalization": "init", "lora_dropout": 0.0}


def allocation(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate and plan on the 4-task mixture; draw Figures 4 and 1c."""
    from thanora.config import config_from_dict
    from thanora.plots import entropy_figure, rank_allocation_figure, save_figure
    from thanora.stages import plan

    scale = SCALES[args.scale]
    tasks = task_configs(4, scale, dev=False)
    cfg = config_from_dict(run_config(tasks, [{"name": "thanora", "rank": 64}], 2e-4, 0, scale, 4, args.device, False))
    rank_plan = plan(cfg, RUNS / "allocation").to_dict()
    write_atomic(FIGURES / "rank_plan_4task.json", json.dumps(rank_plan, indent=2))
    paths = [save_figure(rank_allocation_figure(rank_plan), FIGURES / "rank_allocation_4task.png"),
             save_figure(entropy_figure(rank_plan), FIGURES / "entropy_4task.png")]
    return {"figures": [str(p.relative_to(RESULTS)) for p in paths], "tasks": [t["name"] for t in tasks]}


def rank_curve(args: argparse.Namespace) -> dict[str, Any]:
    """Average accuracy of LoRA, HASI only and HASI + SPR at every rank budget."""
    scale = SCALES[args.scale]
    scores: dict[str, dict[int, float]] = {}
    for rank in args.ranks:
        methods = [{"name": "lora", "rank": rank}, {**THANORA, "label": "hasi_only", "rank": rank, "spr_lambda": 0.0},
                   {**THANORA, "rank": rank}]
        metrics = run(run_config(task_configs(2, scale, False), methods, args.lr, 0, scale, 2, args.device,
                                 rank == args.ranks[0]), RUNS / f"rank{rank}")
        for m in methods:
            label = m.get("label", m["name"])
            scores.setdefault(label, {})[str(rank)] = metrics[label]["average"]
    _line_plot(scores, "rank budget R", FIGURES / "accuracy_vs_rank.png", log=True)
    return {"scores": scores, "figure": "figures/accuracy_vs_rank.png"}


def sensitivity(args: argparse.Namespace) -> dict[str, Any]:
    """Average accuracy of ThanoRA with λ, γ and τ varied one at a time around the defaults."""
    scale = SCALES[args.scale]
    out: dict[str, dict[float, float]] = {}
    for field, values in SENSITIVITY.items():
        methods = [{**THANORA, "rank": scale["rank"], "label": f"v{i}", field: v} for i, v in enumerate(values)]
        metrics = run(run_config(task_configs(2, scale, False), methods, args.lr, 0, scale, 2, args.device, False),
                      RUNS / f"sensitivity_{field}")
        out[field] = {str(v): metrics[f"v{i}"]["average"] for i, v in enumerate(values)}
    for field, scores in out.items():
        _line_plot({"thanora": scores}, field, FIGURES / f"sensitivity_{field}.png", log=field != "tau")
    return {"scores": out, "figures": [f"figures/sensitivity_{f}.png" for f in out]}


def _line_plot(series: dict[str, dict[str, float]], xlabel: str, path: Path, log: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from thanora.plots import save_figure

    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for label, points in series.items():
        xs = sorted(points, key=float)
        shown = [max(float(x), 1e-5) if log else float(x) for x in xs]  # λ = 0 drawn at 1e-5 on a log axis
        ax.plot(shown, [100 * points[x] for x in xs], marker="o", label=label)
    if log:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("average accuracy (%)")
    ax.legend(frameon=False, fontsize=8)
    ax.grid(alpha=0.3)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parts", nargs="*", default=["allocation"], choices=["allocation", "rank", "sensitivity"])
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--ranks", type=int, nargs="*", default=[16, 32, 64, 128])
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)
    parts = {"allocation": allocation, "rank": rank_curve, "sensitivity": sensitivity}
    path = RESULTS / "figures.json"
    result = json.loads(path.read_text()) if path.is_file() else {}  # parts run separately accumulate
    for name in args.parts:
        result[name] = {**parts[name](args), "meta": run_metadata(vars(args), resolve_device(args.device))}
        print(f"{name}: {json.dumps({k: v for k, v in result[name].items() if k != 'meta'})}", flush=True)
    write_atomic(path, json.dumps(result, indent=2, default=str))
    write_atomic(RESULTS / "figures.md", render(result))
    return result


def render(result: dict[str, Any]) -> str:
    """Markdown linking the figures, with the numbers behind the curves."""
    lines = ["# Figures", ""]
    if "allocation" in result:
        r = result["allocation"]
        lines += [f"Rank allocation and normalised spectral entropy per layer, 4-task mixture "
                  f"({', '.join(r['tasks'])}), rank 64 (`{r['meta']['command']}`):", "",
                  *[f"![{Path(f).stem}]({f})" for f in r["figures"]], ""]
    if "rank" in result:
        r = result["rank"]
        ranks = sorted({k for s in r["scores"].values() for k in s}, key=int)
        lines += [f"Accuracy vs rank budget, CSQA + OBQA (`{r['meta']['command']}`):", "",
                  f"![accuracy vs rank]({r['figure']})", "", "| method | " + " | ".join(ranks) + " |",
                  "|---|" + "---|" * len(ranks)]
        for label, s in r["scores"].items():
            lines.append(f"| {label} | " + " | ".join(f"{100 * s[k]:.1f}" if k in s else "–" for k in ranks) + " |")
        lines.append("")
    if "sensitivity" in result:
        r = result["sensitivity"]
        lines += [f"Sensitivity of ThanoRA, CSQA + OBQA (`{r['meta']['command']}`):", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in r["figures"]]
        for field, s in r["scores"].items():
            lines.append(f"\n{field}: " + ", ".join(f"{k} → {100 * v:.1f}" for k, v in s.items()))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
