"""Target selection: every linear layer of the language model, Conv1D orientation, name matching and errors."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

from thanora.core.targets import find_targets, language_model, set_weight_matrix_, weight_matrix

LLAMA_SHAPES = {  # (d_out, d_in): hidden 32, 4 heads of 8, 2 KV heads, intermediate 64
    "self_attn.q_proj": (32, 32),
    "self_attn.k_proj": (16, 32),
    "self_attn.v_proj": (16, 32),
    "self_attn.o_proj": (32, 32),
    "mlp.gate_proj": (64, 32),
    "mlp.up_proj": (64, 32),
    "mlp.down_proj": (32, 64),
}
GPT2_SHAPES = {"attn.c_attn": (96, 32), "attn.c_proj": (32, 32), "mlp.c_fc": (128, 32), "mlp.c_proj": (32, 128)}


def _expected(prefix: str, shapes: dict[str, tuple[int, int]]) -> dict[str, tuple[int, int]]:
    return {f"{prefix}.{layer}.{name}": shape for layer in range(2) for name, shape in shapes.items()}


def test_llama_defaults_are_all_decoder_linears(llama) -> None:
    targets = find_targets(llama)
    expected = _expected("model.layers", LLAMA_SHAPES)
    assert list(targets) == list(expected)  # module order
    for name, target in targets.items():
        assert target.name == name
        assert (target.d_out, target.d_in) == expected[name]
        assert target.fan_in_fan_out is False
        assert tuple(weight_matrix(llama.get_submodule(name)).shape) == expected[name]
    assert "lm_head" not in targets


def test_gpt2_reports_conv1d_transposed(gpt2) -> None:
    targets = find_targets(gpt2)
    expected = _expected("transformer.h", GPT2_SHAPES)
    assert list(targets) == list(expected)
    x = torch.randn(5, 32)
    for name, target in targets.items():
        module = gpt2.get_submodule(name)
        assert isinstance(module, Conv1D)
        assert target.fan_in_fan_out is True
        assert (target.d_out, target.d_in) == expected[name]
        W = weight_matrix(module)  # (d_out, d_in)
        assert tuple(W.shape) == expected[name]
        if target.d_in == 32:  # the module computes x Wᵀ + b with the reported orientation
            torch.testing.assert_close(module(x), x @ W.T + module.bias, rtol=1e-5, atol=1e-6)


def test_set_weight_matrix_roundtrip_on_conv1d(gpt2) -> None:
    module = gpt2.get_submodule("transformer.h.0.mlp.c_fc")
    new = torch.randn(128, 32)
    set_weight_matrix_(module, new)
    assert torch.equal(weight_matrix(module), new)
    assert torch.equal(module.weight, new.T)


def test_llava_selects_only_language_model(llava) -> None:
    targets = find_targets(llava)
    assert list(targets) == list(_expected("model.language_model.layers", LLAMA_SHAPES))
    for name in targets:
        assert name.startswith("model.language_model.")
        assert not any(part in name for part in ("vision_tower", "multi_modal_projector", "lm_head"))
    assert language_model(llava) is llava.get_submodule("model.language_model")


def test_suffix_selection_keeps_module_order(llama) -> None:
    targets = find_targets(llama, ["down_proj", "q_proj"])
    assert list(targets) == [
        "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj",
        "model.layers.1.self_attn.q_proj", "model.layers.1.mlp.down_proj",
    ]


def test_dotted_suffix_and_full_name_selection(llama) -> None:
    assert list(find_targets(llama, ["mlp.up_proj"])) == ["model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]
    assert list(find_targets(llama, ["model.layers.1.self_attn.v_proj"])) == ["model.layers.1.self_attn.v_proj"]
    # overlapping requests are not duplicated
    assert list(find_targets(llama, ["layers.0.mlp.up_proj", "up_proj"])) == [
        "model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"]


@pytest.mark.parametrize("bad", ["qq_proj", "proj", "lm_head", "layers.2.mlp.up_proj"])
def test_unknown_name_raises_listing_valid_suffixes(llama, bad: str) -> None:
    with pytest.raises(ValueError) as info:
        find_targets(llama, ["q_proj", bad])
    message = str(info.value)
    assert repr(bad) in message
    for suffix in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert suffix in message


@pytest.mark.parametrize("bad", ["fc1", "out_proj", "linear_1"])
def test_llava_never_adapts_vision_or_projector(llava, bad: str) -> None:
    with pytest.raises(ValueError, match=bad):
        find_targets(llava, [bad])


def test_model_without_linear_layers_raises() -> None:
    with pytest.raises(ValueError, match=r"no nn\.Linear"):
        find_targets(torch.nn.Sequential(torch.nn.ReLU()))
