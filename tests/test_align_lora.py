"""Align-LoRA: the MK-MMD² penalty against a naive double loop, its capture of A·x, save/load and training."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from torch import Tensor, nn

from conftest import random_batch, tiny_gpt2, tiny_llama
from test_train import collate_features, learnable_llama, synthetic_features
from thanora.data.mixture import MixtureSampler
from thanora.data.tasks import DataConfig
from thanora.experiment.config import load_config
from thanora.methods.align_lora import (
    ALIGN_LORA,
    REFERENCE_BANDWIDTHS,
    AlignLoraSettings,
    align_regularizer,
    capture_of,
)
from thanora.methods.align_lora_mmd import alignment_loss, kernel_matrix, mean_pool, mk_mmd2
from thanora.methods.base import MethodContext
from thanora.methods.registry import METHODS, get_method
from thanora.training.train import TrainConfig, train

CONFIG = Path(__file__).parents[1] / "configs" / "csqa_obqa_align_lora.yaml"
SIGMAS = (0.3, 1.0, 2.5)  # bandwidths at the scale of the test data, so every kernel matters


# ----------------------------------------------------------------------------------------------------------------
# Naive oracle: python loops over sample pairs, positions and bandwidths, in float64


def naive_kernel(u: Tensor, v: Tensor, sigmas: tuple[float, ...], kernel: str) -> float:
    """Σ_σ Gaussian kernel of two samples; (L, r) samples are compared position by position and averaged."""
    if u.dim() == 2:
        return sum(naive_kernel(u[s], v[s], sigmas, kernel) for s in range(u.shape[0])) / u.shape[0]
    d2 = float(((u.double() - v.double()) ** 2).sum())
    return sum(math.exp(-d2 / (2 * s * s if kernel == "paper" else 2 * s)) for s in sigmas)


def naive_mmd2(x: Tensor, y: Tensor, sigmas: tuple[float, ...], kernel: str) -> float:
    """Biased MMD²: every (i, j) pair of each block, the diagonal included."""
    kxx = sum(naive_kernel(a, b, sigmas, kernel) for a in x for b in x) / len(x) ** 2
    kyy = sum(naive_kernel(a, b, sigmas, kernel) for a in y for b in y) / len(y) ** 2
    kxy = sum(naive_kernel(a, b, sigmas, kernel) for a in x for b in y) / (len(x) * len(y))
    return kxx + kyy - 2 * kxy


def naive_alignment(a: Tensor, mask: Tensor, task_id: Tensor, sigmas: tuple[float, ...], kernel: str,
                    pooling: str) -> float:
    """Mean over the pairs of tasks present of the naive MMD², samples pooled by a loop over real tokens."""
    samples = []
    for b in range(a.shape[0]):
        if pooling == "mean":
            real = [a[b, s] for s in range(a.shape[1]) if mask[b, s] == 1]
            samples.append(sum(real) / len(real))
        else:
            samples.append(a[b])
    tasks = sorted(set(task_id.tolist()))
    groups = {t: [samples[b] for b in range(len(samples)) if task_id[b] == t] for t in tasks}
    pairs = [(s, t) for i, s in enumerate(tasks) for t in tasks[i + 1:]]
    return sum(naive_mmd2(groups[s], groups[t], sigmas, kernel) for s, t in pairs) / len(pairs)


def padded_activations(seed: int, batch: int = 6, length: int = 7, rank: int = 3) -> tuple[Tensor, Tensor]:
    """(B, L, r) float64 activations and a right-padded (B, L) mask (every sample has >= 2 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(batch, length, rank, generator=g, dtype=torch.float64)
    mask = torch.ones(batch, length, dtype=torch.long)
    for b in range(batch):
        mask[b, 2 + (b * 2) % (length - 2):] = 0
    return a, mask


# ----------------------------------------------------------------------------------------------------------------
# Settings and registration


def test_settings_defaults_follow_the_paper_and_the_reference_code() -> None:
    s = AlignLoraSettings()
    assert (s.rank, s.alpha, s.lora_dropout, s.target_modules) == (64, 64.0, 0.05, None)
    assert (s.align_lambda, s.kernel, s.pooling) == (0.01, "paper", "mean")
    assert 0.01 <= s.align_lambda <= 0.15  # the paper's range
    assert s.bandwidths == REFERENCE_BANDWIDTHS and len(s.bandwidths) == 19
    assert (min(s.bandwidths), max(s.bandwidths)) == (1e-6, 1e6)
    yaml_like = AlignLoraSettings(bandwidths=["1e-6", 1, 2.5], target_modules=["q_proj"], align_lambda="0.1")
    assert yaml_like.bandwidths == (1e-6, 1.0, 2.5) and yaml_like.target_modules == ("q_proj",)
    assert yaml_like.align_lambda == 0.1
    meta = AlignLoraSettings(rank=8, lora_alpha=16).to_dict()
    assert meta["lora_alpha"] == 16.0 and meta["estimator"] == "biased" and meta["kernel"] == "paper"
    assert meta["bandwidths"] == list(REFERENCE_BANDWIDTHS)


@pytest.mark.parametrize(("field", "value"), [
    ("rank", 0), ("rank", 2.5), ("lora_alpha", 0.0), ("lora_dropout", 1.0), ("target_modules", ()),
    ("align_lambda", -0.01), ("align_lambda", float("nan")), ("align_lambda", "big"), ("kernel", "rbf"),
    ("pooling", "max"), ("bandwidths", ()), ("bandwidths", (1.0, 0.0)), ("bandwidths", ("wide",)),
    ("bandwidths", 1.0),
])
def test_settings_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"AlignLoraSettings.{field} "):
        AlignLoraSettings(**{field: value})


