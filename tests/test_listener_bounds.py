"""The listeners under attack, against the real process: header floods, idle floods, a low
open-file limit, malformed HTTP. The sidecar must stay alive, inside the chart's memory
limit, and signing throughout; what it refuses it counts, and it never logs request bytes.

Memory is read from /proc; no assertion on how fast anything is.
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import shutil
from pathlib import Path

import pytest

from sidecar.listener import MAX_FIELD_SIZE, MAX_HEADERS
from sidecar.listener_limits import OPS_LIMITS

from .support import (
    SidecarProcess,
    eventually,
    post_token,
    scrape_value,
    start_sidecar,
    wait_http,
)

pytestmark = pytest.mark.integration

CHART_MEMORY_LIMIT_MIB = 128
USER_ID = "u-4242-private-user"


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def counter(sidecar: SidecarProcess, name: str, listener: str) -> float:
    return scrape_value(
        sidecar.metrics_url, f'reditus_sidecar_{name}_total{{listener="{listener}"}}'
    )


def healthy_and_signing(sidecar: SidecarProcess) -> None:
    assert sidecar.proc.poll() is None, "the sidecar died"
    wait_http(sidecar.metrics_url + "/healthz", timeout=5, proc=sidecar.proc)
    status, body = post_token(sidecar.api_url, {"userId": USER_ID})
    assert status == 200, body


@pytest.fixture(autouse=True)
def _many_client_sockets() -> None:
    """The floods below need more sockets than a default soft limit gives the test."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def big_head(index: int) -> bytes:
    """An unfinished request head with as many maximal headers as the limits allow."""
    fields = b"".join(
        b"X-Flood-%d: %s\r\n" % (n, b"a" * (MAX_FIELD_SIZE - 64)) for n in range(MAX_HEADERS - 2)
    )
    return b"GET /metrics?%d HTTP/1.1\r\nHost: flood\r\n" % index + fields


async def hold_connections(
    host: str, port: int, count: int, payload: bytes | None
) -> list[asyncio.StreamWriter]:
    writers = []
    for index in range(count):
        try:
            _reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            continue
        if payload is not None:
            writer.write(payload or big_head(index))
        writers.append(writer)
    return writers


def test_header_flood_on_the_ops_port_stays_bounded(sidecar: SidecarProcess) -> None:
    """The attack from the issue: many connections each sending a large unfinished head."""
    pid = sidecar.proc.pid
    evicted_before = counter(sidecar, "http_connections_evicted", "ops")

    async def run() -> float:
        host, port = host_port(sidecar.metrics_url)
        writers = await hold_connections(host, port, 5 * OPS_LIMITS.max_connections, b"")
        for writer in writers:
            await writer.drain()
        # the sidecar has read what it could: every connection beyond the cap was shed
        await asyncio.to_thread(
            eventually,
            lambda: (
                counter(sidecar, "http_connections_evicted", "ops") - evicted_before
                >= 3 * OPS_LIMITS.max_connections
            ),
            what="flood connections shed",
        )
        peak = rss_mib(pid)
        await asyncio.to_thread(healthy_and_signing, sidecar)
        open_now = scrape_value(
            sidecar.metrics_url, 'reditus_sidecar_http_connections{listener="ops"}'
        )
        assert open_now <= OPS_LIMITS.max_connections
        for writer in writers:
            writer.close()
        return peak

    peak = asyncio.run(run())
    assert peak < CHART_MEMORY_LIMIT_MIB * 0.8, f"RSS {peak:.0f} MiB under the header flood"
    healthy_and_signing(sidecar)


def test_idle_connection_flood_keeps_descriptors_and_memory_bounded(
    sidecar: SidecarProcess,
) -> None:
    pid = sidecar.proc.pid

    async def run() -> tuple[int, float]:
        host, port = host_port(sidecar.metrics_url)
        writers = await hold_connections(host, port, 3000, None)
        await asyncio.to_thread(
            eventually,
            lambda: (
                scrape_value(
                    sidecar.metrics_url, 'reditus_sidecar_http_connections{listener="ops"}'
                )
                <= OPS_LIMITS.max_connections
            ),
            what="ops connections at the cap",
        )
        fds, peak = open_fds(pid), rss_mib(pid)
        await asyncio.to_thread(healthy_and_signing, sidecar)
        for writer in writers:
            writer.close()
        return fds, peak

    fds, peak = asyncio.run(run())
    # the ops cap, the signing client's connections, and the process's own files
    assert fds < OPS_LIMITS.max_connections + 100, fds
    assert peak < CHART_MEMORY_LIMIT_MIB * 0.8


