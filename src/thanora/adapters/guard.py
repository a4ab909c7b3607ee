"""The save/unload policy of a model whose base holds the residual weights W_res = W − s·B₀A₀ (ThanoRA, CorDA).

The in-memory adapter is only right on W_res, so such a model must never hand out its adapter or its base as if they
belonged to the original model. `guard_residual_base_` gives the `PeftModel` a thin subclass (a runtime class swap:
the object, its modules and PEFT's own behaviour are otherwise untouched) whose ``save_pretrained`` writes the
*converted* adapter (`thanora.adapters.export.export_adapter`) and whose ``unload`` is refused while the residual
base is on.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn

from thanora.adapters.export import export_adapter
from thanora.adapters.record import adapter_of

logger = logging.getLogger(__name__)


class ResidualBaseError(RuntimeError):
    """An operation would treat the residual base as the original model."""


def guard_residual_base_(model: PeftModel) -> None:
    """Put ``model`` (prepared by `thanora.adapters.layers.inject_`) under the policy, in place."""
    model.__class__ = _guarded_class(type(model))


@functools.cache
def _guarded_class(cls: type[PeftModel]) -> type[PeftModel]:
    """A subclass of ``cls`` whose save writes the converted adapter and whose unload refuses a residual base."""

    def save_pretrained(self: PeftModel, save_directory: str | Path, **kwargs: Any) -> None:
        if kwargs:
            logger.warning("save_pretrained: ignoring %s; thanora writes the converted adapter", sorted(kwargs))
        export_adapter(self, save_directory)

    def unload(self: PeftModel, *args: Any, **kwargs: Any) -> nn.Module:
        if not adapter_of(self).config.residual:
            return self.base_model.unload(*args, **kwargs)  # PeftModel forwards unload to its LoraModel
        raise ResidualBaseError(
            "unload() would return the residual base W - s·B0·A0, not the original model; use "
            "thanora.merge_(model) then model.merge_and_unload() for a merged model, or reload the original base"
        )

    return type(f"Thanora{cls.__name__}", (cls,), {
        "save_pretrained": save_pretrained, "unload": unload, "__module__": __name__,
    })
