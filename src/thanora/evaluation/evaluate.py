"""Evaluation: option log-likelihood scoring, greedy generation, and per-task metrics (PEERS.md conventions).

``loglik`` mode ranks option continuations by log-likelihood (tokenised exactly as training does, through
:func:`thanora.data.formats.encode_example`); ``generate`` mode decodes greedily and applies the task metric. Examples
with an image need a ``processor`` (``AutoProcessor``-like: ``text=``, ``images=``) that expands the image
placeholder (:class:`thanora.data.formats.ImagePromptTokenizer`, shared with training); its other outputs
(``pixel_values``...) go to the model.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict, cast

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from thanora.data.example import Example
from thanora.data.formats import FORMATS, LETTERS, ImagePromptTokenizer, encode_example, format_prompt, option_targets
from thanora.evaluation.metrics import GENERATIVE_METRICS, letter_from_generation
from thanora.evaluation.sequences import (
    Row,
    accepts,
    attention_inputs,
    context_length,
    eval_mode,
    length_sorted_batches,
    pad_id_of,
    rows_for_prompt,
    stack_extras,
)

# format -> (allowed metrics, allowed modes); the first of each is the default.
_ALLOWED: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "ranked": (("accuracy",), ("loglik",)),
    "letter": (("accuracy",), ("loglik", "generate")),
    "generative": (tuple(GENERATIVE_METRICS), ("generate",)),
}
# lm-eval-harness's GSM8K stop sequences: a base model that keeps writing the next question is cut there.
_STOP_SEQUENCES = ("\n\n", "Question:")


@dataclass(frozen=True)
class EvalConfig:
    """Settings: ``batch_size`` sequences per forward pass ((prompt, option) pairs when scoring, prompts when
    generating), ``max_new_tokens`` (greedy decoding), ``length_normalize`` (mean log-prob per option token),
    ``pack_options`` (score all options of a prompt in one sequence with a 4D attention mask: about T× fewer
    tokens for T options; turn off for a model that does not accept 4D masks and position ids)."""

    batch_size: int = 16
    max_new_tokens: int = 32
    length_normalize: bool = True
    pack_options: bool = True

    def __post_init__(self) -> None:
        for name, value in (("batch_size", self.batch_size), ("max_new_tokens", self.max_new_tokens)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EvalConfig.{name} must be an integer >= 1, got {value!r}")
        if not isinstance(self.length_normalize, bool):
            raise ValueError(f"EvalConfig.length_normalize must be a bool, got {self.length_normalize!r}")


@dataclass(frozen=True)
class EvalTask:
    """One task to evaluate (independent of :mod:`thanora.data.tasks`): ``name`` (results key), ``examples``,
    ``answer_format`` (``ranked`` | ``letter`` | ``generative``), ``metric`` (``accuracy`` for ranked/letter;
    ``exact_match``, ``relaxed_accuracy`` or ``anls`` for generative), ``chat_template`` (wrap prompts as in
    training) and ``mode`` (``loglik`` for ranked/letter, ``generate`` for letter/generative). A ``metric`` or
    ``mode`` left ``None`` takes the format's default (listed first), resolved at construction."""

    name: str
    examples: Sequence[Example]
    answer_format: str
    metric: str | None = None
    chat_template: bool = False
    mode: str | None = None

    def __post_init__(self) -> None:
        if self.answer_format not in _ALLOWED:
            raise ValueError(f"task {self.name!r}: unknown answer format {self.answer_format!r}; expected {FORMATS}")
        if not self.examples:
            raise ValueError(f"task {self.name!r} has no examples")
        metrics, modes = _ALLOWED[self.answer_format]
        object.__setattr__(self, "metric", self.metric or metrics[0])
        object.__setattr__(self, "mode", self.mode or modes[0])
        if self.metric not in metrics or self.mode not in modes:
            raise ValueError(f"task {self.name!r}: metric {self.metric!r} / mode {self.mode!r} do not fit format "
                             f"{self.answer_format!r} (metrics {metrics}, modes {modes})")


class TaskMetrics(TypedDict):
    """Result of one task: ``correct`` holds the per-question score (0/1, or the ANLS value) in example order."""

    metric: str
    mode: str
    score: float
    n: int
    correct: list[float]


