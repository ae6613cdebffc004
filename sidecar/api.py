"""The signing app: `POST /v1/token` on loopback (and the optional unix socket).

Requests are checked in the order the README fixes ("Signing API", the order column),
held as data: `TokenHandler.checks` names each check with its order and error code, built
once per configuration (a check the configuration turns off is not in it), and
tests/test_check_order.py compares it with the README's table and docs/openapi.yaml. The
first failure answers with a JSON error. Nothing a caller sends can produce a 5xx or a
stack trace, and no error carries a secret, a token or the user id.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import json
import logging
import math
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from aiohttp import web
from multidict import CIMultiDictProxy

from .audit import AuditLog
from .callers import CallerPolicy, caller_of
from .errors import SourceError
from .listener import ALLOW_LIST
from .metrics import ENDPOINTS, ERROR_REASONS, Metrics
from .signer import RemoteSigner, TokenSigner
from .state import SecretStore, Snapshot
from .token_request import ApiError, parse_object, product_name, validate_user_id

log = logging.getLogger(__name__)

MAX_BODY = 16 * 1024
# A body that has not fully arrived this long after its headers is a stalled (or slowloris)
# client: it gets 408 so it cannot hold a handler, or shutdown, for longer.
BODY_TIMEOUT = 5.0
TOKEN_PATH = "/v1/token"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")
_NO_STORE = {"Cache-Control": "no-store"}
_JSON_TYPE = "application/json; charset=utf-8"
_LOOPBACK_NAMES = frozenset({"localhost", "localhost."})
# Fetch metadata only a browser sends: Chromium, Firefox and Safari send Site, Mode and
# Dest on every request. Sec-Fetch-Mode is left out: Node's built-in fetch (undici) sends
# `Sec-Fetch-Mode: cors` alone. Three lookups cost 0.2 us; scanning every header name, 2 us.
_BROWSER_FETCH_HEADERS = ("Sec-Fetch-Site", "Sec-Fetch-Dest", "Sec-Fetch-User")
_HOST = re.compile(r"^(?:\[(?P<ip6>[0-9A-Fa-f:.]+)\]|(?P<name>[^:\[\]]+))(?::\d{1,5})?$")


def error_response(error: ApiError, request_id: str) -> web.Response:
    body = json.dumps({"error": {"code": error.code, "message": error.message}})
    headers = {**_NO_STORE, "X-Request-Id": request_id, **error.headers}
    response = web.Response(
        status=error.status, text=body, content_type="application/json", headers=headers
    )
    if error.close:
        response.force_close()
    return response


@functools.lru_cache(maxsize=256)  # callers repeat one Host; the cache saves a parse each
def _loopback_host(host: str | None) -> bool:
    """`localhost` or a loopback IP, with any port: a DNS-rebinding page sends its own name."""
    match = _HOST.match(host or "")
    if match is None:
        return False
    name = match.group("ip6") or match.group("name")
    if name.lower() in _LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def _request_fields(data: dict[str, Any]) -> tuple[str, str]:
    """8: the user id and the product name a parsed body asks for."""
    return validate_user_id(data.get("userId")), product_name(data)


class Check(NamedTuple):
    """One step of the signing pipeline: its row in the README's table and what it runs."""

    order: str  # the README's order column: "1", "2", "2a", ...
    code: str  # the error code it answers with when the request fails it
    run: Callable[..., Any]


# What a check sees. Head checks look at the request line and headers only and run in a
# loop (handed the headers: `request.headers` costs 70 ns a lookup); body checks are the
# steps the body flows through (each needs the one before); record checks run after
# signing, with the token's particulars.
Headers = CIMultiDictProxy[str]
HeadCheck = Callable[[web.Request, Headers], None]
RecordCheck = Callable[[web.Request, str, str, str, int, int, str], Awaitable[None]]


