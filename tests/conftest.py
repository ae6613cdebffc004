"""Shared fixtures. Every test gets a fresh metrics registry; nothing global leaks."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()
