"""Atomic writes of the files thanora produces (tensors, JSON, text, folders), and the proof that thanora wrote them.

A file is written to a temporary file in the same folder, then renamed over the target: a crash mid-write leaves
the previous file (or none), never a truncated one. A folder (an adapter, a merged model, a checkpoint) is written
to a temporary folder beside the target, then swapped in; the old one is removed only after the swap.

Nothing that thanora did not write is ever replaced. Every folder written by `atomic_dir` carries a marker file,
`MARKER` (``{"format": "thanora-artifact/1", "kind": ..., "thanora": version}``); an existing folder is replaced only
when it is empty or carries a marker of the same kind (or is a same-kind folder of an older thanora, recognised by
its own metadata file), else `ArtifactError`. Temporary files and folders get the permissions the user's umask
gives any new file (``tempfile`` alone would leave them 0600 / 0700, unreadable to colleagues on a shared machine).
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

_META_KEY = "thanora"
MARKER = "thanora_artifact.json"
MARKER_FORMAT = "thanora-artifact/1"
KINDS = ("adapter", "merged", "checkpoint")
# Folders written by thanora before the marker existed, recognised by a metadata file only thanora writes.
_LEGACY = {"adapter": ("thanora_adapter.json", "thanora_native.json", "dare_merge.json"),
           "checkpoint": ("state.json",), "merged": ()}


class ArtifactError(ValueError):
    """Writing would replace something thanora did not write (or a folder of another kind); nothing was changed."""


def _version() -> str:
    try:
        return importlib.metadata.version("thanora")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _give_default_mode(path: Path, directory: bool) -> None:
    """The mode a plain ``open``/``mkdir`` would have given ``path`` under the user's umask."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    _give_default_mode(Path(tmp), directory=False)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    """Write a text file atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | Path, data: Any) -> None:
    """Write JSON (indented, sorted keys kept in insertion order) atomically."""
    write_text(path, json.dumps(data, indent=2, default=_jsonable) + "\n")


def read_json(path: str | Path) -> Any:
    """Read a JSON file, naming the file in the error if it is corrupt."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the file is corrupt, delete it and re-run") from err


def save_tensors(tensors: Mapping[str, torch.Tensor], path: str | Path, meta: Any = None) -> None:
    """Save tensors (contiguous, CPU) and a JSON-serialisable ``meta`` to one safetensors file, atomically."""
    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {_META_KEY: json.dumps(meta, default=_jsonable)}
    with atomic_path(path) as tmp:
        save_file(data, str(tmp), metadata=metadata)


def load_tensors(path: str | Path) -> tuple[dict[str, torch.Tensor], Any]:
    """Load a file written by `save_tensors`.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file is corrupt or was not written by thanora.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise ValueError(f"{path} is corrupt ({err}); delete it and re-run the stage that wrote it") from err
    if _META_KEY not in metadata:
        raise ValueError(f"{path} has no thanora metadata; it was not written by thanora")
    return tensors, json.loads(metadata[_META_KEY])


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.dtype):
        return str(value).removeprefix("torch.")
    if isinstance(value, tuple | set):
        return list(value)
    to_dict: Callable[[], Any] | None = getattr(value, "to_dict", None)
    if to_dict is not None:
        return to_dict()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def artifact_kind(path: str | Path) -> str | None:
    """The kind of thanora artifact folder ``path`` is (its `MARKER`, or an older thanora's metadata file), or
    ``None`` when thanora cannot tell that it wrote it."""
    path = Path(path)
    marker = path / MARKER
    if marker.is_file():
        try:
            data = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if isinstance(data, dict) and data.get("format") == MARKER_FORMAT and data.get("kind") in KINDS:
            return str(data["kind"])
        return None
    for kind, files in _LEGACY.items():
        if any((path / name).is_file() for name in files):
            return kind
    return None


def check_replaceable(path: str | Path, kind: str) -> None:
    """Refuse to write a ``kind`` folder at ``path`` over anything but nothing, an empty folder or a ``kind`` folder
    thanora wrote.

    Raises:
        ArtifactError: naming the path and what to do.
    """
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return
    if path.is_dir() and not path.is_symlink():
        if not any(path.iterdir()):
            return
        found = artifact_kind(path)
        if found == kind:
            return
        what = f"a thanora {found} folder" if found else "files thanora did not write"
        raise ArtifactError(f"{path} already holds {what}; it is not replaced by a {kind} folder: choose a new or "
                            "empty folder (nothing was changed)")
    raise ArtifactError(f"{path} exists and is not a folder; choose a new or empty folder for the {kind} "
                        "(nothing was changed)")


@contextmanager
def atomic_dir(path: str | Path, kind: str):
    """Yield a temporary folder next to ``path``; on success it replaces ``path``, marked as a ``kind`` artifact.

    ``path`` may be absent, an empty folder or a ``kind`` folder thanora wrote (`check_replaceable`, checked before
    anything is written, and again before the swap); the old folder is removed only after the new one is in place.

    Raises:
        ArtifactError: ``path`` holds anything else.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown artifact kind {kind!r}; known: {KINDS}")
    path = Path(path)
    check_replaceable(path, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    _give_default_mode(tmp, directory=True)
    try:
        yield tmp
        (tmp / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "kind": kind, "thanora": _version()})
                                  + "\n", encoding="utf-8")
        check_replaceable(path, kind)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
