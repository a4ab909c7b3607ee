"""Vision-language runs: a tiny random LLaVA saved with an offline processor, image tasks, the whole `thanora run`.

Fast tests use small generated PNGs; the slow one uses real easy-VQA images (``easy-vqa`` package, skipped without).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor, PreTrainedTokenizerFast
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from conftest import LLAVA_IMAGE_TOKEN, LLAVA_IMAGE_TOKENS, tiny_llava
from thanora.cli import main
from thanora.core.covariance import CovarianceFitter
from thanora.data.example import Example
from thanora.data.formats import (
    IGNORE_INDEX,
    collate,
    encode_example,
    encode_image_example,
    format_prompt,
    format_target,
)
from thanora.data.tasks import DataConfig, TaskConfig, TaskData, calibration_batches, encode_examples
from thanora.evaluation.evaluate import ImagePromptTokenizer as EvalImagePromptTokenizer
from thanora.experiment import pipeline

LLAVA_VOCAB = 160
SPECIALS = ["[PAD]", "[BOS]", "[EOS]", "[UNK]"]  # ids 0, 1, 2 match the tiny LLaVA's pad / bos / eos ids
COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
LETTER_WORDS = [w for letter in "ABCDEFGHIJKLM" for w in (letter, f"{letter}.")]
WORDS = ["Question:", "Answer:", "what", "color", "is", "the", "shape", "?", "image", "bright", "yes", "no",
         *LETTER_WORDS, *COLORS]


def _processor(words: Sequence[str]) -> LlavaProcessor:
    """LlavaProcessor: CLIP image processor (32 px) + WordLevel tokenizer (BOS added) with ``<image>`` = id 150."""
    vocab_words = SPECIALS + sorted(set(words) - set(SPECIALS))
    if len(vocab_words) > LLAVA_IMAGE_TOKEN:
        raise ValueError(f"{len(vocab_words)} words do not fit below the image token id {LLAVA_IMAGE_TOKEN}")
    vocab_words += [f"w{i}" for i in range(LLAVA_VOCAB - len(vocab_words))]
    vocab_words[LLAVA_IMAGE_TOKEN] = "<image>"
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab_words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<image>"])  # "<image><image>..." splits into image tokens
    tok.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                        pad_token="[PAD]", unk_token="[UNK]")
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=8, image_token="<image>",
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def _model_dir(root: Path, words: Sequence[str]) -> Path:
    folder = root / "tiny-llava"
    tiny_llava(seed=0).save_pretrained(folder)
    _processor(words).save_pretrained(folder)
    return folder


def _png(path: Path, rgb: tuple[int, int, int], seed: int) -> str:
    rng = np.random.default_rng(seed)
    noise = rng.integers(-25, 26, (40, 48, 3))
    Image.fromarray(np.clip(np.array(rgb) + noise, 0, 255).astype(np.uint8)).save(path)
    return str(path)


def _synthetic_tasks(root: Path, n: int = 24) -> tuple[Path, Path]:
    """``colors``: what colour is the image (4-way); ``bright``: is it bright (yes/no), a quarter without image."""
    (root / "images").mkdir()
    names = list(COLORS)
    colors, bright = [], []
    for i in range(n):
        color = names[i % len(names)]
        rel = f"images/{i}.png"
        _png(root / rel, COLORS[color], i)
        colors.append({"prompt": "Question: what color is the shape ?", "choices": names,
                       "answer": names.index(color), "image": rel})
        row: dict[str, Any] = {"prompt": "Question: is the image bright ?", "choices": ["yes", "no"],
                               "answer": int(color not in ("yellow", "green"))}
        bright.append({**row, "image": rel} if i % 4 else row)  # text-only rows share batches with image rows
    paths = []
    for name, rows in (("colors", colors), ("bright", bright)):
        random.Random(len(name)).shuffle(rows)
        paths.append(root / f"{name}.jsonl")
        paths[-1].write_text("\n".join(json.dumps(r) for r in rows))
    return paths[0], paths[1]


def _config(root: Path, model_dir: Path, tasks: list[dict[str, Any]]) -> Path:
    config = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": tasks,
        "data": {"max_length": 64, "calibration_batch_size": 4},
        "methods": [{"name": "lora", "rank": 4}, {"name": "thanora", "rank": 4, "spr_lambda": 1.0e-4}],
        "train": {"epochs": 1, "batch_size": 8, "grad_accum": 1, "lr": 5.0e-3},
        "eval": {"batch_size": 8},
        "output": {"merged": True, "plots": False},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class _Probe:
    """Records what the pipeline feeds the model, and the logits of each model state on one image batch."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch
        self.calibration: list[dict[str, tuple[int, ...]]] = []
        self.image_tokens: list[tuple[int, int]] = []  # (image tokens in the batch, images in the batch)
        self.train_keys: list[set[str]] = []
        self.init_logits: dict[str, torch.Tensor] = {}
        self.eval_logits: list[tuple[str, torch.Tensor]] = []
        update, collate_fn = CovarianceFitter.update, pipeline.collate
        describe, evaluate_model = pipeline.write_description, pipeline.evaluate_model

        def record_update(fitter: CovarianceFitter, batch: dict[str, torch.Tensor]) -> None:
            self.calibration.append({k: tuple(v.shape) for k, v in batch.items()})
            n_images = batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
            self.image_tokens.append((int((batch["input_ids"] == LLAVA_IMAGE_TOKEN).sum()), n_images))
            update(fitter, batch)

        def record_collate(features: Any, pad_token_id: int) -> dict[str, torch.Tensor]:
            out = collate_fn(features, pad_token_id)
            self.train_keys.append(set(out))
            return out

        def record_describe(method: Any, model: torch.nn.Module, out: Path) -> None:
            self.init_logits.setdefault(method.name, self.logits(model))  # first call: right after prepare
            describe(method, model, out)

        def record_evaluate(model: torch.nn.Module, *args: Any, **kwargs: Any) -> dict:
            self.eval_logits.append((type(model).__name__, self.logits(model)))
            return evaluate_model(model, *args, **kwargs)

        monkeypatch.setattr(CovarianceFitter, "update", record_update)
        monkeypatch.setattr(pipeline, "collate", record_collate)
        monkeypatch.setattr(pipeline, "write_description", record_describe)
        monkeypatch.setattr(pipeline, "evaluate_model", record_evaluate)

    @torch.no_grad()
    def logits(self, model: torch.nn.Module) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            return model(**self.batch).logits.float()
        finally:
            model.train(was_training)


