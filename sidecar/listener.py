"""Bounded HTTP listeners: whatever reaches a port must not be able to exhaust the process.

Each listening socket gets a cap on open connections, header limits, a deadline for the
request head and for idle keep-alive, and its own counters. Malformed HTTP is answered
with a JSON error, counted, and logged as one fixed, rate-limited line: aiohttp's own
handling would log a traceback quoting the raw request bytes (user ids included).

A full listener closes its oldest connection that is not in a request (idle keep-alive,
or still sending its head) to admit a new one: a plain refusal would let a flood of idle
connections lock kubelet's probes (or the app) out. Only when every connection is in a
request is the new one closed at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import resource
import socket
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from .callers import Caller, TcpPeers, identify
from .metrics import Metrics

log = logging.getLogger(__name__)

# Header limits, on every listener. Probes, Prometheus and app clients send a handful of
# short headers; aiohttp's defaults (128 headers of 8 KiB) let one connection buffer 1 MiB.
MAX_LINE_SIZE = 4096  # request line, bytes
MAX_FIELD_SIZE = 4096  # each header name and value, bytes
MAX_HEADERS = 24
PROTOCOL_LOG_INTERVAL = 10.0  # at most one protocol-error line per listener this often
#: error codes of requests the HTTP parser refuses, on every listener
PROTOCOL_ERROR_CODES = ("malformed_request", "headers_too_large")
FD_RESERVE = 64  # descriptors kept for Vault connections, files and the resolver


@dataclass(frozen=True)
class Limits:
    """How far one listener lets its clients go."""

    max_connections: int
    #: a connection idle after a response, or not done sending its request head, this long
    #: after connecting or answering is closed
    idle_timeout: float
    #: after an early answer (413, 408), how long the rest of the body is read and dropped
    lingering_time: float
    backlog: int = 128


OPS_LIMITS = Limits(max_connections=32, idle_timeout=5.0, lingering_time=0.0)
#: shared by the signing listeners (TCP and unix socket split it evenly)
SIGNING_LIMITS = Limits(max_connections=256, idle_timeout=10.0, lingering_time=2.0)


def raise_fd_limit() -> int:
    """Raise the soft open-file limit to the hard one (many runtimes start at 1024)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            return soft
    return hard


def signing_limits(fd_limit: int, listeners: int) -> Limits:
    """Each signing listener's share of SIGNING_LIMITS, smaller still if every listener at
    its cap would run out of file descriptors."""
    share = SIGNING_LIMITS.max_connections // max(1, listeners)
    fits = (fd_limit - FD_RESERVE - OPS_LIMITS.max_connections) // max(1, listeners)
    if fits < share:
        share = max(16, fits)
        log.warning(
            "open-file limit is low: signing connections capped lower",
            extra={"detail": f"RLIMIT_NOFILE {fd_limit}: {share} per signing listener"},
        )
    return dataclasses.replace(SIGNING_LIMITS, max_connections=share)


class _ProtocolErrorLog:
    """Counts malformed requests and reports them in one line per interval, never the bytes."""

    def __init__(self, listener: str, metrics: Metrics) -> None:
        self.listener = listener
        self._counter = metrics.http_protocol_errors.labels(listener=listener)
        self._unreported = 0
        self._last = -PROTOCOL_LOG_INTERVAL

    def record(self) -> None:
        self._counter.inc()
        self._unreported += 1
        now = time.monotonic()
        if now - self._last >= PROTOCOL_LOG_INTERVAL:
            log.warning(
                "malformed HTTP requests refused",
                extra={"listener": self.listener, "count": self._unreported},
            )
            self._unreported = 0
            self._last = now


def _protocol_error(exc: BaseException | None) -> tuple[int, str, str]:
    """Status, code and a fixed message for an error aiohttp's parser raised."""
    if isinstance(exc, LineTooLong) or (
        isinstance(exc, BadHttpMessage) and "Too many headers" in exc.message
    ):
        return (
            431,
            "headers_too_large",
            f"request line and header fields are limited to {MAX_FIELD_SIZE} bytes, "
            f"headers to {MAX_HEADERS}",
        )
    return 400, "malformed_request", "the request is not valid HTTP/1.1"


