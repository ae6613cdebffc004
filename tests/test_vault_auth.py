"""Each auth method against a real OpenBao: login, credential files re-read at every
login, refusals with actionable messages, short TTLs (renewal, re-login past max TTL),
and one shared login for concurrent fetches. No credential may reach a log record.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from sidecar.metrics import Metrics
from sidecar.sources.vault import VaultSession, VaultSource
from sidecar.sources.vault_client import VaultHTTPError, VaultLoginRefused
from tests.openbao import (
    Bao,
    approle_session,
    logins,
    sample,
    service_account_jwt,
    session_for,
    write_file,
)
from tests.support import eventually_async


async def revoke_current(openbao: Bao, session: VaultSession) -> None:
    """Revoke the session's token behind its back, as an operator or expiry would."""
    state = await session.token()
    openbao.root().auth.token.revoke(state.token.reveal())


async def test_token_from_env(openbao, kv_path, vault_metrics, registry, leak_guard) -> None:
    token = openbao.token([openbao.read_policy(kv_path)])
    leak_guard.add(token)
    session, source = session_for(
        openbao, vault_metrics, VAULT_TOKEN=token, REDITUS_SIDECAR_KV_PATH=kv_path
    )
    try:
        material = await source.fetch()
        assert (material.product_id, material.version) == ("prod-1", 1)
        assert logins(registry, "token") == 1
        expiry = sample(registry, "reditus_sidecar_vault_token_expiry_timestamp_seconds")
        assert expiry > time.time()
    finally:
        await session.close()