def test_registered_as_a_mergeable_method_with_stratified_task_ids() -> None:
    assert get_method("align_lora") is ALIGN_LORA and METHODS["align_lora"] is ALIGN_LORA
    assert ALIGN_LORA.mergeable and ALIGN_LORA.task_id_at_train and not ALIGN_LORA.task_id_at_test
    assert ALIGN_LORA.stratified_batches and ALIGN_LORA.regularizer is align_regularizer


def test_shipped_config_uses_the_paper_lambda_and_stratifiable_batches() -> None:
    cfg = load_config(CONFIG)
    (spec,) = cfg.methods
    settings = spec.build()
    assert spec.name == "align_lora" and isinstance(settings, AlignLoraSettings)
    assert settings.rank == 64 and settings.align_lambda == AlignLoraSettings().align_lambda
    assert cfg.train.batch_size >= len(cfg.tasks)  # every micro-batch can hold every task


# ----------------------------------------------------------------------------------------------------------------
# The penalty as tensor functions


@pytest.mark.parametrize("kernel", ["paper", "code"])
def test_mmd_is_zero_for_identical_and_positive_for_shifted_distributions(kernel: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    same = x[torch.randperm(6, generator=g)]
    assert abs(float(mk_mmd2(x, same, REFERENCE_BANDWIDTHS, kernel))) < 1e-12
    assert float(mk_mmd2(x, x + 1.5, REFERENCE_BANDWIDTHS, kernel)) > 0.1
    # Two large samples of one distribution: far closer than a shifted one (the biased estimate is not 0 there).
    big_x, big_y = torch.randn(2, 200, 4, generator=g, dtype=torch.float64)
    same_dist = float(mk_mmd2(big_x, big_y, SIGMAS, kernel))
    assert 0 <= same_dist < 0.1 * float(mk_mmd2(big_x, big_y + 1.0, SIGMAS, kernel))
    # With the reference set, each bandwidth far below the sample spacing only sees the diagonal: a constant floor
    # of 1/n_x + 1/n_y per such σ (no gradient), on top of the same-distribution estimate.
    narrow = [s for s in REFERENCE_BANDWIDTHS if s <= 1e-4]
    floor = float(mk_mmd2(big_x, big_y, narrow, kernel))
    assert floor == pytest.approx(len(narrow) * (2 / 200), rel=1e-6)


@pytest.mark.parametrize("kernel", ["paper", "code"])
@pytest.mark.parametrize("layout", ["pooled", "tokens"])
def test_mmd_matches_a_naive_double_loop(kernel: str, layout: str) -> None:
    g = torch.Generator().manual_seed(1)
    shape = (3,) if layout == "pooled" else (5, 3)
    x = torch.randn(4, *shape, generator=g, dtype=torch.float64)
    y = 0.7 * torch.randn(3, *shape, generator=g, dtype=torch.float64) + 0.4
    for sigmas in (SIGMAS, REFERENCE_BANDWIDTHS):
        got = float(mk_mmd2(x, y, sigmas, kernel))  # type: ignore[arg-type]
        assert got == pytest.approx(naive_mmd2(x, y, sigmas, kernel), rel=1e-10, abs=1e-12)
    k = kernel_matrix(x, y, SIGMAS, kernel)  # type: ignore[arg-type]
    assert k.shape == (4, 3) and k.dtype == torch.float64
    assert float(k[2, 1]) == pytest.approx(naive_kernel(x[2], y[1], SIGMAS, kernel), rel=1e-12)


def test_kernel_options_differ_and_identical_points_give_one_per_bandwidth() -> None:
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=torch.float64)  # distance² 25
    paper, code = kernel_matrix(x, x, (2.0,), "paper"), kernel_matrix(x, x, (2.0,), "code")
    assert float(paper[0, 1]) == pytest.approx(math.exp(-25 / 8)) and float(code[0, 1]) == pytest.approx(
        math.exp(-25 / 4))
    narrow = kernel_matrix(x.float(), x.float(), REFERENCE_BANDWIDTHS, "paper")
    assert float(narrow[0, 0]) == pytest.approx(19.0)  # exact zero distance even at σ = 1e-6


