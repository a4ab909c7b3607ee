"""prepare_model on tiny models: init logits, HASI identities against an independent oracle, cache, errors."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

import thanora
from conftest import llava_batch, random_batch, tiny_gpt2, tiny_llama, tiny_llava
from thanora.adapters.record import lora_factors, lora_layer
from thanora.core.allocation import COOP, RankBudgetError
from thanora.core.covariance import collect_covariances
from thanora.core.spectra import load_spectra
from thanora.core.targets import find_targets, weight_matrix
from thanora.methods.thanora import task_spectra

F64 = torch.float64
R = 8


def calibration(batch_fn=random_batch, n_tasks: int = 2) -> dict[str, list[dict[str, torch.Tensor]]]:
    return {f"task{i}": [batch_fn(10 * i), batch_fn(10 * i + 1)] for i in range(n_tasks)}


def logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def oracle_products(model: nn.Module, calib, cfg: thanora.ThanoraConfig) -> dict[str, dict[str, tuple]]:
    """{task: {module: (U, S, V̂ᵀ)}} from the fitter's float64 statistics and an independent damped SVD."""
    targets = find_targets(model, cfg.target_modules)
    out: dict[str, dict[str, tuple]] = {}
    for task, batches in calib.items():
        stats = collect_covariances(model, targets, task, batches, dtype=F64, progress=False)
        out[task] = {}
        for name in targets:
            W = weight_matrix(model.get_submodule(name)).detach().double()  # (d_out, d_in)
            C = stats.of(name)
            C_d = C + cfg.damping * torch.diagonal(C).mean() * torch.eye(C.shape[0], dtype=F64)
            U, S, Vt = torch.linalg.svd(W @ C_d, full_matrices=False)
            Vh = torch.linalg.solve(C_d, Vt.T).T  # Vᵀ C_d⁻¹ (C_d symmetric)
            out[task][name] = (U, S, Vh)
    return out


def top(triplet: tuple, r: int) -> torch.Tensor:
    U, S, Vh = triplet
    return U[:, :r] @ torch.diag(S[:r]) @ Vh[:r]


def assert_hasi_blocks(model: nn.Module, oracle, gamma_product: float, rtol: float = 1e-4) -> None:
    """s·B_t·A_t = γ_eff·(top-r_t of U_t S_t V̂_tᵀ) for every task block, and s·B·A is their sum."""
    adapter = thanora.adapter_of(model)
    s = adapter.config.scaling
    for name in adapter.targets:
        A, B = (t.detach().double() for t in lora_factors(model, name))
        total = torch.zeros(B.shape[0], A.shape[1], dtype=F64)
        for task in adapter.plan.tasks:
            a, b = adapter.blocks[name][task]
            assert b - a == adapter.plan.rank(task, name)
            want = gamma_product * top(oracle[task][name], b - a)
            got = s * B[:, a:b] @ A[a:b]
            assert float((got - want).norm() / want.norm()) < rtol, (name, task)
            total += want
        full = s * B @ A
        assert float((full - total).norm() / total.norm()) < rtol, name


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_init_logits_equal_base_llama(dtype: torch.dtype) -> None:
    model = tiny_llama(dtype=dtype)
    batch = random_batch(99)
    base = logits(model, batch)
    prepared = thanora.prepare_model(model, calibration(), thanora.ThanoraConfig(rank=R), progress=False)
    atol = 1e-4 if dtype == torch.float32 else 1e-10
    torch.testing.assert_close(logits(prepared, batch), base, rtol=0, atol=atol)
    # the residual base is what makes them equal: the adapter alone moves the logits (PEFT's own disable_adapter,
    # which the prepared model refuses to users: it would run W_res alone)
    from peft import PeftModel

    with PeftModel.disable_adapter(prepared):
        assert float((logits(prepared, batch) - base).abs().max()) > 1e3 * atol


