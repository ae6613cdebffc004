"""The ops app on the pod IP: `/metrics`, `/healthz`, `/readyz`.

Kubelet and Prometheus reach the pod IP, not loopback, so this listener is separate
from signing and exposes nothing that could mint a token. Anything in the cluster can
reach it too, so its one costly answer, the metrics exposition, is rendered a bounded
number of times per second.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from .state import SecretStore

# Rendering the exposition takes about a millisecond of CPU: a flood of scrapers would
# spend the core on it. Prometheus scrapes every few seconds; more than this many renders
# a second are served the last one (at most 1/RENDERS_PER_SECOND s old).
RENDERS_PER_SECOND = 20.0
RENDER_BURST = 20.0


class MetricsCache:
    """The registry's exposition, rendered at most RENDERS_PER_SECOND times a second
    (token bucket of RENDER_BURST); in between, the last rendering is served."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        rate: float = RENDERS_PER_SECOND,
        burst: float = RENDER_BURST,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._tokens = burst
        self._last = clock()
        self._body: bytes | None = None
        self.renders = 0

    def exposition(self) -> bytes:
        now = self._clock()
        self._tokens = min(self._burst, self._tokens + (now - self._last) * self._rate)
        self._last = now
        if self._body is None or self._tokens >= 1:
            self._tokens = max(0.0, self._tokens - 1)
            self._body = generate_latest(self._registry)
            self.renders += 1
        return self._body


def _readiness(store: SecretStore) -> tuple[bool, dict[str, object]]:
    products: dict[str, object] = {}
    for name in store.products:
        snapshot = store.peek(name)
        age = store.age(name)
        products[name] = {
            "loaded": snapshot is not None,
            "usable": store.current(name) is not None,
            "version": snapshot.version if snapshot else None,
            "secondsSinceRefresh": None if math.isinf(age) else round(age, 3),
        }
    ready = store.ready()
    return ready, {"status": "ready" if ready else "not_ready", "products": products}


def create_ops_app(
    store: SecretStore,
    registry: CollectorRegistry,
    *,
    cache: MetricsCache | None = None,
    audit_stuck: Callable[[], bool] = lambda: False,
) -> web.Application:
    """Metrics and probes; product ids and versions only, never a secret. `audit_stuck`
    says signing cannot release tokens whatever the secrets (an audit failing closed whose
    target hangs)."""
    metrics_cache = cache or MetricsCache(registry)

    async def metrics(_request: web.Request) -> web.Response:
        return web.Response(
            body=metrics_cache.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_request: web.Request) -> web.Response:
        # Alive as long as the event loop answers; Vault trouble is readiness, not liveness.
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, body = _readiness(store)
        if audit_stuck():
            ready, body["status"], body["audit"] = False, "not_ready", "stuck"
        if store.shutting_down:
            body["status"] = "shutting_down"
        return web.json_response(body, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
