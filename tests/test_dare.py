"""DARE: per-task adapters with per-sample masking, drop-and-rescale merge in ΔW space, stock-PEFT export, training."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import nn

from conftest import assert_export_rebuilds_the_adapter, logits, random_batch, run_tiny, tiny_gpt2, tiny_llama
from test_train import calibration_batches, collate_features, config, learnable_llama, synthetic_features
from thanora.core.targets import find_targets
from thanora.methods.base import MethodContext
from thanora.methods.dare import (
    DARE,
    SIDECAR,
    DareSettings,
    adapter_name,
    record_of,
    task_ranks,
)
from thanora.methods.dare_merge import dare_merge, drop_and_rescale, low_rank
from thanora.methods.registry import get_method
from thanora.training.train import make_loader_factory, train

TASKS = ("alpha", "beta")


def calib(tasks: tuple[str, ...] = TASKS) -> dict[str, list[dict[str, torch.Tensor]]]:
    return {t: [random_batch(i)] for i, t in enumerate(tasks)}


def prepared(make_model=tiny_llama, tasks: tuple[str, ...] = TASKS, **settings: Any) -> nn.Module:
    full = DareSettings(**{"rank": 8, "lora_dropout": 0.0, **settings})
    return DARE.prepare(make_model(), full, MethodContext(calibration=calib(tasks), progress=False, seed=1))


def randomise_(model: nn.Module, seed: int = 1) -> None:
    """Non-zero A and B for every task adapter (B starts at zero, which would make every check trivial)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".lora_" in name:
                param.copy_(torch.randn(param.shape, generator=g, dtype=param.dtype) * 0.2)


def with_ids(batch: dict[str, torch.Tensor], ids: list[int]) -> dict[str, torch.Tensor]:
    return {**batch, "task_id": torch.tensor(ids)}


# --- settings ---------------------------------------------------------------------------------------------------

def test_registered_with_documented_defaults() -> None:
    assert get_method("dare") is DARE
    assert DARE.mergeable and DARE.task_id_at_train and not DARE.task_id_at_test and DARE.finalize is not None
    s = DareSettings()
    assert (s.rank, s.alpha, s.lora_dropout, s.density, s.weights, s.svd_rank, s.drop_seed) == (
        64, 64.0, 0.05, 0.5, None, None, 0)
    assert DareSettings(weights=[1, 2]).to_dict()["weights"] == [1.0, 2.0]


@pytest.mark.parametrize(("field", "value"), [
    ("density", 0.0), ("density", 1.5), ("density", True), ("weights", []), ("weights", [1.0, math.nan]),
    ("svd_rank", 0), ("drop_seed", -1), ("rank", 0), ("lora_dropout", 1.0),
])
def test_settings_validation_names_the_field(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"DareSettings.{field} "):
        DareSettings(**{field: value})


def test_rank_budget_is_split_over_the_tasks() -> None:
    assert task_ranks(64, 2) == [32, 32] and task_ranks(7, 3) == [3, 2, 2] and sum(task_ranks(64, 3)) == 64
    with pytest.raises(ValueError, match=r"DareSettings\.rank"):
        task_ranks(2, 3)
    model = prepared(tasks=("a1", "b2", "c3"), rank=7)
    layer = model.base_model.model.get_submodule(next(iter(find_targets(tiny_llama()))))
    assert [layer.r[adapter_name(t)] for t in ("a1", "b2", "c3")] == [3, 2, 2]
    assert all(layer.scaling[adapter_name(t)] == 1.0 for t in ("a1", "b2", "c3"))
    with pytest.raises(ValueError, match=r"DareSettings\.weights has 1 values for 3 tasks"):
        prepared(tasks=("a1", "b2", "c3"), weights=[1.0])


# --- drop and rescale -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_fraction_is_density_and_kept_entries_are_rescaled(density: float) -> None:
    delta = torch.randn(200, 200, generator=torch.Generator().manual_seed(0)) + 3.0  # no exact zeros
    out = drop_and_rescale(delta, density, torch.Generator().manual_seed(1))
    kept = out != 0
    n = delta.numel()
    assert abs(kept.float().mean().item() - density) < 5 * math.sqrt(density * (1 - density) / n)  # 5 σ
    torch.testing.assert_close(out[kept], delta[kept] / density)
    assert drop_and_rescale(delta, 1.0, torch.Generator()) is delta


