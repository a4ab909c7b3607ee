"""``report.md`` of a run directory, and the metrics tables the CLI prints; built from the saved JSON only.

``metrics.json`` holds ``{"base" | method: {task: {"metric", "mode", "score", "n", "correct"}, "average": ...}}``;
``average`` may be a float or ``{"score": float}``, and a method missing from it is read from
``<method>/metrics.json``. Scores are fractions in [0, 1] and are shown as percentages.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from thanora.artifacts import read_json, write_text
from thanora.core.allocation import RankPlan

AVERAGE = "average"


# ------------------------------------------------------------------------------------------ reading metrics
def metric_methods(metrics: Mapping[str, Any]) -> list[str]:
    """Rows of the metrics table: ``base`` first, then the methods in saved order."""
    names = [m for m, v in metrics.items() if isinstance(v, Mapping)]
    return sorted(names, key=lambda m: m != "base")


def metric_tasks(metrics: Mapping[str, Any]) -> list[str]:
    """Task columns: every key (but ``average``) holding a ``{"score": ...}`` entry, in first-seen order."""
    tasks: dict[str, None] = {}
    for method in metric_methods(metrics):
        for task, entry in metrics[method].items():
            if task != AVERAGE and isinstance(entry, Mapping) and "score" in entry:
                tasks[task] = None
    return list(tasks)


def score_of(entry: Mapping[str, Any], task: str) -> float | None:
    """Saved score of ``task`` (or ``average``) in one method's metrics, or None when absent."""
    value = entry.get(task)
    if isinstance(value, Mapping):
        value = value.get("score")
    return None if value is None else float(value)


def standard_error(score: float, n: int) -> float:
    """√(p(1−p)/n) of a score p measured on n questions (0 when n is 0)."""
    return math.sqrt(max(score * (1 - score), 0.0) / n) if n > 0 else 0.0


def collect_metrics(run_dir: str | Path) -> dict[str, Any]:
    """``run_dir/metrics.json`` completed with the ``<method>/metrics.json`` of methods it lacks ({} if none)."""
    run_dir = Path(run_dir)
    metrics: dict[str, Any] = dict(read_json(run_dir / "metrics.json")) if (run_dir / "metrics.json").is_file() else {}
    for folder in sorted(p for p in run_dir.iterdir() if p.is_dir()):
        if folder.name not in metrics and (folder / "metrics.json").is_file():
            saved = read_json(folder / "metrics.json")
            metrics[folder.name] = saved.get(folder.name, saved) if isinstance(saved, Mapping) else saved
    return metrics


def method_dirs(run_dir: str | Path, metrics: Mapping[str, Any] | None = None) -> dict[str, Path]:
    """``{method: run_dir/<method>}`` for every method folder with saved results, in metrics order then by name."""
    run_dir = Path(run_dir)
    saved = ("metrics.json", "history.json", "rank_plan.json", "overlap.json")
    found = {p.name: p for p in sorted(run_dir.iterdir()) if p.is_dir() and any((p / f).is_file() for f in saved)}
    order = [m for m in (metrics or {}) if m in found]
    return {m: found[m] for m in order + [m for m in found if m not in order]}


# ------------------------------------------------------------------------------------------------- tables
def _cells(metrics: Mapping[str, Any], with_n: bool) -> tuple[list[str], list[list[str]], list[str]]:
    """Header, one row of cells per method (percentages), and the n of each task column."""
    methods, tasks = metric_methods(metrics), metric_tasks(metrics)
    ns: list[str] = []
    for task in tasks:
        sizes = {metrics[m][task].get("n") for m in methods if isinstance(metrics[m].get(task), Mapping)}
        ns.append(str(sizes.pop()) if len(sizes) == 1 else "")
    rows = []
    for method in methods:
        row = [method]
        for task, n in zip(tasks, ns, strict=True):
            score = score_of(metrics[method], task)
            cell = "–" if score is None else f"{100 * score:.1f}"
            if score is not None and with_n and not n:
                cell += f" (n={metrics[method][task].get('n')})"
            row.append(cell)
        average = score_of(metrics[method], AVERAGE)
        row.append("–" if average is None else f"{100 * average:.1f}")
        rows.append(row)
    header = ["method", *(f"{t} (n={n})" if n else t for t, n in zip(tasks, ns, strict=True)), AVERAGE]
    return header, rows, ns


