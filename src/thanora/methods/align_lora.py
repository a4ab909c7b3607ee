"""Align-LoRA (Liu et al., 2025, arXiv:2508.05078): plain PEFT LoRA plus λ · MK-MMD² between tasks on A·x.

During the training forward a hook on every PEFT ``lora_A`` module keeps its output A·x (B, L, r) for the current
micro-batch; the regulariser then compares, per adapted layer, the A·x of every pair of tasks present in the
micro-batch with a multi-kernel MMD, and returns λ times the mean over task pairs and layers. The trained adapter is
an ordinary LoRA: mergeable, exported as a stock PEFT adapter, no task id at inference.

Paper (``papers/align-lora-r-lora-plus.txt``, eq. 6, 9, 10) vs reference code (github.com/jinda-liu/Align-LoRA,
``custom.py``), and what this module does (default first, other behaviour as an option):

- Kernel (``kernel``): ``"paper"`` k(x, y) = Σ_σ exp(−‖x − y‖² / (2σ²)), the Gaussian of the text; ``"code"``
  exp(−‖x − y‖² / (2σ)) as the reference code computes it.
- Bandwidths (``bandwidths``): the paper gives no set; default is the reference code's 19 values 1e-6 … 1e6.
- Pooling (``pooling``): ``"mean"`` (paper: one representation b = A·X per sample) is the mean of A·x over the
  sample's non-padding tokens (attention_mask == 1); ``"tokens"`` is the code's comparison of position s of one
  sample with position s of another, padded positions included, with the kernel averaged over positions.
- Estimator: the biased (V-statistic) MMD², mean K_xx + mean K_yy − 2 mean K_xy with the diagonals included: the
  squared distance of the empirical mean embeddings of the paper's eq. 6, and what the code computes. It is ≥ 0
  and exactly 0 when both tasks have the same set of representations. A bandwidth far below the spacing of the
  samples only sees the diagonal and adds a constant 1/n_i + 1/n_j (no gradient): the reference set's smallest σ
  put such a floor under the logged value.
- Reduction: mean over task pairs, then over layers (the code's reduction; the paper's eq. 9 sums over pairs, which
  only rescales λ). Tasks are those present in the micro-batch, read from ``batch["task_id"]`` (the code splits the
  batch into equal chunks assuming task order). With fewer than 2 tasks in a micro-batch the term is 0.
- Granularity: once per micro-batch, as every regulariser of the training loop; the code concatenates A·x over the
  gradient-accumulation micro-batches and adds the term once per optimizer step. Batches are task-stratified
  (``stratified_batches``) so that every micro-batch holds every task.
- λ (``align_lambda``): the paper tunes it in [0.01, 0.15] without naming a default; 0.01 is the reference
  ``MMD_Trainer``'s default and the low end of the paper's range.
- A·x is the output of ``lora_A`` on the dropped-out input, as PEFT computes it during training (and as the
  code's hook sees it). No stop-gradient (paper and code): the penalty's gradient reaches each A and everything
  upstream of its input, including earlier layers' LoRA factors.
- LoRA settings: rank 64, all linear layers, dropout 0.05, as the project's LoRA baseline, so that the penalty is
  the only difference from it (the paper's own runs: α = 32, q/v only, dropout 0.2).

Nothing is kept in eval mode or without gradients (evaluation costs nothing extra), and every forward of the model
first drops the previous forward's activations, so the regulariser only sees the current micro-batch.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import Tensor, nn

from thanora.adapters.record import attach_record, find_record
from thanora.methods.align_lora_mmd import Kernel, Pooling, layer_alignment, task_averaging
from thanora.methods.base import Method, MethodContext, consume_task_ids
from thanora.methods.lora import LoraSettings, load_peft_adapter, lora_param_count, prepare_lora, save_lora

# The reference code's bandwidths σ (the paper names none).
REFERENCE_BANDWIDTHS: tuple[float, ...] = (
    1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 5.0, 10.0, 15.0, 20.0, 25.0, 30.0, 35.0, 100.0, 1e3, 1e4, 1e5, 1e6,
)



@dataclass(frozen=True)
class AlignLoraSettings:
    """Settings of Align-LoRA: those of plain LoRA plus the alignment penalty's.

    Attributes:
        rank: LoRA rank r of every adapted module.
        lora_alpha: LoRA alpha; ``None`` means ``rank`` (scaling 1).
        lora_dropout: dropout on the LoRA input during training (A·x is taken after it).
        target_modules: module names inside the language model; ``None`` = every linear layer (as LoRA).
        align_lambda: λ, the weight of the MK-MMD² term (0 = plain LoRA on stratified batches).
        kernel: ``"paper"`` exp(−d²/(2σ²)) or ``"code"`` exp(−d²/(2σ)).
        pooling: ``"mean"`` over non-padding tokens per sample (paper) or ``"tokens"``, position by position with
            padding (code).
        bandwidths: the σ of the summed Gaussian kernels (YAML list; numbers as strings such as ``1e-6`` accepted).
    """

    rank: int = 64
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None
    align_lambda: float = 0.01
    kernel: Kernel = "paper"
    pooling: Pooling = "mean"
    bandwidths: tuple[float, ...] = REFERENCE_BANDWIDTHS

    def __post_init__(self) -> None:
        try:
            lora = LoraSettings(self.rank, self.lora_alpha, self.lora_dropout, self.target_modules)
        except ValueError as err:
            raise ValueError(str(err).replace("LoraSettings.", "AlignLoraSettings.", 1)) from None
        object.__setattr__(self, "target_modules", lora.target_modules)
        lam = _number(self.align_lambda)
        if lam is None or not (math.isfinite(lam) and lam >= 0):
            raise ValueError(f"AlignLoraSettings.align_lambda must be >= 0, got {self.align_lambda!r}")
        object.__setattr__(self, "align_lambda", lam)
        if self.kernel not in ("paper", "code"):
            raise ValueError(f"AlignLoraSettings.kernel must be 'paper' or 'code', got {self.kernel!r}")
        if self.pooling not in ("mean", "tokens"):
            raise ValueError(f"AlignLoraSettings.pooling must be 'mean' or 'tokens', got {self.pooling!r}")
        values = self.bandwidths if isinstance(self.bandwidths, Sequence) and not isinstance(self.bandwidths, str) \
            else None
        sigmas = tuple(_number(s) for s in values) if values else ()
        if not sigmas or not all(s is not None and math.isfinite(s) and s > 0 for s in sigmas):
            raise ValueError("AlignLoraSettings.bandwidths must be a non-empty list of finite numbers > 0, got "
                             f"{self.bandwidths!r}")
        object.__setattr__(self, "bandwidths", sigmas)

    @property
    def lora(self) -> LoraSettings:
        """The plain LoRA part of the settings."""
        return LoraSettings(self.rank, self.lora_alpha, self.lora_dropout, self.target_modules)

    @property
    def alpha(self) -> float:
        """The resolved lora_alpha."""
        return self.lora.alpha

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (lora_alpha resolved) and the MMD² estimator used."""
        out = dataclasses.asdict(self)
        out.update(lora_alpha=self.alpha, bandwidths=list(self.bandwidths), estimator="biased")
        if out["target_modules"] is not None:
            out["target_modules"] = list(out["target_modules"])
        return out


