"""Per-task calibration statistics: token-normalised, mask-aware second moments of each adapted module's input.

SPEC.md §1. `CovarianceFitter` hooks the target modules, sums XᵀX over the non-padding tokens of every batch
(float32 or float64) and returns a frozen `CovarianceStats`. Modules that read the same tensor (q/k/v, gate/up)
share one matrix: the hooks notice that a module's input *is* the tensor the previous hooked module just read.
PEFT's CorDA hook assumes batch size 1, no padding and divides by the number of calls; none of that applies here.

Bounded memory (`covariance_groups`): the targets can be cut into consecutive groups whose covariances fit a byte
budget, one pass over the calibration batches per group, each pass stopped right after the group's last module
(``stop_early``): the statistics are those of one pass, module for module, while at most one group's matrices exist
at a time. Batches stay where the caller keeps them (CPU) and are moved to the model's device one at a time.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from thanora.artifacts import load_tensors, save_tensors
from thanora.core.targets import Target

logger = logging.getLogger(__name__)

Batch = Mapping[str, Any]


@dataclass(frozen=True)
class CovarianceStats:
    """Second moments C = Σ x xᵀ / n_tokens of one task, one matrix per distinct module input.

    Attributes:
        task: task name.
        moments: ``{input key: (d_in, d_in) tensor}`` on CPU; the key is the first module that reads that input.
        input_of: ``{module name: input key}`` for every target module.
        n_tokens: ``{input key: number of tokens summed}``.
    """

    task: str
    moments: dict[str, torch.Tensor]
    input_of: dict[str, str]
    n_tokens: dict[str, int]

    def of(self, module: str) -> torch.Tensor:
        """The (d_in, d_in) second moment of ``module``'s input."""
        return self.moments[self.input_of[module]]

    def save(self, path: str | Path) -> None:
        """Write to one safetensors file (atomically)."""
        meta = {"task": self.task, "input_of": self.input_of, "n_tokens": self.n_tokens}
        save_tensors(self.moments, path, meta)

    @classmethod
    def load(cls, path: str | Path) -> CovarianceStats:
        """Read a file written by `save`."""
        tensors, meta = load_tensors(path)
        return cls(task=meta["task"], moments=tensors, input_of=meta["input_of"], n_tokens=meta["n_tokens"])


