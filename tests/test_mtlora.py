"""mtLoRA: group-wise routing, the causal sequence router, block-level outputs and the spectral-aware regulariser
against direct computations (naive loops, float64); balance loss, parameter count, save/load and training."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import logits, random_batch, tiny_gpt2, tiny_llama
from test_train import collate_features, config, learnable_llama, synthetic_features
from thanora.adapters.multihead import AdapterContext, HeadConfig, MultiHeadDelta, adapters
from thanora.adapters.native import NativeFormatError
from thanora.methods.base import MethodContext
from thanora.methods.hydralora import HYDRALORA
from thanora.methods.mtlora import (
    MTLORA,
    MtLoraSettings,
    cross_head_penalty,
    cv_squared,
    identity_deviation_penalty,
    spectral_projectors,
)
from thanora.training.train import make_loader_factory, train

MAKERS = [tiny_llama, tiny_gpt2]
IDS = ["llama", "gpt2"]
SMALL = {"rank": 4, "n_heads": 4, "groups": 4, "lora_dropout": 0.0}


def settings_of(**kw: object) -> MtLoraSettings:
    return MtLoraSettings(**{**SMALL, **kw})  # type: ignore[arg-type]


def prepared(make: Callable[[], nn.Module] = tiny_llama, seed: int = 1, **kw: object) -> nn.Module:
    return MTLORA.prepare(make(), settings_of(**kw), MethodContext(seed=seed))


def randomise_(model: nn.Module, seed: int) -> None:
    """Random A and B_i (B starts at zero, which would make most identities trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))


def naive_delta(adapter: MultiHeadDelta, h: Tensor, pooled: Tensor | None = None) -> Tensor:
    """Δ(h) token by token, group by group, head by head; ``pooled`` (B, L, d) feeds the sequence router."""
    cfg = adapter.cfg
    size = adapter.d_out // cfg.groups
    out = torch.zeros(*h.shape[:-1], adapter.d_out, dtype=h.dtype)
    for b in range(h.shape[0]):
        for t in range(h.shape[1]):
            x = h[b, t]
            if pooled is None:
                route = adapter.router_weight @ x
            else:
                hidden = F.gelu(adapter.router_hidden_weight @ pooled[b, t] + adapter.router_hidden_bias)
                route = adapter.router_weight @ hidden + adapter.router_bias
            for k in range(cfg.groups):
                weights = torch.softmax(route[k * cfg.n_heads:(k + 1) * cfg.n_heads], 0)
                for i in range(cfg.n_heads):
                    head = cfg.scaling * adapter.lora_B[i] @ (adapter.lora_A @ x)
                    out[b, t, k * size:(k + 1) * size] += weights[i] * head[k * size:(k + 1) * size]
    return out


def standalone(router: str = "token", groups: int = 3, d_in: int = 8, d_out: int = 12) -> MultiHeadDelta:
    cfg = HeadConfig(rank=3, n_heads=4, scaling=1.5, router=router, groups=groups, router_hidden=5)  # type: ignore
    layer = MultiHeadDelta(d_in, d_out, cfg, AdapterContext("mtlora", None), dtype=torch.float64)
    layer.reset_(torch.Generator().manual_seed(0))
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return layer.eval()


@pytest.mark.parametrize(("field", "value"), [
    ("rank", 0), ("n_heads", 0), ("groups", 0), ("router_hidden", 0), ("spectral_every", 0), ("router", "mlp"),
    ("spectral", "svd"), ("blocks", ["ffn"]), ("blocks", []), ("block_level", "yes"), ("balance_weight", -1.0),
    ("spectral_lambda", -1.0), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("target_modules", ()),
])
def test_settings_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"MtLoraSettings.{field}"):
        MtLoraSettings(**{field: value})  # type: ignore[arg-type]


def test_defaults_are_the_reference() -> None:
    s = MtLoraSettings()
    assert (s.rank, s.n_heads, s.spectral_lambda, s.balance_weight, s.router, s.spectral, s.block_level) == \
        (16, 16, 1.0, 0.01, "token", "paper", True)
    assert MtLoraSettings(blocks=["mlp"]).blocks == ("mlp",)


