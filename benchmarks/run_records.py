"""Committed summaries of benchmark run folders: what a table needs from a run, kept where git keeps it.

Run folders live under ``runs/`` (git-ignored: adapters, checkpoints, histories) and do not survive a fresh checkout,
so a benchmark that spans sessions would start again from nothing. Each finished run's small part (its config,
per-method metrics with per-question correctness, stage timings, and the measurements made on its adapters) is
written to ``benchmarks/results/runs/<table>/<run>.json`` as soon as it lands; a re-entered benchmark reads it there
instead of re-training. Commit those files as they appear.

One record per run folder, updated field by field (atomically, `thanora.artifacts.write_json`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

RECORDS = Path(__file__).parent / "results" / "runs"


def table_dir(root: Path) -> Path:
    """Where the records of the runs under ``root`` (``runs/.../<table>``) live; also the home of measurements that
    belong to the table rather than to one run."""
    return RECORDS / root.name


def record_path(folder: Path) -> Path:
    """Where the record of run folder ``folder`` (``runs/.../<table>/<run>``) lives."""
    return table_dir(folder.parent) / f"{folder.name}.json"


def load(folder: Path) -> dict[str, Any]:
    """The record of ``folder`` (empty where there is none)."""
    from thanora.artifacts import read_json

    path = record_path(folder)
    return read_json(path) if path.is_file() else {}


def update(folder: Path, **fields: Any) -> dict[str, Any]:
    """Set ``fields`` in the record of ``folder``; returns the whole record."""
    return write(folder, load(folder) | fields)


def write(folder: Path, record: dict[str, Any]) -> dict[str, Any]:
    """Replace the record of ``folder`` with ``record``; returns it."""
    from thanora.artifacts import write_json

    path = record_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, record)
    return record