class TokenHandler:
    """Handles every request on the signing listener.

    Its checks are built once, in `__init__`, from the configuration: `checks` is the
    whole pipeline in order, and `_sign` runs exactly that (a loop over the head checks'
    bound methods, then the body steps, then the record checks)."""

    def __init__(
        self,
        store: SecretStore,
        metrics: Metrics,
        *,
        require_header: bool = True,
        clock: Callable[[], float] = time.time,
        retry_after: Callable[[str], int] = lambda _product: 1,
        body_timeout: float = BODY_TIMEOUT,
        check_host: bool = True,
        callers: CallerPolicy | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.store = store
        self.callers = callers
        self.audit = audit
        # the audit's caller when the kernel gave no credentials: TCP, or a unix peer whose
        # SO_PEERCRED could not be read (not seen in practice)
        self._unidentified = "tcp" if check_host else "unknown"
        self.check_host = check_host
        self.body_timeout = body_timeout
        self.require_header = require_header
        self.clock = clock
        self.retry_after = retry_after
        self._issued = {p: metrics.tokens_issued.labels(product=p) for p in store.products}
        self._errors = {r: metrics.token_errors.labels(reason=r) for r in ERROR_REASONS}
        self._latency = {e: metrics.request_duration.labels(endpoint=e) for e in ENDPOINTS}
        #: requests inside the handler now; shutdown waits for this to reach zero
        self.in_flight = 0
        # Request ids made here: a random per-process prefix and a counter, unique without
        # a getrandom() call per request (which cost about 5% of CPU under load).
        self._id_prefix = secrets.token_hex(4)
        self._ids = itertools.count()
        self.head_checks, self.body_checks, self.record_checks = self._pipeline()
        #: the whole pipeline, in the order the README's table fixes
        self.checks: tuple[Check, ...] = self.head_checks + self.body_checks + self.record_checks
        self._head: tuple[HeadCheck, ...] = tuple(check.run for check in self.head_checks)
        self._record: tuple[RecordCheck, ...] = tuple(check.run for check in self.record_checks)

    def _pipeline(self) -> tuple[tuple[Check, ...], tuple[Check, ...], tuple[Check, ...]]:
        """The checks this configuration runs, in order: each with whether it applies."""
        head = (
            (Check("1", "not_found", self._check_path), True),
            (Check("2", "method_not_allowed", self._check_method), True),
            (Check("2a", "caller_not_allowed", self._check_caller), self.callers is not None),
            (Check("3", "missing_request_header", self._check_mark), self.require_header),
            (Check("4", "browser_origin", self._check_browser), True),
            (Check("4a", "host_not_allowed", self._check_host), self.check_host),  # not on unix
            (Check("5", "unsupported_media_type", self._check_content_type), True),
            (Check("6", "too_large", self._check_length), True),
        )
        # The body's steps, in the order `_sign` calls them (each needs the one before); a
        # configuration turns none off.
        body = (
            Check("6a", "request_timeout", self._read_body),  # and 6, for a chunked body
            Check("7", "invalid_json", parse_object),
            Check("8", "invalid_request", _request_fields),
            Check("9", "unknown_product", self._check_product),
            Check("10", "secret_unavailable", self._snapshot),  # and `_sign_remotely`
        )
        record = ((Check("11", "audit_unavailable", self._audit), self.audit is not None),)
        return (
            tuple(check for check, applies in head if applies),
            body,
            tuple(check for check, applies in record if applies),
        )

    def _request_id(self, request: web.Request) -> str:
        """The caller's X-Request-Id if it is sane, else a new 16-character id."""
        given = request.headers.get("X-Request-Id")
        if given is not None and _REQUEST_ID.match(given):
            return given
        return f"{self._id_prefix}{next(self._ids) & 0xFFFFFFFF:08x}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        request_id = self._request_id(request)
        endpoint = "token" if request.path == TOKEN_PATH else "other"
        self.in_flight += 1
        try:
            response: web.StreamResponse = await self._sign(request, request_id)
        except ApiError as error:
            self._errors[error.code].inc()
            log.debug(
                "request refused",
                extra={"request_id": request_id, "status": error.status, "code": error.code},
            )
            response = error_response(error, request_id)
        except Exception:
            self._errors["internal"].inc()
            log.exception("signing failed", extra={"request_id": request_id})
            response = error_response(
                ApiError(500, "internal", "internal error; see the sidecar's log"), request_id
            )
        finally:
            self.in_flight -= 1
        self._latency[endpoint].observe(time.perf_counter() - started)
        return response

    async def _read_body(self, request: web.Request) -> bytes:
        """The whole body: 408 if it does not arrive within the body timeout, 413 if a
        chunked one grows past MAX_BODY."""
        try:
            if request.content.is_eof():
                # Almost always: a small body came with the headers. Skipping asyncio.timeout
                # here saves its timer (4 us per request measured, 5% of a request at 50 conns).
                return await request.read()
            async with asyncio.timeout(self.body_timeout):
                return await request.read()
        except web.HTTPRequestEntityTooLarge:  # a chunked body past MAX_BODY
            raise ApiError(413, "too_large", f"the body is larger than {MAX_BODY} bytes") from None
        except TimeoutError:
            raise ApiError(
                408,
                "request_timeout",
                f"the body did not arrive within {self.body_timeout:g} s",
                close=True,  # the rest of a stalled body is not worth waiting for
            ) from None

    async def _sign(self, request: web.Request, request_id: str) -> web.Response:
        headers = request.headers
        for check in self._head:
            check(request, headers)
        # the body checks, in the order `body_checks` lists them
        body = await self._read_body(request)  # 6a (and 6 for a chunked body)
        user_id, product = _request_fields(parse_object(body))  # 7, 8
        self._check_product(product)  # 9
        snapshot = self._snapshot(product)
        iat = int(self.clock())
        # `version`: the secret's (or, in transit mode, the transit key's) version this
        # token was signed with, as the signing call reports it.
        signer = snapshot.signer
        if isinstance(signer, TokenSigner):
            token, version = signer.sign(user_id, iat), snapshot.version
        else:  # 10 again: Vault cannot sign
            token, version = await self._sign_remotely(signer, user_id, iat)
        for record in self._record:  # 11
            await record(request, request_id, product, signer.product_id, version, iat, user_id)
        self._issued[product].inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "token issued",
                extra={"request_id": request_id, "product": product, "version": version},
            )
        # The token is base64url and dots, the product id is JSON-encoded once per secret:
        # concatenation gives json.dumps' output in a tenth of its time (0.25 us, not 2.5).
        body_out = (
            '{"token": "'
            + token
            + '", "productId": '
            + signer.product_id_json
            + ', "issuedAt": '
            + str(iat)
            + "}"
        )
        return web.Response(
            body=body_out.encode("utf-8"),
            headers={
                "Content-Type": _JSON_TYPE,
                "Cache-Control": "no-store",
                "X-Request-Id": request_id,
            },
        )

    # --- the checks, in the README's order -------------------------------------------------

    def _check_path(self, request: web.Request, _headers: Headers) -> None:
        """1: an unknown path answers 404, whatever else is wrong with the request."""
        if request.path != TOKEN_PATH:
            raise ApiError(404, "not_found", f"no such endpoint; POST {TOKEN_PATH}")

    def _check_method(self, request: web.Request, _headers: Headers) -> None:
        """2"""
        if request.method != "POST":
            raise ApiError(
                405, "method_not_allowed", f"use POST {TOKEN_PATH}", headers={"Allow": "POST"}
            )

    def _check_caller(self, request: web.Request, _headers: Headers) -> None:
        """2a: 403 unless the kernel identified the peer and the allow-list admits it."""
        assert self.callers is not None
        caller = caller_of(request)
        if self.callers.allows(caller):
            return
        if caller is None:
            text = "the kernel could not identify this caller and an allow-list is set"
        elif caller.gid is None:  # TCP: the kernel's socket table gives the uid only
            text = f"uid {caller.uid} is not allowed to sign"
        else:
            text = f"uid {caller.uid} and gid {caller.gid} are not allowed to sign"
        raise ApiError(403, "caller_not_allowed", text)

    def _check_mark(self, _request: web.Request, headers: Headers) -> None:
        """3: `X-Sidecar-Request: true`, exactly once."""
        marks = headers.getall("X-Sidecar-Request", ())
        if len(marks) != 1 or marks[0].lower() != "true":
            raise ApiError(
                403,
                "missing_request_header",
                "the header X-Sidecar-Request: true is required, exactly once",
            )

    def _check_browser(self, _request: web.Request, headers: Headers) -> None:
        """4"""
        if "Origin" in headers or any(name in headers for name in _BROWSER_FETCH_HEADERS):
            raise ApiError(
                403,
                "browser_origin",
                "requests from a browser (Origin or Sec-Fetch-Site/Dest/User headers) are refused",
            )

    def _check_host(self, _request: web.Request, headers: Headers) -> None:
        """4a, TCP only: a DNS-rebinding page sends its own name in Host."""
        if not _loopback_host(headers.get("Host")):
            raise ApiError(
                403,
                "host_not_allowed",
                "the Host header must be a loopback address or localhost",
            )

    def _check_content_type(self, request: web.Request, _headers: Headers) -> None:
        """5"""
        if (
            request.content_type != "application/json"
            or (request.charset or "utf-8").lower() != "utf-8"
        ):
            raise ApiError(
                415, "unsupported_media_type", "Content-Type must be application/json (UTF-8)"
            )

    def _check_length(self, request: web.Request, _headers: Headers) -> None:
        """6, by Content-Length: a body announced too large is not waited for."""
        if request.content_length is not None and request.content_length > MAX_BODY:
            raise ApiError(413, "too_large", f"the body is larger than {MAX_BODY} bytes")

    def _check_product(self, product: str) -> None:
        """9"""
        if product not in self._issued:
            raise ApiError(
                404, "unknown_product", f"no product named {product[:64]!r} is configured"
            )

    def _snapshot(self, product: str) -> Snapshot:
        """10: a usable secret (transit mode: `_sign_remotely` can still answer 503)."""
        snapshot = self.store.current(product)
        if snapshot is None:
            raise ApiError(
                503,
                "secret_unavailable",
                "the product secret is not loaded yet (or too stale); retry shortly",
                headers={"Retry-After": str(self.retry_after(product))},
            )
        return snapshot

    async def _sign_remotely(self, signer: RemoteSigner, user_id: str, iat: int) -> tuple[str, int]:
        """Transit mode: Vault computes the HMAC; when it cannot, 503 at once (no local key)."""
        try:
            return await signer.sign_remote(user_id, iat)
        except SourceError as exc:
            log.debug("transit signing refused", extra={"error": str(exc)})
            raise ApiError(
                503,
                "secret_unavailable",
                "Vault cannot sign right now (transit mode keeps no local key); retry shortly",
                headers={"Retry-After": str(max(1, math.ceil(exc.retry_after or 1)))},
            ) from None

    async def _audit(
        self,
        request: web.Request,
        request_id: str,
        product: str,
        product_id: str,
        version: int,
        iat: int,
        user_id: str,
    ) -> None:
        """11: queue the issuance record; failing closed, wait until it is written."""
        assert self.audit is not None
        pending = self.audit.submit(
            request_id=request_id,
            product=product,
            product_id=product_id,
            version=version,
            issued_at=iat,
            caller=caller_of(request) or self._unidentified,
            user_id=user_id,
        )
        if pending is not None and not await self.audit.recorded(pending):
            raise ApiError(
                503,
                "audit_unavailable",
                "the issuance audit cannot be written; no token is issued without its record",
                headers={"Retry-After": "1"},
            )


