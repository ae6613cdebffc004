"""The ops app on the pod IP: `/metrics`, `/healthz`, `/readyz`.

Kubelet and Prometheus reach the pod IP, not loopback, so this listener is separate
from signing and exposes nothing that could mint a token.
"""

from __future__ import annotations

import math

from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.aiohttp import make_aiohttp_handler

from .state import SecretStore


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


def create_ops_app(store: SecretStore, registry: CollectorRegistry) -> web.Application:
    """Metrics and probes; product ids and versions only, never a secret."""

    async def healthz(_request: web.Request) -> web.Response:
        # Alive as long as the event loop answers; Vault trouble is readiness, not liveness.
        return web.json_response({"status": "ok"})

    async def readyz(_request: web.Request) -> web.Response:
        ready, body = _readiness(store)
        if store.shutting_down:
            body["status"] = "shutting_down"
        return web.json_response(body, status=200 if ready else 503)

    app = web.Application()
    app.router.add_get("/metrics", make_aiohttp_handler(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app
