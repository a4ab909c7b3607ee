"""Which modules get adapters. No other file matches module names.

The default is every `nn.Linear` (and transformers' `Conv1D`) of the *language model*: for a causal LM that is the
decoder returned by `get_decoder()`, for a vision-language model (LLaVA-style) the same call returns the language
model, so the vision tower, the multimodal projector and the output head are never adapted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@dataclass(frozen=True)
class Target:
    """One adapted module.

    Attributes:
        name: full dotted module name in the root model (PEFT's key convention).
        d_out: output features.
        d_in: input features.
        fan_in_fan_out: True for `Conv1D`, whose weight is stored (d_in, d_out).
    """

    name: str
    d_out: int
    d_in: int
    fan_in_fan_out: bool


def language_model(model: nn.Module) -> nn.Module:
    """The language-model part of ``model`` (the decoder stack), or ``model`` itself if it has none."""
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        try:
            decoder = get_decoder()
        except (AttributeError, NotImplementedError):
            decoder = None
        if isinstance(decoder, nn.Module):
            return decoder
    return model


def find_targets(model: nn.Module, target_modules: Sequence[str] | None = None) -> dict[str, Target]:
    """Resolve the adapted modules of ``model``.

    Args:
        model: any transformers model (or plain `nn.Module`).
        target_modules: full dotted names or suffixes (``"q_proj"``, ``"layers.0.mlp.up_proj"``); ``None`` selects
            every linear layer of the language model.

    Returns:
        ``{full name: Target}`` in module order.

    Raises:
        ValueError: a requested name matches no linear layer of the language model (the message lists the valid
            suffixes), or no linear layer was found at all.
    """
    scope = language_model(model)
    scope_ids = {id(m) for m in scope.modules()}
    candidates = {
        name: module
        for name, module in model.named_modules()
        if id(module) in scope_ids and isinstance(module, nn.Linear | Conv1D)
    }
    if not candidates:
        raise ValueError(f"{type(model).__name__} has no nn.Linear / Conv1D layer in its language model to adapt")
    if target_modules is None:
        chosen = list(candidates)
    else:
        chosen = []
        for wanted in target_modules:
            hits = [n for n in candidates if n == wanted or n.endswith("." + wanted)]
            if not hits:
                suffixes = sorted({n.rsplit(".", 1)[-1] for n in candidates})
                raise ValueError(
                    f"target_modules entry {wanted!r} matches no linear layer of the language model of "
                    f"{type(model).__name__}; valid module names end in one of {suffixes} "
                    "(vision tower, projector and output head are never adapted)"
                )
            chosen.extend(h for h in hits if h not in chosen)
        order = {n: i for i, n in enumerate(candidates)}
        chosen.sort(key=order.__getitem__)
    return {name: _describe(name, candidates[name]) for name in chosen}


def _describe(name: str, module: nn.Module) -> Target:
    if isinstance(module, Conv1D):
        d_in, d_out = module.weight.shape
        return Target(name, d_out=d_out, d_in=d_in, fan_in_fan_out=True)
    assert isinstance(module, nn.Linear)
    return Target(name, d_out=module.out_features, d_in=module.in_features, fan_in_fan_out=False)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The module's weight as a (d_out, d_in) view (transposed for `Conv1D`)."""
    weight = module.weight
    return weight.T if isinstance(module, Conv1D) else weight


def set_weight_matrix_(module: nn.Module, value: torch.Tensor) -> None:
    """Overwrite the module's weight from a (d_out, d_in) matrix, keeping its dtype, device and layout."""
    weight = module.weight
    new = value.T if isinstance(module, Conv1D) else value
    with torch.no_grad():
        weight.copy_(new.to(dtype=weight.dtype, device=weight.device))
