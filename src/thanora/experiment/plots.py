"""Figures of a run, drawn from its saved JSON only (rank plans, histories, metrics, overlaps): SPEC.md §8.

Each ``*_figure`` function takes loaded JSON and returns a `matplotlib.figure.Figure` built without pyplot, so no
backend, rcParam or figure registry is touched; nothing is recomputed beyond means for display. Tasks keep one
colour (by position in the task list) and methods one colour (base grey, thanora red) in every figure.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from thanora.artifacts import atomic_path, read_json

DPI = 150
COOP_COLOR = "0.78"
BASE_COLOR = "0.45"
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.")
_TASK_COLORS: tuple[Any, ...] = tuple(colormaps["tab10"].colors)  # type: ignore[attr-defined]
_METHOD_COLORS: tuple[Any, ...] = tuple(colormaps["Dark2"].colors)  # type: ignore[attr-defined]
_OURS = {"thanora": "tab:red"}
_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def task_color(index: int) -> Any:
    """Colour of the task at ``index`` in the run's task list (the same in every figure)."""
    return _TASK_COLORS[index % len(_TASK_COLORS)]


def method_color(method: str, index: int) -> Any:
    """Colour of a method: base grey, thanora red, the others by ``index`` among the non-base methods."""
    if method == "base":
        return BASE_COLOR
    return _OURS.get(method, _METHOD_COLORS[index % len(_METHOD_COLORS)])


# ------------------------------------------------------------------------------------------ rank plan figures
def _layer_panels(names: Iterable[str]) -> dict[str, dict[int, list[str]]]:
    """Group module names into ``{panel label: {layer: [module names]}}``, panels in first-seen order.

    A panel is the module's path after the layer index (``self_attn.q_proj``; GPT-2 has ``attn.c_proj`` and
    ``mlp.c_proj``), labelled by its last component when that is unambiguous; several layer stacks (a vision
    tower beside the language model) are told apart by the first differing prefix component. Modules without a
    ``.layers.<i>.`` / ``.h.<i>.`` / ``.blocks.<i>.`` index are not layer-wise and are left out.
    """
    parsed = [(n, m) for n in names if (m := _LAYER_RE.search(n)) is not None]
    prefix_parts = {n: n[: m.start()].split(".") for n, m in parsed}
    distinct = list(dict.fromkeys(tuple(p) for p in prefix_parts.values()))
    common = 0
    while len(distinct) > 1 and all(len(p) > common and p[common] == distinct[0][common] for p in distinct):
        common += 1
    kinds = {n: n[m.end():] for n, m in parsed}
    short = {k.rsplit(".", 1)[-1] for k in kinds.values()}
    unique_short = len(short) == len(set(kinds.values()))
    panels: dict[str, dict[int, list[str]]] = {}
    for name, match in parsed:
        label = kinds[name].rsplit(".", 1)[-1] if unique_short else kinds[name]
        if len(distinct) > 1:
            rest = prefix_parts[name][common:]
            label = f"{rest[0] if rest and rest[0] else 'root'}: {label}"
        panels.setdefault(label, {}).setdefault(int(match.group(1)), []).append(name)
    return panels


def _all_layers(panels: Mapping[str, Mapping[int, list[str]]]) -> dict[int, list[str]]:
    """Every panel's modules pooled per layer."""
    every: dict[int, list[str]] = {}
    for layers in panels.values():
        for layer, names in layers.items():
            every.setdefault(layer, []).extend(names)
    return every


def _grid(n_panels: int, width: float = 3.7, height: float = 2.7) -> tuple[Figure, list[Axes]]:
    ncols = min(n_panels, 4)
    nrows = math.ceil(n_panels / ncols)
    fig = Figure(figsize=(width * ncols, height * nrows + 0.8), dpi=DPI, layout="constrained")
    grid = fig.subplots(nrows, ncols, sharey=True, squeeze=False)
    axes = list(grid.flat)
    for ax in axes[n_panels:]:
        ax.remove()
    return fig, axes[:n_panels]


def _plan_panels(plan: Mapping[str, Any]) -> dict[str, dict[int, list[str]]]:
    panels = _layer_panels(plan["modules"])
    if not panels:
        raise ValueError("rank plan has no layer-indexed modules (.layers.<i>. / .h.<i>. / .blocks.<i>.) to plot")
    if len(panels) > 1:
        panels["mean over module kinds"] = _all_layers(panels)
    return panels


def _layer_means(layers: Mapping[int, list[str]], value: Any) -> tuple[np.ndarray, np.ndarray]:
    """(layer indices, mean of ``value(module name)`` over each layer's modules), sorted by layer."""
    idx = sorted(layers)
    return np.array(idx), np.array([np.mean([value(n) for n in layers[i]]) for i in idx])


