"""The whole flow of `thanora run`, as stage calls that write artifacts. The first file a newcomer reads.

Run directory layout::

    DIR/config.yaml        resolved config          DIR/data.json      split sizes, seeds, fingerprints
    DIR/metrics.json       base + every method      DIR/report.md      tables + plots
    DIR/run.json           format, versions, seed, timings, status (running | complete | failed | interrupted), the
                           entries the run writes (what --overwrite may delete: `thanora.experiment.rundir`)
    DIR/plots/*.png        figures
    DIR/<method>/          train.json (its training settings and tasks), rank_plan.json (ThanoRA), checkpoints/,
                           history.json, metrics.json, adapter/, merged/

Every input (config, data files, model, device, output folder) is checked before the output folder is touched.
Vision-language models load through their processor (`thanora.experiment.models`): image examples go through it in
calibration, training and evaluation alike, and only the language model is adapted (``thanora.core.targets``).
"""

from __future__ import annotations

import dataclasses
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
from thanora.data.mixture import MixtureSampler
from thanora.data.tasks import (
    TaskData,
    build_task,
    calibration_batches,
    calibration_key,
    encode_examples,
)
from thanora.evaluation.evaluate import EvalTask, average, evaluate
from thanora.experiment import rundir
from thanora.experiment.config import MethodSpec, RunConfig
from thanora.experiment.models import (
    load_model,
    load_processor,
    load_tokenizer,
    meta_model,
    model_path,
    resolve_device,
)
from thanora.experiment.no_effect import ineffective_settings
from thanora.experiment.plots import plot_run
from thanora.methods.base import Method, MethodContext
from thanora.methods.registry import get_method
from thanora.training.distributed import check_sharding, make_accelerator
from thanora.training.train import train

logger = logging.getLogger(__name__)


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


def run(cfg: RunConfig, out: Path, overwrite: bool = False, resume: bool = False, progress: bool = True) -> dict:
    """Everything: data → base metrics → per method (prepare, train, evaluate, export) → plots → report.

    Every input is validated before the output folder is touched (`thanora.experiment.rundir` says what
    ``overwrite`` and ``resume`` may delete or continue). Under ``torchrun`` / ``accelerate launch`` every process
    runs this; calibration and training are shared out, while evaluation and every file write happen on the main
    process only. A run that stops on an error or an interrupt says so in ``run.json`` (``"failed"`` /
    ``"interrupted"``, with the error) and continues with ``resume``.

    Raises:
        RunDirError: the output folder cannot be used as asked (nothing was changed).
        ValueError, OSError: a bad input (config, data file, model, device), before anything is written.
    """
    from thanora.experiment.report import console_table, write_report

    out = Path(out)
    for note in ineffective_settings(cfg):
        logger.warning("%s", note)
    device = resolve_device(cfg.model.device)
    model_path(cfg)  # a missing model fails before anything else
    accelerator = make_accelerator(cfg.train, cpu=device.type == "cpu")  # one for the whole run
    check_sharding(accelerator.distributed_type)
    action = rundir.decide(out, cfg.to_dict(), overwrite, resume) if accelerator.is_main_process else "fresh"
    extends = resume and accelerator.is_main_process and bool(rundir.added_methods(out, cfg.to_dict()))
    start = time.perf_counter()
    check_methods_fit(cfg)  # target names and ranks against the model's structure (meta device, no weights)
    tasks = load_tasks(cfg)  # every data file read and checked
    processor = load_processor(cfg)
    tokenizer = load_tokenizer(cfg, processor)
    data_seconds = round(time.perf_counter() - start, 2)
    if accelerator.is_main_process:
        if action == "replace":
            rundir.check_inputs_outside(out, local_inputs(cfg))
            rundir.clear(out)
        out.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    earlier = read_json(out / "run.json").get("timings_s", {}) if resume else {}  # stages done before: kept
    state = RunState(cfg, out, tasks, device, {**earlier, "data": data_seconds}, processor, accelerator.is_main_process)
    if state.main:
        write_json(out / "run.json", run_record(cfg, "running", state.timings))  # first: it lists what the run writes
        if not resume or extends:  # a resumed run keeps the config.yaml its results came from (same up to
            cfg.save(out / "config.yaml")  # rundir.MAY_CHANGE), unless it adds methods: then the union
        write_json(out / "data.json", {t.name: {"source": t.config.source, **t.fingerprint} for t in tasks})
    try:
        metrics = _run_stages(state, tokenizer, accelerator, resume, progress)
    except BaseException as err:
        if state.main:
            status = "interrupted" if isinstance(err, KeyboardInterrupt) else "failed"
            write_json(out / "run.json", run_record(cfg, status, state.timings, f"{type(err).__name__}: {err}"))
        raise
    if state.main:
        write_json(out / "run.json", run_record(cfg, "complete", state.timings))
        write_report(out)
        print(console_table(metrics))
    accelerator.wait_for_everyone()
    return metrics


