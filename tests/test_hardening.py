"""Hardening: the OpenAPI description against a live sidecar (schemathesis), stalled and
slowloris clients, many connections at once, and SIGTERM under load.

Bounded in examples and connections; no assertion on how fast anything is.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, given, settings
from prometheus_client import CollectorRegistry

from sidecar.api import create_api_app
from sidecar.listener import PROTOCOL_ERROR_CODES
from sidecar.listener_limits import SIGNING_LIMITS
from sidecar.metrics import ERROR_REASONS, Metrics
from sidecar.redact import Redacted
from sidecar.signer import TokenSigner
from sidecar.state import SecretStore, Snapshot

from .support import (
    ROOT,
    TEST_PRODUCT_ID,
    TEST_SECRET,
    SidecarProcess,
    metric_value,
    post_token,
    scrape,
    start_sidecar,
)

OPENAPI = ROOT / "docs" / "openapi.yaml"
BODY = b'{"userId": "u-hardening"}'


def request_head(host: str, *, length: int = len(BODY), close: bool = False) -> bytes:
    return (
        f"POST /v1/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Sidecar-Request: true\r\nContent-Length: {length}\r\n"
        + ("Connection: close\r\n" if close else "")
        + "\r\n"
    ).encode()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One HTTP/1.1 response with a Content-Length body: (status, body)."""
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    match = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    body = await reader.readexactly(int(match.group(1))) if match else b""
    return status, body


def check_token(body: bytes) -> None:
    token = yaml.safe_load(body)["token"]  # JSON is YAML; avoids a second parser import
    claims = jwt.decode(token, TEST_SECRET, algorithms=["HS512"])
    assert claims["ProductId"] == TEST_PRODUCT_ID


# --- the OpenAPI description -------------------------------------------------------------


def test_openapi_documents_every_error_code() -> None:
    spec = yaml.safe_load(OPENAPI.read_text())
    codes = spec["components"]["schemas"]["Error"]["properties"]["error"]["properties"]["code"]
    assert set(codes["enum"]) == set(ERROR_REASONS) | set(PROTOCOL_ERROR_CODES)
    statuses = set(spec["paths"]["/v1/token"]["post"]["responses"])
    assert statuses == {
        "200", "400", "403", "404", "405", "408", "413", "415", "417", "431", "503"
    }  # fmt: skip
    readme = (ROOT / "README.md").read_text()
    for code in ERROR_REASONS + PROTOCOL_ERROR_CODES:
        if code != "internal":
            assert f"`{code}`" in readme, f"{code} missing from the README's error table"


SCHEMA = schemathesis.openapi.from_path(OPENAPI)
SIGN = SCHEMA["/v1/token"]["POST"]