def test_merge_is_unbiased_over_seeds() -> None:
    """E[Σ w_t·drop(ΔW_t)/p] = Σ w_t·ΔW_t: the mean over many seeds is within 5 σ of it, entry by entry."""
    g = torch.Generator().manual_seed(0)
    deltas = [torch.randn(12, 10, generator=g, dtype=torch.float64) for _ in range(3)]
    weights, density, n = [0.5, 0.3, 0.2], 0.4, 3000
    mean = sum(dare_merge(deltas, weights, density, torch.Generator().manual_seed(s)) for s in range(n)) / n
    expected = sum(w * d for w, d in zip(weights, deltas, strict=True))
    # Var of one draw: Σ w_t² ΔW_t² (1 − p)/p per entry.
    std = torch.sqrt(sum(w**2 * d**2 for w, d in zip(weights, deltas, strict=True)) * (1 - density) / density / n)
    assert bool(((mean - expected).abs() <= 5 * std + 1e-12).all())
    assert not torch.equal(dare_merge(deltas, weights, density, torch.Generator().manual_seed(1)), expected)


def test_low_rank_factors_and_error() -> None:
    g = torch.Generator().manual_seed(0)
    exact = torch.randn(9, 3, generator=g, dtype=torch.float64) @ torch.randn(3, 7, generator=g, dtype=torch.float64)
    A, B, error = low_rank(exact, 3)
    torch.testing.assert_close(B @ A, exact)
    assert A.shape == (3, 7) and B.shape == (9, 3) and error < 1e-7
    full = torch.randn(9, 7, generator=g, dtype=torch.float64)
    A, B, error = low_rank(full, 2)
    assert error == pytest.approx(float((full - B @ A).norm() / full.norm()), rel=1e-9) and 0 < error < 1


# --- per-sample masking -----------------------------------------------------------------------------------------

def test_a_task0_sample_does_not_touch_task1_adapter() -> None:
    model = prepared()
    randomise_(model)
    model.train()
    batch = with_ids(random_batch(3), [0, 0, 0])
    model(**batch, labels=batch["input_ids"]).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads and all(".lora_" in n for n in grads)
    beta = [n for n in grads if f".{adapter_name('beta')}." in n]
    assert beta and all(grads[n] is None for n in beta)  # never computed: the rows of task 1 are none
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if n not in beta)
    # The method's zero term gives the absent adapter a zero gradient (DDP needs one for every parameter).
    reg = DARE.regularizer(model, DareSettings(), batch)  # type: ignore[misc]
    assert float(reg) == 0.0
    reg.backward()
    assert all(grads_now is not None and not grads_now.any()
               for grads_now in (dict(model.named_parameters())[n].grad for n in beta))


def test_task_ids_out_of_range_are_an_error() -> None:
    model = prepared()
    with pytest.raises(RuntimeError, match=r"task_id must be \(batch,\) ids in \[0, 2\)"):
        logits(model, with_ids(random_batch(3), [0, 2, 1]))


def test_each_sample_goes_through_its_own_adapter_only() -> None:
    model = prepared()
    randomise_(model)
    batch = random_batch(4)
    mixed = logits(model, with_ids(batch, [0, 1, 1]))
    only0, only1 = logits(model, with_ids(batch, [0, 0, 0])), logits(model, with_ids(batch, [1, 1, 1]))
    torch.testing.assert_close(mixed[0], only0[0])
    torch.testing.assert_close(mixed[1:], only1[1:])
    assert not torch.allclose(only0, only1, atol=1e-4)
    # Without task ids (evaluation, generate) every sample gets Σ w_t ΔW_t; the ids of a call never leak to the next.
    plain = logits(model, batch)
    assert not torch.allclose(plain, only0, atol=1e-4) and not torch.allclose(plain, only1, atol=1e-4)
    torch.testing.assert_close(logits(model, batch), plain)
    with pytest.raises(RuntimeError, match="task_id"):
        logits(model, with_ids(batch, [0, 1]))


