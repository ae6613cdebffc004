"""Vault faults against real OpenBao servers each test starts and stops by PID:
unreachable, hung (SIGSTOP), stopped and restarted, not there yet at start, TLS with a
custom CA. At source level the errors are precise and bounded in time; through the
real process, signing goes on with the last good secret and recovers by itself. What
OpenBao cannot be made to do (answer 100 MiB, drip its answer) a loopback stand-in does.
"""

from __future__ import annotations

import asyncio
import contextlib
import select
import signal
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sidecar.config import load_settings
from sidecar.devserver import OpenBaoDevServer, free_port_pair
from sidecar.sources.vault import VaultSession
from sidecar.sources.vault_bounds import MAX_ANSWER_BYTES
from sidecar.sources.vault_client import (
    VaultAnswerTooLarge,
    VaultTimeout,
    VaultTLSError,
    VaultTransport,
    VaultUnreachable,
)
from tests.openbao import (
    Bao,
    logins,
    make_ca,
    make_server_cert,
    session_for,
    unexported,
    unique,
    vault_sidecar,
    write_file,
)
from tests.support import (
    SidecarProcess,
    answering_http,
    eventually,
    eventually_async,
    post_token,
    request_token,
    scrape_value,
    signed_with,
    wait_http,
)

SECRET_A = "first-secret-" + "a" * 64
SECRET_B = "second-secret-" + "b" * 64


@pytest.fixture
def own_bao() -> Iterator[OpenBaoDevServer]:
    """A server of this test's own, to pause, stop and restart."""
    server = OpenBaoDevServer()
    with server:
        yield server


def seed(server: OpenBaoDevServer, secret: str = SECRET_A) -> Bao:
    bao = Bao(server)
    bao.put("reditus", product_id="prod-f", product_secret=secret)
    return bao


def settings_env(server: OpenBaoDevServer, **env: str) -> dict[str, str]:
    return {"VAULT_TOKEN": server.root_token, "REDITUS_SIDECAR_VAULT_TIMEOUT": "1", **env}


