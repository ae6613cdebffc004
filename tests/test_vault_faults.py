"""Vault faults against real OpenBao servers each test starts and stops by PID:
unreachable, hung (SIGSTOP), stopped and restarted, not there yet at start, TLS with a
custom CA. At source level the errors are precise and bounded in time; through the
real process, signing goes on with the last good secret and recovers by itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator

import pytest

from sidecar.devserver import OpenBaoDevServer, free_port_pair
from sidecar.sources.vault import VaultSession
from sidecar.sources.vault_client import VaultTLSError, VaultUnreachable
from tests.openbao import (
    Bao,
    logins,
    make_ca,
    session_for,
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
    session, source = session_for(openbao, None, VAULT_ADDR=f"http://127.0.0.1:{port}")
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


async def test_hung_vault_times_out_and_close_is_prompt(own_bao) -> None:
    seed(own_bao)
    bao = Bao(own_bao)
    session, source = session_for(bao, None, **settings_env(own_bao))
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
        session = VaultSession(settings.vault)
        await session.start()  # returns at once although Vault cannot answer
        await eventually_async(vault_call_running, what="the login in flight")
        await asyncio.wait_for(session.close(), 30)
        assert vault_call_running()  # closed without waiting out the 5 s login timeout
    finally:
        own_bao.resume()


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
        None,
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
        None,
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
        openbao, None, VAULT_ADDR=openbao.tls_addr, REDITUS_SIDECAR_KV_PATH=kv_path
    )
    try:
        with pytest.raises(VaultTLSError, match="set VAULT_CACERT"):
            await source.fetch()
    finally:
        await session.close()


async def test_tls_skip_verify_works_and_warns(openbao, kv_path, caplog) -> None:
    session, source = session_for(
        openbao,
        None,
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
        session, source = session_for(openbao, None, VAULT_ADDR=url)
        try:
            with pytest.raises(VaultUnreachable, match="not Vault's JSON API"):
                await source.fetch()
        finally:
            await session.close()
