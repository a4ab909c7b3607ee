"""The multi-head low-rank adapter that HydraLoRA, R-LoRA+ and mtLoRA share: one A, N heads B_i, an optional router.

    Δ(x) = s · Σ_i w_i(x) ⊙ B_i A x

- ``lora_A`` (r, d_in) is shared, ``lora_B`` (N, d_out, r) holds the N up-projections B_i.
- The weights w come from a router, with a softmax over the heads computed in float32:
  ``token`` (HydraLoRA, mtLoRA's code) is a bias-free linear d_in → N·g on the token itself; ``sequence`` (mtLoRA's
  paper) is a 2-layer MLP on the mean of the tokens so far (the causal running mean over positions ≤ t; padding,
  as given by the model's ``attention_mask``, is left out). With g > 1 groups the router gives one softmax over the
  heads for each of g contiguous slices of the output features (mtLoRA's fine-grained routing).
- Without a router (R-LoRA+), or with a single head, the weights are fixed at 1/N, and Δ(x) = s · mean_i(B_i) A x.
- Dropout acts on x before A (LoRA), or independently on A·x for each head (R-LoRA+).

`MultiHeadLinear` adds Δ to a Linear/Conv1D target, `BlockAdapter` to the output of a whole attention or MLP block
(on the block's own input, which in a pre-norm decoder layer is the normalised hidden state). The adapters of one
model share an `AdapterContext` that holds the method's name and settings (for `save_multihead`) and the current
attention mask. Adapter parameters are float32 on a bf16/fp16 base (as PEFT's), else in the base's dtype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thanora.adapters.native import save_native
from thanora.adapters.record import unwrap
from thanora.core.targets import Block, Target, set_weight_matrix_, weight_matrix

Router = Literal["token", "sequence"]
Init = Literal["lora", "random"]
ROUTERS = ("token", "sequence")


@dataclass(frozen=True)
class HeadConfig:
    """Shape and behaviour of the multi-head adapters of one model.

    Attributes:
        rank: r, the rows of the shared A.
        n_heads: N, the number of up-projections B_i.
        scaling: s, the factor of the adapter's output (lora_alpha / r).
        router: ``"token"``, ``"sequence"`` or ``None`` (fixed weights 1/N). A single head has no router.
        groups: g contiguous groups of output features, each with its own softmax over the heads (1 = one weight
            per head and token).
        router_hidden: width of the hidden layer of the ``sequence`` router.
        dropout: dropout probability during training.
        head_dropout: independent dropout per head on A·x (R-LoRA+) instead of one dropout on x.
        init: ``"lora"``: A Kaiming-uniform (PEFT's), B zero; ``"random"``: A and every B_i normal with std
            1/√max(d_in, d_out) (R-LoRA's multi-head randomisation).
        stash_probs: keep the routing weights of the last training forward (`take_routing_probs`).
    """

    rank: int
    n_heads: int
    scaling: float
    router: Router | None = "token"
    groups: int = 1
    router_hidden: int = 64
    dropout: float = 0.0
    head_dropout: bool = False
    init: Init = "lora"
    stash_probs: bool = False

    @property
    def routed(self) -> bool:
        """Whether the adapters have a router (a router over a single head would be constant)."""
        return self.router is not None and self.n_heads > 1

    def param_count(self, d_in: int, d_out: int) -> int:
        """Trainable parameters of one adapter from d_in to d_out features."""
        count = self.rank * d_in + self.n_heads * self.rank * d_out
        if self.routed:
            out = self.n_heads * self.groups
            hidden = self.router_hidden
            count += d_in * out if self.router == "token" else d_in * hidden + hidden + hidden * out + out
        return count


@dataclass(eq=False)
class AdapterContext:
    """What the adapters of one prepared model share (plain Python state, never saved).

    Attributes:
        method: the method's registered name.
        settings: the method's settings object.
        attention_mask: the ``attention_mask`` keyword of the model's current forward call (``sequence`` router).
        regularizer_calls: calls of the method's regulariser so far (schedules that refresh every k calls).
        stashing: whether training forwards keep their routing weights (``stash_probs``): opened by every model
            forward, closed by `take_routing_probs`, so a backward pass that recomputes the layers (gradient
            checkpointing) does not stash them again and hold their graph until the next step.
    """

    method: str
    settings: Any
    attention_mask: Tensor | None = None
    regularizer_calls: int = 0
    stashing: bool = True


class MultiHeadDelta(nn.Module):
    """Δ(x) = s · Σ_i w_i(x) ⊙ B_i A x from d_in to d_out features (see the module docstring)."""

    def __init__(self, d_in: int, d_out: int, cfg: HeadConfig, context: AdapterContext, *, dtype: torch.dtype,
                 device: torch.device | str | None = None) -> None:
        super().__init__()
        if cfg.routed and d_out % cfg.groups:
            raise ValueError(f"groups={cfg.groups} must divide the {d_out} output features")
        self.d_in, self.d_out, self.cfg, self.context = d_in, d_out, cfg, context
        kw = {"dtype": dtype, "device": device}
        self.lora_A = nn.Parameter(torch.zeros(cfg.rank, d_in, **kw))  # (r, d_in)
        self.lora_B = nn.Parameter(torch.zeros(cfg.n_heads, d_out, cfg.rank, **kw))  # (N, d_out, r)
        out = cfg.n_heads * cfg.groups
        self.router_weight = self.router_hidden_weight = self.router_hidden_bias = self.router_bias = None
        if cfg.routed and cfg.router == "token":
            self.router_weight = nn.Parameter(torch.zeros(out, d_in, **kw))  # (N·g, d_in)
        elif cfg.routed:
            self.router_hidden_weight = nn.Parameter(torch.zeros(cfg.router_hidden, d_in, **kw))
            self.router_hidden_bias = nn.Parameter(torch.zeros(cfg.router_hidden, **kw))
            self.router_weight = nn.Parameter(torch.zeros(out, cfg.router_hidden, **kw))
            self.router_bias = nn.Parameter(torch.zeros(out, **kw))
        # (N, r, r) detached per-head reweighting of the right singular space, set by a regulariser (mtLoRA)
        self.register_buffer("head_projectors", None, persistent=False)
        self.last_probs: Tensor | None = None  # (..., g, N) of the last training forward, when stash_probs
        self._prefix: tuple[Tensor, Tensor, int] | None = None  # sequence router: (sum, count, length) seen so far

    @torch.no_grad()
    def reset_(self, generator: torch.Generator) -> None:
        """Initialise every parameter from ``generator`` (CPU float32 draws, so any device gives the same values)."""

        def uniform(shape: torch.Size, bound: float) -> Tensor:
            return torch.empty(shape, dtype=torch.float32).uniform_(-bound, bound, generator=generator)

        def normal(shape: torch.Size, std: float) -> Tensor:
            return torch.empty(shape, dtype=torch.float32).normal_(0.0, std, generator=generator)

        if self.cfg.init == "lora":  # kaiming_uniform_(a=√5), as nn.Linear and PEFT: U(±1/√d_in)
            self.lora_A.copy_(uniform(self.lora_A.shape, 1 / math.sqrt(self.d_in)))
            self.lora_B.zero_()
        else:
            std = 1 / math.sqrt(max(self.d_in, self.d_out))
            self.lora_A.copy_(normal(self.lora_A.shape, std))
            self.lora_B.copy_(normal(self.lora_B.shape, std))
        layers = ((self.router_hidden_weight, self.router_hidden_bias), (self.router_weight, self.router_bias))
        for weight, bias in layers:
            if weight is not None:  # nn.Linear's default initialisation
                bound = 1 / math.sqrt(weight.shape[1])
                weight.copy_(uniform(weight.shape, bound))
                if bias is not None:
                    bias.copy_(uniform(bias.shape, bound))

    def routing_weights(self, x: Tensor) -> Tensor | None:
        """The weights w of ``x`` (..., d_in): (..., g, N) summing to 1 over N, in float32 (float64 for a float64
        adapter); ``None`` without a router (fixed 1/N)."""
        if self.router_weight is None:
            return None
        feats = x.to(self.router_weight.dtype)
        if self.router_hidden_weight is not None:
            hidden = F.gelu(F.linear(self._causal_mean(feats), self.router_hidden_weight, self.router_hidden_bias))
            logits = F.linear(hidden, self.router_weight, self.router_bias)
        else:
            logits = F.linear(feats, self.router_weight)
        logits = logits.unflatten(-1, (self.cfg.groups, self.cfg.n_heads))  # group-major: (..., g, N)
        probs = logits.softmax(-1, dtype=torch.promote_types(logits.dtype, torch.float32))
        if self.training and self.cfg.stash_probs and self.context.stashing:
            self.last_probs = probs
        return probs

    def _causal_mean(self, x: Tensor) -> Tensor:
        """Mean of the non-padding tokens at positions ≤ t, for every t of ``x`` (B, L, d); a call with a longer
        attention mask than L continues the sequence seen by the previous call (decoding with a KV cache)."""
        if x.dim() != 3:
            raise ValueError(f"the sequence router needs (batch, length, features) inputs, got shape {tuple(x.shape)}")
        batch, length, _ = x.shape
        mask = self.context.attention_mask
        if mask is not None and mask.dim() == 2 and mask.shape[0] == batch and mask.shape[1] >= length:
            keep, past = mask[:, -length:].to(x.dtype), mask.shape[1] - length
        else:
            keep, past = x.new_ones(batch, length), 0
        total = (x * keep[..., None]).cumsum(1)  # (B, L, d)
        count = keep.cumsum(1)  # (B, L)
        if past:
            prefix = self._prefix
            if prefix is None or prefix[2] != past or prefix[0].shape[0] != batch:
                raise RuntimeError(f"the sequence router got {length} new tokens after {past} it has not seen: decode "
                                   "with the KV cache from its first step, or run the whole sequence at once")
            total, count = total + prefix[0][:, None], count + prefix[1][:, None]
        self._prefix = (total[:, -1].detach(), count[:, -1].detach(), past + length)
        return total / count.clamp_min(1)[..., None]

    def forward(self, x: Tensor) -> Tensor:
        """Δ(x) for ``x`` (..., d_in); returns (..., d_out) in x's dtype."""
        cfg = self.cfg
        A, B = self.lora_A, self.lora_B
        xa = x.to(A.dtype)
        if not cfg.head_dropout:
            xa = F.dropout(xa, cfg.dropout, self.training)
        h = xa @ A.T  # (..., r)
        probs = self.routing_weights(x)
        per_head = cfg.head_dropout and self.training and cfg.dropout > 0
        if per_head:  # an independent mask for each head
            h = F.dropout(h.unsqueeze(-2).expand(*h.shape[:-1], cfg.n_heads, cfg.rank), cfg.dropout, True)
        if probs is None:
            out = torch.einsum("...nr,nor->...o", h, B) / cfg.n_heads if per_head else h @ B.mean(0).T
        else:
            weights = probs.to(h.dtype).unsqueeze(-1)  # (..., g, N, 1)
            heads = h if per_head else h.unsqueeze(-2)  # (..., N or 1, r)
            mixed = weights * heads.unsqueeze(-3)  # (..., g, N, r)
            blocks = B.view(cfg.n_heads, cfg.groups, self.d_out // cfg.groups, cfg.rank)  # (N, g, d_out/g, r)
            out = torch.einsum("...gnr,ngjr->...gj", mixed, blocks).flatten(-2)
        return (out * cfg.scaling).to(x.dtype)

    def delta_weight(self) -> Tensor:
        """s · mean_i(B_i) · A (d_out, d_in): the whole update, for adapters without a router."""
        if self.router_weight is not None:
            raise ValueError("a routed adapter has no fixed weight update (its head weights depend on the input)")
        return self.cfg.scaling * self.lora_B.mean(0) @ self.lora_A


class MultiHeadLinear(nn.Module):
    """A Linear/Conv1D target with a multi-head adapter: base_layer(x) + Δ(x)."""

    def __init__(self, base_layer: nn.Module, adapter: MultiHeadDelta) -> None:
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        """base_layer(x) + Δ(x)."""
        return self.base_layer(x, *args, **kwargs) + self.adapter(x)

    @torch.no_grad()
    def subtract_initial_(self) -> None:
        """Residual base: W ← W − s·mean_i(B_i)·A at this moment, so the output is unchanged; A and mean_i(B_i) are
        kept as the buffers ``initial_lora_A`` (r, d_in) and ``initial_lora_B`` (d_out, r) (for the export)."""
        delta = self.adapter.delta_weight()  # (d_out, d_in)
        weight = weight_matrix(self.base_layer)
        dtype = torch.promote_types(torch.promote_types(weight.dtype, delta.dtype), torch.float32)
        set_weight_matrix_(self.base_layer, weight.to(dtype) - delta.to(dtype))
        self.register_buffer("initial_lora_A", self.adapter.lora_A.detach().clone(), persistent=False)
        self.register_buffer("initial_lora_B", self.adapter.lora_B.detach().mean(0), persistent=False)


class BlockAdapter(nn.Module):
    """A whole attention or MLP block with a parallel multi-head path on the block's input: block(h) + Δ(h).

    The block's input is its first positional argument or its ``hidden_states`` keyword; a tuple output (attention)
    gets Δ added to element 0.
    """

    def __init__(self, base_layer: nn.Module, adapter: MultiHeadDelta) -> None:
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The block's output plus Δ of its input."""
        hidden = args[0] if args else kwargs["hidden_states"]
        out = self.base_layer(*args, **kwargs)
        if isinstance(out, tuple):
            return (out[0] + self.adapter(hidden), *out[1:])
        return out + self.adapter(hidden)


def adapter_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for a half-precision base (trainable factors need it), else the base's dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def inject_(model: nn.Module, sites: Mapping[str, Target | Block], cfg: HeadConfig, context: AdapterContext,
            seed: int) -> dict[str, nn.Module]:
    """Freeze ``model`` and wrap every site (a Linear/Conv1D `Target` or a `Block`) with a multi-head adapter.

    Args:
        model: modified in place; it keeps its train/eval mode.
        sites: full dotted names → `Target` (wrapped by `MultiHeadLinear`) or `Block` (`BlockAdapter`).
        cfg: the adapters' shape and behaviour.
        context: shared by all adapters of the model.
        seed: seeds the initialisation (a private generator: the global RNG is not touched).

    Returns:
        ``{name: wrapper}`` in the order of ``sites``.
    """
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    wrappers: dict[str, nn.Module] = {}
    for name, site in sites.items():
        base = model.get_submodule(name)
        param = next(base.parameters())
        d_in, d_out = (site.d_model, site.d_model) if isinstance(site, Block) else (site.d_in, site.d_out)
        adapter = MultiHeadDelta(d_in, d_out, cfg, context, dtype=adapter_dtype(param.dtype), device=param.device)
        adapter.reset_(generator)
        wrapper = BlockAdapter(base, adapter) if isinstance(site, Block) else MultiHeadLinear(base, adapter)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapper)
        wrappers[name] = wrapper.train(model.training)
    model.register_forward_pre_hook(_forward_start(context), with_kwargs=True)
    return wrappers


def _forward_start(context: AdapterContext) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        context.attention_mask = kwargs.get("attention_mask")
        context.stashing = True

    return hook


def adapters(model: nn.Module) -> dict[str, MultiHeadDelta]:
    """``{name of the adapted module: its MultiHeadDelta}`` of a prepared model (DDP-wrapped or not)."""
    inner = unwrap(model)
    return {name.removesuffix(".adapter"): m for name, m in inner.named_modules() if isinstance(m, MultiHeadDelta)}


def context_of(model: nn.Module) -> AdapterContext:
    """The `AdapterContext` shared by the adapters of ``model``.

    Raises:
        TypeError: ``model`` has no multi-head adapter.
    """
    found = adapters(model)
    if not found:
        raise TypeError(f"{type(unwrap(model)).__name__} has no multi-head adapter; "
                        "prepare it with hydralora, rlora_plus or mtlora first")
    return next(iter(found.values())).context


def take_routing_probs(model: nn.Module) -> list[Tensor]:
    """The routing weights (..., g, N) each routed adapter kept from the last training forward; cleared on return,
    and none kept again until the model's next forward."""
    out = []
    for adapter in adapters(model).values():
        adapter.context.stashing = False
        if adapter.last_probs is not None:
            out.append(adapter.last_probs)
            adapter.last_probs = None
    return out


def routed_tokens(probs: Tensor, batch: Mapping[str, Any]) -> Tensor:
    """The routing weights (B, L, g, N) of the batch's non-padding tokens, as (T, g, N); every position when the
    batch has no ``attention_mask`` of shape (B, L)."""
    mask = batch.get("attention_mask")
    if isinstance(mask, Tensor) and probs.dim() == 4 and tuple(mask.shape) == tuple(probs.shape[:2]):
        return probs[mask.to(device=probs.device, dtype=torch.bool)]
    return probs.reshape(-1, *probs.shape[-2:])


def zero_loss(batch: Mapping[str, Any]) -> Tensor:
    """A float32 zero scalar on the device of ``batch["input_ids"]``."""
    ids = batch.get("input_ids")
    return torch.zeros((), device=ids.device if isinstance(ids, Tensor) else None)


def save_multihead(model: nn.Module, out_dir: Path) -> None:
    """Write the model's adapters in thanora's native format (`thanora.adapters.native`), with the method's settings."""
    context = context_of(model)
    save_native(model, context.method, context.settings, out_dir)


def target_names(value: Any, field: str) -> tuple[str, ...] | None:
    """Validate a ``target_modules`` setting: ``None``, one name or a non-empty list of names, as a tuple.

    Raises:
        ValueError: naming ``field``.
    """
    if value is None:
        return None
    names = (value,) if isinstance(value, str) else tuple(value)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"{field} must be null (all linear layers of the language model) or a non-empty list of "
                         "module names")
    return names
