"""The bounds on one Vault call (its total deadline, the size of its answer), and what its
failure means (the errors, and one table from an HTTP status to the operator's error).

Whatever answers at VAULT_ADDR is not trusted to be small or quick: the transport adapters
read every answer themselves, at most `MAX_ANSWER_BYTES` of it, and each call has a total
deadline (its bound) after which its connection is cut, so neither a huge body nor one
dripped a byte at a time can hold memory, a thread or a connection past the call.

`VaultTransport` (vault_client) mounts the adapters, makes a `Deadline` per call, and runs
the call's worker thread `working_for` it.

The errors the Vault code raises, the transport's table from hvac's exceptions back to the
HTTP status (hvac drops it), and the one table from a status to the operator's error for
each kind of call (a KV read, a transit HMAC, a login).

A row names the error class and its message; the message is a `str.format` template over
`where` (the call's own description), `status`, `said` (Vault's text, scrubbed) and the
fields the call passes (a mount, a path, an auth method, a hint).
"""

from __future__ import annotations

import contextlib
import email.utils
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import hvac.exceptions
import requests
import requests.adapters
import urllib3
import urllib3.connection
import urllib3.exceptions

from ..errors import SecretUnavailable, SourceError, VaultAuthError
from .vault_tls import TLSAdapter

# The largest answer read from Vault. What the sidecar asks for is a few KiB at most (a KV
# secret, a login, 64 transit HMACs); 1 MiB leaves room for big KV metadata and still
# bounds what a wrong VAULT_ADDR, a proxy's error page or a hostile server can make us hold.
MAX_ANSWER_BYTES = 1024 * 1024
_READ_CHUNK = 64 * 1024

_CUT = threading.Lock()  # between a deadline cutting connections and calls taking them
_CALL = threading.local()  # .deadline: that of the call the current worker thread runs


class AnswerTooLarge(Exception):
    """Raised by the adapter; the transport turns it into `VaultAnswerTooLarge`."""


class Deadline:
    """The moment one call must be over by, enforced on the connection it uses.

    The per-read timeouts of requests restart with every byte, so a server dripping its
    answer keeps a call (its thread, its connection) alive for ever. The worker thread
    stops reading the body at the deadline itself; while it waits for the status line or
    the headers it cannot look at the clock, so `expire` (an event-loop timer at the
    deadline) shuts the socket under it, and the blocked read returns at once."""

    def __init__(self, seconds: float) -> None:
        self.at = time.monotonic() + seconds
        self.expired = False  # the moment has come (set by `expire`)
        self.stopped = False  # the call was cut or refused because of it
        self._over = False  # the call has ended: nothing left to cut
        self._conns: set[_Watched] = set()

    def passed(self) -> bool:
        return self.expired or time.monotonic() >= self.at

    def stop(self) -> TimeoutError:
        self.stopped = True
        return TimeoutError("the Vault call reached its deadline")

    def attach(self, conn: _Watched) -> None:
        """`conn` works for this call now (fresh, or taken from the pool)."""
        with _CUT:
            if self._over:
                return
            conn.deadline = self
            self._conns.add(conn)
        if self.passed():
            raise self.stop()

    def expire(self) -> None:
        """Shut the socket of every connection still working for this call."""
        with _CUT:
            if self._over:
                return
            self.expired = True
            for conn in self._conns:
                sock = conn.sock if conn.deadline is self else None
                if isinstance(sock, socket.socket):
                    # socket.socket's own shutdown: SSLSocket's would also drop its state
                    # under the thread reading it. The read sees EOF; the server, a FIN.
                    with contextlib.suppress(OSError):
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    self.stopped = True

    def finish(self) -> None:
        with _CUT:
            self._over = True
            for conn in self._conns:
                if conn.deadline is self:
                    conn.deadline = None
            self._conns.clear()


if TYPE_CHECKING:
    _Connection = urllib3.connection.HTTPConnection
else:
    _Connection = object


class _Watched(_Connection):
    """A urllib3 connection that the current call's deadline can cut."""

    deadline: Deadline | None = None

    def _attach(self) -> None:
        current: Deadline | None = getattr(_CALL, "deadline", None)
        if current is not None:
            current.attach(self)

    def _check(self) -> None:
        if self.deadline is not None and self.deadline.passed():
            raise self.deadline.stop()

    def connect(self) -> None:
        self._attach()
        super().connect()
        self._check()  # the timer may have fired while the socket did not exist yet

    def request(self, *args: Any, **kwargs: Any) -> None:
        self._attach()
        super().request(*args, **kwargs)

    def getresponse(self) -> Any:
        self._check()
        return super().getresponse()


class _WatchedHTTP(_Watched, urllib3.connection.HTTPConnection):
    pass


