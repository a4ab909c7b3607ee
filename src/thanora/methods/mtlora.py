"""mtLoRA (Scalable Multi-Task Low-Rank Model Adaptation, ICLR 2026, arXiv:2603.01526): HydraLoRA's shared A and N
heads B_i, with three parts that each have a switch.

1. Block-level adaptation (``block_level``, ``blocks``): a low-rank path in parallel with a whole attention and/or
   MLP block, on the block's normalised input: x' = x + F(LN x) + Δ(LN x). In Llama- and GPT-2-style decoder layers
   the block's input already is LN(x), so the block module is wrapped to return F(h) + Δ(h) (element 0 of the
   attention's tuple). Δ = Σ_i w_i ⊙ s·B_i A, a square d_model → d_model map. With ``block_level: false`` the
   linear targets (``target_modules``) are adapted as in HydraLoRA, with the routing below.
2. Fine-grained routing (``groups``): the router outputs N × g logits, with a softmax over the heads within each of g
   groups; the weights of group k multiply the k-th contiguous slice of every head's output (``groups: 1`` = one
   weight per head, HydraLoRA's routing). Router (``router``):
   - ``"token"`` (default; the reference code): a bias-free linear on the token.
   - ``"sequence"`` (the paper): a 2-layer MLP (GELU, width ``router_hidden``) on the mean-pooled sequence. In a
     decoder-only LM the mean of the whole sequence would let the answer and every later token steer the routing
     of earlier tokens (a leak during training), and at generation time those tokens do not exist yet, so the
     pooled mean here is causal: the running mean of the non-padding tokens at positions ≤ t. This is why
     ``token`` is the default: it needs no such change, while ``sequence`` follows the paper as closely as a causal
     model allows.
   Balance loss (``balance_weight``, 0.01): cv² = Var/mean² (unbiased variance, as the code) of each layer's mean
   routing weight per head over non-padding tokens and groups, averaged over the adapted layers.
3. Spectral-aware regularisation (``spectral_lambda``, ``spectral``):
   - ``"paper"``: per adapted layer, B'_i = U_i diag(w(σ)·σ) V_iᵀ from the SVD B_i = U_i diag(σ) V_iᵀ with
     w(σ) = exp(−σ / mean σ), and the penalty λ Σ_{i<j} ‖B'_iᵀ B'_j‖_F², summed over layers (as ThanoRA's SPR). The
     weights are recomputed every ``spectral_every`` regulariser calls and held fixed (detached) in between: B'_i is
     computed as B_i · V_i diag(w) V_iᵀ with V_i and w from the last refresh, so the gradient flows through B_i.
   - ``"code"``: the reference code's form, as PEERS.md describes it: each head's weighted deviation from a scaled
     identity, Σ_i ‖B'_iᵀ B'_i − (tr(B'_iᵀ B'_i)/r)·I‖_F², applied only on the refresh calls (a few steps per epoch).
   Before the first update the B_i are zero, so the weights are 1 (B' = B) until the next refresh. A resumed run
   refreshes at its first regulariser call.

Defaults are the reference's: r = 16, N = 16 heads, λ_spec = 1.0, balance 0.01; g = 32 (the paper's best granularity);
blocks: attention and MLP. Not mergeable (routing depends on the input): no PEFT export, `save`/`load` use
`thanora.adapters.native`, whose metadata records these settings (hence the paper/code choices).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from thanora.adapters.multihead import (
    ROUTERS,
    AdapterContext,
    HeadConfig,
    Router,
    adapters,
    context_of,
    inject_,
    routed_tokens,
    save_multihead,
    take_routing_probs,
    target_names,
    zero_loss,
)
from thanora.adapters.native import load_native
from thanora.core.targets import BLOCK_CHILDREN, Block, Target, check_rank, find_blocks, find_targets
from thanora.methods.base import Method, MethodContext

Spectral = Literal["paper", "code"]


@dataclass(frozen=True)
class MtLoraSettings:
    """Settings of mtLoRA.

    Attributes:
        rank: rank r of the shared A and of every head.
        n_heads: number of heads N.
        lora_alpha: alpha; ``None`` means ``rank`` (scaling 1; the reference: alpha 16 at r 16).
        lora_dropout: dropout on the adapter input during training.
        block_level: adapt whole blocks (``blocks``) instead of linear layers (``target_modules``).
        blocks: with ``block_level``: ``attention`` and/or ``mlp``.
        target_modules: without ``block_level``: module names inside the language model; ``None`` = every linear
            layer.
        router: ``"token"`` (bias-free linear on the token) or ``"sequence"`` (2-layer MLP on the causal running
            mean of the sequence).
        router_hidden: hidden width of the ``sequence`` router.
        groups: g, groups of contiguous output features with their own softmax over heads (1 = scalar routing).
        balance_weight: weight of the cv² load-balancing loss (0 = off).
        spectral: ``"paper"`` (cross-head penalty) or ``"code"`` (per-head deviation from a scaled identity).
        spectral_lambda: λ of the spectral-aware regulariser (0 = off).
        spectral_every: refresh the spectral weights every this many regulariser calls (micro-batches).
    """

    rank: int = 16
    n_heads: int = 16
    lora_alpha: float | None = None
    lora_dropout: float = 0.05
    block_level: bool = True
    blocks: tuple[str, ...] = ("attention", "mlp")
    target_modules: tuple[str, ...] | None = None
    router: Router = "token"
    router_hidden: int = 64
    groups: int = 32
    balance_weight: float = 0.01
    spectral: Spectral = "paper"
    spectral_lambda: float = 1.0
    spectral_every: int = 50

    def __post_init__(self) -> None:
        for name in ("rank", "n_heads", "router_hidden", "groups", "spectral_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"MtLoraSettings.{name} must be an integer >= 1, got {value!r}")
        if self.lora_alpha is not None and not self.lora_alpha > 0:
            raise ValueError(f"MtLoraSettings.lora_alpha must be positive or null, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"MtLoraSettings.lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if not isinstance(self.block_level, bool):
            raise ValueError(f"MtLoraSettings.block_level must be true or false, got {self.block_level!r}")
        blocks = (self.blocks,) if isinstance(self.blocks, str) else tuple(self.blocks)
        if not blocks or len(set(blocks)) != len(blocks) or not set(blocks) <= set(BLOCK_CHILDREN):
            raise ValueError(f"MtLoraSettings.blocks must be a non-empty list of distinct {sorted(BLOCK_CHILDREN)}, "
                             f"got {self.blocks!r}")
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "target_modules", target_names(self.target_modules, "MtLoraSettings.target_modules"))
        if self.router not in ROUTERS:
            raise ValueError(f"MtLoraSettings.router must be one of {list(ROUTERS)}, got {self.router!r}")
        if self.spectral not in ("paper", "code"):
            raise ValueError(f"MtLoraSettings.spectral must be 'paper' or 'code', got {self.spectral!r}")
        for name in ("balance_weight", "spectral_lambda"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"MtLoraSettings.{name} must be >= 0, got {getattr(self, name)!r}")

    def head_config(self) -> HeadConfig:
        """The multi-head layer's configuration."""
        alpha = float(self.rank if self.lora_alpha is None else self.lora_alpha)
        return HeadConfig(rank=self.rank, n_heads=self.n_heads, scaling=alpha / self.rank,
                          router=self.router, groups=self.groups, router_hidden=self.router_hidden,
                          dropout=self.lora_dropout, stash_probs=self.balance_weight > 0)


