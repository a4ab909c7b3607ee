"""Packed training batches (`thanora.training.packing`) compute what the padded ones do: every sequence laid out once
with its own positions, the model's logits unchanged, and every method that packs trains to the same losses,
gradient norms and weights as on padded batches; methods, inputs and models that cannot be packed stay padded and
say so once."""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from conftest import llava_batch, random_batch, tiny_gpt2, tiny_llama
from test_train import RECOMPUTED, assert_trained_alike, collate_features, config, prepared, trainable_state
from thanora.data.formats import IGNORE_INDEX
from thanora.methods.dare import DareSettings
from thanora.methods.mtlora import MtLoraSettings
from thanora.methods.registry import METHODS
from thanora.training import packing
from thanora.training.packing import pack, packable, packing_conflict, packing_is_exact
from thanora.training.train import make_loader_factory, train

# Every method that packs, dropout 0 (packed and padded batches draw their dropout masks over other shapes).
PACKED = {name: dataclasses.replace(settings, **{f: 0.0 for f in ("lora_dropout",) if hasattr(settings, f)})
          for name, settings in RECOMPUTED.items() if name != "align_lora"}
PACKED["mtlora"] = dataclasses.replace(PACKED["mtlora"], router="token")
# Methods that must stay padded: per-sample task ids, or a router that carries state along a row.
PADDED = {"dare": DareSettings(rank=4, lora_dropout=0.0), "align_lora": RECOMPUTED["align_lora"],
          "mtlora": RECOMPUTED["mtlora"]}


