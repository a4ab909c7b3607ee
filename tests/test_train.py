"""The training loop on a tiny Llama: loss falls, only adapters change, λ per micro-batch, exact resume, NaN."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler

from conftest import llava_batch, tiny_llama, tiny_llava
from thanora import ThanoraConfig
from thanora.adapters.multihead import adapters
from thanora.data.formats import IGNORE_INDEX, collate
from thanora.methods.align_lora import AlignLoraSettings, capture_of
from thanora.methods.base import Method, MethodContext
from thanora.methods.corda import CordaSettings
from thanora.methods.dare import DareSettings
from thanora.methods.dora import DoraSettings
from thanora.methods.hydralora import HydraLoraSettings
from thanora.methods.lora import LoraSettings
from thanora.methods.mtlora import MtLoraSettings
from thanora.methods.registry import METHODS
from thanora.methods.rlora_plus import RLoraPlusSettings
from thanora.training.checkpoints import CHECKPOINTS, LATEST, CheckpointError
from thanora.training.train import (
    HISTORY,
    NonFiniteLossError,
    TrainConfig,
    make_loader_factory,
    train,
)

PROMPT_LEN = 6
ANSWERS = ([10, 11, 12, 13], [20, 21, 22, 23])  # task t answers its fixed sequence after its marker token 5 + t
TASKS = ("alpha", "beta")


def synthetic_features(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Two tasks: a marker token, random filler, then the task's fixed 4-token answer (labels on the answer only)."""
    rng = random.Random(seed)
    features = []
    for i in range(n):
        task = i % 2
        prompt = [5 + task] + [rng.randrange(30, 120) for _ in range(PROMPT_LEN - 1)]
        answer = ANSWERS[task]
        features.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * PROMPT_LEN + answer,
                         "task_id": task})
    return features


def collate_features(features: list[dict[str, Any]]) -> dict[str, Tensor]:
    return collate(features, pad_token_id=0)