def _finish_grid(fig: Figure, axes: list[Axes], xlabel: str, ylabel: str, title: str) -> None:
    ncols = min(len(axes), 4)
    for i, ax in enumerate(axes):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(axis="y", alpha=0.3)
        if i >= len(axes) - ncols:
            ax.set_xlabel(xlabel)
        if i % ncols == 0:
            ax.set_ylabel(ylabel)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 6), frameon=False)
    fig.suptitle(title, fontweight="bold")


def rank_allocation_figure(plan: Mapping[str, Any]) -> Figure:
    """Layer-wise rank allocation (paper Figure 4): one panel per module kind plus their mean.

    Each layer is a stacked bar of the task blocks r_t (task colours) topped by the cooperative block (grey), so
    every bar reaches the budget R.

    Args:
        plan: ``rank_plan.json`` (`RankPlan.to_dict`).

    Returns:
        The figure (one axes per panel).
    """
    tasks = list(plan["tasks"])
    modules = plan["modules"]
    fig, axes = _grid(len(panels := _plan_panels(plan)))
    for ax, (label, layers) in zip(axes, panels.items(), strict=True):
        bottom = None
        series = [(t, task_color(i), lambda n, t=t: modules[n]["task_ranks"][t]) for i, t in enumerate(tasks)]
        series.append(("cooperative", COOP_COLOR, lambda n: modules[n]["coop_rank"]))
        for name, color, value in series:
            x, y = _layer_means(layers, value)
            ax.bar(x, y, bottom=bottom, width=0.85, color=color, label=name, edgecolor="white", linewidth=0.3)
            bottom = y if bottom is None else bottom + y
        ax.set_title(label, fontsize=10)
        ax.set_ylim(0, plan["budget"])
    _finish_grid(fig, axes, "layer", "rank", f"Rank allocation per layer (R={plan['budget']}, τ={plan['tau']}, "
                 f"r_min={plan['r_min']})")
    return fig


def entropy_figure(plan: Mapping[str, Any]) -> Figure:
    """Normalised spectral entropy per layer and task (paper Figure 1c): one panel per module kind plus their mean.

    Args:
        plan: ``rank_plan.json`` (`RankPlan.to_dict`), whose ``entropies`` are plotted as saved.

    Returns:
        The figure (one axes per panel, one line per task in each).
    """
    modules = plan["modules"]
    fig, axes = _grid(len(panels := _plan_panels(plan)))
    for ax, (label, layers) in zip(axes, panels.items(), strict=True):
        for i, task in enumerate(plan["tasks"]):
            x, y = _layer_means(layers, lambda n, t=task: modules[n]["entropies"][t])
            ax.plot(x, y, color=task_color(i), marker=_MARKERS[i % len(_MARKERS)], markersize=3, lw=1.3, label=task)
        ax.set_title(label, fontsize=10)
    _finish_grid(fig, axes, "layer", "normalised entropy", "Normalised spectral entropy per layer and task")
    return fig


# ------------------------------------------------------------------------------------------- training curves
def _series(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[float], list[float]]:
    rows = [r for r in history if r.get(key) is not None]
    return [r["step"] for r in rows], [float(r[key]) for r in rows]


def training_curves_figure(histories: Mapping[str, Sequence[Mapping[str, Any]]]) -> Figure:
    """Training loss and regulariser per method against the step, plus eval scores when the histories have them.

    Args:
        histories: ``{method: history.json}``; records ``{"step", "loss", "reg", "lr", "eval/<task>"?}``.

    Returns:
        The figure: loss, regulariser and (if any ``eval/<task>`` key) eval-score panels side by side, one line per
        method (and per task in the eval panel: colour = method, line style = task).
    """
    eval_keys = list(dict.fromkeys(k for h in histories.values() for r in h for k in r if k.startswith("eval/")))
    fig = Figure(figsize=(4.3 * (2 + bool(eval_keys)), 3.6), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(1, 2 + bool(eval_keys), squeeze=False)[0])
    methods = [m for m in histories if m != "base"]
    any_reg = False
    for method, history in histories.items():
        color = method_color(method, methods.index(method) if method in methods else 0)
        axes[0].plot(*_series(history, "loss"), color=color, lw=1.2, label=method)
        steps, reg = _series(history, "reg")
        if any(v != 0 for v in reg):
            any_reg = True
            axes[1].plot(steps, reg, color=color, lw=1.2, label=method)
        for j, key in enumerate(eval_keys):
            steps, score = _series(history, key)
            axes[2].plot(steps, [100 * s for s in score], color=color, ls=_STYLES[j % 4],
                         marker=_MARKERS[j % len(_MARKERS)], markersize=3.5, lw=1.2)
    if not any_reg:
        axes[1].text(0.5, 0.5, "no regulariser\nin these runs", ha="center", va="center", transform=axes[1].transAxes,
                     color="0.4")
    for ax, title, ylabel in zip(axes, ("training loss", "regulariser (λ-weighted)", "eval score"),
                                 ("loss", "reg", "score (%)"), strict=False):
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if any_reg:
        axes[1].legend(fontsize=8)
    if eval_keys:
        axes[2].legend([Line2D([], [], color="0.2", ls=_STYLES[j % 4], marker=_MARKERS[j % len(_MARKERS)], markersize=4)
                        for j in range(len(eval_keys))], [k.removeprefix("eval/") for k in eval_keys], fontsize=8)
    fig.suptitle("Training curves", fontweight="bold")
    return fig


