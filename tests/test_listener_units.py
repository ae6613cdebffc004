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
from sidecar.callers import caller_of
from sidecar.listener import (
    MAX_FIELD_SIZE,
    MAX_HEADERS,
    MAX_LINE_SIZE,
    OPS_LIMITS,
    SIGNING_LIMITS,
    Limits,
    Listener,
    _protocol_error,
    _ProtocolErrorLog,
    raise_fd_limit,
    signing_limits,
)
from sidecar.metrics import Metrics


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
) -> AsyncIterator[tuple[Listener, str, int]]:
    app = web.Application()
    if extra is not None:
        app.router.add_get(*extra)
    app.router.add_get("/whoami", whoami)
    app.router.add_get("/timeout", times_out)
    app.router.add_get("/half", half_sent)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    metrics = Metrics(registry or CollectorRegistry(), [], "test")
    listener = Listener("test", runner, limits, metrics)
    await listener.start_tcp("127.0.0.1", 0)
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
    assert Limits(max_connections=256, idle_timeout=10.0, lingering_time=2.0) == SIGNING_LIMITS
    assert OPS_LIMITS.backlog == SIGNING_LIMITS.backlog == 128
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
    def __init__(self, in_request: bool) -> None:
        self.in_request = in_request
        self.closed = False

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


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_protocol_errors_are_logged_once_per_interval_with_their_count(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    clock = Clock(0.0)  # a monotonic clock may start at zero: the first error still logs
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
            await listener.start_tcp("127.0.0.1", 0)
        else:
            await listener.start_tcp("127.0.0.1", 0, identify=identify)
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
        await listener.start_tcp("::1", 0)
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
