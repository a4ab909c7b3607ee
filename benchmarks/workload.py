"""The real workload the cost benchmarks share: SmolLM2, real task batches, and any method prepared on it.

Everything goes through the library's own code paths (`thanora.data.tasks`, `thanora.methods`), so a benchmark measures
what a user's run does. Import it from a script in this folder.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thanora.data.formats import IGNORE_INDEX

MIXTURES = {2: ("csqa", "obqa"), 4: ("csqa", "obqa", "arc_easy", "boolq")}


def load_base(device: torch.device, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A fresh SmolLM2-135M-Instruct (eval mode, warmed up) and its tokenizer (pad token set)."""
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from thanora.assets import smollm2_dir

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    folder = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).to(device).eval()
    with torch.no_grad():  # pages the memory-mapped weights in
        model(input_ids=torch.ones(1, 8, dtype=torch.long, device=device))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


@dataclass
class TaskBatches:
    """Training features of every task (answer-only labels, task ids) and calibration batches per task."""

    features: list[dict[str, Any]]
    calibration: dict[str, list[dict[str, torch.Tensor]]]


def task_batches(tokenizer: Any, tasks: tuple[str, ...], n_train: int, n_calibration: int, max_length: int,
                 device: torch.device, seed: int = 0) -> TaskBatches:
    """Real CSQA / OBQA / ARC-Easy / BoolQ examples in the ranked format, encoded exactly as `thanora run` does."""
    from thanora.data.tasks import DataConfig, TaskConfig, build_task, calibration_batches, encode_examples

    data = DataConfig(max_length=max_length, seed=seed)
    features: list[dict[str, Any]] = []
    calibration = {}
    for task_id, name in enumerate(tasks):
        task = build_task(TaskConfig(name, name, n_train=n_train, n_eval=1, n_calibration=n_calibration), seed)
        features += encode_examples(task.train, task.config, tokenizer, data, task_id)
        calibration[name] = calibration_batches(task, tokenizer, data, device)
    return TaskBatches(features, calibration)


