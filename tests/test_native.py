"""thanora's own adapter format (`thanora.adapters.native`): round trip and the errors that keep a folder from
loading wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_batch, tiny_llama
from thanora.adapters.native import META, NativeFormatError, load_native, read_native_meta, save_native
from thanora.methods.base import MethodContext
from thanora.methods.hydralora import HYDRALORA
from thanora.methods.lora import LORA, LoraSettings


def trained_lora() -> torch.nn.Module:
    model = LORA.prepare(tiny_llama(), LoraSettings(rank=4, lora_dropout=0.0), MethodContext(seed=3))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B" in name:  # zero at init: give the adapter an effect
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    return model.eval()


def test_round_trip_reproduces_the_logits(tmp_path: Path) -> None:
    model = trained_lora()
    save_native(model, "lora", LoraSettings(rank=4, lora_dropout=0.0), tmp_path / "a")
    meta = read_native_meta(tmp_path / "a")
    assert meta["method"] == "lora" and meta["settings"]["rank"] == 4
    assert all(".lora_" in name for name in meta["tensors"])
    loaded = load_native(tiny_llama(), tmp_path / "a", LORA)
    batch = random_batch(0)
    with torch.no_grad():
        assert not torch.allclose(tiny_llama()(**batch).logits, model(**batch).logits, atol=1e-3)
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, rtol=0, atol=0)


def test_other_method_other_base_or_foreign_folder_is_a_clear_error(tmp_path: Path) -> None:
    save_native(trained_lora(), "lora", LoraSettings(rank=4, lora_dropout=0.0), tmp_path / "a")
    with pytest.raises(NativeFormatError, match="holds a 'lora' adapter, not 'hydralora'"):
        load_native(tiny_llama(), tmp_path / "a", HYDRALORA)
    torch.manual_seed(0)
    wider = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128))
    with pytest.raises(NativeFormatError, match=r"does not fit this base model.*shape mismatch"):
        load_native(wider, tmp_path / "a", LORA)
    (tmp_path / "peft").mkdir()
    with pytest.raises(NativeFormatError, match=r"no thanora_native\.json.*PeftModel\.from_pretrained"):
        load_native(tiny_llama(), tmp_path / "peft", LORA)
    meta = json.loads((tmp_path / "a" / META).read_text())
    (tmp_path / "a" / META).write_text(json.dumps({**meta, "format": "thanora-native/99"}))
    with pytest.raises(NativeFormatError, match="format 'thanora-native/99'"):
        load_native(tiny_llama(), tmp_path / "a", LORA)


def test_nothing_trainable_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no trainable parameter"):
        save_native(tiny_llama().requires_grad_(False), "lora", LoraSettings(), tmp_path / "a")
    assert not (tmp_path / "a").exists()