# ------------------------------------------------------------------------------------------------- overlap
def overlap_figure(overlap: Mapping[str, Any]) -> Figure:
    """Task-block overlap before vs after training: mean T×T heatmaps, and mean cross-task overlap per layer.

    The diagonal (a block against itself) is greyed out and the colour scale, shared by both heatmaps, spans the
    off-diagonal values; every cell is annotated.

    Args:
        overlap: ``{"before": {module: T×T}, "after": {module: T×T}, "tasks": [...]}`` (either phase may be absent).

    Returns:
        The figure: one heatmap per phase, their colour bar, and (T > 1 with layer-indexed modules) a per-layer panel.
    """
    tasks = list(overlap["tasks"])
    phases = [p for p in ("before", "after") if overlap.get(p)]
    if not phases:
        raise ValueError("overlap has neither 'before' nor 'after' matrices")
    mats = {p: np.mean([np.asarray(m, dtype=float) for m in overlap[p].values()], axis=0) for p in phases}
    off = ~np.eye(len(tasks), dtype=bool) if len(tasks) > 1 else np.ones((1, 1), dtype=bool)
    vmax = max(float(mats[p][off].max()) for p in phases) or 1.0
    panels = _layer_panels(overlap[phases[-1]]) if len(tasks) > 1 else {}
    widths = [1.0] * len(phases) + ([1.3] if panels else [])
    fig = Figure(figsize=(3.6 * len(phases) + 4.6 * bool(panels) + 1.0, 3.8), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(1, len(widths), width_ratios=widths, squeeze=False)[0])
    cmap = colormaps["viridis"].with_extremes(bad="0.88")
    for ax, phase in zip(axes, phases, strict=False):
        image = ax.imshow(np.ma.masked_array(mats[phase], ~off), cmap=cmap, vmin=0.0, vmax=vmax)
        for (i, j), v in np.ndenumerate(mats[phase]):
            color = ("white" if v < 0.55 * vmax else "black") if off[i, j] else "0.4"  # grey: the unscaled diagonal
            ax.text(j, i, f"{v:.3f}", ha="center", va="center", fontsize=8, color=color)
        ax.set_xticks(range(len(tasks)), tasks, rotation=30 if len(tasks) > 2 else 0, ha="right" if len(tasks) > 2
                      else "center")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_title(f"{phase} training (mean of {len(overlap[phase])} modules)", fontsize=10)
    fig.colorbar(image, ax=axes[: len(phases)], shrink=0.85, label="normalised overlap")
    if panels:
        ax = axes[-1]
        upper = np.triu_indices(len(tasks), k=1)
        every = _all_layers(panels)
        for phase, style in zip(phases, ("--", "-"), strict=False):
            x, y = _layer_means(every, lambda n, p=phase: np.asarray(overlap[p][n], dtype=float)[upper].mean())
            ax.plot(x, y, ls=style, marker="o", markersize=3, lw=1.3, color="0.5" if style == "--" else "tab:red",
                    label=phase)
        ax.set_title("mean cross-task overlap per layer", fontsize=10)
        ax.set(xlabel="layer", ylabel="normalised overlap")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Task-block overlap", fontweight="bold")
    return fig


