"""Spectral entropy and entropy-guided rank allocation (SPEC.md §3)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from thanora.core.allocation import (
    COOP,
    RankBudgetError,
    RankPlan,
    allocate_ranks,
    normalized_entropy,
    split_ranks,
)


@pytest.mark.parametrize(
    ("entropies", "task_ranks", "coop"),
    [
        ((0.64, 0.36), (34, 8), 22),
        ((0.5, 0.5), (21, 21), 22),
        ((0.45, 0.55, 0.60, 0.40), (9, 15, 19, 7), 14),
    ],
)
def test_spec_worked_examples(entropies: tuple[float, ...], task_ranks: tuple[int, ...], coop: int) -> None:
    plan = split_ranks(entropies, budget=64, tau=0.2, r_min=1)
    assert plan.task_ranks == task_ranks
    assert plan.coop_rank == coop
    assert plan.total == 64


def _reference_floors(entropies: list[float], budget: int, tau: float, r_min: int) -> list[int]:
    """r_t = max(r_min, ⌊r_task·softmax(H/τ)_t⌋), written out with math.exp."""
    r_task = budget - budget // (len(entropies) + 1)
    top = max(entropies)
    weights = [math.exp((h - top) / tau) for h in entropies]
    return [max(r_min, math.floor(r_task * w / sum(weights))) for w in weights]


def test_plan_properties_on_random_inputs() -> None:
    rng = random.Random(1234)
    checked_overshoot = 0
    for _ in range(500):
        n_tasks = rng.randint(1, 6)
        r_min = rng.randint(1, 4)
        budget = rng.randint(2, 160)
        tau = rng.choice([0.05, 0.2, 1.0, 5.0])
        entropies = [rng.random() for _ in range(n_tasks)]
        r_coop = budget // (n_tasks + 1)
        r_task = budget - r_coop
        if n_tasks * r_min > r_task:
            with pytest.raises(RankBudgetError):
                split_ranks(entropies, budget, tau, r_min)
            continue
        plan = split_ranks(entropies, budget, tau, r_min)
        assert plan.total == budget
        assert sum(plan.task_ranks) + plan.coop_rank == budget
        assert all(r >= r_min for r in plan.task_ranks)
        assert sum(plan.task_ranks) <= r_task and plan.coop_rank >= r_coop
        assert split_ranks(entropies, budget, tau, r_min) == plan  # deterministic
        floors = _reference_floors(entropies, budget, tau, r_min)
        if sum(floors) <= r_task:
            assert list(plan.task_ranks) == floors
        else:
            checked_overshoot += 1
            assert sum(plan.task_ranks) == r_task  # decremented exactly until it fits
            assert all(r <= f for r, f in zip(plan.task_ranks, floors, strict=True))
    assert checked_overshoot > 0


def test_overshoot_decrements_largest_block() -> None:
    # R=10, T=3: r_coop=2, r_task=8; floors (7, 2, 2) overshoot by 3 → only task 0 (the largest) shrinks.
    plan = split_ranks([1.0, 0.0, 0.0], budget=10, tau=0.2, r_min=2)
    assert plan.task_ranks == (4, 2, 2) and plan.coop_rank == 2


def test_overshoot_ties_go_to_lower_index() -> None:
    # R=16, T=3: r_coop=4, r_task=12; floors (5, 5, 3) overshoot by 1; tie of 5s → task 0 gives one.
    plan = split_ranks([1.0, 1.0, 0.0], budget=16, tau=0.2, r_min=3)
    assert plan.task_ranks == (4, 5, 3) and plan.coop_rank == 4


def test_budget_too_small_names_minimal_budget() -> None:
    # T=4, r_min=3: needs R - ⌊R/5⌋ >= 12, so R = 14 is the smallest budget.
    with pytest.raises(RankBudgetError, match="at least 14"):
        split_ranks([0.5] * 4, budget=13, tau=0.2, r_min=3)
    assert split_ranks([0.5] * 4, budget=14, tau=0.2, r_min=3).task_ranks == (3, 3, 3, 3)
    with pytest.raises(RankBudgetError, match="at least 3"):
        split_ranks([0.1, 0.2, 0.3], budget=2, tau=0.2, r_min=1)
    assert issubclass(RankBudgetError, ValueError)


def test_normalized_entropy_limits() -> None:
    assert normalized_entropy(torch.full((16,), 3.7)) == pytest.approx(1.0, abs=1e-12)
    assert normalized_entropy(torch.tensor([5.0, 0.0, 0.0, 0.0])) == 0.0
    assert normalized_entropy(torch.tensor([2.0])) == 0.0
    assert normalized_entropy(torch.zeros(4)) == 0.0


def test_normalized_entropy_matches_direct_formula() -> None:
    g = torch.Generator().manual_seed(0)
    for n in (2, 5, 64):
        s = torch.rand(n, generator=g, dtype=torch.float64).sort(descending=True).values
        p = [v / float(s.sum()) for v in s.tolist()]
        expected = -sum(q * math.log(q) for q in p) / math.log(n)
        assert normalized_entropy(s) == pytest.approx(expected, rel=1e-12)
        assert normalized_entropy(10.0 * s) == pytest.approx(expected, rel=1e-12)  # scale invariant
        # σ, not σ²: the entropy of the squared values is different
        assert abs(normalized_entropy(s.square()) - expected) > 1e-3


def _plan() -> RankPlan:
    entropies = {
        "csqa": {"m.q_proj": 0.64, "m.v_proj": 0.5},
        "obqa": {"m.q_proj": 0.36, "m.v_proj": 0.5},
    }
    return allocate_ranks(entropies, budget=64, tau=0.2, r_min=1)


def test_allocate_ranks_and_block_table() -> None:
    plan = _plan()
    assert plan.tasks == ("csqa", "obqa")
    assert plan.rank("csqa", "m.q_proj") == 34 and plan.rank("obqa", "m.q_proj") == 8
    assert plan.rank("csqa", "m.v_proj") == 21
    assert plan.modules["m.q_proj"].slices(plan.tasks) == {"csqa": (0, 34), "obqa": (34, 42), COOP: (42, 64)}


def test_allocate_ranks_rejects_mismatched_modules() -> None:
    with pytest.raises(ValueError, match="'b'"):
        allocate_ranks({"a": {"m1": 0.5}, "b": {"m2": 0.5}}, budget=8, tau=0.2, r_min=1)
    with pytest.raises(ValueError, match="at least one task"):
        allocate_ranks({}, budget=8, tau=0.2, r_min=1)


def test_rank_plan_roundtrip(tmp_path: Path) -> None:
    plan = _plan()
    assert RankPlan.from_dict(plan.to_dict()) == plan
    plan.save(tmp_path / "rank_plan.json")
    assert RankPlan.load(tmp_path / "rank_plan.json") == plan
    text = plan.summary()
    assert "R=64" in text and "csqa" in text and "q_proj" in text and "v_proj" in text
