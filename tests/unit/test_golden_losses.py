"""Golden losses: the first steps of every training recipe on the tiny model, pinned to 1e-5.

A change that moves any figure fails here; if the change is meant to, regenerate with
`python scripts/make_golden_losses.py CASE` and say why in the commit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.golden.cases import CASES, figures

GOLDEN = json.loads((Path(__file__).resolve().parents[1] / "golden" / "losses.json").read_text())


@pytest.mark.parametrize("case", sorted(CASES))
def test_recipe_reproduces_its_golden_figures(case, tiny_model_dir, tmp_path):
    got = figures(case, CASES[case](tiny_model_dir, tmp_path / case))
    want = GOLDEN[case]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    for mine, theirs in zip(got, want):
        assert mine.keys() == theirs.keys(), mine["step"]
        for key, value in theirs.items():
            assert mine[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (case, mine["step"], key)
