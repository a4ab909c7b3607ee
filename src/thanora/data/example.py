"""`Example`: one task example in the library's uniform format, whatever source it came from."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Example:
    """One task example in the library's uniform format."""

    prompt: str  # question (plus passage/context where the task has one), no answer
    choices: tuple[str, ...]  # option texts for multiple choice; () for generative tasks
    answer: int | str  # index into choices for MC; reference answer string for generative
    image: str | None = None  # path to an image file for vision-language tasks
    uid: str = ""  # stable id (dataset row id or index)
