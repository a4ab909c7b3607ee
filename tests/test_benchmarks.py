"""The benchmarks' own logic, without training. Accuracy: learning-rate choice, seed/rate grouping of the final runs,
aggregation, the paired bootstrap and the rendered table (the runs are replaced by a synthetic ``run``). Training
cost: the interleaved rounds and the per-round pairing with LoRA (the measurement replaced by a synthetic one)."""

from __future__ import annotations

import importlib
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from thanora.data.formats import IGNORE_INDEX
from thanora.experiment.rundir import RUN_FORMAT
from thanora.methods.registry import get_method

BENCHMARKS = Path(__file__).parent.parent / "benchmarks"


def benchmark_module(name: str) -> Any:
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.fixture(scope="module")
def accuracy() -> Any:
    return benchmark_module("accuracy")


@pytest.fixture(scope="module")
def train_cost() -> Any:
    return benchmark_module("train_cost")


def test_bootstrap_of_a_constant_difference_is_that_difference(accuracy: Any) -> None:
    rng = np.random.default_rng(0)
    b = {"x": rng.integers(0, 2, 50).astype(float), "y": rng.integers(0, 2, 80).astype(float)}
    same = accuracy.bootstrap_diff(b, b)
    assert all(v == [0.0, 0.0, 0.0] for v in same.values())
    shifted = accuracy.bootstrap_diff({t: v + 0.25 for t, v in b.items()}, b)
    for task in ("x", "y", "average"):
        assert shifted[task] == pytest.approx([0.25, 0.25, 0.25])


def test_bootstrap_interval_holds_the_point_and_the_average_is_unweighted(accuracy: Any) -> None:
    rng = np.random.default_rng(1)
    a = {"x": rng.integers(0, 2, 40).astype(float), "y": rng.integers(0, 2, 400).astype(float)}
    b = {"x": rng.integers(0, 2, 40).astype(float), "y": rng.integers(0, 2, 400).astype(float)}
    out = accuracy.bootstrap_diff(a, b)
    for task, (point, lo, hi) in out.items():
        assert lo <= point <= hi, task
    assert out["x"][0] == pytest.approx(float((a["x"] - b["x"]).mean()))
    assert out["average"][0] == pytest.approx((out["x"][0] + out["y"][0]) / 2)
    assert out["x"][2] - out["x"][1] > out["y"][2] - out["y"][1]  # 10x fewer questions: a wider interval


def test_bootstrap_over_seeds_carries_the_seed_to_seed_spread(accuracy: Any) -> None:
    rng = np.random.default_rng(2)
    b = {"x": rng.integers(0, 2, (3, 60)).astype(float), "y": rng.integers(0, 2, (3, 90)).astype(float)}
    # every question +0.3 on seeds 0 and 1, -0.3 on seed 2: averaged over seeds first, the spread would vanish
    a = {t: v + np.array([[0.3], [0.3], [-0.3]]) for t, v in b.items()}
    out = accuracy.bootstrap_diff(a, b)
    for task in ("x", "y", "average"):
        point, lo, hi = out[task]
        assert point == pytest.approx(0.1) and lo == pytest.approx(-0.3) and hi == pytest.approx(0.3), task
    one_seed = {t: v[:1] for t, v in b.items()}  # one row: the plain bootstrap over questions, same draws as 1-D
    flat = {t: v[0] for t, v in b.items()}
    shifted = {t: v + rng.normal(0, 0.5, v.shape) for t, v in flat.items()}
    assert accuracy.bootstrap_diff({t: v[None] for t, v in shifted.items()}, one_seed) == \
        accuracy.bootstrap_diff(shifted, flat)
    with pytest.raises(ValueError, match="aligned"):
        accuracy.bootstrap_diff({"x": b["x"]}, {"x": b["x"][0]})
    with pytest.raises(ValueError, match="aligned"):
        accuracy.bootstrap_diff({"x": b["x"], "y": b["y"][:2]}, {"x": b["x"], "y": b["y"][:2]})


def test_a_variant_never_overwrites_the_scales_own_table(accuracy: Any) -> None:
    own = accuracy.default_out(2, "small", 16, None)
    assert own.name == "accuracy_2task_small"
    assert accuracy.default_out(2, "small", 64, None).name == "accuracy_2task_small_r64"
    assert accuracy.default_out(4, "small", 16, 1e-4).name == "accuracy_4task_small_lr0.0001"
    assert accuracy.default_out(4, "tiny", 64, 3e-4).name == "accuracy_4task_tiny_r64_lr0.0003"
    assert accuracy.default_out(2, "full", 64, None).name == "accuracy_2task_full"  # the full scale's rank is 64


@pytest.mark.parametrize("rank", [16, 32, 64, 128])
def test_every_benchmark_entry_is_a_valid_method_setting(accuracy: Any, rank: int) -> None:
    entries = accuracy.method_entries(rank)
    labels = [accuracy.label_of(e) for e in entries]
    assert len(set(labels)) == len(labels) and labels[0] == "lora"
    for entry in entries:
        method = get_method(entry["name"])
        method.config_cls(**{k: v for k, v in entry.items() if k not in ("name", "label")})


