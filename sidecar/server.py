"""Wires the pieces together and runs them until SIGTERM/SIGINT.

source -> refresher -> store -> signer -> api (in transit mode, TransitMode stands where
the refresher does: both are the `Freshness` the server drives); the ops app reads the
store and registry. Shutdown order: `/readyz` turns 503 at once; after the optional
shutdown delay (signing goes on), refuse new connections, let in-flight requests finish,
then stop the refresher (or transit's probe) and the Vault session (revoking its token,
bounded by a short timeout), then the ops listener.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import stat
from pathlib import Path

from aiohttp import web
from prometheus_client import CollectorRegistry, disable_created_metrics

from . import __version__
from .api import TOKEN_HANDLER, TokenHandler, create_api_app
from .audit import AuditLog
from .blocking import cancel_and_wait
from .config import Settings
from .errors import ConfigError
from .freshness import Freshness
from .listener import Listener
from .listener_limits import OPS_LIMITS, SIGNING_LIMITS, raise_fd_limit, signing_limits
from .metrics import Metrics
from .ops import create_ops_app
from .refresher import Refresher
from .sources.factory import build_sources
from .state import SecretStore
from .systemd import Notifier, PassedSockets, keep_systemd_informed, take_passed_sockets
from .timing import sleep_or_wake

log = logging.getLogger(__name__)

SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get after SIGTERM
#: socket-activated, how long signing waits for the first secret before it accepts
ACTIVATION_WAIT = 10.0
SOCKET_MODE = 0o660

_FileId = tuple[int, int]


def _socket_in_use(path: Path) -> bool:
    """Whether a process accepts connections on the socket at `path` (else it is stale).
    A unix connect never waits: it is accepted into the backlog, refused, or finds the
    backlog full (EAGAIN, whatever the socket's timeout)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            return False
        except BlockingIOError:
            return True  # a full backlog: alive, just busy
        return True


def bind_unix_socket(path: Path) -> tuple[socket.socket, _FileId]:
    """Bind the signing socket with mode 0660 from the first moment (the umask covers the
    bind); a stale socket is replaced, a live one (another sidecar) is an error."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(mode):
            raise OSError(f"{path} exists and is not a socket; refusing to replace it")
        if _socket_in_use(path):
            raise OSError(f"{path}: another process is serving on this socket; refusing to start")
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    previous = os.umask(0o777 & ~SOCKET_MODE)
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot create the socket {path}: {exc.strerror}") from None
    finally:
        os.umask(previous)
    sock.listen(SIGNING_LIMITS.backlog)
    sock.setblocking(False)
    st = os.stat(path)
    return sock, (st.st_dev, st.st_ino)


def remove_own_socket(path: Path, identity: _FileId) -> None:
    """Delete the socket file only if it is still the one this process created."""
    with contextlib.suppress(OSError):
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) == identity:
            path.unlink()


async def _wait_for_handlers(handlers: list[TokenHandler], grace: float) -> None:
    """Wait for requests already in a handler (bodies may still be arriving: aiohttp's own
    shutdown would drop them) before the runners close connections."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace
    # Polling only during shutdown keeps the request path free of event bookkeeping.
    while any(h.in_flight for h in handlers) and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.01)


