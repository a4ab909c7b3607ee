"""Tasks: configuration, seeded splits, tokenised features and the multi-task mixture sampler."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from thanora.data.example import Example
from thanora.data.formats import collate, encode_example, encode_image_example, format_prompt, format_target
from thanora.data.sources import PACKAGED, load_source
from thanora.data.splits import split_examples, split_fingerprint

AnswerFormat = Literal["ranked", "letter", "generative"]
Metric = Literal["accuracy", "exact_match", "relaxed_accuracy", "anls"]
Sampling = Literal["proportional", "uniform", "temperature"]

logger = logging.getLogger(__name__)

_DEFAULT_METRIC = {"ranked": "accuracy", "letter": "accuracy", "generative": "exact_match"}


@dataclass(frozen=True)
class TaskConfig:
    """One task of a mixture (a YAML ``tasks:`` item).

    Attributes:
        name: identifier used in reports and rank plans.
        source: ``csqa``, ``obqa``, ... (packaged benchmarks), ``hf:<id>[:<config>]``, ``jsonl:<path>``, ``csv:<path>``.
        source_split: split of the source to read (None: its first/default split). Local files have no splits.
        eval_source: if set, evaluate on this source (e.g. ``jsonl:dev.jsonl``) and train on ``source``.
        eval_source_split: if set, evaluate on this split of the source (e.g. OBQA ``test``) and train on
            ``source_split``. Without ``eval_source`` and ``eval_source_split``, train / eval / calibration are
            disjoint seeded slices of one split. Evaluating on the split trained on is refused (a leak).
        answer_format: ``ranked`` (option text is the answer, scored by log-likelihood), ``letter`` or
            ``generative``.
        metric: None = accuracy for multiple choice, exact_match for generative.
        n_train: training examples.
        n_eval: evaluation examples.
        n_calibration: calibration examples (drawn from the training slice, as the paper previews instructions).
    """

    name: str
    source: str
    source_split: str | None = None
    eval_source: str | None = None
    eval_source_split: str | None = None
    answer_format: AnswerFormat = "ranked"
    metric: Metric | None = None
    n_train: int = 500
    n_eval: int = 200
    n_calibration: int = 64

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"tasks[].name {self.name!r} must be an identifier (letters, digits, underscores)")
        if self.answer_format not in _DEFAULT_METRIC:
            raise ValueError(f"tasks[{self.name}].answer_format must be one of {sorted(_DEFAULT_METRIC)}, "
                             f"got {self.answer_format!r}")
        if self.metric is not None and self.metric not in ("accuracy", "exact_match", "relaxed_accuracy", "anls"):
            raise ValueError(f"tasks[{self.name}].metric {self.metric!r} is unknown; use accuracy, exact_match, "
                             "relaxed_accuracy or anls")
        for field in ("n_train", "n_eval", "n_calibration"):
            if getattr(self, field) < 1:
                raise ValueError(f"tasks[{self.name}].{field} must be >= 1, got {getattr(self, field)}")
        if self.n_calibration > self.n_train:
            raise ValueError(f"tasks[{self.name}].n_calibration ({self.n_calibration}) cannot exceed n_train "
                             f"({self.n_train}): calibration samples are drawn from the training slice")
        for field, source, split in (("source_split", self.source, self.source_split),
                                     ("eval_source_split", self.eval_source or self.source, self.eval_source_split)):
            if split is not None and is_local_file(source):
                fix = ("give the evaluation questions as their own file in tasks[].eval_source" if field.startswith(
                    "eval") else "drop it")
                raise ValueError(f"tasks[{self.name}].{field}: {source.partition(':')[0]}: files have no splits; "
                                 f"{fix}")
        if self.evaluates_on_training_split:
            raise ValueError(f"tasks[{self.name}].eval_source_split={self.eval_source_split!r} is the split it "
                             "trains on: the evaluation set would be the training set; drop eval_source_split (train "
                             "and eval become disjoint slices of one split) or name another split")
        if self.eval_source is not None and self.eval_source == self.source and self.eval_source_split is None:
            raise ValueError(f"tasks[{self.name}].eval_source is the training source: the evaluation set would "
                             "overlap the training set; drop eval_source (disjoint slices of one source) or give "
                             "another file")

    @property
    def evaluates_on_training_split(self) -> bool:
        """Whether the config evaluates on the very split it trains on (defaults resolved for packaged sources)."""
        if self.eval_source_split is None or (self.eval_source not in (None, self.source)):
            return False
        return _resolved_split(self.source, self.eval_source_split) == _resolved_split(self.source, self.source_split)

    @property
    def resolved_metric(self) -> str:
        """The metric, with the format's default filled in."""
        return self.metric or _DEFAULT_METRIC[self.answer_format]