def metrics_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table: rows = base + each method, columns = tasks + average, scores in %, best per column bold.

    Args:
        metrics: ``metrics.json`` (see the module docstring).

    Returns:
        The table (no trailing newline); ``"(no metrics)"`` when empty.
    """
    if not metric_methods(metrics):
        return "(no metrics)"
    header, rows, _ = _cells(metrics, with_n=True)
    for col in range(1, len(header)):
        values = [(float(r[col].split()[0]), i) for i, r in enumerate(rows) if r[col] != "–"]
        best = max((v for v, _ in values), default=None)
        for value, i in values:
            if value == best and len(values) > 1:
                rows[i][col] = f"**{rows[i][col]}**"
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def console_table(metrics: Mapping[str, Any]) -> str:
    """The same table as aligned plain text for a terminal (method left-aligned, scores right-aligned, in %).

    Args:
        metrics: ``metrics.json`` (see the module docstring).

    Returns:
        The table (no trailing newline); ``"(no metrics)"`` when empty.
    """
    if not metric_methods(metrics):
        return "(no metrics)"
    header, rows, _ = _cells(metrics, with_n=True)
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths,
                                                                                               strict=True)))

    return "\n".join([line(header), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def flat_tasks(metrics: Mapping[str, Any]) -> list[str]:
    """Tasks on which no method beats the base model by more than the base score's standard error √(p(1−p)/n).

    Args:
        metrics: ``metrics.json``; tasks without a base score are skipped.

    Returns:
        One line per flagged task: base score ± s.e., and the best method's score.
    """
    if "base" not in metrics:
        return []
    flagged = []
    methods = [m for m in metric_methods(metrics) if m != "base"]
    for task in metric_tasks(metrics):
        base = score_of(metrics["base"], task)
        if base is None or not methods:
            continue
        se = standard_error(base, int(metrics["base"][task].get("n") or 0))
        scored = [(s, m) for m in methods if (s := score_of(metrics[m], task)) is not None]
        best, best_method = max(scored, default=(None, None))
        if best is None or best - base <= se:
            best_text = "no method scored" if best is None else f"best {best_method} {100 * best:.1f}%"
            flagged.append(f"{task}: base {100 * base:.1f}% ± {100 * se:.1f}, {best_text}")
    return flagged


# ------------------------------------------------------------------------------------------------- report
def _scalar(value: Any) -> bool:
    return isinstance(value, str | int | float | bool) or value is None


def _flat(entry: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """One-level view of a JSON record: scalars as is, lists as their length, nested mappings dotted."""
    out: dict[str, str] = {}
    for key, value in entry.items():
        name = f"{prefix}{key}"
        if _scalar(value):
            out[name] = f"{value:.4g}" if isinstance(value, float) else str(value)
        elif isinstance(value, list):
            out[name] = str(len(value))
        elif isinstance(value, Mapping) and not prefix:
            out.update(_flat(value, f"{name}."))
    return out


def _record_table(records: Mapping[str, Mapping[str, Any]], first: str) -> list[str]:
    flat = {name: _flat(r) for name, r in records.items()}
    columns = list(dict.fromkeys(k for f in flat.values() for k in f))
    lines = ["| " + " | ".join([first, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([name, *(f.get(c, "") for c in columns)]) + " |" for name, f in flat.items()]
    return lines


def _data_section(data: Any) -> list[str]:
    """Task sizes, seeds and fingerprints from ``data.json`` (scalars listed, list fields shown as their length)."""
    if not isinstance(data, Mapping):
        return ["(unrecognised data.json)"]
    tasks = data.get("tasks", {k: v for k, v in data.items() if isinstance(v, Mapping)})
    if isinstance(tasks, list):
        tasks = {str(t.get("name", i)): t for i, t in enumerate(tasks) if isinstance(t, Mapping)}
    lines = [f"- {k}: `{v}`" for k, v in data.items() if _scalar(v)]
    if tasks:
        lines += ["", *_record_table(tasks, "task")]
    return lines


def _run_section(run: Any) -> list[str]:
    """Status and timings from ``run.json``: scalars listed, numeric mappings (timings) as tables of seconds."""
    if not isinstance(run, Mapping):
        return ["(unrecognised run.json)"]
    lines = [f"- {k}: `{v}`" for k, v in run.items() if _scalar(v)]
    for key, value in run.items():
        if isinstance(value, Mapping) and value:
            flat = _flat(value)
            lines += ["", f"**{key}**", "", f"| {key} | value |", "|---|---:|"]
            for name, text in flat.items():
                seconds = value.get(name) if isinstance(value.get(name), int | float) else None
                if seconds is not None and not isinstance(seconds, bool) and (_is_time(key) or _is_time(name)):
                    text = f"{seconds:.1f} s ({_hms(float(seconds))})"
                lines.append(f"| {name} | {text} |")
    return lines


def _training_section(dirs: Mapping[str, Path]) -> list[str]:
    """Each method's own training settings (``<method>/train.json``): rate, length, warm-up, schedule, tasks."""
    records = {m: read_json(d / "train.json") for m, d in dirs.items() if (d / "train.json").is_file()}
    if not records:
        return []
    lines = ["## Training per method", "", "| method | lr | epochs | max steps | warm-up | schedule | tasks |",
             "|---|---|---|---|---|---|---|"]
    for method, record in records.items():
        train, tasks = record.get("train", {}), record.get("tasks", [])
        lines.append(f"| {method} | {train.get('lr', '')} | {train.get('epochs', '')} | "
                     f"{train.get('max_steps') or '–'} | {train.get('warmup_ratio', '')} | "
                     f"{train.get('schedule', '')} | {', '.join(tasks)} |")
    return [*lines, ""]