def test_headers_over_the_limits_get_431_as_json(sidecar: SidecarProcess) -> None:
    async def ask(url: str, head: bytes) -> tuple[int, dict[str, object], bytes]:
        reader, writer = await asyncio.open_connection(*host_port(url))
        writer.write(head)
        raw = await asyncio.wait_for(reader.read(), 10)  # closed after the answer
        writer.close()
        head_part, _, body = raw.partition(b"\r\n\r\n")
        return int(head_part.split(b" ", 2)[1]), json.loads(body), raw

    long_field = b"X-Long: " + b"b" * (MAX_FIELD_SIZE + 1) + b"\r\n"
    many = b"".join(b"X-N%d: 1\r\n" % n for n in range(MAX_HEADERS + 1))
    for url in (sidecar.metrics_url, sidecar.api_url):
        for extra in (long_field, many):
            head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + extra + b"\r\n"
            status, body, raw = asyncio.run(ask(url, head))
            assert status == 431
            assert body == {
                "error": {"code": "headers_too_large", "message": body["error"]["message"]}  # type: ignore[index]
            }
            assert b"bbbb" not in raw


def test_malformed_requests_are_counted_and_never_logged_verbatim(tmp_path: Path) -> None:
    """aiohttp would log a traceback quoting the request (user id included) per request."""
    with start_sidecar(tmp_path) as sidecar:
        check_malformed(sidecar)


def check_malformed(sidecar: SidecarProcess) -> None:
    garbage = f'POST /v1/token HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n{{"userId":"{USER_ID}"}}'

    async def send(url: str, count: int) -> list[bytes]:
        host, port = host_port(url)
        answers = []
        for _ in range(count):
            reader, writer = await asyncio.open_connection(host, port)
            writer.write(garbage.encode())
            answers.append(await asyncio.wait_for(reader.read(), 10))
            writer.close()
        return answers

    lines_before = len(sidecar.lines)
    before = {name: counter(sidecar, "http_protocol_errors", name) for name in ("ops", "signing")}
    for url, name in ((sidecar.metrics_url, "ops"), (sidecar.api_url, "signing")):
        answers = asyncio.run(send(url, 300))
        assert all(a.split(b" ", 2)[1] == b"400" for a in answers)
        assert b'"code": "malformed_request"' in answers[0]
        assert counter(sidecar, "http_protocol_errors", name) - before[name] == 300
    healthy_and_signing(sidecar)
    new_lines = sidecar.lines[lines_before:]
    assert not [line for line in new_lines if USER_ID in line or "Traceback" in line]
    reports = [line for line in new_lines if "malformed HTTP requests refused" in line]
    assert 1 <= len(reports) <= 4, reports  # one per listener per 10 s, not one per request


def test_the_open_file_soft_limit_is_raised_to_the_hard_one(tmp_path: Path) -> None:
    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit (util-linux) is needed"
    with start_sidecar(tmp_path, wrapper=[prlimit, "--nofile=256:4096", "--"]) as sidecar:
        limits = Path(f"/proc/{sidecar.proc.pid}/limits").read_text()
        line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["4096", "4096"], line


def test_1100_idle_ops_connections_under_a_1024_file_limit(tmp_path: Path) -> None:
    """The runtime default many containers get: both signing and /healthz must go on."""
    prlimit = shutil.which("prlimit")
    assert prlimit
    with start_sidecar(tmp_path, wrapper=[prlimit, "--nofile=1024:1024", "--"]) as sidecar:

        async def run() -> None:
            host, port = host_port(sidecar.metrics_url)
            writers = await hold_connections(host, port, 1100, None)
            api_writers = await hold_connections(*host_port(sidecar.api_url), 1100, None)
            await asyncio.to_thread(healthy_and_signing, sidecar)
            assert open_fds(sidecar.proc.pid) < 1024
            for writer in writers + api_writers:
                writer.close()

        asyncio.run(run())
        assert (
            counter(sidecar, "http_connections_evicted", "ops") >= 1100 - OPS_LIMITS.max_connections
        )
        healthy_and_signing(sidecar)


