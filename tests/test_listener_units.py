"""The listener in process: its limits at their exact boundaries, eviction order, the error
answers and their rate-limited log line, against real sockets and a small aiohttp app."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import resource
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from prometheus_client import CollectorRegistry

from sidecar import listener as listener_module
from sidecar.callers import Caller, CallerPolicy, caller_of
from sidecar.listener import (
    ALLOW_LIST,
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    Listener,
    _protocol_error,
    _ProtocolErrorLog,
)
from sidecar.listener_limits import (
    CALLER_SHARE,
    OPS_LIMITS,
    SIGNING_LIMITS,
    Limits,
    raise_fd_limit,
    signing_limits,
)
from sidecar.metrics import Metrics
from tests.support import FakeClock


def sample(registry: CollectorRegistry, name: str, listener: str = "test") -> float | None:
    return registry.get_sample_value(f"reditus_sidecar_{name}", {"listener": listener})


async def whoami(request: web.Request) -> web.Response:
    caller = caller_of(request)
    return web.json_response({"caller": None if caller is None else caller.as_json()})


async def times_out(_request: web.Request) -> web.Response:
    raise TimeoutError


async def half_sent(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"partial-body")
    raise RuntimeError("bug after the head went out")


@asynccontextmanager
async def serving(
    limits: Limits = OPS_LIMITS,
    registry: CollectorRegistry | None = None,
    extra: tuple[str, Any] | None = None,
    allow: CallerPolicy | None = None,
) -> AsyncIterator[tuple[Listener, str, int]]:
    app = web.Application()
    if allow is not None:
        app[ALLOW_LIST] = allow
    if extra is not None:
        app.router.add_get(*extra)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/timeout", times_out)
    app.router.add_get("/half", half_sent)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    metrics = Metrics(registry or CollectorRegistry(), [], "test")
    listener = Listener("test", runner, limits, metrics)
    await listener.start_tcp(("127.0.0.1", 0))
    host, port = listener.address.removeprefix("http://").split(":")
    try:
        yield listener, host, int(port)
    finally:
        await listener.stop_accepting()
        await runner.cleanup()


async def exchange(host: str, port: int, raw: bytes) -> bytes:
    """Send `raw` on a new connection; everything the server says until it closes."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def json_body(answer: bytes) -> Any:
    return json.loads(answer.partition(b"\r\n\r\n")[2])


def get(target: str = "/whoami", extra: bytes = b"") -> bytes:
    return (
        b"GET "
        + target.encode()
        + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        + extra
        + b"\r\n"
    )


# --- the limits ---------------------------------------------------------------------------


def test_the_documented_limits() -> None:
    """The caps the README and the chart's sizing rely on."""
    assert (MAX_LINE_SIZE, MAX_FIELD_SIZE, MAX_HEADERS) == (4096, 4096, 24)
    assert Limits(max_connections=32, idle_timeout=5.0, lingering_time=0.0) == OPS_LIMITS
    assert (
        Limits(max_connections=256, idle_timeout=10.0, lingering_time=2.0, caller_share=0.5)
        == SIGNING_LIMITS
    )
    assert CALLER_SHARE == 0.5
    assert OPS_LIMITS.backlog == SIGNING_LIMITS.backlog == 128
    # a caller may hold half of each signing listener's share; the ops listener counts none
    assert (SIGNING_LIMITS.max_per_caller, OPS_LIMITS.max_per_caller) == (128, None)
    assert signing_limits(1 << 20, 2).max_per_caller == 64
    assert Limits(3, 1.0, 0.0, caller_share=0.5).max_per_caller == 1  # rounded down
    assert Limits(1, 1.0, 0.0, caller_share=0.5).max_per_caller == 1  # never below 1
    assert listener_module.PROTOCOL_LOG_INTERVAL == 10.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        OPS_LIMITS.max_connections = 1000  # type: ignore[misc]