def _score_rows(
    model: nn.Module, rows: Sequence[Row], pad_id: int, device: torch.device | str, keep_ok: bool
) -> dict[int, tuple[float, int]]:
    """One right-padded forward pass; returns ``{slot: (sum of target log-probs, number of target tokens)}``."""
    width = max(len(r.ids) for r in rows)
    input_ids = torch.tensor([r.ids + [pad_id] * (width - len(r.ids)) for r in rows], device=device)  # (B, L)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    mask, positions = attention_inputs(rows, width, device, dtype)
    # Only logits from the earliest predicting position on are needed.
    first = min(pos[0] for r in rows for _, pos, _ in r.queries)
    kwargs: dict[str, Any] = stack_extras(rows, device, model)
    if positions is not None:
        kwargs["position_ids"] = positions
    if keep_ok:
        kwargs["logits_to_keep"] = width - first
    logits = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits  # (B, L', V)
    offset = width - logits.shape[1]
    queries = [(b, query) for b, row in enumerate(rows) for query in row.queries]
    b_idx = [b for b, (_, _, target) in queries for _ in target]
    pos = [p - offset for _, (_, positions_q, _) in queries for p in positions_q]
    tok = torch.tensor([t for _, (_, _, target) in queries for t in target], device=device)  # (T,)
    seg = torch.tensor([q for q, (_, (_, _, target)) in enumerate(queries) for _ in target], device=device)  # (T,)
    picked = logits[torch.tensor(b_idx, device=device), torch.tensor(pos, device=device)].float()  # (T, V)
    token_lp = picked.log_softmax(-1).gather(-1, tok[:, None])[:, 0].double()  # (T,)
    sums = torch.zeros(len(queries), dtype=torch.float64, device=device).index_add_(0, seg, token_lp).tolist()
    return {slot: (sums[q], len(target)) for q, (_, (slot, _, target)) in enumerate(queries)}


@torch.inference_mode()
def score_options(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], options: Sequence[Sequence[str]], cfg: EvalConfig,
    device: torch.device | str, images: Sequence[Any] | None = None, processor: Any = None, progress: bool = False,
) -> list[list[float]]:
    """Log-likelihood of each option continuation given its prompt.

    (prompt, option) pairs are encoded as :func:`~thanora.data.formats.encode_example` does, sorted by length (longest
    first) and run ``cfg.batch_size`` at a time with right padding and an attention mask; options that are one
    token each (letters) share one sequence per prompt. The model is put in eval mode and its mode restored.

    Args:
        model: Causal LM (or vision-language model) already on ``device``.
        tokenizer: Its tokenizer.
        prompts: N prompt texts.
        options: For each prompt, its option continuations (e.g. from :func:`~thanora.data.formats.option_targets`).
        cfg: Evaluation settings (``batch_size``, ``length_normalize``).
        device: Device of the model.
        images: Optional N images (paths, PIL images or ``None``); needs ``processor`` where set.
        processor: ``AutoProcessor``-like callable for image prompts.
        progress: Show a progress bar (unit: pairs).

    Returns:
        For each prompt, one float per option: mean log-prob per option token if ``cfg.length_normalize``, else the
        summed log-prob (natural log).
    """
    if len(prompts) != len(options) or (images is not None and len(images) != len(prompts)):
        raise ValueError("prompts, options and images must have the same length")
    if any(not opts for opts in options):
        raise ValueError("every prompt needs at least one option")
    offsets = [0, *itertools.accumulate(len(opts) for opts in options)]
    images = images if images is not None else [None] * len(prompts)
    results: dict[int, tuple[float, int]] = {}
    max_length, pad_id, keep_ok = context_length(model), pad_id_of(tokenizer), accepts(model, "logits_to_keep")
    pack = cfg.pack_options and accepts(model, "position_ids")

    def encode(i: int) -> list[Row]:
        return rows_for_prompt(tokenizer, processor, prompts[i], options[i], images[i], offsets[i], max_length,
                                pack)

    bar = tqdm(total=offsets[-1], desc="score", unit="pair", disable=not progress, leave=False)
    with eval_mode(model):
        for batch in length_sorted_batches(len(prompts), encode, cfg.batch_size):
            results.update(_score_rows(model, batch, pad_id, device, keep_ok))
            bar.update(sum(len(r.queries) for r in batch))
    bar.close()
    scores = [s / n if cfg.length_normalize else s for s, n in (results[k] for k in range(offsets[-1]))]
    return [scores[offsets[i] : offsets[i + 1]] for i in range(len(prompts))]


