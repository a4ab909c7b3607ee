"""Accuracy (paper Tables 1, 2, 4): every method on a task mixture, same budget, fair learning rate, 3 seeds.

For each method (and the ablation LoRA / HASI only / HASI + SPR) on the 2-task (CSQA + OBQA) or the 4-task mixture
(CSQA, OBQA, ARC-Easy in the letter format, BoolQ), with the real SmolLM2-135M-Instruct and the offline datasets:

1. learning-rate sweep: every method gets the same grid (``--lrs``), trained on the training split minus a held-out
   dev slice and scored on that dev slice (never on the evaluation split); the best dev average wins (a tie: the
   lowest rate);
2. final runs: every method at its chosen rate, ``--seeds`` training seeds (adapter init and batch order; the data
   splits stay fixed so every run answers the same questions), same data, steps, rank budget and loop;
3. the table: per-task and average accuracy (mean ± std over seeds), the base model's zero-shot score, and for each
   method a paired bootstrap 95 % confidence interval of its difference to LoRA on the same questions (per-question
   correctness averaged over seeds; for the average, every task's questions resampled independently).

Answer formats where training moves a 135M model: CSQA / OBQA / BoolQ ranked (option text scored by length-normalised
log-likelihood); ARC-Easy in the letter format (paper style) in the 4-task mixture, which a 135M model barely moves:
its row shows that. Every run goes through `thanora.experiment.pipeline.run` (the same code as ``thanora run``); run
folders
are kept under ``runs/benchmarks/accuracy/``.

    python benchmarks/accuracy.py --mixture 2 --scale tiny            # this machine (2 CPU cores)
    python benchmarks/accuracy.py --mixture 2 --scale full --device cuda

Writes benchmarks/results/accuracy_<mixture>task_<scale>.json and .md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common import publish, resolve_device, run_metadata

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).parent.parent / "runs" / "benchmarks" / "accuracy"

# Per scale: examples per task (train, held-out dev carved from train, eval, calibration), rank budget, lr grid.
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"n_train": 128, "n_dev": 32, "n_eval": 200, "n_calibration": 32, "rank": 16, "lrs": [3e-4, 1e-3],
             "batch_size": 8, "epochs": 1},
    "small": {"n_train": 400, "n_dev": 100, "n_eval": 300, "n_calibration": 64, "rank": 32,
              "lrs": [1e-4, 3e-4, 1e-3], "batch_size": 8, "epochs": 1},
    "full": {"n_train": 900, "n_dev": 100, "n_eval": 300, "n_calibration": 128, "rank": 64,
             "lrs": [5e-5, 1e-4, 2e-4, 5e-4], "batch_size": 8, "epochs": 2},
}
# (name, source, answer format, evaluation split of the source or None: a seeded slice of the one split)
MIXTURES: dict[int, list[tuple[str, str, str, str | None]]] = {
    2: [("csqa", "csqa", "ranked", None), ("obqa", "obqa", "ranked", "test")],
    4: [("csqa", "csqa", "ranked", None), ("obqa", "obqa", "ranked", "test"),
        ("arc_easy", "arc_easy", "letter", "test"), ("boolq", "boolq", "ranked", None)],
}


MTLORA_GROUPS = {16: 4, 32: 8, 64: 18, 128: 36}  # divisors of SmolLM2's hidden size 576 close to 18·R/64


def method_entries(rank: int) -> list[dict[str, Any]]:
    """Every method at rank budget ``rank``, matched as the per-method configs do at 64 (configs/csqa_obqa_*.yaml):
    rank R each; DARE R in total (R/2 per task); HydraLoRA N = 3 / 4 heads of rank R/2 (parameters no fewer than
    LoRA's at R); R-LoRA+ 3 heads of rank R (a rank-R LoRA at inference); mtLoRA N = 16 heads of rank R/4 in 18
    router groups on every block at R = 64 (0.99x LoRA's parameters), groups scaled with R elsewhere so the routers
    do not dominate (the table lists every method's count)."""
    half, quarter = max(1, rank // 2), max(1, rank // 4)
    return [
        {"name": "lora", "rank": rank},
        {"name": "dora", "rank": rank},
        {"name": "corda", "rank": rank, "lora_dropout": 0.0},
        {"name": "dare", "rank": rank},
        {"name": "hydralora", "label": "hydralora_3b1a", "n_heads": 3, "rank": half},
        {"name": "hydralora", "label": "hydralora_4b1a", "n_heads": 4, "rank": half},
        {"name": "rlora_plus", "rank": rank, "n_heads": 3},
        {"name": "align_lora", "rank": rank, "align_lambda": 0.01},
        {"name": "mtlora", "rank": quarter, "n_heads": 16, "groups": MTLORA_GROUPS.get(rank, 18)},
        {"name": "thanora", "label": "hasi_only", "rank": rank, "spr_lambda": 0.0, "lora_dropout": 0.0},
        {"name": "thanora", "rank": rank, "spr_lambda": 1e-3, "spr_normalization": "init", "lora_dropout": 0.0},
    ]


def param_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Trainable parameters of every entry on SmolLM2 (analytic, from the model config on the meta device)."""
    from thanora.cli import meta_model
    from thanora.methods.registry import get_method

    model = meta_model("smollm2")
    out = {}
    for entry in entries:
        settings = {k: v for k, v in entry.items() if k not in ("name", "label")}
        method = get_method(entry["name"])
        out[entry.get("label", entry["name"])] = method.param_count(model, method.config_cls(**settings))
    return out


def task_configs(mixture: int, scale: dict[str, Any], dev: bool) -> list[dict[str, Any]]:
    """The mixture's tasks; ``dev`` = train on the training slice minus its last ``n_dev`` examples and evaluate on
    those (the same seeded permutation, so the dev slice lies inside the final runs' training data)."""
    out = []
    for name, source, fmt, eval_split in MIXTURES[mixture]:
        if dev:
            out.append({"name": name, "source": source, "answer_format": fmt,
                        "n_train": scale["n_train"] - scale["n_dev"], "n_eval": scale["n_dev"],
                        "n_calibration": scale["n_calibration"]})
        else:
            out.append({"name": name, "source": source, "answer_format": fmt, "eval_source_split": eval_split,
                        "n_train": scale["n_train"], "n_eval": scale["n_eval"],
                        "n_calibration": scale["n_calibration"]})
    return out


def run_config(tasks: list[dict], methods: list[dict], lr: float, seed: int, scale: dict[str, Any], mixture: int,
               device: str, evaluate_base: bool) -> dict[str, Any]:
    """A ``thanora run`` config (plain data)."""
    return {
        "model": {"name_or_path": "smollm2", "device": device},
        "tasks": tasks,
        "data": {"max_length": 320 if mixture == 4 else 160, "seed": 0},
        "methods": methods,
        "train": {"epochs": scale["epochs"], "batch_size": scale["batch_size"], "grad_accum": 1, "lr": lr,
                  "seed": seed, "log_every": 4},
        "eval": {"batch_size": 32},
        "output": {"adapter": False, "merged": False, "plots": False, "evaluate_base": evaluate_base},
        "seed": seed,
    }


def run(config: dict[str, Any], out: Path) -> dict[str, Any]:
    """``thanora run`` on ``config`` into ``out``; a folder that already holds the methods is read, not re-run, and
    an interrupted run (or one that lacks some of the methods) is resumed: the benchmark can be re-entered."""
    from thanora.experiment.config import config_from_dict
    from thanora.experiment.pipeline import run as run_pipeline

    labels = [m.get("label", m["name"]) for m in config["methods"]]
    if (out / "run.json").is_file() and json.loads((out / "run.json").read_text()).get("status") == "complete":
        metrics = json.loads((out / "metrics.json").read_text())
        if all(label in metrics for label in labels):
            return metrics  # else: a finished run asked for more methods; resuming trains only the missing ones
    resume = (out / "run.json").is_file()
    return run_pipeline(config_from_dict(config), out, overwrite=not resume and out.exists(), resume=resume,
                        progress=False)


class LrChoice(NamedTuple):
    """The learning-rate sweep of some methods: dev scores per rate, the chosen rate, the grid."""

    sweep: dict[str, dict]  # label -> {lr: dev average}
    chosen: dict[str, float]  # label -> lr
    grid: list[float]


def lrs_from(path: Path, labels: list[str]) -> LrChoice:
    """The sweep of methods ``labels`` recorded in an earlier accuracy result JSON.

    Raises:
        SystemExit: the file lacks a method (name it and say how to get it).
    """
    result = json.loads(path.read_text(encoding="utf-8"))
    missing = [label for label in labels if label not in result["rows"]]
    if missing:
        raise SystemExit(f"--lrs-from {path}: no learning rate for {missing}; run their sweep there or drop --lrs-from")
    rows = result["rows"]
    return LrChoice({label: rows[label]["sweep"] for label in labels}, {label: rows[label]["lr"] for label in labels},
                    result["lrs"])


def run_seconds(folders: list[Path]) -> float:
    """Stage wall time summed over the table's run folders (what it cost, even when re-rendered)."""
    return sum(sum(json.loads((folder / "run.json").read_text())["timings_s"].values()) for folder in folders)


def bootstrap_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0
                   ) -> dict[str, list[float]]:
    """Paired bootstrap of mean(a − b) per task and of the unweighted task average: ``{task: [diff, lo, hi]}``."""
    rng = np.random.default_rng(seed)
    out, boots = {}, []
    for task in a:
        diff = a[task] - b[task]
        idx = rng.integers(0, len(diff), size=(n_boot, len(diff)))
        means = diff[idx].mean(axis=1)
        boots.append(means)
        out[task] = [float(diff.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]
    avg = np.mean(boots, axis=0)
    point = float(np.mean([out[t][0] for t in a]))
    out["average"] = [point, float(np.percentile(avg, 2.5)), float(np.percentile(avg, 97.5))]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixture", type=int, choices=sorted(MIXTURES), default=2)
    parser.add_argument("--scale", choices=sorted(SCALES), default="tiny")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
    choice = parser.add_mutually_exclusive_group()
    choice.add_argument("--lrs", type=float, nargs="*", help="learning-rate grid (default: the scale's)")
    choice.add_argument("--lrs-from", type=Path, metavar="RESULT_JSON",
                        help="take each method's learning rate (and its sweep) from an earlier accuracy result "
                             "instead of sweeping here (saves the sweep's runs; the table says where they came from)")
    choice.add_argument("--lr", type=float,
                        help="one learning rate for every method, no sweep: a sensitivity table, not a tuned one "
                             "(written to accuracy_<mixture>task_<scale>_lr<LR> unless --out)")
    parser.add_argument("--methods", nargs="*", help="labels to run (default: all)")
    parser.add_argument("--rank", type=int, help="rank budget (default: the scale's)")
    parser.add_argument("--n-train", type=int, help="training examples per task (default: the scale's)")
    parser.add_argument("--n-eval", type=int, help="evaluation examples per task (default: the scale's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    scale = dict(SCALES[args.scale])
    for key in ("rank", "n_train", "n_eval"):
        scale[key] = getattr(args, key) or scale[key]
    scale["n_dev"] = min(scale["n_dev"], scale["n_train"] // 4)
    lrs = args.lrs or scale["lrs"]
    entries = [e for e in method_entries(scale["rank"])
               if not args.methods or e.get("label", e["name"]) in args.methods]
    root = RUNS / f"{args.mixture}task_{args.scale}_r{scale['rank']}_n{scale['n_train']}-{scale['n_eval']}"
    out = args.out or RESULTS / f"accuracy_{args.mixture}task_{args.scale}{f'_lr{args.lr:g}' if args.lr else ''}"
    started = time.time()

    # 1. learning rate per method: a sweep on the dev slice (one run per rate holding every method), or an earlier one
    labels = [e.get("label", e["name"]) for e in entries]
    folders: list[Path] = []  # the run folders this table reads
    if args.lr:
        sweep, chosen, lrs = {label: {} for label in labels}, dict.fromkeys(labels, args.lr), [args.lr]
    elif args.lrs_from:
        sweep, chosen, lrs = lrs_from(args.lrs_from, labels)
    else:
        sweep = {}
        for lr in lrs:
            folders.append(root / f"sweep_lr{lr:g}")
            metrics = run(run_config(task_configs(args.mixture, scale, True), entries, lr, 0, scale, args.mixture,
                                     args.device, False), folders[-1])
            for entry in entries:
                label = entry.get("label", entry["name"])
                sweep.setdefault(label, {})[lr] = metrics[label]["average"]
            print(f"sweep lr={lr:g}: " + ", ".join(f"{k} {v[lr]:.3f}" for k, v in sweep.items()), flush=True)
        # the best dev average; a tie goes to the lowest rate (the smaller step), whatever the grid's order
        chosen = {label: max(sorted(scores), key=scores.__getitem__) for label, scores in sweep.items()}

    # 2. final runs: one run per (seed, chosen lr) holding the methods that chose it
    finals: dict[str, list[dict[str, Any]]] = {}
    base: dict[str, Any] | None = None
    for seed in args.seeds:
        for lr in sorted(set(chosen.values())):
            group = [e for e in entries if chosen[e.get("label", e["name"])] == lr]
            folders.append(root / f"seed{seed}_lr{lr:g}")
            metrics = run(run_config(task_configs(args.mixture, scale, False), group, lr, seed, scale, args.mixture,
                                     args.device, base is None), folders[-1])
            base = base or metrics.get("base")
            for e in group:
                finals.setdefault(e.get("label", e["name"]), []).append(metrics[e.get("label", e["name"])])
        print(f"seed {seed} done ({(time.time() - started) / 60:.1f} min)", flush=True)

    # 3. aggregate, rows in the methods' order (the final runs went in rate groups)
    finals = {label: finals[label] for label in labels}
    tasks = [t[0] for t in MIXTURES[args.mixture]]
    rows = {}
    per_question = {label: {t: np.mean([np.asarray(r[t]["correct"], dtype=float) for r in runs], axis=0)
                            for t in tasks} for label, runs in finals.items()}
    for label, runs in finals.items():
        row = {"lr": chosen[label], "sweep": sweep[label], "n_seeds": len(runs)}
        for t in [*tasks, "average"]:
            values = [r[t]["score"] if t != "average" else r["average"] for r in runs]
            row[t] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "values": values}
        if "lora" in per_question and label != "lora":
            row["vs_lora"] = bootstrap_diff(per_question[label], per_question["lora"])
        rows[label] = row
    result = {
        "benchmark": "accuracy",
        "meta": run_metadata(vars(args) | {"out": out}, resolve_device(args.device)),  # paths: write_json
        "mixture": tasks, "scale": scale, "lrs": lrs, "lrs_from": args.lrs_from, "lr_fixed": args.lr,
        "seeds": args.seeds, "methods": entries,
        "base": ({t: base[t]["score"] for t in tasks} | {"average": base["average"]}) if base else None,
        "n_eval": {t: len(next(iter(finals.values()))[0][t]["correct"]) for t in tasks},
        "params": param_counts(entries), "rows": rows, "wall_minutes": round((time.time() - started) / 60, 1),
        "run_minutes": round(run_seconds(folders) / 60, 1),
        "runs": str(root),
    }
    publish(out, result, render(result))
    return result


def lr_sentence(result: dict[str, Any], scale: dict[str, Any]) -> str:
    """Where each method's learning rate came from."""
    if result.get("lr_fixed"):
        return (f"One learning rate for every method ({result['lr_fixed']:g}), not tuned: a sensitivity table, to "
                f"read beside the tuned one; seeds {result['seeds']}.")
    if result.get("lrs_from"):
        return (f"Learning rate per method taken from the dev sweep of `{result['lrs_from']}` (grid {result['lrs']}, "
                f"the same for every method; not re-swept on this mixture); then seeds {result['seeds']}.")
    return (f"Learning rate per method chosen on a held-out dev slice ({scale['n_dev']} per task, carved from the "
            f"training split) from {result['lrs']}, the same grid for every method (a tie goes to the lowest rate); "
            f"then seeds {result['seeds']}.")


def render(result: dict[str, Any]) -> str:
    """Markdown: the accuracy table with spreads, base row and bootstrap CIs against LoRA."""
    tasks, meta, scale = result["mixture"], result["meta"], result["scale"]
    lines = [
        f"# Accuracy: {' + '.join(tasks)} ({result['meta']['args']['scale']} scale)", "",
        f"`{meta['command']}` on {meta['machine']['device']}, {meta['timestamp_utc']}, "
        f"{result.get('run_minutes', result['wall_minutes'])} min of runs. "
        f"SmolLM2-135M-Instruct, rank budget {scale['rank']}, {scale['n_train']} training examples per task, "
        f"{scale['epochs']} epoch(s), batch {scale['batch_size']}; evaluation questions per task: "
        + ", ".join(f"{t} {n}" for t, n in result["n_eval"].items())
        + ". " + lr_sentence(result, scale) + " "
        "Cells: accuracy % mean ± std over seeds. Δ LoRA: paired bootstrap 95 % CI of the difference on the same "
        "questions (per-question correctness averaged over seeds).", "",
        "| method | params | lr | " + " | ".join(tasks) + " | average | Δ LoRA (average) [95 % CI] |",
        "|---|---|---|" + "---|" * len(tasks) + "---|---|",
    ]
    if result["base"]:
        lines.append("| base (zero-shot) | 0 | – | " + " | ".join(f"{100 * result['base'][t]:.1f}" for t in tasks)
                     + f" | {100 * result['base']['average']:.1f} | |")
    for label, row in result["rows"].items():
        cells = [f"{100 * row[t]['mean']:.1f} ± {100 * row[t]['std']:.1f}" for t in [*tasks, "average"]]
        ci = row.get("vs_lora", {}).get("average")
        delta = f"{100 * ci[0]:+.1f} [{100 * ci[1]:+.1f}, {100 * ci[2]:+.1f}]" if ci else "–"
        params = f"{result['params'][label] / 1e6:.1f}M"
        lines.append(f"| {label} | {params} | {row['lr']:g} | " + " | ".join(cells) + f" | {delta} |")
    below = [t for t in tasks if result["base"] and all(row[t]["mean"] <= result["base"][t]
                                                         for row in result["rows"].values())]
    if below:
        lines += ["", f"No method beats the base model on: {', '.join(below)}."]
    lines += ["", "Per-task Δ LoRA [95 % CI] (points):", "", "| method | " + " | ".join(tasks) + " |",
              "|---|" + "---|" * len(tasks)]
    for label, row in result["rows"].items():
        if "vs_lora" in row:
            lines.append(f"| {label} | " + " | ".join(
                f"{100 * row['vs_lora'][t][0]:+.1f} [{100 * row['vs_lora'][t][1]:+.1f}, "
                f"{100 * row['vs_lora'][t][2]:+.1f}]" for t in tasks) + " |")
    return "\n".join(lines + sweep_table(result)) + "\n"


def sweep_table(result: dict[str, Any]) -> list[str]:
    """Markdown lines of the dev-slice sweep (average accuracy per method and rate, the chosen one bold); none when
    the rates were not swept by this table."""
    if result.get("lr_fixed") or result.get("lrs_from"):
        return []
    lrs = sorted(result["lrs"])
    lines = ["", "Dev-slice sweep (average accuracy %, chosen rate in bold):", "",
             "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for label, row in result["rows"].items():
        scores = {float(lr): score for lr, score in row["sweep"].items()}  # JSON keys are strings
        cells = [f"{100 * scores[lr]:.1f}" if lr in scores else "–" for lr in lrs]
        cells = [f"**{c}**" if lr == row["lr"] else c for c, lr in zip(cells, lrs, strict=True)]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


if __name__ == "__main__":
    main()
