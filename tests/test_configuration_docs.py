"""docs/configuration.md is generated from the settings table (sidecar/config/table.py) and
must be what `python -m sidecar.config.docs` prints today; the table covers every variable
the README documents, and every default it states is one its parser accepts."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sidecar.config.docs import COMMAND, render
from sidecar.config.table import GROUPS, SETTINGS, Setting

ROOT = Path(__file__).resolve().parent.parent
REFERENCE = ROOT / "docs" / "configuration.md"


def test_the_reference_is_current() -> None:
    assert REFERENCE.read_text() == render(), (
        f"docs/configuration.md is stale: run `{COMMAND}` (after editing "
        "sidecar/config/table.py, never the file itself)"
    )


@pytest.mark.integration
def test_the_command_prints_the_reference() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "sidecar.config.docs"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout == render()


def readme_variables() -> set[str]:
    """The first column of the README's configuration tables, and the Vault variables it
    names in its prose."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([A-Z_]+)`", line.split(" | ")[0]))
        elif line.startswith("Vault's own variables"):
            names |= set(re.findall(r"`(VAULT_[A-Z_]+)`", line))
    return names


def test_the_table_covers_every_variable_the_readme_documents() -> None:
    names = {setting.name for setting in SETTINGS}
    missing = readme_variables() - names
    assert not missing, f"documented in README.md but not in sidecar/config/table.py: {missing}"


def test_each_name_once_in_a_known_group() -> None:
    names = [setting.name for setting in SETTINGS]
    assert len(names) == len(set(names))
    groups = {group for group, _, _ in GROUPS}
    assert {setting.group for setting in SETTINGS} <= groups


@pytest.mark.parametrize(
    "setting", [s for s in SETTINGS if s.default is not None], ids=lambda s: s.name
)
def test_a_stated_default_is_one_its_parser_accepts(setting: Setting) -> None:
    setting.parse(setting.default, setting.name)
