"""`RunConfig`: nests each stage's config; loads YAML, applies ``--a.b=value`` overrides, validates everything.

Every stage's `*Config` lives next to its code; this file only nests them. Values are checked against their type
hints (`thanora.experiment.schema`) and then by each class's own range checks; cross-field rules (unique and
reserved names, settings that cannot work with the run's tasks) are checked here, all in one pass: every problem is
one line naming the exact key path (``tasks[1].n_trian``, ``methods[thanora].rank``) and the fix, so a typo never
silently falls back to a default. `ineffective_settings` lists the settings that would have no effect in a run.

Why the override parser is written here rather than taken from OmegaConf or jsonargparse (checked): OmegaConf's
dotlist addresses list items by index only, while the README, the benchmarks and users address tasks and methods by
name (``--methods.thanora.spr_lambda=0``, ``--tasks.csqa.n_train=500``), and it parses values with its own grammar
instead of YAML's; jsonargparse would take over the whole command line (the subcommands are argparse) and still not
name the list item by its label. Both would need the same validation pass afterwards to name the field and the fix.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from thanora.artifacts import write_text
from thanora.data.tasks import DataConfig, TaskConfig
from thanora.evaluation.evaluate import EvalConfig
from thanora.experiment.rundir import RESERVED_LABELS, RESERVED_TASKS
from thanora.experiment.schema import ConfigError, build, convert
from thanora.methods.registry import get_method
from thanora.training.train import TrainConfig

__all__ = ["ConfigError", "MethodSpec", "ModelConfig", "OutputConfig", "RunConfig", "config_from_dict",
           "load_config"]

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


@dataclass(frozen=True)
class ModelConfig:
    """The base model.

    Attributes:
        name_or_path: ``smollm2`` (the offline SmolLM2-135M-Instruct asset), a Hub id or a local folder.
        dtype: weights dtype: float32, bfloat16, float16 or ``auto`` (bfloat16 on a CUDA device that supports it,
            else float32; `thanora.experiment.models.resolve_dtype`).
        device: ``auto`` (CUDA if available), ``cpu``, ``cuda`` / ``cuda:<i>`` or ``mps``; checked for availability
            when a command starts.
    """

    name_or_path: str = "smollm2"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"

    def __post_init__(self) -> None:
        if not self.name_or_path.strip():
            raise ValueError("name_or_path must name a model: 'smollm2', a model folder or a Hub id")
        if not _DEVICE.fullmatch(self.device):
            raise ValueError(f"device must be auto, cpu, cuda, cuda:<index> or mps, got {self.device!r}")


# Training settings a method entry may set for itself (``methods: [{name: thanora, train: {lr: 1e-4}}]``).
METHOD_TRAIN_KEYS = ("lr", "epochs", "max_steps", "warmup_ratio", "schedule", "weight_decay")


@dataclass(frozen=True)
class MethodSpec:
    """One method to train: its registered name, its settings (fields of the method's config class), a label, its
    own training settings and the tasks it trains on.

    The label (default: the name) names the run folder and the metrics row, so one method can appear several
    times with other settings, e.g. ``{name: thanora, label: hasi_only, spr_lambda: 0}``. ``train`` overrides the
    run's training settings for this method (`METHOD_TRAIN_KEYS`: e.g. each method at its own learning rate);
    ``tasks`` restricts the method to some of the run's tasks: it is calibrated, trained and scored on those only
    (single-task baselines: ``{name: lora, label: lora_csqa, tasks: [csqa]}``).
    """

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    label: str = ""
    train: dict[str, Any] = field(default_factory=dict)
    tasks: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.name)
        if not self.label.isidentifier():
            raise ConfigError(f"methods[{self.label}].label must be an identifier (letters, digits, underscores), "
                              f"got {self.label!r}")
        if not isinstance(self.train, dict):
            raise ConfigError(f"methods[{self.label}].train: expected a mapping of training settings, e.g. "
                              "{lr: 1e-4}")
        unknown = sorted(set(self.train) - set(METHOD_TRAIN_KEYS))
        if unknown:
            raise ConfigError(f"methods[{self.label}].train: {unknown} cannot be set per method; allowed: "
                              f"{list(METHOD_TRAIN_KEYS)} (the rest is the run's train section)")
        hints = typing.get_type_hints(TrainConfig)
        checked = {k: convert(hints[k], v, f"methods[{self.label}].train.{k}") for k, v in self.train.items()}
        object.__setattr__(self, "train", checked)
        if self.tasks is not None:
            tasks = convert(tuple[str, ...], self.tasks, f"methods[{self.label}].tasks")
            if not tasks:
                raise ConfigError(f"methods[{self.label}].tasks: give at least one task, or drop it (all tasks)")
            object.__setattr__(self, "tasks", tasks)

    def train_config(self, run: TrainConfig) -> TrainConfig:
        """The run's training settings with this method's own ones applied.

        Raises:
            ConfigError: the combination is invalid (naming ``methods[<label>].train``).
        """
        if not self.train:
            return run
        try:
            return dataclasses.replace(run, **self.train)
        except ValueError as err:
            raise ConfigError(f"methods[{self.label}].train: {err}") from None

    def build(self) -> Any:
        """The method's validated config object.

        Raises:
            ConfigError: an unknown key or a bad value, naming ``methods[<label>].<key>``.
        """
        return build(get_method(self.name).config_cls, self.settings, f"methods[{self.label}]")


@dataclass(frozen=True)
class OutputConfig:
    """What a run writes besides metrics.

    Attributes:
        adapter: write ``<method>/adapter``: a stock PEFT adapter (exportable methods) or the method's own reloadable
            format (routed methods: HydraLoRA, mtLoRA; see `thanora.adapters.native`).
        merged: also save a merged transformers model folder per method.
        plots: render the PNG figures.
        evaluate_base: evaluate the base model zero-shot (shown in every report).
        evaluate: evaluate every trained method (``thanora train`` turns it off).
    """

    adapter: bool = True
    merged: bool = False
    plots: bool = True
    evaluate_base: bool = True
    evaluate: bool = True


@dataclass(frozen=True)
class RunConfig:
    """A whole experiment: model, tasks, methods, training, evaluation, outputs."""

    tasks: tuple[TaskConfig, ...]
    methods: tuple[MethodSpec, ...]
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        problems = _cross_field_problems(self)
        if problems:
            raise ConfigError("\n".join(problems))

    @property
    def task_names(self) -> list[str]:
        """The task names, in task order."""
        return [t.name for t in self.tasks]

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the resolved ``config.yaml``)."""
        out = _plain(self)
        out["methods"] = [{"name": m.name, "label": m.label, **_plain(m.build()), **_method_extras(m)}
                          for m in self.methods]
        return out

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML, atomically."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def _cross_field_problems(cfg: RunConfig) -> list[str]:
    """Every rule that involves more than one field, one line per broken rule."""
    problems = []
    names = cfg.task_names
    if not names:
        problems.append("tasks: at least one task is required")
    if len(set(names)) != len(names):
        problems.append(f"tasks: task names must be unique, got {names}")
    problems += [f"tasks[{n}].name: {n!r} is reserved ({RESERVED_TASKS[n]}); rename the task"
                 for n in names if n in RESERVED_TASKS]
    problems += _label_problems(cfg.methods)
    for spec in cfg.methods:
        where = f"methods[{spec.label}]"
        method = get_method(spec.name)
        unknown = sorted(set(spec.tasks or ()) - set(names))
        if unknown:
            problems.append(f"{where}.tasks: {unknown} are not tasks of this run (tasks: {names})")
            continue
        try:
            settings = spec.build()
            spec.train_config(cfg.train)
            if method.check_tasks is not None and names:
                method.check_tasks(settings, list(spec.tasks or names))
        except ValueError as err:
            problems.append(str(err) if str(err).startswith("methods[") else f"{where}: {err}")
            continue
        if cfg.train.gradient_checkpointing and not method.supports_gradient_checkpointing:
            problems.append(f"train.gradient_checkpointing: {spec.name} ({where}) does not support it (see "
                            "docs/METHODS.md); set it to false or train that method separately")
    return problems


def _label_problems(specs: tuple[MethodSpec, ...]) -> list[str]:
    problems = [] if specs else ["methods: at least one method is required (e.g. `- name: thanora`)"]
    labels = [m.label for m in specs]
    if len(set(labels)) != len(labels):
        problems.append(f"methods: labels must be unique, got {labels}; give repeated methods a `label`")
    return problems + [f"methods[{label}].label: {label!r} is reserved ({RESERVED_LABELS[label]}); give the method "
                       "another `label`" for label in labels if label in RESERVED_LABELS]


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``a.b=value`` overrides and validate everything.

    Overrides address nested keys with dots; list items by index (``tasks.0.n_train=100``) or, for tasks and
    methods, by name (``methods.thanora.spr_lambda=0``). Values are parsed as YAML (``1e-4``, ``true``, ``[a, b]``).

    Raises:
        ConfigError: missing file, bad YAML, unknown key or bad value (the message names the key path).
    """
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"config file {path} does not exist; give the path of a YAML run config (see configs/)")
    if not path.is_file():
        raise ConfigError(f"config {path} is not a file; give the path of a YAML run config (see configs/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path} is not a UTF-8 text file ({err.reason} at byte {err.start}); give a YAML "
                          "run config") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the config must be a mapping of sections (model, tasks, methods, ...), got "
                          f"a {type(data).__name__}")
    for item in overrides or []:
        _apply_override(data, item)
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a `RunConfig` from plain data, reporting every problem (one line each) at once.

    Raises:
        ConfigError: one line per problem.
    """
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of sections (model, tasks, methods, ...)")
    fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(data) - set(fields))
    problems = [f"unknown section(s) {unknown}; valid sections: {sorted(fields)}"] if unknown else []
    hints = typing.get_type_hints(RunConfig)
    kwargs: dict[str, Any] = {}
    for name in fields:
        if name not in data or name == "methods":
            continue
        try:
            kwargs[name] = convert(hints[name], data[name], name)
        except ConfigError as err:
            problems.append(str(err))
    try:
        kwargs["methods"] = _method_specs(data.get("methods"))
    except ConfigError as err:
        problems.append(str(err))
    if "tasks" not in data:
        problems.append("tasks: missing; list at least one task, e.g. `tasks: [{name: csqa, source: csqa}]`")
    if problems:
        if "methods" in kwargs:  # the rules on labels need no other section: said now too
            problems += _label_problems(kwargs["methods"])
        raise ConfigError("\n".join(problems))
    return RunConfig(**kwargs)