class _WatchedHTTPS(_Watched, urllib3.connection.HTTPSConnection):
    pass


def _detach(conn: object) -> None:
    """A connection back in the pool works for no call: no deadline may cut it."""
    if isinstance(conn, _Watched):
        with _CUT:
            conn.deadline = None


class _HTTPPool(urllib3.HTTPConnectionPool):
    ConnectionCls = _WatchedHTTP

    def _put_conn(self, conn: Any) -> None:
        _detach(conn)
        super()._put_conn(conn)


class _HTTPSPool(urllib3.HTTPSConnectionPool):
    ConnectionCls = _WatchedHTTPS

    def _put_conn(self, conn: Any) -> None:
        _detach(conn)
        super()._put_conn(conn)


_POOLS: dict[str, type[urllib3.HTTPConnectionPool]] = {"http": _HTTPPool, "https": _HTTPSPool}


def _read_answer(response: requests.Response) -> None:
    """Read the body now, as requests would, but at most MAX_ANSWER_BYTES of it (refused at
    once when Content-Length says more) and never past the call's deadline."""
    deadline: Deadline | None = getattr(_CALL, "deadline", None)
    declared = response.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > MAX_ANSWER_BYTES:
        response.close()
        raise AnswerTooLarge
    # read1: what one read from the socket gives, so a drip cannot hold us in here (urllib3
    # before 2.3 has only read, which waits for the whole chunk: then the timer cuts it).
    read = getattr(response.raw, "read1", None) or response.raw.read
    body = bytearray()
    try:
        while True:
            if deadline is not None and deadline.passed():
                raise deadline.stop()
            chunk = read(min(_READ_CHUNK, MAX_ANSWER_BYTES + 1 - len(body)), decode_content=True)
            if not chunk:
                break
            body += chunk
            if len(body) > MAX_ANSWER_BYTES:
                raise AnswerTooLarge
        if deadline is not None and deadline.stopped:
            raise deadline.stop()  # cut under us: what arrived is not the whole answer
    except BaseException as exc:
        response.close()  # the connection goes too: it is not read to the end
        if isinstance(exc, TimeoutError | urllib3.exceptions.ReadTimeoutError):
            raise requests.exceptions.ReadTimeout(str(exc)) from None
        if isinstance(exc, urllib3.exceptions.SSLError):
            raise requests.exceptions.SSLError(str(exc)) from None
        if isinstance(exc, urllib3.exceptions.DecodeError):
            raise requests.exceptions.ContentDecodingError(str(exc)) from None
        if isinstance(exc, urllib3.exceptions.ProtocolError | OSError):
            raise requests.exceptions.ChunkedEncodingError(str(exc)) from None
        raise
    response._content = bytes(body)
    response._content_consumed = True


class BoundedAdapter(requests.adapters.HTTPAdapter):
    """Reads each answer itself (`_read_answer`), from connections a deadline can cut: every
    hop of a redirect too, since requests reads those with `.content` before following."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOLS

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        if isinstance(manager, urllib3.ProxyManager):  # a SOCKS manager keeps its own pools
            manager.pool_classes_by_scheme = _POOLS
        return manager

    def send(
        self,
        request: requests.PreparedRequest,
        stream: bool = False,
        timeout: Any = None,
        verify: Any = True,
        cert: Any = None,
        proxies: Any = None,
    ) -> requests.Response:
        response = super().send(
            request, stream=True, timeout=timeout, verify=verify, cert=cert, proxies=proxies
        )
        _read_answer(response)
        return response


class BoundedTLSAdapter(BoundedAdapter, TLSAdapter):
    """`TLSAdapter`'s context and server name, with the bounds of `BoundedAdapter`."""


@contextlib.contextmanager
def working_for(deadline: Deadline) -> Iterator[None]:
    """The current worker thread runs the call `deadline` bounds until the block ends; then
    no connection of it may be cut any more."""
    _CALL.deadline = deadline
    try:
        yield
    finally:
        deadline.finish()
        _CALL.deadline = None


# --- what a failed call means -------------------------------------------------------

MAX_VAULT_MESSAGE = 200


class VaultUnreachable(SecretUnavailable):
    """No HTTP answer from Vault: connection refused, DNS, timeout."""


class VaultTimeout(VaultUnreachable):
    """Vault did not answer within the bound."""


class VaultTLSError(SecretUnavailable):
    """The TLS handshake with Vault failed (usually an untrusted certificate)."""


class VaultAnswerTooLarge(SecretUnavailable):
    """The answer was larger than `MAX_ANSWER_BYTES`: refused, the rest left unread."""


class VaultLoginRefused(VaultAuthError):
    """Vault refused our credentials at login."""


