"""The shape of sidecar/: who may import whom, and how long a module may grow.

The import contracts are `[tool.importlinter]` in pyproject.toml (layers from `__main__`
down to the leaves, independent siblings, no cycle in any package), checked by the
`lint-imports` command next to this Python (.venv/bin). A command, not the function in
process: importlinter's CLI reconfigures logging (disabling every logger that exists) and
prepends the working directory to sys.path.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "sidecar"
MAX_LINES = 450


@pytest.mark.integration
def test_the_import_contracts_hold() -> None:
    result = subprocess.run(
        [Path(sys.executable).parent / "lint-imports", "--no-cache", "--no-logo"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, f"a broken import contract:\n{result.stdout}{result.stderr}"


def lines_of(path: Path) -> int:
    return len(path.read_text().splitlines())


def test_no_module_is_over_450_lines() -> None:
    modules = {str(path.relative_to(PACKAGE)): path for path in PACKAGE.rglob("*.py")}
    long = {name: lines_of(path) for name, path in modules.items() if lines_of(path) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}; split them by job"
