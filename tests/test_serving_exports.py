"""Every mergeable method's export, read the way serving engines read adapters, reproduces the trained model.

Two rules, applied by hand to a fresh base model (W += scale · B·A for every module of the adapter):

- vLLM / LoRAX / TGI: one scale ``lora_alpha / r`` from the config for every module (``rank_pattern`` and
  ``alpha_pattern`` are dropped), tensors taken by their own shapes;
- llama.cpp's ``convert_lora_to_gguf.py``: the global ``lora_alpha`` over each tensor's own rank.

The default exports (one rank, one scale) must give our logits under both; ThanoRA's trimmed form (per-module ranks)
does not under llama.cpp's, and holds modules of a higher rank than vLLM's buffers (sized by ``r``) take, which is why
it is opt-in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from conftest import logits, random_batch, tiny_llama
from thanora.adapters.export import export_adapter
from thanora.methods.base import MethodContext
from thanora.methods.registry import METHODS

SETTINGS: dict[str, dict[str, Any]] = {
    "lora": {"rank": 4, "lora_alpha": 8.0},
    "corda": {"rank": 4, "lora_alpha": 8.0},
    "thanora": {"rank": 8, "lora_alpha": 16.0},
    "dare": {"rank": 4, "lora_alpha": 8.0, "density": 1.0},
    "rlora_plus": {"rank": 4, "lora_alpha": 8.0},
    "align_lora": {"rank": 4, "lora_alpha": 8.0},
}


def trained(name: str, n_tasks: int = 2) -> torch.nn.Module:
    method = METHODS[name]
    settings = method.config_cls(**SETTINGS[name])
    calibration = {f"t{i}": [random_batch(i), random_batch(i + 10)] for i in range(n_tasks)}
    model = method.prepare(tiny_llama(), settings, MethodContext(calibration=calibration, progress=False, seed=0))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": every trainable factor moves (zero-initialised B too)
        for p in model.parameters():
            if p.requires_grad:
                scale = 0.3 * float(p.std()) if float(p.std()) > 0 else 0.05
                p.add_(scale * torch.randn(p.shape, generator=g))
    if method.finalize is not None:
        model = method.finalize(model, settings)
    return model.eval()


def engine_merge(folder: Path, rule: str) -> torch.nn.Module:
    """A fresh base with the adapter in ``folder`` merged by hand under ``rule`` ("vllm" or "llama.cpp")."""
    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / "adapter_model.safetensors"))
    base = tiny_llama()
    with torch.no_grad():
        for module in config["target_modules"]:
            A = weights[f"base_model.model.{module}.lora_A.weight"].double()
            B = weights[f"base_model.model.{module}.lora_B.weight"].double()
            scale = config["lora_alpha"] / (config["r"] if rule == "vllm" else A.shape[0])
            layer = base.get_submodule(module)
            layer.weight.copy_((layer.weight.double() + scale * (B @ A)).float())
    return base.eval()


@pytest.mark.parametrize("rule", ["vllm", "llama.cpp"])
@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_the_export_reproduces_the_model_under_each_engines_rule(name: str, rule: str, tmp_path: Path) -> None:
    model = trained(name)
    METHODS[name].export(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert not config.get("rank_pattern") and not config.get("alpha_pattern")  # one rank, one scale
    batch = random_batch(7)
    ours = logits(model, batch)
    assert float((ours - logits(tiny_llama(), batch)).abs().max()) > 1e-3  # the adapter does something
    torch.testing.assert_close(logits(engine_merge(tmp_path / "adapter", rule), batch), ours, rtol=0, atol=1e-4)


def test_the_trimmed_thanora_export_is_for_peft_only(tmp_path: Path) -> None:
    model = trained("thanora", n_tasks=3)  # 3 tasks: cooperative blocks of different sizes
    export_adapter(model, tmp_path / "trimmed", trimmed=True)
    config = json.loads((tmp_path / "trimmed" / "adapter_config.json").read_text())
    assert config["rank_pattern"]  # ranks differ per module
    batch = random_batch(7)
    ours = logits(model, batch)
    # llama.cpp: the global alpha over a tensor's own rank is the wrong scale wherever that rank is not r
    wrong = logits(engine_merge(tmp_path / "trimmed", "llama.cpp"), batch)
    assert float((wrong - ours).abs().max()) > 1e-3
    # vLLM: lora_alpha / r is the right scale, but it sizes its buffers by r (max_lora_rank): a module of a higher
    # rank does not fit, and SGLang refuses the patterns outright
    weights = load_file(str(tmp_path / "trimmed" / "adapter_model.safetensors"))
    assert max(w.shape[0] for k, w in weights.items() if k.endswith("lora_A.weight")) > config["r"]
