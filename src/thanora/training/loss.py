"""The task loss of a training micro-batch, with the output head applied where a label is predicted only.

The loss of answer-only training (``labels`` = -100 on the prompt and padding) reads the logits of the positions that
predict a labelled token, a few per sequence, but a causal LM's forward applies its output head (49,152 × 576 on
SmolLM2: a fifth of the model's multiply-adds) and the float32 log-softmax to every position. `task_loss` gathers
the hidden states of the positions that matter on their way into the head (a forward pre-hook on
``get_output_embeddings()``, so the decoder, a vision-language model's image merging, PEFT's and every method's own
layers and hooks run unchanged) and takes the model's own causal-LM loss on them: the mean cross-entropy over the
labelled tokens, computed in float32, exactly the loss ``model(**batch).loss`` returns (to float rounding; tested
in value and gradients against the full logits). Not in a library: transformers' ``logits_to_keep`` keeps the same
positions for every row of a batch (the last k, or one index list), while the labelled positions differ per row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from thanora.adapters.record import unwrap

IGNORE_INDEX = -100


def task_loss(model: nn.Module, inputs: Mapping[str, Any], labelled_only: bool = True) -> Tensor:
    """The causal-LM loss of ``inputs`` (which hold ``labels``).

    Args:
        model: the training model (DDP-wrapped or not); called as ``model(**inputs)`` without ``labels``.
        inputs: the micro-batch: ``input_ids``, ``attention_mask``, ``labels`` (B, L) and anything else the forward
            takes (``pixel_values``, ``task_id``...).
        labelled_only: apply the head to the labelled positions only; ``False`` (or a model without an output
            embedding module) returns the model's own loss over the full logits.

    Raises:
        ValueError: ``inputs`` has no ``labels``, or the model returned no loss.
    """
    labels = inputs.get("labels")
    if not isinstance(labels, Tensor):
        raise ValueError("training batches must contain 'labels' (answer-only: -100 on the prompt)")
    head = unwrap(model).get_output_embeddings() if hasattr(unwrap(model), "get_output_embeddings") else None
    if not labelled_only or not isinstance(head, nn.Module):
        loss = model(**inputs).loss
        if loss is None:
            raise ValueError("the model returned no loss: batches must contain 'labels'")
        return loss
    targets = labels[:, 1:]
    predicts = torch.zeros_like(labels, dtype=torch.bool)
    predicts[:, :-1] = targets != IGNORE_INDEX  # position t predicts token t + 1

    def gather(_module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.shape[:2] != predicts.shape:
            raise ValueError(f"{type(unwrap(model)).__name__} feeds its output head {tuple(hidden.shape)} for a "
                             f"batch of {tuple(predicts.shape)} tokens, so the head cannot be applied to the "
                             "labelled positions only; set train.labelled_logits_only: false")
        return (hidden[predicts], *args[1:])

    handle = head.register_forward_pre_hook(gather)
    try:
        logits = model(**{k: v for k, v in inputs.items() if k != "labels"}).logits  # (N, V)
    finally:
        handle.remove()
    return F.cross_entropy(logits.float(), targets[targets != IGNORE_INDEX])
