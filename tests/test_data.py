"""Tests for thanora.data.tasks: task configs, seeded splits, features and the mixture sampler."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from thanora.data.mixture import MixtureSampler
from thanora.data.tasks import DataConfig, TaskConfig, build_task


def _jsonl(path: Path, n: int) -> str:
    rows = [{"prompt": f"q{i}", "choices": ["a", "b"], "answer": i % 2} for i in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return f"jsonl:{path}"


def test_task_config_validation_names_the_field() -> None:
    with pytest.raises(ValueError, match="name"):
        TaskConfig(name="bad name", source="csqa")
    with pytest.raises(ValueError, match="answer_format"):
        TaskConfig(name="t", source="csqa", answer_format="mcq")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_calibration"):
        TaskConfig(name="t", source="csqa", n_train=10, n_calibration=20)
    with pytest.raises(ValueError, match="n_eval"):
        TaskConfig(name="t", source="csqa", n_eval=0)
    assert TaskConfig(name="t", source="gsm8k", answer_format="generative").resolved_metric == "exact_match"


def test_build_task_is_seeded_disjoint_and_calibration_in_train(tmp_path: Path) -> None:
    source = _jsonl(tmp_path / "t.jsonl", 50)
    cfg = TaskConfig(name="t", source=source, n_train=20, n_eval=10, n_calibration=5)
    a, b, c = build_task(cfg, 0), build_task(cfg, 0), build_task(cfg, 1)
    assert [e.prompt for e in a.train] == [e.prompt for e in b.train]
    assert [e.prompt for e in a.train] != [e.prompt for e in c.train]
    assert not {e.prompt for e in a.train} & {e.prompt for e in a.eval}
    assert {e.prompt for e in a.calibration} <= {e.prompt for e in a.train}
    assert a.fingerprint == b.fingerprint and a.fingerprint["sizes"] == {"train": 20, "eval": 10, "calibration": 5}


def test_build_task_too_small_names_task(tmp_path: Path) -> None:
    cfg = TaskConfig(name="small", source=_jsonl(tmp_path / "t.jsonl", 10), n_train=8, n_eval=5, n_calibration=2)
    with pytest.raises(ValueError, match=r"tasks\[small\]"):
        build_task(cfg, 0)


def test_proportional_sampler_visits_every_example_once_per_epoch() -> None:
    sampler = MixtureSampler([7, 3], batch_size=4, data=DataConfig(), seed=0)
    batches = sampler.batches(0)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(10)) and len(batches) == len(sampler) == 3
    assert sampler.batches(0) == batches and sampler.batches(1) != batches


def test_uniform_and_temperature_sampling_follow_their_probabilities() -> None:
    sizes = [900, 100]
    uniform = MixtureSampler(sizes, 10, DataConfig(sampling="uniform"), seed=0)
    assert uniform.probabilities() == pytest.approx([0.5, 0.5])
    counts = Counter(0 if i < 900 else 1 for b in uniform.batches(0) for i in b)
    assert abs(counts[0] / 1000 - 0.5) < 0.05
    temp = MixtureSampler(sizes, 10, DataConfig(sampling="temperature", sampling_temperature=2.0), seed=0)
    expected = [900**0.5 / (900**0.5 + 100**0.5), 100**0.5 / (900**0.5 + 100**0.5)]
    assert temp.probabilities() == pytest.approx(expected)
    counts = Counter(0 if i < 900 else 1 for b in temp.batches(0) for i in b)
    assert abs(counts[0] / 1000 - expected[0]) < 0.05


def test_stratified_batches_hold_every_task() -> None:
    sampler = MixtureSampler([20, 5, 9], batch_size=6, data=DataConfig(stratified=True), seed=3)
    offsets = [0, 20, 25, 34]
    for batch in sampler.batches(0):
        tasks = {next(t for t in range(3) if offsets[t] <= i < offsets[t + 1]) for i in batch}
        assert tasks == {0, 1, 2} and len(batch) == 6
    with pytest.raises(ValueError, match="batch_size"):
        MixtureSampler([5, 5, 5], batch_size=2, data=DataConfig(stratified=True), seed=0)


def _lengths(n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(5, 200) for _ in range(n)]


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)


@pytest.mark.parametrize("sampling", ["proportional", "uniform", "temperature"])
def test_length_grouping_keeps_the_epochs_samples_and_cuts_padding(sampling: str) -> None:
    sizes, lengths = [300, 120], _lengths(420)
    plain = MixtureSampler(sizes, 8, DataConfig(sampling=sampling), seed=1)
    grouped = MixtureSampler(sizes, 8, DataConfig(sampling=sampling, group_by_length=True, length_window=64), seed=1,
                             lengths=lengths)
    for epoch in (0, 1):
        a, b = plain.batches(epoch), grouped.batches(epoch)
        assert Counter(i for x in a for i in x) == Counter(i for x in b for i in x)  # the same draws, each as often
        assert len(b) == len(a) == len(grouped) and sum(len(x) < 8 for x in b) <= 1  # one partial batch at most
        assert _padding(b, lengths) < 0.35 * _padding(a, lengths)
        assert grouped.batches(epoch) == b  # seeded: a resumed run sees the same batches
    assert grouped.batches(0) != grouped.batches(1)


def test_length_grouping_keeps_stratified_shares() -> None:
    sizes, lengths = [60, 25, 40], _lengths(125, seed=2)
    offsets = [0, 60, 85, 125]

    def shares(batches: list[list[int]]) -> list[Counter]:
        return [Counter(next(t for t in range(3) if offsets[t] <= i < offsets[t + 1]) for i in b) for b in batches]

    plain = MixtureSampler(sizes, 6, DataConfig(stratified=True), seed=4)
    grouped = MixtureSampler(sizes, 6, DataConfig(stratified=True, group_by_length=True, length_window=36), seed=4,
                             lengths=lengths)
    a, b = plain.batches(0), grouped.batches(0)
    assert sorted(map(sorted, (c.items() for c in shares(a)))) == sorted(map(sorted, (c.items() for c in shares(b))))
    assert all(set(c) == {0, 1, 2} for c in shares(b))
    assert Counter(i for x in a for i in x) == Counter(i for x in b for i in x)
    assert _padding(b, lengths) < _padding(a, lengths)


def test_grouping_without_lengths_is_refused_and_off_keeps_the_old_order() -> None:
    with pytest.raises(ValueError, match="length of every training feature"):
        MixtureSampler([4, 4], 2, DataConfig(group_by_length=True), seed=0)
    # off (the default): exactly the batches the sampler made before the option existed (printed by that version)
    assert MixtureSampler([7, 3], 4, DataConfig(), seed=0, lengths=[1] * 10).batches(0) == \
        [[7, 8, 1, 5], [3, 4, 2, 0], [9, 6]]
    assert MixtureSampler([7, 3], 4, DataConfig(sampling="uniform"), seed=2).batches(1) == \
        [[9, 7, 6, 8], [8, 7, 9, 8], [2, 7]]
    assert MixtureSampler([5, 4], 3, DataConfig(stratified=True), seed=1).batches(0) == \
        [[3, 0, 6], [2, 1, 5], [4, 7, 8]]


def test_data_config_validation() -> None:
    with pytest.raises(ValueError, match="sampling"):
        DataConfig(sampling="random")  # type: ignore[arg-type]