def test_schemathesis_valid_requests_conform(sidecar: SidecarProcess) -> None:
    """Generated valid requests: every response is a documented status and shape, no 5xx."""

    @settings(
        max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(case=SIGN.as_strategy())
    def run(case: Any) -> None:
        response = case.call(base_url=sidecar.api_url, timeout=10)
        case.validate_response(response)
        assert response.status_code in (200, 404), response.text  # 404: unknown product

    run()


def test_schemathesis_invalid_requests_are_refused_cleanly(sidecar: SidecarProcess) -> None:
    """Generated invalid requests: never a 5xx, always a documented error body."""
    negative = SIGN.as_strategy(generation_mode=schemathesis.GenerationMode.NEGATIVE)

    @settings(
        max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None
    )
    @given(case=negative)
    def run(case: Any) -> None:
        response = case.call(base_url=sidecar.api_url, timeout=10)
        assert response.status_code < 500, response.text
        if response.status_code != 200:  # some "invalid" inputs are fine (ignored fields)
            body = response.json()
            assert set(body) == {"error"}
            assert body["error"]["code"] in ERROR_REASONS + PROTOCOL_ERROR_CODES
            assert TEST_SECRET not in response.text

    run()
    assert sidecar.proc.poll() is None


# --- stalled and slow clients ------------------------------------------------------------


def test_stalled_clients_block_no_one_and_are_cut_off(sidecar: SidecarProcess) -> None:
    """Partial headers, a partial body and an idle connection are held open while other
    callers are served; the body gets 408 and the others are closed by the server."""
    host, port = sidecar.api_url.removeprefix("http://").split(":")

    async def run() -> tuple[list[int], bytes, tuple[int, bytes], bytes]:
        half_head = await asyncio.open_connection(host, int(port))
        half_head[1].write(request_head(host)[:40])
        half_body = await asyncio.open_connection(host, int(port))
        half_body[1].write(request_head(host) + BODY[:6])
        idle = await asyncio.open_connection(host, int(port))
        # a slowloris trickling its head one byte at a time still gets nowhere
        trickle = await asyncio.open_connection(host, int(port))
        for byte in request_head(host)[:20]:
            trickle[1].write(bytes([byte]))
            await asyncio.sleep(0.01)  # pacing the trickle, not a synchronisation
        async with aiohttp.ClientSession() as session:
            served = []
            for _ in range(20):
                async with session.post(
                    sidecar.api_url + "/v1/token",
                    data=BODY,
                    headers={"Content-Type": "application/json", "X-Sidecar-Request": "true"},
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as response:
                    served.append(response.status)
                    check_token(await response.read())
        body_answer = await asyncio.wait_for(read_response(half_body[0]), 30)
        assert await asyncio.wait_for(half_body[0].read(), 30) == b""  # then closed
        head_answer = await asyncio.wait_for(half_head[0].read(), 30)
        idle_answer = await asyncio.wait_for(idle[0].read(), 30)
        trickle_answer = await asyncio.wait_for(trickle[0].read(), 30)
        for _, writer in (half_head, half_body, idle, trickle):
            writer.close()
        assert trickle_answer == b""
        return served, head_answer, body_answer, idle_answer

    served, head_answer, body_answer, idle_answer = asyncio.run(run())
    assert served == [200] * 20
    status, body = body_answer
    assert status == 408
    assert b'"request_timeout"' in body
    assert head_answer == b""  # closed without an answer: no request was ever made
    assert idle_answer == b""


async def test_body_timeout_answers_408_in_process(aiohttp_server: Any) -> None:
    registry = CollectorRegistry()
    store = SecretStore(["default"])
    store.replace("default", Snapshot(TokenSigner("p", Redacted(TEST_SECRET)), 1, 0.0))
    app = create_api_app(store, Metrics(registry, ["default"], "test"), body_timeout=0.2)
    server = await aiohttp_server(app)
    reader, writer = await asyncio.open_connection(server.host, server.port)
    writer.write(request_head(server.host) + BODY[:3])
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    assert head.startswith(b"HTTP/1.1 408 ")
    # no keep-alive after it: the connection ends once the answer is out (after the short
    # lingering read that lets the client see the answer rather than a reset)
    assert re.search(rb"(?im)^connection: close\r$", head), head
    length = int(re.search(rb"(?im)^content-length: (\d+)\r$", head).group(1))  # type: ignore[union-attr]
    assert b'"request_timeout"' in await asyncio.wait_for(reader.readexactly(length), 10)
    writer.close()
    sample = {"reason": "request_timeout"}
    assert registry.get_sample_value("reditus_sidecar_token_errors_total", sample) == 1


# --- many connections, SIGTERM under load ------------------------------------------------


async def _burst(host: str, port: int, count: int) -> list[int | None]:
    """`count` connections at once, one request each: statuses (None: closed unanswered)."""

    async def one() -> int | None:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            return None
        try:
            writer.write(request_head(host, close=True) + BODY)
            status, body = await read_response(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        finally:
            writer.close()
        check_token(body)
        return status

    return await asyncio.wait_for(asyncio.gather(*(one() for _ in range(count))), 60)


def test_connections_up_to_a_callers_share_are_all_served(sidecar: SidecarProcess) -> None:
    """Without an allow-list every caller (this test's uid) may hold half the listener."""
    host, port = sidecar.api_url.removeprefix("http://").split(":")
    assert SIGNING_LIMITS.max_per_caller is not None
    count = SIGNING_LIMITS.max_per_caller - 6
    assert asyncio.run(_burst(host, int(port), count)) == [200] * count


@pytest.mark.integration
def test_an_allowed_caller_is_served_up_to_the_cap(tmp_path: Path) -> None:
    """The callers an allow-list names are held to no share: the app may fill the listener."""
    with start_sidecar(tmp_path, REDITUS_SIDECAR_ALLOWED_UIDS=str(os.getuid())) as sidecar:
        host, port = sidecar.api_url.removeprefix("http://").split(":")
        count = SIGNING_LIMITS.max_connections - 6
        assert asyncio.run(_burst(host, int(port), count)) == [200] * count


def test_a_burst_past_the_cap_is_shed_and_counted(sidecar: SidecarProcess) -> None:
    """Beyond the caller's share, its idle connections (no request bytes yet) are closed,
    oldest first, or new ones refused; every one closed is counted, every answer is a valid
    token."""
    host, port = sidecar.api_url.removeprefix("http://").split(":")

    def shed() -> float:
        text = scrape(sidecar.metrics_url)
        return sum(
            metric_value(
                text, f'reditus_sidecar_http_connections_{kind}_total{{listener="signing"}}'
            )
            for kind in ("evicted", "refused")
        )

    before = shed()
    statuses = asyncio.run(_burst(host, int(port), 3 * SIGNING_LIMITS.max_connections))
    closed = statuses.count(None)
    assert set(statuses) <= {200, None}
    assert closed > 0
    assert shed() - before == closed
    assert post_token(sidecar.api_url, {"userId": "after"})[0] == 200


@pytest.mark.integration
def test_sigterm_under_load_loses_no_accepted_request(tmp_path: Path) -> None:
    """Clients on keep-alive connections send back to back; SIGTERM lands mid-stream.
    Every request fully written before the signal gets a 200 with a valid token; after it,
    a request may be refused (connection closed), never answered wrongly."""

    async def client(
        host: str, port: int, signalled: asyncio.Event, results: list[tuple[bool, int | None]]
    ) -> None:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while True:
                writer.write(request_head(host) + BODY)
                await writer.drain()
                before_signal = not signalled.is_set()
                try:
                    status, body = await asyncio.wait_for(read_response(reader), 15)
                except (asyncio.IncompleteReadError, ConnectionError):
                    results.append((before_signal, None))
                    return
                if status == 200:
                    check_token(body)
                results.append((before_signal, status))
                if signalled.is_set() and status != 200:
                    return
        finally:
            writer.close()

    async def run(sidecar: SidecarProcess) -> list[tuple[bool, int | None]]:
        host, port = sidecar.api_url.removeprefix("http://").split(":")
        signalled = asyncio.Event()
        results: list[tuple[bool, int | None]] = []
        tasks = [
            asyncio.create_task(client(host, int(port), signalled, results)) for _ in range(20)
        ]
        # the signal lands once every client is mid-stream (200 answers in), not after a nap
        while len(results) < 200:  # noqa: ASYNC110 - the clients run on this loop
            await asyncio.sleep(0.01)
        sidecar.proc.send_signal(signal.SIGTERM)
        signalled.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        return results

    with start_sidecar(tmp_path) as sidecar:
        results = asyncio.run(run(sidecar))
        assert sidecar.proc.wait(15) == 0
    before = [status for sent_before, status in results if sent_before]
    after = [status for sent_before, status in results if not sent_before]
    assert len(before) >= 200
    assert before == [200] * len(before)
    assert all(status in (200, None) for status in after), after
