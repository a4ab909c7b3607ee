"""HydraLoRA: router weights, N = 1 is LoRA, the layer against a direct computation, save/load, balance loss,
training, and the clear error when a routed method is asked for a PEFT export."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import logits, random_batch, tiny_gpt2, tiny_llama
from test_train import collate_features, config, learnable_llama, synthetic_features
from thanora.adapters.multihead import MultiHeadLinear, adapters
from thanora.adapters.native import NativeFormatError, read_native_meta
from thanora.experiment.config import config_from_dict
from thanora.methods.base import MethodContext
from thanora.methods.hydralora import HYDRALORA, HydraLoraSettings, switch_balance_loss
from thanora.methods.lora import LORA, LoraSettings
from thanora.methods.registry import METHODS, get_method
from thanora.training.train import make_loader_factory, train


def randomise_(model: nn.Module, seed: int) -> None:
    """Give every A and B a random value (B starts at zero, which would make most identities trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


def hydra(make: Callable[[], nn.Module] = tiny_llama, **kw: object) -> nn.Module:
    settings = HydraLoraSettings(**{"n_heads": 3, "rank": 4, "lora_dropout": 0.0, **kw})  # type: ignore[arg-type]
    return HYDRALORA.prepare(make(), settings, MethodContext(seed=1))


@pytest.mark.parametrize(("field", "value"), [
    ("preset", "5B1A"), ("n_heads", 0), ("rank", 2.5), ("lora_alpha", 0.0), ("lora_dropout", 1.0),
    ("balance_weight", -0.1), ("target_modules", ()),
])
def test_settings_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"HydraLoraSettings.{field}"):
        HydraLoraSettings(**{field: value})  # type: ignore[arg-type]


def test_presets_and_defaults() -> None:
    assert (HydraLoraSettings().n_heads, HydraLoraSettings().rank) == (3, 32)  # 3B1A
    four = HydraLoraSettings(preset="4B1A")
    assert (four.n_heads, four.rank) == (4, 32)
    assert four.head_config() == HydraLoraSettings(n_heads=4, rank=32).head_config()
    assert HydraLoraSettings(**dataclasses.asdict(four)) == four  # what native metadata reloads
    with pytest.raises(ValueError, match=r"HydraLoraSettings\.n_heads=3 contradicts preset 4B1A"):
        HydraLoraSettings(preset="4B1A", n_heads=3)
    cfg = config_from_dict({"model": {"name_or_path": "m"}, "tasks": [{"name": "a", "source": "csqa"}],
                            "methods": [{"name": "hydralora", "preset": "4B1A"}]})
    assert cfg.methods[0].build().n_heads == 4


