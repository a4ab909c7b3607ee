"""Users' own data files: ``jsonl:<path>`` and ``csv:<path>`` sources in the documented schema.

``prompt`` (required), ``choices`` (optional: a JSON list, or for CSV a JSON list or a ``|``-separated string),
``answer`` (required: the index into ``choices``, or the text of one choice, or the reference string when there are
no choices), optional ``image`` (relative paths are resolved against the file's folder) and optional ``uid``/``id``.
Every problem is one line naming the file, the line and the field: a file that is not UTF-8, a line that is not a
JSON object, a CSV row with more cells than its header, a missing field, an answer that is not one of the choices,
repeated choices.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from thanora.data.example import Example

Row = Mapping[str, Any]


def _parse_choices(value: Any, where: str) -> tuple[str, ...]:
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{where}: field 'choices' is not a valid JSON list: {err}") from err
        else:
            return tuple(part.strip() for part in text.split("|"))
    if not isinstance(value, (list, tuple)):
        raise ValueError(f"{where}: field 'choices' must be a list of strings, got {type(value).__name__}")
    return tuple(str(c) for c in value)


def _parse_answer(value: Any, choices: tuple[str, ...], where: str) -> int | str:
    if not choices:
        return str(value)
    if isinstance(value, bool):
        raise ValueError(f"{where}: field 'answer' must be a choice index or choice text, got a bool")
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value.strip())
    if isinstance(value, str):
        if value in choices:
            return choices.index(value)
        raise ValueError(f"{where}: field 'answer' {value!r} is neither an index nor one of the choices {choices}")
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or not 0 <= value < len(choices):
        raise ValueError(f"{where}: field 'answer' {value!r} is out of range for {len(choices)} choices")
    return value


def record_to_example(row: Row, i: int, where: str = "record", base_dir: Path | None = None,
                      line: int | None = None) -> Example:
    """Convert a record in the documented schema (``prompt``, ``choices``, ``answer``, ``image``, ``uid``).

    Args:
        row: The record.
        i: Its index, used as uid when the record has none.
        where: Description of the record's origin for error messages.
        base_dir: Folder against which relative image paths are resolved.
        line: The record's line in its file, for error messages (else its index is named).

    Returns:
        The example.

    Raises:
        ValueError: Naming the missing or malformed field.
    """
    where = f"{where}: line {line}" if line is not None else f"{where}: row {i}"
    for field in ("prompt", "answer"):
        if field not in row or row[field] is None or (field == "prompt" and str(row[field]).strip() == ""):
            raise ValueError(f"{where}: missing required field {field!r} (schema: prompt, choices?, answer, image?)")
    choices = _parse_choices(row.get("choices"), where)
    repeated = sorted({c for c in choices if choices.count(c) > 1})
    if repeated:
        raise ValueError(f"{where}: field 'choices' repeats {repeated}; each option must be distinct")
    image = row.get("image") or None
    if image is not None and base_dir is not None and not Path(str(image)).is_absolute():
        image = str(base_dir / str(image))
    uid = row.get("uid") or row.get("id")
    return Example(
        prompt=str(row["prompt"]),
        choices=choices,
        answer=_parse_answer(row["answer"], choices, where),
        image=None if image is None else str(image),
        uid=str(uid) if uid not in (None, "") else str(i),
    )


def load_file(kind: str, path: str) -> list[Example]:
    """Read a ``jsonl:`` / ``csv:`` file in the documented schema; every problem names the file and the line."""
    if not path.strip():
        raise ValueError(f"source {kind}: names no file; write {kind}:<path>")
    file = Path(path).expanduser()
    if not file.exists():
        raise FileNotFoundError(f"{kind}: file not found: {file}")
    if not file.is_file():
        raise ValueError(f"{kind}:{path} is a folder, not a {kind.upper()} file")
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        line = file.read_bytes()[: err.start].count(b"\n") + 1
        raise ValueError(f"{file}: line {line} is not UTF-8 ({err.reason}); save the file as UTF-8") from None
    rows: list[Row] = []
    lines: list[int] = []
    if kind == "csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames:
            raise ValueError(f"{file}: no header row; the first line must name the columns (prompt, choices, answer)")
        for row in reader:
            if None in row:  # more cells than header names
                raise ValueError(f"{file}: line {reader.line_num} has more cells than the header "
                                 f"{reader.fieldnames}; quote cells that hold commas")
            rows.append(row)
            lines.append(reader.line_num)
    else:
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{file}: line {n} is not valid JSON ({err.msg}); write one JSON object per "
                                 "line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{file}: line {n} is a JSON {type(row).__name__}, not an object with prompt, "
                                 "choices and answer")
            rows.append(row)
            lines.append(n)
    pairs = enumerate(zip(rows, lines, strict=True))
    return [record_to_example(row, i, str(file), file.parent, line) for i, (row, line) in pairs]