@pytest.mark.parametrize("kernel", ["paper", "code"])
@pytest.mark.parametrize("pooling", ["mean", "tokens"])
def test_alignment_loss_matches_the_naive_mean_over_task_pairs(kernel: str, pooling: str) -> None:
    a, mask = padded_activations(2)
    task_id = torch.tensor([2, 0, 1, 2, 0, 1])  # three tasks, interleaved
    got = float(alignment_loss(a, mask, task_id, SIGMAS, kernel, pooling))  # type: ignore[arg-type]
    assert got == pytest.approx(naive_alignment(a, mask, task_id, SIGMAS, kernel, pooling), rel=1e-10)
    feats = mean_pool(a, mask) if pooling == "mean" else a
    pairs = [float(mk_mmd2(feats[task_id == s], feats[task_id == t], SIGMAS, kernel))  # type: ignore[arg-type]
             for s, t in ((0, 1), (0, 2), (1, 2))]
    assert got == pytest.approx(sum(pairs) / 3, rel=1e-10)
    # Only the tasks present count: tasks {0, 2} give their one pair.
    two = task_id != 1
    only = float(alignment_loss(a[two], mask[two], task_id[two], SIGMAS, kernel, pooling))  # type: ignore[arg-type]
    assert only == pytest.approx(pairs[1], rel=1e-10)


def test_low_precision_activations_are_pooled_and_compared_in_float32() -> None:
    a, mask = padded_activations(5)
    task_id = torch.tensor([0, 1, 0, 1, 0, 1])
    half = a.to(torch.bfloat16)
    loss = alignment_loss(half, mask, task_id, SIGMAS)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, alignment_loss(half.float(), mask, task_id, SIGMAS))


def test_one_task_gives_zero() -> None:
    a, mask = padded_activations(3)
    a.requires_grad_(True)
    loss = alignment_loss(a, mask, torch.full((6,), 4), SIGMAS)
    assert loss.shape == () and float(loss) == 0.0 and not loss.requires_grad


def test_mean_pooling_excludes_padding_and_tokens_pooling_does_not() -> None:
    a, mask = padded_activations(4)
    task_id = torch.tensor([0, 1, 0, 1, 0, 1])
    changed = a.clone()
    changed[mask == 0] = 100.0 * torch.randn(int((mask == 0).sum()), 3, dtype=torch.float64)
    assert (mask == 0).any()
    pooled = [float(alignment_loss(t, mask, task_id, SIGMAS, "paper", "mean")) for t in (a, changed)]
    assert pooled[0] == pytest.approx(pooled[1], rel=1e-12)
    tokens = [float(alignment_loss(t, mask, task_id, SIGMAS, "paper", "tokens")) for t in (a, changed)]
    assert abs(tokens[0] - tokens[1]) > 1e-3
    torch.testing.assert_close(mean_pool(a, mask)[0], a[0, mask[0] == 1].mean(0))


