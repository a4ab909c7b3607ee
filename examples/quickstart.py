"""The README's Python API, runnable in seconds on a tiny randomly initialised Llama (no download).

    python examples/quickstart.py
"""

import tempfile

import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM

import thanora


def tiny_llama() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def batches(seed: int, n: int = 4) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(1, 256, (4, 16), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids})
    return out


model = tiny_llama()
probe = batches(99, 1)[0]
with torch.no_grad():
    base_logits = model(input_ids=probe["input_ids"]).logits

config = thanora.ThanoraConfig(rank=16, spr_lambda=1e-4)
calibration = {"task_a": batches(1), "task_b": batches(2)}
model = thanora.prepare_model(model, calibration, config, progress=False)
print(thanora.adapter_of(model).plan.summary())
with torch.no_grad():
    init_gap = (model(input_ids=probe["input_ids"]).logits - base_logits).abs().max().item()
print(f"max |logits(init) - logits(base)| = {init_gap:.2e}")

optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
model.train()
for step, batch in enumerate(batches(3, 8)):
    task_loss = model(**batch).loss
    spr = thanora.spr_loss(model)
    (task_loss + config.spr_lambda * spr).backward()
    optimizer.step()
    optimizer.zero_grad()
    print(f"step {step}: loss {task_loss.item():.3f}  lambda*SPR {config.spr_lambda * spr.item():.3e}")
model.eval()

with torch.no_grad():
    ours = model(input_ids=probe["input_ids"]).logits
with tempfile.TemporaryDirectory() as folder:
    thanora.export_adapter(model, folder)
    stock = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    with torch.no_grad():
        theirs = stock(input_ids=probe["input_ids"]).logits
print(f"stock PEFT reload on the original base: max |Δlogits| = {(ours - theirs).abs().max().item():.2e}")

thanora.merge_(model)
with torch.no_grad():
    merged = model(input_ids=probe["input_ids"]).logits
print(f"merged vs unmerged: max |Δlogits| = {(merged - ours).abs().max().item():.2e}")