def ragged_features(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """The two synthetic tasks of `test_train` with prompts of 2-14 tokens, so batches carry real padding."""
    rng = random.Random(seed)
    features = []
    for i in range(n):
        task = i % 2
        prompt = [5 + task] + [rng.randrange(30, 120) for _ in range(rng.randrange(1, 14))]
        answer = [10 + 10 * task + k for k in range(4)]
        features.append({"input_ids": prompt + answer, "labels": [IGNORE_INDEX] * len(prompt) + answer,
                         "task_id": task})
    return features


@pytest.fixture(scope="module")
def features() -> list[dict[str, Any]]:
    return ragged_features(32)


def ragged_batch(seed: int, lengths: tuple[int, ...] = (20, 4, 9, 13, 3, 7, 16, 5)) -> dict[str, torch.Tensor]:
    """Right-padded random tokens with these real lengths, labelled on every real token but the first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 120, (len(lengths), max(lengths)), generator=g)
    mask = (torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]).long()
    return _labelled({"input_ids": ids * mask, "attention_mask": mask})


def _labelled(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Labels on every real token but each row's first (the answer-only loss never reads those anyway)."""
    labels = batch["input_ids"].masked_fill(~batch["attention_mask"].bool(), IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX
    return {**batch, "labels": labels}


def test_pack_lays_out_every_sequence_once_with_its_own_positions() -> None:
    batch = ragged_batch(3)
    lengths = batch["attention_mask"].sum(1).tolist()
    packed = pack(batch)
    rows, width = packed["input_ids"].shape
    assert (rows, width) == (4, 20)  # 77 tokens in 4 rows of the longest (first-fit decreasing), not 8
    assert int(packed["attention_mask"].sum()) == sum(lengths)
    # every sequence once, contiguous, positions 0..n-1, its labels after the first token
    found = []
    for r in range(rows):
        positions = packed["position_ids"][r].tolist()
        starts = [t for t in range(width) if positions[t] == 0]
        for start, end in zip(starts, [*starts[1:], width], strict=True):
            if not packed["attention_mask"][r, start]:
                continue  # the row's filler
            ids = packed["input_ids"][r, start:end]
            i = next(i for i, n in enumerate(lengths) if n == end - start
                     and torch.equal(batch["input_ids"][i, :n], ids) and i not in found)
            found.append(i)
            assert positions[start:end] == list(range(end - start))
            assert packed["labels"][r, start] == IGNORE_INDEX
            assert torch.equal(packed["labels"][r, start + 1:end], batch["labels"][i, 1:end - start])
    assert sorted(found) == list(range(8))
    # the labelled tokens are the same multiset (so the mean loss runs over the same tokens)
    assert sorted(packed["labels"][packed["labels"] != IGNORE_INDEX].tolist()) == sorted(
        batch["labels"][batch["labels"] != IGNORE_INDEX].tolist())


def test_only_right_padded_text_batches_are_packable() -> None:
    batch = _labelled(random_batch(0))
    assert packable(batch)
    assert not packable({**batch, "task_id": torch.zeros(3, dtype=torch.long)})
    assert not packable(_labelled(llava_batch(0)))  # images: their tokens are placed by the model
    left = {k: v.flip(1) for k, v in batch.items()}
    assert not packable(left)


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_packed_rows_give_the_padded_batchs_logits(builder: Any) -> None:
    model = builder()
    batch = ragged_batch(1)
    packed = pack(batch)
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        rows = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
    real = batch["attention_mask"].bool()
    # compare the two layouts' logits sequence by sequence: sorted by (length, first tokens) to pair them
    key = [tuple(batch["input_ids"][i, :n].tolist()) for i, n in enumerate(real.sum(1).tolist())]
    want = torch.cat([padded[i, :len(key[i])] for i in sorted(range(len(key)), key=key.__getitem__)])
    got_rows = []
    for r in range(rows.shape[0]):
        positions = packed["position_ids"][r].tolist()
        starts = [t for t, p in enumerate(positions) if p == 0]
        for start, end in zip(starts, [*starts[1:], len(positions)], strict=True):
            if packed["attention_mask"][r, start]:
                got_rows.append((tuple(packed["input_ids"][r, start:end].tolist()), rows[r, start:end]))
    got = torch.cat([logits for _, logits in sorted(got_rows, key=lambda kv: kv[0])])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert packing_is_exact(model, batch)


class _CrossingLlama(nn.Module):
    """A model whose attention ignores the position ids, so a packed row's sequences see each other."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_llama()

    def forward(self, **kwargs: Any) -> Any:
        kwargs.pop("position_ids", None)
        return self.inner(**kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.inner.get_input_embeddings()


def test_a_model_whose_attention_crosses_packed_sequences_fails_the_check() -> None:
    assert not packing_is_exact(_CrossingLlama(), ragged_batch(1))


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2], ids=["llama", "gpt2"])
def test_the_check_holds_at_the_precision_the_model_runs_in(builder: Any) -> None:
    """bf16 autocast (a CUDA run's default mixed precision) rounds the packed and padded logits apart by far more
    than float32 does, yet far less than crossing the sequences would: the check passes there and still fails a
    model whose attention crosses."""
    batch = ragged_batch(3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert packing_is_exact(builder(), batch)
        assert not packing_is_exact(_CrossingLlama(), batch)
    assert packing_is_exact(builder().to(torch.bfloat16), batch)


def test_training_in_bf16_mixed_precision_packs(features: list[dict[str, Any]], caplog: pytest.LogCaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Under the accelerator's bf16 autocast the loop packs (it fell back to padded batches with a false warning
    while the check used a float32 tolerance) and trains to the padded run's losses within bf16 rounding."""
    from accelerate.state import AcceleratorState

    calls: list[int] = []
    real_pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda batch: calls.append(1) or real_pack(batch))
    factory = make_loader_factory(features, 8, collate_features, seed=1)
    settings = PACKED["lora"]
    histories = []
    try:
        for packed in (True, False):
            AcceleratorState._reset_state(True)
            model = prepared("lora", settings, features)
            with caplog.at_level(logging.WARNING, logger=packing.__name__):
                histories.append(train(model, METHODS["lora"], settings, factory, config(
                    max_steps=3, batch_size=8, mixed_precision="bf16", pack_sequences=packed), progress=False).history)
    finally:
        AcceleratorState._reset_state(True)
    assert len(calls) == 6 and not caplog.records
    for got, want in zip(*histories, strict=True):
        assert got["loss"] == pytest.approx(want["loss"], rel=2e-2)


def test_the_packer_falls_back_once_for_a_model_that_fails_the_check(caplog: pytest.LogCaptureFixture) -> None:
    batch = ragged_batch(2)
    packer = packing.Packer(True)
    with caplog.at_level(logging.WARNING, logger=packing.__name__):
        for _ in range(3):
            inputs, regularizer_batch = packer(_CrossingLlama(), batch, batch)
            assert inputs is batch and regularizer_batch is batch
    assert len(caplog.records) == 1 and "crosses sequence boundaries" in caplog.text
    assert "pack_sequences" in caplog.text


@pytest.mark.parametrize("method", sorted(PACKED))
def test_every_packing_method_trains_identically_on_packed_and_padded_batches(
        method: str, features: list[dict[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    settings = PACKED[method]
    assert packing_conflict(METHODS[method], settings) is None
    factory = make_loader_factory(features, 8, collate_features, seed=1)
    shapes: list[tuple[int, int]] = []
    real_pack = packing.pack
    monkeypatch.setattr(packing, "pack", lambda batch: shapes.append(tuple(batch["input_ids"].shape))
                        or real_pack(batch))

    def run(packed: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
        model = prepared(method, settings, features)
        history = train(model, METHODS[method], settings, factory,
                        config(max_steps=3, batch_size=8, pack_sequences=packed), progress=False).history
        return model, history

    plain_model, plain = run(False)
    assert not shapes
    model, packed = run(True)
    assert len(shapes) == 6  # every micro-batch was packed (3 steps x 2)
    assert plain[-1]["reg"] > 0 or METHODS[method].regularizer is None or method == "dora"
    assert_trained_alike(model, packed, plain_model, plain)


def test_packing_removes_most_of_the_padding(features: list[dict[str, Any]]) -> None:
    loader = make_loader_factory(features, 8, collate_features, seed=1)(0)
    padded = packed = real = 0
    for batch in loader:
        text = {k: v for k, v in batch.items() if k != "task_id"}
        out = pack(text)
        padded += batch["input_ids"].numel()
        packed += out["input_ids"].numel()
        real += int(batch["attention_mask"].sum())
    assert real <= packed < padded
    assert (packed - real) < 0.5 * (padded - real)


@pytest.mark.parametrize("method", sorted(PADDED))
def test_methods_that_cannot_pack_train_on_padded_batches_and_say_so_once(
        method: str, features: list[dict[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    settings = PADDED[method]
    reason = packing_conflict(METHODS[method], settings)
    assert reason and (("task ids" in reason) if method != "mtlora" else ("sequence router" in reason))
    factory = make_loader_factory(features, 8, collate_features, seed=1)

    def run(packed: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
        torch.manual_seed(0)
        model = prepared(method, settings, features)
        return model, train(model, METHODS[method], settings, factory,
                            config(max_steps=2, batch_size=8, pack_sequences=packed), progress=False).history

    plain_model, plain = run(False)
    with caplog.at_level(logging.WARNING, logger=packing.__name__):
        model, history = run(True)
    assert [r.getMessage() for r in caplog.records if r.name == packing.__name__] == [
        f"training on padded batches (train.pack_sequences has no effect here): {reason}"]
    assert history == plain  # bit for bit: the same padded batches
    want = trainable_state(plain_model)
    assert all(torch.equal(v, want[n]) for n, v in trainable_state(model).items())


def test_a_token_router_packs_but_a_sequence_router_does_not() -> None:
    mtlora = METHODS["mtlora"]
    assert packing_conflict(mtlora, MtLoraSettings(rank=2, n_heads=3, router="token")) is None
    assert packing_conflict(mtlora, MtLoraSettings(rank=2, n_heads=1, router="sequence")) is None  # no router
    assert packing_conflict(mtlora, MtLoraSettings(rank=2, n_heads=3, router="sequence"))


@pytest.mark.parametrize("field", ["pack_sequences", "labelled_logits_only"])
def test_loop_speedups_may_change_on_resume(field: str, features: list[dict[str, Any]], tmp_path: Path) -> None:
    settings = PACKED["lora"]
    factory = make_loader_factory(features, 8, collate_features, seed=0)
    train(prepared("lora", settings, features), METHODS["lora"], settings, factory, config(max_steps=2, batch_size=8),
          out_dir=tmp_path, progress=False)
    resumed = train(prepared("lora", settings, features), METHODS["lora"], settings, factory,
                    config(max_steps=2, batch_size=8, **{field: False}), out_dir=tmp_path, resume=True,
                    progress=False)
    assert resumed.resumed_from == 2  # same math: not a mismatch



def test_a_run_may_resume_with_the_loop_speedups_toggled_or_from_before_they_existed() -> None:
    from thanora.experiment.rundir import config_changes

    saved = {"train": {"lr": 1e-4, "log_every": 4}}  # a run folder written before the options existed
    for new in ({"train": {"lr": 1e-4, "log_every": 4, "pack_sequences": True, "labelled_logits_only": True}},
                {"train": {"lr": 1e-4, "log_every": 4, "pack_sequences": False, "labelled_logits_only": False}}):
        assert config_changes(saved, new) == []
    assert config_changes(saved, {"train": {"lr": 3e-4, "log_every": 4}}) == ["train.lr"]