@pytest.mark.parametrize(
    ("fd_limit", "listeners", "share", "warned"),
    [
        (1 << 20, 1, 256, False),
        (1 << 20, 2, 128, False),
        (1 << 20, 0, 256, False),  # no signing listener: no division by zero
        (256 + 64 + 32, 1, 256, False),  # exactly enough descriptors
        (256 + 64 + 32 - 1, 1, 255, True),  # one short
        (2 * 128 + 64 + 32, 2, 128, False),
        (2 * 128 + 64 + 32 - 2, 2, 127, True),
        (64 + 32 + 17, 1, 17, True),
        (64 + 32 + 16, 1, 16, True),
        (64 + 32 + 15, 1, 16, True),  # never below 16
        (100, 1, 16, True),
    ],
)
def test_signing_share_of_connections_fits_the_descriptors(
    fd_limit: int, listeners: int, share: int, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.listener")
    limits = signing_limits(fd_limit, listeners)
    assert limits == dataclasses.replace(SIGNING_LIMITS, max_connections=share)
    warnings = [r for r in caplog.records if "open-file limit is low" in r.getMessage()]
    assert len(warnings) == warned
    if warned:
        assert warnings[0].detail == f"RLIMIT_NOFILE {fd_limit}: {share} per signing listener"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("soft", "hard", "failure", "result", "raised_to"),
    [
        (1024, 4096, None, 4096, (4096, 4096)),
        (4096, 4096, None, 4096, None),  # already there: no call
        (1024, 4096, ValueError, 1024, (4096, 4096)),
        (1024, 4096, OSError, 1024, (4096, 4096)),
    ],
)
def test_the_open_file_limit_is_raised_when_it_can_be(
    monkeypatch: pytest.MonkeyPatch,
    soft: int,
    hard: int,
    failure: type[Exception] | None,
    result: int,
    raised_to: tuple[int, int] | None,
) -> None:
    calls: list[tuple[int, int]] = []

    def setrlimit(which: int, limits: tuple[int, int]) -> None:
        assert which == resource.RLIMIT_NOFILE
        calls.append(limits)
        if failure is not None:
            raise failure("not permitted")

    # distinct int objects, as the kernel's answer would be: equal, not identical
    monkeypatch.setattr(resource, "getrlimit", lambda which: (int(str(soft)), int(str(hard))))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert raise_fd_limit() == result
    assert calls == ([] if raised_to is None else [raised_to])


@pytest.mark.parametrize(
    ("exc", "status", "code"),
    [
        (LineTooLong(b"x" * 10, MAX_LINE_SIZE), 431, "headers_too_large"),
        (BadHttpMessage("Too many headers received"), 431, "headers_too_large"),
        (BadHttpMessage("Invalid header value char"), 400, "malformed_request"),
        (ValueError("Too many headers"), 400, "malformed_request"),  # not the parser's
        (None, 400, "malformed_request"),
    ],
)
def test_parser_errors_map_to_status_and_code(
    exc: BaseException | None, status: int, code: str
) -> None:
    assert _protocol_error(exc)[:2] == (status, code)


def test_header_limit_message_names_the_limits() -> None:
    assert _protocol_error(None)[2] == "the request is not valid HTTP/1.1"
    assert _protocol_error(LineTooLong(b"x", 1))[2] == (
        "request line and header fields are limited to 4096 bytes, headers to 24"
    )


async def test_request_target_is_limited_to_exactly_max_line_size() -> None:
    """aiohttp's parser applies max_line_size to the request target."""
    async with serving() as (_listener, host, port):
        for length, status in ((MAX_LINE_SIZE, 200), (MAX_LINE_SIZE + 1, 431)):
            target = "/whoami?" + "a" * (length - len("/whoami?"))
            answer = await exchange(host, port, get(target))
            assert status_of(answer) == status, length


async def test_header_values_are_limited_to_exactly_max_field_size() -> None:
    async with serving() as (_listener, host, port):
        for length, status in ((MAX_FIELD_SIZE, 200), (MAX_FIELD_SIZE + 1, 431)):
            answer = await exchange(host, port, get(extra=b"X-Long: " + b"v" * length + b"\r\n"))
            assert status_of(answer) == status, length
            assert b"vvvv" not in answer