# ------------------------------------------------------------------------------------------------ accuracy
def accuracy_figure(metrics: Mapping[str, Any]) -> Figure:
    """Grouped bars of every task's score (and the average): base model and each method, ±1 standard error.

    A dashed line across each group marks the base model's score, so gains read directly off the bars.

    Args:
        metrics: ``metrics.json``: ``{"base" | method: {task: {"metric", "score", "n", ...}, "average": ...}}``.

    Returns:
        The figure (one axes).
    """
    from thanora.experiment.report import metric_methods, metric_tasks, score_of  # report never imports plots

    methods, tasks = metric_methods(metrics), metric_tasks(metrics)
    groups = [*tasks, "average"] if any(score_of(metrics[m], "average") is not None for m in methods) else tasks
    width = 0.8 / len(methods)
    fig = Figure(figsize=(max(6.0, 1.5 + len(groups) * (0.3 * len(methods) + 0.6)), 4.2), dpi=DPI,
                 layout="constrained")
    ax = fig.subplots()
    others = [m for m in methods if m != "base"]
    annotate = len(groups) * len(methods) <= 48
    for j, method in enumerate(methods):
        x = np.arange(len(groups)) + (j - (len(methods) - 1) / 2) * width
        scores = [score_of(metrics[method], g) for g in groups]
        heights = np.array([np.nan if s is None else 100 * s for s in scores])
        errors = []
        for g, s in zip(groups, scores, strict=True):
            n = metrics[method].get(g, {}).get("n") if isinstance(metrics[method].get(g), Mapping) else None
            errors.append(100 * math.sqrt(s * (1 - s) / n) if s is not None and n and 0 <= s <= 1 else 0.0)
        color = method_color(method, others.index(method) if method in others else 0)
        ax.bar(x, heights, width * 0.92, yerr=errors, color=color, label=method, capsize=1.5,
                      error_kw={"elinewidth": 0.7, "ecolor": "0.25"})
        for xi, h, err in zip(x, heights, errors, strict=True):
            if annotate and not np.isnan(h):  # above the error bar, not on it
                ax.annotate(f"{h:.1f}", (xi, h + err), xytext=(0, 2), textcoords="offset points", ha="center",
                            va="bottom", fontsize=6.5, rotation=90 if len(methods) > 3 else 0)
    if "base" in methods:
        for g, group in enumerate(groups):
            if (base := score_of(metrics["base"], group)) is not None:
                ax.hlines(100 * base, g - 0.45, g + 0.45, colors="0.15", linestyles="--", lw=0.9,
                          label="base score" if g == 0 else None, zorder=3)
    labels = []
    for group in groups:
        entry = next((metrics[m][group] for m in methods if isinstance(metrics[m].get(group), Mapping)), {})
        labels.append(f"{group}\n({entry['metric']})" if "metric" in entry else group)
    ax.set_xticks(range(len(groups)), labels)
    top = np.nanmax([100 * s for m in methods for g in groups if (s := score_of(metrics[m], g)) is not None])
    ax.set_ylim(0, min(100.0, top * 1.18 + 2) if top <= 100 else top * 1.18)
    ax.set_ylabel("score (%)")
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", ncols=min(len(methods) + 1, 7), frameon=False)
    fig.suptitle("Per-task score (error bars: ±1 s.e. = √(p(1−p)/n))", fontweight="bold")
    return fig


# -------------------------------------------------------------------------------------------------- saving
def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG (dpi 150) atomically, then close it (its artists are released).

    Args:
        fig: the figure; not usable afterwards.
        path: destination ``.png`` (parent folders are created).

    Returns:
        ``path``.
    """
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    finally:
        pyplot = sys.modules.get("matplotlib.pyplot")  # only a pyplot-made figure is registered anywhere
        if pyplot is not None and getattr(fig.canvas, "manager", None) is not None:
            pyplot.close(fig)
        fig.clear()
    return path


def plot_run(run_dir: str | Path) -> list[Path]:
    """Draw every figure whose inputs a run directory holds into ``run_dir/plots/``.

    Reads ``metrics.json`` (and ``<method>/metrics.json``), ``<method>/history.json``, ``<method>/rank_plan.json``
    and ``<method>/overlap.json``; writes ``accuracy.png``, ``training_curves.png``, ``<method>_rank_allocation.png``,
    ``<method>_entropy.png`` and ``<method>_overlap.png`` for what exists.

    Returns:
        The paths written.
    """
    from thanora.experiment.report import collect_metrics, method_dirs

    run_dir = Path(run_dir)
    out = run_dir / "plots"
    written: list[Path] = []
    metrics = collect_metrics(run_dir)
    if metrics:
        written.append(save_figure(accuracy_figure(metrics), out / "accuracy.png"))
    dirs = method_dirs(run_dir, metrics)
    histories = {m: read_json(d / "history.json") for m, d in dirs.items() if (d / "history.json").is_file()}
    if histories:
        written.append(save_figure(training_curves_figure(histories), out / "training_curves.png"))
    for method, folder in dirs.items():
        if (folder / "rank_plan.json").is_file():
            plan = read_json(folder / "rank_plan.json")
            written.append(save_figure(rank_allocation_figure(plan), out / f"{method}_rank_allocation.png"))
            written.append(save_figure(entropy_figure(plan), out / f"{method}_entropy.png"))
        if (folder / "overlap.json").is_file():
            overlap = read_json(folder / "overlap.json")
            written.append(save_figure(overlap_figure(overlap), out / f"{method}_overlap.png"))
    return written
