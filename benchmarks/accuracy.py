"""Accuracy (paper Tables 1, 2, 4): every method on a task mixture, same budget, fair learning rate, 3 seeds.

For each method (and the ablation LoRA / HASI only / HASI + SPR) on the 2-task (CSQA + OBQA) or the 4-task mixture
(CSQA, OBQA, ARC-Easy in the letter format, BoolQ), with the real SmolLM2-135M-Instruct and the offline datasets:

1. learning-rate sweep: every method gets the same grid (``--lrs``), trained on the training split minus a held-out
   dev slice and scored on that dev slice (never on the evaluation split); the best dev average wins (a tie: the
   lowest rate); a method whose best rate is at an edge of the grid gets the next rate beyond it (half a decade),
   until its best lies inside (``--extend``);
2. final runs: every method at its chosen rate (one run per seed, each method with its own ``train.lr``),
   ``--seeds`` training seeds (adapter init and batch order; the data splits stay fixed so every run answers the
   same questions), same data, steps, rank budget and loop;
3. the table: per-task and average accuracy (mean ± std over seeds), the base model's zero-shot score, and for each
   method a paired bootstrap 95 % confidence interval of its difference to LoRA on the same questions and seeds
   (`bootstrap_diff`: seeds resampled, then every task's questions independently); two views of
   the same runs: each method at its own best rate (the fair one, on the evaluation questions) and every method at
   each shared rate of the grid (the paper's protocol, on the dev questions of the sweep).

The ``small`` scale (CPU hours, the deciding table) trains at least ``min_steps`` (250) optimiser steps at batch 8 on
up to 1,000 training examples per task and scores the largest evaluation splits there are (CSQA 321, OBQA test 500,
ARC-Easy test 1,000, BoolQ 1,000); its methods are LoRA, ThanoRA (HASI + SPR), HASI only, CorDA and single-task LoRA
(one adapter per task, trained on that task alone with the same per-task examples and as many passes over them, each
scored on its own task; the row ``lora_single``) and ThanoRA with ``balance_factors`` (``thanora_balanced``: the
update-size option beyond the paper, ablated here) and with λ = 0.1 (``thanora_spr_strong``: at the demo's 1e-3
SPR does not move the blocks), and ``--methods`` adds the others. With ``--effects`` every final
run also measures what the adapter costs the model elsewhere (`model_effects`: KL to the base model on held-out plain
text, the score on HellaSwag, which no method trains on) and, for ThanoRA, which task each block carries (seed 0:
the T × T accuracy drop when one task's block is reset to its initial factors).

Answer formats where training moves a 135M model: CSQA / OBQA / BoolQ ranked (option text scored by length-normalised
log-likelihood); ARC-Easy in the letter format (paper style) in the 4-task mixture, which a 135M model barely moves:
its row shows that. Every run goes through `thanora.experiment.pipeline.run` (the same code as ``thanora run``); run
folders are kept under ``runs/benchmarks/accuracy/`` (git-ignored) and each finished run's metrics and measurements
under ``benchmarks/results/runs/`` (`run_records`, committed): a re-entered benchmark, even on a fresh checkout,
trains only what is not recorded.

    python benchmarks/accuracy.py --mixture 2 --scale tiny            # this machine (2 CPU cores)
    python benchmarks/accuracy.py --mixture 2 --scale full --device cuda

Writes benchmarks/results/accuracy_<mixture>task_<scale>.json and .md; prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

import run_records
from common import publish, resolve_device, run_metadata

RESULTS = Path(__file__).parent / "results"
RUNS = Path(__file__).parent.parent / "runs" / "benchmarks" / "accuracy"

# Per scale: examples per task (train, held-out dev carved from train, eval, calibration), rank budget, lr grid.
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"n_train": 128, "n_dev": 32, "n_eval": 200, "n_calibration": 32, "rank": 16, "lrs": [3e-4, 1e-3],
             "batch_size": 8, "epochs": 1},
    "small": {"n_train": 1000, "n_dev": 100, "n_eval": 1000, "n_calibration": 64, "rank": 16,
              "lrs": [3e-5, 1e-4, 3e-4, 1e-3], "batch_size": 8, "epochs": 1, "min_steps": 250,
              # per task (training examples, evaluation questions): the largest splits there are
              "tasks": {"csqa": (900, 321), "obqa": (500, 500), "arc_easy": (570, 1000), "boolq": (1000, 1000)},
              "methods": ["lora", "thanora", "hasi_only", "corda", "lora_single", "thanora_balanced",
                          "thanora_spr_strong"]},
    "full": {"n_train": 900, "n_dev": 100, "n_eval": 300, "n_calibration": 128, "rank": 64,
             "lrs": [5e-5, 1e-4, 2e-4, 5e-4], "batch_size": 8, "epochs": 2},
}
# (name, source, answer format, evaluation split of the source or None: a seeded slice of the one split)
MIXTURES: dict[int, list[tuple[str, str, str, str | None]]] = {
    2: [("csqa", "csqa", "ranked", None), ("obqa", "obqa", "ranked", "test")],
    4: [("csqa", "csqa", "ranked", None), ("obqa", "obqa", "ranked", "test"),
        ("arc_easy", "arc_easy", "letter", "test"), ("boolq", "boolq", "ranked", None)],
}


# Half-decade steps of the rate grid (extensions beyond an edge go one step further).
RATE_LADDER = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
SINGLE = "lora_single"  # the row of single-task LoRA: one adapter per task, entries lora_single_<task>
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
        {"name": "thanora", "label": "thanora_balanced", "rank": rank, "spr_lambda": 1e-3, "spr_normalization": "init",
         "lora_dropout": 0.0, "balance_factors": True},
        # λ = 1e-3 (init-normalised) leaves the blocks as they are (the penalty went 1.0 -> 0.99997 of its initial
        # value over 250 steps of the small table, answers identical to HASI only): 100x, where SPR has to act
        {"name": "thanora", "label": "thanora_spr_strong", "rank": rank, "spr_lambda": 0.1,
         "spr_normalization": "init", "lora_dropout": 0.0},
        {"name": "lora", "label": SINGLE, "rank": rank},  # expanded per task by `expand_single`
    ]


def param_counts(entries: list[dict[str, Any]]) -> dict[str, int]:
    """Trainable parameters of every entry on SmolLM2 (analytic, from the model config on the meta device)."""
    from thanora.experiment.models import meta_model
    from thanora.methods.registry import get_method

    model = meta_model("smollm2")
    out = {}
    for entry in entries:
        settings = {k: v for k, v in entry.items() if k not in ("name", "label")}
        method = get_method(entry["name"])
        out[label_of(entry)] = method.param_count(model, method.config_cls(**settings))
    return out


def task_sizes(scale: dict[str, Any], name: str) -> tuple[int, int]:
    """(training examples, evaluation questions) of task ``name``: the scale's per-task sizes, capped by
    ``--n-train`` / ``--n-eval``, else its common ones."""
    n_train, n_eval = scale.get("tasks", {}).get(name, (scale["n_train"], scale["n_eval"]))
    return min(n_train, scale["n_train"]), min(n_eval, scale["n_eval"])


def task_configs(mixture: int, scale: dict[str, Any], dev: bool) -> list[dict[str, Any]]:
    """The mixture's tasks; ``dev`` = train on the training slice minus its last ``n_dev`` examples and evaluate on
    those (the same seeded permutation, so the dev slice lies inside the final runs' training data)."""
    out = []
    for name, source, fmt, eval_split in MIXTURES[mixture]:
        n_train, n_eval = task_sizes(scale, name)
        if dev:
            out.append({"name": name, "source": source, "answer_format": fmt,
                        "n_train": n_train - scale["n_dev"], "n_eval": scale["n_dev"],
                        "n_calibration": min(scale["n_calibration"], n_train - scale["n_dev"])})
        else:
            out.append({"name": name, "source": source, "answer_format": fmt, "eval_source_split": eval_split,
                        "n_train": n_train, "n_eval": n_eval, "n_calibration": min(scale["n_calibration"], n_train)})
    return out


def steps_of(tasks: list[dict[str, Any]], scale: dict[str, Any]) -> int | None:
    """``max_steps`` of a run: enough epochs for ``min_steps`` optimiser steps (None: the scale's epochs)."""
    if "min_steps" not in scale:
        return None
    per_epoch = -(-sum(t["n_train"] for t in tasks) // scale["batch_size"])
    return max(scale["min_steps"], per_epoch * scale["epochs"])


def expand_single(entries: list[dict[str, Any]], tasks: list[dict[str, Any]], steps: int | None
                  ) -> list[dict[str, Any]]:
    """``lora_single`` becomes one LoRA per task (``lora_single_<task>``, trained on that task alone), each with as
    many optimiser steps as its share of the mixture's examples gets in the multi-task run (the same passes over the
    same examples); other entries unchanged."""
    out = []
    total = sum(t["n_train"] for t in tasks)
    for entry in entries:
        if entry.get("label") != SINGLE:
            out.append(entry)
            continue
        for task in tasks:
            single = {k: v for k, v in entry.items() if k != "label"}
            single |= {"label": f"{SINGLE}_{task['name']}", "tasks": [task["name"]]}
            if steps is not None:
                share = max(1, round(steps * task["n_train"] / total))
                single["train"] = {**entry.get("train", {}), "max_steps": share}
            out.append(single)
    return out


def run_config(tasks: list[dict], methods: list[dict], lr: float, seed: int, scale: dict[str, Any], mixture: int,
               device: str, evaluate_base: bool) -> dict[str, Any]:
    """A ``thanora run`` config (plain data). The 2-task mixture trains on length-grouped batches (the faster loop:
    CSQA and OBQA have similar lengths, so batches stay mixed); the 4-task mixture does not (BoolQ's passages would
    make most batches single-task)."""
    steps = steps_of(tasks, scale)
    return {
        "model": {"name_or_path": "smollm2", "device": device},
        "tasks": tasks,
        "data": {"max_length": 320 if mixture == 4 else 160, "seed": 0, "group_by_length": mixture == 2},
        "methods": expand_single(methods, tasks, steps),
        "train": {"epochs": scale["epochs"], "batch_size": scale["batch_size"], "grad_accum": 1, "lr": lr,
                  "seed": seed, "log_every": 4, "save_every": 50, **({"max_steps": steps} if steps else {})},
        "eval": {"batch_size": 32},
        "output": {"adapter": bool(scale.get("effects")), "merged": False, "plots": False,
                   "evaluate_base": evaluate_base},
        "seed": seed,
    }


def with_rates(entries: list[dict[str, Any]], chosen: dict[str, float]) -> list[dict[str, Any]]:
    """Each entry with its chosen rate as its own ``train.lr`` (single-task entries by their row's label)."""
    out = []
    for entry in entries:
        label = label_of(entry)
        out.append({**entry, "train": {**entry.get("train", {}), "lr": chosen[label]}})
    return out


def run(config: dict[str, Any], out: Path, landed: Callable[[set[str]], None] | None = None) -> dict[str, Any]:
    """``thanora run`` on ``config`` into ``out``, one method at a time, each recorded as it lands (`run_records`):
    a run served whole from its record or its folder is not re-run, an interrupted one is resumed, and on a fresh
    checkout (the folder gone) only the methods its record lacks are trained. ``landed(labels)`` is called after each
    method with the labels whose adapters are now in ``out`` (what can still be measured on them).

    Training the missing methods of a run on their own gives what the whole run would have: every method starts from
    a fresh base model with its own calibration, sampler and seed (`thanora.experiment.pipeline.run_method`)."""
    from thanora.experiment.config import config_from_dict
    from thanora.experiment.pipeline import run as run_pipeline
    from thanora.experiment.rundir import saved_methods

    base = config["output"]["evaluate_base"]
    record = run_records.load(out)
    changed = record.get("config") not in (None, config)
    if changed:  # keep what the new config still computes the same way, in the record; the folder is stale
        record = run_records.write(out, still_valid(record, config))
    earlier = record.get("metrics", {})
    if all(label_of(m) in earlier for m in config["methods"]) and ("base" in earlier or not base):
        return earlier  # committed: the run folder may be long gone
    saved = set() if changed else set(saved_methods(out))
    todo = [m for m in config["methods"] if label_of(m) not in earlier or label_of(m) in saved]
    held, fresh = [m for m in todo if label_of(m) in saved], [m for m in todo if label_of(m) not in saved]
    output = config["output"] | {"evaluate_base": base and ("base" not in earlier or bool(saved))}
    for k in range(0 if held else 1, len(fresh) + 1):  # the methods the folder holds first (completes a stopped one)
        part = config | {"methods": held + fresh[:k], "output": output}
        resume = (out / "run.json").is_file() and not (changed and k == 1)
        metrics = run_pipeline(config_from_dict(part), out, overwrite=not resume and out.exists(), resume=resume,
                               progress=False)
        timings = json.loads((out / "run.json").read_text())["timings_s"]
        earlier = run_records.update(out, config=config, metrics=earlier | metrics,
                                     timings_s=record.get("timings_s", {}) | timings)["metrics"]
        if landed is not None:
            landed(set(metrics))
    return earlier


def label_of(entry: dict[str, Any]) -> str:
    """The label of a method entry of a run config (its name unless it has one)."""
    return entry.get("label", entry["name"])


def row_of(run_label: str) -> str:
    """The table row a run's method label belongs to (``lora_single_<task>`` -> ``lora_single``, see
    `expand_single`)."""
    return SINGLE if run_label.startswith(f"{SINGLE}_") else run_label


def still_valid(record: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """``record`` reduced to what ``config`` computes the same way, with ``config`` as its config: nothing where a
    run-wide setting differs; where only some method entries differ, everything but those methods' metrics, timings
    and measurements (each method trains on its own, see `run`)."""
    old = record["config"]
    if {k: v for k, v in old.items() if k != "methods"} != {k: v for k, v in config.items() if k != "methods"}:
        return {"config": config}
    kept = {label_of(m) for m in config["methods"] if m in old["methods"]}
    dropped = {label_of(m) for m in old["methods"] + config["methods"]} - kept
    gone = {row_of(label) for label in dropped}
    out: dict[str, Any] = {"config": config,
                           "metrics": {k: v for k, v in record.get("metrics", {}).items() if k not in dropped},
                           "timings_s": {k: v for k, v in record.get("timings_s", {}).items() if k not in dropped}}
    for key in ("effects", "kl", "overlap"):
        if key in record:
            out[key] = {row: v for row, v in record[key].items() if row not in gone}
    return out


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
    """Stage wall time summed over the table's runs (what it cost, even when re-rendered), from their records (every
    method's, also those trained in a folder since replaced), else from the run folder."""

    def timings(folder: Path) -> dict[str, float]:
        recorded = run_records.load(folder).get("timings_s")
        if recorded is not None or not (folder / "run.json").is_file():
            return recorded or {}
        return json.loads((folder / "run.json").read_text())["timings_s"]

    return sum(sum(timings(folder).values()) for folder in folders)


# Paired comparisons beyond "vs LoRA" that the paper argues (the reading needs their intervals): ThanoRA against
# the single-task adapters it claims to surpass, SPR's ablation, and the options beyond the paper against it.
PAIRS = (("thanora", SINGLE), ("hasi_only", SINGLE), ("thanora", "hasi_only"), ("thanora_spr_strong", "hasi_only"),
         ("thanora", "corda"), ("thanora_balanced", "thanora"))


def default_out(mixture: int, scale: str, rank: int, lr: float | None) -> Path:
    """Where a table goes without ``--out``: ``accuracy_<mixture>task_<scale>``, plus ``_r<rank>`` for a rank budget
    other than the scale's and ``_lr<lr>`` for one fixed rate, so no variant overwrites the scale's own table."""
    suffix = (f"_r{rank}" if rank != SCALES[scale]["rank"] else "") + (f"_lr{lr:g}" if lr else "")
    return RESULTS / f"accuracy_{mixture}task_{scale}{suffix}"


def bootstrap_diff(a: dict[str, np.ndarray], b: dict[str, np.ndarray], n_boot: int = 2000, seed: int = 0
                   ) -> dict[str, list[float]]:
    """Paired bootstrap of mean(a − b) per task and of the unweighted task average: ``{task: [diff, lo, hi]}``.

    ``a[task]`` and ``b[task]`` are per-question scores with one row per training seed, ``(seeds, questions)``, row s
    of both from seed s (a 1-D array is one seed). Each resample draws the seeds with replacement, one draw shared by
    every task (a seed's run trains them all), then every task's questions independently: a two-level bootstrap, so
    the interval carries the seed-to-seed spread as well as the sampling of the questions. With one seed it is the
    plain paired bootstrap over questions. The point is the mean over seeds and questions. Not the library's
    `thanora.evaluation.metrics.paired_bootstrap`: that resamples one list of questions, here one seed draw must be
    shared by several tasks' lists.
    """
    shapes = {t: (np.shape(a[t]), np.shape(b[t])) for t in a}
    n_seeds = {sa[0] if len(sa) == 2 else 1 for sa, _ in shapes.values()}  # a scalar: refused below
    if any(sa != sb or len(sa) not in (1, 2) for sa, sb in shapes.values()) or len(n_seeds) != 1:
        raise ValueError(f"need aligned (seeds, questions) scores with the same seeds for every task, got {shapes}")
    diffs = {t: np.asarray(a[t], dtype=float) - np.asarray(b[t], dtype=float) for t in a}
    rng = np.random.default_rng(seed)
    (n_seed,) = n_seeds
    # (n_boot, seeds) indices; no draw for one seed, so a single run's interval is the plain bootstrap's
    drawn = rng.integers(0, n_seed, size=(n_boot, n_seed)) if n_seed > 1 else np.zeros((n_boot, 1), dtype=int)
    out, boots = {}, []
    for task, diff in diffs.items():
        diff = np.atleast_2d(diff)  # (seeds, questions)
        by_question = diff[drawn].mean(axis=1)  # (n_boot, questions): each resample's seeds, averaged
        idx = rng.integers(0, diff.shape[1], size=(n_boot, diff.shape[1]))
        means = np.take_along_axis(by_question, idx, axis=1).mean(axis=1)
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
    parser.add_argument("--methods", nargs="*", help="labels to run (default: the scale's, else all)")
    parser.add_argument("--rank", type=int,
                        help="rank budget (default: the scale's; another one writes accuracy_..._r<RANK> unless --out)")
    parser.add_argument("--n-train", type=int, help="training examples per task, at most (default: the scale's)")
    parser.add_argument("--n-eval", type=int, help="evaluation examples per task, at most (default: the scale's)")
    parser.add_argument("--min-steps", type=int, help="optimiser steps at least (default: the scale's)")
    parser.add_argument("--extend", type=int, default=2,
                        help="times a method whose best rate is at an edge of the grid gets the next rate beyond it")
    parser.add_argument("--effects", action="store_true",
                        help="also measure KL to the base on plain text, the unseen-task score and (ThanoRA, seed 0) "
                             "the block ablation of every final run")
    parser.add_argument("--sweep-only", action="store_true",
                        help="stop after the learning-rate sweep and write its table (dev scores per method and rate, "
                             "the chosen rates, the shared-rate view) to <out>_sweep: a finished piece of a long run")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.sweep_only and (args.lr or args.lrs_from):
        parser.error("--sweep-only sweeps the rates here: drop --lr / --lrs-from")
    scale = dict(SCALES[args.scale])
    for key in ("rank", "n_train", "n_eval"):
        scale[key] = getattr(args, key) or scale[key]
    scale["n_dev"] = min(scale["n_dev"], scale["n_train"] // 4)
    scale["effects"] = args.effects
    if args.min_steps:
        scale["min_steps"] = args.min_steps
    lrs = args.lrs or scale["lrs"]
    wanted = args.methods or scale.get("methods")
    entries = [e for e in method_entries(scale["rank"]) if not wanted or label_of(e) in wanted]
    root = RUNS / f"{args.mixture}task_{args.scale}_r{scale['rank']}_n{scale['n_train']}-{scale['n_eval']}"
    out = args.out or default_out(args.mixture, args.scale, scale["rank"], args.lr)
    started = time.time()
    dev_tasks, eval_tasks = task_configs(args.mixture, scale, True), task_configs(args.mixture, scale, False)
    rows_of = {label_of(e): [label_of(x) for x in expand_single([e], eval_tasks, None)]
               for e in entries}  # row -> the run labels it reads (lora_single -> one per task)

    # 1. learning rate per method: a sweep on the dev slice (one run per rate holding every method), or an earlier one
    labels = list(rows_of)
    folders: list[Path] = []  # the run folders this table reads
    dev: dict[str, dict[float, dict[str, Any]]] = {}  # row -> lr -> dev metrics (per task) of its run labels
    if args.lr:
        sweep, chosen, lrs = {label: {} for label in labels}, dict.fromkeys(labels, args.lr), [args.lr]
    elif args.lrs_from:
        sweep, chosen, lrs = lrs_from(args.lrs_from, labels)
    else:
        sweep = {label: {} for label in labels}
        todo = {lr: list(entries) for lr in lrs}
        for _ in range(args.extend + 1):
            for lr, group in sorted(todo.items()):
                folders.append(root / f"sweep_lr{lr:g}")
                group_rows = {label_of(e): rows_of[label_of(e)] for e in group}
                # with --effects, how far each rate moves the model: KL to the base only (the cheap part)
                kind = "kl" if args.effects else None
                metrics = run(run_config(dev_tasks, group, lr, 0, scale, args.mixture, args.device, False),
                              folders[-1], measure_landed(folders[-1], group_rows, kind, False, False))
                moved = run_effects(folders[-1], group_rows, False, unseen=False) if args.effects else {}
                for entry in group:
                    label = label_of(entry)
                    dev.setdefault(label, {})[lr] = row_metrics(metrics, rows_of[label])
                    if label in moved:
                        dev[label][lr]["kl_base_tuned"] = moved[label]["kl_base_tuned"]
                    sweep[label][lr] = dev[label][lr]["average"]
                print(f"sweep lr={lr:g}: " + ", ".join(f"{k} {v[lr]:.3f}" for k, v in sweep.items() if lr in v),
                      flush=True)
            todo = edge_extensions(sweep, entries)
            if not todo:
                break
        # the best dev average; a tie goes to the lowest rate (the smaller step), whatever the grid's order
        chosen = {label: max(sorted(scores), key=scores.__getitem__) for label, scores in sweep.items()}
        lrs = sorted({lr for scores in sweep.values() for lr in scores})
        if args.sweep_only:
            result = {"benchmark": "accuracy_sweep", "meta": run_metadata(vars(args) | {"out": out},
                                                                          resolve_device(args.device)),
                      "mixture": [t[0] for t in MIXTURES[args.mixture]], "scale": scale, "lrs": lrs,
                      "methods": entries, "rows": {label: {"lr": chosen[label], "sweep": sweep[label]}
                                                   for label in labels},
                      "steps": steps_of(dev_tasks, scale), "n_dev": scale["n_dev"],
                      "run_minutes": round(run_seconds(folders) / 60, 1),
                      "shared_rate": shared_rate_view(dev, [t[0] for t in MIXTURES[args.mixture]])}
            publish(out.parent / f"{out.name}_sweep", result, render_sweep(result))
            return result

    # 2. final runs: one run per seed, every method at its own rate
    finals: dict[str, list[dict[str, Any]]] = {}
    base: dict[str, Any] | None = None
    effects: dict[str, list[dict[str, Any]]] = {}
    overlaps: dict[int, dict[str, dict[str, float] | None]] = {}  # seed -> label -> task-block overlap
    for seed in args.seeds:
        folders.append(root / f"seed{seed}")
        metrics = run(run_config(eval_tasks, with_rates(entries, chosen), lrs[0], seed, scale, args.mixture,
                                 args.device, base is None), folders[-1],
                      measure_landed(folders[-1], rows_of, "effects" if args.effects else None,
                                     seed == args.seeds[0], True))
        base = base or metrics.get("base")
        for label in labels:
            finals.setdefault(label, []).append(row_metrics(metrics, rows_of[label]))
        if args.effects:
            for label, measured in run_effects(folders[-1], rows_of, seed == args.seeds[0]).items():
                effects.setdefault(label, []).append(measured)
        overlaps[seed] = run_records.load(folders[-1]).get("overlap", {})
        print(f"seed {seed} done ({(time.time() - started) / 60:.1f} min)", flush=True)

    # 3. aggregate, rows in the methods' order
    base_unseen = run_records.table_dir(root) / "base_unseen.json"
    tasks = [t[0] for t in MIXTURES[args.mixture]]
    rows = {}
    per_question = {label: correctness(runs, tasks) for label, runs in finals.items()}
    for label, runs in finals.items():
        row: dict[str, Any] = {"lr": chosen[label], "sweep": sweep[label], "n_seeds": len(runs)}
        for t in [*tasks, "average"]:
            values = [r[t]["score"] if t != "average" else r["average"] for r in runs]
            row[t] = {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                      "values": values}
        if "lora" in per_question and label != "lora":
            row["vs_lora"] = bootstrap_diff(per_question[label], per_question["lora"])
        row["vs"] = {b: bootstrap_diff(per_question[a], per_question[b])["average"]
                     for a, b in PAIRS if a == label and b in per_question}
        if label in effects:
            row["effects"] = summarize_effects(effects[label])
        measured = [o for o in (overlaps[seed].get(label) for seed in args.seeds) if o]
        if measured:
            row["overlap"] = {k: statistics.mean(o[k] for o in measured) for k in measured[0]}
            row["overlap_seeds"] = len(measured)
        rows[label] = row
    result = {
        "benchmark": "accuracy",
        "meta": run_metadata(vars(args) | {"out": out}, resolve_device(args.device)),  # paths: write_json
        "mixture": tasks, "scale": scale, "lrs": lrs, "lrs_from": args.lrs_from, "lr_fixed": args.lr,
        "seeds": args.seeds, "methods": entries,
        "base": ({t: base[t]["score"] for t in tasks} | {"average": base["average"]}) if base else None,
        "n_eval": {t: len(next(iter(finals.values()))[0][t]["correct"]) for t in tasks},
        "steps": steps_of(eval_tasks, scale),
        "params": param_counts(entries), "rows": rows, "wall_minutes": round((time.time() - started) / 60, 1),
        "run_minutes": round(run_seconds(folders) / 60, 1),
        "shared_rate": shared_rate_view(dev, tasks) if dev else None,
        "effects_sizes": effects_sizes() if args.effects else None,
        "base_unseen": (json.loads(base_unseen.read_text())["score"] if base_unseen.is_file() else None),
        "runs": str(root),
    }
    publish(out, result, render(result))
    return result


def run_effects(folder: Path, rows_of: dict[str, list[str]], ablate: bool, unseen: bool = True,
                quiet: bool = False) -> dict[str, Any]:
    """`model_effects.effects_of_run` of the rows ``rows_of`` of a run, recorded per row in the run's record (the
    adapters they are measured on go with the run folder): only rows not yet recorded are measured, and only where
    their adapters are in the folder (a row trained in an earlier checkout and never measured is left out, said
    unless ``quiet``)."""
    from model_effects import effects_of_run
    from thanora.experiment.rundir import saved_methods

    key = "effects" if unseen else "kl"
    have = run_records.load(folder).get(key, {})
    missing = {row: labels for row, labels in rows_of.items() if row not in have}
    saved = set(saved_methods(folder))
    gone = [row for row, labels in missing.items()
            if not all(label in saved and (folder / label / "adapter").is_dir() for label in labels)]
    if gone and not quiet:
        print(f"{folder.name}: {key} of {', '.join(gone)} never recorded and their adapters are gone (trained in an "
              "earlier checkout); those rows average over the other runs", flush=True)
    missing = {row: labels for row, labels in missing.items() if row not in gone}
    if missing:
        have = run_records.update(folder, **{key: have | effects_of_run(folder, missing, ablate, run_records.table_dir(
            folder.parent), unseen=unseen)})[key]
    return {row: have[row] for row in rows_of if row in have}


def measure_landed(folder: Path, rows_of: dict[str, list[str]], kind: str | None, ablate: bool, overlap: bool
                   ) -> Callable[[set[str]], None]:
    """What `run` calls as each method lands: the measurements on the adapters of every row whose runs are all in
    ``folder`` now, recorded at once (they are lost with the folder): `run_effects` of ``kind`` ("kl", "effects" or
    None) and, with ``overlap``, the task-block overlap."""

    def landed(on_disk: set[str]) -> None:
        rows = {row: labels for row, labels in rows_of.items() if set(labels) <= on_disk}
        if kind:
            run_effects(folder, rows, ablate, unseen=kind == "effects", quiet=True)
        if overlap:
            have = run_records.load(folder).get("overlap", {})
            if any(row not in have for row in rows):
                run_records.update(folder, overlap=have | {row: block_overlap_of(folder / row)
                                                           for row in rows if row not in have})

    return landed


def effects_sizes() -> dict[str, int]:
    """How much text and how many unseen-task questions `model_effects` measures on (for the table's caption)."""
    import model_effects

    return {"plain_texts": model_effects.PLAIN_TEXTS, "plain_tokens": model_effects.PLAIN_TOKENS,
            "unseen_questions": model_effects.UNSEEN_QUESTIONS}


def row_metrics(metrics: dict[str, Any], run_labels: list[str]) -> dict[str, Any]:
    """A table row's metrics from a run's: its own label's, or for ``lora_single`` every task from its adapter."""
    if len(run_labels) == 1:
        return metrics[run_labels[0]]
    out = {}
    for label in run_labels:
        out |= {t: v for t, v in metrics[label].items() if t != "average"}
    return out | {"average": statistics.mean(v["score"] for v in out.values())}


def correctness(runs: list[dict[str, Any]], tasks: list[str]) -> dict[str, np.ndarray]:
    """Task -> (seeds, questions) per-question correctness of one table row, from its runs' metrics (one per seed,
    as `row_metrics` gives them): what `bootstrap_diff` takes."""
    return {t: np.stack([np.asarray(r[t]["correct"], dtype=float) for r in runs]) for t in tasks}


def edge_extensions(sweep: dict[str, dict[float, float]], entries: list[dict[str, Any]]
                    ) -> dict[float, list[dict[str, Any]]]:
    """``{rate: entries}`` still to sweep: for every method whose best score is reached at the lowest or highest rate
    it has tried (alone or tied with an inner rate: the optimum may lie beyond), the next rate of `RATE_LADDER`
    beyond that edge (none where the ladder ends)."""
    todo: dict[float, list[dict[str, Any]]] = {}
    for entry in entries:
        scores = sweep[label_of(entry)]
        tried, top = sorted(scores), max(scores.values())
        step = -1 if scores[tried[0]] == top else 1 if scores[tried[-1]] == top else 0
        if not step:
            continue
        edge = tried[0] if step < 0 else tried[-1]
        position = min(range(len(RATE_LADDER)), key=lambda i: abs(np.log(RATE_LADDER[i] / edge)))
        if 0 <= position + step < len(RATE_LADDER) and RATE_LADDER[position + step] not in scores:
            todo.setdefault(RATE_LADDER[position + step], []).append(entry)
    return todo


def shared_rate_view(dev: dict[str, dict[float, dict[str, Any]]], tasks: list[str]) -> dict[str, Any]:
    """Every method at each shared rate of the sweep (the paper's protocol), on the dev questions: average accuracy
    and the paired bootstrap difference to LoRA at the same rate."""
    out: dict[str, Any] = {}
    for label, by_rate in dev.items():
        out[label] = {}
        for lr, metrics in sorted(by_rate.items()):
            cell: dict[str, Any] = {"average": metrics["average"]}
            if "kl_base_tuned" in metrics:
                cell["kl_base_tuned"] = metrics["kl_base_tuned"]
            reference = dev.get("lora", {}).get(lr)
            if reference is not None and label != "lora":
                mine = {t: np.asarray(metrics[t]["correct"], dtype=float) for t in tasks}
                theirs = {t: np.asarray(reference[t]["correct"], dtype=float) for t in tasks}
                cell["vs_lora"] = bootstrap_diff(mine, theirs)["average"]
            out[label][str(lr)] = cell
    return out


def block_overlap_of(folder: Path) -> dict[str, float] | None:
    """Mean off-diagonal task-block overlap over the modules (`thanora.core.regularizers.block_overlap`, 0 for
    orthogonal blocks, 1 for the same subspace) at init and after training, from a run's ``overlap.json`` (methods
    with task blocks); None where there is none."""
    path = folder / "overlap.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    n = len(data["tasks"])
    if n < 2:
        return None

    def mean_off_diagonal(by_module: dict[str, list[list[float]]]) -> float:
        return statistics.mean(m[i][j] for m in by_module.values() for i in range(n) for j in range(n) if i != j)

    return {stage: mean_off_diagonal(data[stage]) for stage in ("before", "after") if data.get(stage)}


def summarize_effects(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean over seeds of KL to the base model and of the unseen-task score; the ablation matrix where measured."""
    out: dict[str, Any] = {}
    for key in ("kl_base_tuned", "mean_abs_dlogit", "unseen_score"):
        values = [r[key] for r in runs if key in r]
        if values:
            out[key] = {"mean": statistics.mean(values), "values": values}
    ablation = next((r["ablation"] for r in runs if "ablation" in r), None)
    if ablation:
        out["ablation"] = ablation
    return out


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
        f"SmolLM2-135M-Instruct, rank budget {scale['rank']}, {training_sentence(result)}, batch "
        f"{scale['batch_size']}; evaluation questions per task: "
        + ", ".join(f"{t} {n}" for t, n in result["n_eval"].items())
        + ". " + lr_sentence(result, scale) + " "
        "Cells: accuracy % mean ± std over seeds. Δ LoRA: paired bootstrap 95 % CI of the difference on the same "
        "questions and seeds (each resample draws the seeds with replacement, then every task's questions).", "",
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
    pairs = [(label, other, diff) for label, row in result["rows"].items() for other, diff in row.get("vs", {}).items()]
    if pairs:
        lines += ["", "Other paired differences, average over the tasks [95 % CI] (points):", "",
                  "| method | minus | Δ average |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}] |" for a, b, d in pairs]
    return "\n".join(lines + effects_table(result) + overlap_table(result) + sweep_table(result)
                     + shared_rate_table(result)) + "\n"


def render_sweep(result: dict[str, Any]) -> str:
    """Markdown of a sweep on its own (``--sweep-only``): the dev scores per rate and the shared-rate view."""
    meta, scale = result["meta"], result["scale"]
    lines = [f"# Learning-rate sweep: {' + '.join(result['mixture'])} ({meta['args']['scale']} scale, dev slice)", "",
             f"`{meta['command']}` on {meta['machine']['device']}, {meta['timestamp_utc']}, {result['run_minutes']} "
             f"min of runs. SmolLM2-135M-Instruct, rank budget {scale['rank']}, {result['steps']} optimiser steps at "
             f"batch {scale['batch_size']} on the training split minus a dev slice of {result['n_dev']} questions per "
             "task, scored on that slice (standard error at most "
             f"{50 / result['n_dev'] ** 0.5:.1f} points per task: the slice picks rates, it does not rank methods). "
             "The final runs (every evaluation question, 3 seeds) train each method "
             "at its chosen rate."]
    return "\n".join(lines + sweep_table(result) + shared_rate_table(result)) + "\n"


def overlap_table(result: dict[str, Any]) -> list[str]:
    """The task blocks' mutual overlap before and after training (with and without SPR: does SPR keep them apart?)."""
    rows = {label: row["overlap"] for label, row in result["rows"].items() if "overlap" in row}
    if not rows:
        return []
    seeds = max(row.get("overlap_seeds", 1) for row in result["rows"].values() if "overlap" in row)
    lines = ["", "Task-block overlap, mean over modules and task pairs (mean squared cosine of the principal angles "
             f"between two tasks' blocks, B and A averaged; 0 = orthogonal), mean over {seeds} seed(s):", "",
             "| method | at init | after training |", "|---|---|---|"]
    for label, overlap in rows.items():
        before = f"{overlap['before']:.4f}" if "before" in overlap else "–"
        after = f"{overlap['after']:.4f}" if "after" in overlap else "–"
        lines.append(f"| {label} | {before} | {after} |")
    return lines


def training_sentence(result: dict[str, Any]) -> str:
    scale = result["scale"]
    if "tasks" in scale:
        sizes = ", ".join(f"{t} {task_sizes(scale, t)[0]}" for t in result["mixture"])
        examples = f"training examples per task {sizes}"
    else:
        examples = f"{scale['n_train']} training examples per task"
    steps = result.get("steps")
    length = f"{steps} optimiser steps" if steps else f"{scale['epochs']} epoch(s)"
    return f"{examples}, {length}"


def effects_table(result: dict[str, Any]) -> list[str]:
    """What each method costs the model elsewhere: KL to the base on held-out plain text, the unseen-task score;
    and ThanoRA's block ablation."""
    rows = {label: row["effects"] for label, row in result["rows"].items() if "effects" in row}
    if not rows:
        return []
    sizes = result.get("effects_sizes") or {}
    counts = sorted({len(effects["kl_base_tuned"]["values"]) for effects in rows.values()})
    seeds = f"{counts[0]}-{counts[-1]}" if len(counts) > 1 else str(counts[0])
    lines = ["", f"Off the tasks (mean over the {seeds} seed(s) whose adapters were measured): KL(base ‖ tuned) "
             "per token of held-out plain text "
             f"({sizes.get('plain_texts', '?')} SciQ support paragraphs), mean |Δ log-prob| per token and vocabulary "
             f"entry, and HellaSwag accuracy ({sizes.get('unseen_questions', '?')} questions, no method trains on it):",
             "",
             "| method | KL to base (nats/token) | mean abs Δ log-prob | HellaSwag % |", "|---|---|---|---|"]
    if result.get("base_unseen") is not None:
        lines.append(f"| base (zero-shot) | 0 | 0 | {100 * result['base_unseen']:.1f} |")
    for label, effects in rows.items():
        lines.append(f"| {label} | {effects['kl_base_tuned']['mean']:.3f} | {effects['mean_abs_dlogit']['mean']:.3f} | "
                     f"{100 * effects['unseen_score']['mean']:.1f} |")
    for label, effects in rows.items():
        if "ablation" in effects:
            ab = effects["ablation"]
            lines += ["", f"{label}, seed {result['seeds'][0]}: accuracy drop (points) on each task (columns) when one "
                      "task's block is reset to its initial factors (rows):", "",
                      "| block reset | " + " | ".join(ab["tasks"]) + " |", "|---|" + "---|" * len(ab["tasks"])]
            intervals = ab.get("drop_ci") or [[None] * len(drops) for drops in ab["drop"]]  # older records: none
            for task, drops, cis in zip(ab["tasks"], ab["drop"], intervals, strict=True):
                lines.append(f"| {task} | " + " | ".join(
                    f"{100 * d:+.1f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci else "")
                    for d, ci in zip(drops, cis, strict=True)) + " |")
    return lines


def shared_rate_table(result: dict[str, Any]) -> list[str]:
    """Every method at one shared rate (the paper's protocol), from the sweep's dev runs."""
    view = result.get("shared_rate")
    if not view:
        return []
    lrs = sorted({float(lr) for cells in view.values() for lr in cells})
    lines = ["", "Every method at one shared rate (the paper's protocol; the sweep's dev questions): average accuracy "
             "% and Δ LoRA at the same rate [95 % CI]; with --effects, KL(base ‖ tuned) in nats per token on held-out "
             "plain text:", "",
             "| method | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---|" + "---|" * len(lrs)]
    for label, cells in view.items():
        out = []
        for lr in lrs:
            cell = cells.get(str(lr)) or cells.get(lr)
            if cell is None:
                out.append("–")
                continue
            text = f"{100 * cell['average']:.1f}"
            if "vs_lora" in cell:
                d, lo, hi = cell["vs_lora"]
                text += f" ({100 * d:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}])"
            if "kl_base_tuned" in cell:
                text += f", KL {cell['kl_base_tuned']:.3f}"
            out.append(text)
        lines.append(f"| {label} | " + " | ".join(out) + " |")
    return lines


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
