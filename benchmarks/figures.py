"""Figures: rank allocation and spectral entropy per layer (paper Figures 4 and 1c), accuracy vs rank budget
(Figure 5) and sensitivity to λ, γ, τ (Figure 3), on the real SmolLM2 and the offline tasks.

Parts (``--parts``):

- ``allocation``: ThanoRA's calibration + rank plan on the 4-task mixture (CSQA, OBQA, ARC-Easy, BoolQ), rank 64,
  every linear layer; `thanora.experiment.plots` draws the per-layer allocation per task and the normalised entropies.
  No training: minutes on a CPU.
- ``rank``: LoRA, HASI only and HASI + SPR on CSQA + OBQA at rank budgets ``--ranks`` (one seed, fixed lr).
- ``sensitivity``: ThanoRA on CSQA + OBQA with one of λ (spr_lambda), γ (gamma), τ (tau) varied at a time.

The training parts go through `thanora.experiment.pipeline.run` (run folders under ``runs/benchmarks/figures/``) at the
sizes
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
from common import resolve_device, run_metadata
from thanora.artifacts import write_json, write_text

RESULTS = Path(__file__).parent / "results"
FIGURES = RESULTS / "figures"
RUNS = Path(__file__).parent.parent / "runs" / "benchmarks" / "figures"
SENSITIVITY = {"spr_lambda": [0.0, 1e-4, 1e-3, 1e-2], "gamma": [1.0, 2.0, 5.0, 10.0], "tau": [0.05, 0.2, 1.0]}
MIN_SPAN = 8.0  # accuracy points: the smallest y range of a curve plot
THANORA = {"name": "thanora", "spr_lambda": 1e-3, "spr_normalization": "init", "lora_dropout": 0.0}


def allocation(args: argparse.Namespace) -> dict[str, Any]:
    """Calibrate and plan on the 4-task mixture; draw Figures 4 and 1c."""
    from thanora.experiment.config import config_from_dict
    from thanora.experiment.plots import entropy_figure, rank_allocation_figure, save_figure
    from thanora.experiment.stages import plan

    scale = SCALES[args.scale]
    tasks = task_configs(4, scale, dev=False)
    cfg = config_from_dict(run_config(tasks, [{"name": "thanora", "rank": 64}], 2e-4, 0, scale, 4, args.device, False))
    rank_plan = plan(cfg, RUNS / "allocation").to_dict()
    write_json(FIGURES / "rank_plan_4task.json", rank_plan)
    paths = [save_figure(rank_allocation_figure(rank_plan), FIGURES / "rank_allocation_4task.png"),
             save_figure(entropy_figure(rank_plan), FIGURES / "entropy_4task.png")]
    return {"figures": [str(p.relative_to(RESULTS)) for p in paths], "tasks": [t["name"] for t in tasks]}


def rank_curve(args: argparse.Namespace) -> dict[str, Any]:
    """Average accuracy of LoRA, HASI only and HASI + SPR at every rank budget."""
    scale = SCALES[args.scale]
    scores: dict[str, dict[int, float]] = {}
    base = None
    for rank in args.ranks:
        methods = [{"name": "lora", "rank": rank}, {**THANORA, "label": "hasi_only", "rank": rank, "spr_lambda": 0.0},
                   {**THANORA, "rank": rank}]
        metrics = run(run_config(task_configs(2, scale, False), methods, args.lr, 0, scale, 2, args.device,
                                 rank == args.ranks[0]), RUNS / f"rank{rank}")
        base = base or metrics.get("base", {}).get("average")
        for m in methods:
            label = m.get("label", m["name"])
            scores.setdefault(label, {})[str(rank)] = metrics[label]["average"]
    _line_plot(scores, "rank budget R", FIGURES / "accuracy_vs_rank.png", log=True, baseline=base)
    return {"scores": scores, "base": base, "setup": setup(args, scale), "figure": "figures/accuracy_vs_rank.png"}


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
    return {"scores": out, "setup": setup(args, scale), "figures": [f"figures/sensitivity_{f}.png" for f in out]}


def setup(args: argparse.Namespace, scale: dict[str, Any]) -> dict[str, Any]:
    """What the curves were trained and evaluated on (for the markdown)."""
    return {"n_train": scale["n_train"], "n_eval": scale["n_eval"], "epochs": scale["epochs"],
            "batch_size": scale["batch_size"], "rank": scale["rank"], "lr": args.lr, "seed": 0,
            "defaults": {k: v for k, v in THANORA.items() if k != "name"}}


def _line_plot(series: dict[str, dict[str, float]], xlabel: str, path: Path, log: bool,
               baseline: float | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from thanora.experiment.plots import save_figure

    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for label, points in series.items():
        xs = sorted(points, key=float)
        shown = [max(float(x), 1e-5) if log else float(x) for x in xs]  # λ = 0 drawn at 1e-5 on a log axis
        ax.plot(shown, [100 * points[x] for x in xs], marker="o", label=label)
    if baseline is not None:
        ax.axhline(100 * baseline, color="grey", linestyle="--", linewidth=1, label="base (zero-shot)")
    if log:
        ax.set_xscale("log")
        xs = sorted({max(float(x), 1e-5) for points in series.values() for x in points})
        ax.set_xticks(xs, [f"{x:g}" if x > 1e-5 else "0" for x in xs])
        ax.minorticks_off()
    low, high = ax.get_ylim()
    if high - low < MIN_SPAN:  # a flat curve must look flat: no zooming into single-question noise
        middle = (low + high) / 2
        ax.set_ylim(middle - MIN_SPAN / 2, middle + MIN_SPAN / 2)
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
    write_json(path, result)
    write_text(RESULTS / "figures.md", render(result))
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
        lines += [f"Accuracy vs rank budget, CSQA + OBQA (`{r['meta']['command']}`). {_setup_sentence(r)}", "",
                  f"![accuracy vs rank]({r['figure']})", "", "| method | " + " | ".join(ranks) + " |",
                  "|---|" + "---|" * len(ranks)]
        if r.get("base") is not None:
            lines.append("| base (zero-shot) | " + " | ".join(f"{100 * r['base']:.1f}" for _ in ranks) + " |")
        for label, s in r["scores"].items():
            lines.append(f"| {label} | " + " | ".join(f"{100 * s[k]:.1f}" if k in s else "–" for k in ranks) + " |")
        lines.append("")
    if "sensitivity" in result:
        r = result["sensitivity"]
        lines += [f"Sensitivity of ThanoRA, CSQA + OBQA, one setting varied at a time around λ = 1e-3, γ = 5, τ = 0.2 "
                  f"(`{r['meta']['command']}`). {_setup_sentence(r)}", ""]
        lines += [f"![{Path(f).stem}]({f})" for f in r["figures"]]
        for field, s in r["scores"].items():
            lines.append(f"\n{field}: " + ", ".join(f"{k} → {100 * v:.1f}" for k, v in s.items()))
    return "\n".join(lines) + "\n"


def _setup_sentence(part: dict[str, Any]) -> str:
    setup = part.get("setup")
    if not setup:
        return ""
    return (f"SmolLM2-135M-Instruct, {setup['n_train']} training examples per task, {setup['epochs']} epoch(s) at "
            f"batch {setup['batch_size']}, lr {setup['lr']:g} for every point, seed {setup['seed']} (one run per "
            f"point), {setup['n_eval']} evaluation questions per task: one question is 0.25 points of the average, "
            "and re-running a point with another thread count moved it by up to 0.8 points (float reduction order), "
            "so read only differences of several points.")


if __name__ == "__main__":
    main()
