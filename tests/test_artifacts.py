"""Atomic writes and corrupt-file detection of thanora's artifacts."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from thanora import artifacts
from thanora.artifacts import (
    MARKER,
    ArtifactError,
    artifact_kind,
    atomic_dir,
    atomic_path,
    load_tensors,
    read_json,
    save_tensors,
    write_json,
    write_text,
)


def _entries(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def test_tensor_roundtrip_with_meta(tmp_path: Path) -> None:
    tensors = {"a": torch.randn(3, 4, dtype=torch.float64), "b": torch.arange(6).reshape(2, 3).T}  # b not contiguous
    meta = {"path": Path("x/y"), "shape": (3, 4), "dtype": torch.float32, "n": 5}
    save_tensors(tensors, tmp_path / "t.safetensors", meta)
    loaded, back = load_tensors(tmp_path / "t.safetensors")
    assert set(loaded) == {"a", "b"}
    for key, value in tensors.items():
        assert loaded[key].dtype == value.dtype
        assert torch.equal(loaded[key], value)
    assert back == {"path": "x/y", "shape": [3, 4], "dtype": "float32", "n": 5}
    assert _entries(tmp_path) == {"t.safetensors"}


def test_atomic_path_error_keeps_old_file_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError, match="boom"), atomic_path(target) as tmp:
        tmp.write_text("half-written")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert _entries(tmp_path) == {"f.txt"}


def test_write_json_error_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="not JSON serialisable"):
        write_json(tmp_path / "x.json", {"bad": object()})
    assert _entries(tmp_path) == set()


def test_save_tensors_error_mid_write_leaves_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "t.safetensors"
    save_tensors({"a": torch.zeros(2)}, target, {"v": 1})

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(artifacts, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_tensors({"a": torch.ones(2)}, target, {"v": 2})
    monkeypatch.undo()
    tensors, meta = load_tensors(target)
    assert torch.equal(tensors["a"], torch.zeros(2)) and meta == {"v": 1}
    assert _entries(tmp_path) == {"t.safetensors"}


def test_atomic_dir_replaces_its_own_kind_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out, "adapter") as tmp:
        (tmp / "old.txt").write_text("old")
    assert artifact_kind(out) == "adapter"
    with atomic_dir(out, "adapter") as tmp:
        (tmp / "new.txt").write_text("new")
    assert _entries(out) == {"new.txt", MARKER}
    assert _entries(tmp_path) == {"out"}


def test_atomic_dir_never_replaces_what_thanora_did_not_write(tmp_path: Path) -> None:
    """A user's folder (e.g. --output-dir ~/models) and a thanora folder of another kind are refused before any
    work, and nothing in them changes."""
    home = tmp_path / "models"
    home.mkdir()
    (home / "precious.bin").write_bytes(b"x")
    with pytest.raises(ArtifactError, match=r"files thanora did not write.*nothing was changed"), \
            atomic_dir(home, "merged"):
        pytest.fail("the body must not run")
    assert _entries(home) == {"precious.bin"}
    with atomic_dir(tmp_path / "a", "adapter"):
        pass
    with pytest.raises(ArtifactError, match="thanora adapter folder"), atomic_dir(tmp_path / "a", "merged"):
        pytest.fail("the body must not run")
    (tmp_path / "file").write_text("f")
    with pytest.raises(ArtifactError, match="not a folder"), atomic_dir(tmp_path / "file", "adapter"):
        pytest.fail("the body must not run")
    (tmp_path / "empty").mkdir()
    with atomic_dir(tmp_path / "empty", "merged") as tmp:  # an empty folder holds nothing to lose
        (tmp / "w").write_text("w")
    assert artifact_kind(tmp_path / "empty") == "merged"


def test_a_forged_or_broken_marker_proves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / MARKER).write_text('{"format": "other", "kind": "adapter"}')
    assert artifact_kind(folder) is None
    (folder / MARKER).write_text("{broken")
    assert artifact_kind(folder) is None
    (folder / MARKER).unlink()
    (folder / "thanora_adapter.json").write_text("{}")  # written by thanora before the marker existed
    assert artifact_kind(folder) == "adapter"


def test_atomic_dir_error_keeps_old_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with atomic_dir(out, "adapter") as tmp:
        (tmp / "keep.txt").write_text("keep")
    with pytest.raises(ValueError, match="fail"), atomic_dir(out, "adapter") as tmp:
        (tmp / "new.txt").write_text("new")
        raise ValueError("fail")
    assert _entries(out) == {"keep.txt", MARKER}
    assert _entries(tmp_path) == {"out"}


def test_artifacts_keep_the_users_umask(tmp_path: Path) -> None:
    """tempfile alone makes 0600 files and 0700 folders, unreadable to colleagues on a shared machine."""
    import os

    old = os.umask(0o022)
    try:
        write_text(tmp_path / "f.txt", "x")
        with atomic_dir(tmp_path / "d", "adapter") as tmp:
            (tmp / "inside.txt").write_text("y")
        assert (tmp_path / "f.txt").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        write_text(tmp_path / "private.txt", "x")
        assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


@pytest.mark.parametrize("damage", ["truncate", "garble_header", "garbage"])
def test_corrupt_safetensors_raises_value_error(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "t.safetensors"
    save_tensors({"a": torch.randn(16, 16)}, path, {"v": 1})
    raw = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "garble_header":
        path.write_bytes(raw[:8] + b"\x00{not json" + raw[18:])
    else:
        path.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(ValueError, match="corrupt"):
        load_tensors(path)


def test_foreign_safetensors_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "foreign.safetensors"
    save_file({"a": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not written by thanora"):
        load_tensors(path)


def test_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.safetensors"):
        load_tensors(tmp_path / "missing.safetensors")


def test_json_roundtrip_and_corrupt_json(tmp_path: Path) -> None:
    path = tmp_path / "d.json"
    write_json(path, {"a": (1, 2), "b": {"c": Path("p")}})
    assert read_json(path) == {"a": [1, 2], "b": {"c": "p"}}
    path.write_text('{"a": [1, 2', encoding="utf-8")
    with pytest.raises(ValueError, match="corrupt"):
        read_json(path)
