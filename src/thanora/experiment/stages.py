"""Stand-alone stages of the CLI (`collect`, `plan`, `eval`, `export`, `merge`), each reading and writing run artifacts.

Vision-language models are handled as in `thanora.experiment.pipeline`: their processor encodes image examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from thanora.core.allocation import RankPlan
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.targets import find_targets
from thanora.data.tasks import build_task, calibration_batches
from thanora.experiment.config import ConfigError, RunConfig
from thanora.experiment.pipeline import (
    RunState,
    evaluate_model,
    load_model,
    load_processor,
    load_tokenizer,
    resolve_device,
)
from thanora.methods.thanora import plan_ranks, task_spectra


def _thanora_settings(cfg: RunConfig) -> ThanoraConfig:
    for spec in cfg.methods:
        settings = spec.build()
        if isinstance(settings, ThanoraConfig):
            return settings
    raise ConfigError("collect/plan need a `thanora` entry under methods")


def collect(cfg: RunConfig, out: Path) -> list[Path]:
    """Calibration statistics → task-aware spectra of every task, cached under ``out/cache`` (SPEC.md §1-2)."""
    settings = _thanora_settings(cfg)
    device = resolve_device(cfg.model.device)
    model, processor = load_model(cfg, device), load_processor(cfg)
    tokenizer = load_tokenizer(cfg, processor)
    targets = find_targets(model, settings.target_modules)
    cache = Path(out) / "cache"
    for task_cfg in cfg.tasks:
        task = build_task(task_cfg, cfg.data.seed)
        batches = calibration_batches(task, tokenizer, cfg.data, device, processor)
        task_spectra(model, targets, task.name, batches, settings, cache_dir=cache)
    return sorted(cache.glob("spectra-*.safetensors"))


def plan(cfg: RunConfig, out: Path) -> RankPlan:
    """The rank plan from the cached spectra (no forward pass when `collect` ran with the same settings)."""
    settings = _thanora_settings(cfg)
    device = resolve_device(cfg.model.device)
    model, processor = load_model(cfg, device), load_processor(cfg)
    tokenizer = load_tokenizer(cfg, processor)
    targets = find_targets(model, settings.target_modules)
    spectra = {}
    for task_cfg in cfg.tasks:
        task = build_task(task_cfg, cfg.data.seed)
        spectra[task.name] = task_spectra(model, targets, task.name,
                                          calibration_batches(task, tokenizer, cfg.data, device, processor), settings,
                                          cache_dir=Path(out) / "cache")
    rank_plan = plan_ranks(spectra, settings)
    rank_plan.save(Path(out) / "rank_plan.json")
    return rank_plan


def evaluate_adapter(cfg: RunConfig, adapter: Path | None) -> dict[str, Any]:
    """Metrics of the base model, or of the base model with an adapter loaded (a stock PEFT adapter, or a routed
    method's native folder, recognised by its ``thanora_native.json``), on the config's tasks."""
    from peft import PeftModel

    from thanora.adapters.native import META, load_native, read_native_meta
    from thanora.methods.registry import get_method

    device = resolve_device(cfg.model.device)
    model, processor = load_model(cfg, device), load_processor(cfg)
    tokenizer = load_tokenizer(cfg, processor)
    if adapter is not None and (Path(adapter) / META).is_file():
        model = load_native(model, adapter, get_method(read_native_meta(adapter)["method"]))
    elif adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    state = RunState(cfg, Path("."), [build_task(t, cfg.data.seed) for t in cfg.tasks], device, {}, processor)
    return evaluate_model(model, tokenizer, state, progress=True)


def merge_adapter(cfg: RunConfig, adapter: Path, out: Path) -> Path:
    """Merge an exported (converted) adapter into the original base model and save a transformers folder."""
    from thanora.adapters.merge import merge_adapter_into

    processor = load_processor(cfg)
    return merge_adapter_into(load_model(cfg, resolve_device("cpu")), adapter, out, processor or load_tokenizer(cfg))


def export_trained(run_dir: Path, label: str, merged: bool = False) -> Path:
    """Rebuild a run's method from its config and latest checkpoint, and write its PEFT adapter (and merged model).

    ThanoRA reuses the run's cached spectra (no calibration forward pass when they match). Useful after `thanora
    train`, after an interrupted run, or to add a merged model later.

    Raises:
        FileNotFoundError: the run has no resolved config or no checkpoint for the method.
        ValueError: the method is not in the run's config or cannot be exported.
    """
    import json

    from thanora.adapters.merge import merge_adapter_into
    from thanora.artifacts import load_tensors
    from thanora.experiment.config import load_config
    from thanora.methods.base import MethodContext
    from thanora.methods.registry import get_method
    from thanora.training.checkpoints import CHECKPOINTS, LATEST

    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.yaml")
    spec = next((m for m in cfg.methods if m.label == label), None)
    if spec is None:
        raise ValueError(f"method {label!r} is not in {run_dir}/config.yaml (methods: "
                         f"{[m.label for m in cfg.methods]})")
    method, settings = get_method(spec.name), spec.build()
    if method.export is None:
        raise ValueError(f"method {label!r} cannot be exported as a PEFT adapter (input-dependent routing: no fixed "
                         f"weight update reproduces it); {run_dir}/{label}/adapter holds its native format, loaded "
                         "with thanora.adapters.native.load_native(base_model, folder)")
    pointer = run_dir / label / CHECKPOINTS / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} does not exist: train the method first (thanora train / run)")
    device = resolve_device(cfg.model.device)
    processor = load_processor(cfg)
    tokenizer = load_tokenizer(cfg, processor)
    tasks = [build_task(t, cfg.data.seed) for t in cfg.tasks]
    ctx = MethodContext(
        tokenizer=tokenizer,
        calibration={t.name: calibration_batches(t, tokenizer, cfg.data, device, processor) for t in tasks},
        cache_dir=run_dir / "cache",
        seed=cfg.seed,  # as in the run: a seeded residual init (R-LoRA+) must be rebuilt identically
        calibration_key=json.dumps([t.fingerprint for t in tasks], sort_keys=True),
    )
    model = method.prepare(load_model(cfg, device), settings, ctx)
    tensors, _ = load_tensors(pointer.parent / pointer.read_text(encoding="utf-8").strip() / "adapter.safetensors")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    if method.finalize is not None:
        model = method.finalize(model, settings)
    out = run_dir / label / "adapter"
    method.export(model, out)
    if merged and method.mergeable:
        merge_adapter_into(load_model(cfg, resolve_device("cpu")), out, run_dir / label / "merged",
                           processor or tokenizer)
    return out
