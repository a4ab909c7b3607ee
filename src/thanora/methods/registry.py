"""The registry of methods: the only module that imports every method.

`METHODS` maps a config name to its `Method` value (in the order of `thanora methods`: baselines first, ThanoRA
last); `get_method` looks one up with an error that lists the known names; `methods_table` is the overview.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from torch import nn

from thanora.methods.align_lora import ALIGN_LORA
from thanora.methods.base import Method
from thanora.methods.corda import CORDA
from thanora.methods.dare import DARE
from thanora.methods.dora import DORA
from thanora.methods.hydralora import HYDRALORA
from thanora.methods.lora import LORA
from thanora.methods.mtlora import MTLORA
from thanora.methods.rlora_plus import RLORA_PLUS
from thanora.methods.thanora import THANORA

METHODS: dict[str, Method] = {  # the order of `thanora methods`: baselines first, ThanoRA last
    "lora": LORA,
    "dora": DORA,
    "corda": CORDA,
    "dare": DARE,
    "hydralora": HYDRALORA,
    "rlora_plus": RLORA_PLUS,
    "align_lora": ALIGN_LORA,
    "mtlora": MTLORA,
    "thanora": THANORA,
}


def get_method(name: str) -> Method:
    """The `Method` called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).
    """
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {sorted(METHODS)}") from None


def methods_table(model: nn.Module | None = None, rank: int | None = None) -> list[dict[str, Any]]:
    """One row per method: name, mergeable, task ids at train/test, paper, and (with ``model``) the trainable
    parameter count of the method's default settings, with ``rank`` replacing the ``rank`` field where it has one.

    Args:
        model: the base model, typically built on the ``meta`` device (`param_count` is analytic).
        rank: the rank to count at; ``None`` keeps each method's default.
    """
    rows = []
    for name, method in METHODS.items():
        fields = {f.name for f in dataclasses.fields(method.config_cls)}
        settings = method.config_cls(**({"rank": rank} if rank is not None and "rank" in fields else {}))
        row: dict[str, Any] = {"method": name, "mergeable": method.mergeable,
                               "task_id_train": method.task_id_at_train, "task_id_test": method.task_id_at_test,
                               "paper": method.paper}
        if model is not None:
            row["params"] = method.param_count(model, settings)
            row["rank"] = getattr(settings, "rank", None)
        rows.append(row)
    return rows


__all__ = ["METHODS", "get_method", "methods_table"]