async def test_headers_are_limited_to_exactly_max_headers() -> None:
    async with serving() as (_listener, host, port):
        # get() sends Host and Connection: the rest up to the limit, then one more
        for count, status in ((MAX_HEADERS, 200), (MAX_HEADERS + 1, 431)):
            extra = b"".join(b"X-N%d: 1\r\n" % n for n in range(count - 2))
            answer = await exchange(host, port, get(extra=extra))
            assert status_of(answer) == status, count
            if status == 431:
                assert json_body(answer)["error"]["code"] == "headers_too_large"


# --- connections ---------------------------------------------------------------------------


class FakeHandler:
    """A connection as the listener sees it: its caller, whether a handler runs for it and
    whether it holds request bytes."""

    def __init__(self, in_request: bool = False, *, uid: int | None = None) -> None:
        self.in_request = in_request
        self.holding = False
        self.caller = None if uid is None else Caller(uid=uid, gid=None, pid=None)
        self.closed = False

    def idle(self, _now: float) -> bool:
        return not self.in_request and not self.holding

    def force_close(self) -> None:
        self.closed = True


async def test_a_full_listener_evicts_its_oldest_idle_connection() -> None:
    registry = CollectorRegistry()
    async with serving(Limits(2, 5.0, 0.0), registry) as (listener, _host, _port):
        busy, idle, newcomer = FakeHandler(True), FakeHandler(False), FakeHandler(False)
        assert listener.admit(busy)  # type: ignore[arg-type]
        assert listener.admit(idle)  # type: ignore[arg-type]
        assert sample(registry, "http_connections") == 2
        assert sample(registry, "http_connections_evicted_total") == 0
        assert listener.admit(newcomer)  # type: ignore[arg-type]
        assert (busy.closed, idle.closed, newcomer.closed) == (False, True, False)
        assert sample(registry, "http_connections") == 2
        assert sample(registry, "http_connections_evicted_total") == 1
        # every connection in a request now: the next one is refused, nobody is evicted
        newcomer.in_request = True
        late = FakeHandler(False)
        assert not listener.admit(late)  # type: ignore[arg-type]
        assert sample(registry, "http_connections_refused_total") == 1
        assert sample(registry, "http_connections_evicted_total") == 1
        listener.release(busy)  # type: ignore[arg-type]
        assert sample(registry, "http_connections") == 1
        assert listener.admit(late)  # type: ignore[arg-type]
        assert sample(registry, "http_connections_refused_total") == 1


async def test_an_idle_real_connection_makes_room_and_closed_ones_are_released() -> None:
    registry = CollectorRegistry()
    async with serving(Limits(2, 60.0, 0.0), registry) as (_listener, host, port):
        first_reader, first = await asyncio.open_connection(host, port)
        _second_reader, second = await asyncio.open_connection(host, port)
        await wait_for(lambda: sample(registry, "http_connections") == 2)
        # the third connection is served; the oldest idle one is closed for it
        answer = await exchange(host, port, get())
        assert status_of(answer) == 200
        assert await asyncio.wait_for(first_reader.read(), 10) == b""
        assert sample(registry, "http_connections_evicted_total") == 1
        assert sample(registry, "http_connections_refused_total") == 0
        first.close()
        second.close()
        await wait_for(lambda: sample(registry, "http_connections") == 0)


async def test_a_listener_full_of_requests_refuses_the_next_connection() -> None:
    registry = CollectorRegistry()
    entered, release = asyncio.Event(), asyncio.Event()

    async def block(_request: web.Request) -> web.Response:
        entered.set()
        await release.wait()
        return web.json_response({})

    loop = asyncio.get_running_loop()
    errors: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: errors.append(context))
    async with serving(Limits(1, 60.0, 0.0), registry, extra=("/block", block)) as (
        _listener,
        host,
        port,
    ):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(get("/block"))
        await asyncio.wait_for(entered.wait(), 10)
        assert await exchange(host, port, get()) == b""  # closed at once, unanswered
        assert sample(registry, "http_connections_refused_total") == 1
        assert sample(registry, "http_connections_evicted_total") == 0
        assert sample(registry, "http_connections") == 1
        release.set()
        assert status_of(await asyncio.wait_for(reader.read(), 10)) == 200
        writer.close()
        await wait_for(lambda: sample(registry, "http_connections") == 0)
    loop.set_exception_handler(None)
    assert errors == []