class _BoundedHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, admitted by its listener and answering errors in JSON."""

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(listener.runner_server, **kwargs)
        self._listener = listener
        self._admitted = False
        #: the peer as the kernel names it, read once at connect (None: not identified)
        self.caller: Caller | None = None

    @property
    def in_request(self) -> bool:
        """A request of this connection is in a handler (aiohttp's own flag; it is what
        its graceful shutdown waits on)."""
        return self._request_in_progress

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._listener.admit(self):
            transport.close()
            return
        self._admitted = True
        if self._listener.identify:
            self.caller = identify(transport.get_extra_info("socket"), self._listener.tcp_peers)
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._admitted = False
            self._listener.release(self)
            super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # An exception escaped a handler of ours (aiohttp answers 500, or 504 for a
            # TimeoutError): a bug, whose traceback holds no request bytes.
            log.error(
                "request handler failed", exc_info=exc, extra={"listener": self._listener.name}
            )
            status, code, text = 500, "internal", "internal error; see the sidecar's log"
        else:
            self._listener.protocol_errors.record()
            status, code, text = _protocol_error(exc)
        if request.writer.output_size > 0:
            raise ConnectionError("response already started; closing the connection")
        response = web.json_response(
            {"error": {"code": code, "message": text}},
            status=status,
            headers={"Cache-Control": "no-store"},
        )
        response.force_close()
        return response


class Listener:
    """One listening socket of an app: its cap, its connections and its counters."""

    def __init__(self, name: str, runner: web.AppRunner, limits: Limits, metrics: Metrics) -> None:
        if runner.server is None:
            raise RuntimeError("the runner must be set up first")
        self.name = name
        self.runner_server = runner.server
        self.limits = limits
        self.protocol_errors = _ProtocolErrorLog(name, metrics)
        self._refused = metrics.http_connections_refused.labels(listener=name)
        self._evicted = metrics.http_connections_evicted.labels(listener=name)
        self._open: dict[_BoundedHandler, None] = {}  # in order of arrival
        metrics.http_connections.labels(listener=name).set_function(lambda: len(self._open))
        self._server: asyncio.Server | None = None
        #: identify each connection's peer (always on the unix socket; on TCP when asked)
        self.identify = False
        self.tcp_peers = TcpPeers()
        self._handler_args: dict[str, Any] = {
            "loop": asyncio.get_running_loop(),
            "keepalive_timeout": limits.idle_timeout,
            "lingering_time": limits.lingering_time,
            "max_line_size": MAX_LINE_SIZE,
            "max_field_size": MAX_FIELD_SIZE,
            "max_headers": MAX_HEADERS,
            "access_log": None,
        }

    def _protocol(self) -> _BoundedHandler:
        return _BoundedHandler(self, **self._handler_args)

    def admit(self, handler: _BoundedHandler) -> bool:
        """Whether a new connection may stay; may close an idle one to make room."""
        if len(self._open) >= self.limits.max_connections:
            victim = next((h for h in self._open if not h.in_request), None)
            if victim is None:
                self._refused.inc()
                return False
            self.release(victim)
            victim.force_close()
            self._evicted.inc()
        self._open[handler] = None
        return True

    def release(self, handler: _BoundedHandler) -> None:
        self._open.pop(handler, None)

    async def start_tcp(self, host: str, port: int, *, identify: bool = False) -> None:
        """Listen on TCP; `identify` looks each peer's uid up (inet_diag, once per connection)."""
        loop = asyncio.get_running_loop()
        self.identify = identify
        self._server = await loop.create_server(
            self._protocol, host, port, backlog=self.limits.backlog, reuse_address=True
        )

    async def start_socket(self, sock: socket.socket) -> None:
        """Serve on a socket bound and listening already (the unix socket)."""
        loop = asyncio.get_running_loop()
        self.identify = True
        self._server = await loop.create_unix_server(self._protocol, sock=sock)

    @property
    def address(self) -> str:
        if self._server is None or not self._server.sockets:
            return self.name
        name = self._server.sockets[0].getsockname()
        if isinstance(name, str):
            return f"unix:{name}"
        host, port = name[0], name[1]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    async def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        self.tcp_peers.close()
