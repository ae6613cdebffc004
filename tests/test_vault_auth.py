"""Each auth method against a real OpenBao: login, credential files re-read at every
login, refusals with actionable messages, short TTLs (renewal, re-login past max TTL),
and one shared login for concurrent fetches. No credential may reach a log record.

At the end, in process: sidecar/sources/vault_auth.py's own decisions (credential files,
what each method sends, what lookup-self and renewal answers mean, each refusal's
message) against a recording stand-in for hvac, with an injected clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest

from sidecar.config import VaultSettings, load_settings
from sidecar.errors import SecretUnavailable
from sidecar.metrics import Metrics
from sidecar.redact import Redacted
from sidecar.sources.vault import VaultSession, VaultSource
from sidecar.sources.vault_auth import Authenticator, TokenState, read_credential, renew
from sidecar.sources.vault_client import VaultHTTPError, VaultLoginRefused
from tests.openbao import (
    Bao,
    approle_session,
    logins,
    sample,
    service_account_jwt,
    session_for,
    unexported,
    write_file,
)
from tests.support import FakeClock, eventually_async


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
    openbao, tmp_path, monkeypatch, leak_guard, vault_metrics
) -> None:
    """hvac would fall back to VAULT_TOKEN and ~/.vault-token; our client must not."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("VAULT_TOKEN", openbao.root_token)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tmp_path / "missing.pem"))
    write_file(tmp_path / ".vault-token", openbao.root_token)
    leak_guard.add(openbao.root_token)
    session, _ = session_for(openbao, vault_metrics, VAULT_TOKEN="placeholder")
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
        unexported(),
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
    openbao: Bao, metrics: Metrics, method: str, role: str, jwt_file: Path, kv_path: str
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
        openbao, unexported(), "jwt", role, write_file(tmp_path / "token", forged), kv_path
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
        openbao, unexported(), "kubernetes", role, write_file(tmp_path / "token", unknown), kv_path
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


# --- in process: credential files -----------------------------------------------------------


JWT_VAR = "REDITUS_SIDECAR_VAULT_JWT_FILE"


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"j" * 65536, None),  # 64 KiB exactly: read whole
        (b"  eyJ.token \n", None),
        (b"j" * 65537, "is larger than 64 KiB"),
        (b"\xff\xfe\x00", "is not UTF-8 text"),
        (b" \n\t", "is empty"),
    ],
)
def test_a_credential_file_up_to_64_kib_of_text(
    tmp_path: Path, content: bytes, error: str | None
) -> None:
    path = tmp_path / "token"
    path.write_bytes(content)
    if error is None:
        assert read_credential(path, "JWT", JWT_VAR) == content.decode().strip()
    else:
        with pytest.raises(SecretUnavailable) as caught:
            read_credential(path, "JWT", JWT_VAR)
        assert str(caught.value) == f"JWT file {path} ({JWT_VAR}) {error}"


def test_a_credential_file_missing_or_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SecretUnavailable) as caught:
        read_credential(tmp_path / "gone", "JWT", JWT_VAR)
    assert str(caught.value) == f"JWT file {tmp_path / 'gone'} ({JWT_VAR}) does not exist"
    with pytest.raises(SecretUnavailable) as caught:
        read_credential(tmp_path, "JWT", JWT_VAR)
    assert str(caught.value) == f"cannot read the JWT file {tmp_path} ({JWT_VAR}): Is a directory"


# --- in process: a token's lifetime ---------------------------------------------------------


@pytest.fixture
def clock(clock: FakeClock) -> FakeClock:
    """The clocks handed to vault_auth (the shared fake, conftest.py), fixed: Unix time 1000,
    monotonic 50."""
    clock.now, clock.epoch = 50.0, 950.0
    return clock


def state(ttl: float, *, granted_at: float = 40.0, increment: int = 60, renewable: bool = True):
    return TokenState(Redacted("s.held"), renewable, ttl, granted_at, increment)