# --- who may take a full signing listener's place ----------------------------------------

APP, ATTACKER, OTHER = 1001, 1002, 1003


def signing_like(cap: int, share: float = CALLER_SHARE) -> Limits:
    return Limits(cap, 60.0, 0.0, caller_share=share)


def admit_all(listener: Listener, *handlers: FakeHandler) -> None:
    for handler in handlers:
        assert listener.admit(handler)  # type: ignore[arg-type]


async def test_an_allowed_callers_connection_is_never_closed_for_an_unlisted_one() -> None:
    registry = CollectorRegistry()
    allow = CallerPolicy(frozenset({APP}), frozenset())
    async with serving(signing_like(4), registry, allow=allow) as (listener, _host, _port):
        app = [FakeHandler(uid=APP), FakeHandler(uid=APP)]  # idle keep-alive, the oldest
        attacker = [FakeHandler(uid=ATTACKER), FakeHandler(uid=OTHER)]
        admit_all(listener, *app, *attacker)
        for handler in attacker:
            handler.holding = True  # sending a head: not to be closed for another
        for newcomer in (FakeHandler(uid=OTHER), FakeHandler(uid=None), FakeHandler(uid=7)):
            assert not listener.admit(newcomer)  # type: ignore[arg-type]
        assert not any(h.closed for h in app + attacker)
        assert sample(registry, "http_connections_refused_total") == 3
        assert sample(registry, "http_connections_evicted_total") == 0
        # an unlisted newcomer may take an unlisted caller's idle connection, never the app's
        attacker[0].holding = False
        assert listener.admit(FakeHandler(uid=7))  # type: ignore[arg-type]
        assert [h.closed for h in app + attacker] == [False, False, True, False]
        assert sample(registry, "http_connections_evicted_total") == 1


async def test_an_allowed_newcomer_takes_an_unlisted_connection_not_in_a_handler() -> None:
    """Even one holding request bytes: an unlisted caller's request can only be refused."""
    registry = CollectorRegistry()
    allow = CallerPolicy(frozenset({APP}), frozenset())
    async with serving(signing_like(3), registry, allow=allow) as (listener, _host, _port):
        busy, sending = FakeHandler(True, uid=ATTACKER), FakeHandler(uid=OTHER)
        sending.holding = True
        app = FakeHandler(uid=APP)
        admit_all(listener, busy, sending, app)
        second = FakeHandler(uid=APP)
        assert listener.admit(second)  # type: ignore[arg-type]
        assert (busy.closed, sending.closed, app.closed) == (False, True, False)
        app.holding = second.holding = True
        # left: an unlisted one in a handler and the app's own, both busy: refused
        assert not listener.admit(FakeHandler(uid=APP))  # type: ignore[arg-type]
        assert sample(registry, "http_connections_refused_total") == 1
        assert sample(registry, "http_connections_evicted_total") == 1


async def test_allowed_callers_are_not_held_to_a_share() -> None:
    allow = CallerPolicy(frozenset({APP}), frozenset())
    async with serving(signing_like(4), allow=allow) as (listener, _host, _port):
        app = [FakeHandler(uid=APP) for _ in range(4)]
        admit_all(listener, *app)
        # full: the app's next one replaces its own oldest idle connection
        assert listener.admit(FakeHandler(uid=APP))  # type: ignore[arg-type]
        assert [h.closed for h in app] == [True, False, False, False]


