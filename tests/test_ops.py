"""The ops app: the metrics exposition is rendered a bounded number of times per second."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter

from sidecar.ops import MetricsCache, create_ops_app
from sidecar.state import SecretStore


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_renders_fresh_within_the_burst_then_serves_the_last_one() -> None:
    registry = CollectorRegistry()
    hits = Counter("hits", "test counter", registry=registry)
    clock = Clock()
    cache = MetricsCache(registry, rate=10.0, burst=3.0, clock=clock)
    for expected in (0, 1, 2):  # the burst: every scrape sees the current value
        assert f"hits_total {expected}.0".encode() in cache.exposition()
        hits.inc()
    assert cache.renders == 3
    flood = [cache.exposition() for _ in range(1000)]  # a flood: no render at all
    assert cache.renders == 3
    assert all(b"hits_total 2.0" in body for body in flood)
    clock.now += 0.15  # one token back after 1/rate seconds
    assert b"hits_total 3.0" in cache.exposition()
    assert cache.renders == 4
    clock.now += 60  # a long pause refills only up to the burst
    for _ in range(10):
        cache.exposition()
    assert cache.renders == 7


async def test_metrics_endpoint_serves_the_exposition(aiohttp_client: Any) -> None:
    registry = CollectorRegistry()
    Counter("hits", "test counter", registry=registry).inc()
    client = await aiohttp_client(create_ops_app(SecretStore(["default"]), registry))
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    assert "hits_total 1.0" in await response.text()