def adapted_sites(model: nn.Module, settings: MtLoraSettings) -> dict[str, Target | Block]:
    """The blocks (``block_level``) or linear targets that get adapters.

    Raises:
        ValueError: ``groups`` does not divide a site's output width, or ``rank`` is too large for a target.
    """
    sites: dict[str, Target | Block]
    if settings.block_level:
        sites = dict(find_blocks(model, settings.blocks))
        widths = {n: b.d_model for n, b in sites.items()}
    else:
        targets = find_targets(model, settings.target_modules)
        check_rank(targets, settings.rank, "MtLoraSettings")
        sites, widths = dict(targets), {n: t.d_out for n, t in targets.items()}
    if settings.n_heads > 1:
        bad = [n for n, width in widths.items() if width % settings.groups]
        if bad:
            raise ValueError(f"MtLoraSettings.groups={settings.groups} must divide the output width "
                             f"{widths[bad[0]]} of {bad[0]!r}")
    return sites


def prepare_mtlora(model: nn.Module, settings: MtLoraSettings, ctx: MethodContext) -> nn.Module:
    """Wrap the blocks (or linear targets) of ``model`` in place with mtLoRA adapters; only they train.

    Args:
        model: a transformers model.
        settings: mtLoRA's settings.
        ctx: only ``ctx.seed`` is used (a private generator; the global RNG is left alone).

    Returns:
        ``model``, in the caller's train/eval mode.
    """
    inject_(model, adapted_sites(model, settings), settings.head_config(), AdapterContext("mtlora", settings),
            ctx.seed)
    return model