@pytest.mark.parametrize("uid", [ATTACKER, None])  # unidentified peers are one caller
async def test_one_caller_holds_at_most_its_share(uid: int | None) -> None:
    registry = CollectorRegistry()
    async with serving(signing_like(4), registry) as (listener, _host, _port):
        first, second = FakeHandler(uid=uid), FakeHandler(uid=uid)
        admit_all(listener, first, second)
        first.holding = second.holding = True
        # room for two more, but not for this caller
        assert not listener.admit(FakeHandler(uid=uid))  # type: ignore[arg-type]
        assert sample(registry, "http_connections_refused_total") == 1
        assert listener.admit(FakeHandler(uid=OTHER))  # type: ignore[arg-type]
        # at its share, a caller may only replace its own idle connection
        second.holding = False
        assert listener.admit(FakeHandler(uid=uid))  # type: ignore[arg-type]
        assert (first.closed, second.closed) == (False, True)
        assert sample(registry, "http_connections_evicted_total") == 1
        assert sample(registry, "http_connections") == 3


async def test_a_full_listener_takes_from_the_caller_holding_the_most() -> None:
    registry = CollectorRegistry()
    async with serving(signing_like(6), registry) as (listener, _host, _port):
        app = FakeHandler(uid=APP)  # the oldest, idle
        big = [FakeHandler(uid=ATTACKER) for _ in range(3)]
        small = [FakeHandler(uid=OTHER) for _ in range(2)]
        admit_all(listener, app, *small, *big)
        newcomer = FakeHandler(uid=OTHER)
        assert listener.admit(newcomer)  # type: ignore[arg-type]
        assert [h.closed for h in [app, *small, *big]] == [False, False, False, True, False, False]
        # now OTHER holds 3, ATTACKER 2, APP 1: a newcomer of ATTACKER's may not take from
        # APP (fewer than its own) even though APP's connection is the only idle one
        for handler in [*small, *big[1:], newcomer]:
            handler.holding = True
        assert not listener.admit(FakeHandler(uid=ATTACKER))  # type: ignore[arg-type]
        assert not app.closed
        # a caller holding none may take from a larger one: APP's is the one idle left
        assert listener.admit(FakeHandler(uid=9))  # type: ignore[arg-type]
        assert app.closed
        assert sample(registry, "http_connections_evicted_total") == 2
        assert sample(registry, "http_connections_refused_total") == 1


async def test_a_released_connection_frees_its_callers_share() -> None:
    async with serving(signing_like(4)) as (listener, _host, _port):
        first, second = FakeHandler(uid=ATTACKER), FakeHandler(uid=ATTACKER)
        admit_all(listener, first, second)
        first.holding = second.holding = True
        listener.release(first)  # type: ignore[arg-type]
        listener.release(first)  # type: ignore[arg-type]  # twice: evicted, then lost
        third = FakeHandler(uid=ATTACKER)
        assert listener.admit(third)  # type: ignore[arg-type]
        third.holding = True
        assert not listener.admit(FakeHandler(uid=ATTACKER))  # type: ignore[arg-type]
        assert len(listener._open) == 2


def request(target: str = "/whoami", extra: bytes = b"") -> bytes:
    """A keep-alive GET."""
    return b"GET " + target.encode() + b" HTTP/1.1\r\nHost: x\r\n" + extra + b"\r\n"


async def test_a_connection_sending_its_head_is_kept_and_the_newcomer_refused() -> None:
    """Request bytes received make a connection busy until it is answered: the idle
    keep-alive connection is the one to go, and with none left the newcomer is refused."""
    registry = CollectorRegistry()
    async with serving(signing_like(2, share=1.0), registry) as (listener, host, port):

        def holding() -> int:
            return sum(handler.holding for handler in listener._open)

        sending_reader, sending = await asyncio.open_connection(host, port)
        sending.write(request()[:20])  # part of a request line
        await wait_for(lambda: holding() == 1)
        idle_reader, idle = await asyncio.open_connection(host, port)
        idle.write(request())
        await asyncio.wait_for(idle_reader.readuntil(b"}}"), 10)  # answered: idle again
        await wait_for(lambda: (len(listener._open), holding()) == (2, 1))
        assert status_of(await exchange(host, port, get())) == 200
        assert await asyncio.wait_for(idle_reader.read(), 10) == b""
        _other_reader, other = await asyncio.open_connection(host, port)
        other.write(request()[:20])
        await wait_for(lambda: (len(listener._open), holding()) == (2, 2))
        assert await exchange(host, port, get()) == b""
        assert sample(registry, "http_connections_refused_total") == 1
        assert sample(registry, "http_connections_evicted_total") == 1
        sending.write(request()[20:])  # the head completes and is answered
        answer = await asyncio.wait_for(sending_reader.readuntil(b"}}"), 10)
        assert answer.startswith(b"HTTP/1.1 200 OK")
        await wait_for(lambda: holding() == 1)  # answered: only `other` holds bytes now
        for writer in (sending, idle, other):
            writer.close()


