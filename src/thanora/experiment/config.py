"""`RunConfig`: nests each stage's config; loads YAML, applies ``--a.b=value`` overrides, rejects unknown keys.

Every stage's `*Config` lives next to its code; this file only nests them. Errors name the exact key path
(``tasks[1].n_trian``) and the valid keys, so a typo never silently falls back to a default.

Why the override parser and the dataclass building are written here rather than taken from OmegaConf or
jsonargparse (checked): OmegaConf's dotlist addresses list items by index only, while the README, the benchmarks and
users address tasks and methods by name (``--methods.thanora.spr_lambda=0``, ``--tasks.csqa.n_train=500``), and it
parses values with its own grammar instead of YAML's; jsonargparse would take over the whole command line (the
subcommands are argparse) and still not name the list item by its label. Both would need the same validation pass
afterwards to name the field and the fix. What is written here is the small part they do not do: ~60 lines of
override application and a recursive dataclass build.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from thanora.artifacts import write_text
from thanora.data.tasks import DataConfig, TaskConfig
from thanora.evaluation.evaluate import EvalConfig
from thanora.methods.registry import get_method
from thanora.training.train import TrainConfig


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key path and the fix."""


@dataclass(frozen=True)
class ModelConfig:
    """The base model.

    Attributes:
        name_or_path: ``smollm2`` (the offline SmolLM2-135M-Instruct asset), a Hub id or a local folder.
        dtype: weights dtype: float32, bfloat16 or float16.
        device: ``auto`` (CUDA if available), ``cpu`` or ``cuda[:i]``.
    """

    name_or_path: str = "smollm2"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"


@dataclass(frozen=True)
class MethodSpec:
    """One method to train: its registered name, its settings (fields of the method's config class) and a label.

    The label (default: the name) names the run folder and the metrics row, so one method can appear several
    times with other settings, e.g. ``{name: thanora, label: hasi_only, spr_lambda: 0}``.
    """

    name: str
    settings: dict[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "label", self.label or self.name)
        if not self.label.isidentifier():
            raise ConfigError(f"methods[{self.label}].label must be an identifier, got {self.label!r}")

    def build(self) -> Any:
        """The method's validated config object."""
        method = get_method(self.name)
        try:
            return method.config_cls(**self.settings)
        except TypeError as err:
            valid = [f.name for f in dataclasses.fields(method.config_cls)]
            raise ConfigError(f"methods[{self.label}]: {err}; valid keys: {valid}") from err


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
        if not self.tasks:
            raise ConfigError("tasks: at least one task is required")
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ConfigError(f"tasks: task names must be unique, got {names}")
        if not self.methods:
            raise ConfigError("methods: at least one method is required (e.g. `- name: thanora`)")
        labels = [m.label for m in self.methods]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"methods: labels must be unique, got {labels}; give repeated methods a `label`")
        for spec in self.methods:
            spec.build()
            if self.train.gradient_checkpointing and not get_method(spec.name).supports_gradient_checkpointing:
                raise ConfigError(f"train.gradient_checkpointing: {spec.name} (methods[{spec.label}]) does not "
                                  "support it (see docs/METHODS.md); set it to false or train that method separately")

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (the resolved ``config.yaml``)."""
        out = _plain(self)
        out["methods"] = [{"name": m.name, "label": m.label, **_plain(m.build())} for m in self.methods]
        return out

    def save(self, path: str | Path) -> None:
        """Write the resolved config as YAML, atomically."""
        write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply ``a.b=value`` overrides and validate everything.

    Overrides address nested keys with dots; list items by index (``tasks.0.n_train=100``) or, for tasks and
    methods, by name (``methods.thanora.spr_lambda=0``). Values are parsed as YAML (``1e-4``, ``true``, ``[a, b]``).

    Raises:
        ConfigError: missing file, bad YAML, unknown key or bad value (the message names the key path).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path} is not valid YAML: {err}") from err
    for item in overrides or []:
        _apply_override(data, item)
    return config_from_dict(data)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build and validate a `RunConfig` from plain data."""
    if not isinstance(data, dict):
        raise ConfigError("the config must be a mapping of sections (model, tasks, methods, ...)")
    data = dict(data)
    methods = data.get("methods")
    if not isinstance(methods, list):
        raise ConfigError("methods: must be a list, e.g. `methods: [{name: lora}, {name: thanora}]`")
    specs = []
    for i, item in enumerate(methods):
        item = {"name": item} if isinstance(item, str) else dict(item)
        if "name" not in item:
            raise ConfigError(f"methods[{i}]: missing `name`")
        name = item.pop("name")
        label = str(item.pop("label", "") or "")
        try:
            get_method(name)
        except ValueError as err:
            raise ConfigError(f"methods[{i}].name: {err}") from err
        specs.append(MethodSpec(name, item, label))
    data["methods"] = specs
    try:
        return _build(RunConfig, data, "")
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:
        raise ConfigError(str(err)) from err


def _build(cls: type, data: Any, where: str) -> Any:
    """Recursively build dataclass ``cls`` from ``data``, rejecting unknown keys with their path."""
    if isinstance(data, cls):
        return data
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key(s) {[prefix + k for k in unknown]}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where or 'config'}: {err}") from err


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, where)
    if origin is tuple and dataclasses.is_dataclass(typing.get_args(hint)[0]):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list")
        item = typing.get_args(hint)[0]
        return tuple(_build(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin in (Union, types.UnionType) and value is not None:
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, where)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if hint is float and isinstance(value, int | str) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError as err:
            raise ConfigError(f"{where}: expected a number, got {value!r}") from err
    return value


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip().removeprefix("--")
    if not sep or not key:
        raise ConfigError(f"override {item!r} must look like a.b=value")
    value = yaml.safe_load(raw) if raw.strip() else None
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
    raise ConfigError(f"override {key!r}: no list item {part!r}")


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, MethodSpec):
            return {"name": obj.name, "label": obj.label, **obj.settings}
        out = {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        return out
    if isinstance(obj, tuple | list):
        return [_plain(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj
