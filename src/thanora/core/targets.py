"""Which modules get adapters. No other file matches module names.

The default is every `nn.Linear` (and transformers' `Conv1D`) of the *language model*: for a causal LM that is the
decoder returned by `get_decoder()`, for a vision-language model (LLaVA-style) the same call returns the language
model, so the vision tower, the multimodal projector and the output head are never adapted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
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


def check_rank(targets: Mapping[str, Target], rank: int, owner: str) -> None:
    """Refuse a rank above min(d_in, d_out) of a target (its extra directions could never be used).

    Raises:
        ValueError: naming ``<owner>.rank``, the smallest such dimension and the first such module.
    """
    too_small = [n for n, t in targets.items() if rank > min(t.d_in, t.d_out)]
    if too_small:
        smallest = min(min(targets[n].d_in, targets[n].d_out) for n in too_small)
        raise ValueError(f"{owner}.rank={rank} exceeds min(d_in, d_out)={smallest} of module {too_small[0]!r} "
                         f"({len(too_small)} such modules); lower rank or exclude them with target_modules")


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


# Child names of a decoder layer's two residual blocks, per architecture family (Llama-style, GPT-2).
BLOCK_CHILDREN: dict[str, tuple[str, ...]] = {"attention": ("self_attn", "attn"), "mlp": ("mlp",)}


@dataclass(frozen=True)
class Block:
    """One residual block of a decoder layer (block-level adapters, mtLoRA).

    Attributes:
        name: full dotted name of the attention or MLP module in the root model.
        kind: ``"attention"`` or ``"mlp"``.
        d_model: hidden size: the block's input (already normalised by the layer) and output width.
    """

    name: str
    kind: str
    d_model: int


def find_blocks(model: nn.Module, kinds: Sequence[str] = ("attention", "mlp")) -> dict[str, Block]:
    """The attention and/or MLP blocks of every decoder layer of the language model.

    A decoder layer is a module with an attention child (``self_attn`` or ``attn``) and an ``mlp`` child; in
    Llama- and GPT-2-style layers both receive the layer-normalised hidden states and their output is added to the
    residual stream (the attention returns a tuple whose element 0 is that output).

    Args:
        model: any transformers model; only its language model is searched (as `find_targets`).
        kinds: which blocks, any of ``"attention"`` and ``"mlp"``.

    Returns:
        ``{full name: Block}`` in module order.

    Raises:
        ValueError: an unknown kind, or no decoder layer found.
    """
    unknown = sorted(set(kinds) - set(BLOCK_CHILDREN))
    if unknown or not kinds:
        raise ValueError(f"block kinds must be a non-empty subset of {sorted(BLOCK_CHILDREN)}, got {list(kinds)}")
    scope = language_model(model)
    embeddings = scope.get_input_embeddings() if hasattr(scope, "get_input_embeddings") else None
    d_model = getattr(embeddings, "embedding_dim", None) or getattr(getattr(scope, "config", None), "hidden_size", 0)
    scope_ids = {id(m) for m in scope.modules()}
    blocks: dict[str, Block] = {}
    for name, module in model.named_modules():
        if id(module) not in scope_ids:
            continue
        children = dict(module.named_children())
        attention = next((c for c in BLOCK_CHILDREN["attention"] if c in children), None)
        if attention is None or "mlp" not in children:
            continue
        for kind in ("attention", "mlp"):
            if kind in kinds:
                child = attention if kind == "attention" else "mlp"
                full = f"{name}.{child}" if name else child
                blocks[full] = Block(full, kind, int(d_model))
    if not blocks:
        raise ValueError(f"{type(model).__name__} has no decoder layer with an attention block "
                         f"({' or '.join(BLOCK_CHILDREN['attention'])}) and an mlp block in its language model")
    if not d_model:
        raise ValueError(f"cannot tell the hidden size of {type(model).__name__}'s language model")
    return blocks
