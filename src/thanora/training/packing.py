"""Packed training batches: a right-padded text batch re-laid as a few rows of whole sequences, no padding between.

A mixed batch is padded to its longest sequence: on the 4-task mixture two BoolQ passages (~300 tokens) pad six
short questions to their length, so most of the step's compute goes to padding. `pack` lays the batch's sequences
end to end into rows no longer than its longest sequence (first-fit decreasing, so a row never costs more than one
padded row did), gives every sequence its own position ids (0, 1, ...) and drops the attention mask: transformers'
mask builder (`masking_utils.find_packed_sequence_indices`, sdpa / eager / flex) then reads the sequence boundaries
from the position ids and lets each token attend within its own sequence only, which is the padded batch's
attention exactly (flash-attention 2 reads the same position ids). The tail of a row that is not full is one more
"sequence" of filler tokens (its own positions, labels -100), attended by nothing else.

Same loss, gradients and updates as the padded batch to float rounding (tested against it on tiny models for every
method that packs): the loss is the mean cross-entropy over the same labelled tokens; the label of each sequence's
first token is set to -100, as the shifted loss never reads it in the padded batch either. With dropout > 0 the
dropout draws differ (the same distribution over different tensor shapes). The model does not see
``attention_mask`` (and runs with ``use_cache=False``: with a cache transformers does not look for packed
sequences); the regulariser does, as the mask of real tokens of the packed layout, so a router's balance
loss counts the same tokens as before.

Not in a library: transformers' ``DataCollatorWithFlattening`` packs a whole batch into one row (attention over all
B·L tokens at once, up to B times a padded batch's attention cost on CPU, where the masked blocks are computed
anyway) and works on feature lists, before the mixture sampler has built the batch (`benchmarks/throughput.py`
measures it with HF Trainer beside this loop).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from thanora.adapters.record import unwrap
from thanora.methods.base import Method
from thanora.training.loss import IGNORE_INDEX

logger = logging.getLogger(__name__)

PACKABLE = frozenset({"input_ids", "attention_mask", "labels"})  # any other key (images, task ids): not packed


def packable(batch: Mapping[str, Any]) -> bool:
    """Whether `pack` applies: a text batch of ``input_ids``, ``attention_mask``, ``labels`` (B, L) only, with
    right padding (every row's real tokens first)."""
    if set(batch) != PACKABLE or batch["input_ids"].dim() != 2:
        return False
    mask = batch["attention_mask"].bool()
    lengths = mask.sum(1)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return bool((mask == (positions[None] < lengths[:, None])).all())


def pack(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The packed form of a right-padded text batch (see the module docstring).

    Returns:
        ``input_ids``, ``labels``, ``position_ids`` (R, W) for the model, and ``attention_mask`` (R, W), the real
        tokens of that layout, for the regulariser only (a model given it would not see the packing).
    """
    ids, mask, labels = batch["input_ids"], batch["attention_mask"].bool(), batch["labels"]
    lengths = mask.sum(1).tolist()
    capacity = max(lengths)
    rows: list[list[int]] = []  # sequence indices per row
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):  # first-fit decreasing
        fits = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if fits is None:
            rows.append([i])
            room.append(capacity - lengths[i])
        else:
            rows[fits].append(i)
            room[fits] -= lengths[i]
    width = capacity - min(room)
    out = {name: torch.full((len(rows), width), fill, dtype=ids.dtype, device=ids.device)
           for name, fill in (("input_ids", 0), ("labels", IGNORE_INDEX), ("position_ids", 0))}
    real = torch.zeros((len(rows), width), dtype=batch["attention_mask"].dtype, device=ids.device)
    for r, members in enumerate(rows):
        start = 0
        for i in sorted(members):  # batch order within a row
            n = lengths[i]
            out["input_ids"][r, start:start + n] = ids[i, :n]
            out["labels"][r, start + 1:start + n] = labels[i, 1:n]
            out["position_ids"][r, start:start + n] = torch.arange(n, device=ids.device)
            real[r, start:start + n] = 1
            start += n
        out["position_ids"][r, start:] = torch.arange(width - start, device=ids.device)  # the filler: its own block
    return {**out, "attention_mask": real}


def packing_is_exact(model: nn.Module, batch: Mapping[str, Tensor], tokens: int = 12) -> bool:
    """Whether ``model`` attends within packed sequences only, at the precision it runs in.

    The batch's first two sequences (cut to ``tokens``) are run three ways: padded (the reference), packed in one row
    with positions restarting at the second (`pack`'s layout) and crossed, the same row with positions running on (one
    sequence: the second sees the first). A model that reads sequence boundaries from the position ids gives the
    padded logits up to rounding; one that does not (custom attention) lets the second sequence see the first, as
    crossed does. The packed error must be under a quarter of the crossed one (or 1e-4 of the logits' scale):
    rounding is far below what crossing costs at any precision, so the check needs no per-dtype tolerance. Measured on
    SmolLM2 (two 12-token sequences, relative to the largest logit): packed 1.5e-6 in float32 and 4.4e-2 under bf16
    autocast (the mixed precision a CUDA run uses by default, which a fixed float32 tolerance refused), crossed 0.60
    in both. Eval mode (no dropout), no gradients; the model's own forward (with its autocast, if the accelerator
    added one)."""
    if batch["input_ids"].shape[0] < 2:
        return True
    lengths = batch["attention_mask"][:2].sum(1).clamp(max=tokens).tolist()
    ids = batch["input_ids"][:2, :max(lengths)].clone()
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, :n] = 1
    row = torch.cat([ids[0, :lengths[0]], ids[1, :lengths[1]]])[None]
    restarting = torch.cat([torch.arange(n, device=ids.device) for n in lengths])[None]
    running_on = torch.arange(sum(lengths), device=ids.device)[None]
    inner = unwrap(model)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            padded = inner(input_ids=ids, attention_mask=mask, use_cache=False).logits[mask.bool()].float()
            packed, crossed = [inner(input_ids=row, position_ids=positions, use_cache=False).logits[0].float()
                               for positions in (restarting, running_on)]
    finally:
        inner.train(was_training)
    packed_error = float((padded - packed).abs().max())
    crossed_error = float((padded - crossed).abs().max())
    return packed_error <= max(0.25 * crossed_error, 1e-4 * (float(padded.abs().max()) or 1.0))


def packing_conflict(method: Method, settings: Any) -> str | None:
    """Why ``method`` with ``settings`` trains on padded batches whatever ``train.pack_sequences`` says, or ``None``:
    a method that reads per-sample task ids (a packed row would hold several tasks' samples) or declares a
    `Method.packing_conflict`."""
    if method.task_id_at_train:
        return f"{method.name} reads per-sample task ids, which packing would mix"
    return method.packing_conflict(settings) if method.packing_conflict is not None else None


class Packer:
    """The training loop's packing of micro-batches (``TrainConfig.pack_sequences``): checks once per run that the
    model attends within packed sequences (`packing_is_exact`), then packs every batch that `packable` accepts.
    A method that cannot pack (``conflict``, see `packing_conflict`) or a model that fails the check trains on padded
    batches; batches that cannot be laid out (image inputs, left padding) stay padded. Each is said once."""

    def __init__(self, enabled: bool, conflict: str | None = None) -> None:
        self.enabled, self.checked, self.said = enabled, False, set()
        if enabled and conflict:
            self._say(f"training on padded batches (train.pack_sequences has no effect here): {conflict}")
            self.enabled = False

    def __call__(self, model: nn.Module, inputs: dict[str, Tensor], batch: dict[str, Tensor]
                 ) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """(the model's inputs, the regulariser's batch) of one micro-batch: both packed, or as given."""
        if not self.enabled:
            return inputs, batch
        if not packable(inputs):
            what = sorted(set(inputs) - PACKABLE) or "left padding"
            self._say(f"batches holding {what} stay padded (train.pack_sequences lays out right-padded text only)")
            return inputs, batch
        if bool(inputs["attention_mask"].all()):
            return inputs, batch  # no padding: the packed layout would be the same batch
        if not self.checked:
            self.checked = True
            if not packing_is_exact(model, inputs):
                self.enabled = False
                self._say(f"training on padded batches (train.pack_sequences has no effect here): "
                          f"{type(unwrap(model)).__name__}'s attention crosses sequence boundaries in a packed row "
                          "(its outputs differ from the padded batch's); set train.pack_sequences: false to silence")
                return inputs, batch
        packed = pack(inputs)
        # no cache: transformers reads packed sequences from the position ids only without one
        return {**{k: v for k, v in packed.items() if k != "attention_mask"}, "use_cache": False}, packed

    def _say(self, message: str) -> None:
        if message not in self.said:
            self.said.add(message)
            logger.warning(message)