def cv_squared(x: Tensor) -> Tensor:
    """Squared coefficient of variation Var(x)/mean(x)² of a vector (unbiased variance; 0 for one element)."""
    if x.numel() < 2:
        return x.new_zeros(())
    return x.var() / (x.mean() ** 2 + 1e-10)


def spectral_projectors(lora_B: Tensor) -> Tensor:
    """Detached P_i = V_i diag(w(σ_i)) V_iᵀ (N, r, r) for heads ``lora_B`` (N, d_out, r), w(σ) = exp(−σ / mean σ).

    With B_i = U_i diag(σ_i) V_iᵀ (thin SVD), B_i P_i = U_i diag(w(σ_i)·σ_i) V_iᵀ = B'_i of the paper. A zero head has
    weights 1 (mean σ is floored at the smallest positive float).
    """
    heads = lora_B.detach().to(torch.promote_types(lora_B.dtype, torch.float32))
    _, sigma, vh = torch.linalg.svd(heads, full_matrices=False)  # (N, k), (N, k, r)
    mean = sigma.mean(-1, keepdim=True).clamp_min(torch.finfo(sigma.dtype).tiny)
    weights = torch.exp(-sigma / mean)
    return vh.mT @ (weights[..., None] * vh)


def cross_head_penalty(lora_B: Tensor, projectors: Tensor) -> Tensor:
    """Σ_{i<j} ‖B'_iᵀ B'_j‖_F² with B'_i = B_i P_i, for ``lora_B`` (N, d_out, r) and ``projectors`` (N, r, r)."""
    n_heads, d_out, rank = lora_B.shape
    reweighted = lora_B.to(projectors.dtype) @ projectors  # (N, d_out, r)
    stacked = reweighted.transpose(0, 1).reshape(d_out, n_heads * rank)  # [B'_1 … B'_N]
    gram = (stacked.T @ stacked).view(n_heads, rank, n_heads, rank)  # block (i, j) = B'_iᵀ B'_j
    pair = gram.pow(2).sum((1, 3))  # (N, N)
    return pair.triu(1).sum()


def identity_deviation_penalty(lora_B: Tensor, projectors: Tensor) -> Tensor:
    """Σ_i ‖B'_iᵀ B'_i − (tr(B'_iᵀ B'_i)/r)·I‖_F² with B'_i = B_i P_i (the reference code's form)."""
    rank = lora_B.shape[-1]
    reweighted = lora_B.to(projectors.dtype) @ projectors
    gram = reweighted.mT @ reweighted  # (N, r, r)
    scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1) / rank  # (N,)
    eye = torch.eye(rank, dtype=gram.dtype, device=gram.device)
    return (gram - scale[:, None, None] * eye).pow(2).sum()


