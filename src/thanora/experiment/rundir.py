"""What a run folder is, what a run may write into it and what ``--overwrite`` / ``--resume`` may touch.

A run folder is recognised by its ``run.json`` (``"format": "thanora-run/1"``; older runs by their keys). Its
``"written"`` list names every entry the run writes at the top of the folder (`RUN_FILES`, `RUN_FOLDERS` and one
folder per method label), recorded before the first of them is written, so the next command knows exactly what is
thanora's. The rules (`decide`, then `clear`):

- an absent or empty folder is a fresh run; a folder holding anything but a run is never written into, whatever the
  flags (choose another folder);
- ``--resume`` continues a run only with the same config (`config_changes`: only the settings in `MAY_CHANGE` may
  differ) or with methods added to it (then ``config.yaml`` gains them), so ``config.yaml`` always describes the
  results beside it;
- ``--overwrite`` replaces a run, deleting only the entries the old run wrote (but its spectra cache, whose entries
  are keyed by model, settings and data), after every input of the new run has been validated, and refuses when an
  input of the new run (a data file, the model folder) lies inside one of them;
- without a flag, a run folder without results (a start that failed before any stage finished) is replaced, so a
  failed start never blocks the retry; one with results is refused with both flags named.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Literal

import yaml

from thanora.artifacts import read_json

logger = logging.getLogger(__name__)

RUN_FORMAT = "thanora-run/1"
RUN_FILES = ("config.yaml", "data.json", "metrics.json", "report.md", "run.json", "rank_plan.json")
KEPT = ("cache",)  # kept on --overwrite: its spectra are keyed by model, settings and data, reused only on a match
RUN_FOLDERS = ("plots", "cache")
# Names a method label or a task cannot take, with the reason given in the error.
RESERVED_LABELS = {"base": "the zero-shot base model's row in metrics.json", "average": "a column of every table",
                   **{f: f"the run folder's {f}/ folder" for f in RUN_FOLDERS}}
RESERVED_TASKS = {"average": "the unweighted mean column of metrics.json"}
# Settings a resumed run may change: they do not change what the run computes.
MAY_CHANGE = ("train.log_every", "train.eval_every", "train.save_every", "train.gradient_checkpointing",
              "train.labelled_logits_only", "train.pack_sequences", "output.plots")

Action = Literal["fresh", "resume", "replace"]


class RunDirError(ValueError):
    """The output folder cannot be used as asked; the message says what to do. Nothing was changed."""


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds a thanora run (a ``run.json`` that thanora wrote)."""
    record = _record(path)
    return record is not None


def _record(path: Path) -> dict[str, Any] | None:
    file = Path(path) / "run.json"
    if not file.is_file():
        return None
    try:
        record = read_json(file)
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict):
        return None
    if record.get("format") == RUN_FORMAT or {"status", "seed", "versions", "timings_s"} <= set(record):
        return record
    return None


def run_entries(labels: Iterable[str]) -> list[str]:
    """The top-level entries a run with these method labels writes."""
    return [*RUN_FILES, *RUN_FOLDERS, *labels]


def written_entries(path: Path) -> list[str]:
    """The entries of run folder ``path`` that its run wrote (its ``run.json`` list; for a run of an older thanora,
    the standard files and folders and one folder per method of its ``config.yaml``), keeping only names a run can
    write (`RUN_FILES`, `RUN_FOLDERS` or a method label, an identifier): each one level inside the folder, so an
    edited or corrupt ``run.json`` (``".."``, ``"/home"``, ``"a/../.."``) never points ``--overwrite`` outside it."""
    return [e for e in _listed_entries(path) if e in RUN_FILES or e in RUN_FOLDERS or e.isidentifier()]


def _listed_entries(path: Path) -> list[str]:
    record = _record(path) or {}
    written = record.get("written")
    if isinstance(written, list) and all(isinstance(w, str) for w in written):
        return written
    labels: list[str] = []
    try:
        saved = yaml.safe_load((Path(path) / "config.yaml").read_text(encoding="utf-8")) or {}
        labels = [m.get("label") or m.get("name") for m in saved.get("methods", []) if isinstance(m, dict)]
    except (OSError, yaml.YAMLError, AttributeError):
        pass
    return run_entries(str(label) for label in labels if label)


def has_results(path: Path) -> bool:
    """Whether the run in ``path`` finished anything worth keeping: a metrics entry or a training checkpoint."""
    try:
        metrics = read_json(path / "metrics.json") if (path / "metrics.json").is_file() else {}
    except ValueError:
        metrics = {"corrupt": True}  # unreadable results are still results: never replaced without a flag
    if metrics:
        return True
    return any((path / entry / "checkpoints" / "latest").is_file() for entry in written_entries(path))