@torch.inference_mode()
def generate_answers(
    model: nn.Module, tokenizer: Any, prompts: Sequence[str], cfg: EvalConfig, device: torch.device | str,
    images: Sequence[Any] | None = None, processor: Any = None, progress: bool = False,
) -> list[str]:
    """Greedy answers to prompts, without the prompt.

    Prompts are encoded as the prompt part of :func:`~thanora.data.formats.encode_example`, sorted by length and left-
    padded in batches of ``cfg.batch_size`` (``tokenizer.padding_side`` is ``"left"`` during the call, then
    restored). Each answer is cut at the first stop sequence (a blank line or ``"Question:"``) and stripped.

    Args:
        model, tokenizer, prompts, device, images, processor: As for :func:`score_options` (the tokenizer needs an
            EOS token).
        cfg: Evaluation settings (``batch_size``, ``max_new_tokens``).
        progress: Show a progress bar (unit: prompts).

    Returns:
        N generated strings, in prompt order.
    """
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("generation needs a tokenizer with an eos_token_id")
    if images is not None and len(images) != len(prompts):
        raise ValueError("prompts and images must have the same length")
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=cfg.max_new_tokens, pad_token_id=pad_id_of(tokenizer),
                               eos_token_id=eos)
    images = images if images is not None else [None] * len(prompts)
    max_length = max(context_length(model) - cfg.max_new_tokens, 1) + 1  # + 1: the EOS below

    def encode(i: int) -> list[Row]:
        # The prompt part of encode_example (BOS, truncation...): an empty answer leaves EOS as the only target.
        image = images[i]
        encoder = tokenizer if image is None else ImagePromptTokenizer(processor, tokenizer, prompts[i], image)
        ids = encode_example(encoder, prompts[i], "", max_length, add_eos=True)["input_ids"][:-1]
        return [Row(ids, [(i, len(ids), [])], dict(getattr(encoder, "extras", {})))]

    answers = [""] * len(prompts)
    bar = tqdm(total=len(prompts), desc="generate", unit="q", disable=not progress, leave=False)
    with eval_mode(model, tokenizer):
        for batch in length_sorted_batches(len(prompts), encode, cfg.batch_size):
            inputs = tokenizer.pad({"input_ids": [r.ids for r in batch]}, return_tensors="pt").to(device)  # left
            inputs.update(stack_extras(batch, device, model))
            out = cast(Any, model).generate(**inputs, generation_config=gen_cfg)  # (B, L + new)
            texts = tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
            for row, text in zip(batch, texts, strict=True):
                cut = min((k for k in (text.find(stop) for stop in _STOP_SEQUENCES) if k >= 0), default=len(text))
                answers[row.queries[0][0]] = text[:cut].strip()
            bar.update(len(batch))
    bar.close()
    return answers


def _reference(example: Example) -> str:
    return example.choices[int(example.answer)] if example.choices else str(example.answer)


def evaluate_task(
    model: nn.Module, tokenizer: Any, task: EvalTask, cfg: EvalConfig, device: torch.device | str,
    processor: Any = None, progress: bool = False,
) -> TaskMetrics:
    """Evaluate one task.

    ``loglik``: the option with the highest :func:`score_options` score (letters `` A``, `` B``... for ``letter``)
    is the prediction. ``generate``: greedy decoding, then the first standalone letter (``letter``) or the task
    metric against the reference (``generative``; for an MC example the correct option text).

    Args:
        model, tokenizer, cfg, device: As for :func:`score_options`.
        task: The task.
        processor: ``AutoProcessor``-like callable, required when examples have images; its ``image_token`` is the
            placeholder put in the prompt.
        progress: Show progress bars.

    Returns:
        The task's :class:`TaskMetrics`.
    """
    fmt, examples = task.answer_format, list(task.examples)
    image_token = getattr(processor, "image_token", None)
    prompts = [format_prompt(ex, fmt, tokenizer, task.chat_template, image_token) for ex in examples]
    images = [ex.image for ex in examples] if any(ex.image for ex in examples) else None
    if task.mode == "loglik":
        options = [option_targets(ex, fmt, tokenizer, task.chat_template) for ex in examples]
        scores = score_options(model, tokenizer, prompts, options, cfg, device, images, processor, progress)
        best = [max(range(len(s)), key=s.__getitem__) for s in scores]  # first maximum on ties
        correct = [float(k == ex.answer) for k, ex in zip(best, examples, strict=True)]
    else:
        texts = generate_answers(model, tokenizer, prompts, cfg, device, images, processor, progress)
        if fmt == "letter":
            letters = [letter_from_generation(t, len(ex.choices)) for t, ex in zip(texts, examples, strict=True)]
            correct = [float(got == LETTERS[int(ex.answer)]) for got, ex in zip(letters, examples, strict=True)]
        else:
            metric = GENERATIVE_METRICS[str(task.metric)]
            correct = [metric(t, _reference(ex)) for t, ex in zip(texts, examples, strict=True)]
    score = math.fsum(correct) / len(correct)
    return TaskMetrics(metric=str(task.metric), mode=str(task.mode), score=score, n=len(correct), correct=correct)


def evaluate(
    model: nn.Module, tokenizer: Any, tasks: Sequence[EvalTask], cfg: EvalConfig, device: torch.device | str,
    progress: bool = True, processor: Any = None,
) -> dict[str, TaskMetrics]:
    """Evaluate several tasks, one after the other.

    Args:
        model, tokenizer, cfg, device, processor: As for :func:`evaluate_task`.
        tasks: Tasks with distinct names.
        progress: Show a progress bar per task.

    Returns:
        ``{task name: TaskMetrics}`` in task order.
    """
    if len({task.name for task in tasks}) != len(tasks):
        raise ValueError(f"task names must be distinct, got {[task.name for task in tasks]}")
    results: dict[str, TaskMetrics] = {}
    for task in tasks:
        if progress:
            tqdm.write(f"evaluating {task.name} ({len(task.examples)} examples, {task.mode})")
        results[task.name] = evaluate_task(model, tokenizer, task, cfg, device, processor, progress)
    return results


def average(results: Mapping[str, TaskMetrics]) -> float:
    """Unweighted mean of the ``score`` of each task in ``results`` (the output of :func:`evaluate`)."""
    if not results:
        raise ValueError("no task results to average")
    return math.fsum(r["score"] for r in results.values()) / len(results)