def test_group_wise_routing_matches_naive_loops() -> None:
    layer = standalone()
    h = torch.randn(2, 4, 8, dtype=torch.float64)
    weights = layer.routing_weights(h)
    assert weights is not None and weights.shape == (2, 4, 3, 4)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 3, dtype=torch.float64))
    assert not torch.allclose(weights[..., 0, :], weights[..., 1, :])  # groups route differently
    with torch.no_grad():
        torch.testing.assert_close(layer(h), naive_delta(layer, h), rtol=1e-12, atol=1e-12)


def test_sequence_router_is_the_causal_masked_running_mean() -> None:
    layer = standalone("sequence")
    h = torch.randn(2, 6, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])  # second row left-padded
    layer.context.attention_mask = mask
    pooled = torch.zeros_like(h)
    for b in range(2):
        for t in range(6):
            real = [s for s in range(t + 1) if mask[b, s]]
            pooled[b, t] = h[b, real].mean(0) if real else 0.0
    with torch.no_grad():
        out = layer(h)
        torch.testing.assert_close(out, naive_delta(layer, h, pooled), rtol=1e-12, atol=1e-12)
        later = h.clone()
        later[:, 4:] = torch.randn(2, 2, 8, dtype=torch.float64)  # the future does not route the past
        torch.testing.assert_close(layer(later)[:, :4], out[:, :4], rtol=0, atol=0)
        padded = h.clone()
        padded[1, :2] = 100.0  # padding does not route either
        torch.testing.assert_close(layer(padded)[1, 2:], out[1, 2:], rtol=0, atol=0)
        layer.context.attention_mask = torch.ones(2, 9)  # 3 unseen tokens before these 6
        with pytest.raises(RuntimeError, match="has not seen"):
            layer(torch.randn(2, 6, 8, dtype=torch.float64))


def test_sequence_router_decodes_with_the_kv_cache_as_the_full_forward() -> None:
    model = prepared(router="sequence", n_heads=3, groups=2)
    randomise_(model, 2)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        out = model(input_ids=ids[:, :6], attention_mask=mask[:, :6], use_cache=True)
        steps, cache = [], out.past_key_values
        for t in range(6, 9):
            out = model(input_ids=ids[:, t:t + 1], attention_mask=mask[:, :t + 1], past_key_values=cache,
                        use_cache=True)
            steps.append(out.logits)
            cache = out.past_key_values
    torch.testing.assert_close(torch.cat(steps, 1), full[:, 6:], rtol=1e-5, atol=1e-5)


def test_llama_block_level_output_is_the_block_plus_delta_of_its_normalised_input() -> None:
    model = prepared(lambda: tiny_llama().double(), lora_alpha=6)
    randomise_(model, 3)
    layer = model.model.layers[0]
    attention, mlp = layer.self_attn, layer.mlp
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    position = model.model.rotary_emb(x, torch.arange(5)[None])
    with torch.no_grad():
        out = layer(x, position_embeddings=position)
        h = layer.input_layernorm(x)
        mid = x + attention.base_layer(hidden_states=h, position_embeddings=position, attention_mask=None)[0] \
            + naive_delta(attention.adapter, h)
        h = layer.post_attention_layernorm(mid)
        expected = mid + mlp.base_layer(h) + naive_delta(mlp.adapter, h)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)


def test_gpt2_block_level_output_is_the_block_plus_delta_of_its_normalised_input() -> None:
    model = prepared(lambda: tiny_gpt2().double(), blocks=["mlp"])
    randomise_(model, 4)
    block = model.transformer.h[1]
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    with torch.no_grad():
        out = block(x)
        mid = x + block.attn(block.ln_1(x))[0]  # attention not adapted here
        h = block.ln_2(mid)
        expected = mid + block.mlp.base_layer(h) + naive_delta(block.mlp.adapter, h)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    assert set(adapters(model)) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}


def naive_reweighted(heads: Tensor) -> list[Tensor]:
    out = []
    for head in heads:
        u, s, vh = torch.linalg.svd(head, full_matrices=False)
        out.append(u @ torch.diag(torch.exp(-s / s.mean()) * s) @ vh)
    return out


def naive_paper_penalty(heads: Tensor) -> Tensor:
    b = naive_reweighted(heads)
    return sum(((b[i].T @ b[j]) ** 2).sum() for i in range(len(b)) for j in range(i + 1, len(b)))  # type: ignore


