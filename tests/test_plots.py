"""Tests for thanora.experiment.plots: structure of each figure on small synthetic results, and PNG saving (no
pixels)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from matplotlib.figure import Figure

from thanora.artifacts import write_json
from thanora.core.allocation import allocate_ranks
from thanora.experiment.plots import (
    accuracy_figure,
    entropy_figure,
    overlap_figure,
    plot_run,
    rank_allocation_figure,
    save_figure,
    training_curves_figure,
)

TASKS = ["csqa", "obqa"]
KINDS = ["self_attn.q_proj", "mlp.down_proj"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _plan(kinds: list[str] = KINDS, layers: int = 3, tasks: list[str] = TASKS) -> dict[str, Any]:
    entropies = {t: {f"model.layers.{i}.{k}": 0.5 + 0.1 * i + 0.05 * j for i in range(layers) for k in kinds}
                 for j, t in enumerate(tasks)}
    return allocate_ranks(entropies, budget=12, tau=0.5, r_min=1).to_dict()


def _history(reg: bool, evals: bool) -> list[dict[str, Any]]:
    rows = []
    for step in range(0, 50, 10):
        row: dict[str, Any] = {"step": step, "loss": 2.0 / (1 + step), "reg": 0.1 / (1 + step) if reg else 0.0,
                               "lr": 1e-4}
        if evals and step % 20 == 0:
            row |= {f"eval/{t}": 0.5 + step / 100 for t in TASKS}
        rows.append(row)
    return rows


def _metrics() -> dict[str, Any]:
    def entry(p: float) -> dict[str, Any]:
        return {"metric": "accuracy", "mode": "loglik", "score": p, "n": 100, "correct": [1] * int(100 * p)}

    return {m: {"csqa": entry(0.4 + d), "obqa": entry(0.5 + d), "average": 0.45 + d}
            for m, d in (("base", 0.0), ("lora", 0.05), ("thanora", 0.1))}


def _overlap(plan: dict[str, Any], phases: tuple[str, ...] = ("before", "after")) -> dict[str, Any]:
    tasks = plan["tasks"]
    mat = [[1.0 if i == j else 0.1 for j in range(len(tasks))] for i in range(len(tasks))]
    return {"tasks": tasks, **{p: dict.fromkeys(plan["modules"], mat) for p in phases}}


def test_rank_allocation_figure_one_panel_per_kind_plus_mean() -> None:
    fig = rank_allocation_figure(_plan())
    assert isinstance(fig, Figure)
    assert len(fig.axes) == len(KINDS) + 1
    for ax in fig.axes:
        assert len(ax.containers) == len(TASKS) + 1  # one stacked bar series per task + the cooperative block
        assert all(len(bars) == 3 for bars in ax.containers)  # one bar per layer
        assert ax.get_ylim()[1] == 12
    assert [t.get_text() for t in fig.legends[0].get_texts()] == [*TASKS, "cooperative"]


def test_single_kind_has_no_mean_panel_and_unindexed_modules_are_rejected() -> None:
    assert len(rank_allocation_figure(_plan(kinds=["attn.c_attn"])).axes) == 1
    plan = _plan()
    plan["modules"] = {"lm_head": next(iter(plan["modules"].values()))}
    with pytest.raises(ValueError, match="layer-indexed"):
        entropy_figure(plan)


def test_gpt2_c_proj_kinds_stay_apart() -> None:
    plan = _plan(kinds=["attn.c_proj", "mlp.c_proj"], tasks=["a", "b", "c", "d"])
    titles = [ax.get_title() for ax in rank_allocation_figure(plan).axes]
    assert titles == ["attn.c_proj", "mlp.c_proj", "mean over module kinds"]


def test_entropy_figure_one_line_per_task_per_panel() -> None:
    fig = entropy_figure(_plan())
    assert len(fig.axes) == len(KINDS) + 1
    assert all(len(ax.get_lines()) == len(TASKS) for ax in fig.axes)
    assert [ax.get_title() for ax in fig.axes] == ["q_proj", "down_proj", "mean over module kinds"]


def test_training_curves_figure_panels() -> None:
    histories = {"lora": _history(reg=False, evals=True), "thanora": _history(reg=True, evals=True)}
    fig = training_curves_figure(histories)
    assert len(fig.axes) == 3
    loss_ax, reg_ax, eval_ax = fig.axes
    assert len(loss_ax.get_lines()) == 2
    assert len(reg_ax.get_lines()) == 1  # lora's all-zero regulariser is not drawn
    assert len(eval_ax.get_lines()) == 2 * len(TASKS)
    plain = training_curves_figure({"lora": _history(reg=False, evals=False)})
    assert len(plain.axes) == 2
    assert "no regulariser" in plain.axes[1].texts[0].get_text()


def test_overlap_figure_heatmaps_colorbar_and_layer_panel() -> None:
    plan = _plan()
    assert len(overlap_figure(_overlap(plan)).axes) == 4  # before, after, colour bar, per-layer
    after_only = overlap_figure(_overlap(plan, ("after",)))
    assert len(after_only.axes) == 3
    (layer_ax,) = [ax for ax in after_only.axes if ax.get_xlabel() == "layer"]
    assert len(layer_ax.get_lines()) == 1
    assert len(overlap_figure(_overlap(_plan(tasks=["a"]))).axes) == 3  # one task: no cross-task panel
    with pytest.raises(ValueError, match="neither"):
        overlap_figure({"tasks": TASKS})


def test_accuracy_figure_grouped_bars_and_base_line() -> None:
    fig = accuracy_figure(_metrics())
    (ax,) = fig.axes
    assert len(ax.containers) == 6  # 3 methods × (bars + error bars)
    assert len(ax.patches) == 3 * 3  # methods × (2 tasks + average)
    assert [t.get_text().split("\n")[0] for t in ax.get_xticklabels()] == ["csqa", "obqa", "average"]
    assert len(ax.collections) >= 3  # dashed base line per group
    assert "base score" in [t.get_text() for t in fig.legends[0].get_texts()]


def test_save_figure_writes_png_atomically(tmp_path: Path) -> None:
    fig = entropy_figure(_plan())
    path = save_figure(fig, tmp_path / "sub" / "entropy.png")
    assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 1000
    assert sorted(p.name for p in path.parent.iterdir()) == ["entropy.png"]  # no temp file left
    assert fig.axes == []  # closed


@pytest.mark.parametrize("make", [
    lambda: rank_allocation_figure(_plan()),
    lambda: training_curves_figure({"thanora": _history(reg=True, evals=True)}),
    lambda: overlap_figure(_overlap(_plan())),
    lambda: accuracy_figure(_metrics()),
])
def test_every_figure_saves(tmp_path: Path, make: Any) -> None:
    assert save_figure(make(), tmp_path / "f.png").read_bytes()[:8] == PNG_MAGIC


def test_plot_run_writes_what_the_run_holds(tmp_path: Path) -> None:
    plan = _plan()
    write_json(tmp_path / "metrics.json", {"base": _metrics()["base"]})
    write_json(tmp_path / "thanora" / "metrics.json", _metrics()["thanora"])
    write_json(tmp_path / "thanora" / "history.json", _history(reg=True, evals=False))
    write_json(tmp_path / "thanora" / "rank_plan.json", plan)
    write_json(tmp_path / "thanora" / "overlap.json", _overlap(plan))
    written = plot_run(tmp_path)
    assert sorted(p.name for p in written) == sorted(
        ["accuracy.png", "training_curves.png", "thanora_rank_allocation.png", "thanora_entropy.png",
         "thanora_overlap.png"])
    assert all(p.parent == tmp_path / "plots" and p.stat().st_size > 0 for p in written)
