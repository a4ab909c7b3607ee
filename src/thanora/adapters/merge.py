"""Merge the adapter into the base weights (zero inference overhead), unmerge, and save a merged HF model folder.

The prepared model's base holds W_res (residual init), so merging gives W_res + s·B·A = W + ΔW: the correct merged
weight. Merging an adapter onto the *original* base is only possible through `export_adapter`'s converted adapter.

`save_merged` merges in place, saves the base model's state dict with PEFT's ``.base_layer.`` key level removed and
its LoRA tensors dropped, then unmerges: PEFT's ``merge_and_unload`` gives the same weights (tested) but replaces the
LoRA layers by plain ones, so the prepared model would lose its adapter, and ``copy.deepcopy`` first would double the
model's memory. `merge_adapter_into` (a fresh base, the exported adapter) does use ``merge_and_unload``.
"""

from __future__ import annotations

from pathlib import Path

from peft import PeftModel
from torch import nn

from thanora.adapters.guard import saving_merged
from thanora.adapters.record import unwrap
from thanora.artifacts import atomic_dir


def _peft(model: nn.Module) -> PeftModel:
    inner = unwrap(model)
    if not isinstance(inner, PeftModel):
        raise TypeError(f"expected a PeftModel (from thanora.prepare_model), got {type(model).__name__}")
    return inner


def is_merged(model: nn.Module) -> bool:
    """True when every LoRA layer of ``model`` is merged into its base weight."""
    layers = [m for m in _peft(model).modules() if hasattr(m, "merged_adapters") and hasattr(m, "base_layer")]
    return bool(layers) and all(m.merged for m in layers)


def merge_(model: nn.Module) -> None:
    """Write s·B·A into the base weights in place; a second call does nothing."""
    if not is_merged(model):
        _peft(model).merge_adapter()


def unmerge_(model: nn.Module) -> None:
    """Subtract s·B·A from the base weights again (restores the pre-merge weights up to round-off)."""
    if is_merged(model):
        _peft(model).unmerge_adapter()


def save_merged(model: nn.Module, out_dir: str | Path, tokenizer=None) -> Path:
    """Save a plain transformers model folder with the adapter merged in (loads with ``AutoModel*.from_pretrained``).

    The model is merged for the save and left as it was (merged or not) afterwards; no copy of the model is made.

    Args:
        model: a prepared model.
        out_dir: destination folder (replaced atomically).
        tokenizer: optional tokenizer or processor saved alongside.
    """
    peft_model = _peft(model)
    was_merged = is_merged(model)
    merge_(model)
    try:
        base = peft_model.get_base_model()
        state = {
            key.replace(".base_layer.", "."): value
            for key, value in base.state_dict().items()
            if ".lora_" not in key
        }
        with atomic_dir(out_dir, "merged") as tmp, saving_merged():  # merged: the weights are the right ones
            base.save_pretrained(str(tmp), state_dict=state)
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
    finally:
        if not was_merged:
            unmerge_(model)
    return Path(out_dir)


def merge_adapter_into(base: nn.Module, adapter_dir: str | Path, out_dir: str | Path, tokenizer=None) -> Path:
    """Load the stock PEFT adapter ``adapter_dir`` on the original ``base``, merge it and save a transformers folder.

    The route every mergeable method shares for its merged model: the exported adapter is the single source of truth,
    so the merged folder is exactly what PEFT's own ``merge_and_unload`` makes of it.
    """
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    with atomic_dir(out_dir, "merged") as tmp:
        merged.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
    return Path(out_dir)