# --- finalize and export ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_finalize_export_and_stock_peft_load_give_the_same_logits(make_model, tmp_path: Path) -> None:
    settings = DareSettings(rank=8, lora_dropout=0.0, drop_seed=3)
    model = DARE.prepare(make_model(), settings, MethodContext(calibration=calib(), progress=False))
    randomise_(model)
    assert DARE.finalize is not None and DARE.export is not None
    with pytest.raises(ValueError, match="finalize"):
        DARE.export(model, tmp_path / "early")
    merged = DARE.finalize(model, settings)
    batch = random_batch(5)
    expected = logits(merged, batch)
    assert not torch.allclose(expected, logits(make_model(), batch), atol=1e-4)
    assert not any(p.requires_grad for p in merged.parameters()) and not merged.training
    DARE.export(merged, tmp_path / "adapter")
    files = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", SIDECAR} <= files
    meta = json.loads((tmp_path / "adapter" / SIDECAR).read_text())
    assert meta["density"] == 0.5 and meta["svd_rank"] == 8 and meta["weights"] == {"alpha": 0.5, "beta": 0.5}
    assert 0 < meta["mean_relative_frobenius_error"] < 1  # the dropped ΔW is full-rank: truncation loses some
    loaded = PeftModel.from_pretrained(make_model(), str(tmp_path / "adapter")).eval()
    torch.testing.assert_close(logits(loaded, batch), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(DARE.load(make_model(), tmp_path / "adapter"), batch), expected,
                               rtol=1e-5, atol=1e-5)
    assert DARE.describe is not None and DARE.describe(merged)["dare.json"] == meta


def test_merged_rank_is_capped_per_module() -> None:
    model = prepared(rank=8, svd_rank=24)  # k/v_proj: d_out = 16 < 24
    randomise_(model)
    merged = DARE.finalize(model, DareSettings(rank=8, svd_rank=24))  # type: ignore[misc]
    ranks = record_of(merged).merge["merged_ranks"]
    targets = find_targets(tiny_llama())
    assert ranks == {n: min(24, t.d_in, t.d_out) for n, t in targets.items()}
    assert merged.peft_config["default"].rank_pattern == {}  # one rank for serving engines: narrower modules
    for name, layer_rank in ranks.items():  # get zero rows / columns beyond their own rank
        layer = merged.base_model.model.get_submodule(name)
        A, B = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert A.shape[0] == B.shape[1] == 24
        assert not A[layer_rank:].any() and not B[:, layer_rank:].any()


def test_density_one_merge_is_the_weighted_sum_exactly() -> None:
    """p = 1 and svd_rank = Σ r_t: no drop, exact SVD, so the merged model = the task-id-free forward Σ w_t ΔW_t."""
    settings = DareSettings(rank=8, lora_dropout=0.0, density=1.0, weights=[0.7, 0.3])
    model = DARE.prepare(tiny_llama(dtype=torch.float64), settings, MethodContext(calibration=calib()))
    randomise_(model)
    batch = random_batch(6)
    expected = logits(model, batch)
    merged = DARE.finalize(model, settings)  # type: ignore[misc]
    torch.testing.assert_close(logits(merged, batch), expected, rtol=1e-9, atol=1e-9)
    assert record_of(merged).merge["max_relative_frobenius_error"] < 1e-12


def test_agrees_with_peft_dare_linear_svd_at_density_one() -> None:
    """PEFT's ΔW-space DARE (dare_linear_svd) and ours coincide when no entry is dropped (its masks use global RNG)."""
    settings = DareSettings(rank=8, lora_dropout=0.0, density=1.0, weights=[0.6, 0.4])
    ours, theirs = prepared(), prepared()
    randomise_(ours)
    randomise_(theirs)
    with pytest.warns(UserWarning, match="density"):
        theirs.add_weighted_adapter([adapter_name(t) for t in TASKS], [0.6, 0.4], "peft_merge",
                                    combination_type="dare_linear_svd", svd_rank=8, density=1.0)
    merged = DARE.finalize(ours, settings)  # type: ignore[misc]
    for name in find_targets(tiny_llama()):
        mine = merged.base_model.model.get_submodule(name).get_delta_weight("default")
        peft_delta = theirs.base_model.model.get_submodule(name).get_delta_weight("peft_merge")
        torch.testing.assert_close(mine, peft_delta, rtol=1e-4, atol=1e-5)