def test_router_weights_sum_to_one_in_float32_on_a_bf16_model() -> None:
    model = hydra(lambda: tiny_llama(dtype=torch.bfloat16))
    adapter = next(iter(adapters(model).values()))
    assert adapter.lora_A.dtype == torch.float32 and adapter.router_weight is not None
    x = torch.randn(2, 5, 32, dtype=torch.bfloat16)
    weights = adapter.routing_weights(x)
    assert weights is not None and weights.shape == (2, 5, 1, 3) and weights.dtype == torch.float32
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, 1), rtol=0, atol=1e-6)
    out = logits(model, random_batch(0))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_one_head_is_peft_lora_with_the_same_factors(make: Callable[[], nn.Module]) -> None:
    model = hydra(make, n_heads=1, lora_alpha=8)
    randomise_(model, 3)
    assert not any("router" in n for n, p in model.named_parameters() if p.requires_grad)  # 1 head: no router
    peft_model = LORA.prepare(make(), LoraSettings(rank=4, lora_alpha=8, lora_dropout=0.0), MethodContext())
    with torch.no_grad():
        for name, adapter in adapters(model).items():
            layer = peft_model.get_submodule(f"base_model.model.{name}")
            layer.lora_A["default"].weight.copy_(adapter.lora_A)
            layer.lora_B["default"].weight.copy_(adapter.lora_B[0])
    batch = random_batch(1)
    expected = logits(peft_model, batch)
    assert not torch.allclose(expected, logits(make(), batch), atol=1e-3)
    torch.testing.assert_close(logits(model, batch), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_layer_output_equals_a_direct_computation(make: Callable[[], nn.Module]) -> None:
    model = hydra(lambda: make().double(), lora_alpha=6)
    randomise_(model, 4)
    wrapper = next(m for m in model.modules() if isinstance(m, MultiHeadLinear))
    adapter, base = wrapper.adapter, wrapper.base_layer
    weight = base.weight.T if type(base).__name__ == "Conv1D" else base.weight  # (d_out, d_in)
    bias = base.bias if base.bias is not None else torch.zeros(weight.shape[0], dtype=torch.float64)
    x = torch.randn(2, 5, adapter.d_in, dtype=torch.float64)
    expected = torch.empty(2, 5, adapter.d_out, dtype=torch.float64)
    for b in range(2):
        for t in range(5):
            token = x[b, t]
            w = torch.softmax(adapter.router_weight @ token, 0)
            y = weight @ token + bias
            for i in range(3):
                y = y + w[i] * 1.5 * adapter.lora_B[i] @ (adapter.lora_A @ token)
            expected[b, t] = y
    with torch.no_grad():
        torch.testing.assert_close(wrapper(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_param_count_is_the_trainable_count_and_works_on_meta(make: Callable[[], nn.Module]) -> None:
    settings = HydraLoraSettings(n_heads=4, rank=8)
    model = HYDRALORA.prepare(make(), settings, MethodContext())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == HYDRALORA.param_count(make(), settings)
    with torch.device("meta"):
        meta = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    if make is tiny_llama:
        assert HYDRALORA.param_count(meta, settings) == trainable
    assert all(".adapter." in n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(ValueError, match=r"HydraLoraSettings\.rank=64 exceeds"):
        HYDRALORA.prepare(make(), HydraLoraSettings(rank=64), MethodContext())


def test_init_is_seeded_keeps_the_output_and_the_global_rng() -> None:
    base = tiny_llama()
    state = torch.get_rng_state()
    model = hydra(lambda: base, lora_dropout=0.05)
    assert torch.equal(torch.get_rng_state(), state)
    assert not model.training  # the caller's mode
    batch = random_batch(2)
    torch.testing.assert_close(logits(model, batch), logits(tiny_llama(), batch), rtol=0, atol=0)  # B = 0
    again = hydra(lora_dropout=0.05)
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n
    other = HYDRALORA.prepare(tiny_llama(), HydraLoraSettings(n_heads=3, rank=4), MethodContext(seed=2))
    assert not torch.equal(next(iter(adapters(other).values())).lora_A, next(iter(adapters(model).values())).lora_A)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_save_load_reproduces_the_logits(make: Callable[[], nn.Module], tmp_path: Path) -> None:
    settings = HydraLoraSettings(n_heads=3, rank=4, balance_weight=0.05)
    model = HYDRALORA.prepare(make(), settings, MethodContext(seed=5))
    randomise_(model, 6)
    HYDRALORA.save(model, tmp_path / "a")
    meta = read_native_meta(tmp_path / "a")
    assert meta["method"] == "hydralora" and meta["settings"]["balance_weight"] == 0.05
    loaded = HYDRALORA.load(make(), tmp_path / "a")
    batch = random_batch(3)
    torch.testing.assert_close(logits(loaded, batch), logits(model, batch), rtol=0, atol=0)


def test_loading_into_the_wrong_base_or_from_another_method_is_a_clear_error(tmp_path: Path) -> None:
    model = hydra()
    HYDRALORA.save(model, tmp_path / "a")
    with pytest.raises(NativeFormatError, match="does not fit this base model"):
        HYDRALORA.load(tiny_gpt2(), tmp_path / "a")
    mtlora = get_method("mtlora")
    with pytest.raises(NativeFormatError, match="holds a 'hydralora' adapter, not 'mtlora'"):
        mtlora.load(tiny_llama(), tmp_path / "a")
    LORA.save(LORA.prepare(tiny_llama(), LoraSettings(rank=4), MethodContext()), tmp_path / "peft")
    with pytest.raises(NativeFormatError, match="not a thanora adapter folder"):
        HYDRALORA.load(tiny_llama(), tmp_path / "peft")
    with pytest.raises(TypeError, match="no multi-head adapter"):
        HYDRALORA.save(tiny_llama(), tmp_path / "b")


def test_switch_balance_loss_values() -> None:
    uniform = torch.full((6, 3), 1 / 3)
    assert float(switch_balance_loss(uniform)) == pytest.approx(1.0)
    collapsed = torch.tensor([[1.0, 0.0, 0.0]] * 4)
    assert float(switch_balance_loss(collapsed)) == pytest.approx(3.0)


def test_regularizer_is_the_masked_switch_loss_finite_and_differentiable() -> None:
    assert HYDRALORA.regularizer is not None
    settings = HydraLoraSettings(n_heads=3, rank=4, lora_dropout=0.0, balance_weight=0.05)
    model = HYDRALORA.prepare(tiny_llama(), settings, MethodContext(seed=1)).train()
    batch = random_batch(4)
    model(**batch)
    probs = {n: a.last_probs for n, a in adapters(model).items()}
    reg = HYDRALORA.regularizer(model, settings, batch)
    keep = batch["attention_mask"].bool()
    expected = torch.stack([switch_balance_loss(p[keep][:, 0]) for p in probs.values()]).mean() * 0.05
    torch.testing.assert_close(reg, expected)
    assert torch.isfinite(reg) and reg.requires_grad
    reg.backward()
    grads = [a.router_weight.grad for a in adapters(model).values()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and any(g.abs().sum() > 0 for g in grads)
    assert all(a.last_probs is None for a in adapters(model).values())  # consumed
    off = HYDRALORA.regularizer(model, dataclasses.replace(settings, balance_weight=0.0), batch)
    assert float(off) == 0.0 and not off.requires_grad


def test_training_lowers_the_loss_and_changes_only_the_adapter(tmp_path: Path) -> None:
    data = synthetic_features(64)
    settings = HydraLoraSettings(n_heads=3, rank=4, balance_weight=0.05)
    model = HYDRALORA.prepare(learnable_llama(), settings, MethodContext(seed=0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    cfg = config(max_steps=12, batch_size=8, grad_accum=1, lr=2e-2, schedule="constant", log_every=2)
    result = train(model, HYDRALORA, settings, make_loader_factory(data, 8, collate_features, seed=0), cfg,
                   out_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in result.history]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    assert all(h["reg"] > 0 for h in result.history)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k not in trainable)
    assert all(not torch.equal(before[k], after[k]) for k in trainable if "lora_B" in k or "router" in k)


@pytest.mark.parametrize("name", ["hydralora", "mtlora"])
def test_exporting_a_routed_method_as_peft_is_a_clear_error(name: str, tmp_path: Path) -> None:
    from thanora.artifacts import write_json
    from thanora.experiment.pipeline import run_record
    from thanora.experiment.stages import export_trained

    assert METHODS[name].export is None and not METHODS[name].mergeable
    cfg = config_from_dict({"model": {"name_or_path": "some/model"}, "tasks": [{"name": "a", "source": "csqa"}],
                            "methods": [{"name": name}]})
    cfg.save(tmp_path / "config.yaml")
    write_json(tmp_path / "run.json", run_record(cfg, "complete", {}))
    with pytest.raises(ValueError, match=r"cannot be exported as a PEFT adapter \(input-dependent.*load_native"):
        export_trained(tmp_path, name)


def test_cli_run_saves_the_native_adapter_and_eval_reloads_it(tmp_path: Path) -> None:
    """`thanora run` writes HydraLoRA's native adapter (no merged model: not mergeable); `thanora eval --adapter`
    recognises the native folder and reproduces the run's metrics."""
    from conftest import run_tiny
    from thanora.cli import main

    out = run_tiny(tmp_path, {"name": "hydralora", "n_heads": 2, "rank": 2})
    assert (out / "hydralora" / "adapter" / "thanora_native.json").is_file()
    assert not (out / "hydralora" / "merged").exists()
    assert main(["eval", str(tmp_path / "c.yaml"), "--adapter", str(out / "hydralora" / "adapter"),
                 "--output", str(tmp_path / "m.json"), "-q"]) == 0
    again = json.loads((tmp_path / "m.json").read_text())["adapter"]
    run = json.loads((out / "metrics.json").read_text())["hydralora"]
    assert again["average"] == pytest.approx(run["average"], abs=1e-9)