# ----------------------------------------------------------------------------------------------------------------
# Through the model


def prepared(settings: AlignLoraSettings, model: nn.Module | None = None) -> nn.Module:
    return ALIGN_LORA.prepare(model if model is not None else tiny_llama(), settings, MethodContext(seed=0))


def lora_a_modules(model: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in model.named_modules() if name.endswith("lora_A.default")}


def task_batch(task_ids: list[int], seed: int = 0) -> dict[str, Tensor]:
    batch = random_batch(seed, batch=len(task_ids), length=10)
    return {**batch, "labels": batch["input_ids"].clone(), "task_id": torch.tensor(task_ids)}


@pytest.mark.parametrize(("kernel", "pooling"), [("paper", "mean"), ("code", "tokens")])
def test_regularizer_equals_the_direct_computation_on_captured_activations(kernel: str, pooling: str) -> None:
    settings = AlignLoraSettings(rank=4, lora_dropout=0.0, align_lambda=0.5, kernel=kernel,  # type: ignore[arg-type]
                                 pooling=pooling, bandwidths=SIGMAS)  # type: ignore[arg-type]
    model = prepared(settings).train()
    seen: dict[str, Tensor] = {}
    for name, module in lora_a_modules(model).items():
        module.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, out.detach()))
    batch = task_batch([0, 1, 2, 0, 1, 2])
    model(**batch)
    reg = align_regularizer(model, settings, batch)
    assert len(seen) == 14  # q, k, v, o, gate, up, down of both layers
    layers = [naive_alignment(a, batch["attention_mask"], batch["task_id"], SIGMAS, kernel, pooling)
              for a in seen.values()]
    assert float(reg.detach()) == pytest.approx(0.5 * sum(layers) / len(layers), rel=1e-5)
    assert float(reg.detach()) > 0


def test_regularizer_ignores_padded_positions_through_the_model() -> None:
    settings = AlignLoraSettings(rank=4, lora_dropout=0.0, bandwidths=SIGMAS)
    model = prepared(settings).train()
    batch = task_batch([0, 1, 0, 1])
    assert (batch["attention_mask"] == 0).any()
    other = {**batch, "input_ids": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, 77)}
    values = []
    for b in (batch, other):
        model(**b)
        values.append(float(align_regularizer(model, settings, b).detach()))
    assert values[0] > 0 and values[0] == pytest.approx(values[1], rel=1e-5)


def test_one_task_in_the_batch_gives_zero_through_the_model() -> None:
    settings = AlignLoraSettings(rank=4)
    model = prepared(settings).train()
    batch = task_batch([1, 1, 1])
    model(**batch)
    reg = align_regularizer(model, settings, batch)
    assert reg.shape == () and float(reg) == 0.0
    assert capture_of(model).outputs == {}  # consumed all the same


def test_penalty_gradient_reaches_lora_a_only() -> None:
    settings = AlignLoraSettings(rank=4, bandwidths=SIGMAS, align_lambda=1.0)
    model = prepared(settings).train()
    batch = task_batch([0, 1, 0, 1])
    model(**batch)
    reg = align_regularizer(model, settings, batch)
    assert reg.requires_grad
    reg.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    a_grads = [g for n, g in grads.items() if ".lora_A." in n]
    assert len(a_grads) == 14 and all(g is not None and torch.isfinite(g).all() for g in a_grads)
    assert all(float(g.abs().sum()) > 0 for g in a_grads)  # type: ignore[union-attr]
    # No stop-gradient (as paper and code): earlier layers' B shape later layers' inputs x, but the B of the last
    # adapted module is downstream of every A·x, so the penalty gives it nothing.
    assert grads["base_model.model.model.layers.1.mlp.down_proj.lora_B.default.weight"] is None
    assert all(p.grad is None for p in model.parameters() if not p.requires_grad)


