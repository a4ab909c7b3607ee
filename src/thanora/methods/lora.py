"""LoRA (Hu et al., 2022) through PEFT's own `LoraConfig` / `get_peft_model`: the single-adapter baseline.

Same target modules as ThanoRA (every linear layer of the language model by default, resolved by
`thanora.find_targets` to full dotted names) and the same rank budget (PEERS.md). The PEFT config factory
(`thanora.adapters.peft_config.lora_config`) and the seeded injection are shared with DoRA (``use_dora``) and DARE (one
adapter per
task).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from thanora.adapters.peft_config import lora_config
from thanora.adapters.record import unwrap
from thanora.artifacts import atomic_dir
from thanora.core.targets import check_rank, find_targets
from thanora.methods.base import Method, MethodContext


@dataclass(frozen=True)
class LoraSettings:
    """Settings of plain LoRA.

    Attributes:
        rank: LoRA rank r of every adapted module.
        lora_alpha: LoRA alpha; ``None`` means ``rank`` (scaling 1).
        lora_dropout: dropout on the LoRA input during training.
        target_modules: module names (full dotted names or suffixes such as ``"q_proj"``) inside the language model;
            ``None`` means every linear layer of the language model (as `thanora.find_targets`).
    """

    rank: int = 64
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        cls = type(self).__name__  # subclasses (DoraSettings, DareSettings) name themselves
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"{cls}.rank must be an integer >= 1, got {self.rank!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"{cls}.lora_alpha must be positive or null, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"{cls}.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.target_modules is not None:
            names = (self.target_modules,) if isinstance(self.target_modules, str) else tuple(self.target_modules)
            if not names or not all(isinstance(n, str) and n for n in names):
                raise ValueError(f"{cls}.target_modules must be null (all linear layers of the language model) "
                                 "or a non-empty list of module names")
            object.__setattr__(self, "target_modules", names)

    @property
    def alpha(self) -> float:
        """The resolved lora_alpha."""
        return float(self.rank if self.lora_alpha is None else self.lora_alpha)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (lora_alpha resolved)."""
        out = dataclasses.asdict(self)
        out["lora_alpha"] = self.alpha
        if out["target_modules"] is not None:
            out["target_modules"] = list(out["target_modules"])
        return out


@contextmanager
def seeded_rng(model: nn.Module, seed: int) -> Iterator[None]:
    """Seed torch's RNG (CPU and the model's CUDA devices) with ``seed`` inside, restore the caller's state after."""
    devices = [torch.device(d) for d in {p.device for p in model.parameters()} if d.type == "cuda"]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def prepare_lora(model: nn.Module, settings: LoraSettings, ctx: MethodContext, *, use_dora: bool = False
                 ) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA layers (A Kaiming-uniform seeded by ``ctx.seed``, B zero).

    Args:
        model: a transformers model, modified in place (as `get_peft_model` does).
        settings: rank, alpha, dropout, targets.
        ctx: only ``ctx.seed`` is used; the global RNG state is left as it was.
        use_dora: PEFT's DoRA (``LoraConfig(use_dora=True)``: a trainable magnitude per output feature).

    Returns:
        The `PeftModel`, only the adapter parameters trainable, in the caller's train/eval mode.
    """
    targets = find_targets(model, settings.target_modules)
    check_rank(targets, settings.rank, type(settings).__name__)
    config = lora_config(model, targets, settings.rank, settings.alpha, settings.lora_dropout,
                         fan_in_fan_out=any(t.fan_in_fan_out for t in targets.values()), use_dora=use_dora)
    was_training = model.training
    with seeded_rng(model, ctx.seed):
        peft_model = get_peft_model(model, config)
    peft_model.train(was_training)
    return peft_model


def save_lora(model: nn.Module, out_dir: Path) -> None:
    """Write the PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``), replacing ``out_dir``."""
    inner = unwrap(model)
    if not isinstance(inner, PeftModel):
        raise TypeError(f"expected a PeftModel from the method's prepare, got {type(inner).__name__}")
    with atomic_dir(out_dir, "adapter") as tmp:
        inner.save_pretrained(str(tmp))


def load_peft_adapter(model: nn.Module, folder: Path) -> PeftModel:
    """The base ``model`` with the stock PEFT adapter in ``folder`` loaded (eval mode, frozen)."""
    return PeftModel.from_pretrained(model, str(folder)).eval()


def lora_param_count(model: nn.Module, settings: Any) -> int:
    """r · (d_in + d_out) summed over the targets of ``settings`` (``rank``, ``target_modules``).

    Raises:
        ValueError: a target name matches nothing, or the rank exceeds a target's min(d_in, d_out) (as ``prepare``
            would, so a run checks it on a meta-device model before any work).
    """
    targets = find_targets(model, settings.target_modules)
    check_rank(targets, settings.rank, type(settings).__name__)
    return sum(settings.rank * (t.d_in + t.d_out) for t in targets.values())


LORA = Method(
    name="lora",
    paper="Hu et al., LoRA: Low-Rank Adaptation of Large Language Models, ICLR 2022 (arXiv:2106.09685)",
    config_cls=LoraSettings,
    mergeable=True,
    task_id_at_train=False,
    task_id_at_test=False,
    prepare=prepare_lora,
    regularizer=None,
    export=save_lora,
    save=save_lora,
    load=load_peft_adapter,
    param_count=lora_param_count,
)
