"""Same-shape modules decomposed together: one batched SVD call vs one call per module (issue 16, target 2).

HASI takes, per task, the top-R SVD of W·C_d for every target module (`thanora.core.spectra._top_svd`); a model has
one module per layer of each shape (SmolLM2: 30 layers of q/o 576 x 576, k/v 192 x 576, gate/up 1536 x 576, down
576 x 1536). This measures whether stacking a shape's modules into one ``torch.linalg.svd`` (exact) or
``torch.svd_lowrank`` (randomized, the 7B-width path of ``svd: auto``) call is faster than the per-module loop the
library runs, on the device given: the median over ``--rounds`` interleaved rounds of each, the ratio per round, and
the largest difference of the singular values between the two (they must agree). Timing needs only the shapes, so the
matrices are random ones with a decaying spectrum (LAPACK's and the range finder's cost do not depend on it).

    python benchmarks/batched_svd.py [--rounds 3] [--device cuda]

Writes benchmarks/results/batched_svd.json and .md.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from common import publish, resolve_device, run_metadata, sync

RESULTS = Path(__file__).parent / "results"
# (label, d_out, d_in, modules of that shape, rank, "exact" | "randomized")
CASES = [
    ("SmolLM2 q/o", 576, 576, 60, 16, "exact"),
    ("SmolLM2 k/v", 192, 576, 60, 16, "exact"),
    ("SmolLM2 gate/up", 1536, 576, 60, 16, "exact"),
    ("SmolLM2 down", 576, 1536, 30, 16, "exact"),
    ("Llama-2-7B q/k/v/o (4 layers)", 4096, 4096, 16, 64, "randomized"),
]


def decompose(M: torch.Tensor, rank: int, kind: str) -> torch.Tensor:
    """The top-``rank`` singular values of every matrix of ``M`` (..., m, n), as the library computes them."""
    if kind == "exact":
        return torch.linalg.svd(M, full_matrices=False)[1][..., :rank]
    return torch.svd_lowrank(M, q=rank + 16, niter=4)[1][..., :rank]


def timed(fn: Any, device: torch.device) -> tuple[float, torch.Tensor]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def measure(case: tuple, rounds: int, device: torch.device) -> dict[str, Any]:
    label, d_out, d_in, count, rank, kind = case
    generator = torch.Generator().manual_seed(0)
    # columns scaled by 1/(j+1): a decaying spectrum, as trained weights have (a flat one would make the randomized
    # estimates of the top values poor for both variants alike)
    decay = 1.0 / torch.arange(1, d_in + 1, dtype=torch.float32)
    stack = (torch.randn(count, d_out, d_in, generator=generator) * decay).to(device)
    loop_s, batched_s, diff = [], [], 0.0
    for _ in range(rounds):
        torch.manual_seed(0)
        t_loop, looped = timed(lambda: torch.stack([decompose(m, rank, kind) for m in stack]), device)
        torch.manual_seed(0)
        t_batched, batched = timed(lambda: decompose(stack, rank, kind), device)
        loop_s.append(t_loop)
        batched_s.append(t_batched)
        diff = max(diff, float(((looped - batched).abs() / looped.abs().clamp_min(1e-12)).max()))
    ratios = [b / t for b, t in zip(batched_s, loop_s, strict=True)]
    row = {"case": label, "shape": [d_out, d_in], "modules": count, "rank": rank, "svd": kind,
           "loop_s": statistics.median(loop_s), "batched_s": statistics.median(batched_s),
           "ratio": statistics.median(ratios), "ratio_range": [min(ratios), max(ratios)],
           "max_rel_diff_singular_values": diff}
    print(f"{label}: loop {row['loop_s']:.2f} s, batched {row['batched_s']:.2f} s, x{row['ratio']:.2f}", flush=True)
    return row


def render(result: dict[str, Any]) -> str:
    meta = result["meta"]
    lines = [
        "# Batched vs per-module SVD of same-shape modules", "",
        f"`{meta['command']}` on {meta['machine']['device']} ({meta['machine'].get('processor', '')}, "
        f"{meta['machine'].get('torch_threads', '')} threads), {meta['timestamp_utc']}. Median of "
        f"{result['rounds']} interleaved rounds; ratio = batched / loop per round (below 1: batching is faster); "
        "singular values of the two compared (largest relative difference).", "",
        "| modules | shape | count | rank | SVD | loop s | batched s | ratio (range) | max rel. diff of S |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['case']} | {r['shape'][0]} x {r['shape'][1]} | {r['modules']} | {r['rank']} | {r['svd']} | "
                     f"{r['loop_s']:.2f} | {r['batched_s']:.2f} | {r['ratio']:.2f} ({r['ratio_range'][0]:.2f}-"
                     f"{r['ratio_range'][1]:.2f}) | {r['max_rel_diff_singular_values']:.1e} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS / "batched_svd")
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    result = {"benchmark": "batched_svd", "meta": run_metadata(vars(args), device), "rounds": args.rounds,
              "rows": [measure(case, args.rounds, device) for case in CASES]}
    publish(args.out, result, render(result))
    return result


if __name__ == "__main__":
    main()
