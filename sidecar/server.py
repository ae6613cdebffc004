"""Wires the pieces together and runs them until SIGTERM/SIGINT.

source -> refresher -> store -> signer -> api; the ops app reads the store and registry.
Shutdown order: refuse new connections, let in-flight requests finish, then stop the
refresher and the Vault session, then the ops listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import stat
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from . import __version__
from .api import TOKEN_HANDLER, TokenHandler, create_api_app
from .config import Settings
from .metrics import Metrics
from .ops import create_ops_app
from .refresher import Refresher
from .sources.factory import build_sources
from .state import SecretStore

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get after SIGTERM
# A signing connection that sends no complete request head for this long (idle keep-alive,
# or stalled half-way through its headers, slowloris-style) is closed; bodies have their
# own timeout (api.BODY_TIMEOUT). aiohttp's default would keep them for an hour.
IDLE_TIMEOUT = 10.0
# After an early answer (413, 408) aiohttp reads and drops the rest of the body for this
# long, so the client sees the answer rather than a reset; its 10 s default would let a
# stalled client hold the connection that much longer.
LINGER = 2.0
SOCKET_MODE = 0o660


def _prepare_socket_path(path: Path) -> None:
    """Remove a stale socket left by a previous run; refuse to clobber anything else."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise OSError(f"{path} exists and is not a socket")
    path.unlink()


async def _drain(sites: list[web.BaseSite], handler: TokenHandler, grace: float) -> None:
    """Stop accepting, then wait for requests already in a handler (bodies may still be
    arriving: aiohttp's own shutdown would drop them) before the runner closes connections."""
    for site in sites:
        await site.stop()
    deadline = asyncio.get_running_loop().time() + grace
    # Polling only during shutdown keeps the request path free of event bookkeeping.
    while handler.in_flight and asyncio.get_running_loop().time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    """Run the sidecar; returns the process exit code."""
    stop = stop or asyncio.Event()
    # *_created series would only double the scrape size here.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    names = [product.name for product in settings.products]
    registry = CollectorRegistry()
    metrics = Metrics(registry, names, __version__)
    store = SecretStore(names, max_staleness=settings.max_staleness)
    metrics.track_readiness(store.ready)
    sources = build_sources(settings, metrics)
    refresher = Refresher(
        sources.sources,
        store,
        metrics,
        interval=settings.refresh_interval,
        backoff_max=settings.backoff_max,
        token_ttl=settings.token_ttl,
    )
    api_app = create_api_app(
        store, metrics, require_header=settings.require_header, retry_after=refresher.retry_after
    )
    api_runner = web.AppRunner(
        api_app,
        access_log=None,
        shutdown_timeout=SHUTDOWN_GRACE,
        keepalive_timeout=IDLE_TIMEOUT,
        lingering_time=LINGER,
    )
    ops_runner = web.AppRunner(
        create_ops_app(store, registry), access_log=None, shutdown_timeout=1.0
    )
    await api_runner.setup()
    await ops_runner.setup()
    try:
        api_sites: list[web.BaseSite] = []
        if settings.listen is not None:
            api_sites.append(web.TCPSite(api_runner, settings.listen.host, settings.listen.port))
        if settings.unix_socket is not None:
            _prepare_socket_path(settings.unix_socket)
            api_sites.append(web.UnixSite(api_runner, str(settings.unix_socket)))
        ops_site = web.TCPSite(
            ops_runner, settings.metrics_listen.host, settings.metrics_listen.port
        )
        sites = [*api_sites, ops_site]
        for site in sites:
            await site.start()
        if settings.unix_socket is not None:
            os.chmod(settings.unix_socket, SOCKET_MODE)
    except OSError as exc:
        log.error("cannot listen", extra={"error": str(exc)})
        await api_runner.cleanup()
        await ops_runner.cleanup()
        return 1

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, refresher.refresh_now)
    log.info(
        "reditus-sidecar started",
        extra={
            "address": ", ".join(site.name for site in sites),
            "source": settings.secret_source,
            "version": __version__,
        },
    )
    await sources.start()
    refresher.start()
    try:
        await stop.wait()
    finally:
        log.info("shutting down: finishing in-flight requests")
        store.shutting_down = True
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        await _drain(api_sites, api_app[TOKEN_HANDLER], SHUTDOWN_GRACE)
        await api_runner.cleanup()
        await refresher.stop()
        await sources.close()
        await ops_runner.cleanup()
        if settings.unix_socket is not None:
            with contextlib.suppress(FileNotFoundError):
                settings.unix_socket.unlink()
        log.info("stopped")
    return 0
