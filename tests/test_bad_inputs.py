"""A catalogue of bad inputs, each tried as a new user would through the CLI: every one exits 2 with one line naming
the field or file (and no traceback), and no file outside the run folder changes (the whole sandbox is compared
byte for byte before and after; for the cases that may touch a run folder, everything but that folder).

Families: config syntax / keys / types / ranges, names, overrides, data files, model paths, run folders, resume with
a changed config, corrupted checkpoints, CLI usage and the stand-alone subcommands. Settings without effect are
warnings said once; interrupts (SIGINT, SIGTERM) exit 130 and resume (at the end).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import ANIMALS, COLORS, choice_task_file, tiny_model_dir
from thanora.cli import main


@dataclass
class Sandbox:
    """A folder with a tiny model, two task files and helpers to write configs and files into it."""

    root: Path
    base: dict[str, Any] = field(default_factory=dict)

    def config(self, edit: Callable[[dict[str, Any]], Any] | None = None, name: str = "c.yaml") -> str:
        data = copy.deepcopy(self.base)
        if edit is not None:
            edit(data)
        path = self.root / name
        path.write_text(yaml.safe_dump(data))
        return str(path)

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        return path

    @property
    def out(self) -> str:
        return str(self.root / "run")


def _base(root: Path) -> dict[str, Any]:
    colors = choice_task_file(root, "colors", "color", COLORS, 1)
    animals = choice_task_file(root, "animals", "animal", ANIMALS, 2)
    return {
        "model": {"name_or_path": str(tiny_model_dir(root))},
        "tasks": [{"name": "colors", "source": f"jsonl:{colors}", "n_train": 24, "n_eval": 12, "n_calibration": 4},
                  {"name": "animals", "source": f"jsonl:{animals}", "n_train": 24, "n_eval": 12, "n_calibration": 4}],
        "data": {"max_length": 32, "calibration_batch_size": 4},
        "methods": [{"name": "lora", "rank": 4}, {"name": "thanora", "rank": 4}],
        "train": {"epochs": 1, "batch_size": 8, "grad_accum": 1, "lr": 5.0e-3},
        "eval": {"batch_size": 16},
        "output": {"plots": False},
    }


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sandbox whose ``run`` folder holds a complete run (copied for the cases that need one)."""
    root = tmp_path_factory.mktemp("finished")
    box = Sandbox(root, _base(root))
    assert main(["run", box.config(), "--output-dir", box.out, "--no-progress", "-q"]) == 0
    return root