def naive_code_penalty(heads: Tensor) -> Tensor:
    total = torch.zeros((), dtype=heads.dtype)
    for b in naive_reweighted(heads):
        gram = b.T @ b
        total = total + ((gram - torch.trace(gram) / gram.shape[0] * torch.eye(gram.shape[0])) ** 2).sum()
    return total


def test_spectral_weights_and_penalties_match_the_svd_definition() -> None:
    heads = torch.randn(4, 12, 3, dtype=torch.float64)
    projectors = spectral_projectors(heads)
    for i, b in enumerate(naive_reweighted(heads)):
        torch.testing.assert_close(heads[i] @ projectors[i], b, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(cross_head_penalty(heads, projectors), naive_paper_penalty(heads))
    torch.testing.assert_close(identity_deviation_penalty(heads, projectors), naive_code_penalty(heads))
    torch.testing.assert_close(spectral_projectors(torch.zeros(2, 8, 3)), torch.eye(3).expand(2, 3, 3))  # B = 0


def test_cross_head_penalty_is_zero_on_orthogonal_heads() -> None:
    columns = torch.eye(6, dtype=torch.float64)  # B_1 = e1 e2, B_2 = e3 e4, B_3 = e5 e6 (disjoint columns)
    heads = torch.stack([columns[:, 0:2], columns[:, 2:4], columns[:, 4:6]])
    assert float(cross_head_penalty(heads, spectral_projectors(heads))) == 0.0
    heads[1, 0, 0] = 1.0  # overlap with head 0
    assert float(cross_head_penalty(heads, spectral_projectors(heads))) > 0


@pytest.mark.parametrize("variant", ["paper", "code"])
def test_regularizer_refreshes_the_spectral_weights_every_k_calls(variant: str) -> None:
    assert MTLORA.regularizer is not None
    settings = settings_of(spectral=variant, spectral_lambda=0.5, spectral_every=3, balance_weight=0.0)
    model = MTLORA.prepare(tiny_llama().double(), settings, MethodContext(seed=1))
    naive = naive_paper_penalty if variant == "paper" else naive_code_penalty
    randomise_(model, 5)
    batch = random_batch(0)

    def expected() -> Tensor:
        return 0.5 * sum(naive(a.lora_B.detach()) for a in adapters(model).values())  # type: ignore[return-value]

    first = MTLORA.regularizer(model, settings, batch)  # call 0: refresh
    torch.testing.assert_close(first, expected())
    assert first.requires_grad
    first.backward()
    grads = [a.lora_B.grad for a in adapters(model).values()]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    randomise_(model, 6)
    stale = MTLORA.regularizer(model, settings, batch)  # call 1: the weights of call 0
    if variant == "paper":
        old = {n: a.head_projectors for n, a in adapters(model).items()}
        kept = 0.5 * sum(cross_head_penalty(a.lora_B, old[n]) for n, a in adapters(model).items())
        torch.testing.assert_close(stale, kept)  # type: ignore[arg-type]
        assert not torch.allclose(stale, expected())
    else:
        assert float(stale) == 0.0  # the code's penalty applies on refresh calls only
    MTLORA.regularizer(model, settings, batch)  # call 2
    torch.testing.assert_close(MTLORA.regularizer(model, settings, batch), expected())  # call 3: refresh


def test_balance_loss_is_the_masked_cv_squared_and_differentiable() -> None:
    assert MTLORA.regularizer is not None
    assert float(cv_squared(torch.full((4,), 0.25))) == 0.0
    x = torch.tensor([0.7, 0.1, 0.1, 0.1])
    torch.testing.assert_close(cv_squared(x), x.var() / x.mean() ** 2)
    settings = settings_of(spectral_lambda=0.0, balance_weight=0.01)
    model = MTLORA.prepare(tiny_llama(), settings, MethodContext(seed=1)).train()
    batch = random_batch(3)
    model(**batch)
    keep = batch["attention_mask"].bool()
    expected = 0.01 * torch.stack([cv_squared(a.last_probs[keep].mean((0, 1)))  # type: ignore[index]
                                   for a in adapters(model).values()]).mean()
    reg = MTLORA.regularizer(model, settings, batch)
    torch.testing.assert_close(reg, expected)
    assert torch.isfinite(reg) and reg > 0 and reg.requires_grad
    reg.backward()
    grads = [a.router_weight.grad for a in adapters(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    off = MTLORA.regularizer(model, dataclasses.replace(settings, balance_weight=0.0), batch)
    assert float(off) == 0.0 and not off.requires_grad


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
@pytest.mark.parametrize("variant", [{}, {"blocks": ["attention"]}, {"router": "sequence"},
                                     {"block_level": False, "groups": 2}, {"n_heads": 1}],
                         ids=["blocks", "attention", "sequence", "linear", "one_head"])
def test_param_count_is_the_trainable_count(make: Callable[[], nn.Module], variant: dict) -> None:
    settings = settings_of(**variant)
    model = MTLORA.prepare(make(), settings, MethodContext())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == MTLORA.param_count(make(), settings) > 0
    assert all(".adapter." in n for n, p in model.named_parameters() if p.requires_grad)
    if make is tiny_llama:
        with torch.device("meta"):
            meta = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        assert MTLORA.param_count(meta, settings) == trainable


def test_groups_must_divide_the_width() -> None:
    with pytest.raises(ValueError, match=r"MtLoraSettings\.groups=3 must divide the output width 32"):
        prepared(groups=3)
    with pytest.raises(ValueError, match=r"MtLoraSettings\.groups=32 must divide the output width 16"):
        prepared(block_level=False, groups=32)  # k_proj: 16 outputs


def test_init_keeps_the_output_is_seeded_and_leaves_the_global_rng_alone() -> None:
    base = tiny_llama()
    state = torch.get_rng_state()
    model = prepared(lambda: base)
    assert torch.equal(torch.get_rng_state(), state) and not model.training
    batch = random_batch(1)
    torch.testing.assert_close(logits(model, batch), logits(tiny_llama(), batch), rtol=0, atol=0)
    again = prepared()
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
@pytest.mark.parametrize("variant", [{}, {"router": "sequence", "block_level": False, "groups": 2}],
                         ids=["blocks", "linear_sequence"])
def test_save_load_reproduces_the_logits(make: Callable[[], nn.Module], variant: dict, tmp_path: Path) -> None:
    model = prepared(make, **variant)
    randomise_(model, 7)
    MTLORA.save(model, tmp_path / "a")
    loaded = MTLORA.load(make(), tmp_path / "a")
    batch = random_batch(4)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)
    with pytest.raises(NativeFormatError, match="holds a 'mtlora' adapter, not 'hydralora'"):
        HYDRALORA.load(make(), tmp_path / "a")
    other = tiny_gpt2 if make is tiny_llama else tiny_llama
    with pytest.raises(NativeFormatError, match="does not fit this base model"):
        MTLORA.load(other(), tmp_path / "a")


def test_training_lowers_the_loss_and_changes_only_the_adapter(tmp_path: Path) -> None:
    data = synthetic_features(64)
    settings = settings_of(lora_dropout=0.05, spectral_every=4)
    model = MTLORA.prepare(learnable_llama(), settings, MethodContext(seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    cfg = config(max_steps=12, batch_size=8, grad_accum=1, lr=2e-2, schedule="constant", log_every=2)
    result = train(model, MTLORA, settings, make_loader_factory(data, 8, collate_features, seed=0), cfg,
                   out_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    assert all(h["reg"] > 0 for h in result.history)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)
    assert all(not torch.equal(before[k], after[k]) for k in trainable if "lora_B" in k)


def test_find_blocks_sees_only_the_language_model() -> None:
    from conftest import tiny_llava
    from thanora.core.targets import find_blocks

    blocks = find_blocks(tiny_llava())
    assert len(blocks) == 4 and all("vision" not in n for n in blocks)  # 2 decoder layers x (attention, mlp)
    assert {b.kind for b in blocks.values()} == {"attention", "mlp"} and {b.d_model for b in blocks.values()} == {32}
    with pytest.raises(ValueError, match="block kinds"):
        find_blocks(tiny_llama(), ["ffn"])
    with pytest.raises(ValueError, match="no decoder layer"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


def test_bf16_model_trains_with_fp32_adapters() -> None:
    settings = settings_of(router="sequence", spectral_every=1)
    model = MTLORA.prepare(tiny_llama(dtype=torch.bfloat16), settings, MethodContext(seed=0)).train()
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    batch = random_batch(0)
    loss = model(**batch, labels=batch["input_ids"]).loss
    assert MTLORA.regularizer is not None
    total = loss + MTLORA.regularizer(model, settings, batch)
    total.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert torch.isfinite(total) and all(g is not None and torch.isfinite(g).all() for g in grads)