def test_init_logits_equal_base_gpt2() -> None:
    model = tiny_gpt2()
    batch = random_batch(99)
    base = logits(model, batch)
    prepared = thanora.prepare_model(model, calibration(), thanora.ThanoraConfig(rank=R), progress=False)
    torch.testing.assert_close(logits(prepared, batch), base, rtol=0, atol=1e-4)


def test_init_logits_equal_base_llava() -> None:
    model = tiny_llava()
    batch = llava_batch(99)
    base = logits(model, batch)
    prepared = thanora.prepare_model(model, calibration(llava_batch), thanora.ThanoraConfig(rank=R), progress=False)
    torch.testing.assert_close(logits(prepared, batch), base, rtol=0, atol=1e-4)
    adapted = set(thanora.adapter_of(prepared).targets)
    assert adapted and all(n.startswith("model.language_model.") for n in adapted)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2])
def test_blocks_match_independent_decomposition(builder) -> None:
    cfg = thanora.ThanoraConfig(rank=R, stats_dtype="float64", gamma=5.0)
    calib = calibration(n_tasks=3)
    oracle = oracle_products(builder(), calib, cfg)
    original = {n: weight_matrix(m).detach().clone()
                for n, m in builder().named_modules() if n in oracle["task0"]}
    model = thanora.prepare_model(builder(), calib, cfg, progress=False)
    assert_hasi_blocks(model, oracle, gamma_product=5.0)
    adapter = thanora.adapter_of(model)
    for name in adapter.targets:  # W_res = W − s·B·A
        A, B = (t.detach() for t in lora_factors(model, name))
        W_res = weight_matrix(lora_layer(model, name).base_layer).detach()
        torch.testing.assert_close(W_res + adapter.config.scaling * B @ A, original[name], rtol=0, atol=1e-5)


def test_product_independent_of_lora_alpha() -> None:
    calib = calibration()
    m1 = thanora.prepare_model(tiny_llama(), calib, thanora.ThanoraConfig(rank=R), progress=False)
    m2 = thanora.prepare_model(tiny_llama(), calib, thanora.ThanoraConfig(rank=R, lora_alpha=2.0), progress=False)
    for name in thanora.adapter_of(m1).targets:
        A1, B1 = lora_factors(m1, name)
        A2, B2 = lora_factors(m2, name)
        torch.testing.assert_close(2.0 / R * B2 @ A2, 1.0 * B1 @ A1, rtol=1e-4, atol=1e-5)
        assert not torch.allclose(B1, B2)  # the raw factors do change with alpha
        torch.testing.assert_close(weight_matrix(lora_layer(m2, name).base_layer),
                                   weight_matrix(lora_layer(m1, name).base_layer), rtol=1e-5, atol=1e-5)


def test_gamma_per_factor_squares_the_product() -> None:
    cfg = thanora.ThanoraConfig(rank=R, stats_dtype="float64", gamma=3.0, gamma_mode="per_factor")
    calib = calibration()
    oracle = oracle_products(tiny_llama(), calib, cfg)
    model = thanora.prepare_model(tiny_llama(), calib, cfg, progress=False)
    assert_hasi_blocks(model, oracle, gamma_product=9.0)


def test_coop_block_and_block_table() -> None:
    calib = calibration(n_tasks=3)
    m1 = thanora.prepare_model(tiny_llama(), calib, thanora.ThanoraConfig(rank=R, seed=1), progress=False)
    m2 = thanora.prepare_model(tiny_llama(), calib, thanora.ThanoraConfig(rank=R, seed=1), progress=False)
    m3 = thanora.prepare_model(tiny_llama(), calib, thanora.ThanoraConfig(rank=R, seed=2), progress=False)
    adapter = thanora.adapter_of(m1)
    for name in adapter.targets:
        table = adapter.blocks[name]
        assert list(table) == [*adapter.plan.tasks, COOP]
        spans = list(table.values())
        assert spans[0][0] == 0 and spans[-1][1] == R
        assert all(p[1] == n[0] for p, n in itertools.pairwise(spans))
        start, stop = table[COOP]
        (A1, B1), (A2, _), (A3, _) = (lora_factors(m, name) for m in (m1, m2, m3))
        assert stop > start and torch.count_nonzero(B1[:, start:]) == 0
        assert torch.equal(A1[start:], A2[start:]) and not torch.equal(A1[start:], A3[start:])