def _is_time(key: str) -> bool:
    key = key.lower()
    return key.endswith("_s") or any(w in key for w in ("time", "timing", "duration", "second", "elapsed"))


def _hms(seconds: float) -> str:
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{sec:02d}"


def render_report(run_dir: str | Path) -> str:
    """Markdown report of a run directory, from its saved files only.

    Sections: config, data (``data.json``), results (metrics table and a note on tasks where no method beats the
    base model by more than one standard error), rank plans (``<method>/rank_plan.json``), plots
    (``plots/*.png`` that exist) and run status/timings (``run.json``). Missing files are said to be missing.

    Args:
        run_dir: the run directory.

    Returns:
        The report text, ending with a newline.
    """
    run_dir = Path(run_dir)
    lines = [f"# thanora run: {run_dir.name}", ""]
    config = run_dir / "config.yaml"
    lines += ["## Config", "", f"Resolved config: [`config.yaml`](config.yaml) (`{config}`)" if config.is_file()
              else "No `config.yaml` in this run directory.", ""]
    lines += ["## Data", ""]
    lines += _data_section(read_json(run_dir / "data.json")) if (run_dir / "data.json").is_file() else \
        ["No `data.json` in this run directory."]
    metrics = collect_metrics(run_dir)
    lines += ["", "## Results", "", "Scores in %, best per column in bold; n = number of evaluation questions.", "",
              metrics_table(metrics), ""]
    if flagged := flat_tasks(metrics):
        lines += ["> **Note:** on these tasks no method beats the base model by more than one standard error",
                  "> √(p(1−p)/n) of the base score, so the gain is within evaluation noise:", ">"]
        lines += [f"> - {f}" for f in flagged] + [""]
    dirs = method_dirs(run_dir, metrics)
    lines += _training_section(dirs)
    plans = {m: d / "rank_plan.json" for m, d in dirs.items() if (d / "rank_plan.json").is_file()}
    if plans:
        lines += ["## Rank plans", ""]
        for method, path in plans.items():
            lines += [f"### {method}", "", "```", RankPlan.from_dict(read_json(path)).summary(), "```", ""]
    pngs = sorted((run_dir / "plots").glob("*.png")) if (run_dir / "plots").is_dir() else []
    if pngs:
        lines += ["## Plots", ""]
        for png in pngs:
            lines += [f"![{png.stem}](plots/{png.name})", ""]
    lines += ["## Run", ""]
    lines += _run_section(read_json(run_dir / "run.json")) if (run_dir / "run.json").is_file() else \
        ["No `run.json` in this run directory."]
    return "\n".join(lines).rstrip("\n") + "\n"


def write_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.md`` atomically (see `render_report`) and return its path."""
    path = Path(run_dir) / "report.md"
    write_text(path, render_report(run_dir))
    return path