async def test_a_complete_request_not_read_yet_is_answered_not_closed() -> None:
    """Connections of a burst are admitted before the loop reads them: bytes waiting in
    the kernel are request bytes too, so the newcomer is refused, not the waiting one."""
    registry = CollectorRegistry()
    async with serving(signing_like(1, share=1.0), registry) as (_listener, host, port):
        # blocking connects and sends: the kernel queues both before the loop accepts
        first = socket.create_connection((host, port))
        second = socket.create_connection((host, port))
        with first, second:
            first.sendall(get())
            second.sendall(get())
            answers = await asyncio.gather(
                asyncio.to_thread(read_all, first), asyncio.to_thread(read_all, second)
            )
    assert status_of(answers[0]) == 200
    assert answers[1] == b""
    assert sample(registry, "http_connections_refused_total") == 1
    assert sample(registry, "http_connections_evicted_total") == 0


def read_all(sock: socket.socket) -> bytes:
    """Everything until the server closes (a reset, as for a refused connection whose
    bytes were never read, ends it too)."""
    sock.settimeout(10)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data


async def test_a_head_past_its_deadline_may_go() -> None:
    """aiohttp closes such a connection on its next timer tick; a full listener need not wait."""
    async with serving(signing_like(2, share=1.0)) as (listener, host, port):
        _reader, writer = await asyncio.open_connection(host, port)
        writer.write(request()[:20])
        await wait_for(lambda: any(handler.holding for handler in listener._open))
        handler = next(iter(listener._open))
        now = asyncio.get_running_loop().time()
        assert not handler.idle(now)
        assert handler.idle(now + 60.0)  # the head deadline (Limits.idle_timeout) has passed
        writer.close()


async def test_signing_listeners_identify_tcp_peers_unasked() -> None:
    """Per-caller shares need the caller of every connection, with or without an allow-list."""
    async with serving(signing_like(4)) as (_listener, host, port):
        answer = await exchange(host, port, get())
    assert json_body(answer) == {"caller": {"uid": os.getuid(), "via": "tcp"}}


async def wait_for(condition: Any) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10.0
    while not condition():
        assert loop.time() < deadline, "condition not met"
        await asyncio.sleep(0.01)


# --- answers and the log line --------------------------------------------------------------


async def test_a_handler_timeout_is_an_internal_error_not_a_protocol_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    registry = CollectorRegistry()
    async with serving(registry=registry) as (_listener, host, port):
        answer = await exchange(host, port, get("/timeout"))
    assert status_of(answer) == 500
    assert json_body(answer) == {
        "error": {"code": "internal", "message": "internal error; see the sidecar's log"}
    }
    assert b"cache-control: no-store" in answer.lower()
    assert sample(registry, "http_protocol_errors_total") == 0
    assert [r.getMessage() for r in caplog.records].count("request handler failed") == 1


async def test_a_bug_after_the_response_started_closes_the_connection() -> None:
    async with serving() as (_listener, host, port):
        answer = await exchange(host, port, get("/half"))
    assert status_of(answer) == 200
    assert b"partial-body" in answer
    assert b"internal" not in answer  # no second response glued to the first


