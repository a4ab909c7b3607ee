"""Settings of a run config that would have no effect in a ``thanora run``: said once at the start, never ignored.

Generic ones (``epochs`` beside ``max_steps``, ``train.eval_every`` in a run, sampling with one task, a merged model for
a routed method...) are listed here; a method's own (SPR with one task, Align-LoRA's penalty with one task) come from
its `thanora.methods.base.Method.check_tasks`.
"""

from __future__ import annotations

from thanora.data.tasks import DataConfig
from thanora.experiment.config import RunConfig
from thanora.methods.registry import get_method
from thanora.training.train import TrainConfig


def ineffective_settings(cfg: RunConfig) -> list[str]:
    """One line for each setting of ``cfg`` that would have no effect in a ``thanora run`` (said once at the start
    instead of silently ignored)."""
    notes = []
    defaults_train, defaults_data = TrainConfig(), DataConfig()
    if cfg.train.max_steps is not None and cfg.train.epochs != defaults_train.epochs:
        notes.append(f"train.epochs={cfg.train.epochs} has no effect: train.max_steps={cfg.train.max_steps} sets the "
                     "length of training")
    if cfg.train.eval_every:
        notes.append("train.eval_every has no effect in `thanora run` (methods are evaluated once, after training); "
                     "use thanora.training.train.train(eval_fn=...) for evaluation during training")
    if len(cfg.tasks) == 1:
        if cfg.data.sampling != defaults_data.sampling:
            notes.append(f"data.sampling={cfg.data.sampling} has no effect with a single task")
        if cfg.data.stratified:
            notes.append("data.stratified has no effect with a single task")
    if cfg.data.sampling != "temperature" and cfg.data.sampling_temperature != defaults_data.sampling_temperature:
        notes.append(f"data.sampling_temperature has no effect with data.sampling={cfg.data.sampling}")
    routed = [m.label for m in cfg.methods if not get_method(m.name).mergeable]
    if cfg.output.merged and routed:
        notes.append(f"output.merged has no effect for {routed}: their routing depends on the input, so there is "
                     "no fixed merged weight")
    if cfg.output.merged and not cfg.output.adapter:
        notes.append("output.adapter=false: the adapter is still written, because output.merged builds the merged "
                     "model from it")
    for key in sorted(set.intersection(*(set(spec.train) for spec in cfg.methods)) if cfg.methods else ()):
        if getattr(cfg.train, key) != getattr(defaults_train, key):
            notes.append(f"train.{key}={getattr(cfg.train, key)} has no effect: every method sets its own "
                         f"train.{key}")
    for spec in cfg.methods:
        method = get_method(spec.name)
        if method.check_tasks is not None:
            tasks = list(spec.tasks or cfg.task_names)
            notes += [f"methods[{spec.label}].{line}" for line in method.check_tasks(spec.build(), tasks)]
        train = spec.train_config(cfg.train)
        if train.max_steps is not None and "epochs" in spec.train and "max_steps" in spec.train:
            notes.append(f"methods[{spec.label}].train.epochs has no effect beside its max_steps")
    return notes
