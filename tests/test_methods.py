"""Methods as values: the documented fields, LoRA through stock PEFT, ThanoRA's regulariser and export."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from conftest import random_batch, tiny_gpt2, tiny_llama
from thanora import ThanoraConfig, find_targets, spr_loss
from thanora.methods.base import Method, MethodContext
from thanora.methods.lora import LORA, LoraSettings
from thanora.methods.registry import METHODS, get_method
from thanora.methods.thanora import THANORA


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_has_the_documented_fields(name: str) -> None:
    method = METHODS[name]
    assert isinstance(method, Method) and method.name == name
    assert [f.name for f in dataclasses.fields(Method)] == [
        "name", "paper", "config_cls", "mergeable", "task_id_at_train", "task_id_at_test", "prepare", "regularizer",
        "export", "save", "load", "param_count", "describe", "finalize", "stratified_batches", "train_state",
        "load_train_state", "check_tasks", "supports_gradient_checkpointing", "packing_conflict",
    ]
    assert isinstance(method.paper, str) and "arXiv" in method.paper
    assert dataclasses.is_dataclass(method.config_cls)
    method.config_cls()  # default-constructible: YAML may give only the name
    assert all(isinstance(getattr(method, f), bool) for f in ("mergeable", "task_id_at_train", "task_id_at_test"))
    assert callable(method.prepare) and callable(method.save) and callable(method.load)
    assert callable(method.param_count) and isinstance(method.stratified_batches, bool)
    assert method.finalize is None or callable(method.finalize)
    assert method.regularizer is None or callable(method.regularizer)
    assert method.export is None or callable(method.export)
    assert method.describe is None or callable(method.describe)
    assert (method.train_state is None) == (method.load_train_state is None)
    assert isinstance(method.supports_gradient_checkpointing, bool)
    conflict = method.packing_conflict(method.config_cls()) if method.packing_conflict is not None else None
    assert conflict is None or isinstance(conflict, str)
    with pytest.raises(dataclasses.FrozenInstanceError):
        method.name = "other"  # type: ignore[misc]


def test_running_state_functions_go_together() -> None:
    with pytest.raises(ValueError, match="train_state and load_train_state go together"):
        dataclasses.replace(LORA, train_state=lambda model: {})


def test_get_method_lists_the_known_names() -> None:
    assert get_method("lora") is LORA and get_method("thanora") is THANORA
    with pytest.raises(ValueError, match=r"unknown method 'nope'") as err:
        get_method("nope")
    assert str(sorted(METHODS)) in str(err.value)  # the message lists every known method


@pytest.mark.parametrize(("field", "value"), [
    ("rank", 0), ("rank", 2.5), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("target_modules", ()),
])
def test_lora_settings_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"LoraSettings.{field} "):
        LoraSettings(**{field: value})


def test_lora_settings_defaults() -> None:
    settings = LoraSettings()
    assert (settings.rank, settings.alpha, settings.lora_dropout, settings.target_modules) == (64, 64.0, 0.05, None)
    assert LoraSettings(target_modules=["q_proj"]).target_modules == ("q_proj",)
    assert LoraSettings(rank=8, lora_alpha=16).to_dict()["lora_alpha"] == 16.0


def _randomise_lora_(model: nn.Module, seed: int = 1) -> None:
    """Give every LoRA factor a non-zero value (B starts at zero, which would make any export look right)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g) * 0.1)


def test_lora_targets_every_linear_layer_and_is_seeded() -> None:
    model = LORA.prepare(tiny_llama(), LoraSettings(rank=4), MethodContext(seed=3))
    adapted = {n.removesuffix(".lora_A.default.weight").removeprefix("base_model.model.")
               for n, p in model.named_parameters() if p.requires_grad and ".lora_A." in n}
    assert adapted == set(find_targets(tiny_llama()))  # q, k, v, o, gate, up, down of both layers; no lm_head
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert not model.training  # the caller's mode is kept
    state = torch.get_rng_state()
    again = LORA.prepare(tiny_llama(), LoraSettings(rank=4), MethodContext(seed=3))
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is left alone
    for (n, a), (_, b) in zip(model.named_parameters(), again.named_parameters(), strict=True):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_lora_export_loads_with_stock_peft(make_model: Callable[[], nn.Module], tmp_path: Path) -> None:
    model = LORA.prepare(make_model(), LoraSettings(rank=4, lora_dropout=0.0), MethodContext())
    _randomise_lora_(model)
    batch = random_batch(0)
    with torch.no_grad():
        expected = model(**batch).logits
        base_logits = make_model()(**batch).logits
    assert not torch.allclose(expected, base_logits, atol=1e-4)  # the adapter does something
    LORA.export(model, tmp_path / "adapter")  # type: ignore[misc]
    assert {p.name for p in (tmp_path / "adapter").iterdir()} >= {"adapter_config.json", "adapter_model.safetensors"}
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)


def _calibration() -> dict[str, list[dict[str, torch.Tensor]]]:
    return {"alpha": [random_batch(1, batch=4)], "beta": [random_batch(2, batch=4)]}


