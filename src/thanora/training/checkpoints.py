"""Training checkpoints: one folder per saved step, written atomically, exact to resume from.

``<out>/checkpoints/step-<N>/`` holds the trainable parameters (``adapter.safetensors``), the optimizer and scheduler
states, every process's RNG states, the method's running state when it keeps one (`Method.train_state`:
``method_state.safetensors``) and ``state.json`` (format, method, train config, step, history); ``latest`` names the
newest complete one and the last `KEEP_CHECKPOINTS` are kept. Loading checks that the checkpoint belongs to the run
(same method, settings, data layout and number of processes) and says what to do when it does not.

Why not accelerate's ``save_state`` / ``load_state`` (checked): they write the whole state dict of every prepared
model, the frozen base included (0.5 GB per checkpoint for SmolLM2 in float32, ~13.5 GB for a 7B base in bf16, where
the adapter is tens of MB), and know nothing of whether a checkpoint belongs to the run it is loaded into. What they
do that matters here is reused: the data position is skipped with accelerate's ``skip_first_batches``
(`thanora.training.train`), and the RNG states saved are the same four (Python, NumPy, torch, CUDA) per process.
"""

from __future__ import annotations

import random
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from torch import Tensor

from thanora.artifacts import artifact_kind, atomic_dir, load_tensors, read_json, save_tensors, write_json, write_text

KEEP_CHECKPOINTS = 2
CHECKPOINTS = "checkpoints"
LATEST = "latest"
FORMAT = "thanora-checkpoint/1"
METHOD_STATE = "method_state.safetensors"
RUN_ONLY = ("log_every", "eval_every", "save_every", "gradient_checkpointing", "labelled_logits_only",
            "pack_sequences")  # may change on resume (same math)


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt or does not belong to this run."""


def save_checkpoint(root: Path, step: int, trainable: Mapping[str, Tensor], optimizer: Any, scheduler: Any,
                    history: list[dict[str, Any]], meta: dict[str, Any], accelerator: Accelerator,
                    method_state: Mapping[str, Tensor] | None = None) -> Path:
    """Write ``root/step-<step>`` atomically, point ``root/latest`` at it, keep the last `KEEP_CHECKPOINTS`.

    ``method_state``: the method's running state (`Method.train_state`), the same on every process (it is computed
    from the synchronised parameters); written by the main process only.
    """
    rng_states = gather_object([rng_state()])  # one entry per process, in process order
    path = root / f"step-{step}"
    if accelerator.is_main_process:
        with atomic_dir(path, "checkpoint") as tmp:
            save_tensors(dict(trainable), tmp / "adapter.safetensors", {"step": step})
            if method_state is not None:
                save_tensors(method_state, tmp / METHOD_STATE, {"step": step})
            torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
            torch.save(rng_states, tmp / "rng.pt")
            write_json(tmp / "state.json", {**meta, "step": step, "history": history})
        write_text(root / LATEST, path.name + "\n")
        for old in checkpoint_dirs(root)[:-KEEP_CHECKPOINTS]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return path


def checkpoint_dirs(root: Path) -> list[Path]:
    """The checkpoint folders thanora wrote under ``root`` (``step-<N>`` with the checkpoint marker), oldest first."""
    found = [p for p in root.glob("step-*") if p.name[5:].isdigit() and artifact_kind(p) == "checkpoint"]
    return sorted(found, key=lambda p: int(p.name[5:]))


def remove_checkpoints(root: Path) -> None:
    """Remove the checkpoints of an earlier run from ``root``: the checkpoint folders thanora wrote and the
    ``latest`` pointer; anything else under ``root`` is left where it is."""
    for path in checkpoint_dirs(root):
        shutil.rmtree(path)
    (root / LATEST).unlink(missing_ok=True)


def load_checkpoint(root: Path, meta: dict[str, Any], trainable: Mapping[str, Tensor], optimizer: Any,
                    scheduler: Any, process_index: int) -> tuple[Path, int, list[dict[str, Any]], dict[str, Any]]:
    """Load ``root/latest`` into the parameters, optimizer and scheduler; return (path, step, history, our RNG)."""
    pointer = root / LATEST
    path = root / pointer.read_text(encoding="utf-8").strip()
    if not path.is_dir():
        raise CheckpointError(f"{pointer} points to {path}, which does not exist; delete {root} to start over")
    try:
        state = read_json(path / "state.json")
        step, history = int(state["step"]), list(state["history"])
        tensors, _ = load_tensors(path / "adapter.safetensors")
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        scheduler_state = torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
        rng_states = torch.load(path / "rng.pt", map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is corrupt or incomplete ({err}); delete it and point {pointer} "
                              "at an older one, or start over without resume") from err
    saved_cfg, keys = state.get("config", {}), ("format", "method", "steps_per_epoch", "num_processes", "trainable")
    mismatched = [k for k in keys if state.get(k) != meta[k]]
    mismatched += [f"config.{k}" for k, v in meta["config"].items() if k not in RUN_ONLY and saved_cfg.get(k) != v]
    if mismatched:
        raise CheckpointError(f"checkpoint {path} does not belong to this run: {mismatched} differ "
                              "(resume needs the same method, model, data, settings and number of processes)")
    with torch.no_grad():
        for name, param in trainable.items():
            param.copy_(tensors[name])
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    return path, step, history, rng_states[process_index]


def load_method_state(path: Path) -> dict[str, Tensor]:
    """The method's running state saved in checkpoint ``path`` (see `save_checkpoint`)."""
    try:
        tensors, _ = load_tensors(path / METHOD_STATE)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} lacks the method's running state ({err}); it was written by "
                              "another version or is incomplete: start over without resume") from err
    return tensors


def rng_state() -> dict[str, Any]:
    """Python, numpy, torch and CUDA RNG states as tensors and plain values (loadable with ``weights_only``)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()  # type: ignore[misc]
    numpy_state = [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state(), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
