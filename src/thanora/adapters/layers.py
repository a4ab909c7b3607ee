"""Put ThanoRA's factors into a model as ordinary PEFT LoRA layers, with the residual base (SPEC.md §7).

ThanoRA is a rank-R LoRA per module whose rank dimension is cut into task blocks and a cooperative block, so PEFT's
`LoraLayer` already does the forward pass, dropout, `Conv1D` transposes, merging and unmerging. `inject_` adds the
LoRA layers, copies the HASI factors in, rewrites each base weight to W_res = W − s·B₀A₀ when the residual base is
on (``residual_mode: rewrite``; then the model goes under the save/unload policy of `thanora.adapters.guard`: the
in-memory adapter is wrong on the original model) or adds the frozen −s·B₀A₀ adapter (``branch``), and attaches the
`thanora.adapters.record.ThanoraAdapter` record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from peft import PeftModel, get_peft_model
from torch import nn

from thanora.adapters.guard import guard_residual_base_
from thanora.adapters.peft_config import lora_config
from thanora.adapters.record import ADAPTER_NAME, RESIDUAL_ADAPTER, ThanoraAdapter, attach_record
from thanora.core.allocation import RankPlan
from thanora.core.hasi_config import ThanoraConfig
from thanora.core.initialize import ModuleInit
from thanora.core.regularizers import spr_penalty, task_pair_mask
from thanora.core.targets import Target, set_weight_matrix_, weight_matrix

logger = logging.getLogger(__name__)

# At step 0 the prepared model must be the pretrained one. With ``residual_mode: rewrite`` in low precision it may not
# be (SmolLM2, γ = 5: max |Δlogit| 0.66 of the logits' spread in bf16, NaN in fp16; 1e-4 in float32:
# benchmarks/results/low_precision.md), so `inject_` checks one calibration batch and warns above this.
INIT_TOLERANCE = 0.01


def first_batch(calibration: Mapping[str, Iterable[dict[str, Any]]]) -> dict[str, Any] | None:
    """The first batch of the first task, where the batches can be read again (a list or tuple), else None."""
    batches = next(iter(calibration.values()), None)
    return batches[0] if isinstance(batches, list | tuple) and batches else None


def _logits(model: nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    device = next(model.parameters()).device
    inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
              if k not in ("labels", "task_id")}
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return model(**inputs).logits.float()
    finally:
        model.train(was_training)


def inject_(
    model: nn.Module,
    targets: Mapping[str, Target],
    inits: Mapping[str, ModuleInit],
    plan: RankPlan,
    cfg: ThanoraConfig,
    probe: dict[str, Any] | None = None,
) -> PeftModel:
    """Wrap ``model`` with PEFT LoRA layers holding the HASI factors (and the residual base if configured).

    Args:
        model: the pretrained model (modified in place, as `get_peft_model` does).
        targets: the adapted modules.
        inits: the initial factors from `hasi_factors`.
        plan: the rank plan.
        cfg: rank, alpha, dropout, residual switch.
        probe: a calibration batch (`first_batch`); with a rewritten residual base, the prepared model's logits on
            it are compared with the pretrained model's: non-finite ones are an error, a difference above
            `INIT_TOLERANCE` of their spread a warning (both name ``residual_mode: branch``).

    Returns:
        The `PeftModel` (only the LoRA factors are trainable), with its `ThanoraAdapter` attached.

    Raises:
        ValueError: the rewritten base overflows its dtype (weights or, on ``probe``, activations).
    """
    rewrite = cfg.residual and cfg.residual_mode == "rewrite"
    reference = _logits(model, probe) if probe is not None and rewrite else None
    name_or_path = getattr(getattr(model, "config", None), "name_or_path", None) or None
    config = lora_config(model, targets, cfg.rank, cfg.alpha, cfg.lora_dropout,
                         fan_in_fan_out=any(t.fan_in_fan_out for t in targets.values()),
                         base_model_name_or_path=name_or_path)
    peft_model = get_peft_model(model, config)
    branch = cfg.residual and cfg.residual_mode == "branch"
    if branch:  # the residual as a frozen second adapter, without dropout: output W x − s·B₀A₀ x + s·B·A drop(x)
        peft_model.add_adapter(RESIDUAL_ADAPTER, lora_config(
            model, targets, cfg.rank, cfg.alpha, 0.0, fan_in_fan_out=any(t.fan_in_fan_out for t in targets.values()),
            base_model_name_or_path=name_or_path))
        peft_model.base_model.set_adapter([ADAPTER_NAME, RESIDUAL_ADAPTER])
    base = peft_model.base_model.model
    layers = {name: base.get_submodule(name) for name in inits}
    overflowed: list[str] = []
    with torch.no_grad():
        for name, init in inits.items():
            layer = layers[name]
            lora_A, lora_B = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            lora_A.copy_(init.lora_A.to(lora_A))
            lora_B.copy_(init.lora_B.to(lora_B))
            if branch:
                frozen_A, frozen_B = layer.lora_A[RESIDUAL_ADAPTER].weight, layer.lora_B[RESIDUAL_ADAPTER].weight
                frozen_A.copy_(init.lora_A.to(frozen_A))
                frozen_B.copy_(-init.lora_B.to(frozen_B))
                # frozen through every later set_adapter / enable_adapters (PEFT's own mechanism, as its variants)
                layer.frozen_peft_weight_names = {**layer.frozen_peft_weight_names,
                                                  RESIDUAL_ADAPTER: ("lora_A", "lora_B")}
                layer._freeze_non_trainable_peft_weights(RESIDUAL_ADAPTER)
            elif cfg.residual:
                W = weight_matrix(layer.base_layer)
                W = W.to(torch.promote_types(W.dtype, torch.float32))  # at least float32; float64 stays float64
                delta = cfg.scaling * (init.lora_B.to(W) @ init.lora_A.to(W))  # (d_out, d_in)
                set_weight_matrix_(layer.base_layer, W - delta)
                if not bool(torch.isfinite(weight_matrix(layer.base_layer)).all()):
                    overflowed.append(name)
    dtype = weight_matrix(next(iter(layers.values())).base_layer).dtype if layers else None
    fix = ("use residual_mode: branch (the residual stays in float32, exact init) or a float32 base, then prepare a "
           "freshly loaded model (this one was modified)")
    if overflowed:
        raise ValueError(f"residual_mode=rewrite: W_res = W - s*B0*A0 does not fit the base's {dtype} in "
                         f"{len(overflowed)} module(s) (e.g. {overflowed[0]}): the model would output NaN; {fix}")
    if reference is not None:
        error = _logits(peft_model, probe).sub_(reference).abs_().max()
        if not bool(torch.isfinite(error)):
            raise ValueError(f"residual_mode=rewrite: with W_res = W - s*B0*A0 in {dtype} the prepared model outputs "
                             f"NaN/Inf on a calibration batch (its activations overflow); {fix}")
        relative = float(error) / max(float(reference.std()), 1e-12)
        if relative > INIT_TOLERANCE:
            logger.warning("residual_mode=rewrite in %s: at step 0 the prepared model's logits differ from the "
                           "pretrained model's by up to %.3g of their spread (W_res is rounded to %s); "
                           "residual_mode: branch keeps the init exact", dtype, relative, dtype)
    adapter = ThanoraAdapter(
        config=cfg,
        plan=plan,
        targets=dict(targets),
        blocks={name: dict(init.blocks) for name, init in inits.items()},
        initial={n: (i.lora_A.clone(), i.lora_B.clone()) for n, i in inits.items()} if cfg.residual else {},
        base_model_name_or_path=name_or_path,
        spr_weights={name: _spr_weight(init, plan, cfg) for name, init in inits.items()},
        layers=layers,
    )
    attach_record(peft_model, adapter)
    if cfg.residual and not branch:  # the base holds W_res: it must never pass for the original model
        guard_residual_base_(peft_model)
    logger.info("injected ThanoRA (R=%d, %d modules, %d tasks, residual=%s)", cfg.rank, len(inits),
                len(plan.tasks), cfg.residual)
    return peft_model


def _spr_weight(init: ModuleInit, plan: RankPlan, cfg: ThanoraConfig) -> float:
    if cfg.spr_normalization == "none":
        return 1.0
    value = float(spr_penalty(init.lora_A.double(), init.lora_B.double(), task_pair_mask(init.blocks, plan.tasks)))
    return 1.0 / value if value > 0 else 1.0
