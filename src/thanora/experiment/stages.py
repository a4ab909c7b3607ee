"""Stand-alone stages of the CLI (`collect`, `plan`, `eval`, `export`, `merge`, `plot`), each reading and writing
run artifacts under the same rules as `thanora run` (`thanora.experiment.rundir`): every input is checked before any
work, and nothing is written over a file or folder thanora did not write.

`collect` and `plan` write into a run folder (a new or empty folder becomes one, with a ``run.json`` whose status
says what it holds), so a later ``thanora run`` / ``thanora train`` into the same folder reuses the cached spectra.
Vision-language models are handled as in `thanora.experiment.pipeline`: their processor encodes image examples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from thanora.artifacts import ArtifactError, artifact_kind, check_replaceable, read_json, write_json
from thanora.core.allocation import RankPlan
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.targets import find_targets
from thanora.data.tasks import calibration_batches, calibration_key
from thanora.experiment import rundir
from thanora.experiment.config import ConfigError, RunConfig
from thanora.experiment.models import load_model, load_processor, load_tokenizer, resolve_device
from thanora.experiment.pipeline import RunState, evaluate_model, load_tasks, run_record
from thanora.methods.thanora import plan_ranks, task_spectra


def _thanora_settings(cfg: RunConfig) -> ThanoraConfig:
    for spec in cfg.methods:
        settings = spec.build()
        if isinstance(settings, ThanoraConfig):
            return settings
    raise ConfigError("methods: collect/plan need a `thanora` entry (its decomposition settings are used)")


def _stage_dir(out: Path, cfg: RunConfig, status: str) -> None:
    """Make ``out`` a run folder for `collect` / `plan`: an existing run is written into (its cache), a new or empty
    folder gets a ``run.json`` with ``status``; anything else is refused."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not rundir.is_run_dir(out):
        raise rundir.RunDirError(f"--output-dir {out} holds files that are not a thanora run; choose a new or empty "
                                 "folder")
    if not rundir.is_run_dir(out):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", run_record(cfg, status, {}))


def _spectra(cfg: RunConfig, out: Path, status: str) -> tuple[ThanoraConfig, dict[str, Any]]:
    settings = _thanora_settings(cfg)
    device = resolve_device(cfg.model.device)
    tasks = load_tasks(cfg)
    processor = load_processor(cfg)
    tokenizer = load_tokenizer(cfg, processor)
    _stage_dir(out, cfg, status)
    model = load_model(cfg, device)
    targets = find_targets(model, settings.target_modules)
    key = calibration_key(tasks)
    spectra = {task.name: task_spectra(model, targets, task.name,
                                       calibration_batches(task, tokenizer, cfg.data, "cpu", processor), settings,
                                       cache_dir=out / "cache", calibration_key=key)
               for task in tasks}
    return settings, spectra


def collect(cfg: RunConfig, out: Path) -> list[Path]:
    """Calibration statistics → task-aware spectra of every task, cached under ``out/cache`` (SPEC.md §1-2), with
    the same cache key as ``thanora run``, so a later run into ``out`` does no calibration forward pass."""
    _spectra(cfg, Path(out), "collected")
    return sorted((Path(out) / "cache").glob("spectra-*.safetensors"))


def plan(cfg: RunConfig, out: Path) -> RankPlan:
    """The rank plan from the cached spectra (no forward pass when `collect` ran with the same settings), written
    to ``out/rank_plan.json``."""
    settings, spectra = _spectra(cfg, Path(out), "planned")
    rank_plan = plan_ranks(spectra, settings)
    rank_plan.save(Path(out) / "rank_plan.json")
    return rank_plan


def check_adapter_folder(adapter: Path) -> bool:
    """Whether ``adapter`` is a routed method's native folder (``True``) or a PEFT adapter folder (``False``).

    Raises:
        FileNotFoundError: neither (naming the folder and what it should hold).
    """
    from thanora.adapters.native import META

    if (adapter / META).is_file():
        return True
    if (adapter / "adapter_config.json").is_file():
        return False
    raise FileNotFoundError(f"--adapter {adapter} is not an adapter folder (no adapter_config.json or {META}); give "
                            "a run's <method>/adapter folder")


def evaluate_adapter(cfg: RunConfig, adapter: Path | None) -> dict[str, Any]:
    """Metrics of the base model, or of the base model with an adapter loaded (a stock PEFT adapter, or a routed
    method's native folder, recognised by its ``thanora_native.json``), on the config's tasks."""
    from peft import PeftModel

    from thanora.adapters.native import load_native, read_native_meta
    from thanora.methods.registry import get_method

    native = check_adapter_folder(Path(adapter)) if adapter is not None else False
    device = resolve_device(cfg.model.device)
    tasks = load_tasks(cfg)
    processor = load_processor(cfg)
    tokenizer = load_tokenizer(cfg, processor)
    model = load_model(cfg, device)
    if native:
        model = load_native(model, adapter, get_method(read_native_meta(adapter)["method"]))
    elif adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter)).eval()
    state = RunState(cfg, Path("."), tasks, device, {}, processor)
    return evaluate_model(model, tokenizer, state, progress=True)