def test_capture_holds_only_the_current_training_forward() -> None:
    settings = AlignLoraSettings(rank=4, bandwidths=SIGMAS)
    model = prepared(settings)
    capture = capture_of(model)
    batch = task_batch([0, 1, 0, 1])
    model.eval()
    model(**batch)  # task_id consumed in eval mode too
    assert capture.outputs == {}
    model.train()
    with torch.no_grad():
        model(**batch)
    assert capture.outputs == {}  # no gradients: nothing kept (evaluation costs nothing extra)
    with pytest.raises(RuntimeError, match="captured no A·x"):
        align_regularizer(model, settings, batch)
    for size in (6, 4, 4):  # a new forward replaces the last one's activations: no growth across steps
        model(**task_batch([0, 1] * (size // 2), seed=size))
        assert len(capture.outputs) == 14 and all(a.shape[0] == size for a in capture.outputs.values())
    model.eval()
    model(**batch)
    assert capture.outputs == {}  # an eval forward drops the stale training activations
    model.train()
    model(**batch)
    align_regularizer(model, settings, batch)
    assert capture.outputs == {}  # the regulariser consumed them


def test_task_id_keyword_is_consumed() -> None:
    model = prepared(AlignLoraSettings(rank=4))
    batch = task_batch([0, 1])
    for mode in (True, False):
        model.train(mode)
        assert model(**batch).logits.shape == (2, 10, 128)


def test_regularizer_needs_task_ids() -> None:
    settings = AlignLoraSettings(rank=4)
    model = prepared(settings).train()
    batch = task_batch([0, 1])
    model(**batch)
    with pytest.raises(ValueError, match="task_id"):
        align_regularizer(model, settings, {k: v for k, v in batch.items() if k != "task_id"})


@pytest.mark.parametrize("make_model", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_save_load_gives_the_same_logits_and_param_count_is_exact(make_model: Any, tmp_path: Path) -> None:
    settings = AlignLoraSettings(rank=4, lora_dropout=0.0)
    model = prepared(settings, make_model())
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    batch = random_batch(0)
    with torch.no_grad():
        expected = model(**batch).logits
        assert not torch.allclose(expected, make_model()(**batch).logits, atol=1e-4)
    ALIGN_LORA.save(model, tmp_path / "adapter")
    loaded = ALIGN_LORA.load(make_model(), tmp_path / "adapter")
    stock = PeftModel.from_pretrained(make_model(), str(tmp_path / "adapter")).eval()  # export = plain PEFT LoRA
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(stock(**batch).logits, expected, rtol=1e-5, atol=1e-5)
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert ALIGN_LORA.param_count(make_model(), settings) == real
    assert ALIGN_LORA.describe(model)["align_lora.json"]["kernel"] == "paper"  # type: ignore[misc]


def test_training_with_stratified_batches_lowers_the_loss() -> None:
    data = synthetic_features(64)
    by_task = [f for t in (0, 1) for f in data if f["task_id"] == t]  # the sampler's index layout: task blocks
    sampler = MixtureSampler([32, 32], batch_size=8, data=DataConfig(stratified=True), seed=0)

    def factory(epoch: int) -> list[dict[str, Tensor]]:
        return [collate_features([by_task[i] for i in batch]) for batch in sampler.batches(epoch)]

    assert all(set(b["task_id"].tolist()) == {0, 1} for b in factory(0))
    settings = AlignLoraSettings(rank=4, align_lambda=0.1, bandwidths=SIGMAS)
    model = ALIGN_LORA.prepare(learnable_llama(), settings, MethodContext(seed=0))
    cfg = TrainConfig(max_steps=16, batch_size=8, grad_accum=1, lr=2e-2, warmup_ratio=0.0, mixed_precision="no",
                      log_every=2, schedule="constant")
    result = train(model, ALIGN_LORA, settings, factory, cfg, progress=False)
    losses, regs = [h["loss"] for h in result.history], [h["reg"] for h in result.history]
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    assert all(r > 0 for r in regs), regs  # the penalty was active on every logged step
    assert capture_of(model).outputs == {}  # nothing retained after training
