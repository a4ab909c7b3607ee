"""Tests for thanora.evaluation.metrics (pure functions; hand-checked values and seeded statistics)."""

from __future__ import annotations

import numpy as np
import pytest

from thanora.evaluation.metrics import (
    accuracy,
    anls,
    exact_match,
    extract_final_answer,
    letter_from_generation,
    levenshtein,
    mean_and_stderr,
    normalize_text,
    paired_bootstrap,
    relaxed_accuracy,
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "72"),
        ("#### 1,000", "1000"),
        ("#### $18.00 in total", "18"),  # first number after '####', '$' and decimals of zero dropped
        ("She has 3 apples, then 5 more, so 8.", "8"),  # no '####': the last number, trailing '.' dropped
        ("It costs $1,018.50.", "1018.5"),
        ("The temperature fell to -4 degrees", "-4"),
        ("half is .5", "0.5"),
        ("no digits here", ""),
        ("#### none", ""),
    ],
)
def test_extract_final_answer(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


def test_exact_match() -> None:
    assert exact_match("So the answer is 18.", "18") == 1.0
    assert exact_match("#### 18", "18.0") == 1.0
    assert exact_match("Total: $1,000", "1000") == 1.0
    assert exact_match("17 then 18", "17") == 0.0  # last number counts
    assert exact_match("Blue.", "blue") == 1.0  # text reference: normalised string comparison
    assert exact_match("light blue", "blue") == 0.0
    assert exact_match("42", ["41", "42"]) == 1.0
    with pytest.raises(ValueError, match="reference"):
        exact_match("1", [])


def test_relaxed_accuracy_edge_cases() -> None:
    assert relaxed_accuracy("10.4", "10") == 1.0  # 4 % off
    assert relaxed_accuracy("10.6", "10") == 0.0  # 6 % off
    assert relaxed_accuracy("105", "100") == 1.0  # exactly 5 %: within
    assert relaxed_accuracy("-9.6", "-10") == 1.0
    assert relaxed_accuracy("5%", "0.05") == 1.0  # a percentage is a fraction
    assert relaxed_accuracy("1,000", "1000") == 1.0 and relaxed_accuracy("$12.", "12") == 1.0
    assert relaxed_accuracy("0", "0") == 1.0  # reference 0: string comparison (ChartQA reference behaviour)
    assert relaxed_accuracy("0.01", "0") == 0.0
    assert relaxed_accuracy(" Yes ", "yes") == 1.0 and relaxed_accuracy("no", "yes") == 0.0
    assert relaxed_accuracy("12", ["Germany", "12.3"]) == 1.0


def test_levenshtein() -> None:
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == levenshtein("abc", "") == 3
    assert levenshtein("flaw", "lawn") == levenshtein("lawn", "flaw") == 2
    assert levenshtein("same", "same") == 0


def test_anls_definition() -> None:
    # ANLS (Biten et al., ICDAR 2019; DocVQA): 1 - NL if NL < 0.5 else 0, NL = lev / max length, best reference.
    assert anls("Sunrise", "sunrise") == 1.0  # case-insensitive
    assert anls("  the   cat ", "The cat") == 1.0  # whitespace collapsed
    assert anls("sunrse", "sunrise") == pytest.approx(1 - 1 / 7)
    assert anls("abd", "abc") == pytest.approx(2 / 3)
    assert anls("ab", "ac") == 0.0  # NL = 0.5 is not below the threshold
    assert anls("abcd", "abxy") == 0.0
    assert anls("sunrse", ["xyz", "sunrise", "sunset"]) == pytest.approx(1 - 1 / 7)
    assert anls("", "") == 1.0 and anls("", "abc") == 0.0
    assert anls("ab", "ac", threshold=0.6) == 0.5


def test_letter_from_generation() -> None:
    assert letter_from_generation("B", 4) == "B"
    assert letter_from_generation(" (C).", 4) == "C"
    assert letter_from_generation("Answer: D\nQuestion: A", 4) == "D"
    assert letter_from_generation("The answer is B.", 5) == "B"
    assert letter_from_generation("Bank", 4) is None  # inside a word
    assert letter_from_generation("E", 4) is None  # only the first n_choices letters
    assert letter_from_generation("a b", 4) is None  # capitals only
    assert letter_from_generation("M", 13) == "M"
    with pytest.raises(ValueError, match="n_choices"):
        letter_from_generation("A", 0)


def test_accuracy_and_normalize() -> None:
    assert accuracy([1, 2, 3], [1, 0, 3]) == pytest.approx(2 / 3)
    assert accuracy(["A"], ["A"]) == 1.0
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])
    with pytest.raises(ValueError):
        accuracy([], [])
    assert normalize_text("  The  Cat. ") == "the cat"


def test_mean_and_stderr() -> None:
    mean, stderr = mean_and_stderr([0, 1, 1, 0])
    assert mean == 0.5 and stderr == pytest.approx(np.std([0, 1, 1, 0], ddof=1) / 2)
    assert mean_and_stderr([0.3]) == (0.3, 0.0)
    with pytest.raises(ValueError):
        mean_and_stderr([])


def test_paired_bootstrap_is_seeded_and_covers_the_truth() -> None:
    rng = np.random.default_rng(1)
    a = (rng.random(2000) < 0.7).astype(float)
    b = (rng.random(2000) < 0.5).astype(float)
    diff, lo, hi = paired_bootstrap(a, b, seed=3)
    assert diff == pytest.approx(a.mean() - b.mean())
    assert lo < diff < hi and lo < 0.2 < hi  # true difference 0.7 - 0.5
    assert paired_bootstrap(a, b, seed=3) == (diff, lo, hi)  # deterministic
    assert paired_bootstrap(a, b, seed=4) != (diff, lo, hi)
    assert paired_bootstrap(a, a) == (0.0, 0.0, 0.0)
    # coverage of the 95 % interval over repeated seeded experiments (true difference 0.1)
    hits = 0
    for trial in range(200):
        r = np.random.default_rng(100 + trial)
        x, y = (r.random(300) < 0.6).astype(float), (r.random(300) < 0.5).astype(float)
        _, lo, hi = paired_bootstrap(x, y, n_boot=500, seed=trial)
        hits += lo <= 0.1 <= hi
    assert 0.88 <= hits / 200 <= 0.99
    with pytest.raises(ValueError, match="aligned"):
        paired_bootstrap([1, 0], [1])
    with pytest.raises(ValueError, match="n_boot"):
        paired_bootstrap([1], [0], n_boot=0)