def test_ops_connections_that_stall_or_idle_are_closed_by_the_server(
    sidecar: SidecarProcess,
) -> None:
    """A head never finished and a keep-alive connection left idle are both closed by the
    sidecar (5 s on the ops port; aiohttp's default would keep them for an hour)."""

    async def run() -> tuple[bytes, bytes]:
        host, port = host_port(sidecar.metrics_url)
        stalled_reader, stalled = await asyncio.open_connection(host, port)
        stalled.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n")  # no final CRLF
        idle_reader, idle = await asyncio.open_connection(host, port)
        idle.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(idle_reader.readuntil(b'{"status": "ok"}'), 10)
        # read until the server closes; 60 s only bounds a failure, it is not a speed test
        stalled_rest = await asyncio.wait_for(stalled_reader.read(), 60)
        idle_rest = await asyncio.wait_for(idle_reader.read(), 60)
        stalled.close()
        idle.close()
        return stalled_rest, idle_rest

    stalled_rest, idle_rest = asyncio.run(run())
    assert stalled_rest == b""  # closed without an answer: no request was ever made
    assert idle_rest == b""


async def exchange(url: str, raw: bytes) -> bytes:
    """Send `raw` on a new connection; all the server says until it closes."""
    reader, writer = await asyncio.open_connection(*host_port(url))
    writer.write(raw)
    try:
        return await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()


def signing_request(version: bytes = b"HTTP/1.1", extra: bytes = b"") -> bytes:
    body = json.dumps({"userId": USER_ID}).encode()
    return (
        b"POST /v1/token " + version + b"\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\nX-Sidecar-Request: true\r\n"
        b"Content-Length: %d\r\n" % len(body) + extra + b"\r\n" + body
    )


def error_of(answer: bytes) -> tuple[bytes, bytes, str]:
    """Status line, Connection header and error code of a JSON error answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    connection = next(
        (
            line.split(b":", 1)[1].strip()
            for line in lines
            if line.lower().startswith(b"connection:")
        ),
        b"",
    )
    return lines[0], connection, json.loads(body)["error"]["code"]


def test_http_1_0_is_refused_on_every_listener(sidecar: SidecarProcess) -> None:
    """The README: anything but HTTP/1.1 gets 400 malformed_request, before routing.
    Kubelet and Prometheus speak HTTP/1.1, so the ops listener refuses 1.0 too."""
    for url, raw in (
        (sidecar.api_url, signing_request(b"HTTP/1.0")),
        (sidecar.metrics_url, b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n"),
    ):
        answer = asyncio.run(exchange(url, raw))
        assert error_of(answer) == (b"HTTP/1.1 400 Bad Request", b"close", "malformed_request")
        assert b"eyJ" not in answer  # no token
    healthy_and_signing(sidecar)


def test_parser_refusals_answer_in_http_1_1_and_close(sidecar: SidecarProcess) -> None:
    long_field = b"X-Long: " + b"b" * (MAX_FIELD_SIZE + 1) + b"\r\n"
    for url in (sidecar.metrics_url, sidecar.api_url):
        for raw, status, code in (
            (b"GARBAGE\r\n\r\n", b"400 Bad Request", "malformed_request"),
            (
                signing_request(extra=long_field),
                b"431 Request Header Fields Too Large",
                "headers_too_large",
            ),
        ):
            answer = asyncio.run(exchange(url, raw))
            assert error_of(answer) == (b"HTTP/1.1 " + status, b"close", code)


def test_an_unmet_expectation_is_a_json_417_and_100_continue_still_signs(
    sidecar: SidecarProcess,
) -> None:
    before = counter(sidecar, "http_protocol_errors", "signing")
    for url in (sidecar.api_url, sidecar.metrics_url):
        answer = asyncio.run(exchange(url, signing_request(extra=b"Expect: bogus\r\n")))
        assert error_of(answer) == (
            b"HTTP/1.1 417 Expectation Failed",
            b"close",
            "expectation_failed",
        )
    assert counter(sidecar, "http_protocol_errors", "signing") - before == 1

    async def continued() -> tuple[bytes, bytes]:
        reader, writer = await asyncio.open_connection(*host_port(sidecar.api_url))
        raw = signing_request(extra=b"Expect: 100-continue\r\nConnection: close\r\n")
        head, _, body = raw.partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        writer.write(body)  # only once the sidecar asked for it
        try:
            return interim, await asyncio.wait_for(reader.read(), 10)
        finally:
            writer.close()

    interim, answer = asyncio.run(continued())
    assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["token"].startswith("eyJ")
