"""Adapter plumbing: putting factors into a model and getting them out again.

`record` (per-model state of a method, and ThanoRA's `ThanoraAdapter`), `peft_config` (the one `LoraConfig`
factory), `layers` (ThanoRA's PEFT LoRA layers with the residual base), `guard` (the save/unload policy of a residual
base), `export` (stock PEFT adapters on the original base), `merge` (merge / unmerge / merged folders), `multihead`
(the multi-head layers of HydraLoRA, R-LoRA+ and mtLoRA) and `native` (thanora's own format for routed methods).
Builds on `thanora.core`; knows no method by name.
"""