async def test_malformed_requests_are_counted_and_answered_in_json() -> None:
    registry = CollectorRegistry()
    async with serving(registry=registry) as (_listener, host, port):
        for n in (1, 2):
            answer = await exchange(host, port, b"GARBAGE\r\n\r\n")
            assert status_of(answer) == 400
            assert json_body(answer) == {
                "error": {
                    "code": "malformed_request",
                    "message": "the request is not valid HTTP/1.1",
                }
            }
            assert sample(registry, "http_protocol_errors_total") == n


def header(answer: bytes, name: bytes) -> bytes | None:
    """A response header's value (the first), by lower-case name."""
    for line in answer.partition(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.lower() == name:
            return value.strip()
    return None


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400 Bad Request"),
        (get(extra=b"X-Long: " + b"v" * (MAX_FIELD_SIZE + 1) + b"\r\n"), b"431 "),
        (get(extra=b"".join(b"X-N%d: 1\r\n" % n for n in range(MAX_HEADERS))), b"431 "),
    ],
)
async def test_parser_refusals_are_answered_in_http_1_1_and_close(
    raw: bytes, status: bytes
) -> None:
    """aiohttp's stand-in for a request it could not parse says HTTP/1.0."""
    async with serving() as (_listener, host, port):
        answer = await exchange(host, port, raw)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert header(answer, b"connection") == b"close"


@pytest.mark.parametrize(
    "request_line",
    [
        b"GET /whoami HTTP/1.0",
        b"GET /nope HTTP/1.0",  # refused before routing: not 404
        b"GET /whoami HTTP/2.0",
        b"GET /whoami HTTP/0.9",
        b"GET /whoami",  # HTTP/0.9 style, no version
    ],
)
async def test_requests_that_are_not_http_1_1_are_refused_as_malformed(
    request_line: bytes,
) -> None:
    registry = CollectorRegistry()
    async with serving(registry=registry) as (_listener, host, port):
        raw = request_line + b"\r\nHost: x\r\nConnection: keep-alive\r\nExpect: bogus\r\n\r\n"
        answer = await exchange(host, port, raw)  # read until closed: no keep-alive
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert header(answer, b"connection") == b"close"
    assert json_body(answer) == {
        "error": {"code": "malformed_request", "message": "the request is not valid HTTP/1.1"}
    }
    assert sample(registry, "http_protocol_errors_total") == 1


@pytest.mark.parametrize(
    "expect",
    [
        b"Expect: bogus\r\n",
        b"Expect: 100-continue, bogus\r\n",
        b"Expect: 100-continue\r\nExpect: x\r\n",
        b"Expect: ,100-continue\r\n",
    ],
)
async def test_an_expectation_other_than_100_continue_gets_417_in_json(expect: bytes) -> None:
    registry = CollectorRegistry()
    async with serving(registry=registry) as (_listener, host, port):
        answer = await exchange(host, port, get("/nope", expect))  # before routing: not 404
    assert answer.startswith(b"HTTP/1.1 417 Expectation Failed\r\n")
    assert header(answer, b"connection") == b"close"
    assert header(answer, b"cache-control") == b"no-store"
    assert json_body(answer) == {
        "error": {
            "code": "expectation_failed",
            "message": "the only expectation supported is Expect: 100-continue",
        }
    }
    assert sample(registry, "http_protocol_errors_total") == 1


async def echo_length(request: web.Request) -> web.Response:
    return web.json_response({"length": len(await request.read())})


@pytest.mark.parametrize(
    ("expect", "continues"),
    [(b"100-continue", True), (b"100-Continue", True), (b"", False)],
)
async def test_100_continue_is_still_honoured(expect: bytes, continues: bool) -> None:
    registry = CollectorRegistry()
    async with serving(registry=registry, extra=("/echo", echo_length)) as (_l, host, port):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(get("/echo", b"Content-Length: 5\r\nExpect: " + expect + b"\r\n"))
        if continues:
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"hello")
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    assert status_of(answer) == 200
    assert json_body(answer) == {"length": 5}
    assert sample(registry, "http_protocol_errors_total") == 0


