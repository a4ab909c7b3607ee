"""Probe: can FSDP2 (``torch.distributed.fsdp.fully_shard``) shard a PEFT model's frozen base for training here, and
can the trained model then be evaluated, merged and saved like an unsharded one? (Why `check_sharding` refuses it.)

    torchrun --standalone --nproc_per_node 2 docs/probes/fsdp2_frozen_base.py      # CPU, gloo, about 20 s

The design probed: every decoder layer and the root ``fully_shard``-ed with the LoRA parameters in
``ignored_params`` (so they stay whole, replicated, the same objects the optimiser, SPR, checkpoints and export
hold), their gradients averaged by hand after backward; after training every FSDP module ``unshard()``-ed with
``reshard_after_forward`` off. Measured (torch 2.13, peft 0.21, 2026-12-02):

- training works: the adapter parameters stay plain ``Parameter``s (the same objects), the base weights become
  ``DTensor`` shards, two AdamW steps run, the unsharded weights equal the original ones;
- after ``unshard()`` a forward on one process alone works, but ``state_dict()`` still returns ``DTensor`` entries
  (and, called before that forward, leaves the model sharded again: the one-process forward then waits for the
  other process's all-gather forever), and PEFT's ``merge_and_unload()`` fails (``aten.add_.Tensor got mixed
  torch.Tensor and DTensor``): the model is not an ordinary model again, and FSDP2 has no public way to undo
  ``fully_shard``. Evaluation, merge, export of a merged model and ``save_pretrained`` would each need a sharded
  form (or a full state dict gathered into a fresh unsharded model, which needs the whole base on one device: the
  memory sharding was to save).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from peft import LoraConfig, get_peft_model
from torch.distributed.fsdp import FSDPModule, fully_shard

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from conftest import random_batch, tiny_llama


def main() -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                    init_lora_weights=False))
    up = "base_model.model.model.layers.0.mlp.up_proj.weight"
    original = model.state_dict()[up].clone()
    trainable = [p for p in model.parameters() if p.requires_grad]
    ids = [id(p) for p in trainable]
    for layer in model.get_base_model().model.layers:
        fully_shard(layer, ignored_params=set(trainable))
    fully_shard(model, ignored_params=set(trainable))
    frozen = model.get_base_model().model.layers[0].mlp.up_proj.weight
    print(f"[{rank}] adapter params the same objects: {ids == [id(p) for p in trainable]}; base weight: "
          f"{type(frozen).__name__}", flush=True)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    batch = random_batch(rank, batch=2)
    for _ in range(2):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        for p in trainable:
            grad = p.grad if p.grad is not None else torch.zeros_like(p)
            dist.all_reduce(grad)
            p.grad = grad / world
        optimizer.step()
        optimizer.zero_grad()
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_reshard_after_forward(False)
            module.unshard()
    weight = model.get_base_model().model.layers[0].mlp.up_proj.weight
    print(f"[{rank}] after unshard: {type(weight).__name__} {tuple(weight.shape)}, equal to the original: "
          f"{torch.equal(weight.detach(), original)}", flush=True)
    if rank == 0:
        with torch.no_grad():
            model(**batch)
        print("[0] forward on one process: ok", flush=True)
    dist.barrier()
    print(f"[{rank}] state_dict entry types: {sorted({type(v).__name__ for v in model.state_dict().values()})}",
          flush=True)
    if rank == 0:
        try:
            model.merge_and_unload().save_pretrained(tempfile.mkdtemp())
            print("[0] merge_and_unload + save_pretrained: ok", flush=True)
        except RuntimeError as err:
            print(f"[0] merge_and_unload fails: {str(err).splitlines()[0]}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