def check_metrics_output(path: Path, overwrite: bool) -> None:
    """``thanora eval --output``: a new file, or (with ``overwrite``) a metrics file that ``thanora eval`` wrote.

    Raises:
        ArtifactError: the file exists and the rule does not allow replacing it.
    """
    if not path.exists():
        return
    try:
        data = read_json(path) if path.is_file() else None
        ours = isinstance(data, dict) and len(data) == 1 and all(
            isinstance(v, dict) and "average" in v for v in data.values())
    except (OSError, ValueError):
        ours = False
    if not ours:
        raise ArtifactError(f"--output {path} exists and is not a metrics file written by thanora eval; choose "
                            "another file (nothing was changed)")
    if not overwrite:
        raise ArtifactError(f"--output {path} exists; pass --overwrite to replace it, or choose another file")


def merge_adapter(cfg: RunConfig, adapter: Path, out: Path, overwrite: bool = False) -> Path:
    """Merge an exported (converted) adapter into the original base model and save a transformers folder.

    ``out`` must be new or empty, or a merged folder thanora wrote and ``overwrite`` given.

    Raises:
        ArtifactError: ``out`` is occupied (see above).
        ValueError: ``adapter`` is a routed method's folder (input-dependent routing: nothing to merge).
    """
    from thanora.adapters.merge import merge_adapter_into

    check_replaceable(out, "merged")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ArtifactError(f"--output-dir {out} already holds a merged model; pass --overwrite to replace it")
    if check_adapter_folder(Path(adapter)):
        raise ValueError(f"--adapter {adapter} belongs to a routed method (input-dependent routing): it has no fixed "
                         "weight update to merge")
    processor = load_processor(cfg)
    tokenizer = processor or load_tokenizer(cfg)
    return merge_adapter_into(load_model(cfg, resolve_device("cpu")), adapter, out, tokenizer)


def export_trained(run_dir: Path, label: str, merged: bool = False) -> Path:
    """Rebuild a run's method from its config and latest checkpoint, and write its PEFT adapter (and merged model).

    ThanoRA reuses the run's cached spectra (no calibration forward pass when they match). Useful after `thanora
    train`, after an interrupted run, or to add a merged model later.

    Raises:
        FileNotFoundError: the run has no resolved config or no checkpoint for the method.
        ValueError: the method is not in the run's config or cannot be exported.
    """
    from thanora.adapters.merge import merge_adapter_into
    from thanora.artifacts import load_tensors
    from thanora.experiment.config import load_config
    from thanora.methods.base import MethodContext
    from thanora.methods.registry import get_method
    from thanora.training.checkpoints import CHECKPOINTS, LATEST

    run_dir = Path(run_dir)
    if not rundir.is_run_dir(run_dir):
        raise rundir.RunDirError(f"{run_dir} is not a thanora run folder (no run.json); give the --output-dir of a "
                                 "thanora run or train")
    cfg = load_config(run_dir / "config.yaml")
    spec = next((m for m in cfg.methods if m.label == label), None)
    if spec is None:
        raise ValueError(f"--method {label!r} is not in {run_dir}/config.yaml (methods: "
                         f"{[m.label for m in cfg.methods]})")
    method, settings = get_method(spec.name), spec.build()
    if method.export is None:
        raise ValueError(f"method {label!r} cannot be exported as a PEFT adapter (input-dependent routing: no fixed "
                         f"weight update reproduces it); {run_dir}/{label}/adapter holds its native format, loaded "
                         "with thanora.adapters.native.load_native(base_model, folder, method)")
    pointer = run_dir / label / CHECKPOINTS / LATEST
    if not pointer.is_file():
        raise FileNotFoundError(f"{pointer} does not exist: train the method first (thanora train / run)")
    checkpoint = pointer.parent / pointer.read_text(encoding="utf-8").strip()
    if artifact_kind(checkpoint) != "checkpoint":
        raise FileNotFoundError(f"{pointer} names {checkpoint}, which is not a thanora checkpoint folder")
    device = resolve_device(cfg.model.device)
    processor = load_processor(cfg)
    tokenizer = load_tokenizer(cfg, processor)
    tasks = [t for t in load_tasks(cfg) if spec.tasks is None or t.name in spec.tasks]
    ctx = MethodContext(
        tokenizer=tokenizer,
        calibration={t.name: calibration_batches(t, tokenizer, cfg.data, "cpu", processor) for t in tasks},
        cache_dir=run_dir / "cache",
        seed=cfg.seed,  # as in the run: a seeded residual init (R-LoRA+) must be rebuilt identically
        calibration_key=calibration_key(tasks),
    )
    model = method.prepare(load_model(cfg, device), settings, ctx)
    tensors, _ = load_tensors(checkpoint / "adapter.safetensors")
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

