"""Helpers shared by the benchmark scripts: device choice, memory sampling, run metadata, atomic writes.

Import it from a script in this folder (``python benchmarks/<script>.py`` puts the folder on ``sys.path``).
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any

import psutil
import torch


def resolve_device(name: str) -> torch.device:
    """``"auto"`` → CUDA when available, else CPU; any other name is passed to `torch.device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class RssSampler:
    """Peak resident-set size of this process while the ``with`` block runs, sampled by a background thread.

    tracemalloc does not see torch's allocations, so the RSS is polled (psutil) every ``interval_s`` seconds;
    torch kernels release the GIL, so the thread keeps sampling during long ops. ``peak_delta_mb`` is the peak
    minus the RSS on entry: what the block added on top of what was already resident.
    """

    def __init__(self, interval_s: float = 0.01) -> None:
        self.interval_s = interval_s
        self._proc = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.baseline = 0
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self.baseline = self.peak = self._proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def peak_delta_mb(self) -> float:
        """Peak RSS above the RSS on entry, in MiB."""
        return (self.peak - self.baseline) / 2**20

    @property
    def baseline_mb(self) -> float:
        """RSS on entry, in MiB."""
        return self.baseline / 2**20


def versions() -> dict[str, str]:
    """Versions of the packages a benchmark result depends on."""
    import peft
    import transformers

    import thanora

    return {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "peft": peft.__version__, "thanora": thanora.__version__}


def machine_info(device: torch.device) -> dict[str, Any]:
    """Where the benchmark ran: platform, CPU, threads, memory and the GPU if one is used."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count_logical": os.cpu_count(),
        "cpu_count_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "memory_total_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def run_metadata(args: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """The exact command, resolved arguments, versions, machine and a UTC timestamp."""
    return {
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),  # re-runnable as printed
        "args": args,
        "versions": versions(),
        "machine": machine_info(device),
        "timestamp_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


def publish(out: Path, result: dict[str, Any], table: str) -> None:
    """Print the markdown ``table`` and write ``out.json`` (the result) and ``out.md`` (the table), atomically.

    ``out`` is a stem: the suffixes are appended (a dot in it, as in ``accuracy_lr0.001``, is kept).
    """
    from thanora.artifacts import write_json, write_text

    print(table)
    write_json(out.parent / f"{out.name}.json", result)
    write_text(out.parent / f"{out.name}.md", table)


def sync(device: torch.device) -> None:
    """Wait for queued GPU work so that wall-clock timings include it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def now() -> float:
    """`time.perf_counter`, named for readability at call sites."""
    return time.perf_counter()


@contextmanager
def stage_timers(device: torch.device, hooks: dict[str, tuple[Any, str]]) -> Iterator[dict[str, float]]:
    """Time module-level functions ``{stage: (module, function name)}`` while the block runs (this process only)."""
    seconds: dict[str, float] = {stage: 0.0 for stage in hooks}
    originals = {stage: getattr(mod, name) for stage, (mod, name) in hooks.items()}

    def timed(stage: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = now()
            try:
                return fn(*args, **kwargs)
            finally:
                sync(device)
                seconds[stage] += now() - t0
        return wrapper

    for stage, (mod, name) in hooks.items():
        setattr(mod, name, timed(stage, originals[stage]))
    try:
        yield seconds
    finally:
        for stage, (mod, name) in hooks.items():
            setattr(mod, name, originals[stage])