class CovarianceFitter:
    """Accumulates per-input second moments of the target modules over batches of one task.

    Use as ``fitter.update(batch)`` for each batch (it runs the forward pass under ``torch.no_grad`` with hooks
    installed only for that call), then ``fitter.result()``.

    Args:
        model: the pretrained model (left unchanged; put in eval mode by the caller).
        targets: the modules to hook (from `find_targets`).
        task: task name (for error messages and the result).
        dtype: accumulation dtype (float32 or float64).
    """

    def __init__(self, model: nn.Module, targets: Mapping[str, Target], task: str, dtype: torch.dtype,
                 stop_early: bool = False) -> None:
        self.model = model
        self.targets = dict(targets)
        self.task = task
        self.dtype = dtype
        self.stop_early = stop_early
        self.peak_bytes = 0  # the most bytes the running sums took at once (what a memory budget bounds)
        self._seen: set[str] = set()
        self._device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._modules = {name: model.get_submodule(name) for name in self.targets}
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._input_of: dict[str, str] = {}
        self._mask: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, str] | None = None
        # The statistics need only the hidden layers: skip all but one position of the output head (its logits over
        # the vocabulary cost ~20 % of a SmolLM2 forward) where the model's forward supports it.
        forward_args = inspect.signature(model.forward).parameters
        self._extra = {"logits_to_keep": 1} if "logits_to_keep" in forward_args else {}

    @torch.no_grad()
    def update(self, batch: Batch) -> None:
        """Run one batch through the model and add its non-padding tokens to the sums.

        Args:
            batch: model inputs; ``attention_mask`` (B, L) marks the tokens that count (all tokens if absent).
                ``labels`` are dropped (no loss is needed).
        """
        inputs = {k: v.to(self._device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
                  if k != "labels"}
        mask = inputs.get("attention_mask")
        self._mask = None if mask is None else mask.bool()
        self._last = None
        self._seen = set()
        # _GroupDone: every hooked module has read its input, the rest of the forward is not needed
        with self._hooks(), suppress(_GroupDone):
            self.model(**inputs, **self._extra)
        self._last = None

    def reduce_(self, all_reduce: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Sum the statistics across processes (``all_reduce`` returns the sum of a tensor over processes).

        After it, every process holds the statistics of the whole calibration set, equal to a single-process run.
        """
        for key in sorted(self._sums):
            self._sums[key] = all_reduce(self._sums[key])
            count = torch.tensor([float(self._counts[key])], dtype=torch.float64, device=self._sums[key].device)
            self._counts[key] = int(all_reduce(count).item())

    def result(self) -> CovarianceStats:
        """Normalise by the token counts and freeze.

        Raises:
            ValueError: no batch was seen, a target module was never called, or an input had NaN/Inf values.
        """
        if not self._sums:
            raise ValueError(f"task {self.task!r}: no calibration tokens were seen (is its calibration set empty?)")
        missing = [n for n in self.targets if n not in self._input_of]
        if missing:
            raise ValueError(
                f"task {self.task!r}: target module(s) {missing[:5]} were never called during calibration; "
                "they do not take part in this model's forward pass, so remove them from target_modules"
            )
        moments: dict[str, torch.Tensor] = {}
        for key, total in self._sums.items():
            if self._counts[key] == 0:
                raise ValueError(f"task {self.task!r}: module {key!r} saw zero non-padding tokens")
            moment = (total / self._counts[key]).cpu()
            if not torch.isfinite(moment).all():
                raise ValueError(
                    f"task {self.task!r}: NaN/Inf in the inputs of module {key!r} during calibration; "
                    "check the model weights and the calibration batches (or use stats_dtype=float64)"
                )
            moments[key] = moment
        return CovarianceStats(self.task, moments, dict(self._input_of), dict(self._counts))

    @contextmanager
    def _hooks(self):
        handles = [m.register_forward_pre_hook(self._hook_for(name)) for name, m in self._modules.items()]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook_for(self, name: str) -> Callable[[nn.Module, tuple[Any, ...]], None]:
        def hook(_module: nn.Module, args: tuple[Any, ...]) -> None:
            x = args[0]
            self._seen.add(name)
            # The same tensor object as the previous hooked call (q/k/v, gate/up): one shared covariance.
            if self._last is not None and self._last[0] is x:
                key = self._last[1]
                self._record_sharing(name, key)
            else:
                self._record_sharing(name, name)
                self._last = (x, name)
                rows = self._select_tokens(x, name)  # (N, d_in)
                rows = rows.to(self.dtype)
                if name not in self._sums:
                    self._sums[name] = torch.zeros(rows.shape[1], rows.shape[1], dtype=self.dtype,
                                                   device=rows.device)
                    self._counts[name] = 0
                    self.peak_bytes = max(self.peak_bytes, sum(s.numel() * s.element_size()
                                                               for s in self._sums.values()))
                self._sums[name].addmm_(rows.T, rows)
                self._counts[name] += rows.shape[0]
            if self.stop_early and len(self._seen) == len(self._modules):
                raise _GroupDone

        return hook

    def _record_sharing(self, name: str, key: str) -> None:
        known = self._input_of.setdefault(name, key)
        if known != key:
            raise RuntimeError(
                f"module {name!r} read its input from {key!r} in this batch but from {known!r} before; "
                "the model's forward pass is not deterministic in structure"
            )

    def _select_tokens(self, x: torch.Tensor, name: str) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if self._mask is None:
            return flat
        mask = self._mask.to(x.device)
        if tuple(x.shape[:-1]) == tuple(mask.shape):
            return x[mask]
        if flat.shape[0] == mask.numel():
            return flat[mask.reshape(-1)]
        raise ValueError(
            f"module {name!r}: input of shape {tuple(x.shape)} does not line up with attention_mask "
            f"{tuple(mask.shape)}; cannot exclude padding tokens"
        )


class _GroupDone(Exception):
    """Raised by the last hook of a pass that needs no more of the forward (`CovarianceFitter.stop_early`)."""


def covariance_groups(targets: Mapping[str, Target], budget_bytes: int | None, dtype: torch.dtype
                      ) -> list[dict[str, Target]]:
    """The targets cut into consecutive groups whose covariances fit ``budget_bytes`` (one group when ``None``).

    Each module is counted at d_in² elements of ``dtype`` (an upper bound: modules that share an input, q/k/v or
    gate/up, share one matrix), so a group never needs more than the budget; a module bigger than the budget on its
    own gets a group of its own.
    """
    if budget_bytes is None:
        return [dict(targets)]
    size = torch.empty((), dtype=dtype).element_size()
    groups: list[dict[str, Target]] = [{}]
    used = 0
    for name, target in targets.items():
        need = target.d_in * target.d_in * size
        if groups[-1] and used + need > budget_bytes:
            groups.append({})
            used = 0
        groups[-1][name] = target
        used += need
    return groups


def collect_covariances(
    model: nn.Module,
    targets: Mapping[str, Target],
    task: str,
    batches: Iterable[Batch],
    dtype: torch.dtype = torch.float32,
    all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: bool = True,
    stop_early: bool = False,
) -> CovarianceStats:
    """Second moments of every target module's input over one task's calibration batches.

    Args:
        model: the pretrained model; switched to eval mode for the pass and restored afterwards.
        targets: from `find_targets`.
        task: task name.
        batches: tokenised batches (``input_ids`` (B, L), ``attention_mask`` (B, L), optional image inputs), already
            on the model's device.
        dtype: float32 or float64 accumulation.
        all_reduce: for multi-process runs, a function summing a tensor across processes.
        progress: show a tqdm bar.
        stop_early: end each forward pass once every target has read its input (a group of `covariance_groups`).

    Returns:
        The task's `CovarianceStats` (on CPU).
    """
    fitter = CovarianceFitter(model, targets, task, dtype, stop_early)
    was_training = model.training
    model.eval()
    try:
        for batch in tqdm(batches, desc=f"calibration [{task}]", disable=not progress, leave=False):
            fitter.update(batch)
    finally:
        model.train(was_training)
    if all_reduce is not None:
        fitter.reduce_(all_reduce)
    stats = fitter.result()
    logger.info("task %s: second moments of %d inputs over %d tokens", task, len(stats.moments),
                max(stats.n_tokens.values()))
    return stats

