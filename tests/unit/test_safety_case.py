"""docs/safety.md names, for each hazard, the tests that show its controls work. This keeps the
table true: every ``file::name`` it names must be a test function defined in that file."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SAFETY = ROOT / "docs" / "safety.md"
NAMED = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def named_tests() -> list[tuple[str, str]]:
    return NAMED.findall(SAFETY.read_text())


def defined_tests(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        and node.name.startswith("test_")
    }


def test_every_test_the_safety_case_names_exists() -> None:
    """Each named test is defined in the named file; a renamed or deleted test fails here."""
    named = named_tests()
    missing = [
        f"{file}::{name}"
        for file, name in named
        if not (ROOT / file).is_file() or name not in defined_tests(ROOT / file)
    ]
    assert missing == []


def test_the_check_reads_the_table_and_would_catch_a_missing_test() -> None:
    """Positive control: the table names tests for every hazard H1-H9, and a name that does
    not exist is found missing by the same lookup."""
    sections = re.split(r"^## (H\d+)\.", SAFETY.read_text(), flags=re.MULTILINE)
    hazards = dict(zip(sections[1::2], sections[2::2], strict=True))
    assert sorted(hazards, key=lambda h: int(h[1:])) == [f"H{n}" for n in range(1, 10)]
    for hazard, body in hazards.items():
        assert NAMED.search(body), f"{hazard} names no test"
    fever = ROOT / "tests/unit/test_fever_rule.py"
    assert "test_single_reading_at_threshold_pages" in defined_tests(fever)
    assert "test_no_such_control" not in defined_tests(fever)