def is_local_file(source: str) -> bool:
    """Whether ``source`` names a local file (``jsonl:`` / ``csv:``)."""
    return source.partition(":")[0] in ("jsonl", "csv") and ":" in source


def _resolved_split(source: str, split: str | None) -> str | None:
    """``split``, or the source's default split when ``None`` (the first packaged split; ``train`` for ``hf:``)."""
    if split is not None:
        return split
    if source.startswith("hf:"):
        return "train"
    splits = PACKAGED.get(source)
    return next(iter(splits)) if splits else None


@dataclass(frozen=True)
class DataConfig:
    """How tasks become batches.

    Attributes:
        max_length: maximum tokens per example (the prompt is cut from the left, never the answer).
        chat_template: wrap prompts with the tokenizer's chat template.
        sampling: mixture sampling: ``proportional`` (every example once per epoch), ``uniform`` (each task
            equally often) or ``temperature`` (p_t ∝ n_t^(1/T)).
        sampling_temperature: T of temperature sampling.
        stratified: every batch holds examples of every task (needed by Align-LoRA).
        calibration_batch_size: batch size of the calibration forward passes.
        group_by_length: batches of samples of similar length (`thanora.data.mixture`): less padding, the same
            samples per epoch, but each batch tends to hold fewer tasks when their lengths differ; off by default.
        length_window: samples sorted together by ``group_by_length`` (a few hundred: long enough to group, short
            enough to keep the order random).
        seed: seed of the splits.
    """

    max_length: int = 256
    chat_template: bool = False
    sampling: Sampling = "proportional"
    sampling_temperature: float = 2.0
    stratified: bool = False
    calibration_batch_size: int = 8
    group_by_length: bool = False
    length_window: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampling not in ("proportional", "uniform", "temperature"):
            raise ValueError(f"data.sampling must be proportional, uniform or temperature, got {self.sampling!r}")
        if self.sampling_temperature <= 0:
            raise ValueError("data.sampling_temperature must be > 0")
        if self.max_length < 8:
            raise ValueError("data.max_length must be >= 8")
        if self.calibration_batch_size < 1:
            raise ValueError("data.calibration_batch_size must be >= 1")
        if self.length_window < 1:
            raise ValueError("data.length_window must be >= 1")


@dataclass(frozen=True)
class TaskData:
    """A task resolved to examples: disjoint seeded train / eval slices and calibration ⊂ train."""

    config: TaskConfig
    train: list[Example]
    eval: list[Example]
    calibration: list[Example]
    fingerprint: dict[str, Any]

    @property
    def name(self) -> str:
        """The task name."""
        return self.config.name


def build_task(cfg: TaskConfig, seed: int) -> TaskData:
    """Load a task's source(s), check them and cut the seeded splits.

    Questions that are in both the training slice and the evaluation set (same prompt, options and image) are
    counted: a
    few are warned about with their count (benchmarks hold some repeated questions), half or more of the evaluation
    set is refused (the evaluation file is the training data).

    Raises:
        ValueError: unknown source, a malformed file (naming it and the row), too few examples for ``n_train +
            n_eval`` (saying how many exist), or an evaluation set that is mostly training data.
    """
    examples = _load(cfg, cfg.source, cfg.source_split)
    held_out_source = cfg.eval_source or (cfg.source if cfg.eval_source_split is not None else None)
    if held_out_source is None:
        sizes = {"train": cfg.n_train, "eval": cfg.n_eval, "calibration": cfg.n_calibration}
        splits = _split(cfg, examples, sizes, seed)
    else:
        splits = _split(cfg, examples, {"train": cfg.n_train, "calibration": cfg.n_calibration}, seed)
        held_out = _load(cfg, held_out_source, cfg.eval_source_split)
        splits["eval"] = _split(cfg, held_out, {"eval": cfg.n_eval}, seed)["eval"]
    _check_overlap(cfg, splits["train"], splits["eval"])
    return TaskData(cfg, splits["train"], splits["eval"], splits["calibration"], split_fingerprint(splits, seed))


def _load(cfg: TaskConfig, source: str, split: str | None) -> list[Example]:
    examples = load_source(source, split)
    if not examples:
        raise ValueError(f"tasks[{cfg.name}]: source {source!r} has no examples")
    return examples


