"""Two CPU processes (gloo) under torchrun: sharded calibration equals one process, and DDP training equals one
process on the union of the shards' batches.

``accelerate launch --cpu --num_processes 2`` starts a single process (accelerate's CPU multi-process path is mpirun),
so the worker is started with ``torchrun --standalone`` (a free port, no clash with parallel runs); `Accelerator`
reads the torchrun environment and runs as MULTI_CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _dist_worker import N_FEATURES, THANORA_CONFIG, TRAIN_CONFIG, calibration
from test_train import collate_features, learnable_llama, synthetic_features
from thanora.methods.base import MethodContext
from thanora.methods.registry import METHODS
from thanora.training.checkpoints import CHECKPOINTS
from thanora.training.train import make_loader_factory, train

WORKER = Path(__file__).with_name("_dist_worker.py")


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], Path]:
    out_dir = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
               str(out_dir)]
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180, check=False)
    assert proc.returncode == 0, f"workers failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads((out_dir / "result.json").read_text(encoding="utf-8")), out_dir


def test_sharded_calibration_equals_one_process(launched: tuple[list[dict], Path]) -> None:
    reports, _ = launched
    assert len(reports) == 2
    for report in reports:
        assert report["world"] == 2 and report["distributed_type"].endswith("MULTI_CPU")
        assert report["tasks_equal"] and report["ranks_equal"]
        assert report["max_entropy_diff"] <= 1e-6
        assert report["max_rel_factor_diff"] <= 1e-5


def test_ddp_training_equals_one_process_on_the_same_batches(launched: tuple[list[dict], Path],
                                                            tmp_path: Path) -> None:
    reports, out_dir = launched
    assert all(r["replica_spread"] == 0.0 for r in reports)  # the replicas stayed identical
    assert reports[0]["history"] == reports[1]["history"]
    # One process, micro-batch 2x as large: the same examples per step (DistributedSampler deals one permutation).
    features = synthetic_features(N_FEATURES)
    method = METHODS["thanora"]
    model = method.prepare(learnable_llama(), THANORA_CONFIG,
                           MethodContext(calibration=calibration(features), progress=False))
    factory = make_loader_factory(features, 2 * TRAIN_CONFIG.batch_size, collate_features, seed=0)
    single = train(model, method, THANORA_CONFIG, factory, TRAIN_CONFIG, out_dir=tmp_path, progress=False)
    assert len(single.history) == len(reports[0]["history"]) == TRAIN_CONFIG.max_steps
    for ours, theirs in zip(reports[0]["history"], single.history, strict=True):
        for key in ("loss", "reg", "grad_norm", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5, abs=1e-7), key
    ddp = load_file(str(out_dir / CHECKPOINTS / "step-2" / "adapter.safetensors"))
    assert len(load_file(str(tmp_path / CHECKPOINTS / "step-2" / "adapter.safetensors"))) == len(ddp)
    weights = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    assert ddp.keys() == weights.keys()  # process-count independent names (no "module." prefix)
    for name, value in weights.items():  # Adam divides by |g|: round-off on near-zero gradients shows at ~1e-3 lr
        torch.testing.assert_close(ddp[name], value, rtol=1e-5, atol=1e-3 * TRAIN_CONFIG.lr)
    rng = torch.load(out_dir / CHECKPOINTS / "step-2" / "rng.pt", weights_only=True)
    assert len(rng) == 2 and not torch.equal(rng[0]["torch"], rng[1]["torch"])  # one RNG state per process


def test_ddp_trains_dare_when_a_process_lacks_a_task(launched: tuple[list[dict], Path]) -> None:
    reports, _ = launched
    assert all(r["dare_spread"] == 0.0 for r in reports)  # gradients were all-reduced: the replicas agree
    assert len(reports[0]["dare_history"]) == TRAIN_CONFIG.max_steps
    assert reports[0]["dare_history"] == reports[1]["dare_history"]  # the logged loss is the mean over processes


def test_thanora_run_under_torchrun_matches_one_process(tmp_path: Path) -> None:
    """`thanora run` with 2 processes: one complete run directory, the same rank plan as a single process."""
    import yaml

    from conftest import ANIMALS, COLORS, choice_task_file, tiny_model_dir

    model_dir = tiny_model_dir(tmp_path)
    tasks = [
        {"name": "colors", "source": f"jsonl:{choice_task_file(tmp_path, 'colors', 'color', COLORS, 1)}"},
        {"name": "animals", "source": f"jsonl:{choice_task_file(tmp_path, 'animals', 'animal', ANIMALS, 2)}"},
    ]
    config = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [{**t, "n_train": 16, "n_eval": 8, "n_calibration": 8} for t in tasks],
        "data": {"max_length": 32, "calibration_batch_size": 4},
        "methods": [{"name": "thanora", "rank": 4, "stats_dtype": "float64"}],
        "train": {"epochs": 1, "batch_size": 4, "grad_accum": 1, "lr": 5.0e-3},
        "output": {"plots": False},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cli = ["-m", "thanora.cli", "run", str(path), "-q", "--no-progress", "--output-dir"]
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {
        "one": [sys.executable, *cli, str(tmp_path / "one")],
        "two": [sys.executable, *launcher, *cli, str(tmp_path / "two")],
    }
    for name, command in runs.items():
        proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, check=False)
        assert proc.returncode == 0, f"{name} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    one, two = tmp_path / "one", tmp_path / "two"
    assert json.loads((two / "run.json").read_text())["status"] == "complete"
    assert json.loads((two / "thanora" / "rank_plan.json").read_text()) == \
        json.loads((one / "thanora" / "rank_plan.json").read_text())
    assert (two / "thanora" / "adapter" / "adapter_config.json").is_file()
