"""The ops app: the metrics exposition is rendered a bounded number of times per second."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from sidecar.listener import Listener
from sidecar.listener_limits import OPS_LIMITS
from sidecar.metrics import Metrics
from sidecar.ops import MetricsCache, create_ops_app
from sidecar.redact import Redacted
from sidecar.signer import TokenSigner
from sidecar.state import SecretStore, Snapshot
from tests.support import TEST_SECRET, FakeClock


def test_renders_fresh_within_the_burst_then_serves_the_last_one(clock: FakeClock) -> None:
    registry = CollectorRegistry()
    hits = Counter("hits", "test counter", registry=registry)
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


def test_by_default_20_renders_a_second_at_most(clock: FakeClock) -> None:
    """As documented: at most 20 renderings a second, in between the last one (< 50 ms old)."""
    cache = MetricsCache(CollectorRegistry(), clock=clock)
    for _ in range(100):
        cache.exposition()
    assert cache.renders == 20  # the burst
    clock.now += 25 / 512  # 48.8 ms later: not yet a twentieth of a second
    cache.exposition()
    assert cache.renders == 20
    clock.now += 1 / 512  # 50.8 ms later
    cache.exposition()
    assert cache.renders == 21


async def test_readyz_tells_each_products_state(aiohttp_client: Any, clock: FakeClock) -> None:
    store = SecretStore(["a", "b"], max_staleness=60.0, monotonic=clock)
    client = await aiohttp_client(create_ops_app(store, CollectorRegistry()))

    async def readyz() -> tuple[int, object]:
        response = await client.get("/readyz")
        return response.status, await response.json()

    def snapshot(version: int) -> Snapshot:
        return Snapshot(TokenSigner("p", Redacted(TEST_SECRET)), version, 0.0)

    def product(loaded: bool, usable: bool, version: int | None, age: float | None) -> object:
        return {"loaded": loaded, "usable": usable, "version": version, "secondsSinceRefresh": age}

    never = product(False, False, None, None)
    assert await readyz() == (503, {"status": "not_ready", "products": {"a": never, "b": never}})
    store.replace("a", snapshot(7))
    clock.now += 1.23456  # seconds since the refresh, in milliseconds
    a = product(True, True, 7, 1.235)
    assert await readyz() == (503, {"status": "not_ready", "products": {"a": a, "b": never}})
    store.replace("b", snapshot(2))
    b = product(True, True, 2, 0.0)
    assert await readyz() == (200, {"status": "ready", "products": {"a": a, "b": b}})
    clock.now += 60.5  # both older than max_staleness: still loaded, no longer usable
    a, b = product(True, False, 7, 61.735), product(True, False, 2, 60.5)
    assert await readyz() == (503, {"status": "not_ready", "products": {"a": a, "b": b}})
    store.confirm("a")
    store.confirm("b")
    a, b = product(True, True, 7, 0.0), product(True, True, 2, 0.0)
    assert await readyz() == (200, {"status": "ready", "products": {"a": a, "b": b}})
    store.shutting_down = True
    assert await readyz() == (503, {"status": "shutting_down", "products": {"a": a, "b": b}})


async def test_metrics_endpoint_serves_the_exposition(aiohttp_client: Any) -> None:
    registry = CollectorRegistry()
    Counter("hits", "test counter", registry=registry).inc()
    client = await aiohttp_client(create_ops_app(SecretStore(["default"]), registry))
    response = await client.get("/metrics")
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    assert "hits_total 1.0" in await response.text()


async def test_a_handler_bug_is_a_json_500_and_logged_without_the_request(
    caplog: Any,
) -> None:
    """What aiohttp would answer in text, with the traceback quoting nothing of the caller's."""

    async def broken(_request: web.Request) -> web.Response:
        raise RuntimeError("bug")

    app = web.Application()
    app.router.add_get("/broken", broken)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = Listener("ops", runner, OPS_LIMITS, Metrics(CollectorRegistry(), [], "test"))
    await listener.start_tcp(("127.0.0.1", 0))
    host, port = listener.address.removeprefix("http://").split(":")
    try:
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /broken?user=u-secret-99 HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await listener.stop_accepting()
        await runner.cleanup()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split(b" ", 2)[1] == b"500"
    assert json.loads(body)["error"]["code"] == "internal"
    records = [r for r in caplog.records if r.getMessage() == "request handler failed"]
    assert len(records) == 1
    assert "u-secret-99" not in caplog.text
