"""DoRA through PEFT's ``use_dora``: settings, magnitude init, merge equivalence, stock-PEFT export, parameter count."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from torch import nn

from conftest import logits, perturb_, random_batch, tiny_gpt2, tiny_llama
from thanora.adapters.merge import merge_, unmerge_
from thanora.core.targets import find_targets, weight_matrix
from thanora.methods.base import MethodContext
from thanora.methods.dora import DORA, DoraSettings
from thanora.methods.lora import LoraSettings
from thanora.methods.registry import get_method

MODELS = pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])


def prepared(make_model: Callable[[], nn.Module], **settings) -> nn.Module:
    full = DoraSettings(**{"rank": 4, "lora_dropout": 0.0, **settings})
    return DORA.prepare(make_model(), full, MethodContext(seed=1))


def test_registered_with_lora_defaults() -> None:
    assert get_method("dora") is DORA and DORA.mergeable and not DORA.task_id_at_train
    assert DoraSettings().to_dict() == LoraSettings().to_dict()


@pytest.mark.parametrize(("field", "value"), [("rank", 0), ("lora_alpha", -1.0), ("lora_dropout", 1.0),
                                              ("target_modules", ())])
def test_settings_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"DoraSettings.{field} "):
        DoraSettings(**{field: value})


@MODELS
def test_magnitude_starts_at_the_row_norms_of_w_and_output_at_base(make_model: Callable[[], nn.Module]) -> None:
    base = make_model()
    model = prepared(make_model)
    inner = model.base_model.model
    for name in find_targets(base):
        layer = inner.get_submodule(name)
        norms = weight_matrix(base.get_submodule(name)).detach().norm(dim=1)  # (d_out,): one per output feature
        torch.testing.assert_close(layer.lora_magnitude_vector["default"].weight.detach(), norms)
    batch = random_batch(0)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=1e-5, atol=1e-5)


@MODELS
def test_merged_equals_unmerged(make_model: Callable[[], nn.Module]) -> None:
    model = prepared(make_model)
    perturb_(model, seed=2)  # B ≠ 0 and m ≠ ‖W‖: the DoRA path matters
    batch = random_batch(1)
    unmerged = logits(model, batch)
    assert not torch.allclose(unmerged, logits(make_model(), batch), atol=1e-4)
    merge_(model)
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=1e-4, atol=1e-4)
    unmerge_(model)
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=1e-4, atol=1e-4)


@MODELS
def test_export_loads_with_stock_peft_on_the_original_base(make_model: Callable[[], nn.Module],
                                                           tmp_path: Path) -> None:
    model = prepared(make_model)
    perturb_(model, seed=3)
    batch = random_batch(2)
    expected = logits(model, batch)
    assert DORA.export is not None
    DORA.export(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path / "adapter")).eval()
    assert loaded.peft_config["default"].use_dora
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)
    again = DORA.load(make_model(), tmp_path / "adapter")
    torch.testing.assert_close(logits(again, batch), expected, rtol=1e-5, atol=1e-5)


@MODELS
def test_param_count_is_the_real_count_and_works_on_meta(make_model: Callable[[], nn.Module]) -> None:
    settings = DoraSettings(rank=4)
    model = DORA.prepare(make_model(), settings, MethodContext())
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert DORA.param_count(make_model(), settings) == real
    with torch.device("meta"):
        meta = make_model()
    assert DORA.param_count(meta, settings) == real
    lora = get_method("lora")
    targets = find_targets(make_model())
    assert real == lora.param_count(make_model(), settings) + sum(t.d_out for t in targets.values())


def test_seeded_and_global_rng_untouched() -> None:
    bases = [tiny_llama(), tiny_llama()]
    state = torch.get_rng_state()
    a, b = (DORA.prepare(m, DoraSettings(rank=4), MethodContext(seed=1)) for m in bases)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_cli_run_exports_a_dora_adapter_and_export_rebuilds_it(tmp_path: Path) -> None:
    import json

    from conftest import assert_export_rebuilds_the_adapter, run_tiny

    out = run_tiny(tmp_path, {"name": "dora", "rank": 4})
    assert json.loads((out / "dora" / "adapter" / "adapter_config.json").read_text())["use_dora"] is True
    assert (out / "dora" / "merged" / "config.json").is_file()
    assert_export_rebuilds_the_adapter(out, "dora")