def test_thanora_regularizer_is_lambda_times_spr() -> None:
    config = ThanoraConfig(rank=8, spr_lambda=1e-3)
    model = THANORA.prepare(tiny_llama(), config, MethodContext(calibration=_calibration(), progress=False))
    batch = random_batch(3)
    assert THANORA.regularizer is not None
    reg = THANORA.regularizer(model, config, batch)
    torch.testing.assert_close(reg, 1e-3 * spr_loss(model))
    assert reg.requires_grad and float(reg.detach()) > 0
    off = THANORA.regularizer(model, dataclasses.replace(config, spr_lambda=0.0), batch)  # "HASI only"
    assert off.shape == () and float(off) == 0.0 and not off.requires_grad


def test_thanora_needs_calibration() -> None:
    with pytest.raises(ValueError, match="calibration"):
        THANORA.prepare(tiny_llama(), ThanoraConfig(rank=8), MethodContext())


def test_thanora_export_loads_with_stock_peft(tmp_path: Path) -> None:
    config = ThanoraConfig(rank=8, lora_dropout=0.0)
    model = THANORA.prepare(tiny_llama(), config, MethodContext(calibration=_calibration(), progress=False))
    _randomise_lora_(model)
    batch = random_batch(0)
    with torch.no_grad():
        expected = model(**batch).logits
    THANORA.export(model, tmp_path / "adapter")  # type: ignore[misc]
    loaded = PeftModel.from_pretrained(tiny_llama(), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_thanora_describe_reports_plan_and_overlap() -> None:
    from conftest import random_batch, tiny_llama
    from thanora.core.hasi_config import ThanoraConfig
    from thanora.methods.base import MethodContext

    ctx = MethodContext(calibration={"a": [random_batch(1)], "b": [random_batch(2)]}, progress=False)
    model = THANORA.prepare(tiny_llama(), ThanoraConfig(rank=8), ctx)
    files = THANORA.describe(model)  # type: ignore[misc]
    assert set(files) == {"rank_plan.json", "overlap.json"}
    assert files["rank_plan.json"]["tasks"] == ["a", "b"]
    overlap = files["overlap.json"]
    name = next(iter(overlap["after"]))
    # At init the live factors are the initial ones: before == after, and the diagonal is 1.
    assert overlap["before"][name] == overlap["after"][name]
    assert abs(overlap["after"][name][0][0] - 1.0) < 1e-5
    assert 0.0 <= overlap["after"][name][0][1] <= 1.0


# Small settings of every registered method for the tiny Llama; a new method must add its entry here.
SMALL: dict[str, dict] = {
    "lora": {"rank": 4, "lora_dropout": 0.0},
    "dora": {"rank": 4, "lora_dropout": 0.0},
    "corda": {"rank": 4},
    "dare": {"rank": 4, "lora_dropout": 0.0},
    "hydralora": {"n_heads": 2, "rank": 2, "lora_dropout": 0.0},
    "rlora_plus": {"n_heads": 2, "rank": 4, "lora_dropout": 0.0},
    "align_lora": {"rank": 4, "lora_dropout": 0.0},
    "mtlora": {"n_heads": 2, "rank": 2, "groups": 2, "lora_dropout": 0.0},
    "thanora": {"rank": 4, "lora_dropout": 0.0},
}


def _prepared_small(name: str) -> tuple[nn.Module, Method, object]:
    method = get_method(name)
    settings = method.config_cls(**SMALL[name])
    calibration = {"a": [random_batch(1)], "b": [random_batch(2)]}
    model = method.prepare(tiny_llama(), settings, MethodContext(calibration=calibration, progress=False, seed=5))
    return model, method, settings


def test_every_method_has_small_test_settings() -> None:
    assert set(SMALL) == set(METHODS)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_param_count_equals_the_prepared_trainable_count(name: str) -> None:
    """`param_count` is analytic (works on the meta device) and equals what `prepare` creates."""
    model, method, settings = _prepared_small(name)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert method.param_count(tiny_llama(), settings) == real
    with torch.device("meta"):
        meta = type(tiny_llama())(tiny_llama().config)
    assert method.param_count(meta, settings) == real


@pytest.mark.parametrize("name", sorted(METHODS))
def test_save_then_load_on_a_fresh_base_reproduces_the_logits(name: str, tmp_path: Path) -> None:
    """Trained weights (seeded noise on every trainable parameter) survive `save` → `load` on a fresh base model,
    after `finalize` where the method has one; a mergeable method's saved form is a stock PEFT adapter."""
    model, method, settings = _prepared_small(name)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    if method.finalize is not None:
        model = method.finalize(model, settings)
    model.eval()
    method.save(model, tmp_path / "saved")
    loaded = method.load(tiny_llama(), tmp_path / "saved")
    batch = random_batch(3)
    with torch.no_grad():
        expected, got = model(**batch).logits, loaded(**batch).logits
        assert (expected - tiny_llama()(**batch).logits).abs().max() > 1e-4  # the adapter does something
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "saved" / "adapter_config.json").is_file() == method.mergeable
    assert (method.export is None) == (not method.mergeable)
