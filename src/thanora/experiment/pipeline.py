"""The whole flow of `thanora run`, as stage calls that write artifacts. The first file a newcomer reads.

Run directory layout::

    DIR/config.yaml        resolved config          DIR/data.json      split sizes, seeds, fingerprints
    DIR/metrics.json       base + every method      DIR/report.md      tables + plots
    DIR/run.json           versions, seed, timings, status ("running" until the run is complete)
    DIR/plots/*.png        figures
    DIR/<method>/          rank_plan.json (ThanoRA), checkpoints/, history.json, metrics.json, adapter/, merged/

Vision-language models (a saved config with a ``vision_config``, e.g. LLaVA) load through
``AutoModelForImageTextToText`` and their ``AutoProcessor``: image examples go through the processor in calibration,
training and evaluation alike, and only the language model is adapted (``thanora.core.targets``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from thanora.adapters.merge import merge_adapter_into
from thanora.artifacts import read_json, write_json
from thanora.data.formats import collate
from thanora.data.tasks import MixtureSampler, TaskData, build_task, calibration_batches, encode_examples
from thanora.evaluation.evaluate import EvalTask, average, evaluate
from thanora.experiment.config import MethodSpec, RunConfig
from thanora.experiment.plots import plot_run
from thanora.methods.base import Method, MethodContext
from thanora.methods.registry import get_method
from thanora.training.train import check_sharding, make_accelerator, train

logger = logging.getLogger(__name__)


class RunDirError(RuntimeError):
    """The output directory holds another run (or an incomplete one) and neither overwrite nor resume was asked."""


@dataclass
class RunState:
    """What `run` carries between stages."""

    cfg: RunConfig
    out: Path
    tasks: list[TaskData]
    device: torch.device
    timings: dict[str, float]
    processor: Any = None  # AutoProcessor of a vision-language model, None for text models
    main: bool = True  # the main process (the only one that evaluates and writes files)


def check_output_dir(out: Path, overwrite: bool, resume: bool) -> None:
    """Refuse to write into a directory that holds another run unless ``overwrite`` or ``resume``."""
    if overwrite and resume:
        raise RunDirError("--overwrite and --resume exclude each other")
    if resume and not (out / "run.json").is_file():
        raise RunDirError(f"--resume: {out} holds no run to resume (no run.json); drop --resume")
    if out.exists() and any(out.iterdir()) and not (overwrite or resume):
        raise RunDirError(f"{out} already holds files; pass --overwrite to replace them or --resume to continue")
    if overwrite and out.exists():
        import shutil

        shutil.rmtree(out)


def run(cfg: RunConfig, out: Path, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Everything: data → base metrics → per method (prepare, train, evaluate, export) → plots → report.

    Under ``torchrun`` / ``accelerate launch`` every process runs this; calibration and training are shared out,
    while evaluation and every file write happen on the main process only.
    """
    from thanora.experiment.report import console_table, write_report

    out = Path(out)
    model_path(cfg)  # a missing model folder fails before the run directory is touched
    device = resolve_device(cfg.model.device)
    accelerator = make_accelerator(cfg.train, cpu=device.type == "cpu")  # one for the whole run
    check_sharding(accelerator.distributed_type)  # before any work
    if accelerator.is_main_process:
        check_output_dir(out, overwrite, resume)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    earlier = read_json(out / "run.json").get("timings_s", {}) if resume else {}  # stages done before: kept
    state = RunState(cfg, out, [], device, dict(earlier), main=accelerator.is_main_process)
    if state.main:
        cfg.save(out / "config.yaml")
        write_json(out / "run.json", run_record(cfg, "running", state.timings))
    state.tasks = stage("data", state, lambda: load_tasks(cfg, out, state.main))
    state.processor = load_processor(cfg)
    tokenizer = load_tokenizer(cfg, state.processor)
    metrics: dict[str, Any] = read_json(out / "metrics.json") if resume and (out / "metrics.json").is_file() else {}
    if cfg.output.evaluate_base and "base" not in metrics:
        if state.main:
            model = load_model(cfg, state.device)
            metrics["base"] = stage("eval_base", state, lambda: evaluate_model(model, tokenizer, state, progress))
            write_json(out / "metrics.json", metrics)
            del model
        accelerator.wait_for_everyone()
    for spec in cfg.methods:
        if spec.label in metrics:
            logger.info("method %s already complete, skipping (resume)", spec.label)
            continue
        result = stage(spec.label, state,
                       lambda s=spec: run_method(state, s, tokenizer, accelerator, resume, progress))
        if result:
            metrics[spec.label] = result
        if state.main:
            write_json(out / "metrics.json", metrics)
    if state.main:
        if cfg.output.plots:
            stage("plots", state, lambda: plot_run(out))
        write_json(out / "run.json", run_record(cfg, "complete", state.timings))
        write_report(out)
        print(console_table(metrics))
    accelerator.wait_for_everyone()
    return metrics