def test_residual_false_leaves_base_untouched() -> None:
    original = tiny_llama().state_dict()
    model = thanora.prepare_model(tiny_llama(), calibration(), thanora.ThanoraConfig(rank=R, residual=False),
                                  progress=False)
    adapter = thanora.adapter_of(model)
    assert adapter.initial == {}
    for name in adapter.targets:
        assert torch.equal(lora_layer(model, name).base_layer.weight, original[f"{name}.weight"])
    batch = random_batch(99)
    base = logits(tiny_llama(), batch)
    assert float((logits(model, batch) - base).abs().max()) > 1e-2  # no residual: the adapter shifts the output


class Untouchable:
    """Calibration batches that must not be read."""

    def __iter__(self):
        raise AssertionError("calibration batches were iterated: the spectra cache was not used")


def _count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_cache_reuses_spectra_without_forward(tmp_path: Path) -> None:
    calib = calibration()
    cfg1 = thanora.ThanoraConfig(rank=R, tau=0.2)
    m1 = thanora.prepare_model(tiny_llama(), calib, cfg1, cache_dir=tmp_path, progress=False)
    assert {p.name for p in tmp_path.iterdir()} == {"spectra-task0.safetensors", "spectra-task1.safetensors"}

    fresh = tiny_llama()
    calls = _count_forwards(fresh)
    cfg2 = thanora.ThanoraConfig(rank=R, tau=0.05, r_min=2)
    m2 = thanora.prepare_model(fresh, {t: Untouchable() for t in calib}, cfg2, cache_dir=tmp_path, progress=False)
    assert calls[0] == 0
    plan1, plan2 = thanora.adapter_of(m1).plan, thanora.adapter_of(m2).plan
    for name, p in plan1.modules.items():
        assert p.entropies == plan2.modules[name].entropies  # same spectra
    assert plan1.modules != plan2.modules  # but a different split
    cached, _ = load_spectra(tmp_path / "spectra-task0.safetensors")
    again = task_spectra(tiny_llama(), find_targets(tiny_llama()), "task0", Untouchable(), cfg2, cache_dir=tmp_path)
    for name, s in cached.items():
        assert torch.equal(again[name].U, s.U) and torch.equal(again[name].S, s.S)
        assert torch.equal(again[name].Vh, s.Vh)
    oracle = oracle_products(tiny_llama(), calib, cfg2)
    assert_hasi_blocks(m2, oracle, gamma_product=cfg2.gamma, rtol=1e-3)  # float32 stats in the cache


def test_cache_is_invalidated_by_other_weights_or_data(tmp_path: Path) -> None:
    cfg = thanora.ThanoraConfig(rank=R)
    thanora.prepare_model(tiny_llama(), calibration(), cfg, cache_dir=tmp_path, progress=False)
    untouchable = {"task0": Untouchable(), "task1": Untouchable()}
    with pytest.raises(AssertionError, match="cache was not used"):
        thanora.prepare_model(tiny_llama(seed=1), untouchable, cfg, cache_dir=tmp_path, progress=False)
    with pytest.raises(AssertionError, match="cache was not used"):
        thanora.prepare_model(tiny_llama(), untouchable, cfg, cache_dir=tmp_path, calibration_key="other split",
                              progress=False)
    with pytest.raises(AssertionError, match="cache was not used"):
        thanora.prepare_model(tiny_llama(), untouchable, thanora.ThanoraConfig(rank=R, stats_dtype="float64"),
                              cache_dir=tmp_path, progress=False)


