"""Seeded tiny models built from configs (no downloads): Llama, GPT-2 (Conv1D) and LLaVA; their batches; a tiny
model folder with a word-level tokenizer and learnable multiple-choice task files for end-to-end runs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

VOCAB = 128
LLAVA_IMAGE_TOKEN = 150
LLAVA_IMAGE_TOKENS = 16  # (32 / 8)² patches, CLS dropped


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Llama: hidden 32, 2 layers, 4 heads, 2 KV heads, vocab 128."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=VOCAB, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    """GPT-2 (Conv1D weights stored (d_in, d_out)): hidden 32, 2 layers, 4 heads, vocab 128."""
    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=128,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return GPT2LMHeadModel(config).eval()


def tiny_llava(seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA: CLIP vision tower (32 px, patch 8) + projector + tiny Llama (vocab 160, image token 150)."""
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=32, patch_size=8, projection_dim=32)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=160, max_position_embeddings=128, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=LLAVA_IMAGE_TOKEN,
                         vision_feature_layer=-1)
    return LlavaForConditionalGeneration(config).eval()


def random_batch(seed: int, batch: int = 3, length: int = 12, vocab: int = VOCAB, pad_tail: bool = True
                 ) -> dict[str, torch.Tensor]:
    """Token batch with right padding of varying length (pad id 0)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    if pad_tail:
        for i in range(batch):
            cut = length - (i * 3) % (length // 2)
            ids[i, cut:] = 0
            mask[i, cut:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def llava_batch(seed: int, batch: int = 2, text_len: int = 6) -> dict[str, torch.Tensor]:
    """LLaVA batch: image tokens followed by text, one image per sample, last sample right-padded."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(3, 140, (batch, text_len), generator=g)
    image = torch.full((batch, LLAVA_IMAGE_TOKENS), LLAVA_IMAGE_TOKEN)
    ids = torch.cat([image, text], dim=1)
    mask = torch.ones_like(ids)
    ids[-1, -2:] = 0
    mask[-1, -2:] = 0
    pixels = torch.randn(batch, 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Simulate training: move every lora_A and lora_B by noise of their own scale."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.add_(0.3 * p.std() * torch.randn(p.shape, generator=g))


def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits without gradients."""
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture
def llama() -> LlamaForCausalLM:
    return tiny_llama()


@pytest.fixture
def gpt2() -> GPT2LMHeadModel:
    return tiny_gpt2()


@pytest.fixture
def llava() -> LlavaForConditionalGeneration:
    return tiny_llava()


def pytest_configure(config: pytest.Config) -> None:
    # Tiny matrices: intra-op threads only add overhead (16x slower SVDs on a busy 2-core runner).
    torch.set_num_threads(1)


COLORS = ["red", "green", "blue", "yellow"]
ANIMALS = ["cat", "dog", "cow", "owl"]
NOUNS = [f"w{i}" for i in range(40)]


def tiny_model_dir(root: Path) -> Path:
    """A tiny Llama + word-level tokenizer folder whose vocabulary covers the `choice_task_file` tasks."""
    words = ["Question:", "Answer:", "color", "animal", "of", *COLORS, *ANIMALS, *NOUNS]
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[BOS]", "[EOS]", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="[BOS]", eos_token="[EOS]",
                                        pad_token="[PAD]", unk_token="[UNK]")
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=64, max_position_embeddings=64, pad_token_id=0,
                         bos_token_id=2, eos_token_id=3)
    import torch

    torch.manual_seed(0)
    folder = root / "tiny-model"
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def choice_task_file(root: Path, name: str, kind: str, answers: list[str], seed: int) -> Path:
    """A JSONL multiple-choice task with a fixed, learnable noun → answer mapping."""
    rng = random.Random(seed)
    rows = []
    for i, noun in enumerate(NOUNS):
        answer = (i * 7 + seed) % len(answers)  # a fixed noun → answer mapping the model can learn
        rows.append({"prompt": f"Question: {kind} of {noun}", "choices": answers, "answer": answer})
    rng.shuffle(rows)
    path = root / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def run_tiny(tmp_path: Path, method: dict[str, Any]) -> Path:
    """`thanora run` of one method on the tiny saved Llama and two synthetic JSONL tasks; the run folder."""
    import yaml

    from thanora.cli import main

    colors = choice_task_file(tmp_path, "colors", "color", COLORS, 1)
    animals = choice_task_file(tmp_path, "animals", "animal", ANIMALS, 2)
    cfg = {
        "model": {"name_or_path": str(tiny_model_dir(tmp_path))},
        "tasks": [{"name": "colors", "source": f"jsonl:{colors}", "n_train": 24, "n_eval": 12, "n_calibration": 4},
                  {"name": "animals", "source": f"jsonl:{animals}", "n_train": 24, "n_eval": 12, "n_calibration": 4}],
        "data": {"max_length": 32, "calibration_batch_size": 4},
        "methods": [method],
        "train": {"epochs": 1, "batch_size": 8, "grad_accum": 1, "lr": 5.0e-3},
        "eval": {"batch_size": 16},
        "output": {"merged": True, "plots": False, "evaluate_base": False},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "run"
    assert main(["run", str(tmp_path / "c.yaml"), "--output-dir", str(out), "--no-progress", "-q"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0.0 <= metrics[method["name"]]["average"] <= 1.0
    return out


def assert_export_rebuilds_the_adapter(run_dir: Path, label: str) -> None:
    """`thanora export` (fresh prepare + checkpoint + finalize) writes the adapter the run wrote."""
    from safetensors.torch import load_file

    from thanora.cli import main

    saved = load_file(str(run_dir / label / "adapter" / "adapter_model.safetensors"))
    assert main(["export", str(run_dir), "--method", label, "-q"]) == 0
    rebuilt = load_file(str(run_dir / label / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == rebuilt.keys()
    for key in saved:
        torch.testing.assert_close(rebuilt[key], saved[key], rtol=0, atol=1e-6)
