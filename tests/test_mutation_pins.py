"""scripts/mutation_support/pins.toml stays true: each pinned line is still in its module and
each pinned test still exists, so a rename does not silently leave a mutant unchecked."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PINS = tomllib.loads((ROOT / "scripts" / "mutation_support" / "pins.toml").read_text())["pin"]


def defined_functions(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        node.name for node in tree.body if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
    }


@pytest.mark.parametrize("pin", PINS, ids=[pin["line"] for pin in PINS])
def test_a_pin_names_a_line_and_tests_that_exist(pin: dict[str, object]) -> None:
    module, _, text = str(pin["line"]).partition(" | ")
    lines = {line.strip() for line in (ROOT / module).read_text().splitlines()}
    assert text in lines, f"{module} no longer has the line {text!r}"
    assert pin["tests"]
    assert pin["why"]
    for test in pin["tests"]:  # type: ignore[attr-defined]
        path, _, name = str(test).partition("::")
        assert name in defined_functions(ROOT / path), f"{test} does not exist"
