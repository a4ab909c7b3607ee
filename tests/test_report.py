"""Tests for thanora.experiment.report: metrics tables, the within-noise note and report.md from a synthetic run
directory."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from thanora.artifacts import write_json
from thanora.core.allocation import allocate_ranks
from thanora.experiment.report import (
    collect_metrics,
    console_table,
    flat_tasks,
    metrics_table,
    render_report,
    standard_error,
    write_report,
)


def _entry(p: float, n: int = 200) -> dict[str, Any]:
    return {"metric": "accuracy", "mode": "loglik", "score": p, "n": n, "correct": [1] * int(p * n)}


def _metrics(gain: float) -> dict[str, Any]:
    """Base 50% / 40% on csqa / obqa (n=200, s.e. 3.5%); lora gains ``gain`` on csqa, nothing on obqa."""
    return {
        "base": {"csqa": _entry(0.5), "obqa": _entry(0.4), "average": 0.45},
        "lora": {"csqa": _entry(0.5 + gain), "obqa": _entry(0.41), "average": 0.455 + gain / 2},
    }


def _run_dir(root: Path, gain: float) -> Path:
    metrics = _metrics(gain)
    write_json(root / "metrics.json", {"base": metrics["base"]})
    write_json(root / "lora" / "metrics.json", metrics["lora"])
    write_json(root / "data.json", {"seed": 7, "tasks": {"csqa": {"n_train": 100, "n_eval": 200, "train": [1, 2, 3]},
                                                         "obqa": {"n_train": 100, "n_eval": 200, "train": [1]}}})
    write_json(root / "run.json", {"status": "complete", "timings": {"lora": 3725.0}})
    entropies = {t: {f"model.layers.{i}.self_attn.q_proj": 0.5 + 0.1 * i for i in range(2)} for t in ("csqa", "obqa")}
    write_json(root / "thanora" / "rank_plan.json", allocate_ranks(entropies, budget=9, tau=1.0, r_min=1).to_dict())
    (root / "config.yaml").write_text("seed: 7\n")
    (root / "plots").mkdir()
    (root / "plots" / "accuracy.png").write_bytes(b"png")
    return root


def test_standard_error() -> None:
    assert abs(standard_error(0.5, 100) - 0.05) < 1e-12
    assert standard_error(0.5, 0) == 0.0


def test_metrics_table_rows_columns_and_bold_best() -> None:
    lines = metrics_table(_metrics(0.1)).splitlines()
    assert lines[0] == "| method | csqa (n=200) | obqa (n=200) | average |"
    assert lines[2] == "| base | 50.0 | 40.0 | 45.0 |"
    assert lines[3] == "| lora | **60.0** | **41.0** | **50.5** |"
    assert len(lines) == 4
    assert metrics_table({}) == "(no metrics)"


def test_sizes_that_differ_go_in_the_cells() -> None:
    metrics = _metrics(0.1)
    metrics["lora"]["csqa"]["n"] = 150
    table = metrics_table(metrics)
    assert table.splitlines()[0] == "| method | csqa | obqa (n=200) | average |"
    assert "| lora | **60.0 (n=150)** |" in table


def test_console_table_is_aligned() -> None:
    lines = console_table(_metrics(0.1)).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split() == ["method", "csqa", "(n=200)", "obqa", "(n=200)", "average"]
    assert lines[2].split() == ["base", "50.0", "40.0", "45.0"]
    assert {line.index(" 45.0") for line in lines[2:3]} == {lines[0].index("average") + len("average") - 5}


def test_flat_tasks_use_the_base_standard_error() -> None:
    # s.e. of 50% on 200 questions is 3.54%: a 3-point gain is within it, a 10-point gain is not
    assert [f.split(":")[0] for f in flat_tasks(_metrics(0.03))] == ["csqa", "obqa"]
    assert [f.split(":")[0] for f in flat_tasks(_metrics(0.10))] == ["obqa"]
    assert flat_tasks({"lora": _metrics(0.1)["lora"]}) == []


def test_collect_metrics_reads_method_folders(tmp_path: Path) -> None:
    metrics = collect_metrics(_run_dir(tmp_path, 0.1))
    assert list(metrics) == ["base", "lora"]
    assert metrics["lora"]["csqa"]["score"] == 0.6


def test_report_from_run_dir(tmp_path: Path) -> None:
    text = render_report(_run_dir(tmp_path, 0.0))
    assert "[`config.yaml`](config.yaml)" in text
    assert "- seed: `7`" in text and "| csqa | 100 | 200 | 3 |" in text  # list fields shown as their size
    assert "| base | **50.0** | 40.0 | 45.0 |" in text and "| lora | **50.0** | **41.0** | **45.5** |" in text
    assert "> **Note:**" in text and "> - csqa: base 50.0% ± 3.5" in text and "> - obqa:" in text
    assert "### thanora" in text and "rank plan: R=9" in text
    assert "![accuracy](plots/accuracy.png)" in text
    assert "| lora | 3725.0 s (1:02:05) |" in text and "- status: `complete`" in text
    path = write_report(tmp_path)
    assert path == tmp_path / "report.md" and path.read_text(encoding="utf-8") == text


def test_no_note_when_a_method_beats_base_everywhere(tmp_path: Path) -> None:
    metrics = _metrics(0.1)
    metrics["lora"]["obqa"] = _entry(0.6)
    write_json(tmp_path / "metrics.json", metrics)
    text = render_report(tmp_path)
    assert "**Note:**" not in text
    assert "No `data.json`" in text and "No `run.json`" in text and "No `config.yaml`" in text