@pytest.fixture
def box(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a Hub id is looked up in the cache only: no network in tests
    return Sandbox(tmp_path, _base(tmp_path))


def _with_finished(box: Sandbox, finished: Path) -> None:
    shutil.copytree(finished / "run", box.root / "run")
    for name in ("colors.jsonl", "animals.jsonl"):  # the finished run's config names these files
        shutil.copy(finished / name, box.root / name)
    box.base["tasks"][0]["source"] = f"jsonl:{finished / 'colors.jsonl'}"
    box.base["tasks"][1]["source"] = f"jsonl:{finished / 'animals.jsonl'}"
    box.base["model"]["name_or_path"] = str(finished / "tiny-model")


def _snapshot(root: Path, skip: Path | None = None) -> dict[str, str]:
    out = {}
    for path in sorted(root.rglob("*")):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        rel = str(path.relative_to(root))
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
    return out


def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node: Any = data
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node.setdefault(key, {})
    last = keys[-1]
    if isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def setting(dotted: str, value: Any) -> Callable[[Sandbox], list[str]]:
    """A case: `thanora run` with one config value changed."""
    return lambda box: ["run", box.config(lambda d: _set(d, dotted, value)), "--output-dir", box.out]


def source_file(name: str, content: str | bytes, **task: Any) -> Callable[[Sandbox], list[str]]:
    """A case: the first task reads the given file."""
    def setup(box: Sandbox) -> list[str]:
        path = box.file(name, content)
        return ["run", box.config(lambda d: d["tasks"][0].update(source=f"jsonl:{path}" if name.endswith(
            ".jsonl") else f"csv:{path}", **task)), "--output-dir", box.out]
    return setup


def edited(edit: Callable[[dict[str, Any]], Any]) -> Callable[[Sandbox], list[str]]:
    return lambda box: ["run", box.config(edit), "--output-dir", box.out]


def args(*argv: str) -> Callable[[Sandbox], list[str]]:
    return lambda box: [a.replace("{c}", box.config()).replace("{out}", box.out).replace("{root}", str(box.root))
                        for a in argv]


ROWS = "\n".join(json.dumps({"prompt": f"Question: color of w{i}", "choices": COLORS, "answer": i % 4})
                 for i in range(40))

CASES: dict[str, tuple[Callable[[Sandbox], list[str]], str]] = {
    # --- the config file itself
    "config_missing": (args("run", "{root}/nope.yaml", "--output-dir", "{out}"), "nope.yaml does not exist"),
    "config_is_a_folder": (args("run", "{root}", "--output-dir", "{out}"), "is not a file"),
    "config_bad_yaml": (lambda b: ["run", str(b.file("bad.yaml", "tasks: [\n  {name: a")), "--output-dir", b.out],
                        "is not valid YAML: line"),
    "config_is_a_list": (lambda b: ["run", str(b.file("l.yaml", "- a\n- b\n")), "--output-dir", b.out],
                         "must be a mapping"),
    "config_not_utf8": (lambda b: ["run", str(b.file("bin.yaml", b"\xff\xfe\x00bad")), "--output-dir", b.out],
                        "not a UTF-8 text file"),
    # --- keys
    "unknown_section": (edited(lambda d: d.update(trian={})), "unknown section(s) ['trian']"),
    "unknown_train_key": (setting("train.lrr", 1), "train.lrr"),
    "unknown_task_key": (setting("tasks.0.n_trian", 3), "tasks[0].n_trian"),
    "unknown_method_key": (setting("methods.1.rnk", 4), "methods[thanora].rnk"),
    "unknown_method": (setting("methods.0.name", "lorra"), "lorra"),
    "method_without_name": (edited(lambda d: d["methods"].append({"rank": 4})), "missing `name`"),
    "methods_not_a_list": (setting("methods", "lora"), "methods: must be a list"),
    "no_method": (setting("methods", []), "at least one method"),
    "no_task": (setting("tasks", []), "at least one task"),
    # --- types
    "lr_not_a_number": (setting("train.lr", "fast"), "train.lr: expected a number, got 'fast'"),
    "n_train_not_an_int": (setting("tasks.0.n_train", "abc"), "tasks[0].n_train: expected an integer"),
    "n_train_a_float": (setting("tasks.0.n_train", 4.5), "tasks[0].n_train: expected an integer, got 4.5"),
    "rank_a_float": (setting("methods.1.rank", 4.5), "methods[thanora].rank: expected an integer"),
    "bool_as_string": (setting("output.merged", "yes"), "output.merged: expected true or false"),
    "dtype_unknown": (setting("model.dtype", "float8"), "model.dtype: must be one of"),
    "mixed_precision_unknown": (setting("train.mixed_precision", "half"), "train.mixed_precision: must be one of"),
    "sampling_unknown": (setting("data.sampling", "random"), "data.sampling: must be one of"),
    "lr_infinite": (setting("train.lr", float("inf")), "train.lr: expected a finite number"),
    # --- ranges and cross-field rules
    "lr_negative": (setting("train.lr", -1.0), "TrainConfig.lr must be > 0"),
    "batch_size_zero": (setting("train.batch_size", 0), "TrainConfig.batch_size must be an integer >= 1"),
    "tau_negative": (setting("methods.1.tau", -1.0), "ThanoraConfig.tau"),
    "device_malformed": (setting("model.device", "gpu"), "device must be auto, cpu"),
    "device_unavailable": (setting("model.device", "cuda"), "model.device=cuda: no CUDA device"),
    "rank_budget_vs_tasks": (edited(lambda d: d["methods"][1].update(rank=8, r_min=4)),
                             "methods[thanora]: rank=8 cannot give each of the 2 tasks r_min=4"),
    "rank_above_module_width": (setting("methods.0.rank", 100), "methods[lora]: LoraSettings.rank=100 exceeds"),
    "unknown_target_module": (setting("methods.0.target_modules", ["nope_proj"]), "'nope_proj' matches no linear"),
    "dare_weights_length": (edited(lambda d: d["methods"].append({"name": "dare", "rank": 4, "weights": [1, 1, 1]})),
                            "weights has 3 values for 2 tasks"),
    "dare_with_checkpointing": (edited(lambda d: (d["methods"].append({"name": "dare", "rank": 4}),
                                                  d["train"].update(gradient_checkpointing=True))),
                                "train.gradient_checkpointing: dare"),
    "calibration_above_train": (setting("tasks.0.n_calibration", 30), "n_calibration (30) cannot exceed n_train"),
    "too_few_examples": (setting("tasks.0.n_train", 39), "lower n_train / n_eval"),
    # --- names
    "duplicate_task": (setting("tasks.1.name", "colors"), "task names must be unique"),
    "duplicate_label": (setting("methods.1.name", "lora"), "labels must be unique"),
    "label_base": (setting("methods.0.label", "base"), "methods[base].label: 'base' is reserved"),
    "label_average": (setting("methods.0.label", "average"), "'average' is reserved"),
    "label_plots_folder": (setting("methods.0.label", "plots"), "'plots' is reserved"),
    "task_average": (setting("tasks.0.name", "average"), "tasks[average].name: 'average' is reserved"),
    "label_not_identifier": (setting("methods.0.label", "my lora"), "must be an identifier"),
    "task_not_identifier": (setting("tasks.0.name", "my task"), "must be an identifier"),
    # --- overrides on the command line
    "override_without_value": (args("run", "{c}", "--output-dir", "{out}", "--train.lr"), "unrecognised arguments"),
    "override_bad_yaml": (args("run", "{c}", "--output-dir", "{out}", "--train.lr=[1"), "is not valid YAML"),
    "override_into_a_value": (args("run", "{c}", "--output-dir", "{out}", "--train.lr.x=1"), "is a value, not a"),
    "override_missing_item": (args("run", "{c}", "--output-dir", "{out}", "--methods.dora.rank=4"),
                              "no list item 'dora'"),
    "override_type": (args("run", "{c}", "--output-dir", "{out}", "--tasks.0.n_train=lots"),
                      "tasks[0].n_train: expected an integer"),
    # --- data files
    "data_file_missing": (setting("tasks.0.source", "jsonl:/nowhere/x.jsonl"), "file not found: /nowhere/x.jsonl"),
    "data_file_is_folder": (lambda b: ["run", b.config(lambda d: d["tasks"][0].update(source=f"jsonl:{b.root}")),
                                       "--output-dir", b.out], "is a folder"),
    "data_bad_json_line": (source_file("t.jsonl", ROWS.replace('"answer": 2}', '"answer": 2', 1)),
                           "t.jsonl: line 3 is not valid JSON"),
    "data_line_is_a_list": (source_file("t.jsonl", ROWS + "\n[1, 2]"), "line 41 is a JSON list"),
    "data_not_utf8": (source_file("t.jsonl", ROWS.encode() + b"\n\xff\xfe"), "line 41 is not UTF-8"),
    "data_missing_prompt": (source_file("t.jsonl", ROWS + '\n{"choices": ["a", "b"], "answer": 0}'),
                            "line 41: missing required field 'prompt'"),
    "data_answer_not_a_choice": (source_file("t.jsonl", ROWS + '\n{"prompt": "q", "choices": ["a"], "answer": "b"}'),
                                 "line 41: field 'answer' 'b'"),
    "data_repeated_choices": (source_file("t.jsonl", ROWS + '\n{"prompt": "q", "choices": ["a", "a"], "answer": 0}'),
                              "field 'choices' repeats ['a']"),
    "data_csv_wider_than_header": (source_file("t.csv", "prompt,answer\nq,a,extra\n"), "t.csv: line 2 has more"),
    "data_csv_empty": (source_file("t.csv", ""), "no header row"),
    "data_empty_jsonl": (source_file("t.jsonl", "\n\n"), "has no examples"),
    "data_split_on_a_file": (edited(lambda d: d["tasks"][0].update(eval_source_split="test")),
                             "tasks[colors].eval_source_split: jsonl: files have no splits"),
    "data_eval_on_training_split": (edited(lambda d: d["tasks"][0].update(source="csqa",
                                                                          eval_source_split="validation")),
                                    "is the split it trains on"),
    "data_eval_source_is_train_copy": (lambda b: ["run", b.config(lambda d: d["tasks"][0].update(
        eval_source=f"jsonl:{shutil.copy(b.root / 'colors.jsonl', b.root / 'dev.jsonl')}")), "--output-dir", b.out],
        "the evaluation data is the training data"),
    "data_unknown_source": (setting("tasks.0.source", "mmlu"), "unknown source 'mmlu'"),
    "data_packaged_split_unknown": (edited(lambda d: d["tasks"][0].update(source="csqa", source_split="train")),
                                    "has splits ['validation'], not 'train'"),
    # --- the model
    "model_folder_missing": (setting("model.name_or_path", "/nonexistent/model"), "model.name_or_path"),
    "model_folder_without_config": (lambda b: ["run", b.config(lambda d: d["model"].update(
        name_or_path=str(b.file("empty-model/readme.txt", "x").parent))), "--output-dir", b.out],
        "folder without config.json"),
    "model_hub_id_offline": (setting("model.name_or_path", "nobody/no-such-model"),
                             "not in the local Hugging Face cache"),
    # --- output folders and flags
    "output_dir_with_user_files": (lambda b: (b.file("run/mine.txt", "x"), ["run", b.config(), "--output-dir",
                                                                          b.out])[1], "not a thanora run"),
    "overwrite_of_user_files": (lambda b: (b.file("run/mine.txt", "x"), ["run", b.config(), "--output-dir", b.out,
                                                                       "--overwrite"])[1], "not a thanora run"),
    "output_dir_is_a_file": (lambda b: (b.file("run", "x"), ["run", b.config(), "--output-dir", b.out])[1],
                             "is a file, not a folder"),
    "overwrite_and_resume": (args("run", "{c}", "--output-dir", "{out}", "--overwrite", "--resume"),
                             "--overwrite and --resume exclude each other"),
    "resume_nothing": (args("run", "{c}", "--output-dir", "{out}", "--resume"), "holds no thanora run to resume"),
    # --- CLI usage
    "run_without_config": (args("run", "--output-dir", "{out}"), "the following arguments are required: config"),
    "unknown_subcommand": (args("frobnicate"), "invalid choice: 'frobnicate'"),
    "run_without_output_dir": (args("run", "{c}"), "--output-dir"),
    "plot_a_user_folder": (lambda b: (b.file("mine/report.md", "my notes"), ["plot", str(b.root / "mine")])[1],
                           "is not a thanora run folder"),
    "export_a_user_folder": (args("export", "{root}", "--method", "lora"), "is not a thanora run folder"),
    "collect_into_user_folder": (lambda b: (b.file("mine/x.txt", "x"), ["collect", b.config(), "--output-dir",
                                                                      str(b.root / "mine")])[1], "not a thanora run"),
    "eval_output_over_user_file": (lambda b: (b.file("notes.json", "{}"), ["eval", b.config(), "--output",
                                                                         str(b.root / "notes.json")])[1],
                                   "is not a metrics file written by thanora eval"),
    "eval_adapter_not_an_adapter": (args("eval", "{c}", "--adapter", "{root}"), "is not an adapter folder"),
    "merge_into_user_folder": (lambda b: (b.file("models/keep.bin", "x"), ["merge", b.config(), "--adapter",
                                                                         str(b.root), "--output-dir",
                                                                         str(b.root / "models")])[1],
                               "files thanora did not write"),
    "merge_adapter_not_an_adapter": (args("merge", "{c}", "--adapter", "{root}", "--output-dir", "{root}/m"),
                                     "is not an adapter folder"),
}

# Cases that start from a finished run in the sandbox's ``run`` folder: (argv, expected, run folder may change).
RUN_CASES: dict[str, tuple[Callable[[Sandbox], list[str]], str, bool]] = {
    "rerun_without_flag": (args("run", "{c}", "--output-dir", "{out}"), "pass --resume to continue it or "
                           "--overwrite", False),
    "resume_changed_config": (args("run", "{c}", "--output-dir", "{out}", "--resume", "--train.lr=1e-3"),
                              "config differs from the one", False),
    "overwrite_with_typo_in_data_path": (args("run", "{c}", "--output-dir", "{out}", "--overwrite",
                                              "--tasks.0.source=jsonl:/typo/colors.jsonl"), "file not found", False),
    "overwrite_with_bad_rank": (args("run", "{c}", "--output-dir", "{out}", "--overwrite", "--methods.0.rank=100"),
                                "exceeds min(d_in, d_out)", False),
    "overwrite_deleting_an_input": (lambda b: ["run", b.config(lambda d: d["tasks"][0].update(
        source=f"jsonl:{shutil.copy(b.root / 'colors.jsonl', b.root / 'run' / 'lora' / 'colors.jsonl')}")),
        "--output-dir", b.out, "--overwrite"], "which --overwrite would delete", False),
    "merge_over_own_merged_without_flag": (lambda b: _merge_twice(b), "pass --overwrite to replace it", False),
    "export_unknown_method": (args("export", "{out}", "--method", "nope"), "--method 'nope' is not in", False),
    "resume_corrupt_checkpoint": (lambda b: _unfinish(b, corrupt="adapter.safetensors"), "is corrupt", True),
    "resume_missing_checkpoint": (lambda b: _unfinish(b, corrupt="folder"), "does not exist", True),
}


def _merge_twice(box: Sandbox) -> list[str]:
    argv = ["merge", box.config(), "--adapter", str(box.root / "run" / "lora" / "adapter"), "--output-dir",
            str(box.root / "merged"), "-q"]
    assert main(argv) == 0
    return argv


def _unfinish(box: Sandbox, corrupt: str) -> list[str]:
    """The finished run as if interrupted while training thanora, with its checkpoint damaged."""
    run = box.root / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    del metrics["thanora"]
    (run / "metrics.json").write_text(json.dumps(metrics))
    checkpoints = run / "thanora" / "checkpoints"
    step = checkpoints / (checkpoints / "latest").read_text().strip()
    if corrupt == "folder":
        shutil.rmtree(step)
    else:
        (step / corrupt).write_bytes(b"garbage")
    return ["run", str(run / "config.yaml"), "--output-dir", str(run), "--resume"]


def _check(box: Sandbox, argv: list[str], expected: str, capsys: pytest.CaptureFixture[str],
           skip: Path | None = None) -> None:
    before = _snapshot(box.root, skip)
    code = main([*argv, "-q", *(["--no-progress"] if argv[0] in ("run", "train") else [])])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(errors) == 1, err
    assert expected in errors[0], errors[0]
    assert _snapshot(box.root, skip) == before


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_clear_line_and_changes_nothing(name: str, box: Sandbox,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    setup, expected = CASES[name]
    argv = setup(box)
    _check(box, argv, expected, capsys)


@pytest.mark.parametrize("name", sorted(RUN_CASES))
def test_bad_input_on_a_finished_run_changes_nothing_outside_it(name: str, box: Sandbox, finished: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    _with_finished(box, finished)
    setup, expected, run_may_change = RUN_CASES[name]
    argv = setup(box)
    _check(box, argv, expected, capsys, skip=box.root / "run" if run_may_change else None)


def test_the_catalogue_is_large_enough() -> None:
    assert len(CASES) + len(RUN_CASES) >= 50


def test_every_problem_of_a_config_is_reported_at_once(box: Sandbox, capsys: pytest.CaptureFixture[str]) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["train"]["lr"] = "fast"
        d["tasks"][0]["n_train"] = "many"
        d["methods"][0]["label"] = "base"

    assert main(["run", box.config(edit), "--output-dir", box.out, "-q"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3 and "train.lr" in errors[0] + errors[1] + errors[2]


def test_debug_shows_the_traceback(box: Sandbox) -> None:
    with pytest.raises(Exception, match=r"train\.lr"):
        main(["run", box.config(lambda d: _set(d, "train.lr", "fast")), "--output-dir", box.out, "--debug", "-q"])


def test_overwrite_replaces_only_what_the_run_wrote(box: Sandbox, finished: Path) -> None:
    """A user's file in a run folder survives --overwrite; the old run's entries are replaced."""
    _with_finished(box, finished)
    (box.root / "run" / "notes.txt").write_text("mine")
    old = json.loads((box.root / "run" / "run.json").read_text())
    assert main(["run", box.config(), "--output-dir", box.out, "--overwrite", "--no-progress", "-q",
                 "--methods=[{name: lora, rank: 4}]"]) == 0
    assert (box.root / "run" / "notes.txt").read_text() == "mine"
    assert not (box.root / "run" / "thanora").exists()  # the old run's method folder went with it
    new = json.loads((box.root / "run" / "run.json").read_text())
    assert new["status"] == "complete" and new["updated"] >= old["updated"]
    assert "lora" in new["written"] and "thanora" not in new["written"]


def test_a_failed_start_does_not_block_the_retry(box: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error after the run folder was created (here: in the base-model evaluation) leaves a run marked
    "failed" with no results; the plain retry runs, no flag needed."""
    import thanora.experiment.pipeline as pipeline

    def broken(*a: Any, **k: Any) -> dict:
        raise ValueError("simulated failure")

    monkeypatch.setattr(pipeline, "evaluate_model", broken)
    assert main(["run", box.config(), "--output-dir", box.out, "--no-progress", "-q"]) == 2
    record = json.loads((box.root / "run" / "run.json").read_text())
    assert record["status"] == "failed" and "simulated failure" in record["error"]
    monkeypatch.undo()
    assert main(["run", box.config(), "--output-dir", box.out, "--no-progress", "-q",
                 "--methods=[{name: lora, rank: 4}]"]) == 0


def test_settings_without_effect_are_said_once(box: Sandbox, caplog: pytest.LogCaptureFixture) -> None:
    def edit(d: dict[str, Any]) -> None:
        d["tasks"] = d["tasks"][:1]
        d["methods"] = [{"name": "thanora", "rank": 4, "spr_lambda": 1e-3}]
        d["train"].update(eval_every=5, max_steps=2, epochs=3)

    with caplog.at_level("WARNING"):
        assert main(["run", box.config(edit), "--output-dir", box.out, "--no-progress", "-q"]) == 0
    notes = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    for expected in ("spr_lambda=0.001 has no effect with a single task", "train.eval_every has no effect",
                     "train.epochs=3 has no effect"):
        assert sum(expected in n for n in notes) == 1, notes


def test_resume_keeps_the_config_its_results_came_from(box: Sandbox, finished: Path) -> None:
    _with_finished(box, finished)
    saved = (box.root / "run" / "config.yaml").read_text()
    assert main(["run", str(box.root / "run" / "config.yaml"), "--output-dir", box.out, "--resume", "-q",
                 "--no-progress", "--train.log_every=1"]) == 0  # a setting that changes nothing computed
    assert (box.root / "run" / "config.yaml").read_text() == saved


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupt_exits_130_and_the_run_resumes(sig: signal.Signals, box: Sandbox) -> None:
    """Interrupted mid-training (after a checkpoint), the run says so in run.json and --resume completes it."""
    config = box.config(lambda d: (d["train"].update(epochs=30, save_every=1),
                                   d.update(methods=[{"name": "lora", "rank": 4}])))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "thanora.cli", "run", config, "--output-dir", box.out, "--no-progress", "-q"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    latest = box.root / "run" / "lora" / "checkpoints" / "latest"
    deadline = time.time() + 120
    while not latest.is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    assert latest.is_file(), proc.communicate()[1]
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "re-run with --resume" in err and "Traceback" not in err
    assert json.loads((box.root / "run" / "run.json").read_text())["status"] == "interrupted"
    done = subprocess.run([*command, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert json.loads((box.root / "run" / "run.json").read_text())["status"] == "complete"


def test_an_unreachable_hub_fails_at_once_with_what_is_available(box: Sandbox, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Without HF_HUB_OFFLINE, one quick Hub request decides (here it fails as DNS does on these machines)."""
    import huggingface_hub

    def unreachable(self: Any, name: str, timeout: float | None = None) -> None:
        raise ConnectionError("Could not resolve host: huggingface.co")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", unreachable)
    start = time.perf_counter()
    code = main(["run", box.config(lambda d: _set(d, "model.name_or_path", "nobody/no-such-model")),
                 "--output-dir", box.out, "-q"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and time.perf_counter() - start < 5
    assert "the Hub cannot be reached (ConnectionError); available offline: 'smollm2'" in errors[0]
    assert not (box.root / "run").exists()


def test_resume_may_add_methods_and_then_describes_them_all(box: Sandbox, finished: Path) -> None:
    """Adding a method on --resume trains only it; config.yaml then holds every method whose results are there.
    Removing one is refused (its results would no longer be described)."""
    _with_finished(box, finished)
    run = box.root / "run"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["methods"].append({"name": "lora", "label": "lora_more", "rank": 2})
    extended = run / "extended.yaml"
    extended.write_text(yaml.safe_dump(saved))
    assert main(["run", str(extended), "--output-dir", str(run), "--resume", "-q", "--no-progress"]) == 0
    labels = [m["label"] for m in yaml.safe_load((run / "config.yaml").read_text())["methods"]]
    assert labels == ["lora", "thanora", "lora_more"]
    assert set(json.loads((run / "metrics.json").read_text())) >= {"base", "lora", "thanora", "lora_more"}
    saved["methods"] = saved["methods"][:1]
    extended.write_text(yaml.safe_dump(saved))
    assert main(["run", str(extended), "--output-dir", str(run), "--resume", "-q", "--no-progress"]) == 2


def test_overwrite_never_follows_a_run_json_outside_the_folder(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """An edited or corrupt ``run.json`` naming ``..``, an absolute path or a nested path cannot make `clear`
    delete anything but the run's own entries one level inside the folder."""
    from thanora.experiment.rundir import RUN_FORMAT, clear, written_entries

    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "data.txt").write_text("mine")
    run = tmp_path / "run"
    (run / "lora").mkdir(parents=True)
    (run / "notes").mkdir()
    (run / "metrics.json").write_text("{}")
    listed = ["..", str(outside), "../precious", "notes/../..", "lora", "metrics.json", "run.json"]
    (run / "run.json").write_text(json.dumps({"format": RUN_FORMAT, "written": listed}))
    assert written_entries(run) == ["lora", "metrics.json", "run.json"]
    with caplog.at_level("WARNING"):
        kept = clear(run)
    assert (outside / "data.txt").read_text() == "mine"
    assert kept == ["notes"] and not (run / "lora").exists() and not (run / "metrics.json").exists()
    assert "left alone" in caplog.text and "../precious" in caplog.text