async def _until_ready(store: SecretStore, stop: asyncio.Event, bound: float) -> None:
    """Wait until every product has a usable secret, a stop is asked for, or `bound` passes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + bound
    # Start-up only, as in _wait_for_handlers: no event bookkeeping on the store for it.
    while not store.ready() and not stop.is_set() and loop.time() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.05)


async def _shutdown_delay(stop: asyncio.Event, delay: float) -> None:
    """Keep serving (unready) for `delay` seconds; a second signal ends the wait."""
    log.info("shutting down: still serving during the shutdown delay", extra={"detail": delay})
    stop.clear()
    await sleep_or_wake(stop, delay)


def _signing_sockets(settings: Settings, passed: PassedSockets | None) -> list[tuple[str, bool]]:
    """The signing listeners (name, whether it checks Host): only the TCP one checks Host
    (unix clients send anything). A socket systemd passed takes the place of one of ours."""
    tcp = passed is not None and passed.tcp is not None
    unix = passed is not None and passed.unix is not None
    if tcp and settings.listen is not None:
        raise ConfigError(
            "REDITUS_SIDECAR_LISTEN is set and systemd passed a TCP socket for signing: "
            "keep one of them"
        )
    if unix and settings.unix_socket is not None:
        raise ConfigError(
            "REDITUS_SIDECAR_UNIX_SOCKET is set and systemd passed a unix socket for "
            "signing: keep one of them"
        )
    signing: list[tuple[str, bool]] = []
    if tcp or settings.listen is not None:
        signing.append(("signing", True))
    if unix or settings.unix_socket is not None:
        signing.append(("signing_unix", False))
    if not signing:
        raise ConfigError(
            "systemd passed no socket named signing, REDITUS_SIDECAR_LISTEN is off and "
            "REDITUS_SIDECAR_UNIX_SOCKET is unset: nothing would serve signing"
        )
    return signing


def _status_line(store: SecretStore, ready: bool) -> str:
    """systemd's STATUS=: what the products are signing with, in one line."""
    products = []
    for name in store.products:
        snapshot = store.peek(name)
        products.append(f"{name} v{snapshot.version}" if snapshot else f"{name} (no secret)")
    return ("signing: " if ready else "waiting for a secret: ") + ", ".join(products)