def _number(value: Any) -> float | None:
    """``value`` as a float (ints and numeric strings too), or ``None``."""
    if isinstance(value, bool):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


# ----------------------------------------------------------------------------------------------------------------
# Capturing A·x during the training forward


class AlignCapture:
    """The per-layer A·x of the model's current training forward (the record of a prepared model, `capture_of`).

    Attributes:
        settings: the settings the model was prepared with (`describe` records them).
        outputs: ``{PEFT layer name: A·x (B, L, r)}`` of the last forward in train mode with gradients enabled.
        open: whether ``lora_A`` outputs are kept: from the start of a model forward until `take`, so a backward pass
            that recomputes the layers (gradient checkpointing) does not capture them again.
    """

    def __init__(self, settings: AlignLoraSettings) -> None:
        self.settings = settings
        self.outputs: dict[str, Tensor] = {}
        self.open = True

    def start_forward(self, task_id: Tensor | None) -> None:
        """Drop the previous forward's activations (the task ids themselves come with the batch)."""
        self.outputs.clear()
        self.open = True

    def take(self) -> dict[str, Tensor]:
        """The captured activations, leaving the capture empty and closed (nothing outlives the step's graph)."""
        outputs, self.outputs, self.open = self.outputs, {}, False
        return outputs


class _KeepOutput:
    """Forward hook of one ``lora_A`` module: store its output while training with gradients."""

    def __init__(self, capture: AlignCapture, name: str) -> None:
        self.capture = capture
        self.name = name

    def __call__(self, module: nn.Module, args: tuple, output: Tensor) -> None:
        if self.capture.open and module.training and torch.is_grad_enabled():
            self.capture.outputs[self.name] = output


