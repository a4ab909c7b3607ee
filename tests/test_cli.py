"""End-to-end tests of the `thanora` CLI on a tiny model saved to disk and tiny synthetic JSONL tasks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import ANIMALS, COLORS, choice_task_file, tiny_model_dir
from thanora.cli import main


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("cli")
    model_dir = tiny_model_dir(root)
    colors = choice_task_file(root, "colors", "color", COLORS, 1)
    animals = choice_task_file(root, "animals", "animal", ANIMALS, 2)
    config = {
        "model": {"name_or_path": str(model_dir)},
        "tasks": [
            {"name": "colors", "source": f"jsonl:{colors}", "n_train": 24, "n_eval": 12, "n_calibration": 8},
            {"name": "animals", "source": f"jsonl:{animals}", "n_train": 24, "n_eval": 12, "n_calibration": 8},
        ],
        "data": {"max_length": 32, "calibration_batch_size": 4},
        "methods": [{"name": "lora", "rank": 4}, {"name": "thanora", "rank": 4, "spr_lambda": 1.0e-4}],
        "train": {"epochs": 2, "batch_size": 8, "grad_accum": 1, "lr": 5.0e-3, "save_every": 3},
        "eval": {"batch_size": 16},
        "output": {"merged": True},
    }
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return root, path


@pytest.fixture(scope="module")
def run_dir(setup: tuple[Path, Path]) -> Path:
    root, config = setup
    out = root / "run"
    assert main(["run", str(config), "--output-dir", str(out), "--no-progress", "-q"]) == 0
    return out


def test_run_writes_the_full_run_directory(run_dir: Path) -> None:
    out = run_dir
    for name in ("config.yaml", "data.json", "metrics.json", "report.md", "run.json",
                 "thanora/rank_plan.json", "thanora/overlap.json", "thanora/history.json",
                 "thanora/adapter/adapter_config.json", "thanora/adapter/thanora_adapter.json",
                 "lora/adapter/adapter_config.json", "thanora/merged/config.json",
                 "plots/accuracy.png", "plots/training_curves.png", "plots/thanora_rank_allocation.png",
                 "plots/thanora_entropy.png", "plots/thanora_overlap.png"):
        assert (out / name).is_file(), name
    run = json.loads((out / "run.json").read_text())
    assert run["status"] == "complete" and run["seed"] == 0 and "torch" in run["versions"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"base", "lora", "thanora"}
    for method in metrics.values():
        assert set(method) == {"colors", "animals", "average"}
        assert 0.0 <= method["average"] <= 1.0
    assert "| thanora |" in (out / "report.md").read_text()


def test_export_rebuilds_the_run_adapter_from_its_checkpoint(run_dir: Path) -> None:
    from safetensors.torch import load_file

    saved = load_file(str(run_dir / "thanora" / "adapter" / "adapter_model.safetensors"))
    assert main(["export", str(run_dir), "--method", "thanora", "-q"]) == 0
    rebuilt = load_file(str(run_dir / "thanora" / "adapter" / "adapter_model.safetensors"))
    assert saved.keys() == rebuilt.keys()
    for key in saved:
        assert (saved[key] - rebuilt[key]).abs().max() < 1e-6, key
    assert main(["export", str(run_dir), "--method", "dora", "-q"]) == 2


def test_train_subcommand_trains_without_evaluating(setup: tuple[Path, Path]) -> None:
    root, config = setup
    out = root / "train-only"
    assert main(["train", str(config), "--output-dir", str(out), "--no-progress", "-q", "--output.merged=false"]) == 0
    assert (out / "thanora" / "adapter" / "adapter_config.json").is_file()
    assert (out / "thanora" / "checkpoints" / "latest").is_file()
    assert not (out / "thanora" / "metrics.json").exists()
    assert json.loads((out / "run.json").read_text())["status"] == "complete"


def test_occupied_output_dir_is_refused(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, config = setup
    out = root / "occupied"
    out.mkdir()
    (out / "something.txt").write_text("x")
    assert main(["run", str(config), "--output-dir", str(out), "-q"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert not (out / "run.json").exists()


def test_sharded_launch_is_refused_before_any_work(setup: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Under FSDP (accelerate enables it on GPUs only, so faked here) `thanora run` exits 2 before the run folder."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    import thanora.experiment.pipeline

    root, config = setup
    monkeypatch.setattr(thanora.experiment.pipeline, "make_accelerator",
                        lambda *a, **k: SimpleNamespace(distributed_type=DistributedType.FSDP))
    assert main(["run", str(config), "--output-dir", str(root / "fsdp"), "-q"]) == 2
    assert "DDP" in capsys.readouterr().err
    assert not (root / "fsdp").exists()


def test_bad_key_and_unknown_method_exit_2(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    root, config = setup
    assert main(["run", str(config), "--output-dir", str(root / "x"), "--train.lrr=1", "-q"]) == 2
    assert "train.lrr" in capsys.readouterr().err
    assert main(["run", str(config), "--output-dir", str(root / "y"), "--methods.0.name=lorra", "-q"]) == 2
    assert "lorra" in capsys.readouterr().err


def test_methods_lists_every_method(capsys: pytest.CaptureFixture[str]) -> None:
    from thanora.methods.registry import METHODS

    assert main(["methods", "--model", "none"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert {line.split()[0] for line in lines[1:] if line} == set(METHODS)
    assert "params" not in lines[0]


def test_methods_counts_parameters_of_a_model_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Counts come from the config alone (meta device) and equal LoRA's real trainable count at that rank."""
    from conftest import tiny_llama
    from thanora.methods.base import MethodContext
    from thanora.methods.lora import LORA, LoraSettings

    tiny_llama().save_pretrained(tmp_path / "m")
    assert main(["methods", "--model", str(tmp_path / "m"), "--rank", "4"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("lora "))
    model = LORA.prepare(tiny_llama(), LoraSettings(rank=4), MethodContext())
    real = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert f"{real:,}" in row.split()


def test_resume_continues_an_interrupted_run(run_dir: Path, tmp_path: Path) -> None:
    """A run that stopped after training thanora but before recording it: --resume keeps base and lora, resumes
    thanora from its last checkpoint (no new step), and reproduces the same metrics."""
    import shutil

    copy = tmp_path / "interrupted"
    shutil.copytree(run_dir, copy)
    metrics = json.loads((copy / "metrics.json").read_text())
    expected = metrics.pop("thanora")
    (copy / "metrics.json").write_text(json.dumps(metrics))
    run = json.loads((copy / "run.json").read_text())
    (copy / "run.json").write_text(json.dumps({**run, "status": "running"}))
    history = json.loads((copy / "thanora" / "history.json").read_text())
    assert main(["run", str(copy / "config.yaml"), "--output-dir", str(copy), "--resume", "--no-progress", "-q"]) == 0
    resumed = json.loads((copy / "metrics.json").read_text())
    assert resumed["base"] == metrics["base"] and resumed["lora"] == metrics["lora"]
    for task in ("colors", "animals"):
        assert resumed["thanora"][task]["score"] == pytest.approx(expected[task]["score"])
    assert json.loads((copy / "thanora" / "history.json").read_text()) == history
    record = json.loads((copy / "run.json").read_text())
    assert record["status"] == "complete"
    assert record["timings_s"]["lora"] == run["timings_s"]["lora"]  # the earlier stages' times are kept


def test_missing_model_folder_exit_2_before_touching_the_output(setup: tuple[Path, Path],
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    root, config = setup
    out = root / "no-model"
    assert main(["run", str(config), "--output-dir", str(out), "--model.name_or_path=/nonexistent/model", "-q"]) == 2
    assert "model.name_or_path" in capsys.readouterr().err
    assert not out.exists()


def test_per_method_training_settings_and_single_task_methods(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """Each method at its own rate and length, and a single-task method trained and scored on its task only."""
    _root, config = setup
    out = tmp_path / "per-method"
    methods = ("--methods=[{name: lora, rank: 4, train: {lr: 1.0e-3, max_steps: 2}}, "
               "{name: lora, label: lora_colors, rank: 4, tasks: [colors], train: {max_steps: 3}}]")
    assert main(["run", str(config), "--output-dir", str(out), "--no-progress", "-q", methods,
                 "--output.merged=false", "--output.plots=false"]) == 0
    lora = json.loads((out / "lora" / "train.json").read_text())
    single = json.loads((out / "lora_colors" / "train.json").read_text())
    assert lora["train"]["lr"] == 1.0e-3 and lora["train"]["max_steps"] == 2 and lora["tasks"] == ["colors", "animals"]
    assert single["train"]["lr"] == 5.0e-3 and single["tasks"] == ["colors"]
    assert json.loads((out / "lora" / "history.json").read_text())[-1]["step"] == 2
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["lora_colors"]) == {"colors", "average"}
    assert metrics["lora_colors"]["average"] == metrics["lora_colors"]["colors"]["score"]
    report = (out / "report.md").read_text()
    assert "## Training per method" in report and "| lora_colors | 0.005 |" in report
