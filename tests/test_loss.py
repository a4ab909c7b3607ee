"""The faster training loop computes what the plain one does: the head on labelled positions only
(`thanora.training.loss.task_loss`) gives the model's own loss and gradients, every method trains to the same losses,
gradient norms and weights with and without it, and the fused AdamW makes the same updates as the standard one."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from conftest import llava_batch, random_batch, tiny_gpt2, tiny_llama, tiny_llava
from test_train import RECOMPUTED, assert_trained_alike, collate_features, config, prepared, trainable_state
from thanora.data.formats import IGNORE_INDEX
from thanora.methods.dare import DareSettings
from thanora.methods.registry import METHODS
from thanora.training import train as train_module
from thanora.training.loss import task_loss
from thanora.training.train import make_loader_factory, make_optimizer, train

EVERY_METHOD = {**RECOMPUTED, "dare": DareSettings(rank=4, lora_dropout=0.1)}


def _answer_only(batch: dict[str, torch.Tensor], answer: int = 3) -> dict[str, torch.Tensor]:
    """Labels on the last ``answer`` real tokens of each row (its answer), -100 elsewhere."""
    labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
    for row, n in enumerate(batch["attention_mask"].sum(1).tolist()):
        labels[row, n - answer:n] = batch["input_ids"][row, n - answer:n]
    return {**batch, "labels": labels}


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gpt2, tiny_llava], ids=["llama", "gpt2", "llava"])
def test_labelled_positions_only_give_the_models_loss_and_gradients(builder: Any) -> None:
    model = builder().eval()  # no dropout: the three forwards below compute the same thing
    batch = _answer_only(llava_batch(0) if builder is tiny_llava else random_batch(0, batch=4, length=14))
    params = [p for p in model.parameters() if p.requires_grad]

    def loss_and_grads(labelled_only: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)  # the same dropout masks, should the model have any
        loss = task_loss(model, batch, labelled_only)
        return loss.detach(), list(torch.autograd.grad(loss, params, allow_unused=True))

    full, full_grads = loss_and_grads(False)
    gathered, grads = loss_and_grads(True)
    assert torch.equal(full, model(**batch).loss.detach())  # labelled_only=False is the model's own loss
    # float32 (the loss is float32 whatever the model's dtype, as transformers computes it): rounding only
    torch.testing.assert_close(gathered, full, rtol=1e-6, atol=0)
    for got, want in zip(grads, full_grads, strict=True):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-7)


def test_the_head_hook_is_removed_even_when_the_forward_fails() -> None:
    model = tiny_llama()
    batch = _answer_only(random_batch(0))
    with pytest.raises(IndexError):
        task_loss(model, {**batch, "input_ids": batch["input_ids"] + 10_000})
    assert not model.lm_head._forward_pre_hooks


def test_labels_are_required() -> None:
    with pytest.raises(ValueError, match="must contain 'labels'"):
        task_loss(tiny_llama(), random_batch(0))


@pytest.mark.parametrize("method", sorted(EVERY_METHOD))
def test_every_method_trains_identically_with_the_head_on_labelled_positions(method: str,
                                                                               features: list[dict[str, Any]]) -> None:
    settings = EVERY_METHOD[method]
    factory = make_loader_factory(features, 4, collate_features, seed=1)

    def run(labelled_only: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
        model = prepared(method, settings, features)
        history = train(model, METHODS[method], settings, factory,
                        config(max_steps=3, labelled_logits_only=labelled_only), progress=False).history
        return model, history

    plain_model, plain = run(False)
    model, gathered = run(True)
    assert_trained_alike(model, gathered, plain_model, plain)


def test_the_fused_optimizer_makes_the_standard_updates(features: list[dict[str, Any]],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    settings = RECOMPUTED["thanora"]
    factory = make_loader_factory(features, 4, collate_features, seed=1)
    fused = make_optimizer([nn.Parameter(torch.zeros(2))], config())
    assert fused.defaults["fused"] is True  # CPU floating point: torch's fused AdamW

    def run() -> tuple[nn.Module, list[dict[str, Any]]]:
        model = prepared("thanora", settings, features)
        return model, train(model, METHODS["thanora"], settings, factory, config(max_steps=4), progress=False).history

    model, history = run()
    monkeypatch.setattr(train_module, "make_optimizer", lambda params, cfg: torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay))
    plain_model, plain = run()
    assert [h["loss"] for h in history] == pytest.approx([h["loss"] for h in plain], rel=1e-5)
    want = trainable_state(plain_model)
    for name, value in trainable_state(model).items():
        torch.testing.assert_close(value, want[name], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def features() -> list[dict[str, Any]]:
    from test_train import synthetic_features

    return synthetic_features(32)
