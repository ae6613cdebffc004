"""Starts coverage in every Python process of the mutation map run (scripts/mutation --map):
the pytest process and each sidecar it spawns. Only on PYTHONPATH during that run."""

import os

if os.environ.get("COVERAGE_PROCESS_START"):
    import coverage

    coverage.process_startup()
