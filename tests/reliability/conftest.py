"""The reliability suite's tally: every test records how many cases it tried, per category and entry point.

    def test_something(tally):
        for case in cases:
            ...
            tally("bad input", "train (YAML config)")      # one case tried

At the end of the session pytest prints the table (and writes it as JSON to
$MULTILORA_RELIABILITY_JSON when that is set); RELIABILITY.md quotes those figures.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict

import pytest

# category -> entry point -> {"cases": tried, "failures": protection failures seen (must stay 0)}
FIGURES: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: {"cases": 0, "failures": 0}))


def record(category: str, entry: str, cases: int = 1, failures: int = 0) -> None:
    """Add `cases` tried (and `failures` seen) for one entry point of one category."""
    cell = FIGURES[category][entry]
    cell["cases"] += cases
    cell["failures"] += failures


@pytest.fixture
def tally():
    """`tally(category, entry, cases=1, failures=0)`: count cases for the reliability figures."""
    return record


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not FIGURES:
        return
    tr = terminalreporter
    tr.write_sep("-", "reliability figures (cases tried per entry point)")
    for category in sorted(FIGURES):
        for entry, cell in sorted(FIGURES[category].items()):
            tr.write_line(f"{category:<24} {entry:<40} {cell['cases']:>7} cases  {cell['failures']} failures")
    path = os.environ.get("MULTILORA_RELIABILITY_JSON")
    if path:
        with open(path, "w", encoding="utf-8") as f:
            json.dump({c: dict(e) for c, e in FIGURES.items()}, f, indent=2, sort_keys=True)
