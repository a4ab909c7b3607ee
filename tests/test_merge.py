"""Merging a (trained) ThanoRA adapter: merged = unmerged, unmerge restores, idempotent, saved folder reloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import thanora
from conftest import logits, perturb_, random_batch, tiny_gpt2, tiny_llama
from thanora.adapters.record import lora_factors, lora_layer
from thanora.core.targets import weight_matrix

R = 8
BUILDERS = [tiny_llama, tiny_gpt2]


def prepared(builder):
    calib = {f"t{i}": [random_batch(i), random_batch(i + 10)] for i in range(3)}
    model = thanora.prepare_model(builder(), calib, thanora.ThanoraConfig(rank=R, lora_alpha=16), progress=False)
    perturb_(model, seed=0)
    return model


def base_weights(model) -> dict[str, torch.Tensor]:
    return {n: weight_matrix(lora_layer(model, n).base_layer).detach().clone()
            for n in thanora.adapter_of(model).targets}


@pytest.mark.parametrize("builder", BUILDERS)
def test_merged_equals_unmerged_and_unmerge_restores(builder) -> None:
    model = prepared(builder)
    batch = random_batch(42)
    unmerged = logits(model, batch)
    assert float((unmerged - logits(builder(), batch)).abs().max()) > 1e-3  # "training" moved the outputs
    before = base_weights(model)
    assert not thanora.is_merged(model)
    thanora.merge_(model)
    assert thanora.is_merged(model)
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=1e-4)
    assert any(not torch.allclose(w, before[n]) for n, w in base_weights(model).items())
    thanora.unmerge_(model)
    assert not thanora.is_merged(model)
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=1e-5)
    torch.testing.assert_close(logits(model, batch), unmerged, rtol=0, atol=1e-4)


@pytest.mark.parametrize("builder", BUILDERS)
def test_merged_weight_is_original_plus_trained_update(builder) -> None:
    original = {n: weight_matrix(m).detach().clone() for n, m in builder().named_modules() if hasattr(m, "weight")}
    model = prepared(builder)
    adapter = thanora.adapter_of(model)
    s = adapter.config.scaling
    thanora.merge_(model)
    for name, merged in base_weights(model).items():
        A, B = (t.detach() for t in lora_factors(model, name))
        A0, B0 = adapter.initial[name]
        want = original[name] + s * (B @ A - B0 @ A0)  # W + ΔW relative to the original weight
        torch.testing.assert_close(merged, want, rtol=0, atol=1e-5)


def test_merge_twice_changes_nothing() -> None:
    model = prepared(tiny_llama)
    thanora.merge_(model)
    once = base_weights(model)
    thanora.merge_(model)
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, once[name])
    thanora.unmerge_(model)
    unmerged = base_weights(model)
    thanora.unmerge_(model)  # unmerging an unmerged model is a no-op too
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, unmerged[name])


@pytest.mark.parametrize("builder", BUILDERS)
def test_save_merged_reloads_with_transformers(builder, tmp_path: Path) -> None:
    model = prepared(builder)
    batch = random_batch(43)
    expected = logits(model, batch)
    before = base_weights(model)
    out = thanora.save_merged(model, tmp_path / "merged")
    assert not thanora.is_merged(model)  # left as it was
    for name, weight in base_weights(model).items():
        torch.testing.assert_close(weight, before[name], rtol=0, atol=1e-5)
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert not any("lora" in n or "base_layer" in n for n, _ in loaded.named_modules())
    torch.testing.assert_close(logits(loaded.eval(), batch), expected, rtol=0, atol=1e-4)
    assert {p.name for p in tmp_path.iterdir()} == {"merged"}


@pytest.mark.parametrize("builder", BUILDERS)
def test_save_merged_writes_the_weights_of_peft_merge_and_unload(builder, tmp_path: Path) -> None:
    """save_merged's key rewrite (instead of PEFT's destructive merge_and_unload) saves exactly PEFT's weights."""
    import copy

    from safetensors.torch import load_file

    model = prepared(builder)
    want = copy.deepcopy(model).merge_and_unload().state_dict()
    saved = load_file(str(thanora.save_merged(model, tmp_path / "m") / "model.safetensors"))
    assert set(saved) <= set(want) and set(want) - set(saved) <= {"lm_head.weight"}  # tied head saved once
    for key, value in saved.items():
        assert torch.equal(value, want[key]), key


def test_save_merged_of_a_merged_model_keeps_it_merged(tmp_path: Path) -> None:
    model = prepared(tiny_llama)
    thanora.merge_(model)
    merged = base_weights(model)
    thanora.save_merged(model, tmp_path / "m")
    assert thanora.is_merged(model)
    for name, weight in base_weights(model).items():
        assert torch.equal(weight, merged[name])


def test_merge_rejects_non_peft_model() -> None:
    with pytest.raises(TypeError, match="PeftModel"):
        thanora.merge_(tiny_llama())
