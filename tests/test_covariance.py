"""Streaming, mask-aware second moments equal the batch formula XᵀX/N (SPEC.md §1)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from conftest import llava_batch, random_batch, tiny_gpt2, tiny_llama, tiny_llava
from thanora.core.covariance import CovarianceFitter, CovarianceStats, collect_covariances
from thanora.core.targets import find_targets

F64 = torch.float64


def reference_moments(model: nn.Module, names: list[str], batches: list[dict[str, torch.Tensor]]
                      ) -> dict[str, torch.Tensor]:
    """Batch formula: record every target's input with a private hook, keep the non-padding rows, XᵀX/N."""
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    mask_holder: list[torch.Tensor] = []

    def recorder(name: str):
        def hook(_module, args):
            x = args[0].detach()
            rows[name].append(x[mask_holder[0]].to(F64))  # (N_b, d_in)
        return hook

    handles = [model.get_submodule(n).register_forward_pre_hook(recorder(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                mask_holder[:] = [batch["attention_mask"].bool()]
                model(**batch)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, chunks in rows.items():
        X = torch.cat(chunks)  # (N, d_in)
        out[name] = X.T @ X / X.shape[0]
    return out


def split_rows(batch: dict[str, torch.Tensor], trim: bool) -> list[dict[str, torch.Tensor]]:
    """One batch per row; ``trim`` drops each row's padding."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        row = {k: v[i : i + 1] for k, v in batch.items()}
        if trim:
            n = int(row["attention_mask"].sum())
            row = {k: v[:, :n] for k, v in row.items()}
        out.append(row)
    return out


def pad_more(batch: dict[str, torch.Tensor], extra: int) -> dict[str, torch.Tensor]:
    zeros = torch.zeros(batch["input_ids"].shape[0], extra, dtype=batch["input_ids"].dtype)
    return {k: torch.cat([v, zeros], dim=1) for k, v in batch.items()}


def assert_stats_close(a: CovarianceStats, b: CovarianceStats, rtol: float) -> None:
    assert a.input_of == b.input_of
    assert a.n_tokens == b.n_tokens
    for key in a.moments:
        err = (a.moments[key] - b.moments[key]).norm() / b.moments[key].norm()
        assert err < rtol, (key, float(err))


def no_hooks_left(model: nn.Module) -> bool:
    return all(
        not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks for m in model.modules()
    ) and not torch.nn.modules.module._global_forward_pre_hooks


@pytest.fixture
def llama64() -> nn.Module:
    return tiny_llama(dtype=F64)


def test_matches_batch_formula_llama(llama64) -> None:
    targets = find_targets(llama64)
    batches = [random_batch(0, batch=4), random_batch(1, batch=3)]
    stats = collect_covariances(llama64, targets, "t", batches, dtype=F64, progress=False)
    ref = reference_moments(llama64, list(targets), batches)
    n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert n_tokens < sum(b["attention_mask"].numel() for b in batches)  # padding is present
    for name in targets:
        assert stats.of(name).dtype == F64
        torch.testing.assert_close(stats.of(name), ref[name], rtol=1e-10, atol=1e-12)
        assert stats.n_tokens[stats.input_of[name]] == n_tokens


def test_first_layer_input_from_the_model_itself(llama64) -> None:
    """Oracle without hooks: layer 0's q/k/v read input_layernorm(embed_tokens(ids))."""
    batch = random_batch(3, batch=4)
    targets = find_targets(llama64, ["layers.0.self_attn.q_proj"])
    stats = collect_covariances(llama64, targets, "t", [batch], dtype=F64, progress=False)
    with torch.no_grad():
        layer = llama64.model.layers[0]
        hidden = layer.input_layernorm(llama64.model.embed_tokens(batch["input_ids"]))  # (B, L, 32)
    X = hidden[batch["attention_mask"].bool()]  # (N, 32)
    expected = X.T @ X / X.shape[0]
    torch.testing.assert_close(stats.of("model.layers.0.self_attn.q_proj"), expected, rtol=1e-10, atol=1e-12)


def test_independent_of_batch_split_and_padding(llama64) -> None:
    targets = find_targets(llama64)
    batch = random_batch(5, batch=4, length=12)
    one = collect_covariances(llama64, targets, "t", [batch], dtype=F64, progress=False)
    rows = collect_covariances(llama64, targets, "t", split_rows(batch, trim=False), dtype=F64, progress=False)
    trimmed = collect_covariances(llama64, targets, "t", split_rows(batch, trim=True), dtype=F64, progress=False)
    halves = [{k: v[:2] for k, v in batch.items()}, pad_more({k: v[2:] for k, v in batch.items()}, 7)]
    padded = collect_covariances(llama64, targets, "t", halves, dtype=F64, progress=False)
    for other in (rows, trimmed, padded):
        assert_stats_close(other, one, rtol=1e-8)
    # different tokens give a different result (the comparison above is not vacuous)
    other_tokens = collect_covariances(llama64, targets, "t", [random_batch(6, batch=4)], dtype=F64, progress=False)
    key = "model.layers.1.mlp.down_proj"
    assert (other_tokens.moments[key] - one.moments[key]).norm() > 1e-3 * one.moments[key].norm()


def test_no_mask_counts_every_token(llama64) -> None:
    targets = find_targets(llama64, ["o_proj"])
    batch = random_batch(2, batch=2, pad_tail=False)
    with_mask = collect_covariances(llama64, targets, "t", [batch], dtype=F64, progress=False)
    without = collect_covariances(llama64, targets, "t", [{"input_ids": batch["input_ids"]}], dtype=F64,
                                  progress=False)
    assert_stats_close(without, with_mask, rtol=1e-12)
    assert set(without.n_tokens.values()) == {batch["input_ids"].numel()}


def test_shared_inputs_share_one_key(llama) -> None:
    targets = find_targets(llama)
    stats = collect_covariances(llama, targets, "t", [random_batch(0)], progress=False)
    for i in range(2):
        p = f"model.layers.{i}"
        attn, mlp = f"{p}.self_attn", f"{p}.mlp"
        assert {stats.input_of[f"{attn}.{n}"] for n in ("q_proj", "k_proj", "v_proj")} == {f"{attn}.q_proj"}
        assert stats.input_of[f"{attn}.o_proj"] == f"{attn}.o_proj"
        assert {stats.input_of[f"{mlp}.{n}"] for n in ("gate_proj", "up_proj")} == {f"{mlp}.gate_proj"}
        assert stats.input_of[f"{mlp}.down_proj"] == f"{mlp}.down_proj"
    assert len(stats.moments) == 8
    assert stats.of(f"{attn}.v_proj") is stats.of(f"{attn}.q_proj")
    assert stats.moments[f"{mlp}.down_proj"].shape == (64, 64)
    assert stats.of(f"{mlp}.up_proj").dtype == torch.float32  # default accumulation dtype


def test_gpt2_conv1d() -> None:
    model = tiny_gpt2().to(F64)
    targets = find_targets(model)
    batches = [random_batch(0, batch=3), random_batch(1, batch=2)]
    stats = collect_covariances(model, targets, "t", batches, dtype=F64, progress=False)
    ref = reference_moments(model, list(targets), batches)
    assert len(stats.moments) == 8  # c_attn, attn.c_proj, c_fc, mlp.c_proj read different tensors
    for name, target in targets.items():
        assert stats.of(name).shape == (target.d_in, target.d_in)
        torch.testing.assert_close(stats.of(name), ref[name], rtol=1e-10, atol=1e-12)


def test_llava_language_model_only() -> None:
    model = tiny_llava().to(F64)
    targets = find_targets(model)
    batches = [llava_batch(0), llava_batch(1, batch=3)]
    batches = [{k: v.to(F64) if v.is_floating_point() else v for k, v in b.items()} for b in batches]
    stats = collect_covariances(model, targets, "vqa", batches, dtype=F64, progress=False)
    assert set(stats.input_of) == set(targets)
    assert all(k.startswith("model.language_model.") for k in stats.moments)
    ref = reference_moments(model, list(targets), batches)
    for name in targets:
        torch.testing.assert_close(stats.of(name), ref[name], rtol=1e-10, atol=1e-12)
    assert set(stats.n_tokens.values()) == {sum(int(b["attention_mask"].sum()) for b in batches)}


def test_outputs_and_weights_unchanged_and_no_hooks_left(llama) -> None:
    batch = random_batch(4)
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with torch.no_grad():
        logits = llama(**batch).logits
    llama.train()
    collect_covariances(llama, find_targets(llama), "t", [random_batch(0), random_batch(1)], progress=False)
    assert llama.training  # mode restored
    assert no_hooks_left(llama)
    llama.eval()
    with torch.no_grad():
        assert torch.equal(llama(**batch).logits, logits)
    for key, value in llama.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_no_hooks_left_after_exception_mid_forward(llama, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("mid-forward failure")

    monkeypatch.setattr(llama.model.layers[1].mlp, "forward", broken)
    targets = find_targets(llama)
    with pytest.raises(RuntimeError, match="mid-forward failure"):
        collect_covariances(llama, targets, "t", [random_batch(0)], progress=False)
    assert no_hooks_left(llama)
    assert not llama.training


def test_no_hooks_left_after_bad_batch(llama) -> None:
    bad = {"input_ids": torch.randint(3, 128, (2, 5)), "attention_mask": torch.ones(3, 5, dtype=torch.long)}
    with pytest.raises((ValueError, RuntimeError, IndexError)):
        collect_covariances(llama, find_targets(llama), "t", [random_batch(0), bad], progress=False)
    assert no_hooks_left(llama)


def test_nan_activations_name_task_and_module(llama) -> None:
    with torch.no_grad():
        llama.model.layers[1].self_attn.o_proj.weight.fill_(float("nan"))
    with pytest.raises(ValueError) as info:
        collect_covariances(llama, find_targets(llama), "arith", [random_batch(0)], progress=False)
    message = str(info.value)
    assert "'arith'" in message
    assert "model.layers.1.mlp.gate_proj" in message  # first input downstream of the NaN weight
    assert no_hooks_left(llama)


def test_empty_task_raises_naming_it(llama) -> None:
    with pytest.raises(ValueError, match="'empty_task'"):
        collect_covariances(llama, find_targets(llama), "empty_task", [], progress=False)


class _Toy(nn.Module):
    """A model with a linear layer its forward pass never uses."""

    def __init__(self) -> None:
        super().__init__()
        self.used = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.used(input_ids)


def test_never_called_module_raises() -> None:
    toy = _Toy()
    targets = find_targets(toy)
    assert list(targets) == ["used", "unused"]
    with pytest.raises(ValueError, match=r"task 'toy'.*'unused'.*never called"):
        collect_covariances(toy, targets, "toy", [{"input_ids": torch.randn(2, 3, 4)}], progress=False)


def test_float64_accumulation_of_float32_model(llama) -> None:
    targets = find_targets(llama, ["down_proj"])
    batches = [random_batch(0), random_batch(1)]
    s64 = collect_covariances(llama, targets, "t", batches, dtype=F64, progress=False)
    s32 = collect_covariances(llama, targets, "t", batches, progress=False)
    for key in s64.moments:
        assert s64.moments[key].dtype == F64 and s32.moments[key].dtype == torch.float32
        torch.testing.assert_close(s32.moments[key].double(), s64.moments[key], rtol=1e-5, atol=1e-7)


def test_save_load_roundtrip(llama, tmp_path: Path) -> None:
    stats = collect_covariances(llama, find_targets(llama), "t", [random_batch(0)], dtype=F64, progress=False)
    stats.save(tmp_path / "cov.safetensors")
    back = CovarianceStats.load(tmp_path / "cov.safetensors")
    assert back.task == stats.task and back.input_of == stats.input_of and back.n_tokens == stats.n_tokens
    assert set(back.moments) == set(stats.moments)
    for key, value in stats.moments.items():
        assert back.moments[key].dtype == F64
        assert torch.equal(back.moments[key], value)


def _fitter(model: nn.Module, batches: list[dict[str, torch.Tensor]]) -> CovarianceFitter:
    fitter = CovarianceFitter(model, find_targets(model), "t", F64)
    for batch in batches:
        fitter.update(batch)
    return fitter


def test_reduce_with_two_identical_processes(llama64) -> None:
    batches = [random_batch(0), random_batch(1)]
    single = _fitter(llama64, batches).result()
    doubled = _fitter(llama64, batches)
    doubled.reduce_(lambda t: 2 * t)  # sum over two processes holding the same data
    out = doubled.result()
    assert out.n_tokens == {k: 2 * v for k, v in single.n_tokens.items()}
    for key in single.moments:
        torch.testing.assert_close(out.moments[key], single.moments[key], rtol=1e-12, atol=1e-14)


def test_reduce_of_two_shards_equals_one_run(llama64) -> None:
    shard_a, shard_b = [random_batch(0), random_batch(1)], [random_batch(2, batch=5)]
    # "process b": record what it contributes, in the order reduce_ asks for it
    contributions: list[torch.Tensor] = []
    _fitter(llama64, shard_b).reduce_(lambda t: contributions.append(t.clone()) or t)
    incoming: Iterator[torch.Tensor] = iter(contributions)
    merged = collect_covariances(llama64, find_targets(llama64), "t", shard_a, dtype=F64, progress=False,
                                 all_reduce=lambda t: t + next(incoming))
    whole = _fitter(llama64, shard_a + shard_b).result()
    assert_stats_close(merged, whole, rtol=1e-12)
