"""Build a frozen settings dataclass from plain YAML data, checking every value against its type hint first.

Every settings class of thanora (the run config's sections, each method's settings) is a frozen dataclass whose
fields carry type hints; `build` checks the keys (unknown ones are named with the valid ones), converts and checks
each value against its hint (``int``, ``float``, ``bool``, ``str``, ``Literal``, ``X | None``, ``tuple[X, ...]``,
nested dataclasses), and only then calls the class, whose ``__post_init__`` checks ranges. So a wrong type is
reported as ``train.lr: expected a number, got 'fast' (str)`` instead of a comparison error from deep inside.

Why by hand: the settings are plain dataclasses with their own range checks, used by the library API without any
config file; pydantic or OmegaConf structured configs would need a second schema per class. This is the ~100 lines
that walk the hints.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal, Union


class ConfigError(ValueError):
    """A configuration key or value is wrong; the message names the key path and the fix (one line per problem)."""


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass ``cls`` from the mapping ``data`` found at key path ``where`` ("" for the top level).

    Raises:
        ConfigError: unknown key, a value of the wrong type, or a value ``cls`` refuses (naming ``where.<field>``).
    """
    if isinstance(data, cls):
        return data
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of {cls.__name__} fields, got "
                          f"{_shown(data)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        prefix = f"{where}." if where else ""
        raise ConfigError(f"unknown key(s) {[prefix + str(k) for k in unknown]}; valid keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {name: convert(hints[name], value, f"{where}.{name}" if where else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{where or 'config'}: {err}") from err


def convert(hint: Any, value: Any, where: str) -> Any:
    """``value`` checked (and, where YAML is loose, converted) against ``hint``.

    YAML reads ``1e-4`` as a string, so numeric strings are accepted where a number is expected; ``64.0`` is not an
    integer and ``"yes"`` is not a bool.

    Raises:
        ConfigError: naming ``where``, what was expected and what was found.
    """
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return convert(inner[0], value, where)
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {list(args)}, got {_shown(value)}")
        return value
    if origin is tuple:
        item = args[0] if args else Any
        if isinstance(value, str) and item is str:
            value = [value]  # one name where a list of names is expected
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {_shown(value)}")
        items, problems = [], []
        for i, v in enumerate(value):  # every item checked, so a list with two bad items reports both
            try:
                items.append(convert(item, v, f"{where}[{i}]"))
            except ConfigError as err:
                problems.append(str(err))
        if problems:
            raise ConfigError("\n".join(problems))
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {_shown(value)}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {_shown(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {_shown(value)}")
        return value
    if hint is float:
        number = _number(value)
        if number is None:
            raise ConfigError(f"{where}: expected a number, got {_shown(value)}")
        if not math.isfinite(number):
            raise ConfigError(f"{where}: expected a finite number, got {_shown(value)}")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {_shown(value)}")
        return value
    return value


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{text[:60]}… ({type(value).__name__})" if len(text) > 60 else f"{text} ({type(value).__name__})"
