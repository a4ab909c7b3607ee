"""CorDA (IPM) on the pooled covariance: init vs an independent oracle and PEFT's own path, export, count, cache."""

from __future__ import annotations

import dataclasses
import sys
import types
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from conftest import logits, perturb_, random_batch, tiny_gpt2, tiny_llama
from thanora.adapters.record import adapter_of, lora_factors, lora_layer
from thanora.core.targets import find_targets, weight_matrix
from thanora.methods.base import MethodContext
from thanora.methods.corda import CORDA, CordaSettings
from thanora.methods.registry import get_method

F64 = torch.float64
R = 4


def calibration() -> dict[str, list[dict[str, torch.Tensor]]]:
    """Two tasks, padded batches of different sizes (the pooled statistics must weigh tokens, not batches)."""
    return {"alpha": [random_batch(1, batch=4), random_batch(2, batch=2)], "beta": [random_batch(3, batch=3)]}


def pooled_moments(model: nn.Module, calib) -> dict[str, torch.Tensor]:
    """Oracle: Σ x xᵀ / n over the non-padding tokens of every batch of every task, per target, in float64."""
    targets = find_targets(model)
    sums = {name: torch.zeros(t.d_in, t.d_in, dtype=F64) for name, t in targets.items()}
    counts = dict.fromkeys(targets, 0)
    mask: list[torch.Tensor] = []

    def hook_for(name: str):
        def hook(_module: nn.Module, args: tuple) -> None:
            rows = args[0][mask[0].bool()].double()  # (N, d_in)
            sums[name] += rows.T @ rows
            counts[name] += rows.shape[0]
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in targets]
    with torch.no_grad():
        for batches in calib.values():
            for batch in batches:
                mask[:] = [batch["attention_mask"]]
                model(**batch)
    for handle in handles:
        handle.remove()
    return {name: sums[name] / counts[name] for name in targets}


def test_registered_and_settings_validation_names_the_field() -> None:
    assert get_method("corda") is CORDA and CORDA.mergeable and not CORDA.task_id_at_train
    assert CordaSettings().rank == 64 and CordaSettings().lora_dropout == 0.0
    for field, value in [("rank", 1), ("damping", 0.0), ("svd", "fast"), ("lora_dropout", 1.0),
                         ("target_modules", [])]:
        with pytest.raises(ValueError, match=f"CordaSettings.{field} "):
            CordaSettings(**{field: value})
    assert CordaSettings(target_modules=["q_proj"]).target_modules == ("q_proj",)
    config = CordaSettings(rank=8).thanora_config()
    assert (config.gamma, config.residual, config.spr_lambda) == (1.0, True, 0.0)


@pytest.mark.parametrize("make_model", [lambda: tiny_llama(dtype=F64), tiny_gpt2], ids=["llama", "gpt2"])
def test_init_equals_direct_computation_on_the_pooled_covariance(make_model) -> None:
    """s·B·A = top-r of U S V̂ᵀ, U S Vᵀ = svd(W C_d), V̂ᵀ = Vᵀ C_d⁻¹, C = the pooled mixture; W_res + s·B·A = W."""
    base = make_model().double()
    calib = calibration()
    moments = pooled_moments(base, calib)
    settings = CordaSettings(rank=R, lora_alpha=2.0 * R, stats_dtype="float64")
    model = CORDA.prepare(make_model().double(), settings, MethodContext(calibration=calib, progress=False))
    s = adapter_of(model).config.scaling
    assert s == 2.0
    for name in find_targets(base):
        W = weight_matrix(base.get_submodule(name)).detach().double()  # (d_out, d_in)
        C = moments[name]
        C_d = C + 0.01 * torch.diagonal(C).mean() * torch.eye(C.shape[0], dtype=F64)
        U, S, Vt = torch.linalg.svd(W @ C_d, full_matrices=False)
        want = U[:, :R] @ torch.diag(S[:R]) @ (Vt[:R] @ torch.linalg.inv(C_d))
        A, B = (t.detach().double() for t in lora_factors(model, name))
        got = s * B @ A
        assert float((got - want).norm() / want.norm()) < 1e-6, name
        W_res = weight_matrix(lora_layer(model, name).base_layer).detach().double()
        torch.testing.assert_close(W_res + got, W, rtol=0, atol=1e-10)
    batch = random_batch(9)
    torch.testing.assert_close(logits(model, batch), logits(base, batch), rtol=1e-7, atol=1e-7)


def _peft_corda():
    """``peft.tuners.lora.corda`` (peft 0.21.2 imports the undeclared ``attr`` for one record: a stand-in if absent)."""
    try:
        import attr  # noqa: F401
    except ModuleNotFoundError:
        shim = types.ModuleType("attr")
        shim.dataclass = dataclasses.dataclass  # type: ignore[attr-defined]
        sys.modules["attr"] = shim
    from peft.tuners.lora import corda

    return corda


def test_matches_peft_preprocess_corda_where_its_assumptions_hold(monkeypatch: pytest.MonkeyPatch) -> None:
    """One unpadded sample of batch size 1: PEFT's per-call statistics are then a multiple of ours (same SVD)."""
    monkeypatch.setitem(sys.modules, "attr", sys.modules.get("attr"))  # undo the stand-in after the test
    corda = _peft_corda()
    from peft.tuners.lora.config import CordaConfig

    g = torch.Generator().manual_seed(5)
    sample = {"input_ids": torch.randint(3, 128, (1, 48), generator=g)}
    sample["attention_mask"] = torch.ones_like(sample["input_ids"])
    ours = CORDA.prepare(tiny_llama(), CordaSettings(rank=R), MethodContext(calibration={"only": [sample]},
                                                                            progress=False))
    theirs_base = tiny_llama()
    config = LoraConfig(r=R, lora_alpha=R, target_modules=list(find_targets(theirs_base)), lora_dropout=0.0,
                        init_lora_weights="corda", corda_config=CordaConfig(corda_method="ipm"))
    corda.preprocess_corda(theirs_base, config, run_model=lambda: theirs_base(**sample))
    theirs = get_peft_model(theirs_base, config)
    for name in find_targets(tiny_llama()):
        A, B = (t.detach().double() for t in lora_factors(ours, name))
        layer = theirs.base_model.model.get_submodule(name)
        want = layer.lora_B["default"].weight.detach().double() @ layer.lora_A["default"].weight.detach().double()
        assert float((B @ A - want).norm() / want.norm()) < 1e-3, name
        ours_res = lora_layer(ours, name).base_layer.weight.detach()
        torch.testing.assert_close(ours_res, layer.base_layer.weight.detach(), rtol=0, atol=2e-4)


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_export_loads_with_stock_peft_on_the_original_base(make_model, tmp_path: Path) -> None:
    model = CORDA.prepare(make_model(), CordaSettings(rank=R), MethodContext(calibration=calibration(),
                                                                           progress=False))
    perturb_(model, seed=4)  # "trained"
    batch = random_batch(0)
    expected = logits(model, batch)
    assert not torch.allclose(expected, logits(make_model(), batch), atol=1e-4)
    assert CORDA.export is not None
    CORDA.export(model, tmp_path / "adapter")
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(logits(CORDA.load(make_model(), tmp_path / "adapter"), batch), expected,
                               rtol=1e-4, atol=1e-4)


def test_param_count_is_the_real_count_and_works_on_meta() -> None:
    settings = CordaSettings(rank=R)
    model = CORDA.prepare(tiny_llama(), settings, MethodContext(calibration=calibration(), progress=False))
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert all(".lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    with torch.device("meta"):
        meta = tiny_llama()
    assert CORDA.param_count(meta, settings) == real == CORDA.param_count(tiny_llama(), settings)


class Untouchable:
    def __iter__(self):
        raise AssertionError("calibration batches were iterated: the spectra cache was not used")


def test_pooled_spectra_are_cached_and_reused(tmp_path: Path) -> None:
    calib = calibration()
    first = CORDA.prepare(tiny_llama(), CordaSettings(rank=R), MethodContext(calibration=calib, cache_dir=tmp_path,
                                                                            calibration_key="k", progress=False))
    assert [p.name for p in tmp_path.iterdir()] == ["spectra-alpha+beta.safetensors"]
    again = CORDA.prepare(tiny_llama(), CordaSettings(rank=R - 1, lora_alpha=6.0),  # s = 2, one triplet fewer
                          MethodContext(calibration={t: Untouchable() for t in calib}, cache_dir=tmp_path,
                                        calibration_key="k", progress=False))
    for name in find_targets(tiny_llama()):
        A1, B1 = (t.detach() for t in lora_factors(first, name))
        A2, B2 = (t.detach() for t in lora_factors(again, name))
        torch.testing.assert_close(2.0 * B2 @ A2, B1[:, : R - 1] @ A1[: R - 1], rtol=1e-4, atol=1e-5)
    with pytest.raises(AssertionError, match="cache was not used"):  # other data (key): recomputed
        CORDA.prepare(tiny_llama(), CordaSettings(rank=R), MethodContext(
            calibration={t: Untouchable() for t in calib}, cache_dir=tmp_path, calibration_key="other",
            progress=False))


def test_prepare_is_deterministic_and_leaves_the_global_rng_alone() -> None:
    bases = [tiny_llama(), tiny_llama()]
    state = torch.get_rng_state()
    settings = CordaSettings(rank=R, svd="randomized")
    a, b = (CORDA.prepare(m, settings, MethodContext(calibration=calibration(), progress=False)) for m in bases)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name


def test_needs_calibration() -> None:
    with pytest.raises(ValueError, match="calibration"):
        CORDA.prepare(tiny_llama(), CordaSettings(rank=R), MethodContext())


def test_cli_run_and_export_reuse_the_pooled_spectra(tmp_path: Path) -> None:
    from conftest import assert_export_rebuilds_the_adapter, run_tiny

    out = run_tiny(tmp_path, {"name": "corda", "rank": 4})
    assert (out / "cache" / "spectra-colors+animals.safetensors").is_file()
    for name in ("corda/adapter/adapter_config.json", "corda/adapter/thanora_adapter.json", "corda/merged/config.json"):
        assert (out / name).is_file(), name
    assert_export_rebuilds_the_adapter(out, "corda")
