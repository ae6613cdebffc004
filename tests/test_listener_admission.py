"""Who keeps a place on a full signing listener, against the real process: the app's
keep-alive connections outlive a connection flood from other uids, and a connection whose
request has arrived is answered, not closed, when a burst finds the listener full.

The sidecar runs under a low open-file limit, which caps its signing listener low
(`signing_limits`). The app is this test (uid 0); attackers are processes of other uids.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sidecar.listener_limits import signing_limits

from .support import SidecarProcess, eventually_async, metric_value, scrape, start_sidecar

pytestmark = pytest.mark.integration

NOFILE = 128
CAP, SHARE = 32, 16  # the signing listener's cap under NOFILE, and one caller's share
APP_CONNECTIONS = 6
ATTACKERS = (4102, 4103)
ROUNDS = 5
SHED_PER_ROUND = 50  # connections the full listener closes between two rounds of the app
BODY = b'{"userId": "u-admission"}'

# An attacker as another uid: opens connections as fast as it can, each idle, sending half
# a head, or sending a whole request (answered 403 by the allow-list, then kept idle),
# reopening whatever the sidecar closes, until its stdin closes. Standard library only.
_FLOOD = r"""
import selectors, socket, sys
host, port = sys.argv[1], int(sys.argv[2])
body = b'{"userId": "u-attacker"}'
whole = (b"POST /v1/token HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
         b"X-Sidecar-Request: true\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
sends = [b"", whole[:30], whole]
selector = selectors.DefaultSelector()
selector.register(sys.stdin, selectors.EVENT_READ)
opened = 0
while True:
    for key, _ in selector.select(timeout=0):
        if key.fileobj is sys.stdin:
            sys.exit(0)
        try:
            data = key.fileobj.recv(65536)
        except OSError:
            data = b""
        if not data:  # closed by the sidecar
            selector.unregister(key.fileobj)
            key.fileobj.close()
    if len(selector.get_map()) > 200:
        continue
    try:
        sock = socket.create_connection((host, port), timeout=2)
        sock.setblocking(False)
        sock.send(sends[opened % 3])
    except OSError:
        continue
    selector.register(sock, selectors.EVENT_READ)
    opened += 1
"""


def shed(sidecar: SidecarProcess) -> float:
    """Signing connections closed so far because the listener (or a caller's share) was full."""
    text = scrape(sidecar.metrics_url)
    return sum(
        metric_value(text, f'reditus_sidecar_http_connections_{kind}_total{{listener="signing"}}')
        for kind in ("evicted", "refused")
    )


def request_head(host: str) -> bytes:
    return (
        f"POST /v1/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"X-Sidecar-Request: true\r\nContent-Length: {len(BODY)}\r\n"
    ).encode()


async def sign(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int | None:
    """One request on a keep-alive connection: its status, None if the connection was closed."""
    try:
        writer.write(request_head("127.0.0.1") + b"\r\n" + BODY)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        assert length is not None
        body = await asyncio.wait_for(reader.readexactly(int(length.group(1))), 10)
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    status = int(head.split(b" ", 2)[1])
    if status == 200:
        assert json.loads(body)["token"].startswith("eyJ")
    return status


@contextmanager
def small_sidecar(tmp_path: Path, **env: str) -> Iterator[SidecarProcess]:
    prlimit = shutil.which("prlimit")
    assert prlimit, "prlimit (util-linux) is needed"
    with start_sidecar(
        tmp_path, wrapper=[prlimit, f"--nofile={NOFILE}:{NOFILE}", "--"], **env
    ) as sc:
        yield sc


def test_the_cap_and_share_are_small_enough_to_fill() -> None:
    limits = signing_limits(NOFILE, 1)
    assert (limits.max_connections, limits.max_per_caller) == (CAP, SHARE)
    # two attackers at their shares fill the listener around the app's connections
    assert APP_CONNECTIONS + len(ATTACKERS) * SHARE > CAP


@pytest.mark.parametrize("allow_list", [True, False], ids=["allow-list", "no-list"])
def test_the_apps_keep_alive_connections_outlive_a_flood_from_other_uids(
    tmp_path: Path, allow_list: bool
) -> None:
    """With an allow-list naming the app, no other caller may close its connections; without
    one, each other uid holds at most its share and takes from the largest holder only."""
    env = {"REDITUS_SIDECAR_ALLOWED_UIDS": "0"} if allow_list else {}

    async def run(sidecar: SidecarProcess) -> tuple[list[int | None], list[int | None]]:
        host, port = sidecar.api_url.removeprefix("http://").split(":")
        app = [await asyncio.open_connection(host, int(port)) for _ in range(APP_CONNECTIONS)]
        kept = [await sign(*connection) for connection in app]
        floods = [
            await asyncio.create_subprocess_exec(
                "setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                "/usr/bin/python3", "-c", _FLOOD, host, port,
                stdin=asyncio.subprocess.PIPE,
            )
            for uid in ATTACKERS
        ]  # fmt: skip
        fresh: list[int | None] = []
        try:
            for _ in range(ROUNDS):
                # the app's connections sit idle while the flood fills the listener
                floor = shed(sidecar) + SHED_PER_ROUND

                def flooded(floor: float = floor) -> bool:
                    assert all(flood.returncode is None for flood in floods), "a flood died"
                    return shed(sidecar) >= floor

                # well within the app's keep-alive (10 s), which would close its connections
                await eventually_async(flooded, within=5, what="the flood shed by the listener")
                kept += [await sign(*connection) for connection in app]
                if allow_list:  # and the app gets a new connection in, too
                    connection = await asyncio.open_connection(host, int(port))
                    fresh.append(await sign(*connection))
                    connection[1].close()
        finally:
            for flood in floods:
                assert flood.stdin is not None
                flood.stdin.close()
                await asyncio.wait_for(flood.wait(), 10)
            for _reader, writer in app:
                writer.close()
        return kept, fresh

    with small_sidecar(tmp_path, **env) as sidecar:
        kept, fresh = asyncio.run(run(sidecar))
        refused = metric_value(
            scrape(sidecar.metrics_url),
            'reditus_sidecar_http_connections_refused_total{listener="signing"}',
        )
    assert kept == [200] * APP_CONNECTIONS * (ROUNDS + 1)
    assert fresh == ([200] * ROUNDS if allow_list else [])
    assert refused > 0  # the flood did find the listener (or its own share) full


def test_a_connection_holding_part_of_a_request_is_never_closed_for_a_newcomer(
    tmp_path: Path,
) -> None:
    """The oldest connection, still sending its request, stays while newcomers replace the
    idle keep-alive connections around it; once complete, its request is answered."""

    async def run(sidecar: SidecarProcess) -> tuple[int | None, list[int | None], float]:
        host, port = sidecar.api_url.removeprefix("http://").split(":")
        sending = await asyncio.open_connection(host, int(port))
        head = request_head(host)
        sending[1].write(head)  # the head without its final CRLF, and no body yet
        idle = [await asyncio.open_connection(host, int(port)) for _ in range(CAP - 1)]
        assert [await sign(*connection) for connection in idle] == [200] * (CAP - 1)
        before = await asyncio.to_thread(shed, sidecar)
        newcomers, kept = [], []
        for _ in range(CAP):  # each replaces the oldest idle one, and stays idle itself
            connection = await asyncio.open_connection(host, int(port))
            newcomers.append(await sign(*connection))
            kept.append(connection)
        evicted = await asyncio.to_thread(shed, sidecar) - before
        sending[1].write(b"\r\n" + BODY)
        try:
            head_answer = await asyncio.wait_for(sending[0].readuntil(b"\r\n\r\n"), 10)
            status: int | None = int(head_answer.split(b" ", 2)[1])
        except (asyncio.IncompleteReadError, ConnectionError):
            status = None
        for _reader, writer in [sending, *idle, *kept]:
            writer.close()
        return status, newcomers, evicted

    with small_sidecar(tmp_path, REDITUS_SIDECAR_ALLOWED_UIDS="0") as sidecar:
        status, newcomers, evicted = asyncio.run(run(sidecar))
    assert newcomers == [200] * CAP
    assert evicted == CAP  # the CAP - 1 idle ones, then the oldest newcomer
    assert status == 200
