"""The residual base, closed for good: every path that would hand out W_res as the original model refuses, and the
``branch`` mode keeps the original weights in the model (exact init in low precision, same export and merge)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import thanora
from conftest import logits, perturb_, random_batch, tiny_llama
from thanora.adapters.guard import ResidualBaseError
from thanora.experiment.models import resolve_dtype

CALIBRATION = {f"t{i}": [random_batch(i), random_batch(i + 10)] for i in range(2)}


def prepared(mode: str = "rewrite", dtype: torch.dtype = torch.float32, **settings: object) -> torch.nn.Module:
    cfg = thanora.ThanoraConfig(rank=8, lora_alpha=16.0, residual_mode=mode, **settings)  # type: ignore[arg-type]
    return thanora.prepare_model(tiny_llama(dtype=dtype), CALIBRATION, cfg, progress=False)


def test_every_path_to_the_residual_base_refuses(tmp_path: Path) -> None:
    model = prepared()
    with pytest.raises(ResidualBaseError, match="disable_adapter"), model.disable_adapter():
        pytest.fail("must not run")
    with pytest.raises(ResidualBaseError, match="unload"):
        model.unload()
    for inner in (model.get_base_model(), model.base_model.model):
        with pytest.raises(ResidualBaseError, match="save_pretrained"):
            inner.save_pretrained(tmp_path / "base")
    assert not (tmp_path / "base").exists()
    assert type(model.get_base_model()).__name__ == "LlamaForCausalLM"  # config.architectures stays loadable
    out = thanora.save_merged(model, tmp_path / "merged")  # the one way to a model folder: merged weights
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert loaded.config.architectures == ["LlamaForCausalLM"]
    torch.testing.assert_close(logits(loaded, random_batch(3)), logits(model, random_batch(3)), rtol=0, atol=1e-4)


def test_branch_mode_keeps_the_original_model_inside() -> None:
    model = prepared("branch")
    perturb_(model, seed=0)
    batch = random_batch(4)
    with model.disable_adapter():  # both adapters off: the untouched base
        torch.testing.assert_close(logits(model, batch), logits(tiny_llama(), batch), rtol=0, atol=0)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".default." in n for n in trainable)  # the residual adapter is frozen


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_branch_mode_makes_the_init_exact_in_low_precision(dtype: torch.dtype) -> None:
    batch = random_batch(5)
    base = logits(tiny_llama(dtype=dtype), batch).float()
    errors = {mode: float((logits(prepared(mode, dtype, gamma=5.0), batch).float() - base).abs().max())
              for mode in ("rewrite", "branch")}
    assert errors["branch"] <= 0.25 * errors["rewrite"] and errors["rewrite"] > 0, errors


def test_a_rewritten_residual_that_overflows_fp16_is_an_error_and_branch_works() -> None:
    # SmolLM2 in fp16 with γ = 5 gives NaN logits with rewrite (benchmarks/results/low_precision.md): there the
    # activations overflow (γ = 1e5 does that to the tiny model), with γ = 1e9 already the rewritten weights
    with pytest.raises(ValueError, match=r"rewrite.*float16 the prepared model outputs NaN.*residual_mode: branch"):
        prepared("rewrite", torch.float16, gamma=1e5)
    with pytest.raises(ValueError, match=r"rewrite.*does not fit the base's torch.float16.*residual_mode: branch"):
        prepared("rewrite", torch.float16, gamma=1e9)
    branch = prepared("branch", torch.float16, gamma=1e9)
    assert bool(torch.isfinite(logits(branch, random_batch(7)).float()).all())


def test_an_inexact_low_precision_init_is_said_once_and_float32_is_silent(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="thanora.adapters.layers"):
        prepared("rewrite", torch.float32, gamma=5.0, lora_dropout=0.0)
        assert not caplog.records
        prepared("rewrite", torch.bfloat16, gamma=5.0, lora_dropout=0.0)  # relative error ~0.05 (low_precision.md)
        prepared("branch", torch.bfloat16, gamma=5.0, lora_dropout=0.0)  # exact: silent
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1 and "bfloat16" in warnings[0] and "residual_mode: branch" in warnings[0], warnings


def test_branch_and_rewrite_export_and_merge_the_same(tmp_path: Path) -> None:
    from safetensors.torch import load_file

    models = {mode: prepared(mode) for mode in ("rewrite", "branch")}
    for model in models.values():  # the same "training" of the trainable factors (the residual branch is frozen)
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for p in (p for n, p in model.named_parameters() if p.requires_grad):
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))
    batch = random_batch(6)
    torch.testing.assert_close(logits(models["branch"], batch), logits(models["rewrite"], batch), rtol=0, atol=1e-5)
    for mode, model in models.items():
        thanora.export_adapter(model, tmp_path / mode)
    a, b = (load_file(str(tmp_path / m / "adapter_model.safetensors")) for m in ("rewrite", "branch"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    merged = {}
    for mode, model in models.items():
        thanora.merge_(model)
        merged[mode] = logits(model, batch)
    torch.testing.assert_close(merged["branch"], merged["rewrite"], rtol=0, atol=1e-5)


def test_auto_dtype_is_float32_off_cuda() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
