"""Deterministic, seeded train / eval / calibration splits of a source's examples, and their fingerprint for run
metadata (so a result can be traced to the exact questions it used)."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Mapping, Sequence
from typing import Any

from thanora.data.example import Example


def split_examples(examples: Sequence[Example], sizes: Mapping[str, int], seed: int) -> dict[str, list[Example]]:
    """Shuffle deterministically and cut consecutive, disjoint slices.

    Slices are cut in the order of ``sizes`` from one ``random.Random(seed)`` permutation, so the same data, sizes
    and seed always give the same split. The key ``"calibration"`` is special: it is NOT a separate slice but the
    first ``sizes["calibration"]`` examples of the (already shuffled) ``"train"`` slice, because ThanoRA-style
    initialisation previews training instructions; it therefore requires a ``"train"`` entry at least as large.

    Args:
        examples: The examples to split.
        sizes: Slice sizes, e.g. ``{"train": 900, "eval": 300, "calibration": 64}``.
        seed: Shuffle seed.

    Returns:
        ``{name: examples}`` with the keys of ``sizes``; record :func:`split_fingerprint` of it in run metadata.

    Raises:
        ValueError: If a size is negative, the slices need more examples than exist, or calibration exceeds train.
    """
    for key, n in sizes.items():
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise ValueError(f"split size for {key!r} must be a non-negative int, got {n!r}")
    disjoint = {k: n for k, n in sizes.items() if k != "calibration"}
    needed = sum(disjoint.values())
    if needed > len(examples):
        raise ValueError(f"split sizes {dict(disjoint)} need {needed} examples but only {len(examples)} exist")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    out: dict[str, list[Example]] = {}
    start = 0
    for key, n in disjoint.items():
        out[key] = [examples[j] for j in order[start : start + n]]
        start += n
    if "calibration" in sizes:
        n_cal = sizes["calibration"]
        if n_cal > len(out.get("train", [])):
            raise ValueError(
                f"calibration ({n_cal}) is drawn from the train slice, which has {len(out.get('train', []))} examples"
            )
        out["calibration"] = out["train"][:n_cal]
    return {key: out[key] for key in sizes}


def split_fingerprint(splits: Mapping[str, Sequence[Example]], seed: int | None = None) -> dict[str, Any]:
    """Summarise a split for run metadata: seed, sizes and a SHA-256 of each slice's uid order.

    Args:
        splits: Output of :func:`split_examples`.
        seed: The seed used, recorded as is.

    Returns:
        ``{"seed": seed, "sizes": {name: n}, "sha256": {name: hex}}``; each example hashes its uid and prompt.
    """
    digests = {}
    for key, items in splits.items():
        h = hashlib.sha256()
        for ex in items:
            h.update(f"{ex.uid}\t{ex.prompt}".encode() + b"\n")  # content, not only the row index
        digests[key] = h.hexdigest()
    return {"seed": seed, "sizes": {k: len(v) for k, v in splits.items()}, "sha256": digests}
