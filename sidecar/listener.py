"""Bounded HTTP listeners: whatever reaches a port must not be able to exhaust the process.

Each listening socket gets a cap on open connections, header limits, a deadline for the
request head and for idle keep-alive, and its own counters. Malformed HTTP is answered
with a JSON error, counted, and logged as one fixed, rate-limited line: aiohttp's own
handling would log a traceback quoting the raw request bytes (user ids included).

A full listener closes an idle connection to admit a new one: a plain refusal would let a
flood of idle connections lock kubelet's probes (or the app) out. On the ops listener that
is its oldest connection not in a handler (idle keep-alive, or still sending its head).
The signing listeners tell callers apart (the uid the kernel names at connect), because any
local user can reach them:

- a connection holding request bytes (received since its last answer, or waiting unread in
  the kernel) is never closed to make room, only an idle keep-alive one, or one whose head
  is past its deadline;
- the victim comes from the caller holding the most connections, never from one holding
  no more than the newcomer's caller (its own oldest idle one aside);
- with an allow-list, an allowed caller's connection is never closed for an unlisted (or
  unidentified) newcomer, which is refused instead; an allowed newcomer may close any
  unlisted connection not in a handler (its request could only be refused);
- a caller the allow-list does not name (anyone, without a list) holds at most
  CALLER_SHARE of the listener; past it, it only replaces its own idle connections (an app
  that needs more is named in the allow-list: listed callers are held to no share).

Only when no connection may go is the new one closed at once.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
import sys
import termios
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong

from .callers import Caller, CallerPolicy, TcpPeers, identify
from .listener_limits import Limits
from .metrics import Metrics

log = logging.getLogger(__name__)

# Header limits, on every listener. Probes, Prometheus and app clients send a handful of
# short headers; aiohttp's defaults (128 headers of 8 KiB) let one connection buffer 1 MiB.
MAX_LINE_SIZE = 4096  # request line, bytes
MAX_FIELD_SIZE = 4096  # each header name and value, bytes
MAX_HEADERS = 24
PROTOCOL_LOG_INTERVAL = 10.0  # at most one protocol-error line per listener this often
#: error codes of requests refused before routing, on every listener
PROTOCOL_ERROR_CODES = ("malformed_request", "headers_too_large", "expectation_failed")
#: the signing app's allow-list, which its listener also admits connections by
ALLOW_LIST = web.AppKey("allow_list", CallerPolicy)

_RequestHandler = Callable[[web.BaseRequest], Awaitable[web.StreamResponse]]
#: whom a connection counts against: the peer's uid (None: unidentified) and whether the
#: allow-list names it
_Bucket = tuple[int | None, bool]


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


class NotHttp11(BadHttpMessage):
    """A request the parser took that is not HTTP/1.1 (HTTP/1.0): refused like malformed."""

    def __init__(self) -> None:
        super().__init__("not HTTP/1.1")


class UnmetExpectation(Exception):
    """An Expect header asking for anything but 100-continue."""


def _refusal(request: web.BaseRequest) -> Exception | None:
    """Why a parsed request is refused before routing: not HTTP/1.1, or an Expect other
    than 100-continue (aiohttp would answer it with a plain-text 417)."""
    if request.version != HttpVersion11:
        return NotHttp11()
    expect = request.headers.getall(hdrs.EXPECT, ())
    # aiohttp acts on the first value unless it is empty: only "" and 100-continue pass it.
    if any(value.lower() not in ("", "100-continue") for value in expect):
        return UnmetExpectation()
    return None


def _protocol_error(exc: BaseException | None) -> tuple[int, str, str]:
    """Status, code and a fixed message for a request refused before routing."""
    if isinstance(exc, UnmetExpectation):
        return 417, "expectation_failed", "the only expectation supported is Expect: 100-continue"
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


_FIONREAD_BUFFER = bytes(4)


class _BoundedHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, admitted by its listener and answering errors in JSON."""

    def __init__(self, listener: Listener, **kwargs: Any) -> None:
        super().__init__(listener.runner_server, **kwargs)
        self._listener = listener
        self._admitted = False
        #: the peer as the kernel names it, read once at connect (None: not identified)
        self.caller: Caller | None = None
        #: request bytes received since the last answer (a request not finished)
        self._holding = False
        self._received = 0  # data_received calls with bytes, to see any during an answer

    @property
    def in_request(self) -> bool:
        """A request of this connection is in a handler (aiohttp's own flag; it is what
        its graceful shutdown waits on)."""
        return self._request_in_progress

    @property
    def holding(self) -> bool:
        """Request bytes were received since the last answer."""
        return self._holding

    def idle(self, now: float) -> bool:
        """Whether closing this connection loses no request: not in a handler, and no
        request bytes received since its last answer nor waiting unread in the kernel; or
        its head is past its deadline (aiohttp is about to close it) with none parsed."""
        if self._request_in_progress:
            return False
        if self._holding:
            return now >= self._next_keepalive_close_time and not self._messages
        return self._unread() == 0

    def _unread(self) -> int:
        """Bytes the kernel holds for this connection that the loop has not read yet: in a
        burst, connections are admitted before their first read."""
        transport = self.transport
        sock = None if transport is None else transport.get_extra_info("socket")
        if sock is None:
            return 0
        try:
            raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, _FIONREAD_BUFFER)
        except (OSError, ValueError):
            return 0
        return int.from_bytes(raw, sys.byteorder)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self._listener.identify:  # before admission: a caller's connections count
            self.caller = identify(transport.get_extra_info("socket"), self._listener.tcp_peers)
        if not self._listener.admit(self):
            transport.close()
            return
        self._admitted = True
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._admitted:
            self._admitted = False
            self._listener.release(self)
            super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if data:
            self._holding = True
            self._received += 1
        super().data_received(data)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        received = self._received
        result = await super().finish_response(request, resp, start_time)
        # Idle again unless bytes came while answering (the next request, or the rest of
        # this body) or a pipelined request waits.
        if self._received == received and not self._messages:
            self._holding = False
        return result

    async def _handle_request(
        self,
        request: web.BaseRequest,
        start_time: float | None,
        request_handler: _RequestHandler,
    ) -> tuple[web.StreamResponse, bool]:
        if request_handler is self._request_handler:  # not a parser error already
            refusal = _refusal(request)
            if refusal is not None:

                async def refuse(request: web.BaseRequest) -> web.StreamResponse:
                    return self.handle_error(request, 400, refusal)

                request_handler = refuse
        return await super()._handle_request(request, start_time, request_handler)

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
        # The status line repeats the request's version: aiohttp's stand-in for a request
        # it could not parse says HTTP/1.0, and an HTTP/1.0 request is refused. Answer as
        # the HTTP/1.1 server this is (which also sends Connection: close).
        request._version = HttpVersion11
        request._cache.pop("version", None)  # read (and cached) by the version check
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
        #: callers whose connections the listener keeps over unlisted ones (signing only)
        self.allow_list = runner.app.get(ALLOW_LIST)
        self.protocol_errors = _ProtocolErrorLog(name, metrics)
        self._refused = metrics.http_connections_refused.labels(listener=name)
        self._evicted = metrics.http_connections_evicted.labels(listener=name)
        self._open: dict[_BoundedHandler, _Bucket] = {}  # in order of arrival
        self._buckets: dict[_Bucket, dict[_BoundedHandler, None]] = {}  # the same, by caller
        metrics.http_connections.labels(listener=name).set_function(lambda: len(self._open))
        self._server: asyncio.Server | None = None
        #: identify each connection's peer (always on the unix socket; on TCP when asked,
        #: or when connections are counted per caller)
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

    def _bucket(self, caller: Caller | None) -> _Bucket:
        allowed = self.allow_list is not None and self.allow_list.allows(caller)
        return (None if caller is None else caller.uid, allowed)

    def admit(self, handler: _BoundedHandler) -> bool:
        """Whether a new connection may stay; may close an idle one to make room."""
        per_caller = self.limits.max_per_caller
        bucket = self._bucket(handler.caller)
        victim: _BoundedHandler | None = None
        if per_caller is None:
            if len(self._open) >= self.limits.max_connections:
                victim = next((h for h in self._open if not h.in_request), None)
                if victim is None:
                    return self._refuse()
        elif not bucket[1] and len(self._buckets.get(bucket, ())) >= per_caller:
            # At its share: only its own idle connections make room, whatever the rest.
            victim = self._victim(bucket, own_only=True)
            if victim is None:
                return self._refuse()
        elif len(self._open) >= self.limits.max_connections:
            victim = self._victim(bucket)
            if victim is None:
                return self._refuse()
        if victim is not None:
            self.release(victim)
            victim.force_close()
            self._evicted.inc()
        self._open[handler] = bucket
        self._buckets.setdefault(bucket, {})[handler] = None
        return True

    def _refuse(self) -> bool:
        self._refused.inc()
        return False

    def _victim(self, newcomer: _Bucket, *, own_only: bool = False) -> _BoundedHandler | None:
        """The connection to close for a newcomer of caller `newcomer`, or None."""
        now = asyncio.get_running_loop().time()
        held = len(self._buckets.get(newcomer, ()))
        # unlisted callers first, then the caller holding the most connections
        for bucket, members in sorted(self._buckets.items(), key=lambda b: (b[0][1], -len(b[1]))):
            unlisted_for_allowed = newcomer[1] and not bucket[1]
            if bucket != newcomer:
                if own_only or (bucket[1] and not newcomer[1]):
                    continue
                if not unlisted_for_allowed and len(members) <= held:
                    continue
            for handler in members:
                if (unlisted_for_allowed and not handler.in_request) or handler.idle(now):
                    return handler
        return None

    def release(self, handler: _BoundedHandler) -> None:
        bucket = self._open.pop(handler, None)
        if bucket is not None:
            members = self._buckets[bucket]
            del members[handler]
            if not members:
                del self._buckets[bucket]

    async def start_tcp(
        self, where: tuple[str, int] | socket.socket, *, identify: bool = False
    ) -> None:
        """Listen on TCP at (host, port), or on a socket bound already (systemd passed it);
        `identify` looks each peer's uid up (inet_diag, once per connection), as do
        per-caller limits."""
        loop = asyncio.get_running_loop()
        self.identify = identify or self.limits.caller_share is not None
        backlog = self.limits.backlog
        if isinstance(where, socket.socket):
            where.setblocking(False)
            self._server = await loop.create_server(self._protocol, sock=where, backlog=backlog)
        else:
            host, port = where
            self._server = await loop.create_server(
                self._protocol, host, port, backlog=backlog, reuse_address=True
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
