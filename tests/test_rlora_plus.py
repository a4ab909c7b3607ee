"""R-LoRA+: the init keeps the output, inference is LoRA (mean B, A) on the residual base, the PEFT export on the
original base reproduces the logits, per-head dropout, parameter count and training."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import logits, random_batch, tiny_gpt2, tiny_llama
from test_train import collate_features, config, learnable_llama, synthetic_features
from thanora.adapters.multihead import AdapterContext, HeadConfig, MultiHeadDelta, MultiHeadLinear, adapters
from thanora.core.targets import weight_matrix
from thanora.methods.base import MethodContext
from thanora.methods.lora import LORA, LoraSettings
from thanora.methods.rlora_plus import RLORA_PLUS, RLoraPlusSettings
from thanora.training.train import make_loader_factory, train

MAKERS = [tiny_llama, tiny_gpt2]
IDS = ["llama", "gpt2"]


def prepared(make: Callable[[], nn.Module] = tiny_llama, seed: int = 1, **kw: object) -> nn.Module:
    settings = RLoraPlusSettings(**{"rank": 4, "n_heads": 3, "lora_alpha": 8, "lora_dropout": 0.0, **kw})  # type: ignore
    return RLORA_PLUS.prepare(make(), settings, MethodContext(seed=seed))


def train_like_(model: nn.Module, seed: int = 7) -> None:
    """Move every A and B_i away from its initial value, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(0.2 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize(("field", "value"), [
    ("rank", 0), ("n_heads", 1.5), ("lora_alpha", -1.0), ("lora_dropout", 1.0), ("target_modules", ()),
])
def test_settings_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"RLoraPlusSettings.{field}"):
        RLoraPlusSettings(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_random_heads_residual_init_keeps_the_output(make: Callable[[], nn.Module]) -> None:
    model = prepared(lambda: make().double())
    heads = next(iter(adapters(model).values())).lora_B.detach()
    assert heads.abs().min() > 0 and not torch.equal(heads[0], heads[1])  # random, distinct heads
    d_out, d_in = heads.shape[1], next(iter(adapters(model).values())).lora_A.shape[1]
    assert float(heads.std()) == pytest.approx(1 / max(d_in, d_out) ** 0.5, rel=0.35)
    batch = random_batch(0)
    torch.testing.assert_close(logits(model, batch), logits(make().double(), batch), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_inference_is_lora_with_the_mean_head_on_the_residual_base(make: Callable[[], nn.Module]) -> None:
    model = prepared(make).eval()
    train_like_(model)
    peft_model = LORA.prepare(make(), LoraSettings(rank=4, lora_alpha=8, lora_dropout=0.0), MethodContext())
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, MultiHeadLinear):
                layer = peft_model.get_submodule(f"base_model.model.{name}")
                layer.base_layer.weight.copy_(module.base_layer.weight)  # the residual base
                layer.lora_A["default"].weight.copy_(module.adapter.lora_A)
                layer.lora_B["default"].weight.copy_(module.adapter.lora_B.mean(0))
    batch = random_batch(1)
    torch.testing.assert_close(logits(model, batch), logits(peft_model, batch), rtol=1e-5, atol=1e-5)


def test_residual_base_is_w_minus_the_initial_update() -> None:
    base = tiny_llama().double()
    original = {n: weight_matrix(m).clone() for n, m in base.named_modules() if isinstance(m, nn.Linear)}
    model = prepared(lambda: base)
    for name, module in model.named_modules():
        if isinstance(module, MultiHeadLinear):
            adapter = module.adapter
            initial = 2.0 * adapter.lora_B.mean(0) @ adapter.lora_A  # s = alpha / r = 2
            torch.testing.assert_close(weight_matrix(module.base_layer), original[name] - initial, rtol=0, atol=1e-14)
            assert torch.equal(module.get_buffer("initial_lora_A"), adapter.lora_A)


def test_dropout_is_independent_per_head() -> None:
    """Identical heads B_i = I and A = I: one shared mask would give x·{0, 2}; N independent masks average to
    x·{0, 1, 2} (p = 0.5); at eval the layer is exactly x."""
    cfg = HeadConfig(rank=4, n_heads=2, scaling=1.0, router=None, dropout=0.5, head_dropout=True, init="random")
    layer = MultiHeadDelta(4, 4, cfg, AdapterContext("rlora_plus", None), dtype=torch.float64)
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(4))
        layer.lora_B.copy_(torch.eye(4).expand(2, 4, 4))
    x = torch.ones(64, 4, dtype=torch.float64)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        values = set(layer.train()(x).unique().tolist())
    assert values == {0.0, 1.0, 2.0}
    torch.testing.assert_close(layer.eval()(x), x)


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_export_loads_with_stock_peft_on_the_original_base(make: Callable[[], nn.Module], tmp_path: Path) -> None:
    model = prepared(make, lora_dropout=0.1).eval()
    train_like_(model)
    batch = random_batch(2)
    expected = logits(model, batch)
    assert not torch.allclose(expected, logits(make(), batch), atol=1e-3)
    RLORA_PLUS.save(model, tmp_path / "adapter")
    config_json = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config_json["r"] == 8 and config_json["lora_alpha"] == 16  # rank 2r, scaling alpha / r kept at 2
    sidecar = json.loads((tmp_path / "adapter" / "thanora_adapter.json").read_text())
    assert sidecar["method"] == "rlora_plus" and sidecar["settings"]["n_heads"] == 3
    loaded = RLORA_PLUS.load(make(), tmp_path / "adapter")
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)
    assert RLORA_PLUS.export is RLORA_PLUS.save and RLORA_PLUS.mergeable