def _probe_batch(processor: LlavaProcessor, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
    tok = processor.tokenizer
    features = [encode_image_example(processor, tok, format_prompt(ex, "ranked", image_token="<image>"),
                                     format_target(ex, "ranked"), ex.image, 64) for ex in examples]
    return {k: v for k, v in collate(features, tok.pad_token_id).items() if k != "labels"}


def _run_and_check(root: Path, config: Path, model_dir: Path, probe_examples: Sequence[Example],
                   task_names: set[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """`thanora run` on the LLaVA folder, then every check of the issue; returns the run directory."""
    from peft import PeftModel

    processor = AutoProcessor.from_pretrained(model_dir)
    batch = _probe_batch(processor, probe_examples)
    probe = _Probe(monkeypatch, batch)
    out = root / "run"
    assert main(["run", str(config), "--output-dir", str(out), "-q", "--no-progress"]) == 0

    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "lora", "thanora"}
    for result in metrics.values():
        assert set(result) == task_names | {"average"} and 0.0 <= result["average"] <= 1.0

    # Only the language model is adapted.
    plan = json.loads((out / "thanora" / "rank_plan.json").read_text())
    assert plan["modules"] and all(name.startswith("model.language_model.") for name in plan["modules"])
    for method in ("lora", "thanora"):
        adapter_cfg = json.loads((out / method / "adapter" / "adapter_config.json").read_text())
        targets = adapter_cfg["target_modules"]
        targets = targets if isinstance(targets, list) else [targets]
        assert not any(("vision_tower" in t or "multi_modal_projector" in t or "lm_head" in t) for t in targets)

    # Calibration and training batches carried the images, with one run of image tokens per image.
    assert probe.calibration and all("pixel_values" in shapes for shapes in probe.calibration)
    assert all(tokens == n * LLAVA_IMAGE_TOKENS and n > 0 for tokens, n in probe.image_tokens)
    assert probe.train_keys and all("pixel_values" in keys for keys in probe.train_keys)

    # Initialisation keeps the base model's function on an image batch (HASI residual; LoRA's B = 0).
    base = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    base_logits = probe.logits(base)
    assert set(probe.init_logits) == {"lora", "thanora"}
    for logits in probe.init_logits.values():
        torch.testing.assert_close(logits, base_logits, rtol=0, atol=1e-4)

    # Evaluation ran on the base, then on each trained model; the stock PEFT adapter reproduces the trained logits.
    assert len(probe.eval_logits) == 3
    torch.testing.assert_close(probe.eval_logits[0][1], base_logits, rtol=0, atol=1e-5)
    for method, (_, trained) in zip(("lora", "thanora"), probe.eval_logits[1:], strict=True):
        assert not torch.allclose(trained, base_logits, atol=1e-4), f"{method} did not train"
        fresh = AutoModelForImageTextToText.from_pretrained(model_dir)
        reloaded = PeftModel.from_pretrained(fresh, str(out / method / "adapter")).eval()
        torch.testing.assert_close(probe.logits(reloaded), trained, rtol=0, atol=1e-4)
        merged = AutoModelForImageTextToText.from_pretrained(out / method / "merged").eval()
        torch.testing.assert_close(probe.logits(merged), trained, rtol=0, atol=1e-4)
    return out


# ----------------------------------------------------------------------------------------------- features
def _image_examples(root: Path, n: int = 3) -> list[Example]:
    (root / "img").mkdir(exist_ok=True)
    names = list(COLORS)
    return [Example("Question: what color is the shape ?", tuple(names), k % 4,
                    _png(root / "img" / f"{k}.png", COLORS[names[k % 4]], k), uid=f"x{k}") for k in range(n)]


def test_training_features_match_evaluation_encoding(tmp_path: Path) -> None:
    processor = _processor(WORDS)
    tok = processor.tokenizer
    examples = [*_image_examples(tmp_path), Example("Question: is the image bright ?", ("yes", "no"), 0, uid="t")]
    task, data = TaskConfig(name="t", source="x", n_train=4, n_calibration=4), DataConfig(max_length=64)
    features = encode_examples(examples, task, tok, data, task_id=1, processor=processor)
    for ex, feature in zip(examples, features, strict=True):
        prompt = format_prompt(ex, "ranked", image_token="<image>")
        target = format_target(ex, "ranked")
        encoder = tok if ex.image is None else EvalImagePromptTokenizer(processor, tok, prompt, ex.image)
        expected = encode_example(encoder, prompt, target, 64)  # how evaluation tokenises it
        assert feature["input_ids"] == expected["input_ids"] and feature["labels"] == expected["labels"]
        assert feature["task_id"] == 1
        if ex.image is None:
            assert set(feature) == {"input_ids", "attention_mask", "labels", "task_id"}
        else:
            assert feature["input_ids"].count(LLAVA_IMAGE_TOKEN) == LLAVA_IMAGE_TOKENS
            assert feature["pixel_values"].shape == (1, 3, 32, 32)
            assert feature["labels"][-1] != IGNORE_INDEX and feature["labels"][1] == IGNORE_INDEX
    batch = collate([features[0], features[3], features[1]], tok.pad_token_id)  # mixed: images in batch order
    torch.testing.assert_close(batch["pixel_values"], torch.cat([features[0]["pixel_values"],
                                                                features[1]["pixel_values"]]))
    assert batch["task_id"].tolist() == [1, 1, 1]
    with pytest.raises(ValueError, match="processor"):
        encode_examples(examples, task, tok, data, task_id=0)
    with pytest.raises(ValueError, match="max_length"):
        encode_examples(examples[:1], task, tok, DataConfig(max_length=12), 0, processor)


def test_mixed_batch_forward_equals_one_sample_at_a_time(tmp_path: Path) -> None:
    processor, model = _processor(WORDS), tiny_llava()
    tok = processor.tokenizer
    examples = [*_image_examples(tmp_path, 2), Example("Question: is the image bright ?", ("yes", "no"), 0, uid="t")]
    task = TaskConfig(name="t", source="x", n_train=3, n_calibration=3)
    features = encode_examples(examples, task, tok, DataConfig(max_length=64), 0, processor)
    order = [features[2], features[0], features[1]]
    batch = {k: v for k, v in collate(order, tok.pad_token_id).items() if k not in ("labels", "task_id")}
    with torch.no_grad():
        logits = model(**batch).logits
        for b, feature in enumerate(order):
            alone = {k: v for k, v in collate([feature], tok.pad_token_id).items() if k not in ("labels", "task_id")}
            n = len(feature["input_ids"])
            torch.testing.assert_close(logits[b, :n], model(**alone).logits[0], rtol=0, atol=1e-5)
    data = TaskData(task, examples, examples, examples, {})
    calib = calibration_batches(data, tok, DataConfig(max_length=64, calibration_batch_size=2), "cpu", processor)
    # batched shortest first (the text example), each batch with the pixel values of its image examples
    assert [b["input_ids"].shape[0] for b in calib] == [2, 1]
    for b in calib:
        images = int((b["input_ids"] == LLAVA_IMAGE_TOKEN).any(1).sum())
        assert b.get("pixel_values", torch.zeros(0, 3, 32, 32)).shape == (images, 3, 32, 32)
    assert sum(int((b["input_ids"] == LLAVA_IMAGE_TOKEN).any(1).sum()) for b in calib) == 2


# ----------------------------------------------------------------------------------------------- the whole run
def test_vlm_run_end_to_end(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model_dir = _model_dir(tmp_path, WORDS)
    colors, bright = _synthetic_tasks(tmp_path)
    tasks = [
        {"name": "colors", "source": f"jsonl:{colors}", "n_train": 16, "n_eval": 6, "n_calibration": 8},
        {"name": "bright", "source": f"jsonl:{bright}", "answer_format": "letter", "n_train": 16, "n_eval": 6,
         "n_calibration": 8},
    ]
    config = _config(tmp_path, model_dir, tasks)
    probe_examples = _image_examples(tmp_path, 2)
    out = _run_and_check(tmp_path, config, model_dir, probe_examples, {"colors", "bright"}, monkeypatch)

    # The stand-alone stages load the processor too: eval of the exported adapter, collect + plan, merge.
    metrics = json.loads((out / "metrics.json").read_text())["thanora"]
    adapter = out / "thanora" / "adapter"
    assert main(["eval", str(config), "--adapter", str(adapter), "--output", str(tmp_path / "eval.json"), "-q"]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())["adapter"]
    assert [again[t]["score"] for t in ("colors", "bright")] == [metrics[t]["score"] for t in ("colors", "bright")]
    stage_dir = tmp_path / "stages"
    assert main(["collect", str(config), "--output-dir", str(stage_dir), "-q"]) == 0
    assert main(["plan", str(config), "--output-dir", str(stage_dir), "-q"]) == 0
    plan = json.loads((stage_dir / "rank_plan.json").read_text())
    assert plan == json.loads((out / "thanora" / "rank_plan.json").read_text())  # calibrated on the same images
    assert main(["merge", str(config), "--adapter", str(adapter), "--output-dir", str(tmp_path / "merged"), "-q"]) == 0
    assert AutoProcessor.from_pretrained(tmp_path / "merged").image_token == "<image>"


@pytest.mark.slow
def test_vlm_run_on_real_easy_vqa_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from thanora.assets import AssetMissingError
    from thanora.data.sources import load_source

    try:
        examples = load_source("easy_vqa", "test")
    except AssetMissingError as err:
        pytest.skip(f"asset package not installed: {err.what}")
    words = {w for ex in examples for w in ex.prompt.split()} | set(examples[0].choices) | set(WORDS)
    model_dir = _model_dir(tmp_path, sorted(words))
    yes_no = [ex for ex in examples if ex.choices[int(ex.answer)] in ("yes", "no")][:40]
    path = tmp_path / "yes_no.jsonl"
    path.write_text("\n".join(json.dumps({"prompt": ex.prompt, "choices": list(ex.choices), "answer": ex.answer,
                                          "image": ex.image}) for ex in yes_no))
    tasks = [
        {"name": "easy_vqa", "source": "easy_vqa", "source_split": "test", "n_train": 16, "n_eval": 6,
         "n_calibration": 8},
        {"name": "yes_no", "source": f"jsonl:{path}", "answer_format": "letter", "n_train": 16, "n_eval": 6,
         "n_calibration": 8},
    ]
    config = _config(tmp_path, model_dir, tasks)
    _run_and_check(tmp_path, config, model_dir, examples[:2], {"easy_vqa", "yes_no"}, monkeypatch)