async def serve(settings: Settings, *, stop: asyncio.Event | None = None) -> int:
    """Run the sidecar; returns the process exit code."""
    stop = stop or asyncio.Event()
    passed = take_passed_sockets(os.environ)
    if passed is not None and passed.ignored:
        log.warning(
            "sockets passed by systemd with no job here are closed",
            extra={"detail": ", ".join(passed.ignored)},
        )
    fd_limit = raise_fd_limit()
    # *_created series would only double the scrape size here.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    names = [product.name for product in settings.products]
    registry = CollectorRegistry()
    metrics = Metrics(registry, names, __version__)
    store = SecretStore(names, max_staleness=settings.max_staleness)
    sources = build_sources(settings, metrics)
    freshness: Freshness
    if settings.transit is not None:
        # Transit mode: no secret to refresh; Vault signs, a probe keeps readiness honest.
        from .transit import TransitMode  # hvac is only imported when used

        transit = TransitMode(settings, store, metrics)
        sources.shared.append(transit.session)
        freshness = transit
    else:
        freshness = Refresher(
            sources.sources,
            store,
            metrics,
            interval=settings.refresh_interval,
            backoff_max=settings.backoff_max,
            token_ttl=settings.token_ttl,
        )

    signing = _signing_sockets(settings, passed)
    limits = signing_limits(fd_limit, len(signing))
    audit = AuditLog(settings.audit, metrics) if settings.audit is not None else None
    if audit is not None:
        audit.start()  # before any listener: the first token already has its writer

    def audit_stuck() -> bool:
        """Failing closed, a hung audit target stops every token: not ready."""
        return audit is not None and audit.fail_closed and audit.stuck

    def ready() -> bool:
        """What `/readyz`, the ready gauge and systemd's READY=1 all say."""
        return store.ready() and not audit_stuck()

    metrics.track_readiness(ready)

    runners: dict[str, web.AppRunner] = {}
    handlers: list[TokenHandler] = []
    for name, check_host in signing:
        app = create_api_app(
            store,
            metrics,
            require_header=settings.require_header,
            retry_after=freshness.retry_after,
            check_host=check_host,
            callers=settings.callers,
            audit=audit,
        )
        handlers.append(app[TOKEN_HANDLER])
        runners[name] = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_GRACE)
    metrics.requests_in_flight.set_function(lambda: sum(h.in_flight for h in handlers))
    ops_runner = web.AppRunner(
        create_ops_app(store, registry, audit_stuck=audit_stuck),
        access_log=None,
        shutdown_timeout=1.0,
    )
    for runner in [*runners.values(), ops_runner]:
        await runner.setup()

    listeners: dict[str, Listener] = {
        name: Listener(name, runner, limits, metrics) for name, runner in runners.items()
    }
    ops = Listener("ops", ops_runner, OPS_LIMITS, metrics)
    own_socket: _FileId | None = None
    # Who calls over TCP matters to an allow-list and to the audit; else skip the cost.
    identify = settings.callers is not None or settings.audit is not None
    try:
        if settings.listen is not None:
            await listeners["signing"].start_tcp(
                (settings.listen.host, settings.listen.port), identify=identify
            )
        if settings.unix_socket is not None:
            sock, own_socket = bind_unix_socket(settings.unix_socket)
            await listeners["signing_unix"].start_socket(sock)
        if passed is not None and passed.ops is not None:
            await ops.start_tcp(passed.ops)
        else:
            await ops.start_tcp((settings.metrics_listen.host, settings.metrics_listen.port))
    except OSError as exc:
        log.error("cannot listen", extra={"error": str(exc)})
        for listener in [*listeners.values(), ops]:
            await listener.stop_accepting()
        for runner in [*runners.values(), ops_runner]:
            await runner.cleanup()
        if audit is not None:
            await audit.close()
        if own_socket is not None and settings.unix_socket is not None:
            remove_own_socket(settings.unix_socket, own_socket)
        return 1

    if audit is not None:
        mode = "closed" if audit.fail_closed else "open"
        log.info("issuance audit on", extra={"detail": f"{audit.target_name}, failing {mode}"})
    if settings.callers is not None:
        log.info("signing allowed to", extra={"detail": settings.callers.describe()})
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    loop.add_signal_handler(signal.SIGHUP, freshness.refresh_now)
    log.info(
        "reditus-sidecar started",
        extra={
            "address": ", ".join(listener.address for listener in [*listeners.values(), ops]),
            "source": settings.secret_source,
            "version": __version__,
        },
    )
    await sources.start()
    freshness.start()
    notifier = Notifier(os.environ)
    informing = None
    if notifier.enabled:
        informing = loop.create_task(
            keep_systemd_informed(notifier, ready, lambda: _status_line(store, ready())),
            name="systemd-notify",
        )
    if passed is not None and (passed.tcp is not None or passed.unix is not None):
        # The connection that activated the service waits in the kernel's backlog: give it
        # a token rather than a 503, if the secret loads within ACTIVATION_WAIT.
        await _until_ready(store, stop, ACTIVATION_WAIT)
        if passed.tcp is not None:
            await listeners["signing"].start_tcp(passed.tcp, identify=identify)
        if passed.unix is not None:
            await listeners["signing_unix"].start_socket(passed.unix)
    try:
        await stop.wait()
        store.shutting_down = True
        notifier.send("STOPPING=1", "STATUS=shutting down")
        if settings.shutdown_delay:
            await _shutdown_delay(stop, settings.shutdown_delay)
    finally:
        log.info("shutting down: finishing in-flight requests")
        if informing is not None:
            await cancel_and_wait([informing])
        notifier.close()
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        for listener in listeners.values():
            await listener.stop_accepting()
        await _wait_for_handlers(handlers, SHUTDOWN_GRACE)
        for runner in runners.values():
            await runner.cleanup()
        if audit is not None:
            await audit.close()
        await freshness.stop()
        await sources.close(revoke=True)
        await ops.stop_accepting()
        await ops_runner.cleanup()
        if own_socket is not None and settings.unix_socket is not None:
            remove_own_socket(settings.unix_socket, own_socket)
        log.info("stopped")
    return 0
