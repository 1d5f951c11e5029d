"""Regenerate tests/golden/losses.json: run every golden case on the tiny test model, write its figures.

    python scripts/make_golden_losses.py [CASE ...]

Run it only when a change is meant to change the numbers, and say why in the commit: the golden-loss
test exists to catch every change that is not.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corral.atomic import atomic_write_text  # noqa: E402
from tests.conftest import build_model, build_tokenizer  # noqa: E402
from tests.golden.cases import CASES, figures  # noqa: E402

GOLDEN = ROOT / "tests" / "golden" / "losses.json"


def main(names: list[str]) -> None:
    import os

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    unknown = set(names) - CASES.keys()
    if unknown:
        raise SystemExit(f"unknown case(s) {sorted(unknown)}; known: {sorted(CASES)}")
    golden = json.loads(GOLDEN.read_text()) if GOLDEN.is_file() else {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "tiny-llama"
        tokenizer = build_tokenizer()
        build_model(len(tokenizer)).save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        for name in names or list(CASES):
            golden[name] = figures(name, CASES[name](model_dir, Path(tmp) / name))
            print(name, json.dumps(golden[name]))
    atomic_write_text(GOLDEN, json.dumps(dict(sorted(golden.items())), indent=1) + "\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    main(sys.argv[1:])