def spectral_loss(model: nn.Module, settings: MtLoraSettings) -> Tensor | None:
    """The spectral-aware penalty summed over adapted layers (without λ), or ``None`` on a call where the ``code``
    variant does not apply. Advances the model's regulariser-call counter."""
    context = context_of(model)
    refresh = context.regularizer_calls % settings.spectral_every == 0
    context.regularizer_calls += 1
    if settings.spectral == "code" and not refresh:
        return None
    penalty = cross_head_penalty if settings.spectral == "paper" else identity_deviation_penalty
    terms = []
    for adapter in adapters(model).values():
        if refresh or adapter.head_projectors is None:
            adapter.head_projectors = spectral_projectors(adapter.lora_B)
        terms.append(penalty(adapter.lora_B, adapter.head_projectors))
    return torch.stack(terms).sum()


def mtlora_regularizer(model: nn.Module, settings: MtLoraSettings, batch: dict[str, Any]) -> Tensor:
    """balance_weight · mean cv² (of the last training forward) + spectral_lambda · spectral penalty.

    Returns:
        A scalar; a float32 zero on the batch's device when both terms are off (or have nothing to act on).
    """
    total = zero_loss(batch)
    if settings.balance_weight > 0:
        probs = take_routing_probs(model)
        if probs:
            losses = [cv_squared(routed_tokens(p, batch).mean((0, 1))) for p in probs]
            total = total + settings.balance_weight * torch.stack(losses).mean()
    if settings.spectral_lambda > 0 and (settings.n_heads > 1 or settings.spectral == "code"):
        penalty = spectral_loss(model, settings)
        if penalty is not None:
            total = total + settings.spectral_lambda * penalty
    return total


def mtlora_train_state(model: nn.Module) -> dict[str, Tensor]:
    """The spectral regulariser's running state: its call counter and the weights of the last refresh, per layer."""
    state = {"regularizer_calls": torch.tensor(context_of(model).regularizer_calls)}
    for name, adapter in adapters(model).items():
        if adapter.head_projectors is not None:
            state[f"{name}.head_projectors"] = adapter.head_projectors
    return state


def load_mtlora_train_state(model: nn.Module, state: Mapping[str, Tensor]) -> None:
    """Restore what `mtlora_train_state` saved (a resumed run refreshes the weights when the uninterrupted would)."""
    context_of(model).regularizer_calls = int(state["regularizer_calls"])
    for name, adapter in adapters(model).items():
        saved = state.get(f"{name}.head_projectors")
        adapter.head_projectors = None if saved is None else saved.to(adapter.lora_B.device)


def mtlora_param_count(model: nn.Module, settings: MtLoraSettings) -> int:
    """Σ over adapted sites of r·d_in + N·r·d_out + router (token: d_in·N·g; sequence: its 2-layer MLP)."""
    cfg = settings.head_config()
    total = 0
    for site in adapted_sites(model, settings).values():
        d_in, d_out = (site.d_model, site.d_model) if isinstance(site, Block) else (site.d_in, site.d_out)
        total += cfg.param_count(d_in, d_out)
    return total


def load_mtlora(model: nn.Module, folder: Path) -> nn.Module:
    """Rebuild mtLoRA on the fresh base ``model`` from a folder written by `save` (`thanora.adapters.native`)."""
    return load_native(model, folder, MTLORA)


def mtlora_packing_conflict(settings: MtLoraSettings) -> str | None:
    """Why mtLoRA's training batches stay padded: the ``sequence`` router's running mean over a row's positions would
    run on from one packed sequence into the next (`Method.packing_conflict`)."""
    if settings.router == "sequence" and settings.n_heads > 1:
        return "mtLoRA's sequence router averages over a row's positions, which packing would mix across sequences"
    return None


MTLORA = Method(
    name="mtlora",
    paper="Scalable Multi-Task Low-Rank Model Adaptation (mtLoRA), ICLR 2026 (arXiv:2603.01526)",
    config_cls=MtLoraSettings,
    mergeable=False,
    task_id_at_train=False,
    task_id_at_test=False,
    prepare=prepare_mtlora,
    regularizer=mtlora_regularizer,
    export=None,
    save=save_multihead,
    load=load_mtlora,
    param_count=mtlora_param_count,
    train_state=mtlora_train_state,
    load_train_state=load_mtlora_train_state,
    packing_conflict=mtlora_packing_conflict,
)
