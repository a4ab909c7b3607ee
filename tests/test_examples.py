"""The README's runnable example keeps working (and keeps its promises)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).parents[1] / "examples" / "quickstart.py"


def test_quickstart_runs_and_its_identities_hold(capsys: pytest.CaptureFixture[str]) -> None:
    runpy.run_path(str(EXAMPLE), run_name="__main__")
    out = capsys.readouterr().out
    gaps = [float(x) for x in re.findall(r"= ([0-9.e+-]+)$", out, flags=re.M)]
    assert len(gaps) == 3, out  # init vs base, stock PEFT reload, merged vs unmerged
    assert all(g < 1e-4 for g in gaps), out