def stratified_batches(features: list[dict[str, Any]], batch_size: int, n_tasks: int, pad_id: int,
                       n_batches: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n_batches`` padded batches, each with samples of every task (what Align-LoRA needs; harmless for others)."""
    import random

    from thanora.data.formats import collate

    by_task = [[f for f in features if f["task_id"] == t] for t in range(n_tasks)]
    rng = random.Random(seed)
    batches = []
    for _ in range(n_batches):
        chosen = [rng.choice(by_task[i % n_tasks]) for i in range(batch_size)]
        batches.append(collate(chosen, pad_id))
    return batches


def prepare(name: str, settings: dict[str, Any], base: nn.Module, calibration: dict[str, list] | None,
            seed: int = 0) -> tuple[nn.Module, Any]:
    """``base`` prepared by method ``name`` with ``settings`` (the method's YAML fields); returns (model, settings)."""
    from thanora.methods.base import MethodContext
    from thanora.methods.registry import get_method

    method = get_method(name)
    config = method.config_cls(**settings)
    ctx = MethodContext(calibration=calibration, progress=False, seed=seed)
    return method.prepare(base, config, ctx), config


def simulate_training_(model: nn.Module, seed: int = 0, relative: float = 0.1, zero_scale: float = 1e-3) -> None:
    """Move every trainable parameter as a short training run would: seeded noise of ``relative`` times its own
    standard deviation, or of ``zero_scale`` for a zero-initialised one (LoRA's B), so every factor takes part and
    the model stays a sensible language model (costs do not depend on the values; merge checks do)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                std = float(p.float().std()) if p.numel() > 1 else 0.0
                scale = relative * std if std > 0 else zero_scale
                p.add_(scale * torch.randn(p.shape, generator=g).to(p.device, p.dtype))


def trainable_count(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def eval_features(tokenizer: Any, tasks: tuple[str, ...], n_eval: int, max_length: int,
                  seed: int = 0) -> list[dict[str, Any]]:
    """The evaluation examples of every task (prompt + correct answer, ranked format), encoded as in training."""
    from thanora.data.tasks import DataConfig, TaskConfig, build_task, encode_examples

    data = DataConfig(max_length=max_length, seed=seed)
    out: list[dict[str, Any]] = []
    for task_id, name in enumerate(tasks):
        task = build_task(TaskConfig(name, name, n_train=1, n_eval=n_eval, n_calibration=1), seed)
        out += encode_examples(task.eval, task.config, tokenizer, data, task_id)
    return out


# The synthetic stand-in for machines the real model and data do not reach (a lent GPU): SmolLM2-135M's shape with
# random weights, and random tokens with the real tasks' sequence and answer lengths. Compute does not depend on the
# values, so its step times are the real workload's; its losses and scores mean nothing.
SHAPE = Path(__file__).parent / "results" / "workload_shape.json"


def record_shape(tasks: tuple[str, ...] = MIXTURES[4], n: int = 96, max_length: int = 256) -> dict[str, Any]:
    """Write `SHAPE`: SmolLM2's config and, per task, the (length, labelled tokens) of its first ``n`` training
    features encoded as `task_batches` does (needs the offline assets)."""
    from thanora.artifacts import write_json
    from thanora.assets import smollm2_dir

    _, tokenizer = load_base(torch.device("cpu"))
    lengths = {}
    for name in tasks:
        features = task_batches(tokenizer, (name,), n, 1, max_length, torch.device("cpu")).features
        lengths[name] = [[len(f["input_ids"]), sum(label != IGNORE_INDEX for label in f["labels"])]
                         for f in features]
    config = json.loads((smollm2_dir() / "config.json").read_text())
    shape = {"model_config": {k: v for k, v in config.items() if not k.startswith("_")}, "max_length": max_length,
             "lengths": lengths}
    write_json(SHAPE, shape)
    return shape


def synthetic_base(device: torch.device, dtype: torch.dtype = torch.float32, **overrides: Any) -> tuple[nn.Module, Any]:
    """A randomly initialised model of SmolLM2's configuration (``overrides`` change fields, e.g. a smaller one in
    tests) and a word-level tokenizer over its vocabulary (pad id 0)."""
    from tokenizers import Tokenizer, models
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    config = LlamaConfig(**{**json.loads(SHAPE.read_text())["model_config"], **overrides})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0")
    return model, tokenizer


def synthetic_batches(tasks: tuple[str, ...], n_train: int, n_calibration: int, vocab_size: int,
                      device: torch.device, seed: int = 0) -> TaskBatches:
    """Random-token features with the recorded (length, labelled tokens) of each task, cycled to ``n_train`` per
    task (answer-only labels on the last tokens, task ids), and calibration batches of each task's first
    ``n_calibration`` (length-sorted, padded, as `task_batches` builds them)."""
    from thanora.data.formats import collate

    lengths = json.loads(SHAPE.read_text())["lengths"]
    g = torch.Generator().manual_seed(seed)
    features: list[dict[str, Any]] = []
    calibration = {}
    for task_id, name in enumerate(tasks):
        own = []
        for k in range(n_train):
            length, labelled = lengths[name][k % len(lengths[name])]
            ids = torch.randint(3, vocab_size, (length,), generator=g).tolist()
            own.append({"input_ids": ids, "attention_mask": [1] * length,
                        "labels": [IGNORE_INDEX] * (length - labelled) + ids[length - labelled:], "task_id": task_id})
        features += own
        chosen = sorted(own[:n_calibration], key=lambda f: len(f["input_ids"]))
        batch = collate([{k: f[k] for k in ("input_ids", "attention_mask")} for f in chosen], pad_token_id=0)
        calibration[name] = [{k: v.to(device) for k, v in batch.items()}]
    return TaskBatches(features, calibration)


if __name__ == "__main__":
    shape = record_shape()
    print({task: len(v) for task, v in shape["lengths"].items()}, "->", SHAPE)