def _run_stages(state: RunState, tokenizer: Any, accelerator: Accelerator, resume: bool, progress: bool) -> dict:
    """Base metrics, every method, the plots; returns the content of ``metrics.json``."""
    cfg, out = state.cfg, state.out
    metrics: dict[str, Any] = read_json(out / "metrics.json") if resume and (out / "metrics.json").is_file() else {}
    if cfg.output.evaluate_base and "base" not in metrics:
        if state.main:
            model = load_model(cfg, state.device)
            metrics["base"] = stage("eval_base", state, lambda: evaluate_model(model, tokenizer, state, progress))
            write_json(out / "metrics.json", metrics)
            del model
        accelerator.wait_for_everyone()
    for spec in cfg.methods:
        if resume and spec.label in metrics:
            logger.info("method %s already complete, skipping (resume)", spec.label)
            continue
        result = stage(spec.label, state,
                       lambda s=spec: run_method(state, s, tokenizer, accelerator, resume, progress))
        if result:
            metrics[spec.label] = result
        if state.main:
            write_json(out / "metrics.json", metrics)
    if state.main and cfg.output.plots:
        stage("plots", state, lambda: plot_run(out))
    return metrics


def check_methods_fit(cfg: RunConfig) -> None:
    """Every method's settings against the base model's structure (built on the meta device: no weights, no
    memory): target module names and ranks, all methods' problems at once.

    Raises:
        ValueError: one line per method that does not fit, naming ``methods[<label>]``.
    """
    model = meta_model(cfg.model.name_or_path)
    problems = []
    for spec in cfg.methods:
        try:
            get_method(spec.name).param_count(model, spec.build())
        except ValueError as err:
            problems.append(f"methods[{spec.label}]: {err}")
    if problems:
        raise ValueError("\n".join(problems))


def local_inputs(cfg: RunConfig) -> dict[str, Path]:
    """``{config field: path}`` of the run's inputs on this machine: local data files and a model folder."""
    inputs = {}
    for task in cfg.tasks:
        for field_name, source in (("source", task.source), ("eval_source", task.eval_source)):
            prefix, sep, rest = (source or "").partition(":")
            if sep and prefix in ("jsonl", "csv"):
                inputs[f"tasks[{task.name}].{field_name}"] = Path(rest)
    model = Path(cfg.model.name_or_path).expanduser()
    if model.is_dir():
        inputs["model.name_or_path"] = model
    return inputs


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


def load_tasks(cfg: RunConfig) -> list[TaskData]:
    """Every task's splits, each data file read and checked (`thanora.data.tasks.build_task`); the problems of all
    tasks are reported together.

    Raises:
        ValueError: one line per task that cannot be built.
    """
    tasks, problems = [], []
    for task_cfg in cfg.tasks:
        try:
            tasks.append(build_task(task_cfg, cfg.data.seed))
        except (ValueError, OSError) as err:
            text = str(err)
            problems.append(text if text.startswith(f"tasks[{task_cfg.name}]") else f"tasks[{task_cfg.name}]: {text}")
    if problems:
        raise ValueError("\n".join(problems))
    return tasks


def run_method(state: RunState, spec: MethodSpec, tokenizer: Any, accelerator: Accelerator, resume: bool,
               progress: bool) -> dict:
    """Prepare, train, evaluate and export one method on a fresh copy of the base model.

    The method trains with its own training settings (`MethodSpec.train_config`, recorded in
    ``<label>/train.json``) on its own tasks (``spec.tasks``, default all). Under ``accelerate launch`` / ``torchrun``
    each process takes its shard of the calibration batches (statistics are summed across processes, so they equal a
    single-process run) and of every training batch list.
    """
    cfg, method, settings = state.cfg, get_method(spec.name), spec.build()
    train_cfg = spec.train_config(cfg.train)
    state = dataclasses.replace(state, tasks=[t for t in state.tasks if spec.tasks is None or t.name in spec.tasks])
    out = state.out / spec.label
    out.mkdir(parents=True, exist_ok=True)
    if state.main:
        write_json(out / "train.json", {"train": train_cfg.to_dict(), "tasks": [t.name for t in state.tasks]})
    rank, world = accelerator.process_index, accelerator.num_processes
    model = load_model(cfg, state.device)
    # on the CPU: the statistics move one batch at a time to the model's device
    calibration = {t.name: calibration_batches(t, tokenizer, cfg.data, "cpu", state.processor)[rank::world]
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
        calibration_key=calibration_key(state.tasks),
    )
    model = method.prepare(model, settings, ctx)
    if state.main:
        write_description(method, model, out)
    loader_factory = train_loader(state, tokenizer, rank, world, stratified=method.stratified_batches)
    result = train(model, method, settings, loader_factory, train_cfg, accelerator, out_dir=out, resume=resume,
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
    sampler = MixtureSampler([len(t.train) for t in state.tasks], cfg.train.batch_size * world, data, cfg.seed,
                             lengths=[len(f["input_ids"]) for f in features])

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


def run_record(cfg: RunConfig, status: str, timings: dict[str, float], error: str | None = None) -> dict[str, Any]:
    """``run.json``: format, status, seed, versions, machine, timings, the entries the run writes (`rundir`) and,
    for a run that stopped, the error."""
    import peft
    import transformers

    import thanora

    return {
        "format": rundir.RUN_FORMAT,
        "status": status,
        "seed": cfg.seed,
        "data_seed": cfg.data.seed,
        "versions": {"thanora": thanora.__version__, "torch": torch.__version__,
                     "transformers": transformers.__version__, "peft": peft.__version__,
                     "python": platform.python_version()},
        "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(),
                    "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "timings_s": timings,
        "written": rundir.run_entries(m.label for m in cfg.methods),
        **({"error": error} if error else {}),
        "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
