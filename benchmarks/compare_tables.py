"""Paired differences between two finished accuracy tables on the same questions, method by method.

Each method row of table A minus the same row of table B (e.g. rank 64 minus rank 16 of the same mixture and scale),
each at its own table's chosen rate: the two-level bootstrap of `accuracy.bootstrap_diff` over the per-question
answers in both tables' run records (``benchmarks/results/runs/``), seed i of A paired with seed i of B. Nothing is
trained; both tables must score the same evaluation questions with the same seeds.

    python benchmarks/compare_tables.py benchmarks/results/accuracy_2task_small_r64.json \\
        benchmarks/results/accuracy_2task_small.json --out benchmarks/results/accuracy_2task_small_r64_vs_r16

Writes <out>.json and <out>.md; prints the table.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

import run_records
from accuracy import bootstrap_diff, correctness, row_metrics, row_of
from common import publish, resolve_device, run_metadata
from thanora.artifacts import read_json


def per_question(result: dict[str, Any]) -> dict[str, dict[str, np.ndarray]]:
    """Row -> task -> (seeds, questions) correctness of a finished accuracy table, read from its run records."""
    records = run_records.table_dir(Path(result["runs"]))
    by_seed = [read_json(records / f"seed{seed}.json")["metrics"] for seed in result["seeds"]]
    return {row: correctness([row_metrics(metrics, [label for label in metrics if row_of(label) == row])
                              for metrics in by_seed], result["mixture"]) for row in result["rows"]}


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Every row both tables have: A's lr, B's lr and ``{task or "average": [diff, lo, hi]}`` (points / 100)."""
    if a["mixture"] != b["mixture"] or a["seeds"] != b["seeds"] or a["n_eval"] != b["n_eval"]:
        raise ValueError("the two tables must have the same tasks, seeds and evaluation questions "
                         f"(got {a['mixture']} / {b['mixture']}, seeds {a['seeds']} / {b['seeds']}, "
                         f"questions {a['n_eval']} / {b['n_eval']})")
    qa, qb = per_question(a), per_question(b)
    return {row: {"lr_a": a["rows"][row]["lr"], "lr_b": b["rows"][row]["lr"], "diff": bootstrap_diff(qa[row], qb[row])}
            for row in a["rows"] if row in b["rows"]}


def render(result: dict[str, Any]) -> str:
    tasks = result["mixture"]
    cell = lambda d: f"{100 * d[0]:+.1f} [{100 * d[1]:+.1f}, {100 * d[2]:+.1f}]"  # noqa: E731
    lines = [f"# {result['a']} minus {result['b']}", "",
             "Each method of the first table minus the same method of the second, each at its own table's chosen rate,"
             f" on the same questions (seeds {result['seeds']}, seed i paired with seed i): points, paired two-level "
             "bootstrap 95 % CI over seeds and questions.", "",
             "| method | lr (first) | lr (second) | " + " | ".join(tasks) + " | average |",
             "|---|---|---|" + "---|" * (len(tasks) + 1)]
    for row, r in result["rows"].items():
        lines.append(f"| {row} | {r['lr_a']:g} | {r['lr_b']:g} | "
                     + " | ".join(cell(r["diff"][t]) for t in [*tasks, "average"]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="accuracy result JSON (the minuend)")
    parser.add_argument("second", type=Path, help="accuracy result JSON (the subtrahend)")
    parser.add_argument("--out", type=Path, required=True, help="output stem: <out>.json and <out>.md")
    args = parser.parse_args(argv)
    for path in (args.first, args.second):
        if not path.is_file():
            parser.error(f"{path}: no such accuracy result; run benchmarks/accuracy.py first")
    a, b = (read_json(p) for p in (args.first, args.second))
    try:
        rows = compare(a, b)
    except (ValueError, FileNotFoundError) as err:  # mismatched tables, or a table whose run records are missing
        parser.error(str(err))
    result = {"benchmark": "compare_tables", "meta": run_metadata(vars(args), resolve_device("cpu")),
              "a": args.first.name, "b": args.second.name, "mixture": a["mixture"], "seeds": a["seeds"], "rows": rows}
    publish(args.out, result, render(result))
    return result


if __name__ == "__main__":
    main()