def _method_specs(methods: Any) -> tuple[MethodSpec, ...]:
    if not isinstance(methods, list):
        raise ConfigError("methods: must be a list, e.g. `methods: [{name: lora}, {name: thanora}]`")
    specs, problems = [], []
    for i, item in enumerate(methods):
        item = {"name": item} if isinstance(item, str) else item
        if not isinstance(item, dict):
            problems.append(f"methods[{i}]: expected a method name or a mapping with `name`, got {item!r}")
            continue
        item = dict(item)
        if "name" not in item:
            problems.append(f"methods[{i}]: missing `name` (one of the methods listed by `thanora methods`)")
            continue
        name, label = item.pop("name"), item.pop("label", "") or ""
        train, tasks = item.pop("train", None) or {}, item.pop("tasks", None)
        try:
            get_method(str(name))
            if not isinstance(label, str):
                raise ConfigError(f"methods[{i}].label: expected a string, got {label!r}")
            specs.append(MethodSpec(str(name), item, label, train, tasks))
        except ConfigError as err:
            problems.append(str(err))
        except ValueError as err:
            problems.append(f"methods[{i}].name: {err}")
    if problems:
        raise ConfigError("\n".join(problems))
    return tuple(specs)


def _method_extras(spec: MethodSpec) -> dict[str, Any]:
    """A method entry's own training settings and task subset, when it has them (plain data)."""
    extras: dict[str, Any] = {}
    if spec.train:
        extras["train"] = dict(spec.train)
    if spec.tasks is not None:
        extras["tasks"] = list(spec.tasks)
    return extras


def _yaml_problem(err: yaml.YAMLError) -> str:
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{getattr(err, 'problem', None) or err}".replace("\n", " ")


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} must look like --a.b=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as err:
        raise ConfigError(f"override --{key}: the value {raw!r} is not valid YAML ({_yaml_problem(err)}); quote "
                          "it") from None
    parts = key.split(".")
    node: Any = data
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            index = _list_index(node, part, key)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"override --{key}: {'.'.join(parts[:i])} is a value, not a section")
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, {})


def _list_index(items: list[Any], part: str, key: str) -> int:
    if part.isdigit() and int(part) < len(items):
        return int(part)
    for i, item in enumerate(items):
        if item == part:
            items[i] = {"name": part}
            return i
        if isinstance(item, dict) and part in (item.get("label"), item.get("name")):
            return i
    names = [item.get("label") or item.get("name") if isinstance(item, dict) else item for item in items]
    raise ConfigError(f"override --{key}: no list item {part!r} (items: {names}, or an index 0-{len(items) - 1})")


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, MethodSpec):
            return {"name": obj.name, "label": obj.label, **obj.settings, **_method_extras(obj)}
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