def test_protocol_errors_are_logged_once_per_interval_with_their_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = FakeClock(0.0)  # a monotonic clock may start at zero: the first error still logs
    monkeypatch.setattr(time, "monotonic", clock)
    registry = CollectorRegistry()
    errors = _ProtocolErrorLog("test", Metrics(registry, [], "test"))

    def reported() -> list[int]:
        return [
            r.count  # type: ignore[attr-defined]
            for r in caplog.records
            if r.getMessage() == "malformed HTTP requests refused"
        ]

    errors.record()
    assert reported() == [1]
    for now in (0.5, 9.0, 9.999):
        clock.now = now
        errors.record()
    assert reported() == [1]
    clock.now = 10.0  # exactly one interval after the last line
    errors.record()
    assert reported() == [1, 4]
    clock.now = 19.5
    errors.record()
    assert reported() == [1, 4]
    clock.now = 20.0
    errors.record()
    assert reported() == [1, 4, 2]
    clock.now = 35.0  # well past the interval
    errors.record()
    assert reported() == [1, 4, 2, 1]
    assert caplog.records[-1].listener == "test"  # type: ignore[attr-defined]
    assert sample(registry, "http_protocol_errors_total") == 8


# --- sockets, peers and addresses ----------------------------------------------------------


async def test_tcp_peers_are_identified_only_when_asked() -> None:
    app = web.Application()
    app.router.add_get("/whoami", whoami)
    for identify, expected in ((None, None), (False, None), (True, {"uid": 0, "via": "tcp"})):
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        listener = Listener("test", runner, OPS_LIMITS, Metrics(CollectorRegistry(), [], "t"))
        if identify is None:
            await listener.start_tcp(("127.0.0.1", 0))
        else:
            await listener.start_tcp(("127.0.0.1", 0), identify=identify)
        host, port = listener.address.removeprefix("http://").split(":")
        try:
            answer = await exchange(host, int(port), get())
        finally:
            await listener.stop_accepting()
            await runner.cleanup()
        expected_json = None if expected is None else {**expected, "uid": os.getuid()}
        assert json_body(answer) == {"caller": expected_json}, identify


async def test_unix_socket_peers_are_always_identified(tmp_path: Path) -> None:
    app = web.Application()
    app.router.add_get("/whoami", whoami)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = Listener("unix", runner, OPS_LIMITS, Metrics(CollectorRegistry(), [], "t"))
    assert listener.address == "unix"  # not listening yet
    path = str(tmp_path / "s.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    sock.listen()
    await listener.start_socket(sock)
    assert listener.address == f"unix:{path}"
    try:
        reader, writer = await asyncio.open_unix_connection(path)
        writer.write(get())
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await listener.stop_accepting()
        await runner.cleanup()
    assert json_body(answer) == {
        "caller": {"uid": os.getuid(), "gid": os.getgid(), "pid": os.getpid()}
    }
    assert listener.address == "unix"


async def test_address_names_and_stop_accepting() -> None:
    async with serving() as (listener, host, port):
        assert listener.address == f"http://127.0.0.1:{port}"
        assert listener._server is not None
        sock = listener._server.sockets[0]
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR) != 0
        await listener.stop_accepting()
        assert listener.address == "test"
        with pytest.raises(ConnectionRefusedError):
            await asyncio.wait_for(asyncio.open_connection(host, port), 10)


async def test_ipv6_addresses_are_bracketed() -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    app = web.Application()
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    listener = Listener("v6", runner, OPS_LIMITS, Metrics(CollectorRegistry(), [], "t"))
    try:
        await listener.start_tcp(("::1", 0))
    except OSError:
        await runner.cleanup()
        pytest.skip("no IPv6 loopback")
    try:
        assert listener.address.startswith("http://[::1]:")
    finally:
        await listener.stop_accepting()
        await runner.cleanup()


async def test_a_runner_not_set_up_is_refused() -> None:
    with pytest.raises(RuntimeError, match="set up first"):
        Listener(
            "x", web.AppRunner(web.Application()), OPS_LIMITS, Metrics(CollectorRegistry(), [], "t")
        )
