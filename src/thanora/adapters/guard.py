"""The save/unload policy of a model whose base holds the residual weights W_res = W − s·B₀A₀ (ThanoRA, CorDA with
``residual_mode: rewrite``).

The in-memory adapter is only right on W_res, so such a model must never hand out its adapter or its base as if they
belonged to the original model. `guard_residual_base_` gives the `PeftModel` and the transformers model inside it
thin subclasses (runtime class swaps with the same class names, so ``config.architectures`` and PEFT's task type are
unchanged; the objects, their modules and PEFT's behaviour are otherwise untouched):

- ``PeftModel.save_pretrained`` writes the *converted* adapter (`thanora.adapters.export.export_adapter`);
- ``PeftModel.unload()`` and ``PeftModel.disable_adapter()`` are refused: both would run or return W_res alone;
- the inner model's ``save_pretrained`` (reached through ``get_base_model()`` or ``base_model.model``) is refused:
  it would write W_res and the LoRA layers' keys as a model folder; `thanora.save_merged` writes the merged model
  through it (`saving_merged`).

``merge_and_unload()`` stays allowed: the merged weight W_res + s·B·A is the right one. With ``residual_mode:
branch`` the base keeps W (the residual is a frozen low-rank branch), so none of this is needed and nothing is
guarded.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn

from thanora.adapters.export import export_adapter
from thanora.adapters.record import adapter_of

logger = logging.getLogger(__name__)

_SAVING_MERGED: contextvars.ContextVar[bool] = contextvars.ContextVar("thanora_saving_merged", default=False)


class ResidualBaseError(RuntimeError):
    """An operation would treat the residual base as the original model."""


def guard_residual_base_(model: PeftModel) -> None:
    """Put ``model`` (prepared by `thanora.adapters.layers.inject_` with the residual base) under the policy."""
    model.__class__ = _guarded_class(type(model))
    inner = model.get_base_model()
    inner.__class__ = _guarded_inner_class(type(inner))


@contextlib.contextmanager
def saving_merged() -> Iterator[None]:
    """Within the block, the guarded inner model may be saved (`thanora.save_merged`, after merging)."""
    token = _SAVING_MERGED.set(True)
    try:
        yield
    finally:
        _SAVING_MERGED.reset(token)


def _residual_error(what: str) -> ResidualBaseError:
    return ResidualBaseError(
        f"{what} the residual base W - s·B0·A0, not the original model; use thanora.export_adapter(model, dir) for "
        "an adapter on the original base, thanora.save_merged(model, dir) for a merged model, or reload the "
        "original base (residual_mode: branch keeps the original weights in the model)"
    )


@functools.cache
def _guarded_class(cls: type[PeftModel]) -> type[PeftModel]:
    """A subclass of ``cls``: save writes the converted adapter; unload and disable_adapter are refused."""

    def save_pretrained(self: PeftModel, save_directory: str | Path, **kwargs: Any) -> None:
        if kwargs:
            logger.warning("save_pretrained: ignoring %s; thanora writes the converted adapter", sorted(kwargs))
        export_adapter(self, save_directory)

    def unload(self: PeftModel, *args: Any, **kwargs: Any) -> nn.Module:
        if not adapter_of(self).config.residual:
            return self.base_model.unload(*args, **kwargs)  # PeftModel forwards unload to its LoraModel
        raise _residual_error("unload() would return")

    @contextlib.contextmanager
    def disable_adapter(self: PeftModel) -> Iterator[None]:
        if adapter_of(self).config.residual:
            raise _residual_error("disable_adapter() would run")
        with cls.disable_adapter(self):
            yield

    return type(f"Thanora{cls.__name__}", (cls,), {
        "save_pretrained": save_pretrained, "unload": unload, "disable_adapter": disable_adapter,
        "__module__": __name__,
    })


@functools.cache
def _guarded_inner_class(cls: type[nn.Module]) -> type[nn.Module]:
    """A subclass of the transformers model class ``cls``, with the same name, whose save_pretrained is refused
    outside `saving_merged`."""

    def save_pretrained(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
        if not _SAVING_MERGED.get():
            raise _residual_error("save_pretrained() of the model inside a prepared model would write")
        return cls.save_pretrained(self, *args, **kwargs)

    return type(cls.__name__, (cls,), {"save_pretrained": save_pretrained, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})
