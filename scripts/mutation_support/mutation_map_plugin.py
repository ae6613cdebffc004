"""pytest plugin of the mutation map run: which test reached which line, and how long it took.

In the pytest process the coverage context is switched to the test's id; a process the test
spawns starts with MUTATION_CONTEXT="proc:<id>" in its environment, which the coverage
configuration takes as its static context. Durations go to MUTATION_DURATIONS (JSON)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import coverage
import pytest

_durations: dict[str, float] = {}
_failed: set[str] = set()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item) -> Iterator[None]:
    cov = coverage.Coverage.current()
    os.environ["MUTATION_CONTEXT"] = f"proc:{item.nodeid}"
    if cov is not None:
        cov.switch_context(item.nodeid)
    yield
    if cov is not None:
        cov.switch_context("")
    os.environ["MUTATION_CONTEXT"] = ""


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    _durations[report.nodeid] = _durations.get(report.nodeid, 0.0) + report.duration
    if report.failed or (report.when == "call" and report.skipped):
        _failed.add(report.nodeid)


def pytest_sessionfinish() -> None:
    out = os.environ.get("MUTATION_DURATIONS")
    if out:
        passed = {k: v for k, v in _durations.items() if k not in _failed}
        Path(out).write_text(json.dumps({"passed": passed, "failed": sorted(_failed)}))