class VaultPermissionDenied(VaultAuthError):
    """Vault accepted our token but its policies do not allow the read."""


@dataclass
class VaultHTTPError(Exception):
    """Vault answered with an error status; what hvac knew plus the headers it drops."""

    status: int
    errors: list[str]
    retry_after: float | None
    body: Any

    @property
    def unavailable(self) -> bool:
        """Vault (or what is in front of it) cannot answer now: rate limited, sealed,
        failing over. Whatever we hold (a token) is still good; retry later."""
        return self.status == 429 or self.status >= 500

    def said(self, scrub: Iterable[str] = ()) -> str:
        """Vault's own error text, shortened and with any credential we hold masked."""
        text = "; ".join(e for e in self.errors if isinstance(e, str)) or "no error text"
        if text.lstrip().startswith("<"):
            # Not Vault's JSON: an HTML page from a proxy or load balancer in front of it.
            text = f"an HTML page, not a Vault answer (a proxy or load balancer said {self.status})"
        for value in scrub:
            if value:
                text = text.replace(value, "********")
        text = " ".join(text.split())
        return text[:MAX_VAULT_MESSAGE] + ("..." if len(text) > MAX_VAULT_MESSAGE else "")


#: The transport's row: hvac's exception for a status, back to the status (the response
#: hook records the real one; this is the fallback when it did not run).
HVAC_STATUS: dict[type[hvac.exceptions.VaultError], int] = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.PreconditionFailed: 412,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}


@dataclass(frozen=True)
class Meaning:
    """One row: the error a status raises for a kind of call, and what it says."""

    error: type[SourceError]
    text: str
    retry: bool = True  # the error carries Vault's Retry-After


ANY = 0  # the row for every status a kind of call does not name

_DENIED = (
    "{where}: permission denied (HTTP 403): the token's policies must allow "
    '"{capability}" on path "{path}" (see deploy/vault/{policy})'
)
_ANSWERED = Meaning(SecretUnavailable, "{where}: Vault answered HTTP {status} ({said})")
_LOGIN_REFUSED = Meaning(
    VaultLoginRefused, "Vault refused {what} (HTTP {status} on {where}: {said}): {hint}", False
)
_HMAC_REFUSED = Meaning(
    SecretUnavailable,
    "{where}: Vault refused the HMAC (HTTP {status}: {said}): check "
    "REDITUS_SIDECAR_TRANSIT_MOUNT ({mount!r}) and REDITUS_SIDECAR_TRANSIT_KEY ({key!r}), "
    "and that the key has type hmac",
)

#: status -> meaning, per kind of call ("kv", "transit", "login").
STATUS_ERRORS: dict[str, dict[int, Meaning]] = {
    "kv": {
        403: Meaning(VaultPermissionDenied, _DENIED, False),
        404: Meaning(
            SecretUnavailable,
            "{where}: no secret there (HTTP 404): check REDITUS_SIDECAR_KV_MOUNT ({mount!r}), "
            "REDITUS_SIDECAR_KV_PATH ({kv_path!r}) and that {mount}/ is a KV version 2 mount",
            False,
        ),
        429: Meaning(SecretUnavailable, "{where}: Vault is rate limiting us (HTTP 429)"),
        503: Meaning(
            SecretUnavailable,
            "{where}: Vault is unavailable (HTTP 503: {said}): sealed, in standby or overloaded",
        ),
        ANY: _ANSWERED,
    },
    "transit": {
        403: Meaning(VaultPermissionDenied, _DENIED, False),
        400: _HMAC_REFUSED,
        404: _HMAC_REFUSED,
        ANY: _ANSWERED,
    },
    "login": {
        400: _LOGIN_REFUSED,
        401: _LOGIN_REFUSED,
        403: _LOGIN_REFUSED,
        404: Meaning(
            VaultLoginRefused,
            "no {method} auth method at auth/{mount} (HTTP {status}): check "
            "{prefix}VAULT_AUTH_MOUNT",
            False,
        ),
        ANY: Meaning(
            SecretUnavailable, "Vault answered HTTP {status} to the {method} login ({said})"
        ),
    },
}


def status_error(
    kind: str,
    exc: VaultHTTPError,
    *,
    status: int | None = None,
    scrub: Iterable[str] = (),
    **fields: Any,
) -> SourceError:
    """The operator's error for `exc` on a `kind` call (`status` overrides the row)."""
    rows = STATUS_ERRORS[kind]
    meaning = rows.get(exc.status if status is None else status) or rows[ANY]
    text = meaning.text.format(status=exc.status, said=exc.said(scrub), **fields)
    return meaning.error(text, retry_after=exc.retry_after if meaning.retry else None)


def parse_retry_after(value: str | None, wall: Callable[[], float] = time.time) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - wall())
