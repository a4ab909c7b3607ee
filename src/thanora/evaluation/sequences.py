"""How evaluation turns prompts and options into model inputs: rows, option packing, attention masks, batches.

A `Row` is one sequence to run and the continuations read off it. Scoring packs all options of a prompt into one
row when they share the prompt's tokens (a 4D attention mask lets each option see the prompt and itself only, and
position ids restart after the prompt), so each option's log-likelihood equals a separate prompt + option pass at a
fraction of the tokens; generation uses one row per prompt. Rows are encoded a chunk of prompts at a time and sorted
by length (longest first) before batching.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from thanora.data.formats import IGNORE_INDEX, ImagePromptTokenizer, encode_example

# Prompts encoded at a time: bounds the memory of processor outputs (images) while still sorting by length.
CHUNK_PROMPTS = 256
NO_LIMIT = 1 << 30


@dataclass
class Row:
    """One sequence to run: token ids, the option continuations read off it, and per-sample processor outputs.

    A *packed* row holds one prompt followed by all its options (``spans``: (start, length) of each option); a 4D
    attention mask lets every option see the prompt and itself only, and position ids restart after the prompt,
    so each option's log-likelihood equals a separate prompt + option pass at a fraction of the tokens.
    """

    ids: list[int]
    queries: list[tuple[int, list[int], list[int]]]  # (output slot, positions whose logits predict, target ids)
    extras: dict[str, Tensor] = field(default_factory=dict)  # e.g. pixel_values (1, 3, H, W)
    spans: list[tuple[int, int]] | None = None  # packed rows: (start, length) of each option after the prompt


def context_length(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(config, "max_position_embeddings", None)
    return int(limit) if isinstance(limit, int) and limit > 0 else NO_LIMIT


def accepts(model: nn.Module, argument: str) -> bool:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wrappers pass kwargs on
    return argument in inspect.signature(base.forward).parameters


@contextmanager
def eval_mode(model: nn.Module, tokenizer: Any = None) -> Iterator[None]:
    """Eval mode (and left padding when a tokenizer is given) for the block; the previous states are restored."""
    was_training, side = model.training, getattr(tokenizer, "padding_side", None)
    model.eval()
    if tokenizer is not None:
        tokenizer.padding_side = "left"
    try:
        yield
    finally:
        model.train(was_training)
        if tokenizer is not None:
            tokenizer.padding_side = side


def pad_id_of(tokenizer: Any) -> int:
    pad = getattr(tokenizer, "pad_token_id", None)
    return int(pad if pad is not None else getattr(tokenizer, "eos_token_id", None) or 0)


def stack_extras(rows: Sequence[Row], device: torch.device | str, model: nn.Module) -> dict[str, Tensor]:
    """Concatenate per-sample processor outputs along dim 0 (rows without an image add nothing), floats cast to the
    model's dtype."""
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    keys = {k for row in rows for k in row.extras}
    batch = {k: torch.cat([row.extras[k] for row in rows if k in row.extras]).to(device) for k in sorted(keys)}
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in batch.items()}


def length_sorted_batches(n_prompts: int, encode: Callable[[int], list[Row]], batch_size: int) -> Iterator[list[Row]]:
    """Encode prompts a chunk at a time, sort the chunk's rows by length (longest first) and cut it into batches."""
    for lo in range(0, n_prompts, CHUNK_PROMPTS):
        rows = [row for i in range(lo, min(lo + CHUNK_PROMPTS, n_prompts)) for row in encode(i)]
        rows.sort(key=lambda r: len(r.ids), reverse=True)
        yield from (rows[b : b + batch_size] for b in range(0, len(rows), batch_size))


def rows_for_prompt(
    tokenizer: Any, processor: Any, prompt: str, targets: Sequence[str], image: Any, slot: int, max_length: int,
    pack: bool,
) -> list[Row]:
    """Encode one prompt with each option: one packed row when the options share the prompt tokens (text only),
    else one row per option."""
    encoder = tokenizer if image is None else ImagePromptTokenizer(processor, tokenizer, prompt, image)
    rows: list[Row] = []
    for j, target in enumerate(targets):
        enc = encode_example(encoder, prompt, target, max_length)
        start = next(k for k, label in enumerate(enc["labels"]) if label != IGNORE_INDEX)
        extras = dict(getattr(encoder, "extras", {}))
        target_ids = enc["input_ids"][start:]
        rows.append(Row(enc["input_ids"], [(slot + j, list(range(start - 1, len(enc["input_ids"]) - 1)),
                                             target_ids)], extras))
    prompt_ids = rows[0].ids[: rows[0].queries[0][1][0] + 1]
    n_prompt = len(prompt_ids)
    packed_len = n_prompt + sum(len(r.queries[0][2]) for r in rows)
    if (len(rows) < 2 or image is not None or not pack or packed_len > max_length
            or any(r.ids[:n_prompt] != prompt_ids for r in rows)):
        return rows
    ids, queries, spans = list(prompt_ids), [], []
    for r in rows:
        slot_j, _, target_ids = r.queries[0]
        start = len(ids)
        queries.append((slot_j, [n_prompt - 1, *range(start, start + len(target_ids) - 1)], target_ids))
        spans.append((start, len(target_ids)))
        ids.extend(target_ids)
    return [Row(ids, queries, {}, spans)]


def attention_inputs(rows: Sequence[Row], width: int, device: torch.device | str, dtype: torch.dtype
               ) -> tuple[Tensor, Tensor | None]:
    """The batch's attention mask: 2D (B, L) padding mask when no row is packed, else a 4D additive (B, 1, L, L)
    mask plus position ids (B, L) that restart after the prompt for every option of a packed row."""
    if all(r.spans is None for r in rows):
        mask = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows], device=device)
        return mask, None
    allowed = torch.zeros(len(rows), width, width, dtype=torch.bool)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    for b, row in enumerate(rows):
        n = len(row.ids)
        n_prompt = row.spans[0][0] if row.spans else n
        allowed[b, :n_prompt, :n_prompt] = causal[:n_prompt, :n_prompt]
        positions[b, :n_prompt] = torch.arange(n_prompt)
        for start, length in row.spans or []:
            allowed[b, start:start + length, :n_prompt] = True
            allowed[b, start:start + length, start:start + length] = causal[:length, :length]
            positions[b, start:start + length] = torch.arange(n_prompt, n_prompt + length)
        allowed[b, n:, n:] = torch.eye(width - n, dtype=torch.bool)  # padding attends to itself: no empty rows
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[:, None].to(device), positions.to(device)