TOKEN_HANDLER = web.AppKey("token_handler", TokenHandler)


def create_api_app(
    store: SecretStore,
    metrics: Metrics,
    *,
    require_header: bool = True,
    clock: Callable[[], float] = time.time,
    retry_after: Callable[[str], int] = lambda _product: 1,
    body_timeout: float = BODY_TIMEOUT,
    check_host: bool = True,
    callers: CallerPolicy | None = None,
    audit: AuditLog | None = None,
) -> web.Application:
    """The signing application; every path goes to one handler so the check order holds.

    `check_host` is for the TCP listener; unix-socket clients put anything in Host."""
    app = web.Application(client_max_size=MAX_BODY)
    handler = TokenHandler(
        store,
        metrics,
        require_header=require_header,
        clock=clock,
        retry_after=retry_after,
        body_timeout=body_timeout,
        check_host=check_host,
        callers=callers,
        audit=audit,
    )
    # The token path first: aiohttp finds a fixed path by dict lookup, while the catch-all
    # is a regex tried per request. Both go to the same handler, so the check order holds.
    app.router.add_route("*", TOKEN_PATH, handler.handle)
    app.router.add_route("*", "/{tail:.*}", handler.handle)
    app[TOKEN_HANDLER] = handler
    if callers is not None:
        app[ALLOW_LIST] = callers  # the listener keeps allowed callers' connections first
    return app