def stage(name: str, state: RunState, fn: Callable[[], Any]) -> Any:
    """Run one stage, log it and record its wall time in ``run.json``."""
    logger.info("stage %s ...", name)
    start = time.perf_counter()
    result = fn()
    state.timings[name] = round(time.perf_counter() - start, 2)
    if state.main:
        write_json(state.out / "run.json", run_record(state.cfg, "running", state.timings))
    logger.info("stage %s done in %.1f s", name, state.timings[name])
    return result


def load_tasks(cfg: RunConfig, out: Path, write: bool = True) -> list[TaskData]:
    """Build every task's splits and record them in ``data.json``."""
    tasks = [build_task(t, cfg.data.seed) for t in cfg.tasks]
    if write:
        write_json(out / "data.json", {t.name: {"source": t.config.source, **t.fingerprint} for t in tasks})
    return tasks


def run_method(state: RunState, spec: MethodSpec, tokenizer: Any, accelerator: Accelerator, resume: bool,
               progress: bool) -> dict:
    """Prepare, train, evaluate and export one method on a fresh copy of the base model.

    Under ``accelerate launch`` / ``torchrun`` each process takes its shard of the calibration batches (statistics
    are summed across processes, so they equal a single-process run) and of every training batch list.
    """
    cfg, method, settings = state.cfg, get_method(spec.name), spec.build()
    out = state.out / spec.label
    out.mkdir(parents=True, exist_ok=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = load_model(cfg, state.device)
    calibration = {t.name: calibration_batches(t, tokenizer, cfg.data, state.device, state.processor)[rank::world]
                   for t in state.tasks}
    short = [name for name, batches in calibration.items() if not batches]
    if short:
        raise ValueError(f"tasks {short}: fewer calibration batches than the {world} processes; raise n_calibration "
                         "or lower data.calibration_batch_size")
    ctx = MethodContext(
        tokenizer=tokenizer,
        calibration=calibration,
        cache_dir=state.out / "cache",
        all_reduce=(lambda t: accelerator.reduce(t, reduction="sum")) if world > 1 else None,
        progress=progress,
        seed=cfg.seed,
        calibration_key=json.dumps([t.fingerprint for t in state.tasks], sort_keys=True),
    )
    model = method.prepare(model, settings, ctx)
    if state.main:
        write_description(method, model, out)
    loader_factory = train_loader(state, tokenizer, rank, world, stratified=method.stratified_batches)
    result = train(model, method, settings, loader_factory, cfg.train, accelerator, out_dir=out, resume=resume,
                   progress=progress and state.main)
    if not state.main:
        accelerator.wait_for_everyone()
        return {}
    write_json(out / "history.json", result.history)
    if method.finalize is not None:
        model = method.finalize(model, settings)
    write_description(method, model, out)
    metrics = evaluate_model(model, tokenizer, state, progress) if cfg.output.evaluate else {}
    if metrics:
        write_json(out / "metrics.json", metrics)
    if cfg.output.adapter or cfg.output.merged:
        export_or_save(method, model, out)
    if cfg.output.merged and method.mergeable:
        merge_adapter_into(load_model(cfg, torch.device("cpu")), out / "adapter", out / "merged",
                           state.processor or tokenizer)
    accelerator.wait_for_everyone()
    return metrics


def export_or_save(method: Method, model: nn.Module, out: Path) -> None:
    """``out/adapter``: the stock PEFT adapter of an exportable method, else the method's own reloadable format
    (routed methods, see `thanora.adapters.native`)."""
    (method.export or method.save)(model, out / "adapter")


def write_description(method: Method, model: nn.Module, out: Path) -> None:
    """The method's own JSON artifacts (ThanoRA: rank_plan.json, overlap.json), before and after training."""
    if method.describe is not None:
        for name, content in method.describe(model).items():
            write_json(out / name, content)


def train_loader(state: RunState, tokenizer: Any, rank: int = 0, world: int = 1,
                 stratified: bool = False) -> Callable[[int], list[dict]]:
    """A loader factory ``epoch -> batches`` over the task mixture (this process's share of every batch);
    ``stratified`` forces task-stratified batches (methods with ``stratified_batches``)."""
    cfg = state.cfg
    data = dataclasses.replace(cfg.data, stratified=True) if stratified and not cfg.data.stratified else cfg.data
    if data is not cfg.data:
        logger.info("task-stratified batches for this method (data.stratified switched on)")
    features = [
        f
        for task_id, task in enumerate(state.tasks)
        for f in encode_examples(task.train, task.config, tokenizer, cfg.data, task_id, state.processor)
    ]
    sampler = MixtureSampler([len(t.train) for t in state.tasks], cfg.train.batch_size * world, data, cfg.seed)

    def factory(epoch: int) -> list[dict[str, torch.Tensor]]:
        return [collate([features[i] for i in batch[rank::world]], tokenizer.pad_token_id)
                for batch in sampler.batches(epoch)]

    return factory


def evaluate_model(model: nn.Module, tokenizer: Any, state: RunState, progress: bool) -> dict:
    """Per-task metrics and their unweighted average."""
    tasks = [
        EvalTask(t.name, t.eval, t.config.answer_format, t.config.resolved_metric, state.cfg.data.chat_template)
        for t in state.tasks
    ]
    results = evaluate(model, tokenizer, tasks, state.cfg.eval, state.device, progress=progress,
                       processor=state.processor)
    return {**results, "average": average(results)}


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def is_vision_language(cfg: RunConfig) -> bool:
    """Whether the base model is a vision-language model: its saved config has a ``vision_config`` (LLaVA & co.)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(model_path(cfg)))
    return getattr(config, "vision_config", None) is not None


def load_processor(cfg: RunConfig) -> Any:
    """The ``AutoProcessor`` of a vision-language base model (with a pad token), or None for a text model."""
    if not is_vision_language(cfg):
        return None
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_path(cfg)))
    if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_token", None) is None:
        raise ValueError(f"model {cfg.model.name_or_path!r} is a vision-language model but its processor "
                         f"({type(processor).__name__}) has no tokenizer or image_token")
    _ensure_pad_token(processor.tokenizer)
    return processor


def load_tokenizer(cfg: RunConfig, processor: Any = None) -> Any:
    """The base model's tokenizer, with a pad token: the processor's own for a vision-language model (so prompts
    and answers share one tokenizer object), else ``AutoTokenizer``."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(model_path(cfg)))
    _ensure_pad_token(tokenizer)
    return tokenizer


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token


def load_model(cfg: RunConfig, device: torch.device) -> nn.Module:
    """A fresh copy of the base model on ``device`` in eval mode: ``AutoModelForImageTextToText`` for a
    vision-language model, else ``AutoModelForCausalLM``."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_vision_language(cfg) else AutoModelForCausalLM
    dtype = getattr(torch, cfg.model.dtype)
    model = auto.from_pretrained(str(model_path(cfg)), dtype=dtype)
    return model.to(device).eval()


def model_path(cfg: RunConfig) -> str | Path:
    """The config's base model as `resolve_model_path` finds it."""
    return resolve_model_path(cfg.model.name_or_path)


def resolve_model_path(name: str) -> str | Path:
    """``smollm2`` → the converted offline asset folder; a local folder as given; anything else is a Hub id.

    Raises:
        FileNotFoundError: a local path (absolute, ``./``, ``~``) that does not exist.
    """
    if name == "smollm2":
        from thanora.assets import smollm2_dir

        return smollm2_dir()
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) and not path.is_dir():
        raise FileNotFoundError(f"model.name_or_path {name!r} does not exist; give a model folder, 'smollm2' (the "
                                "offline SmolLM2 asset) or a Hugging Face Hub id")
    return path if path.is_dir() else name


def run_record(cfg: RunConfig, status: str, timings: dict[str, float]) -> dict[str, Any]:
    """``run.json``: status, seed, versions, machine, timings."""
    import peft
    import transformers

    import thanora

    return {
        "status": status,
        "seed": cfg.seed,
        "data_seed": cfg.data.seed,
        "versions": {"thanora": thanora.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "timings_s": timings,
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