def decide(out: Path, cfg_dict: Mapping[str, Any], overwrite: bool, resume: bool) -> Action:
    """What to do with ``out`` for a run of the resolved config ``cfg_dict``; changes nothing.

    Raises:
        RunDirError: the folder cannot be used as asked (the message names the flag or folder to use instead).
    """
    if overwrite and resume:
        raise RunDirError("--overwrite and --resume exclude each other: --resume continues the run in the folder, "
                          "--overwrite replaces it")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--output-dir {out} is a file, not a folder; give a new or empty folder")
    empty = not out.exists() or not any(out.iterdir())
    if resume:
        if not is_run_dir(out):
            raise RunDirError(f"--resume: {out} holds no thanora run to resume (no run.json); drop --resume")
        saved = _saved_config(out)
        removed = sorted(set(_labels(saved)) - set(_labels(cfg_dict)))
        if removed:
            raise RunDirError(f"--resume: the config lacks methods {removed} that {out} holds results of; resume with "
                              "the config it was run with (methods may be added, not removed)")
        added = set(_labels(cfg_dict)) - set(_labels(saved))
        changes = [k for k in config_changes(saved, cfg_dict)
                   if not any(k.startswith(f"methods[{label}]") for label in added)]
        if changes:
            raise RunDirError(f"--resume: the config differs from the one {out} was run with in {changes[:6]}; "
                              "resume with the same config (methods may be added), or use a new --output-dir for "
                              "the new settings")
        return "resume"
    if empty:
        return "fresh"
    if not is_run_dir(out):
        raise RunDirError(f"--output-dir {out} holds files that are not a thanora run; choose a new or empty folder "
                          "(--overwrite only replaces thanora run folders)")
    if overwrite:
        return "replace"
    if has_results(out):
        raise RunDirError(f"{out} already holds a run with results; pass --resume to continue it or --overwrite to "
                          "replace it (only the files that run wrote are deleted)")
    logger.info("%s holds a run that stopped before any result; starting it again", out)
    return "replace"


def check_inputs_outside(out: Path, inputs: Mapping[str, Path]) -> None:
    """Refuse to replace the run in ``out`` when an input of the new run lies inside an entry the old run wrote.

    Args:
        out: the run folder.
        inputs: ``{config field: path}`` of the new run's local inputs (data files, model folder).

    Raises:
        RunDirError: naming the field, the path and the entry.
    """
    for entry in written_entries(out):
        target = (out / entry).resolve()
        for name, path in inputs.items():
            resolved = Path(path).expanduser().resolve()
            if resolved == target or target in resolved.parents:
                raise RunDirError(f"{name} ({path}) lies inside {out / entry}, which --overwrite would delete; move "
                                  "it out of the run folder first (nothing was changed)")


def clear(out: Path) -> list[str]:
    """Delete the entries the run in ``out`` wrote, and nothing else (the spectra cache stays: `KEPT`); returns
    what was left in place."""
    own = set(written_entries(out))
    written = own - set(KEPT)
    foreign = sorted(set(_listed_entries(out)) - own)
    if foreign:
        logger.warning("%s lists entries a run cannot have written; left alone: %s", out / "run.json", foreign[:8])
    for entry in sorted(written):
        path = out / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
    kept = sorted(p.name for p in out.iterdir() if p.name not in KEPT)
    if kept:
        logger.info("kept %d entries of %s that the old run did not write: %s", len(kept), out, kept[:8])
    return kept


def added_methods(out: Path, cfg_dict: Mapping[str, Any]) -> list[str]:
    """The method labels of ``cfg_dict`` that the run in ``out`` does not hold yet (what a resume adds)."""
    saved = set(saved_methods(out))
    return [label for label in _labels(cfg_dict) if label not in saved]


def saved_methods(out: Path) -> list[str]:
    """The method labels of the run in ``out``, from its saved config (empty where ``out`` holds no run)."""
    return _labels(_saved_config(out)) if is_run_dir(out) and (out / "config.yaml").is_file() else []


def _labels(cfg: Mapping[str, Any]) -> list[str]:
    methods = cfg.get("methods") or []
    return [str(m.get("label") or m.get("name")) for m in methods if isinstance(m, Mapping)]


def config_changes(saved: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The dotted keys whose values differ between two resolved configs, except those in `MAY_CHANGE`; methods are
    compared by label (``methods[thanora].tau``)."""
    flat_saved, flat_new = _flatten(saved), _flatten(new)
    keys = sorted(set(flat_saved) | set(flat_new))
    # A key one side lacks counts as null there (a field added by a later thanora, with a null default).
    return [k for k in keys if flat_saved.get(k) != flat_new.get(k) and k not in MAY_CHANGE]


def _saved_config(out: Path) -> dict[str, Any]:
    try:
        saved = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as err:
        raise RunDirError(f"--resume: {out / 'config.yaml'} is missing or unreadable ({type(err).__name__}); the "
                          "run cannot be resumed, use a new --output-dir") from None
    return saved if isinstance(saved, dict) else {}


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and prefix == "methods":
        out = {}
        for item in data:
            label = item.get("label") or item.get("name") if isinstance(item, dict) else item
            out.update(_flatten(item, f"methods[{label}]"))
        return out
    if isinstance(data, list) and prefix == "tasks":
        out = {}
        for item in data:
            name = item.get("name") if isinstance(item, dict) else item
            out.update(_flatten(item, f"tasks[{name}]"))
        return out
    return {prefix: data}