@pytest.mark.parametrize("make", MAKERS, ids=IDS)
def test_param_count_is_the_trainable_count(make: Callable[[], nn.Module]) -> None:
    settings = RLoraPlusSettings(rank=8, n_heads=4, target_modules=["q_proj", "v_proj"] if make is tiny_llama
                                 else None)
    model = RLORA_PLUS.prepare(make(), settings, MethodContext())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == RLORA_PLUS.param_count(make(), settings) > 0
    if make is tiny_llama:
        with torch.device("meta"):
            meta = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
        q_proj, v_proj = 8 * 32 + 4 * 8 * 32, 8 * 32 + 4 * 8 * 16  # r·d_in + N·r·d_out: 32 → 32 and 32 → 16
        assert RLORA_PLUS.param_count(meta, settings) == trainable == 2 * (q_proj + v_proj)
    with pytest.raises(ValueError, match=r"RLoraPlusSettings\.rank=64 exceeds"):
        RLORA_PLUS.prepare(make(), RLoraPlusSettings(), MethodContext())


def test_init_is_seeded_and_leaves_the_global_rng_alone() -> None:
    base = tiny_llama()
    state = torch.get_rng_state()
    model = prepared(lambda: base, seed=3)
    assert torch.equal(torch.get_rng_state(), state)
    again, other = prepared(seed=3), prepared(seed=4)
    first = {n: a.lora_B for n, a in adapters(model).items()}
    assert all(torch.equal(first[n], a.lora_B) for n, a in adapters(again).items())
    assert not any(torch.equal(first[n], a.lora_B) for n, a in adapters(other).items())


def test_training_lowers_the_loss_and_the_export_follows(tmp_path: Path) -> None:
    data = synthetic_features(64)
    settings = RLoraPlusSettings(rank=4, n_heads=3, lora_dropout=0.05)
    model = RLORA_PLUS.prepare(learnable_llama(), settings, MethodContext(seed=0))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    cfg = config(max_steps=12, batch_size=8, grad_accum=1, lr=2e-2, schedule="constant", log_every=2)
    result = train(model, RLORA_PLUS, settings, make_loader_factory(data, 8, collate_features, seed=0), cfg,
                   progress=False)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    RLORA_PLUS.save(model, tmp_path / "adapter")
    batch = random_batch(5)
    torch.testing.assert_close(logits(RLORA_PLUS.load(learnable_llama(), tmp_path / "adapter"), batch),
                               logits(model.eval(), batch), rtol=1e-4, atol=1e-4)
