"""Spectral entropy and entropy-guided rank allocation per module: SPEC.md §3."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thanora.artifacts import read_json, write_json


class RankBudgetError(ValueError):
    """The rank budget cannot give every task its minimum rank."""


@dataclass(frozen=True)
class ModulePlan:
    """Rank split of one module: one block per task (in task order) plus the cooperative block.

    Attributes:
        task_ranks: r_t for each task, in the plan's task order.
        coop_rank: rank of the cooperative block.
        entropies: normalised spectral entropy of each task (same order).
    """

    task_ranks: tuple[int, ...]
    coop_rank: int
    entropies: tuple[float, ...]

    @property
    def total(self) -> int:
        """Σ r_t + r_coop (equals the budget R)."""
        return sum(self.task_ranks) + self.coop_rank

    def slices(self, tasks: Sequence[str]) -> dict[str, tuple[int, int]]:
        """Block table: ``{task: (start, stop)}`` along the rank dimension, plus ``"__coop__"`` last."""
        table: dict[str, tuple[int, int]] = {}
        start = 0
        for task, r in zip(tasks, self.task_ranks, strict=True):
            table[task] = (start, start + r)
            start += r
        table[COOP] = (start, start + self.coop_rank)
        return table


COOP = "__coop__"


@dataclass(frozen=True)
class RankPlan:
    """Per-module rank allocation for T tasks under a budget R (task → module → rank, plus entropies).

    Attributes:
        tasks: task names in block order.
        budget: R, the total rank of every module.
        tau: softmax temperature used.
        r_min: minimum task rank used.
        modules: ``{module name: ModulePlan}``.
    """

    tasks: tuple[str, ...]
    budget: int
    tau: float
    r_min: int
    modules: dict[str, ModulePlan]

    def rank(self, task: str, module: str) -> int:
        """r_t of ``task`` in ``module``."""
        return self.modules[module].task_ranks[self.tasks.index(task)]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also the on-disk ``rank_plan.json``)."""
        return {
            "tasks": list(self.tasks),
            "budget": self.budget,
            "tau": self.tau,
            "r_min": self.r_min,
            "modules": {
                name: {
                    "task_ranks": dict(zip(self.tasks, p.task_ranks, strict=True)),
                    "coop_rank": p.coop_rank,
                    "entropies": dict(zip(self.tasks, p.entropies, strict=True)),
                }
                for name, p in self.modules.items()
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RankPlan:
        """Inverse of `to_dict`."""
        tasks = tuple(data["tasks"])
        modules = {
            name: ModulePlan(
                task_ranks=tuple(int(m["task_ranks"][t]) for t in tasks),
                coop_rank=int(m["coop_rank"]),
                entropies=tuple(float(m["entropies"][t]) for t in tasks),
            )
            for name, m in data["modules"].items()
        }
        return cls(tasks, int(data["budget"]), float(data["tau"]), int(data["r_min"]), modules)

    def save(self, path: str | Path) -> None:
        """Write ``rank_plan.json`` atomically."""
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> RankPlan:
        """Read a file written by `save`."""
        return cls.from_dict(read_json(path))

    def summary(self) -> str:
        """A short human-readable table: mean rank and entropy per task, per module type."""
        by_kind: dict[str, list[ModulePlan]] = {}
        for name, plan in self.modules.items():
            by_kind.setdefault(name.rsplit(".", 1)[-1], []).append(plan)
        header = f"{'module':<12}" + "".join(f"{t[:14]:>16}" for t in self.tasks) + f"{'coop':>8}"
        lines = [f"rank plan: R={self.budget}, tau={self.tau}, r_min={self.r_min}, {len(self.modules)} modules",
                 header + "   (mean rank / mean normalised entropy)"]
        for kind, plans in by_kind.items():
            cells = []
            for i in range(len(self.tasks)):
                ranks = sum(p.task_ranks[i] for p in plans) / len(plans)
                ent = sum(p.entropies[i] for p in plans) / len(plans)
                cells.append(f"{ranks:>8.1f} / {ent:.3f}")
            coop = sum(p.coop_rank for p in plans) / len(plans)
            lines.append(f"{kind:<12}" + "".join(f"{c:>16}" for c in cells) + f"{coop:>8.1f}")
        return "\n".join(lines)


def normalized_entropy(singular_values: torch.Tensor) -> float:
    """H / log R with H = −Σ p_i log p_i, p_i = σ_i / Σ_j σ_j over the given (top-R) singular values.

    Args:
        singular_values: (R,) non-negative values.

    Returns:
        The normalised spectral entropy in [0, 1] (0 for R = 1 or a single non-zero value).
    """
    s = singular_values.double().clamp_min(0)
    total = s.sum()
    if s.numel() < 2 or total <= 0:
        return 0.0
    p = s / total
    h = -(p[p > 0] * p[p > 0].log()).sum()
    return float(h / math.log(s.numel()))


def split_ranks(entropies: Sequence[float], budget: int, tau: float, r_min: int) -> ModulePlan:
    """Rank split of one module (SPEC.md §3).

    r_coop = ⌊R/(T+1)⌋, r_task = R − r_coop, π = softmax(H/τ), r_t = max(r_min, ⌊r_task·π_t⌋); if that overshoots
    r_task the largest block above r_min (ties: lower task index) is decremented until it fits; the flooring
    leftover goes to the cooperative block, so the total is exactly R.

    Raises:
        RankBudgetError: T·r_min > r_task.
    """
    n_tasks = len(entropies)
    if n_tasks == 0:
        raise ValueError("rank allocation needs at least one task")
    r_coop = budget // (n_tasks + 1)
    r_task = budget - r_coop
    if n_tasks * r_min > r_task:
        raise RankBudgetError(
            f"rank budget R={budget} leaves {r_task} task ranks after the cooperative block, fewer than "
            f"T·r_min = {n_tasks}·{r_min}; raise rank to at least {min_budget(n_tasks, r_min)} or lower r_min"
        )
    pi = torch.softmax(torch.tensor(entropies, dtype=torch.float64) / tau, dim=0)
    ranks = [max(r_min, math.floor(r_task * float(p))) for p in pi]
    while sum(ranks) > r_task:
        i = max(range(n_tasks), key=lambda k: (ranks[k], -k))  # largest, ties: lower index
        if ranks[i] <= r_min:  # cannot happen when T·r_min <= r_task; kept as a guard
            raise RankBudgetError(f"cannot fit task ranks {ranks} into {r_task}")
        ranks[i] -= 1
    return ModulePlan(tuple(ranks), budget - sum(ranks), tuple(float(h) for h in entropies))


def min_budget(n_tasks: int, r_min: int) -> int:
    """The smallest rank budget R whose task part R − ⌊R/(T+1)⌋ holds T·r_min."""
    budget = 2
    while budget - budget // (n_tasks + 1) < n_tasks * r_min:
        budget += 1
    return budget


def allocate_ranks(
    entropies: Mapping[str, Mapping[str, float]], budget: int, tau: float, r_min: int
) -> RankPlan:
    """Allocate every module's rank budget among the tasks.

    Args:
        entropies: ``{task: {module: normalised entropy}}``; every task must cover the same modules.
        budget: R.
        tau: softmax temperature.
        r_min: minimum task rank.

    Returns:
        The deterministic `RankPlan` (module order of the first task).
    """
    tasks = tuple(entropies)
    if not tasks:
        raise ValueError("rank allocation needs at least one task")
    modules = list(entropies[tasks[0]])
    for task in tasks[1:]:
        if set(entropies[task]) != set(modules):
            raise ValueError(f"task {task!r} covers other modules than task {tasks[0]!r}")
    plans = {m: split_ranks([entropies[t][m] for t in tasks], budget, tau, r_min) for m in modules}
    return RankPlan(tasks, budget, tau, r_min, plans)