def calibration_batches(features: list[dict[str, Any]], per_task: int = 16) -> dict[str, list[dict[str, Tensor]]]:
    """ThanoRA's calibration set from the same synthetic data: one batch of ``per_task`` prompts+answers per task."""
    out = {}
    for task_id, task in enumerate(TASKS):
        batch = collate_features([f for f in features if f["task_id"] == task_id][:per_task])
        out[task] = [{"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}]
    return out


def learnable_llama(seed: int = 0) -> nn.Module:
    """The tiny Llama with a 10x output head: its random head (std 0.02) caps the logit range, so no adapter on the
    linear layers could fit the task; the head stays frozen."""
    model = tiny_llama(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    return model


def prepared(method: str, settings: Any, features: list[dict[str, Any]]) -> nn.Module:
    ctx = MethodContext(calibration=calibration_batches(features), progress=False, seed=0)
    return METHODS[method].prepare(learnable_llama(), settings, ctx)


def settings_of(method: str, dropout: float = 0.05, spr_lambda: float = 1e-6) -> Any:
    if method == "lora":
        return LoraSettings(rank=4, lora_dropout=dropout)
    return ThanoraConfig(rank=8, lora_dropout=dropout, spr_lambda=spr_lambda)


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_trained_alike(model: nn.Module, history: list[dict[str, Any]], want_model: nn.Module,
                         want_history: list[dict[str, Any]]) -> None:
    """Two runs of the same training to float rounding: losses, regulariser values, gradient norms, final weights."""
    for got, want in zip(history, want_history, strict=True):
        for key in ("loss", "reg", "grad_norm"):
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), (got["step"], key)
    want_weights = trainable_state(want_model)
    for name, value in trainable_state(model).items():
        torch.testing.assert_close(value, want_weights[name], rtol=1e-5, atol=1e-6)


def config(**overrides: Any) -> TrainConfig:
    base = dict(max_steps=6, batch_size=4, grad_accum=2, lr=1e-2, warmup_ratio=0.0, mixed_precision="no",
                log_every=1, schedule="cosine")
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(scope="module")
def features() -> list[dict[str, Any]]:
    return synthetic_features(32)


@pytest.mark.parametrize(("field", "value"), [
    ("epochs", 0), ("max_steps", 0), ("batch_size", 0), ("grad_accum", 0), ("lr", 0.0), ("weight_decay", -1.0),
    ("max_grad_norm", -1.0), ("schedule", "step"), ("warmup_ratio", 1.0), ("mixed_precision", "fp8"),
    ("log_every", 0), ("eval_every", -1), ("save_every", -1), ("seed", 1.5), ("gradient_checkpointing", 1),
    ("pack_sequences", 1),
])
def test_train_config_validation_names_the_field(field: str, value: Any) -> None:
    with pytest.raises(ValueError, match=f"TrainConfig.{field} "):
        TrainConfig(**{field: value})


@pytest.mark.parametrize("method", ["lora", "thanora"])
def test_training_lowers_loss_and_changes_only_adapters(method: str, tmp_path: Path) -> None:
    data = synthetic_features(64)
    settings = settings_of(method)
    model = prepared(method, settings, data)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = set(trainable_state(model))
    assert trainable and all("lora_" in n for n in trainable)
    cfg = config(max_steps=16, batch_size=8, grad_accum=1, lr=2e-2, schedule="constant", log_every=2)
    result = train(model, METHODS[method], settings, make_loader_factory(data, 8, collate_features, seed=0), cfg,
                   out_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in result.history]
    assert result.steps == 16 and len(losses) == 8
    assert sum(losses[-2:]) / 2 < losses[0] - 0.5, losses
    after = model.state_dict()
    assert after.keys() == before.keys()
    frozen = [k for k in before if k not in trainable]
    assert frozen and all(torch.equal(before[k], after[k]) for k in frozen)
    for name, param in model.named_parameters():
        if param.requires_grad and "lora_B" in name:  # every B moved (A too, but B is the zero-init half)
            assert not torch.equal(before[name], param.detach()), name
    assert not model.training  # caller's mode (eval, from conftest) restored
    assert (tmp_path / HISTORY).is_file()
    assert [p.name for p in (tmp_path / CHECKPOINTS).iterdir() if p.name.startswith("step-")] == ["step-16"]


def test_regularizer_is_added_once_per_micro_batch(features: list[dict[str, Any]]) -> None:
    """One step of batch 8 = one step of 2 x batch 4 (same 8 examples, no padding, no dropout), with a large λ."""
    settings = settings_of("thanora", dropout=0.0, spr_lambda=1e-3)
    results = {}
    for batch_size, accum in ((8, 1), (4, 2)):
        model = prepared("thanora", settings, features)
        cfg = config(max_steps=1, batch_size=batch_size, grad_accum=accum, max_grad_norm=0.0)
        factory = make_loader_factory(features, batch_size, collate_features, seed=0)
        result = train(model, METHODS["thanora"], settings, factory, cfg, progress=False)
        results[accum] = (result.history[0], trainable_state(model))
    (one, weights_one), (two, weights_two) = results[1], results[2]
    assert one["reg"] > one["loss"]  # the regulariser matters: a double count would show in the gradient
    for key in ("loss", "reg", "grad_norm"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    for name in weights_one:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=1e-5, atol=1e-6)


class _Interrupt(Exception):
    pass


def global_rng_factory(features: list[dict[str, Any]]) -> Any:
    """Seeded order, but iterating the DataLoader draws its base seed from the global torch RNG (no generator)."""

    def factory(epoch: int) -> DataLoader:
        sampler = RandomSampler(features, generator=torch.Generator().manual_seed(epoch))  # type: ignore[arg-type]
        return DataLoader(features, batch_size=4, sampler=sampler, collate_fn=collate_features)  # type: ignore

    return factory


def list_factory(features: list[dict[str, Any]]) -> Any:
    """Plain lists of batches (no DataLoader: skipped by iterating), in an epoch-dependent order."""

    def factory(epoch: int) -> list[dict[str, Tensor]]:
        order = features[epoch % len(features):] + features[:epoch % len(features)]
        return [collate_features(order[i:i + 4]) for i in range(0, len(order), 4)]

    return factory


# Resume mid-epoch (4 steps per epoch) and at an epoch boundary; with a loader that touches the global RNG or not.
@pytest.mark.parametrize("save_every", [3, 4])
@pytest.mark.parametrize("loader", ["seeded", "global_rng", "list"])
def test_resume_reproduces_the_uninterrupted_run(save_every: int, loader: str, features: list[dict[str, Any]],
                                                 tmp_path: Path) -> None:
    settings = settings_of("lora", dropout=0.1)  # dropout: the RNG state must be restored too
    factory = {"seeded": make_loader_factory(features, 4, collate_features, seed=3),
               "global_rng": global_rng_factory(features), "list": list_factory(features)}[loader]
    cfg = config(save_every=save_every, eval_every=1)

    def run(out_dir: Path, resume: bool, stop_at: int | None) -> tuple[nn.Module, Any]:
        def eval_fn(_model: nn.Module, step: int) -> dict[str, float]:
            if step == stop_at:
                raise _Interrupt
            return {"step_seen": float(step)}

        model = prepared("lora", settings, features)
        return model, train(model, METHODS["lora"], settings, factory, cfg, out_dir=out_dir, resume=resume,
                            eval_fn=eval_fn, progress=False)

    full_model, full = run(tmp_path / "full", resume=False, stop_at=None)
    with pytest.raises(_Interrupt):
        run(tmp_path / "cut", resume=False, stop_at=save_every + 1)
    assert (tmp_path / "cut" / CHECKPOINTS / LATEST).read_text().strip() == f"step-{save_every}"
    model, resumed = run(tmp_path / "cut", resume=True, stop_at=None)
    assert resumed.resumed_from == save_every and resumed.steps == 6
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    torch.testing.assert_close(torch.tensor([h["loss"] for h in resumed.history]),
                               torch.tensor([h["loss"] for h in full.history]), rtol=0, atol=1e-6)
    assert resumed.history == full.history  # eval entries and lr too
    full_weights, weights = trainable_state(full_model), trainable_state(model)
    for name in full_weights:
        torch.testing.assert_close(weights[name], full_weights[name], rtol=0, atol=1e-6)
    saved = sorted(p.name for p in (tmp_path / "cut" / CHECKPOINTS).iterdir() if p.name.startswith("step-"))
    assert saved == sorted({f"step-{save_every}", "step-6"})  # the last two kept


def test_resume_restores_the_methods_running_state(features: list[dict[str, Any]], tmp_path: Path) -> None:
    # mtLoRA refreshes its spectral weights every 3 regulariser calls (2 per step): the checkpoint at step 2 falls
    # between refreshes (call 4; last refresh at call 3), so a resume that recomputed them would diverge.
    settings = MtLoraSettings(rank=2, n_heads=3, groups=4, lora_dropout=0.0, spectral_every=3, spectral_lambda=10.0)
    factory = make_loader_factory(features, 4, collate_features, seed=3)
    cfg = config(save_every=2, eval_every=1)

    def run(method: Method, out_dir: Path, resume: bool, stop_at: int | None) -> list[dict[str, Any]]:
        def eval_fn(_model: nn.Module, step: int) -> dict[str, float]:
            if step == stop_at:
                raise _Interrupt
            return {}

        model = prepared("mtlora", settings, features)
        return train(model, method, settings, factory, cfg, out_dir=out_dir, resume=resume, eval_fn=eval_fn,
                     progress=False).history

    def interrupted_then_resumed(method: Method, out_dir: Path) -> list[dict[str, Any]]:
        with pytest.raises(_Interrupt):
            run(method, out_dir, resume=False, stop_at=3)
        assert (out_dir / CHECKPOINTS / "step-2" / "method_state.safetensors").is_file() == (
            method.train_state is not None)
        return run(method, out_dir, resume=True, stop_at=None)

    full = run(METHODS["mtlora"], tmp_path / "full", resume=False, stop_at=None)
    assert full[-1]["reg"] > 0
    assert interrupted_then_resumed(METHODS["mtlora"], tmp_path / "cut") == full
    stateless = dataclasses.replace(METHODS["mtlora"], train_state=None, load_train_state=None)
    diverged = interrupted_then_resumed(stateless, tmp_path / "stateless")
    assert diverged[:2] == full[:2] and diverged[2:] != full[2:]  # the state is what makes the resume exact


def test_resume_without_the_methods_running_state_is_a_clear_error(features: list[dict[str, Any]],
                                                                   tmp_path: Path) -> None:
    settings = MtLoraSettings(rank=2, n_heads=3, groups=4)
    factory = make_loader_factory(features, 4, collate_features, seed=0)
    cfg = config(max_steps=2, grad_accum=1)
    for resume in (False, True):
        model = prepared("mtlora", settings, features)
        if resume:
            (tmp_path / CHECKPOINTS / "step-2" / "method_state.safetensors").unlink()
            with pytest.raises(CheckpointError, match="lacks the method's running state"):
                train(model, METHODS["mtlora"], settings, factory, cfg, out_dir=tmp_path, resume=True,
                      progress=False)
        else:
            train(model, METHODS["mtlora"], settings, factory, cfg, out_dir=tmp_path, progress=False)


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(features: list[dict[str, Any]], tmp_path: Path) -> None:
    settings = settings_of("lora")
    batches = [collate_features(features[i:i + 4]) for i in range(0, 16, 4)]
    batches[2]["labels"].fill_(IGNORE_INDEX)  # no target token: mean cross-entropy = 0/0 = NaN at step 3
    model = prepared("lora", settings, features)
    with pytest.raises(NonFiniteLossError, match="step 3") as err:
        train(model, METHODS["lora"], settings, lambda epoch: batches, config(grad_accum=1, save_every=1),
              out_dir=tmp_path, progress=False)
    assert err.value.step == 3
    root = tmp_path / CHECKPOINTS
    assert (root / LATEST).read_text().strip() == "step-2"
    saved = load_file(str(root / "step-2" / "adapter.safetensors"))
    assert all(torch.isfinite(t).all() for t in saved.values())
    for name, param in trainable_state(model).items():  # the bad step was never applied
        torch.testing.assert_close(param, saved[name], rtol=0, atol=0)
    assert not (tmp_path / HISTORY).exists()


def test_corrupt_missing_or_foreign_checkpoint_is_a_clear_error(features: list[dict[str, Any]],
                                                                tmp_path: Path) -> None:
    settings = settings_of("lora")
    factory = make_loader_factory(features, 4, collate_features, seed=0)
    cfg = config(max_steps=2, grad_accum=1)

    def resume(train_cfg: TrainConfig = cfg) -> None:
        model = prepared("lora", settings, features)
        train(model, METHODS["lora"], settings, factory, train_cfg, out_dir=tmp_path, resume=True, progress=False)

    resume()  # no checkpoint yet: starts from scratch, saves step-2
    root = tmp_path / CHECKPOINTS
    with pytest.raises(CheckpointError, match=r"config\.lr"):
        resume(config(max_steps=2, grad_accum=1, lr=1e-3))
    weights = root / "step-2" / "adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(CheckpointError, match=f"checkpoint {root / 'step-2'} is corrupt"):
        resume()
    (root / LATEST).write_text("step-7\n")
    with pytest.raises(CheckpointError, match="step-7, which does not exist"):
        resume()


def test_loader_factory_is_seeded_per_epoch_and_sharded() -> None:
    data = [{"input_ids": [3 + i], "labels": [3 + i], "task_id": 0} for i in range(12)]

    def order(epoch: int, **kw: Any) -> list[int]:
        factory = make_loader_factory(data, 2, collate_features, seed=1, **kw)
        return [int(i) for b in factory(epoch) for i in b["input_ids"][:, 0]]

    torch.manual_seed(0)
    first = order(0)
    torch.manual_seed(123)  # the global RNG plays no part
    assert order(0) == first and order(1) != first and sorted(first) == list(range(3, 15))
    shards = [order(0, num_processes=2, process_index=r) for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(3, 15))


def test_accelerator_must_match_the_config(features: list[dict[str, Any]]) -> None:
    settings = settings_of("lora")
    model = prepared("lora", settings, features)
    factory = make_loader_factory(features, 4, collate_features, seed=0)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=1"):
        train(model, METHODS["lora"], settings, factory, config(), Accelerator(cpu=True, gradient_accumulation_steps=2),
              progress=False)


@pytest.mark.parametrize("kind", [DistributedType.FSDP, DistributedType.DEEPSPEED, "DistributedType.FSDP", "FSDP",
                                  "MEGATRON_LM"])
def test_sharded_training_is_refused(kind: DistributedType | str) -> None:
    from thanora.training.distributed import check_sharding

    with pytest.raises(ValueError, match=r"sharded training .* not supported.*DDP"):
        check_sharding(kind)


@pytest.mark.parametrize("kind", [DistributedType.MULTI_GPU, DistributedType.MULTI_CPU, DistributedType.NO])
def test_ddp_and_one_device_are_allowed(kind: DistributedType) -> None:
    from thanora.training.distributed import check_sharding

    check_sharding(kind)


def test_fsdp_request_on_cpu_stays_ddp(monkeypatch: pytest.MonkeyPatch) -> None:
    """accelerate switches FSDP on for accelerator devices only: on CPU the request yields a plain (DDP-able) run."""
    from accelerate.state import AcceleratorState

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    AcceleratorState._reset_state(True)
    try:
        assert Accelerator(cpu=True).distributed_type in (DistributedType.NO, DistributedType.MULTI_CPU)
    finally:
        AcceleratorState._reset_state(True)


# Every method that supports gradient checkpointing, with dropout (the recomputation must replay the same masks) and
# its regulariser and router state switched on (they read tensors kept aside from the forward).
RECOMPUTED = {
    "lora": LoraSettings(rank=4, lora_dropout=0.1),
    "dora": DoraSettings(rank=4, lora_dropout=0.1),
    "corda": CordaSettings(rank=4),
    "hydralora": HydraLoraSettings(n_heads=3, rank=2, lora_dropout=0.1, balance_weight=0.1),
    "rlora_plus": RLoraPlusSettings(rank=4, n_heads=3, lora_dropout=0.1),
    "align_lora": AlignLoraSettings(rank=4, lora_dropout=0.1, align_lambda=1.0),
    "mtlora": MtLoraSettings(rank=2, n_heads=3, groups=4, router="sequence", spectral_every=2, spectral_lambda=10.0),
    "thanora": ThanoraConfig(rank=8, lora_dropout=0.1, spr_lambda=1e-2),
}


def test_every_method_but_dare_is_checked_under_gradient_checkpointing() -> None:
    assert {n for n, m in METHODS.items() if m.supports_gradient_checkpointing} == set(RECOMPUTED)


@pytest.mark.parametrize("method", sorted(RECOMPUTED))
def test_gradient_checkpointing_recomputes_and_trains_identically(method: str, features: list[dict[str, Any]]) -> None:
    settings = RECOMPUTED[method]
    factory = make_loader_factory(features, 4, collate_features, seed=1)

    def run(checkpointing: bool) -> tuple[nn.Module, list[dict[str, Any]], int]:
        model = prepared(method, settings, features)
        mlp = next(m for n, m in model.named_modules() if n.endswith("layers.0.mlp"))
        calls = []
        mlp.register_forward_pre_hook(lambda *_: calls.append(1))  # a pre-hook: the replay stops inside the mlp
        history = train(model, METHODS[method], settings, factory,
                        config(max_steps=3, gradient_checkpointing=checkpointing), progress=False).history
        return model, history, len(calls)

    plain_model, plain, plain_calls = run(False)
    model, recomputed, calls = run(True)
    assert plain_calls == 6 and calls == 12  # 3 steps x 2 micro-batches, each replayed once in backward
    assert plain[-1]["reg"] > 0 or METHODS[method].regularizer is None or method == "dora"
    assert_trained_alike(model, recomputed, plain_model, plain)
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    assert not inner.is_activation_checkpointing  # switched off again
    assert not getattr(inner, "_require_grads_hooks", None)  # and no input-embedding hook left behind
    assert inner.config.use_cache is True  # restored
    if method in ("hydralora", "mtlora"):  # the backward replay stashed nothing that would outlive the step
        assert all(a.last_probs is None for a in adapters(model).values())
    if method == "align_lora":
        assert capture_of(model).outputs == {}


def test_gradient_checkpointing_on_a_vision_language_model() -> None:
    """LLaVA: the frozen vision tower's layers are checkpointed too (no input of theirs needs a gradient)."""
    batches = [llava_batch(seed) for seed in range(2)]
    for batch in batches:
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
    settings = LoraSettings(rank=4, lora_dropout=0.1)

    calls: list[str] = []

    def run(checkpointing: bool) -> list[dict[str, Any]]:
        model = METHODS["lora"].prepare(tiny_llava(), settings, MethodContext(seed=0))
        for name, module in model.named_modules():
            if name.endswith("layers.0.mlp"):  # the vision tower's and the language model's
                module.register_forward_pre_hook(lambda *_, n=name: calls.append(n))
        return train(model, METHODS["lora"], settings, lambda epoch: batches,
                     config(max_steps=2, grad_accum=1, gradient_checkpointing=checkpointing), progress=False).history

    plain = run(False)
    assert len(calls) == 4 and len(set(calls)) == 2
    recomputed = run(True)
    assert len(calls) == 4 + 6  # the language model's layer replayed; the frozen vision tower needs no backward
    assert [h["loss"] for h in recomputed] == pytest.approx([h["loss"] for h in plain], rel=1e-5)
    assert [h["grad_norm"] for h in recomputed] == pytest.approx([h["grad_norm"] for h in plain], rel=1e-5)


def test_dare_refuses_gradient_checkpointing(features: list[dict[str, Any]]) -> None:
    settings = DareSettings(rank=4)
    model = prepared("dare", settings, features)
    factory = make_loader_factory(features, 4, collate_features, seed=0)
    with pytest.raises(ValueError, match=r"gradient_checkpointing is not supported by dare.*set it to false"):
        train(model, METHODS["dare"], settings, factory, config(gradient_checkpointing=True), progress=False)


def test_gradient_checkpointing_may_change_on_resume(features: list[dict[str, Any]], tmp_path: Path) -> None:
    settings = settings_of("lora", dropout=0.0)
    factory = make_loader_factory(features, 4, collate_features, seed=0)
    train(prepared("lora", settings, features), METHODS["lora"], settings, factory, config(max_steps=2),
          out_dir=tmp_path, progress=False)
    resumed = train(prepared("lora", settings, features), METHODS["lora"], settings, factory,
                    config(max_steps=2, gradient_checkpointing=True), out_dir=tmp_path, resume=True, progress=False)
    assert resumed.resumed_from == 2  # same math: not a mismatch