def _split(cfg: TaskConfig, examples: list[Example], sizes: dict[str, int], seed: int) -> dict[str, list[Example]]:
    try:
        return split_examples(examples, sizes, seed)
    except ValueError as err:
        raise ValueError(f"tasks[{cfg.name}]: {err}; lower n_train / n_eval") from err


def _check_overlap(cfg: TaskConfig, train: Sequence[Example], held_out: Sequence[Example]) -> None:
    seen = {(ex.prompt.strip(), ex.choices, ex.image) for ex in train}
    shared = sum((ex.prompt.strip(), ex.choices, ex.image) in seen for ex in held_out)
    if not shared:
        return
    if 2 * shared >= len(held_out):
        raise ValueError(f"tasks[{cfg.name}]: {shared} of the {len(held_out)} evaluation questions are also in the "
                         "training slice (same prompt and options): the evaluation data is the training data; give a "
                         "held-out eval_source")
    logger.warning("tasks[%s]: %d of the %d evaluation questions also appear in the training slice (same prompt and "
                   "options), so up to %.1f points of its score may be memorised; deduplicate the source to remove "
                   "them", cfg.name, shared, len(held_out), 100 * shared / len(held_out))


def calibration_key(tasks: Sequence[TaskData]) -> str:
    """Identifies the calibration data of ``tasks`` in a spectra cache (their split fingerprints), so cached spectra
    are never reused for other data; the same key in `thanora run`, `collect`, `plan` and `export`."""
    return json.dumps([t.fingerprint for t in tasks], sort_keys=True)


def encode_examples(
    examples: Sequence[Example],
    task: TaskConfig,
    tokenizer: Any,
    data: DataConfig,
    task_id: int,
    processor: Any = None,
) -> list[dict[str, Any]]:
    """Training features (answer-only labels) of examples, each tagged with ``task_id``.

    An example with an ``image`` is encoded as evaluation encodes it
    (:func:`thanora.data.formats.encode_image_example`):
    the prompt, with the processor's image placeholder, through ``processor``, the answer through ``tokenizer``; its
    feature also keeps the processor's other outputs (``pixel_values``, ``image_sizes``...). Text examples are encoded
    with ``tokenizer`` alone, whether or not a processor is given.

    Args:
        examples: The examples.
        task: Their task (answer format).
        tokenizer: The plain tokenizer.
        data: Data settings (``max_length``, ``chat_template``).
        task_id: Index of the task in the run's task list.
        processor: ``AutoProcessor``-like callable of a vision-language model; required when an example has an image.

    Returns:
        One feature dict per example.

    Raises:
        ValueError: An example has an image but no processor is given, or ``data.max_length`` cuts its image tokens.
    """
    image_token = getattr(processor, "image_token", None)
    features = []
    for ex in examples:
        prompt = format_prompt(ex, task.answer_format, tokenizer, data.chat_template, image_token)
        target = format_target(ex, task.answer_format, tokenizer, data.chat_template)
        add_eos = task.answer_format == "generative"
        if ex.image:
            feature = encode_image_example(processor, tokenizer, prompt, target, ex.image, data.max_length, add_eos)
        else:
            feature = dict(encode_example(tokenizer, prompt, target, data.max_length, add_eos=add_eos))
        feature["task_id"] = task_id
        features.append(feature)
    return features


def calibration_batches(
    task: TaskData, tokenizer: Any, data: DataConfig, device: torch.device | str = "cpu", processor: Any = None
) -> list[dict[str, torch.Tensor]]:
    """The task's calibration samples (prompt + answer, exactly as in training) as padded batches on ``device``.

    Batches of image examples carry the processor's outputs (``pixel_values``...), so the calibration forward passes
    see the images as training does. Samples are batched in order of length (shortest first).
    """
    features = encode_examples(task.calibration, task.config, tokenizer, data, task_id=0, processor=processor)
    # Sorted by length: less padding in every forward pass; the statistics sum over tokens and exclude padding, so
    # the order changes them by float rounding only.
    features.sort(key=lambda f: len(f["input_ids"]))
    batches = []
    for start in range(0, len(features), data.calibration_batch_size):
        chunk = [{k: v for k, v in f.items() if k != "task_id"}
                 for f in features[start:start + data.calibration_batch_size]]
        batch = collate(chunk, tokenizer.pad_token_id)
        batches.append({k: v.to(device) for k, v in batch.items() if k != "labels"})
    return batches