async def test_client_never_reads_home_token_or_env(
    openbao, tmp_path, monkeypatch, leak_guard
) -> None:
    """hvac would fall back to VAULT_TOKEN and ~/.vault-token; our client must not."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    write_file(tmp_path / ".vault-token", openbao.root_token)
    leak_guard.add(openbao.root_token)
    session, _ = session_for(openbao, None, VAULT_TOKEN="placeholder")
    try:
        client = session.transport.client(None)
        assert client.token == ""
        with pytest.raises(VaultHTTPError) as caught:
            await session.transport.call(lambda c: c.auth.token.lookup_self(), token=None)
        assert caught.value.status in (400, 403)
    finally:
        await session.close()


async def test_token_file_is_reread_after_403(
    openbao, kv_path, tmp_path, vault_metrics, registry, leak_guard
) -> None:
    policy = openbao.read_policy(kv_path)
    first, second = openbao.token([policy]), openbao.token([policy])
    leak_guard.add(first, second)
    token_file = write_file(tmp_path / "token", first + "\n")
    session, source = session_for(
        openbao,
        vault_metrics,
        REDITUS_SIDECAR_VAULT_TOKEN_FILE=str(token_file),
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )
    try:
        await source.fetch()
        openbao.root().auth.token.revoke(first)
        write_file(token_file, second)  # what Vault Agent does when it re-authenticates
        assert (await source.fetch()).version == 1
        assert logins(registry, "token") == 2
    finally:
        await session.close()


async def test_approle_rereads_secret_id_file(
    openbao, kv_path, tmp_path, vault_metrics, registry, leak_guard
) -> None:
    # Each secret id works once: the second login must use the rewritten file.
    role, role_id, secret_id = openbao.approle([openbao.read_policy(kv_path)], secret_id_num_uses=1)
    secret_id_file = write_file(tmp_path / "secret-id", secret_id)
    leak_guard.add(secret_id)
    session, source = session_for(
        openbao,
        vault_metrics,
        REDITUS_SIDECAR_VAULT_AUTH="approle",
        REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
        REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(secret_id_file),
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )
    try:
        assert (await source.fetch()).product_id == "prod-1"
        leak_guard.add((await session.token()).token.reveal())
        fresh = openbao.secret_id(role)
        leak_guard.add(fresh)
        write_file(secret_id_file, fresh)
        await revoke_current(openbao, session)
        assert (await source.fetch()).product_id == "prod-1"
        assert logins(registry, "approle") == 2
    finally:
        await session.close()


async def test_approle_without_secret_id(openbao, kv_path, vault_metrics, registry) -> None:
    _, role_id, _ = openbao.approle(
        [openbao.read_policy(kv_path)],
        bind_secret_id=False,
        secret_id_bound_cidrs=["127.0.0.1/32"],
    )
    session, source = session_for(
        openbao,
        vault_metrics,
        REDITUS_SIDECAR_VAULT_AUTH="approle",
        REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )
    try:
        assert (await source.fetch()).version == 1
        assert logins(registry, "approle") == 1
    finally:
        await session.close()


async def test_approle_on_a_custom_mount(openbao, kv_path, tmp_path, leak_guard) -> None:
    _, role_id, secret_id = openbao.approle([openbao.read_policy(kv_path)], mount="approle-reditus")
    leak_guard.add(secret_id)
    session, source = session_for(
        openbao,
        None,
        REDITUS_SIDECAR_VAULT_AUTH="approle",
        REDITUS_SIDECAR_VAULT_AUTH_MOUNT="approle-reditus",
        REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
        REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(write_file(tmp_path / "sid", secret_id)),
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )
    try:
        assert (await source.fetch()).version == 1
    finally:
        await session.close()


async def test_approle_refused(openbao, kv_path, tmp_path, vault_metrics, registry, leak_guard):
    wrong = "00000000-0000-0000-0000-" + "1" * 12
    session, source = approle_session(
        openbao, kv_path, tmp_path, vault_metrics, leak_guard, secret_id=wrong
    )
    try:
        with pytest.raises(VaultLoginRefused) as caught:
            await source.fetch()
        message = str(caught.value)
        assert "REDITUS_SIDECAR_VAULT_ROLE_ID" in message
        assert "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE" in message
        assert wrong not in message
        assert logins(registry, "approle", "error") == 1
    finally:
        await session.close()


def role_session(
    openbao: Bao, metrics: Metrics | None, method: str, role: str, jwt_file: Path, kv_path: str
) -> tuple[VaultSession, VaultSource]:
    """A `jwt` or `kubernetes` login with `role`, reading its token from `jwt_file`."""
    return session_for(
        openbao,
        metrics,
        REDITUS_SIDECAR_VAULT_AUTH=method,
        REDITUS_SIDECAR_VAULT_ROLE=role,
        REDITUS_SIDECAR_VAULT_JWT_FILE=str(jwt_file),
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )


async def test_jwt_rereads_token_file(
    openbao, kv_path, tmp_path, jwt_auth, vault_metrics, registry, leak_guard
) -> None:
    mount, key = jwt_auth
    role = openbao.jwt_role(mount, openbao.read_policy(kv_path))
    first, second = service_account_jwt(key), service_account_jwt(key, lifetime=900)
    leak_guard.add(first, second)
    jwt_file = write_file(tmp_path / "token", first)
    session, source = role_session(openbao, vault_metrics, "jwt", role, jwt_file, kv_path)
    try:
        assert (await source.fetch()).version == 1
        # The projected token rotates; the next login must use the new file content.
        write_file(jwt_file, second)
        await revoke_current(openbao, session)
        assert (await source.fetch()).version == 1
        assert logins(registry, "jwt") == 2
    finally:
        await session.close()


async def test_jwt_signed_by_another_key_is_refused(
    openbao, kv_path, tmp_path, jwt_auth, leak_guard
) -> None:
    from tests.openbao import rsa_key

    mount, _ = jwt_auth
    role = openbao.jwt_role(mount, openbao.read_policy(kv_path))
    forged = service_account_jwt(rsa_key())
    leak_guard.add(forged)
    session, source = role_session(
        openbao, None, "jwt", role, write_file(tmp_path / "token", forged), kv_path
    )
    try:
        with pytest.raises(VaultLoginRefused) as caught:
            await source.fetch()
        assert "REDITUS_SIDECAR_VAULT_ROLE" in str(caught.value)
        assert str(tmp_path / "token") in str(caught.value)
        assert forged not in str(caught.value)
    finally:
        await session.close()


async def test_kubernetes_login_and_token_rotation(
    openbao, kv_path, tmp_path, jwt_auth, k8s_auth, vault_metrics, registry, leak_guard
) -> None:
    _, key = jwt_auth
    mount, reviewer = k8s_auth
    role = openbao.k8s_role(mount, openbao.read_policy(kv_path))
    first, second = service_account_jwt(key), service_account_jwt(key, lifetime=900)
    leak_guard.add(first, second)
    reviewer.accepted.add(first)
    jwt_file = write_file(tmp_path / "token", first)
    session, source = role_session(openbao, vault_metrics, "kubernetes", role, jwt_file, kv_path)
    try:
        reviews = reviewer.reviews
        assert (await source.fetch()).version == 1
        assert reviewer.reviews == reviews + 1
        # kubelet rotates the projected token; the old one stops being valid.
        reviewer.accepted.discard(first)
        reviewer.accepted.add(second)
        write_file(jwt_file, second)
        await revoke_current(openbao, session)
        assert (await source.fetch()).version == 1
        assert logins(registry, "kubernetes") == 2
    finally:
        await session.close()


async def test_kubernetes_token_refused_by_token_review(
    openbao, kv_path, tmp_path, jwt_auth, k8s_auth, leak_guard
) -> None:
    _, key = jwt_auth
    mount, _ = k8s_auth
    role = openbao.k8s_role(mount, openbao.read_policy(kv_path))
    unknown = service_account_jwt(key)
    leak_guard.add(unknown)
    session, source = role_session(
        openbao, None, "kubernetes", role, write_file(tmp_path / "token", unknown), kv_path
    )
    try:
        with pytest.raises(VaultLoginRefused) as caught:
            await source.fetch()
        assert "kubernetes login" in str(caught.value)
        assert unknown not in str(caught.value)
    finally:
        await session.close()


async def _fetch_until(source: VaultSource, done, within: float) -> int:
    """Fetch every 0.2 s until `done()`; every fetch must succeed. Returns the count."""
    deadline = time.monotonic() + within
    count = 0
    while not done():
        assert time.monotonic() < deadline, "the condition was not reached in time"
        assert (await source.fetch()).version == 1
        count += 1
        await asyncio.sleep(0.2)  # the pace of the fetches while polling `done()`
    return count


async def test_short_ttl_renews_then_logs_in_again_past_max_ttl(
    openbao, kv_path, tmp_path, vault_metrics, registry, leak_guard
) -> None:
    session, source = approle_session(
        openbao, kv_path, tmp_path, vault_metrics, leak_guard, token_ttl="2s", token_max_ttl="4s"
    )
    await session.start()
    try:
        first = await session.token()
        leak_guard.add(first.token.reveal())
        await _fetch_until(
            source,
            lambda: (
                sample(registry, "reditus_sidecar_vault_token_renewal_total", result="success") >= 1
            ),
            within=5,
        )
        # Past the first token's max TTL (4 s) a new login replaces it before it expires,
        # without any read asking for it.
        await eventually_async(lambda: logins(registry, "approle") >= 2, within=8)
        started = time.monotonic()
        await _fetch_until(source, lambda: time.monotonic() - started > 1.5, within=5)
        assert (await session.token()).token != first.token
        assert logins(registry, "approle", "error") == 0
    finally:
        await session.close()
    assert sample(registry, "reditus_sidecar_vault_token_expiry_timestamp_seconds") == 0


async def test_non_renewable_token_is_replaced_before_expiry(
    openbao, kv_path, tmp_path, vault_metrics, registry, leak_guard
) -> None:
    session, source = approle_session(
        openbao, kv_path, tmp_path, vault_metrics, leak_guard, token_type="batch", token_ttl="2s"
    )
    await session.start()
    try:
        await source.fetch()
        # No reads from here on: only the session's own maintenance can log in again
        # (frequent reads would hide a missing proactive re-login behind lazy ones).
        await eventually_async(lambda: logins(registry, "approle") >= 3, within=8)
        assert sample(registry, "reditus_sidecar_vault_token_renewal_total", result="success") == 0
        assert logins(registry, "approle", "error") == 0
        assert (await source.fetch()).version == 1  # the current token is a live one
    finally:
        await session.close()


async def test_concurrent_fetches_share_one_login(
    openbao, kv_path, tmp_path, vault_metrics, registry, leak_guard
) -> None:
    session, source = approle_session(openbao, kv_path, tmp_path, vault_metrics, leak_guard)
    await session.start()
    try:
        results = await asyncio.gather(*(source.fetch() for _ in range(20)))
        assert {m.version for m in results} == {1}
        assert logins(registry, "approle") == 1
    finally:
        await session.close()


async def test_failed_login_backs_off_instead_of_storming(
    openbao, kv_path, tmp_path: Path, vault_metrics, registry, leak_guard
) -> None:
    session, source = approle_session(
        openbao,
        kv_path,
        tmp_path,
        vault_metrics,
        leak_guard,
        secret_id="deadbeef-0000-0000-0000-000000000000",
    )
    try:
        outcomes = await asyncio.gather(
            *(source.fetch() for _ in range(20)), return_exceptions=True
        )
        assert all(isinstance(o, VaultLoginRefused) for o in outcomes)
        assert logins(registry, "approle", "error") == 1
        # Within the backoff window the same error comes back with a Retry-After floor.
        with pytest.raises(VaultLoginRefused) as caught:
            await source.fetch()
        assert caught.value.retry_after is not None
        assert caught.value.retry_after > 0
        assert logins(registry, "approle", "error") == 1
    finally:
        await session.close()
