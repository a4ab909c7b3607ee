"""Export to a stock PEFT adapter on the original base (SPEC.md §7): stock PeftModel reproduces our logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

import thanora
from conftest import llava_batch, logits, perturb_, random_batch, tiny_gpt2, tiny_llama, tiny_llava
from thanora.adapters.export import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR
from thanora.artifacts import MARKER, ArtifactError
from thanora.core.allocation import COOP, RankPlan

R = 8
ALPHA = 16.0  # scaling 2: a wrong alpha/r in the adapter would show
CASES = [(tiny_llama, random_batch), (tiny_gpt2, random_batch), (tiny_llava, llava_batch)]
IDS = ["llama", "gpt2", "llava"]


def prepared(builder, batch_fn, residual: bool = True):
    calib = {f"t{i}": [batch_fn(i), batch_fn(i + 10)] for i in range(3)}
    cfg = thanora.ThanoraConfig(rank=R, lora_alpha=ALPHA, residual=residual)
    model = thanora.prepare_model(builder(), calib, cfg, progress=False)
    perturb_(model, seed=1)
    return model




def load_stock(builder, folder: Path) -> PeftModel:
    return PeftModel.from_pretrained(builder(), str(folder)).eval()  # same seed: the original base


@pytest.mark.parametrize(("builder", "batch_fn"), CASES, ids=IDS)
def test_stock_peft_reproduces_logits(builder, batch_fn, tmp_path: Path) -> None:
    model = prepared(builder, batch_fn)
    batch = batch_fn(77)
    ours = logits(model, batch)
    assert float((ours - logits(builder(), batch)).abs().max()) > 1e-3  # the adapter does something
    thanora.export_adapter(model, tmp_path / "adapter")
    stock = load_stock(builder, tmp_path / "adapter")
    assert type(stock).__module__.startswith("peft")
    torch.testing.assert_close(logits(stock, batch), ours, rtol=0, atol=1e-4)
    # merged in PEFT as well (the adapter is relative to the original weights)
    torch.testing.assert_close(logits(stock.merge_and_unload(), batch), ours, rtol=0, atol=1e-4)


@pytest.mark.parametrize(("builder", "batch_fn"), CASES, ids=IDS)
def test_default_export_is_one_rank_and_one_scale(builder, batch_fn, tmp_path: Path) -> None:
    """What serving engines read: r = 2R and lora_alpha = s·2R for every module, no patterns."""
    model = prepared(builder, batch_fn)
    adapter = thanora.adapter_of(model)
    thanora.export_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    weights = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert config["r"] == 2 * R and config["lora_alpha"] == pytest.approx(2 * R * adapter.config.scaling)
    assert config["rank_pattern"] == {} and config["alpha_pattern"] == {}
    for name, target in adapter.targets.items():
        A = weights[f"base_model.model.{name}.lora_A.weight"]
        B = weights[f"base_model.model.{name}.lora_B.weight"]
        assert A.shape == (2 * R, target.d_in) and B.shape == (target.d_out, 2 * R)
        start, stop = adapter.blocks[name][COOP]
        assert torch.equal(B[:, R + start:R + stop], torch.zeros_like(B[:, R + start:R + stop]))  # B₀'s coop: 0


@pytest.mark.parametrize(("builder", "batch_fn"), CASES, ids=IDS)
def test_trimmed_export_keeps_scaling_per_module(builder, batch_fn, tmp_path: Path) -> None:
    model = prepared(builder, batch_fn)
    adapter = thanora.adapter_of(model)
    thanora.export_adapter(model, tmp_path, trimmed=True)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    weights = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert config["peft_type"] == "LORA"
    assert set(config["target_modules"]) == set(adapter.targets)
    assert config["rank_pattern"], "ranks vary across modules for this seed: rank_pattern must be exercised"
    assert set(config["alpha_pattern"]) == set(config["rank_pattern"])
    ranks = set()
    for name in adapter.targets:
        r = config["rank_pattern"].get(name, config["r"])
        alpha = config["alpha_pattern"].get(name, config["lora_alpha"])
        assert alpha / r == pytest.approx(adapter.config.scaling, rel=1e-12)
        assert r == 2 * R - adapter.blocks[name][COOP][1] + adapter.blocks[name][COOP][0]  # 2R − r_coop
        A = weights[f"base_model.model.{name}.lora_A.weight"]
        B = weights[f"base_model.model.{name}.lora_B.weight"]
        target = adapter.targets[name]
        assert A.shape == (r, target.d_in) and B.shape == (target.d_out, r)
        ranks.add(r)
    assert len(weights) == 2 * len(adapter.targets)
    assert len(ranks) > 1


def test_sidecar_holds_config_plan_and_blocks(tmp_path: Path) -> None:
    model = prepared(tiny_llama, random_batch)
    adapter = thanora.adapter_of(model)
    thanora.export_adapter(model, tmp_path)
    side = json.loads((tmp_path / SIDECAR).read_text())
    assert side["config"] == adapter.config.to_dict()
    assert thanora.ThanoraConfig.from_dict(side["config"]) == adapter.config
    assert RankPlan.from_dict(side["rank_plan"]) == adapter.plan
    assert {n: {k: tuple(v) for k, v in t.items()} for n, t in side["blocks"].items()} == adapter.blocks


def test_save_pretrained_writes_the_converted_adapter(tmp_path: Path) -> None:
    model = prepared(tiny_llama, random_batch)
    thanora.export_adapter(model, tmp_path / "export")
    model.save_pretrained(tmp_path / "save")
    assert {p.name for p in (tmp_path / "save").iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR, MARKER}
    assert json.loads((tmp_path / "save" / ADAPTER_CONFIG).read_text()) == json.loads(
        (tmp_path / "export" / ADAPTER_CONFIG).read_text())
    a, b = load_file(str(tmp_path / "save" / ADAPTER_WEIGHTS)), load_file(str(tmp_path / "export" / ADAPTER_WEIGHTS))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    batch = random_batch(5)
    torch.testing.assert_close(logits(load_stock(tiny_llama, tmp_path / "save"), batch), logits(model, batch),
                               rtol=0, atol=1e-4)


def test_export_of_merged_model_is_the_same(tmp_path: Path) -> None:
    model = prepared(tiny_llama, random_batch)
    thanora.export_adapter(model, tmp_path / "unmerged")
    thanora.merge_(model)
    thanora.export_adapter(model, tmp_path / "merged")
    a = load_file(str(tmp_path / "unmerged" / ADAPTER_WEIGHTS))
    b = load_file(str(tmp_path / "merged" / ADAPTER_WEIGHTS))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_unload_of_residual_base_is_refused() -> None:
    model = prepared(tiny_llama, random_batch)
    with pytest.raises(thanora.ResidualBaseError, match="residual base"):
        model.unload()


def test_residual_false_exports_rank_r(tmp_path: Path) -> None:
    model = prepared(tiny_llama, random_batch, residual=False)
    batch = random_batch(8)
    ours = logits(model, batch)
    thanora.export_adapter(model, tmp_path)
    config = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert config["r"] == R and not config["rank_pattern"] and config["lora_alpha"] == ALPHA
    weights = load_file(str(tmp_path / ADAPTER_WEIGHTS))
    assert all(w.shape[0] == R for k, w in weights.items() if "lora_A" in k)
    torch.testing.assert_close(logits(load_stock(tiny_llama, tmp_path), batch), ours, rtol=0, atol=1e-4)
    assert not any("lora" in n for n, _ in model.unload().named_modules())  # allowed without a residual base


def test_export_is_atomic_and_replaces_only_its_own_adapter(tmp_path: Path) -> None:
    out = tmp_path / "adapter"
    model = prepared(tiny_llama, random_batch)
    assert thanora.export_adapter(model, out) == out
    (out / "stale.bin").write_bytes(b"old")  # inside an adapter folder thanora wrote: replaced with it
    assert thanora.export_adapter(model, out) == out
    assert {p.name for p in out.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS, SIDECAR, MARKER}
    assert {p.name for p in tmp_path.iterdir()} == {"adapter"}
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    with pytest.raises(ArtifactError, match="did not write"):
        thanora.export_adapter(model, mine)
    assert {p.name for p in mine.iterdir()} == {"notes.txt"}


def test_failed_export_keeps_previous_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = prepared(tiny_llama, random_batch)
    out = thanora.export_adapter(model, tmp_path / "adapter")
    previous = (out / ADAPTER_WEIGHTS).read_bytes()

    def broken_sidecar(*_args):
        raise RuntimeError("sidecar failed")

    monkeypatch.setattr("thanora.adapters.export.sidecar", broken_sidecar)
    perturb_(model, seed=2)
    with pytest.raises(RuntimeError, match="sidecar failed"):
        thanora.export_adapter(model, out)
    assert (out / ADAPTER_WEIGHTS).read_bytes() == previous
    assert {p.name for p in tmp_path.iterdir()} == {"adapter"}