def test_token_lifetime(clock: FakeClock) -> None:
    assert state(30.0).expires_at == 70.0
    assert state(0.0).expires_at is None
    assert state(30.0).expiry_wall_time(clock, clock.time) == 1020.0  # 1000 + (40 + 30 - 50)
    assert state(0.0).expiry_wall_time(clock, clock.time) == 0.0
    assert state(1.0).expires_at == 41.0  # a one-second token still expires
    assert state(1.0).expiry_wall_time(clock, clock.time) == 991.0
    assert state(30.0).capped is False


# --- in process: what each method sends, what Vault's answers mean ---------------------------


class Recorded:
    """A transport whose calls run against a MagicMock hvac client; records each token."""

    def __init__(self) -> None:
        self.client = MagicMock()
        self.tokens: list[str | None] = []

    async def call(self, fn: Any, *, token: str | None) -> Any:
        self.tokens.append(token)
        return fn(self.client)


def settings_of(**changes: Any) -> VaultSettings:
    base = load_settings({"VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "s.static"}).vault
    if "auth" in changes:  # a fresh string, as config makes it: never identical to a literal
        changes["auth"] = "".join(changes["auth"])
    return dataclasses.replace(base, **changes)


def approle(tmp_path: Path, secret_id: str | None = "sid-value") -> VaultSettings:  # noqa: S107
    return settings_of(
        auth="approle",
        auth_mount="approle-x",
        token=None,
        role_id="rid-value",
        secret_id_file=None if secret_id is None else write_file(tmp_path / "sid", secret_id),
    )


LOGGED_IN = {"auth": {"client_token": "s.new", "lease_duration": 45, "renewable": False}}
LOOKED_UP = {"data": {"ttl": 59, "creation_ttl": 60, "renewable": True}}


async def test_approle_login_sends_role_and_secret_id_and_trusts_lookup_self(
    tmp_path: Path, clock: FakeClock
) -> None:
    transport = Recorded()
    transport.client.auth.approle.login.return_value = LOGGED_IN
    transport.client.auth.token.lookup_self.return_value = LOOKED_UP
    token = await Authenticator(approle(tmp_path), clock).login(transport)  # type: ignore[arg-type]
    transport.client.auth.approle.login.assert_called_once_with(
        "rid-value", "sid-value", use_token=False, mount_point="approle-x"
    )
    assert transport.tokens == [None, "s.new"]
    assert token == TokenState(Redacted("s.new"), True, 59.0, 50.0, 60)
    assert token.token.reveal() == "s.new"


async def test_approle_login_without_a_secret_id(tmp_path: Path) -> None:
    transport = Recorded()
    transport.client.auth.approle.login.return_value = LOGGED_IN
    await Authenticator(approle(tmp_path, None)).login(transport)  # type: ignore[arg-type]
    transport.client.auth.approle.login.assert_called_once_with(
        "rid-value", None, use_token=False, mount_point="approle-x"
    )


@pytest.mark.parametrize(
    ("lookup", "expected"),
    [
        # lookup-self refused: the login answer's lease is what we know
        (VaultHTTPError(403, ["permission denied"], None, None), (False, 45.0, 45)),
        ({"data": None}, (False, 45.0, 45)),
        ("not a mapping", (False, 45.0, 45)),
        ({"data": {"ttl": 30, "renewable": True}}, (True, 30.0, 30)),  # no creation_ttl
    ],
)
async def test_a_tokens_lifetime_from_lookup_self_or_the_login_answer(
    tmp_path: Path, clock: FakeClock, lookup: Any, expected: tuple[bool, float, int]
) -> None:
    transport = Recorded()
    transport.client.auth.approle.login.return_value = LOGGED_IN
    if isinstance(lookup, Exception):
        transport.client.auth.token.lookup_self.side_effect = lookup
    else:
        transport.client.auth.token.lookup_self.return_value = lookup
    token = await Authenticator(approle(tmp_path), clock).login(transport)  # type: ignore[arg-type]
    assert (token.renewable, token.ttl, token.increment) == expected


async def test_a_login_answer_without_a_lease_means_no_expiry(tmp_path: Path) -> None:
    transport = Recorded()
    transport.client.auth.approle.login.return_value = {"auth": {"client_token": "s.new"}}
    transport.client.auth.token.lookup_self.side_effect = VaultHTTPError(403, [], None, None)
    token = await Authenticator(approle(tmp_path)).login(transport)  # type: ignore[arg-type]
    assert (token.renewable, token.ttl, token.increment) == (False, 0.0, 0)


@pytest.mark.parametrize("answer", [{"auth": None}, {"auth": {"client_token": ""}}, "text"])
async def test_a_login_answer_without_a_token_is_a_refusal(tmp_path: Path, answer: Any) -> None:
    transport = Recorded()
    transport.client.auth.approle.login.return_value = answer
    with pytest.raises(VaultLoginRefused) as caught:
        await Authenticator(approle(tmp_path)).login(transport)  # type: ignore[arg-type]
    assert str(caught.value) == "Vault's approle login at auth/approle-x returned no token"


@pytest.mark.parametrize(
    ("lookup", "expected"),
    [
        ({"data": {"ttl": 3600, "creation_ttl": 7200, "renewable": True}}, (True, 3600.0, 7200)),
        ({"data": {"ttl": 0, "renewable": False}}, (False, 0.0, 0)),  # root: never expires
    ],
)
async def test_a_static_token_is_only_looked_up(
    lookup: dict[str, Any], expected: tuple[bool, float, int]
) -> None:
    transport = Recorded()
    transport.client.auth.token.lookup_self.return_value = lookup
    auth = Authenticator(settings_of())
    token = await auth.login(transport)  # type: ignore[arg-type]
    assert transport.tokens == ["s.static"]
    assert transport.client.auth.approle.login.call_count == 0
    assert (token.token.reveal(), token.renewable, token.ttl, token.increment) == (
        "s.static",
        *expected,
    )
    assert auth.can_relogin is False


async def test_a_token_file_is_read_at_each_login(tmp_path: Path) -> None:
    transport = Recorded()
    transport.client.auth.token.lookup_self.return_value = {"data": {"ttl": 10}}
    token_file = write_file(tmp_path / "token", "s.first\n")
    auth = Authenticator(settings_of(token=None, token_file=token_file))
    assert auth.can_relogin is True
    assert (await auth.login(transport)).token.reveal() == "s.first"  # type: ignore[arg-type]
    write_file(token_file, "s.second")
    assert (await auth.login(transport)).token.reveal() == "s.second"  # type: ignore[arg-type]
    assert transport.tokens == ["s.first", "s.second"]


async def test_a_refused_static_token_names_vault_token() -> None:
    transport = Recorded()
    transport.client.auth.token.lookup_self.side_effect = VaultHTTPError(
        403, ["permission denied for s.static"], None, None
    )
    with pytest.raises(VaultLoginRefused) as caught:
        await Authenticator(settings_of()).login(transport)  # type: ignore[arg-type]
    assert str(caught.value) == (
        "Vault refused the token (HTTP 403 on auth/token/lookup-self: permission denied for "
        "********): VAULT_TOKEN is invalid, expired or revoked (or lacks the `default` policy, "
        "which allows auth/token/lookup-self)"
    )


@pytest.mark.parametrize(("role", "body"), [("web", {"name": "web"}), (None, {})])
async def test_cert_login_names_its_role_if_any(role: str | None, body: dict[str, str]) -> None:
    transport = Recorded()
    transport.client.adapter.post.return_value = LOGGED_IN
    auth = Authenticator(settings_of(auth="cert", auth_mount="cert-x", token=None, role=role))
    await auth.login(transport)  # type: ignore[arg-type]
    transport.client.adapter.post.assert_called_once_with("/v1/auth/cert-x/login", json=body)
    assert transport.tokens == [None, "s.new"]


@pytest.mark.parametrize("method", ["kubernetes", "jwt"])
async def test_kubernetes_and_jwt_logins_send_role_and_file_content(
    tmp_path: Path, method: str
) -> None:
    transport = Recorded()
    transport.client.auth.kubernetes.login.return_value = LOGGED_IN
    transport.client.auth.jwt.jwt_login.return_value = LOGGED_IN
    jwt_file = write_file(tmp_path / "sa", "eyJ.sa.token\n")
    settings = settings_of(auth=method, auth_mount="m", token=None, role="web", jwt_file=jwt_file)
    await Authenticator(settings).login(transport)  # type: ignore[arg-type]
    if method == "kubernetes":
        transport.client.auth.kubernetes.login.assert_called_once_with(
            "web", "eyJ.sa.token", use_token=False, mount_point="m"
        )
        assert transport.client.auth.jwt.jwt_login.call_count == 0
    else:
        transport.client.auth.jwt.jwt_login.assert_called_once_with(
            "web", "eyJ.sa.token", use_token=False, path="m"
        )
        assert transport.client.auth.kubernetes.login.call_count == 0


# --- in process: refusals ----------------------------------------------------------------------

APPROLE_HINT = (
    "check REDITUS_SIDECAR_VAULT_ROLE_ID and the secret id in "
    "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE (expired, used up, or for another role?)"
)
NO_MOUNT = (
    "no approle auth method at auth/approle-x (HTTP {}): check REDITUS_SIDECAR_VAULT_AUTH_MOUNT"
)


@pytest.mark.parametrize(
    ("status", "said", "kind", "message"),
    [
        *(
            (
                status,
                "secret id sid-value of role rid-value is invalid",
                VaultLoginRefused,
                f"Vault refused the approle login (HTTP {status} on auth/approle-x/login: secret "
                f"id ******** of role rid-value is invalid): {APPROLE_HINT}",
            )
            for status in (400, 401, 403)
        ),
        (404, "", VaultLoginRefused, NO_MOUNT.format(404)),
        (
            405,
            "no handler for route 'auth/approle-x/login'",
            VaultLoginRefused,
            NO_MOUNT.format(405),
        ),
        (
            503,
            "Vault is sealed",
            SecretUnavailable,
            "Vault answered HTTP 503 to the approle login (Vault is sealed)",
        ),
    ],
)
async def test_a_refused_approle_login(
    tmp_path: Path, status: int, said: str, kind: type[Exception], message: str
) -> None:
    transport = Recorded()
    transport.client.auth.approle.login.side_effect = VaultHTTPError(status, [said], 7.0, None)
    with pytest.raises(Exception) as caught:  # noqa: PT011 - the test checks the type
        await Authenticator(approle(tmp_path)).login(transport)  # type: ignore[arg-type]
    assert type(caught.value) is kind
    assert str(caught.value) == message
    assert getattr(caught.value, "retry_after", None) == (
        7.0 if kind is SecretUnavailable else None
    )


@pytest.mark.parametrize(
    ("method", "message"),
    [
        (
            "cert",
            "Vault refused the cert login (HTTP 400 on auth/m/login: client certificate over a "
            "TLS connection required): cert auth needs VAULT_ADDR to be an https:// address of "
            "Vault itself (a TLS-terminating proxy in between hides the client certificate)",
        ),
        (
            "approle",
            "Vault refused the approle login (HTTP 400 on auth/m/login: client certificate over "
            f"a TLS connection required): {APPROLE_HINT}",
        ),
        (
            "jwt",
            "Vault refused the jwt login (HTTP 400 on auth/m/login: client certificate over a "
            "TLS connection required): check REDITUS_SIDECAR_VAULT_ROLE ('web') and that the "
            "role accepts the token in {jwt_file} (REDITUS_SIDECAR_VAULT_JWT_FILE): bound "
            "service account, namespace, audience, issuer or signing key",
        ),
    ],
)
async def test_a_plain_http_cert_login_says_so(tmp_path: Path, method: str, message: str) -> None:
    transport = Recorded()
    refusal = VaultHTTPError(400, ["client certificate over a TLS connection required"], None, None)
    transport.client.adapter.post.side_effect = refusal
    transport.client.auth.jwt.jwt_login.side_effect = refusal
    transport.client.auth.approle.login.side_effect = refusal
    jwt_file = write_file(tmp_path / "sa", "eyJ.sa.token")
    settings = settings_of(
        auth=method, auth_mount="m", token=None, role="web", jwt_file=jwt_file, role_id="rid"
    )
    with pytest.raises(VaultLoginRefused) as caught:
        await Authenticator(settings).login(transport)  # type: ignore[arg-type]
    assert str(caught.value) == message.format(jwt_file=jwt_file)


async def test_a_refused_jwt_login_masks_the_jwt(tmp_path: Path) -> None:
    transport = Recorded()
    transport.client.auth.jwt.jwt_login.side_effect = VaultHTTPError(
        400, ["token eyJ.sa.token is expired"], None, None
    )
    jwt_file = write_file(tmp_path / "sa", "eyJ.sa.token")
    settings = settings_of(auth="jwt", auth_mount="m", token=None, role="web", jwt_file=jwt_file)
    with pytest.raises(VaultLoginRefused) as caught:
        await Authenticator(settings).login(transport)  # type: ignore[arg-type]
    assert "(HTTP 400 on auth/m/login: token ******** is expired)" in str(caught.value)


@pytest.mark.parametrize(
    ("changes", "hint"),
    [
        (
            {"token_file": Path("/run/vault/token")},
            "the token in /run/vault/token (REDITUS_SIDECAR_VAULT_TOKEN_FILE) is invalid",
        ),
        (
            {"auth": "cert", "auth_mount": "cert", "role": "web", "client_cert": Path("/t.crt")},
            "check that the cert role 'web' (REDITUS_SIDECAR_VAULT_ROLE) trusts the client "
            "certificate VAULT_CLIENT_CERT=/t.crt (its CA, allowed names, constraints) and "
            "that it has not expired",
        ),
        (
            {"auth": "cert", "auth_mount": "cert", "role": None, "client_cert": Path("/t.crt")},
            "check that a cert role at auth/cert trusts the client certificate",
        ),
    ],
)
def test_hints_name_what_to_check(changes: dict[str, Any], hint: str) -> None:
    assert hint in Authenticator(settings_of(**changes)).hint()


def test_only_a_static_token_cannot_log_in_again(tmp_path: Path) -> None:
    assert Authenticator(settings_of()).can_relogin is False
    assert Authenticator(settings_of(token_file=Path("/run/vault/token"))).can_relogin is True
    assert Authenticator(approle(tmp_path)).can_relogin is True


# --- in process: renewal -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("increment", "asked", "answer", "expected"),
    [
        (60, 60, {"lease_duration": 60}, (True, 60.0, False)),
        (60, 60, {"lease_duration": 59}, (True, 59.0, True)),  # max TTL near
        (60, 60, {"lease_duration": 61}, (True, 61.0, False)),
        (60, 60, {"lease_duration": 60, "renewable": False}, (False, 60.0, False)),
        (0, 1, {"lease_duration": 1}, (True, 1.0, False)),  # at least 1 s is asked for
        (0, 1, {}, (True, 0.0, True)),
    ],
)
async def test_renewal_asks_for_the_creation_ttl_and_sees_the_cap(
    clock: FakeClock,
    increment: int,
    asked: int,
    answer: dict[str, Any],
    expected: tuple[bool, float, bool],
) -> None:
    transport = Recorded()
    transport.client.auth.token.renew_self.return_value = {"auth": answer}
    held = state(30.0, increment=increment)
    renewed = await renew(transport, held, clock)  # type: ignore[arg-type]
    transport.client.auth.token.renew_self.assert_called_once_with(increment=asked)
    assert transport.tokens == ["s.held"]
    assert (renewed.renewable, renewed.ttl, renewed.capped) == expected
    assert (renewed.token, renewed.granted_at, renewed.increment) == (held.token, 50.0, increment)