async def test_unreachable_vault(openbao) -> None:
    port = free_port_pair()
    session, source = session_for(openbao, unexported(), VAULT_ADDR=f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(VaultUnreachable) as caught:
            await source.fetch()
        assert "connection refused" in str(caught.value)
        assert "VAULT_ADDR" in str(caught.value)
    finally:
        await session.close()


def vault_call_running() -> bool:
    """A Vault call's worker thread is alive (the call is in flight)."""
    return any(t.name == "vault-call" and t.is_alive() for t in threading.enumerate())


@pytest.mark.integration
async def test_hung_vault_times_out_and_close_is_prompt(own_bao) -> None:
    seed(own_bao)
    bao = Bao(own_bao)
    session, source = session_for(bao, unexported(), **settings_env(own_bao))
    await session.start()
    try:
        assert (await source.fetch()).version == 1
        own_bao.pause()
        with pytest.raises(VaultUnreachable) as caught:
            await asyncio.wait_for(source.fetch(), 10)
        assert "did not answer within 1s" in str(caught.value)
        own_bao.resume()
        assert (await asyncio.wait_for(source.fetch(), 10)).version == 1
        # A call in flight to a hung Vault must not hold up close(): close() returns while
        # that call is still waiting (it would time out after 1 s).
        own_bao.pause()
        in_flight = asyncio.ensure_future(source.fetch())
        await eventually_async(vault_call_running, what="the read in flight")
        await asyncio.wait_for(session.close(), 30)
        assert not in_flight.done()
        in_flight.cancel()
        with contextlib.suppress(asyncio.CancelledError, VaultUnreachable):
            await in_flight
    finally:
        own_bao.resume()
        await session.close()


@pytest.mark.integration
async def test_close_is_prompt_while_the_first_login_hangs(own_bao) -> None:
    bao = seed(own_bao)
    _, role_id, secret_id = bao.approle([bao.read_policy("reditus")])
    own_bao.pause()
    try:
        settings = bao.settings(
            REDITUS_SIDECAR_VAULT_AUTH="approle",
            REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
            REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(
                write_file(own_bao.workdir / "sid", secret_id)
            ),
            REDITUS_SIDECAR_VAULT_TIMEOUT="5",
        )
        session = VaultSession(settings.vault, unexported())
        await session.start()  # returns at once although Vault cannot answer
        await eventually_async(vault_call_running, what="the login in flight")
        await asyncio.wait_for(session.close(), 30)
        assert vault_call_running()  # closed without waiting out the 5 s login timeout
    finally:
        own_bao.resume()


@pytest.mark.integration
async def test_cold_start_then_vault_appears(tmp_path, vault_metrics, registry) -> None:
    port = free_port_pair()
    server = OpenBaoDevServer(port=port)
    session, source = session_for(Bao(server), vault_metrics, backoff_max=1, **settings_env(server))
    await session.start()
    try:
        with pytest.raises(VaultUnreachable):
            await source.fetch()
        with server:
            seed(server)
            deadline = time.monotonic() + 15
            while True:
                try:
                    material = await source.fetch()
                    break
                except VaultUnreachable as exc:
                    assert time.monotonic() < deadline, "never recovered"
                    await asyncio.sleep(max(0.1, min(exc.retry_after or 0.2, 1)))
            assert material.version == 1
            assert logins(registry, "token", "error") >= 1
            assert logins(registry, "token") >= 1
    finally:
        await session.close()


@pytest.mark.integration
async def test_restarted_vault_means_a_new_login(own_bao, vault_metrics, registry) -> None:
    """A dev server loses everything on restart: the old token draws 403, we log in again."""
    bao = seed(own_bao)
    role, role_id, secret_id = bao.approle([bao.read_policy("reditus")])
    sid = write_file(own_bao.workdir / "sid", secret_id)
    session, source = session_for(
        bao,
        vault_metrics,
        backoff_max=1,
        REDITUS_SIDECAR_VAULT_AUTH="approle",
        REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
        REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(sid),
        REDITUS_SIDECAR_VAULT_TIMEOUT="1",
    )
    try:
        assert (await source.fetch()).version == 1
        own_bao.stop()
        with pytest.raises(VaultUnreachable):
            await source.fetch()
        own_bao.start()
        seed(own_bao, SECRET_B)
        root = bao.root()
        bao.ensure_auth("approle")
        policy = bao.read_policy("reditus")
        root.auth.approle.create_or_update_approle(role, token_policies=[policy])
        root.write_data(f"auth/approle/role/{role}/role-id", data={"role_id": role_id})
        root.write_data(f"auth/approle/role/{role}/custom-secret-id", data={"secret_id": secret_id})
        material = await source.fetch()
        assert material.secret.reveal() == SECRET_B
        assert logins(registry, "approle") == 2
    finally:
        await session.close()


# --- TLS ------------------------------------------------------------------------------


async def test_tls_with_custom_ca(openbao, kv_path) -> None:
    session, source = session_for(
        openbao,
        unexported(),
        VAULT_ADDR=openbao.tls_addr,
        VAULT_CACERT=str(openbao.ca_file),
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )
    try:
        assert (await source.fetch()).version == 1
    finally:
        await session.close()


async def test_tls_with_the_wrong_ca(openbao, kv_path, tmp_path) -> None:
    other_ca, _, _ = make_ca(tmp_path, "other-ca")
    session, source = session_for(
        openbao,
        unexported(),
        VAULT_ADDR=openbao.tls_addr,
        VAULT_CACERT=str(other_ca),
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )
    try:
        with pytest.raises(VaultTLSError) as caught:
            await source.fetch()
        message = str(caught.value)
        assert "certificate verify failed" in message
        assert f"VAULT_CACERT={other_ca}" in message
    finally:
        await session.close()


async def test_tls_without_ca_says_to_set_vault_cacert(openbao, kv_path) -> None:
    session, source = session_for(
        openbao, unexported(), VAULT_ADDR=openbao.tls_addr, REDITUS_SIDECAR_KV_PATH=kv_path
    )
    try:
        with pytest.raises(VaultTLSError, match="set VAULT_CACERT"):
            await source.fetch()
    finally:
        await session.close()


async def test_tls_skip_verify_works_and_warns(openbao, kv_path, caplog) -> None:
    session, source = session_for(
        openbao,
        unexported(),
        VAULT_ADDR=openbao.tls_addr,
        VAULT_SKIP_VERIFY="true",
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )
    try:
        assert (await source.fetch()).version == 1
        assert any("NOT verified" in r.getMessage() for r in caplog.records)
    finally:
        await session.close()


# --- through the real process -----------------------------------------------------------


def sign_ok(api_url: str, secret: str) -> None:
    status, body = post_token(api_url, {"userId": "u-fault"})
    assert status == 200, body
    assert signed_with(str(body["token"]), secret)


def wait_for_secret(api_url: str, secret: str, within: float = 15) -> None:
    deadline = time.monotonic() + within
    while True:
        status, body = post_token(api_url, {"userId": "u-fault"})
        assert status == 200, body
        if signed_with(str(body["token"]), secret):
            return
        assert time.monotonic() < deadline, "the new secret never took effect"
        time.sleep(0.1)


def signs_until(sidecar: SidecarProcess, secret: str, done: Callable[[], bool]) -> None:
    """Sign back to back (each must succeed with `secret`) until `done()`, within 20 s."""
    deadline = time.monotonic() + 20
    while not done():
        assert time.monotonic() < deadline, "the condition was not reached while signing"
        sign_ok(sidecar.api_url, secret)


def refresh_errors(metrics_url: str) -> float:
    return scrape_value(
        metrics_url, 'reditus_sidecar_secret_refresh_total{product="default",result="error"}'
    )


@pytest.mark.integration
@pytest.mark.slow
def test_signing_continues_while_vault_is_hung_or_stopped(own_bao) -> None:
    seed(own_bao)
    with vault_sidecar(own_bao.addr, VAULT_TOKEN=own_bao.root_token) as sidecar:
        sign_ok(sidecar.api_url, SECRET_A)
        errors = refresh_errors(sidecar.metrics_url)

        own_bao.pause()
        # signing goes on, request after request, until a read of the hung Vault has failed
        signs_until(sidecar, SECRET_A, lambda: refresh_errors(sidecar.metrics_url) > errors)
        own_bao.resume()
        Bao(own_bao).put("reditus", product_id="prod-f", product_secret=SECRET_B)
        wait_for_secret(sidecar.api_url, SECRET_B)

        own_bao.stop()
        errors = refresh_errors(sidecar.metrics_url)
        # and goes on while Vault is gone, until a read of it has failed
        signs_until(sidecar, SECRET_B, lambda: refresh_errors(sidecar.metrics_url) > errors)
        own_bao.start()  # same port and root token, empty storage
        seed(own_bao, SECRET_A)
        wait_for_secret(sidecar.api_url, SECRET_A)

        # SIGTERM while Vault hangs: the shutdown must not wait on it.
        errors = refresh_errors(sidecar.metrics_url)
        own_bao.pause()
        # the sidecar has met the hung Vault (a read timed out) and keeps retrying it
        eventually(lambda: refresh_errors(sidecar.metrics_url) > errors, what="a hung read")
        assert sidecar.stop(signal.SIGTERM, timeout=10) == 0
        own_bao.resume()
    assert "secret-" not in sidecar.output()
    assert own_bao.root_token not in sidecar.output()


@pytest.mark.integration
def test_cold_start_before_vault_exists() -> None:
    server = OpenBaoDevServer(port=free_port_pair(), root_token=unique("root"))
    with vault_sidecar(server.addr, wait=False, VAULT_TOKEN=server.root_token) as sidecar:
        wait_http(sidecar.metrics_url + "/readyz", timeout=15, proc=sidecar.proc, want=503)
        status, headers, body = request_token(sidecar.api_url, {"userId": "u-cold"})
        assert status == 503
        assert body["error"]["code"] == "secret_unavailable"  # type: ignore[index]
        assert int(headers["Retry-After"]) >= 1
        with server:
            seed(server)
            sidecar.wait_ready(timeout=15)
            sign_ok(sidecar.api_url, SECRET_A)


async def test_something_else_answering_at_vault_addr(openbao) -> None:
    """A proxy or web server at VAULT_ADDR: a clear error, not a crash."""
    with answering_http(b"<html>hello</html>", "text/html") as (url, _seen):
        session, source = session_for(openbao, unexported(), VAULT_ADDR=url)
        try:
            with pytest.raises(VaultUnreachable, match="not Vault's JSON API"):
                await source.fetch()
        finally:
            await session.close()


# --- what OpenBao cannot be made to do: a huge or a dripping answer ----------------------
# A stand-in on loopback plays a Vault (or whatever answers at VAULT_ADDR) that sends 100 MiB
# or drips its answer a byte at a time. It records, per connection, how much it could send
# and whether the sidecar closed the connection: the observable side of the bounds.

MiB = 1024 * 1024
HUGE = 100 * MiB
DRIP_EVERY = 0.05  # seconds between two dripped bytes
DRIP_FOR = 60.0  # a dripping answer ends (and its connection) after this long at most


@dataclass
class Seen:
    """One connection as the stand-in saw it."""

    sent: int = 0  # bytes of the answer that left the stand-in
    closed: threading.Event = field(default_factory=threading.Event)  # by the sidecar


def peer_closed(conn: socket.socket, within: float) -> bool:
    """Whether the client closed its end, waiting up to `within` for it (it sends nothing
    after its request, so anything readable is the end: EOF or a reset)."""
    readable, _, _ = select.select([conn], [], [], within)
    if not readable:
        return False
    try:
        return conn.recv(1) == b""
    except OSError:
        return True


Answer = Callable[[socket.socket, Seen, threading.Event], None]


@contextlib.contextmanager
def stand_in(answer: Answer, tls: ssl.SSLContext | None = None) -> Iterator[tuple[str, list[Seen]]]:
    """A loopback server (with `tls`, over TLS) answering each request with
    `answer(conn, seen, stop)`; yields its URL and what each connection saw. Every thread
    of it ends by the time it is left."""
    server = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    seen: list[Seen] = []
    threads: list[threading.Thread] = []

    def serve(conn: socket.socket, record: Seen) -> None:
        if tls is not None:
            conn = tls.wrap_socket(conn, server_side=True)
        with conn:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            try:
                answer(conn, record, stop)
            except OSError:
                record.closed.set()

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:  # shut down: the test is over
                return
            record = Seen()
            seen.append(record)
            thread = threading.Thread(target=serve, args=(conn, record), name="stand-in-conn")
            threads.append(thread)
            thread.start()

    acceptor = threading.Thread(target=accept, name="stand-in-accept")
    acceptor.start()
    try:
        scheme = "http" if tls is None else "https"
        yield f"{scheme}://127.0.0.1:{server.getsockname()[1]}", seen
    finally:
        stop.set()
        server.shutdown(socket.SHUT_RDWR)
        server.close()
        for thread in [acceptor, *threads]:
            thread.join(DRIP_FOR)


def until_closed(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
    """After the answer: hold the connection until the client closes it."""
    while not stop.is_set():
        if peer_closed(conn, 0.1):
            seen.closed.set()
            return


def flood(head: bytes, size: int, *, chunked: bool = False) -> Answer:
    """`head`, then `size` bytes of body as fast as the client takes them."""

    def answer(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
        conn.sendall(head)
        block = b"x" * (64 * 1024)
        while seen.sent < size and not stop.is_set():
            piece = block[: size - seen.sent]
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece) if chunked else piece)
            seen.sent += len(piece)
        if chunked:
            conn.sendall(b"0\r\n\r\n")
        until_closed(conn, seen, stop)

    return answer


def drip(head: bytes, dripped: bytes) -> Answer:
    """`head` at once, then `dripped` one byte every DRIP_EVERY seconds: each read of the
    client gets a byte well within its timeout, so only a deadline for the whole call ends
    it."""

    def answer(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
        conn.sendall(head)
        seen.sent = len(head)
        ends = time.monotonic() + DRIP_FOR
        for byte in dripped:
            if stop.is_set() or time.monotonic() > ends:
                return
            if peer_closed(conn, DRIP_EVERY):
                seen.closed.set()
                return
            conn.sendall(bytes([byte]))
            seen.sent += 1
        until_closed(conn, seen, stop)

    return answer


def kernel_buffers() -> int:
    """The most loopback TCP can hold in flight: the largest send and receive buffers."""
    sizes = [
        int(Path(f"/proc/sys/net/ipv4/tcp_{kind}").read_text().split()[2])
        for kind in ("rmem", "wmem")
    ]
    return sum(sizes)


def a_transport(url: str, **env: str) -> VaultTransport:
    settings = load_settings(
        {
            "VAULT_ADDR": url,
            "VAULT_TOKEN": "s.stand-in",
            "REDITUS_SIDECAR_VAULT_TIMEOUT": "3",
            **env,
        }
    )
    return VaultTransport(settings.vault)


@pytest.fixture(scope="module")
def stand_in_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[ssl.SSLContext, Path]:
    """The stand-in's TLS context and the CA file that trusts it."""
    directory = tmp_path_factory.mktemp("stand-in-tls")
    ca, ca_key, ca_cert = make_ca(directory, "stand-in-ca")
    cert, key = make_server_cert(directory, ca_key, ca_cert)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, ca


def read_secret(client: Any) -> Any:
    return client.secrets.kv.v2.read_secret_version(
        path="reditus", mount_point="secret", raise_on_deleted_version=True
    )


JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


@pytest.mark.parametrize(
    "answer",
    [
        # Content-Length says 100 MiB and no byte of the body follows: refused on the header
        # alone (reading would wait for a body that never comes, and time out instead).
        pytest.param(
            lambda: drip(JSON_HEAD + b"Content-Length: %d\r\n\r\n" % HUGE, b""), id="declared"
        ),
        pytest.param(
            lambda: flood(JSON_HEAD + b"Transfer-Encoding: chunked\r\n\r\n", HUGE, chunked=True),
            id="chunked",
        ),
        pytest.param(lambda: flood(JSON_HEAD + b"Connection: close\r\n\r\n", HUGE), id="to-eof"),
        # requests reads a redirect's body before following it: that body is capped too.
        pytest.param(
            lambda: flood(
                b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /v1/elsewhere\r\n"
                b"Connection: close\r\n\r\n",
                HUGE,
            ),
            id="redirect",
        ),
    ],
)
async def test_an_answer_over_1_mib_is_refused_unread(answer: Callable[[], Answer]) -> None:
    """100 MiB from VAULT_ADDR used to be read whole (259 MB RSS): now at most 1 MiB of it
    is, then the connection is closed and the call fails with its own error."""
    with stand_in(answer()) as (url, seen):
        with pytest.raises(VaultAnswerTooLarge) as caught:
            await a_transport(url).call(read_secret, token="s.stand-in")
        assert str(caught.value) == (
            f"Vault's answer exceeds 1 MiB: {url} sent more than any answer the sidecar "
            "needs, and the rest was not read; check VAULT_ADDR (and any proxy in between)"
        )
        [connection] = seen
        await eventually_async(connection.closed.is_set, what="the connection closed")
        # What left the stand-in is what we read plus what the kernel buffered, nowhere
        # near the 100 MiB on offer.
        assert connection.sent <= MAX_ANSWER_BYTES + kernel_buffers() < HUGE


@pytest.mark.parametrize("size", [MAX_ANSWER_BYTES, MAX_ANSWER_BYTES + 1])
@pytest.mark.parametrize("declared", [True, False], ids=["declared", "to-eof"])
async def test_an_answer_of_1_mib_is_read_and_one_byte_more_is_not(
    size: int, declared: bool
) -> None:
    envelope = b'{"data": {"data": {"pad": ""}, "metadata": {"version": 1}}}'
    body = envelope.replace(b'""', b'"' + b"p" * (size - len(envelope)) + b'"')
    assert len(body) == size
    length = b"Content-Length: %d\r\n" % size if declared else b"Connection: close\r\n"

    def answer(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
        conn.sendall(JSON_HEAD + length + b"\r\n" + body)
        seen.sent = len(body)
        if not declared:
            conn.shutdown(socket.SHUT_WR)  # the end of the body
        until_closed(conn, seen, stop)

    with stand_in(answer) as (url, _):
        call = a_transport(url).call(read_secret, token="s.stand-in")
        if size > MAX_ANSWER_BYTES:
            with pytest.raises(VaultAnswerTooLarge):
                await call
        else:
            assert len((await call)["data"]["data"]["pad"]) == size - len(envelope)


async def test_answers_within_the_bounds_keep_their_connection() -> None:
    """The bounds cost nothing to a well-behaved Vault: answers read in full leave their
    connection in the pool, and the next call (with a deadline of its own) reuses it."""
    answer = b'{"data": {"data": {"a": "b"}, "metadata": {"version": 7}}}'

    def keep_alive(conn: socket.socket, seen: Seen, stop: threading.Event) -> None:
        while not stop.is_set():
            conn.sendall(JSON_HEAD + b"Content-Length: %d\r\n\r\n" % len(answer) + answer)
            seen.sent += len(answer)
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    seen.closed.set()
                    return
                head += chunk

    with stand_in(keep_alive) as (url, seen):
        transport = a_transport(url)
        for _ in range(3):
            read = await transport.call_within(read_secret, token="s.stand-in", bound=1.0)
            assert read["data"]["metadata"]["version"] == 7
        [connection] = seen  # one connection for the three calls
        assert connection.sent == 3 * len(answer)
        transport.close()
        await eventually_async(connection.closed.is_set, what="closed with the session")


# A header longer than the drip lasts: the answer's head never completes.
ENDLESS_HEAD = JSON_HEAD + b"X-Pad: " + b"p" * 4096 + b"\r\n\r\n"


@pytest.mark.parametrize(
    ("head", "dripped", "tls"),
    [
        pytest.param(b"", ENDLESS_HEAD, False, id="headers"),
        pytest.param(b"", ENDLESS_HEAD, True, id="headers-tls"),
        pytest.param(JSON_HEAD + b"Content-Length: 4096\r\n\r\n", b" " * 4096, False, id="body"),
    ],
)
async def test_a_dripping_vault_is_cut_at_the_calls_bound(
    head: bytes, dripped: bytes, tls: bool, stand_in_tls: tuple[ssl.SSLContext, Path]
) -> None:
    """Every read gets a byte within its timeout, so only the call's own deadline ends it:
    at that bound the connection is closed and the worker thread ends (before, both lived
    on for as long as the drip, one per breaker window)."""
    context, ca = stand_in_tls
    before = set(threading.enumerate())
    with stand_in(drip(head, dripped), context if tls else None) as (url, seen):
        transport = a_transport(url, VAULT_CACERT=str(ca))
        with pytest.raises(VaultTimeout, match="did not answer within 3s"):
            await transport.call_within(read_secret, token="s.stand-in", bound=1.0)
        [connection] = seen
        await eventually_async(connection.closed.is_set, what="the stand-in saw the close")
        assert connection.sent < len(head + dripped)  # cut before the answer was complete

        def leftovers() -> list[str]:
            return [t.name for t in threading.enumerate() if t not in before and t.is_alive()]

        # the stand-in's acceptor lives until the block ends; the call's thread, the
        # stand-in's thread for that connection and any timer must be gone
        await eventually_async(lambda: leftovers() == ["stand-in-accept"], what="threads end")
