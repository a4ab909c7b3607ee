"""thanora's own adapter format, for methods that stock PEFT cannot represent (input-dependent routing).

A folder with ``thanora_native.json`` (format version, method name, its settings, the base model's class and
``name_or_path``, and the name and shape of every saved tensor) and ``adapter.safetensors`` (the method's trainable
parameters under their names in the prepared model). Loading re-runs the method's ``prepare`` on a fresh base
model (deterministic, no calibration) and copies the tensors in, refusing any mismatch of names or shapes, so a
folder never loads silently into the wrong architecture or settings.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from thanora.adapters.record import unwrap
from thanora.artifacts import atomic_dir, load_tensors, read_json, save_tensors, write_json
from thanora.methods.base import Method, MethodContext

FORMAT = "thanora-native/1"
META = "thanora_native.json"
TENSORS = "adapter.safetensors"


class NativeFormatError(ValueError):
    """The folder is not a thanora adapter of the expected method, or does not fit the base model."""


def save_native(model: nn.Module, method_name: str, settings: Any, out_dir: str | Path) -> Path:
    """Write the trainable parameters of ``model`` and the method's settings to ``out_dir`` (replaced atomically)."""
    inner = unwrap(model)
    tensors = {n: p.detach() for n, p in inner.named_parameters() if p.requires_grad}
    if not tensors:
        raise ValueError(f"{type(inner).__name__} has no trainable parameter to save")
    config = getattr(inner, "config", None)
    meta = {
        "format": FORMAT,
        "method": method_name,
        "settings": _plain(dataclasses.asdict(settings)),
        "base_model": {"class": type(inner).__name__, "name_or_path": getattr(config, "_name_or_path", None)},
        "tensors": {n: list(t.shape) for n, t in tensors.items()},
    }
    with atomic_dir(out_dir, "adapter") as tmp:
        save_tensors(tensors, Path(tmp) / TENSORS)
        write_json(Path(tmp) / META, meta)
    return Path(out_dir)


def read_native_meta(folder: str | Path) -> dict[str, Any]:
    """The metadata of a native adapter folder.

    Raises:
        NativeFormatError: no ``thanora_native.json`` (e.g. a PEFT adapter folder) or an unknown format version.
    """
    path = Path(folder) / META
    if not path.is_file():
        raise NativeFormatError(f"{folder} is not a thanora adapter folder (no {META}); "
                                "a PEFT adapter loads with peft.PeftModel.from_pretrained")
    meta = read_json(path)
    if meta.get("format") != FORMAT:
        raise NativeFormatError(f"{path}: format {meta.get('format')!r}, this thanora reads {FORMAT!r}")
    return meta


def load_native(base: nn.Module, folder: str | Path, method: Method) -> nn.Module:
    """Rebuild the saved method on ``base`` (a fresh copy of the original base model) and load its tensors.

    Args:
        base: the original base model, modified in place by the method's ``prepare``.
        folder: written by `save_native`.
        method: the method that saved it (a folder saved by another method is refused); a caller that does not
            know it reads ``read_native_meta(folder)["method"]`` and looks it up in `thanora.methods.registry`.

    Returns:
        The model in eval mode, parameters frozen as after ``prepare``.

    Raises:
        NativeFormatError: wrong method, or the tensors do not match what ``prepare`` builds on ``base``.
    """
    meta = read_native_meta(folder)
    if meta["method"] != method.name:
        raise NativeFormatError(f"{folder} holds a {meta['method']!r} adapter, not {method.name!r}")
    settings = method.config_cls(**meta["settings"])
    model = method.prepare(base, settings, MethodContext(progress=False))
    tensors, _ = load_tensors(Path(folder) / TENSORS)
    params = dict(model.named_parameters())
    expected = {n: list(p.shape) for n, p in params.items() if p.requires_grad}
    found = {n: list(t.shape) for n, t in tensors.items()}
    if expected != found:
        missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        shapes = sorted(n for n in set(expected) & set(found) if expected[n] != found[n])
        raise NativeFormatError(f"{folder} does not fit this base model: missing {missing[:3]}, unexpected "
                                f"{extra[:3]}, shape mismatch {shapes[:3]} (was it saved for another base model?)")
    with torch.no_grad():
        for name, value in tensors.items():
            params[name].copy_(value)
    return model.eval()


def _plain(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