def test_drop_seed_decides_the_masks_and_the_global_rng_is_untouched() -> None:
    def merged_delta(seed: int) -> torch.Tensor:
        model = prepared()
        randomise_(model)
        state = torch.get_rng_state()
        merged = DARE.finalize(model, DareSettings(rank=8, drop_seed=seed))  # type: ignore[misc]
        assert torch.equal(torch.get_rng_state(), state)
        name = next(iter(find_targets(tiny_llama())))
        return merged.base_model.model.get_submodule(name).get_delta_weight("default")

    torch.testing.assert_close(merged_delta(0), merged_delta(0), rtol=0, atol=0)
    assert not torch.allclose(merged_delta(0), merged_delta(1))


def test_prepare_is_seeded_and_leaves_the_global_rng_alone() -> None:
    bases = [tiny_llama(), tiny_llama()]
    state = torch.get_rng_state()
    a, b = (DARE.prepare(m, DareSettings(rank=8), MethodContext(calibration=calib(), seed=2)) for m in bases)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, p), (_, q) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(p, q), name
    with pytest.raises(ValueError, match="task names"):
        DARE.prepare(tiny_llama(), DareSettings(rank=8), MethodContext())


def test_param_count_is_the_real_count_and_works_on_meta() -> None:
    settings = DareSettings(rank=8)
    model = prepared(**{"rank": 8})
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    with torch.device("meta"):
        meta = tiny_llama()
    assert DARE.param_count(meta, settings) == real == get_method("lora").param_count(meta, settings)


# --- training ---------------------------------------------------------------------------------------------------

def test_training_lowers_the_loss_and_the_merge_keeps_what_was_learned(tmp_path: Path) -> None:
    data = synthetic_features(64)
    settings = DareSettings(rank=8, lora_dropout=0.0, density=0.9)
    ctx = MethodContext(calibration=calibration_batches(data), progress=False, seed=0)
    model = DARE.prepare(learnable_llama(), settings, ctx)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    cfg = config(max_steps=16, batch_size=8, grad_accum=1, lr=2e-2, schedule="constant", log_every=2)
    result = train(model, DARE, settings, make_loader_factory(data, 8, collate_features, seed=0), cfg,
                   out_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in result.history]
    assert losses[-1] < 0.5 * losses[0], losses
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert all(any(f".{adapter_name(t)}." in n for n in changed) for t in TASKS)
    merged = DARE.finalize(model, settings)  # type: ignore[misc]
    eval_batch = collate_features(data[:16])
    eval_batch.pop("task_id")
    with torch.no_grad():
        merged_loss = float(merged(**eval_batch).loss)
        base_loss = float(learnable_llama()(**eval_batch).loss)
    assert merged_loss < base_loss


# --- the pipeline -----------------------------------------------------------------------------------------------

def test_cli_run_evaluates_and_exports_the_merged_adapter_and_export_rebuilds_it(tmp_path: Path) -> None:
    """`thanora run` trains with task ids, finalizes (merge), evaluates and exports; `thanora export` rebuilds the
    same merged adapter from the checkpoint (same drop masks: drop_seed is a setting)."""
    out = run_tiny(tmp_path, {"name": "dare", "rank": 4, "drop_seed": 7})
    for name in ("dare/dare.json", "dare/adapter/adapter_config.json", f"dare/adapter/{SIDECAR}",
                 "dare/merged/config.json"):
        assert (out / name).is_file(), name
    description = json.loads((out / "dare" / "dare.json").read_text())
    assert description["drop_seed"] == 7
    assert set(description["relative_frobenius_error"]) == set(description["merged_ranks"])
    assert_export_rebuilds_the_adapter(out, "dare")


def test_any_identifier_task_name_is_a_clean_adapter_name(recwarn: pytest.WarningsRecorder) -> None:
    """Task names that equal PEFT's "default" or are substrings of its "lora_" prefix need no special case."""
    model = prepared(tasks=("default", "a"))
    assert sorted(model.peft_config) == [adapter_name("a"), adapter_name("default")]
    assert not [w for w in recwarn if "adapter name" in str(w.message).lower() or "lora_" in str(w.message)]