def prepare_align_lora(model: nn.Module, settings: AlignLoraSettings, ctx: MethodContext) -> nn.Module:
    """PEFT LoRA (`prepare_lora`, seeded by ``ctx.seed``) with A·x capture hooks and ``task_id`` consumption.

    Args:
        model: a transformers model, modified in place.
        settings: LoRA and penalty settings.
        ctx: only ``ctx.seed`` is used.

    Returns:
        The `PeftModel` with its `AlignCapture` attached (`capture_of`).
    """
    peft_model = prepare_lora(model, settings.lora, ctx)
    capture = AlignCapture(settings)
    adapter = peft_model.active_adapter
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and adapter in module.lora_A:
            module.lora_A[adapter].register_forward_hook(_KeepOutput(capture, name))
    consume_task_ids(peft_model, capture.start_forward)
    attach_record(peft_model, capture)
    return peft_model


def capture_of(model: nn.Module) -> AlignCapture:
    """The `AlignCapture` of a model prepared by `prepare_align_lora` (also through a DDP wrapper).

    Raises:
        TypeError: the model was not prepared by Align-LoRA.
    """
    return find_record(model, AlignCapture, "ALIGN_LORA.prepare")


def align_regularizer(model: nn.Module, settings: AlignLoraSettings, batch: Mapping[str, Any]) -> Tensor:
    """λ · MK-MMD² between the tasks of the micro-batch on A·x, averaged over task pairs and adapted layers.

    Call it right after the training forward of ``batch`` (as `thanora.training.train.train` does); it consumes the
    activations that forward captured. With fewer than 2 tasks in the batch, or λ = 0, it is 0 (no gradient).

    Args:
        model: the prepared model, after its training forward on ``batch``.
        settings: λ, kernel, pooling and bandwidths.
        batch: ``task_id`` (B,) and ``attention_mask`` (B, L) of the forward.

    Returns:
        A scalar (float32, or float64 for a float64 model).

    Raises:
        ValueError: the batch has no ``task_id``.
        RuntimeError: nothing was captured (no training-mode forward with gradients) or the captured activations
            do not match the batch.
    """
    outputs = capture_of(model).take()
    task_id = batch.get("task_id")
    if not isinstance(task_id, Tensor):
        raise ValueError("Align-LoRA needs batch['task_id'] (LongTensor (B,)): train with task ids")
    weights = task_averaging(task_id) if settings.align_lambda > 0 else None
    if weights is None:  # λ = 0 or fewer than 2 tasks
        return torch.zeros((), device=task_id.device)
    if not outputs:
        raise RuntimeError("Align-LoRA captured no A·x: call the regulariser right after a forward in train mode "
                           "with gradients enabled")
    mask = batch.get("attention_mask")
    losses = []
    for name, a in outputs.items():  # a: (B, L, r)
        layer_mask = torch.ones(a.shape[:2], device=a.device) if mask is None else mask.to(a.device)
        if a.shape[:2] != layer_mask.shape or a.shape[0] != task_id.shape[0]:
            raise RuntimeError(f"A·x of {name} has shape {tuple(a.shape)}, which does not match the batch "
                               f"(task_id {tuple(task_id.shape)}, attention_mask {tuple(layer_mask.shape)})")
        losses.append(layer_alignment(a, layer_mask, weights.to(a.device), settings.bandwidths, settings.kernel,
                                      settings.pooling))
    return settings.align_lambda * torch.stack(losses).mean()


def describe_align_lora(model: nn.Module) -> dict[str, Any]:
    """``align_lora.json``: the settings with the paper/code choices (kernel, pooling, bandwidths, estimator)."""
    return {"align_lora.json": capture_of(model).settings.to_dict()}


def check_align_tasks(settings: AlignLoraSettings, tasks: Sequence[str]) -> list[str]:
    """The alignment penalty compares tasks: with one it is identically zero."""
    if len(tasks) == 1 and settings.align_lambda > 0:
        return [f"align_lambda={settings.align_lambda:g} has no effect with a single task: the MMD compares pairs of "
                "tasks, so the penalty is identically zero (this is plain LoRA)"]
    return []


ALIGN_LORA = Method(
    name="align_lora",
    paper="Liu, Cheng, Chang and Wu, Align, Don't Divide: Revisiting the LoRA Architecture in Multi-Task Learning, "
          "2025 (arXiv:2508.05078)",
    config_cls=AlignLoraSettings,
    mergeable=True,
    task_id_at_train=True,
    task_id_at_test=False,
    prepare=prepare_align_lora,
    regularizer=align_regularizer,
    export=save_lora,
    save=save_lora,
    load=load_peft_adapter,
    param_count=lora_param_count,
    describe=describe_align_lora,
    stratified_batches=True,
    check_tasks=check_align_tasks,
)

__all__ = ["ALIGN_LORA", "REFERENCE_BANDWIDTHS", "AlignCapture", "AlignLoraSettings", "align_regularizer", "capture_of",
           "prepare_align_lora"]