# Synthetic dev / eval scores: lora is best at 3e-4, dora at 1e-3; seeds move every score a little.
TASKS = ("csqa", "obqa")
BEST = {"lora": 3e-4, "dora": 1e-3}


def fake_run(config: dict[str, Any], out: Path, landed: Any = None) -> dict[str, Any]:
    seed = config["seed"]
    n = config["tasks"][0]["n_eval"]
    metrics: dict[str, Any] = {}
    for entry in config["methods"]:
        label = entry.get("label", entry["name"])
        lr = entry.get("train", {}).get("lr", config["train"]["lr"])  # a method's own rate, else the run's
        hits = n // 2 + (4 if lr == BEST[label] else 0) + seed
        correct = [1] * hits + [0] * (n - hits)
        metrics[label] = {t: {"score": hits / n, "correct": correct} for t in TASKS} | {"average": hits / n}
    if config["output"]["evaluate_base"]:
        metrics["base"] = {t: {"score": 0.25, "correct": [0] * n} for t in TASKS} | {"average": 0.25}
    out.mkdir(parents=True)
    (out / "run.json").write_text(json.dumps({"timings_s": {"lora": 60.0}}))
    return metrics


@pytest.fixture
def offline(accuracy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(accuracy, "run", fake_run)
    monkeypatch.setattr(accuracy, "param_counts", lambda entries: {e.get("label", e["name"]): 1 for e in entries})
    monkeypatch.setattr(accuracy, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(accuracy.run_records, "RECORDS", tmp_path / "records")
    return tmp_path


def test_sweep_picks_each_methods_rate_and_each_final_run_holds_every_method_at_its_rate(accuracy: Any,
                                                                                         offline: Path) -> None:
    argv = ["--methods", "lora", "dora", "--lrs", "3e-4", "1e-3", "--seeds", "0", "1", "2", "--n-eval", "20",
            "--extend", "0", "--out", str(offline / "table")]
    result = accuracy.main(argv)
    assert {label: row["lr"] for label, row in result["rows"].items()} == BEST
    root = Path(result["runs"])
    assert sorted(p.name for p in root.iterdir()) == sorted(
        ["sweep_lr0.0003", "sweep_lr0.001"] + [f"seed{s}" for s in range(3)])
    lora = result["rows"]["lora"]
    expected = [(10 + 4 + seed) / 20 for seed in range(3)]
    assert lora["average"]["values"] == expected
    assert lora["average"]["std"] == pytest.approx(statistics.stdev(expected))
    assert result["base"]["average"] == 0.25 and result["run_minutes"] == pytest.approx(5 * 1.0)
    assert result["rows"]["dora"]["vs_lora"]["average"] == pytest.approx([0.0, 0.0, 0.0])  # same hits per seed
    table = (offline / "table.md").read_text()
    assert "| base (zero-shot) | 0 | – | 25.0 | 25.0 | 25.0 | |" in table
    assert "chosen on a held-out dev slice" in table and json.loads((offline / "table.json").read_text())


def test_the_table_gives_the_mechanism_comparisons_with_their_intervals(accuracy: Any, offline: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BEST, "thanora", 1e-3)
    monkeypatch.setitem(BEST, "hasi_only", 3e-4)
    argv = ["--methods", "lora", "thanora", "hasi_only", "--lrs", "3e-4", "1e-3", "--n-eval", "20", "--extend", "0",
            "--out", str(offline / "table")]
    result = accuracy.main(argv)
    assert result["rows"]["thanora"]["vs"] == {"hasi_only": pytest.approx([0.0, 0.0, 0.0])}  # same hits
    assert result["rows"]["hasi_only"]["vs"] == {} and result["rows"]["lora"]["vs"] == {}
    assert "| thanora | hasi_only | +0.0 [+0.0, +0.0] |" in (offline / "table.md").read_text()


def test_sweep_only_stops_after_the_sweep_and_writes_its_own_table(accuracy: Any, offline: Path) -> None:
    argv = ["--methods", "lora", "dora", "--lrs", "3e-4", "1e-3", "--n-eval", "20", "--extend", "0", "--sweep-only",
            "--out", str(offline / "table")]
    result = accuracy.main(argv)
    assert {label: row["lr"] for label, row in result["rows"].items()} == BEST
    runs = next((offline / "runs").iterdir())
    assert sorted(p.name for p in runs.iterdir()) == ["sweep_lr0.0003", "sweep_lr0.001"]  # no final run
    assert not (offline / "table.md").exists()
    table = (offline / "table_sweep.md").read_text()
    assert "| lora | **62.5** | 50.0 |" in table and "Every method at one shared rate" in table  # 20 / 32 hits
    point, lo, hi = result["shared_rate"]["dora"]["0.001"]["vs_lora"]
    assert point == pytest.approx(0.125) and lo < point < hi  # 4 more hits of 32, paired bootstrap
    with pytest.raises(SystemExit):
        accuracy.main(["--sweep-only", "--lr", "1e-3"])


def test_rows_keep_the_methods_order_and_the_table_shows_the_sweep(accuracy: Any, offline: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BEST, "lora", 1e-3)
    monkeypatch.setitem(BEST, "dora", 3e-4)
    argv = ["--methods", "lora", "dora", "--lrs", "3e-4", "1e-3", "--seeds", "0", "--n-eval", "20",
            "--extend", "0", "--out", str(offline / "table")]
    assert list(accuracy.main(argv)["rows"]) == ["lora", "dora"]
    table = (offline / "table.md").read_text()
    assert "| method | 0.0003 | 0.001 |" in table
    assert "| lora | 50.0 | **62.5** |" in table and "| dora | **62.5** | 50.0 |" in table
    rendered = accuracy.render(json.loads((offline / "table.json").read_text()))  # string keys after JSON
    assert "| lora | 50.0 | **62.5** |" in rendered


def test_a_tied_sweep_picks_the_lowest_rate_whatever_the_grid_order(accuracy: Any, offline: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BEST, "lora", None)  # never the best: the same dev score at every rate
    argv = ["--methods", "lora", "--lrs", "1e-3", "1e-4", "3e-4", "--seeds", "0", "--n-eval", "20",
            "--extend", "0", "--out", str(offline / "table")]
    assert accuracy.main(argv)["rows"]["lora"]["lr"] == 1e-4


def test_fixed_rate_is_a_sensitivity_table_with_its_own_file(accuracy: Any, offline: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accuracy, "RESULTS", offline / "results")
    other = offline / "runs" / "2task_tiny_r16_n128-20" / "another_table"  # same root, not this table's
    other.mkdir(parents=True)
    (other / "run.json").write_text(json.dumps({"timings_s": {"lora": 600.0}}))
    result = accuracy.main(["--methods", "lora", "dora", "--lr", "1e-3", "--seeds", "0", "--n-eval", "20"])
    assert {row["lr"] for row in result["rows"].values()} == {1e-3}
    assert sorted(p.name for p in Path(result["runs"]).iterdir()) == ["another_table", "seed0"]  # no sweep
    assert result["run_minutes"] == 1.0  # only the folders it read
    table = (offline / "results" / "accuracy_2task_tiny_lr0.001.md").read_text()
    assert "not tuned" in table


def test_a_best_rate_at_an_edge_of_the_grid_gets_the_next_rate_beyond_it(accuracy: Any, offline: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BEST, "lora", 3e-5)  # below the grid: found by extending it twice
    monkeypatch.setitem(BEST, "dora", 3e-4)  # the grid's lowest: one step below shows it is the best
    argv = ["--methods", "lora", "dora", "--lrs", "3e-4", "1e-3", "--seeds", "0", "--n-eval", "20",
            "--out", str(offline / "table")]
    result = accuracy.main(argv)
    assert result["rows"]["lora"]["lr"] == 3e-5 and result["rows"]["dora"]["lr"] == 3e-4
    assert sorted(float(lr) for lr in result["rows"]["lora"]["sweep"]) == [3e-5, 1e-4, 3e-4, 1e-3]
    assert sorted(float(lr) for lr in result["rows"]["dora"]["sweep"]) == [1e-4, 3e-4, 1e-3]
    assert result["lrs"] == [3e-5, 1e-4, 3e-4, 1e-3]
    shared = result["shared_rate"]  # every method at each shared rate it was swept at, Δ LoRA at that rate
    assert set(shared["dora"]) == {"0.0001", "0.0003", "0.001"} and "vs_lora" in shared["dora"]["0.0003"]
    assert "Every method at one shared rate" in (offline / "table.md").read_text()


def test_a_best_score_tied_with_an_edge_of_the_grid_extends_it(accuracy: Any) -> None:
    """Single-task LoRA tied at 3e-4 and 1e-3 on the 2-task small sweep: its optimum may lie above the grid."""
    entry = {"name": "lora", "label": "lora_single"}
    tied = {3e-5: 0.31, 1e-4: 0.305, 3e-4: 0.345, 1e-3: 0.345}
    assert accuracy.edge_extensions({"lora_single": tied}, [entry]) == {3e-3: [entry]}
    inside = tied | {1e-3: 0.34}
    assert accuracy.edge_extensions({"lora_single": inside}, [entry]) == {}
    low = {1e-4: 0.4, 3e-4: 0.4, 1e-3: 0.3}
    assert accuracy.edge_extensions({"lora_single": low}, [entry]) == {3e-5: [entry]}


def test_single_task_lora_is_one_adapter_per_task_with_its_share_of_the_steps(accuracy: Any) -> None:
    scale = dict(accuracy.SCALES["small"])
    tasks = accuracy.task_configs(2, scale, dev=False)
    assert [(t["name"], t["n_train"], t["n_eval"]) for t in tasks] == [("csqa", 900, 321), ("obqa", 500, 500)]
    steps = accuracy.steps_of(tasks, scale)
    assert steps == 250  # 1,400 examples: 175 steps per epoch, raised to the scale's minimum
    config = accuracy.run_config(tasks, accuracy.method_entries(16)[-1:], 1e-4, 0, scale, 2, "cpu", False)
    singles = config["methods"]
    assert [m["label"] for m in singles] == ["lora_single_csqa", "lora_single_obqa"]
    assert [m["tasks"] for m in singles] == [["csqa"], ["obqa"]]
    assert [m["train"]["max_steps"] for m in singles] == [161, 89]  # 250 steps shared as 900 : 500
    assert config["train"]["max_steps"] == 250 and config["data"]["group_by_length"] is True
    from thanora.experiment.config import config_from_dict

    config_from_dict(config)  # a valid run config


def test_block_overlap_summary_is_the_mean_off_diagonal_entry(accuracy: Any, tmp_path: Path) -> None:
    import json

    assert accuracy.block_overlap_of(tmp_path) is None  # a method without task blocks
    overlap = {"tasks": ["a", "b"], "before": {"m1": [[1.0, 0.8], [0.8, 1.0]], "m2": [[1.0, 0.4], [0.4, 1.0]]},
               "after": {"m1": [[1.0, 0.2], [0.2, 1.0]], "m2": [[1.0, 0.0], [0.0, 1.0]]}}
    (tmp_path / "overlap.json").write_text(json.dumps(overlap))
    assert accuracy.block_overlap_of(tmp_path) == pytest.approx({"before": 0.6, "after": 0.1})
    lines = accuracy.overlap_table({"rows": {"thanora": {"overlap": {"before": 0.6, "after": 0.1}}, "lora": {}}})
    assert lines[-1] == "| thanora | 0.6000 | 0.1000 |" and not any("lora" in line for line in lines)


def test_a_recorded_run_is_read_from_its_record_when_the_run_folder_is_gone(accuracy: Any, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    import thanora.experiment.pipeline as pipeline

    monkeypatch.setattr(accuracy.run_records, "RECORDS", tmp_path / "records")
    trained: list[Path] = []

    def train(config: Any, out: Path, **_: Any) -> dict[str, Any]:
        trained.append(out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "run.json").write_text(json.dumps({"status": "complete", "timings_s": {"lora": 60.0}}))
        return {"lora": {"average": 0.5}}

    monkeypatch.setattr(pipeline, "run", train)
    scale = dict(accuracy.SCALES["tiny"])
    tasks = accuracy.task_configs(2, scale, dev=True)
    config = accuracy.run_config(tasks, accuracy.method_entries(16)[:1], 1e-4, 0, scale, 2, "cpu", False)
    folder = tmp_path / "runs" / "table" / "sweep_lr0.0001"
    assert accuracy.run(config, folder) == {"lora": {"average": 0.5}} and trained == [folder]
    record = json.loads((tmp_path / "records" / "table" / "sweep_lr0.0001.json").read_text())
    assert record["config"] == config and record["timings_s"] == {"lora": 60.0}
    import shutil

    shutil.rmtree(tmp_path / "runs")  # a fresh checkout: runs/ is git-ignored
    assert accuracy.run(config, folder) == {"lora": {"average": 0.5}} and trained == [folder]  # not re-trained
    assert accuracy.run_seconds([folder]) == 60.0
    other = accuracy.run_config(tasks, accuracy.method_entries(16)[:1], 3e-4, 0, scale, 2, "cpu", False)
    accuracy.run(other, folder)  # another config under the same name is trained, not answered from the record
    assert len(trained) == 2


def test_effects_are_recorded_per_row_and_only_missing_rows_are_measured(accuracy: Any, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import types

    monkeypatch.setattr(accuracy.run_records, "RECORDS", tmp_path / "records")
    asked: list[list[str]] = []

    def effects_of_run(folder: Path, rows_of: dict[str, list[str]], ablate: bool, cache: Path,
                       unseen: bool = True) -> dict[str, Any]:
        asked.append(list(rows_of))
        assert cache == tmp_path / "records" / "table"
        return {row: {"kl_base_tuned": float(len(row))} for row in rows_of}

    monkeypatch.setitem(sys.modules, "model_effects", types.SimpleNamespace(effects_of_run=effects_of_run))
    folder = tmp_path / "runs" / "table" / "seed0"
    on_disk(folder, ["lora", "thanora"])
    assert accuracy.run_effects(folder, {"lora": ["lora"]}, False) == {"lora": {"kl_base_tuned": 4.0}}
    both = accuracy.run_effects(folder, {"lora": ["lora"], "thanora": ["thanora"]}, False)
    assert both == {"lora": {"kl_base_tuned": 4.0}, "thanora": {"kl_base_tuned": 7.0}}
    assert asked == [["lora"], ["thanora"]]
    assert accuracy.run_effects(folder, {"lora": ["lora"]}, False, unseen=False) == {"lora": {"kl_base_tuned": 4.0}}
    assert asked[-1] == ["lora"]  # the KL-only measurement of the sweep is its own record


def on_disk(folder: Path, labels: list[str]) -> None:
    """A finished run folder holding the adapters of ``labels``."""
    import yaml

    for label in labels:
        (folder / label / "adapter").mkdir(parents=True)
    (folder / "run.json").write_text(json.dumps({"format": RUN_FORMAT, "status": "complete"}))
    (folder / "config.yaml").write_text(yaml.safe_dump({"methods": [{"name": label} for label in labels]}))


class FakePipeline:
    """`thanora.experiment.pipeline.run` as far as `accuracy.run` sees it: a folder's config, metrics and run.json;
    a resume trains only the methods without results; training ``stop_at`` ends the session (SystemExit)."""

    def __init__(self, stop_at: str | None = None) -> None:
        self.trained: list[str] = []
        self.stop_at = stop_at

    def __call__(self, cfg: Any, out: Path, overwrite: bool, resume: bool, progress: bool) -> dict[str, Any]:
        import shutil

        assert resume or overwrite or not out.exists()
        if overwrite:
            shutil.rmtree(out)
        metrics = json.loads((out / "metrics.json").read_text()) if resume else {}
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.yaml")
        (out / "run.json").write_text(json.dumps({"format": RUN_FORMAT, "status": "running", "timings_s": {}}))
        for spec in cfg.methods:
            if spec.label in metrics:
                continue
            if spec.label == self.stop_at:
                raise SystemExit("the session ended")
            self.trained.append(spec.label)
            (out / spec.label / "adapter").mkdir(parents=True)
            metrics[spec.label] = {"average": 0.5}
            (out / "metrics.json").write_text(json.dumps(metrics))
        (out / "run.json").write_text(json.dumps({"format": RUN_FORMAT, "status": "complete",
                                                  "timings_s": {"lora": 60.0}}))
        return metrics


def tiny_table(accuracy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, n_methods: int,
               evaluate_base: bool = False) -> tuple[dict[str, Any], Path, list[str]]:
    """A 2-task tiny dev-table config of the first ``n_methods`` methods at rank 16, its run folder under
    ``tmp_path`` and the method labels; records go to ``tmp_path/records``."""
    monkeypatch.setattr(accuracy.run_records, "RECORDS", tmp_path / "records")
    scale = dict(accuracy.SCALES["tiny"])
    entries = accuracy.method_entries(16)[:n_methods]
    tasks = accuracy.task_configs(2, scale, dev=True)
    config = accuracy.run_config(tasks, entries, 1e-4, 0, scale, 2, "cpu", evaluate_base)
    return config, tmp_path / "runs" / "table" / "seed0", [accuracy.label_of(e) for e in entries]


def test_a_run_stopped_between_methods_keeps_the_finished_ones_across_checkouts(accuracy: Any, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Each method is recorded as it lands: a session that ends mid-run loses at most the method in training, and
    on a fresh checkout only the methods not recorded are trained; ``landed`` sees each one's adapters."""
    import shutil

    import thanora.experiment.pipeline as pipeline

    config, folder, labels = tiny_table(accuracy, tmp_path, monkeypatch, 3)
    fake = FakePipeline(stop_at=labels[2])
    monkeypatch.setattr(pipeline, "run", fake)
    with pytest.raises(SystemExit):
        accuracy.run(config, folder)
    assert fake.trained == labels[:2]
    assert set(accuracy.run_records.load(folder)["metrics"]) == set(labels[:2])
    shutil.rmtree(tmp_path / "runs")  # a fresh checkout: the adapters of the first two are gone
    fake = FakePipeline()
    monkeypatch.setattr(pipeline, "run", fake)
    seen: list[set[str]] = []
    assert set(accuracy.run(config, folder, seen.append)) == set(labels)
    assert fake.trained == labels[2:] and seen == [{labels[2]}]
    assert accuracy.run(config, folder) == accuracy.run_records.load(folder)["metrics"]  # served whole
    assert fake.trained == labels[2:]


def test_a_changed_method_entry_retrains_that_method_only_and_drops_its_measurements(
        accuracy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid extension that changes one method's chosen rate re-trains that method in every final run, not the
    others; its old metrics, timings and adapter measurements leave the record; a run-wide change re-trains all."""
    import copy

    import thanora.experiment.pipeline as pipeline

    config, folder, labels = tiny_table(accuracy, tmp_path, monkeypatch, 2)
    monkeypatch.setattr(pipeline, "run", FakePipeline())
    accuracy.run(config, folder)
    accuracy.run_records.update(folder, effects={label: {"kl_base_tuned": 1.0} for label in labels})
    new = copy.deepcopy(config)
    new["methods"][1]["train"] = {"lr": 3e-3}
    fake = FakePipeline()
    monkeypatch.setattr(pipeline, "run", fake)
    assert set(accuracy.run(new, folder)) == set(labels) and fake.trained == [labels[1]]  # the stale folder replaced
    record = accuracy.run_records.load(folder)
    assert record["config"] == new and set(record["effects"]) == {labels[0]}
    other = copy.deepcopy(new) | {"seed": 1}
    accuracy.run(other, folder)
    assert fake.trained == [labels[1], *labels] and "effects" not in accuracy.run_records.load(folder)


def test_a_stopped_run_whose_folder_is_kept_is_resumed_not_restarted(accuracy: Any, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    import thanora.experiment.pipeline as pipeline

    config, folder, labels = tiny_table(accuracy, tmp_path, monkeypatch, 3, evaluate_base=True)
    monkeypatch.setattr(pipeline, "run", FakePipeline(stop_at=labels[1]))
    with pytest.raises(SystemExit):
        accuracy.run(config, folder)
    fake = FakePipeline()
    monkeypatch.setattr(pipeline, "run", fake)
    seen: list[set[str]] = []
    assert set(accuracy.run(config, folder, seen.append)) == set(labels)
    assert fake.trained == labels[1:] and seen == [set(labels[:2]), set(labels)]


def test_effects_of_a_run_whose_folder_is_gone_keep_what_was_recorded(accuracy: Any, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A run served from its record on a fresh checkout has no adapters to measure: its rows not yet measured are
    left out (said once), never measured on a missing folder nor recorded as empty."""
    import types

    monkeypatch.setattr(accuracy.run_records, "RECORDS", tmp_path / "records")

    def effects_of_run(*_: Any, **__: Any) -> dict[str, Any]:
        raise AssertionError("measured without adapters")

    monkeypatch.setitem(sys.modules, "model_effects", types.SimpleNamespace(effects_of_run=effects_of_run))
    folder = tmp_path / "runs" / "table" / "seed1"
    accuracy.run_records.update(folder, effects={"lora": {"kl_base_tuned": 4.0}})
    assert accuracy.run_effects(folder, {"lora": ["lora"], "thanora": ["thanora"]}, False) == {
        "lora": {"kl_base_tuned": 4.0}}
    assert "thanora never recorded" in capsys.readouterr().out
    assert accuracy.run_records.load(folder)["effects"] == {"lora": {"kl_base_tuned": 4.0}}
    summary = accuracy.summarize_effects([{"kl_base_tuned": 4.0, "mean_abs_dlogit": 1.0, "unseen_score": 0.3}])
    lines = accuracy.effects_table({"rows": {"lora": {"effects": summary}}})
    assert "mean over the 1 seed(s)" in lines[1]
    two = accuracy.summarize_effects([{"kl_base_tuned": 4.0, "mean_abs_dlogit": 1.0, "unseen_score": 0.3}] * 2)
    lines = accuracy.effects_table({"rows": {"lora": {"effects": summary}, "thanora": {"effects": two}}})
    assert "mean over the 1-2 seed(s)" in lines[1]


def test_rate_options_exclude_each_other(accuracy: Any) -> None:
    with pytest.raises(SystemExit):
        accuracy.main(["--lr", "1e-3", "--lrs", "1e-4"])


def test_train_cost_rounds_rotate_and_pair_each_ratio_with_loras_round(train_cost: Any) -> None:
    jobs = [train_cost.Job(label, "lora", {}, "cpu", 1, 0, 8, 16) for label in ("lora", "dora", "mtlora")]
    seconds = {"lora": [1.0, 2.0, 1.0], "dora": [1.5, 3.0, 1.5], "mtlora": [2.0, 2.0, 2.0]}  # round 2: a slow machine
    order: list[str] = []

    def measure(job: Any) -> dict[str, Any]:
        k = sum(label == job.label for label in order)
        order.append(job.label)
        return {"label": job.label, "method": job.method, "settings": {}, "params": 1,
                "step_s": seconds[job.label][k], "step_s_all": [seconds[job.label][k]], "peak_mb": 100.0 * (k + 1)}

    rows = {r["label"]: r for r in train_cost.measure_methods(jobs, 3, measure)}
    assert order == ["lora", "dora", "mtlora", "dora", "mtlora", "lora", "mtlora", "lora", "dora"]
    assert rows["dora"]["step_ratio"] == 1.5 and rows["dora"]["step_ratio_range"] == [1.5, 1.5]  # drift cancels
    assert rows["mtlora"]["step_ratio"] == 2.0 and rows["mtlora"]["step_ratio_range"] == [1.0, 2.0]
    assert rows["lora"]["step_s"] == 1.0 and rows["mtlora"]["memory_ratio"] == 1.0
    assert len(rows["dora"]["rounds"]) == 3
    table = train_cost.render({"meta": {"machine": {"device": "cpu", "processor": "x", "torch_threads": 2},
                                        "command": "c", "timestamp_utc": "t",
                                        "args": {"steps": 1, "warmup": 0, "batch_size": 8, "max_length": 16,
                                                 "rounds": 3}},
                               "methods": list(rows.values())})
    assert "| mtlora | 1 | 2.00 (1.00-2.00) | 1.00 |" in table and "3 interleaved rounds" in table


def test_batched_svd_agrees_with_the_per_module_loop_and_renders() -> None:
    import torch

    batched_svd = benchmark_module("batched_svd")
    rows = [batched_svd.measure(("exact", 12, 8, 3, 4, "exact"), 2, torch.device("cpu")),
            batched_svd.measure(("randomized", 40, 30, 2, 4, "randomized"), 1, torch.device("cpu"))]
    assert rows[0]["max_rel_diff_singular_values"] < 1e-5  # the same LAPACK call, batched
    assert rows[1]["max_rel_diff_singular_values"] < 1e-3  # other test matrices, the same top spectrum
    table = batched_svd.render({"meta": {"command": "c", "timestamp_utc": "t", "machine": {"device": "cpu"}},
                                "rounds": 2, "rows": rows})
    assert "| exact | 12 x 8 | 3 | 4 | exact |" in table


@pytest.mark.parametrize(("system", "bf16"), [
    ("hf", False), ("hf, grouped", False), ("hf, flattened", False), ("thanora lora, padded", False),
    ("thanora lora", False), ("thanora thanora", False), ("hf, flattened", True), ("thanora thanora", True)])
def test_throughput_runs_every_system_on_the_synthetic_workload(system: str, bf16: bool) -> None:
    """The path a lent GPU takes (no assets there): SmolLM2's recorded shape, here shrunk, random tokens with the
    recorded lengths; every system trains its epoch and counts its steps, in bf16 autocast too (the CUDA command's
    ``--mixed-precision bf16``; each system runs in a fresh process there, so the accelerator state is reset here)."""
    import torch
    from accelerate.state import AcceleratorState

    throughput, workload = benchmark_module("throughput"), benchmark_module("workload")
    cpu = torch.device("cpu")
    base, tokenizer = workload.synthetic_base(cpu, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=256)
    data = workload.synthetic_batches(("csqa", "boolq"), 8, 4, 256, cpu)
    recorded = json.loads(workload.SHAPE.read_text())["lengths"]
    assert [len(f["input_ids"]) for f in data.features[:8]] == [n for n, _ in recorded["csqa"][:8]]
    assert all(sum(label != IGNORE_INDEX for label in f["labels"]) == k
               for f, (_, k) in zip(data.features[8:], recorded["boolq"], strict=False))
    AcceleratorState._reset_state(True)
    try:
        if system.startswith("hf"):
            seconds, steps = throughput._hf_epoch(base, tokenizer, data.features, 4, system.partition(", ")[2], bf16)
        else:
            seconds, steps = throughput._thanora_epoch(base, tokenizer, data, 4, system.split()[1].rstrip(","),
                                                       grouped=False, padded=system.endswith("padded"), bf16=bf16)
    finally:
        AcceleratorState._reset_state(True)
    assert steps == 2 and seconds > 0  # 16 examples, batch 8


def test_resetting_a_block_undoes_that_block_only_and_the_table_gives_its_interval(accuracy: Any,
                                                                                   tmp_path: Path) -> None:
    """The block ablation's algebra on a tiny ThanoRA export: resetting the block that trained restores the untrained
    export exactly, resetting any other block changes nothing; a non-residual export is refused."""
    from safetensors.torch import load_file

    import thanora
    from conftest import random_batch, tiny_llama
    from thanora.adapters.record import lora_factors

    effects = benchmark_module("model_effects")
    calib = {f"t{i}": [random_batch(i), random_batch(i + 10)] for i in range(3)}
    model = thanora.prepare_model(tiny_llama(), calib, thanora.ThanoraConfig(rank=8), progress=False)
    adapter = thanora.adapter_of(model)

    def exported(name: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        folder = thanora.export_adapter(model, tmp_path / name)
        return load_file(str(folder / "adapter_model.safetensors")), json.loads(
            (folder / "thanora_adapter.json").read_text())

    untrained, _ = exported("untrained")
    with torch.no_grad():  # "train" block t1 only
        for name in adapter.targets:
            A, B = lora_factors(model, name)
            start, stop = adapter.blocks[name]["t1"]
            A[start:stop] += torch.randn_like(A[start:stop])
            B[:, start:stop] += torch.randn_like(B[:, start:stop])
    trained, sidecar = exported("trained")
    assert any(not torch.equal(trained[k], untrained[k]) for k in trained)
    for key, value in effects.reset_block(trained, sidecar, "t1").items():
        torch.testing.assert_close(value, untrained[key], rtol=0, atol=0)
    for key, value in effects.reset_block(trained, sidecar, "t0").items():
        torch.testing.assert_close(value, trained[key], rtol=0, atol=0)
    assert all(torch.equal(trained[k], v) for k, v in load_file(
        str(tmp_path / "trained" / "adapter_model.safetensors")).items())  # the input is copied, not changed
    with pytest.raises(ValueError, match="residual: true"):
        effects.reset_block(trained, sidecar | {"conversion": "none (no residual base)"}, "t1")

    ablation = {"tasks": ["a", "b"], "drop": [[0.1, 0.0], [0.0, -0.02]],
                "drop_ci": [[[0.05, 0.15], [-0.01, 0.01]], [[-0.01, 0.01], [-0.04, 0.0]]]}
    summary = accuracy.summarize_effects([{"kl_base_tuned": 1.0, "mean_abs_dlogit": 1.0, "unseen_score": 0.3,
                                           "ablation": ablation}])
    lines = accuracy.effects_table({"rows": {"thanora": {"effects": summary}}, "seeds": [0]})
    assert "| a | +10.0 [+5.0, +15.0] | +0.0 [-1.0, +1.0] |" in lines
    old = summary | {"ablation": {k: v for k, v in ablation.items() if k != "drop_ci"}}  # records before intervals
    assert "| b | +0.0 | -2.0 |" in accuracy.effects_table({"rows": {"thanora": {"effects": old}}, "seeds": [0]})


def test_block_ablation_scores_the_exported_adapter_as_the_run_did(tmp_path: Path) -> None:
    """`block_ablation` on a real (tiny) ThanoRA run: its untouched row reproduces the run's own per-question
    scores through the exported adapter; each reset row equals scoring that reset adapter directly; every drop is
    the untouched score minus the reset one, inside its interval; a stopped ablation resumes from its finished rows."""
    import shutil

    from safetensors.torch import load_file, save_file

    from conftest import run_tiny
    from thanora.data.tasks import build_task
    from thanora.evaluation.evaluate import EvalConfig, EvalTask, evaluate
    from thanora.experiment.config import load_config

    effects = benchmark_module("model_effects")
    out = run_tiny(tmp_path, {"name": "thanora", "rank": 4, "lora_dropout": 0.0})
    cfg = load_config(out / "config.yaml")
    tasks = [build_task(t, cfg.data.seed) for t in cfg.tasks]
    adapter = out / "thanora" / "adapter"
    rows_file = tmp_path / "ablation_rows.json"
    ablation = effects.block_ablation(cfg, adapter, tasks, rows_file)

    names = ["colors", "animals"]
    assert ablation["tasks"] == names and set(ablation["scores"]) == {"none", *names}
    run_metrics = json.loads((out / "metrics.json").read_text())["thanora"]
    for task in names:
        assert ablation["correct"]["none"][task] == list(run_metrics[task]["correct"])
        assert ablation["scores"]["none"][task] == pytest.approx(run_metrics[task]["score"], abs=1e-9)

    sidecar = json.loads((adapter / "thanora_adapter.json").read_text())
    trained = load_file(str(adapter / "adapter_model.safetensors"))
    reset = effects.reset_block(trained, sidecar, "animals")
    assert any(not torch.equal(reset[k], trained[k]) for k in trained)  # training moved the block: a real reset
    folder = tmp_path / "reset"
    shutil.copytree(adapter, folder)
    save_file(reset, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    eval_tasks = [EvalTask(t.name, t.eval, t.config.answer_format, t.config.resolved_metric) for t in tasks]
    direct = evaluate(effects.load_trained(cfg, folder), effects._tokenizer(cfg), eval_tasks, EvalConfig(16),
                      torch.device("cpu"), progress=False)
    for task in names:
        assert ablation["correct"]["animals"][task] == list(direct[task]["correct"])
    for i, block in enumerate(names):
        for j, task in enumerate(names):
            drop = ablation["scores"]["none"][task] - ablation["scores"][block][task]
            assert ablation["drop"][i][j] == pytest.approx(drop, abs=1e-9)
            lo, hi = ablation["drop_ci"][i][j]
            assert lo - 1e-9 <= ablation["drop"][i][j] <= hi + 1e-9

    rows = json.loads(rows_file.read_text())  # stopped after "animals": "colors" is rescored, the rest is read back
    assert set(rows) == {"none", *names}
    del rows["colors"]
    rows["animals"]["colors"]["score"] = 0.123
    rows_file.write_text(json.dumps(rows))
    resumed = effects.block_ablation(cfg, adapter, tasks, rows_file)
    assert resumed["scores"]["animals"]["colors"] == 0.123
    assert resumed["correct"]["colors"] == ablation["correct"]["colors"]
    assert set(json.loads(rows_file.read_text())) == {"none", *names}


def test_compare_tables_pairs_each_row_across_two_tables_from_their_records(tmp_path: Path, monkeypatch) -> None:
    compare_tables = benchmark_module("compare_tables")
    monkeypatch.setattr(compare_tables.run_records, "RECORDS", tmp_path / "records")
    rng = np.random.default_rng(0)
    tasks, seeds = ["x", "y"], [0, 1, 2]
    correct = {(row, t, s): rng.integers(0, 2, 40 if t == "x" else 60).astype(float)
               for row in ("lora", "lora_single") for t in tasks for s in seeds}

    def table(name: str, shift: float) -> dict[str, Any]:
        """A finished table under runs/<name>; every answer of the lora row `shift`ed; lora_single per task."""
        for s in seeds:
            metrics = {"lora": {t: {"correct": list(correct["lora", t, s] + shift)} for t in tasks}}
            metrics |= {f"lora_single_{t}": {t: {"score": 0.0, "correct": list(correct["lora_single", t, s])}}
                        for t in tasks}
            records = compare_tables.run_records.table_dir(tmp_path / "runs" / name)
            records.mkdir(parents=True, exist_ok=True)
            (records / f"seed{s}.json").write_text(json.dumps({"metrics": metrics}))
        return {"runs": str(tmp_path / "runs" / name), "mixture": tasks, "seeds": seeds, "n_eval": {"x": 40, "y": 60},
                "rows": {"lora": {"lr": 1e-3}, "lora_single": {"lr": 3e-3}}}

    first, second = table("r64", 0.25), table("r16", 0.0)
    rows = compare_tables.compare(first, second)
    assert rows["lora"]["lr_a"] == rows["lora"]["lr_b"] == 1e-3
    for task in [*tasks, "average"]:  # every answer shifted: the difference is exact, whatever the resample
        assert rows["lora"]["diff"][task] == pytest.approx([0.25, 0.25, 0.25])
        assert rows["lora_single"]["diff"][task] == pytest.approx([0.0, 0.0, 0.0])  # read from its per-task runs
    assert "| lora | 0.001 | 0.001 | +25.0 [+25.0, +25.0]" in compare_tables.render(
        {"a": "r64", "b": "r16", "mixture": tasks, "seeds": seeds, "rows": rows})
    with pytest.raises(ValueError, match="same tasks, seeds and evaluation questions"):
        compare_tables.compare(first, second | {"seeds": [0, 1]})
