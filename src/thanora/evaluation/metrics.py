"""Pure scoring functions: per-question metrics, answer extraction, and paired statistics.

Per-question metrics take one prediction and one or more references and return a score in [0, 1]; a task score is
the mean of those. Conventions (PEERS.md, "Evaluation conventions"):

* multiple choice: accuracy (the predicted option index or letter equals the answer);
* GSM8K-style short answers: :func:`exact_match` of the extracted final answer;
* ChartQA-style: :func:`relaxed_accuracy` (numbers within 5 % relative, else exact match after normalisation);
* DocVQA-style: :func:`anls` (normalised Levenshtein similarity, threshold 0.5, best reference).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_LETTER = r"(?<![A-Za-z0-9])([{letters}])(?![A-Za-z0-9])"
ANLS_THRESHOLD = 0.5
RELAXED_TOLERANCE = 0.05
_BOOT_CHUNK = 256

References = str | Sequence[str]


def _as_list(references: References) -> list[str]:
    refs = [references] if isinstance(references, str) else [str(r) for r in references]
    if not refs:
        raise ValueError("at least one reference is needed")
    return refs


def normalize_text(text: str) -> str:
    """Lower-case, trim, collapse whitespace and drop a trailing full stop.

    Args:
        text: Any answer string.

    Returns:
        The normalised string.
    """
    return " ".join(str(text).lower().split()).removesuffix(".").strip()


def _normalize_number(token: str) -> str:
    token = token.replace(",", "").replace("$", "").strip().rstrip(".")
    if "." in token:  # "18.00" -> "18", "2.50" -> "2.5": same value, same string
        token = token.rstrip("0").rstrip(".")
    if token.startswith(("-.", ".")):
        token = token.replace(".", "0.", 1)
    return "0" if token in ("-0", "") else token


def extract_final_answer(text: str) -> str:
    """Extract the final numeric answer of a GSM8K-style solution.

    Takes the first number after the last ``####`` if there is one, else the last number in the text. Commas,
    ``$`` signs, a trailing ``.`` and trailing decimal zeros are removed (``"$1,018.50"`` -> ``"1018.5"``,
    ``"18.0"`` -> ``"18"``).

    Args:
        text: A generated solution or a reference answer.

    Returns:
        The normalised number as a string, or ``""`` when the text holds no number.
    """
    text = str(text).replace("$", "")
    if "####" in text:
        numbers = _NUMBER.findall(text.split("####")[-1])
        return _normalize_number(numbers[0]) if numbers else ""
    numbers = _NUMBER.findall(text)
    return _normalize_number(numbers[-1]) if numbers else ""


def exact_match(prediction: str, references: References) -> float:
    """Exact match of the extracted final answer (GSM8K style).

    A reference that holds a number is compared with :func:`extract_final_answer` of the prediction; a reference
    without a number is compared as text after :func:`normalize_text`.

    Args:
        prediction: Generated text.
        references: One reference answer or several (any one may match).

    Returns:
        1.0 on a match, else 0.0.
    """
    for ref in _as_list(references):
        if _NUMBER.search(ref):
            hit = extract_final_answer(prediction) == extract_final_answer(ref)
        else:
            hit = normalize_text(prediction) == normalize_text(ref)
        if hit:
            return 1.0
    return 0.0


def _to_float(text: str) -> float | None:
    text = text.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        return float(text[:-1]) / 100.0 if text.endswith("%") else float(text)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, references: References) -> float:
    """ChartQA relaxed accuracy: numbers within 5 % relative error, otherwise exact match after normalisation.

    Follows the ChartQA reference (``relaxed_correctness``): a percentage is read as a fraction, and a reference of
    0 (no relative error defined) falls back to the string comparison.

    Args:
        prediction: Predicted answer.
        references: One reference answer or several (the best counts).

    Returns:
        1.0 if correct, else 0.0.
    """
    for ref in _as_list(references):
        pred_value, ref_value = _to_float(prediction), _to_float(ref)
        if pred_value is not None and ref_value:
            hit = abs(pred_value - ref_value) / abs(ref_value) <= RELAXED_TOLERANCE
        else:
            hit = normalize_text(prediction) == normalize_text(ref)
        if hit:
            return 1.0
    return 0.0


def levenshtein(a: str, b: str) -> int:
    """Edit distance (insertions, deletions, substitutions of one character each).

    A two-row dynamic programme, O(len(a) * len(b)) time: answers are short, so this is not worth a compiled
    dependency (``python-Levenshtein``/``rapidfuzz`` are not in the project's dependencies).

    Args:
        a: First string.
        b: Second string.

    Returns:
        The distance.
    """
    if len(a) < len(b):
        a, b = b, a
    previous = list(range(len(b) + 1))
    for i, ca in enumerate(a, start=1):
        current = [i]
        for j, cb in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (ca != cb)))
        previous = current
    return previous[-1]


def anls(prediction: str, references: References, threshold: float = ANLS_THRESHOLD) -> float:
    """Average Normalised Levenshtein Similarity of one answer (DocVQA / ST-VQA, Biten et al. 2019).

    For each reference, NL = levenshtein(p, r) / max(|p|, |r|) on lower-cased, whitespace-collapsed strings; the
    score is 1 - NL when NL < ``threshold``, else 0; the best reference counts.

    Args:
        prediction: Predicted answer.
        references: One reference answer or several.
        threshold: Normalised distance at or above which the score is 0.

    Returns:
        The similarity, in [0, 1].
    """
    pred = " ".join(str(prediction).lower().split())
    best = 0.0
    for ref in _as_list(references):
        ref = " ".join(ref.lower().split())
        longest = max(len(pred), len(ref))
        distance = levenshtein(pred, ref) / longest if longest else 0.0
        best = max(best, 1.0 - distance if distance < threshold else 0.0)
    return best


def letter_from_generation(text: str, n_choices: int) -> str | None:
    """The first standalone option letter (``A``, ``B``, ...; only the first ``n_choices``) in a generation.

    "Standalone" means not inside a word or number: ``"B"``, ``" (C)."`` and ``"Answer: D"`` give a letter,
    ``"Bank"`` does not.

    Args:
        text: Generated text.
        n_choices: Number of options (1 to 26).

    Returns:
        The letter, or ``None`` if there is none.
    """
    if not 1 <= n_choices <= 26:
        raise ValueError(f"n_choices must be in [1, 26], got {n_choices}")
    letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:n_choices]
    match = re.search(_LETTER.format(letters=letters), text)
    return match.group(1) if match else None


def accuracy(predictions: Sequence[object], references: Sequence[object]) -> float:
    """Fraction of predictions equal to their reference.

    Args:
        predictions: Predicted labels (option indices, letters...).
        references: Gold labels, same length.

    Returns:
        The accuracy in [0, 1].
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    if not references:
        raise ValueError("accuracy of an empty set")
    return sum(p == r for p, r in zip(predictions, references, strict=True)) / len(references)


GENERATIVE_METRICS: dict[str, Callable[[str, References], float]] = {
    "exact_match": exact_match,
    "relaxed_accuracy": relaxed_accuracy,
    "anls": anls,
}


def mean_and_stderr(values: Sequence[float]) -> tuple[float, float]:
    """Mean and its standard error (sample standard deviation / sqrt(n)).

    Args:
        values: Per-question scores.

    Returns:
        ``(mean, stderr)``; the stderr is 0.0 for a single value.
    """
    if len(values) == 0:
        raise ValueError("mean of an empty set")
    x = np.asarray(values, dtype=np.float64)
    stderr = float(x.std(ddof=1) / math.sqrt(len(x))) if len(x) > 1 else 0.0
    return float(x.mean()), stderr


def paired_bootstrap(
    correct_a: Sequence[float], correct_b: Sequence[float], n_boot: int = 1000, seed: int = 0
) -> tuple[float, float, float]:
    """Paired bootstrap of the difference in mean score between two systems on the same questions.

    Questions are resampled with replacement (the same indices for both systems) ``n_boot`` times; the interval is
    the 2.5 and 97.5 percentiles of the resampled mean differences.

    Args:
        correct_a: Per-question scores of system A (e.g. 0/1 correctness).
        correct_b: Per-question scores of system B, aligned with ``correct_a``.
        n_boot: Number of bootstrap resamples.
        seed: Seed of the resampling (same seed, same interval).

    Returns:
        ``(mean(a - b), lower 95 % bound, upper 95 % bound)``.
    """
    a = np.asarray(correct_a, dtype=np.float64)
    b = np.asarray(correct_b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) == 0:
        raise ValueError(f"need two non-empty aligned 1-D score lists, got shapes {a.shape} and {b.shape}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    diff = a - b  # (n,)
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    for start in range(0, n_boot, _BOOT_CHUNK):  # bounded memory: (chunk, n) indices at a time
        rows = min(_BOOT_CHUNK, n_boot - start)
        means[start : start + rows] = diff[rng.integers(0, len(diff), size=(rows, len(diff)))].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(diff.mean()), float(lo), float(hi)