@pytest.mark.parametrize(
    ("calib", "cfg", "error", "pattern"),
    [
        ({"a": [random_batch(0)]}, thanora.ThanoraConfig(rank=R, target_modules=("qkv_proj",)), ValueError,
         "'qkv_proj'"),
        ({"a": [random_batch(0)], "b": []}, thanora.ThanoraConfig(rank=R), ValueError, "task 'b'"),
        ({"a": [random_batch(0)], "my-task": [random_batch(1)]}, thanora.ThanoraConfig(rank=R), ValueError,
         "'my-task' must be an identifier"),
        ({}, thanora.ThanoraConfig(rank=R), ValueError, "at least one task"),
        ({t: [random_batch(i)] for i, t in enumerate("abc")}, thanora.ThanoraConfig(rank=2), RankBudgetError,
         "at least 3"),
        ({"a": [random_batch(0)]}, thanora.ThanoraConfig(rank=20), ValueError,
         r"rank=20 exceeds min\(d_in, d_out\)=16"),
    ],
    ids=["unknown-module", "empty-task", "bad-task-name", "no-task", "budget", "rank-too-large"],
)
def test_bad_inputs_raise_naming_the_problem(calib, cfg, error, pattern) -> None:
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=pattern):
        thanora.prepare_model(model, calib, cfg, progress=False)
    assert not any("lora" in n for n, _ in model.named_modules())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_prepared_model_trains_only_lora_and_keeps_mode() -> None:
    model = tiny_llama()
    prepared = thanora.prepare_model(model, calibration(), thanora.ThanoraConfig(rank=R), progress=False)
    assert not prepared.training  # the caller's eval mode is kept
    trainable = {n for n, p in prepared.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(trainable) == 2 * len(thanora.adapter_of(prepared).targets)


def test_bounded_calibration_gives_the_same_spectra_within_its_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A budget of two modules' covariances: several passes, each stopped after its group, at most the budget held
    at once, and the spectra of the one-pass collection (bit for bit: the same sums in the same order)."""
    from thanora.core import covariance

    model = tiny_llama()
    targets = find_targets(model)
    batches = calibration()["task0"]
    budget_gb = 64 * 64 * 4 / 2**30  # the widest input (down_proj's 64) in float32: every other group holds several
    groups = covariance.covariance_groups(targets, int(budget_gb * 2**30), torch.float32)
    assert len(groups) >= 4 and sum(len(g) for g in groups) == len(targets)
    peaks: list[int] = []
    calls: list[int] = []
    original = covariance.CovarianceFitter.result

    def spy(self):  # the fitter's peak, and how many decoder layers each pass ran
        peaks.append(self.peak_bytes)
        return original(self)

    monkeypatch.setattr(covariance.CovarianceFitter, "result", spy)
    last_layer = model.model.layers[-1]
    last_layer.register_forward_pre_hook(lambda *_: calls.append(1))
    full = task_spectra(model, targets, "t", batches, thanora.ThanoraConfig(rank=R), progress=False)
    one_pass_calls = len(calls)
    bounded = task_spectra(model, targets, "t", batches,
                           thanora.ThanoraConfig(rank=R, calibration_memory_gb=budget_gb), progress=False)
    assert len(peaks) == 1 + len(groups) and max(peaks[1:]) <= budget_gb * 2**30 < peaks[0]
    # the early stop: passes of the groups before the last layer do not reach it
    assert len(calls) - one_pass_calls < len(groups) * len(batches)
    for name, spectrum in full.items():
        for a, b in ((spectrum.U, bounded[name].U), (spectrum.S, bounded[name].S), (spectrum.Vh, bounded[name].Vh)):
            assert torch.equal(a, b), name


def test_calibration_batches_may_stay_on_the_cpu() -> None:
    """The fitter moves each batch to the model's device itself (meta here: a wrong-device batch would fail)."""
    from thanora.core.covariance import CovarianceFitter

    model = tiny_llama()
    fitter = CovarianceFitter(model, find_targets(model), "t", torch.float32)
    fitter.update({k: v.clone() for k, v in random_batch(0).items()})
    assert fitter.result().moments
