"""VaultSession in process: sidecar/sources/vault.py's own decisions against a scripted
stand-in for Vault (a MagicMock hvac client behind a fake transport).

When a token is still used and when it is replaced, the login backoff (and Vault's
Retry-After), the background loop's timing (renewal at 2/3 of the TTL, retries of a failed
renewal capped at half the time left, at least 0.05 s apart, a refused renewal answered by
a new login at once), a renewal that finishes after a newer login, and the KV v2 answer
checks and errors. The session's clock is the event loop's (looptime fast-forwards it) or a
fixed one; the real-OpenBao tests of the same behaviour are in test_vault_auth.py,
test_vault_source.py and test_vault_faults.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import sys
import time
import types
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import VaultSettings, load_settings
from sidecar.errors import SecretInvalid, SecretUnavailable, SourceError
from sidecar.metrics import Metrics
from sidecar.sources.vault import VaultSession, kv_error
from sidecar.sources.vault_client import (
    VaultHTTPError,
    VaultPermissionDenied,
    VaultTimeout,
)
from tests.support import FakeClock

WALL = 1_000_000.0  # Unix time at loop time 0, for the token expiry gauge
MAX_CALLS = 50  # a loop that calls Vault more often than this is storming


def settings(**changes: Any) -> VaultSettings:
    """Vault settings: a static VAULT_TOKEN unless `changes` say otherwise."""
    base = load_settings({"VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "s.static"}).vault
    if "auth" in changes:  # a fresh string, as config makes it: never identical to a literal
        changes["auth"] = "".join(changes["auth"])
    return dataclasses.replace(base, **changes)


def approle() -> VaultSettings:
    return settings(auth="approle", auth_mount="approle", token=None, role_id="rid")


def token_file(tmp_path: Path) -> VaultSettings:
    path = tmp_path / "token"
    path.write_text("s.file\n")
    return settings(token=None, token_file=path)


#: The clocks handed to each session: the real ones, unless the `loop_clock` or `clock`
#: fixture put its own here for the test.
session_clock: Any = types.SimpleNamespace(monotonic=time.monotonic, time=time.time)


def now() -> float:
    return float(session_clock.monotonic())


@dataclasses.dataclass
class Later:
    """An answer that comes only once `after()` is done (a hang, a gate), then `then`."""

    after: Callable[[], Awaitable[object]]
    then: object


def hang(seconds: float, then: object) -> Later:
    return Later(lambda: asyncio.sleep(seconds), then)


class Script:
    """One hvac call's answers in order (the last one repeats; an exception is raised),
    and the session clock's reading at each call."""

    def __init__(self, *answers: object) -> None:
        self.answers = list(answers)
        self.at: list[float] = []

    def __call__(self, *args: Any, **kwargs: Any) -> object:
        self.at.append(round(now(), 6))
        answer = self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer


class FakeTransport:
    """VaultTransport's surface: each call runs against a MagicMock hvac client."""

    def __init__(self) -> None:
        self.client = MagicMock()
        self.tokens: list[str | None] = []
        self.bounds: list[float] = []
        self.closed = False

    async def call(self, fn: Callable[[Any], Any], *, token: str | None) -> Any:
        return await self.call_within(fn, token=token, bound=10.0)

    async def call_within(
        self, fn: Callable[[Any], Any], *, token: str | None, bound: float
    ) -> Any:
        self.tokens.append(token)
        self.bounds.append(bound)
        if len(self.tokens) > MAX_CALLS:
            raise RuntimeError("a storm of Vault calls")
        await asyncio.sleep(0)
        answer = fn(self.client)
        if isinstance(answer, Later):
            await answer.after()
            answer = answer.then
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def close(self) -> None:
        self.closed = True


class Draw:
    """A stand-in random source: every draw is `fraction` of the way up its range."""

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction

    def uniform(self, low: float, high: float) -> float:
        return low + (high - low) * self.fraction


TOP = Draw(1.0)


def lookup(ttl: float, *, renewable: bool = True) -> dict[str, Any]:
    return {"data": {"ttl": ttl, "creation_ttl": ttl, "renewable": renewable}}


def logged_in(token: str) -> dict[str, Any]:
    return {"auth": {"client_token": token, "lease_duration": 60, "renewable": True}}


def renewed(ttl: float) -> dict[str, Any]:
    return {"auth": {"lease_duration": ttl, "renewable": True}}


def refused(status: int, retry_after: float | None = None) -> VaultHTTPError:
    return VaultHTTPError(status, [f"status {status}"], retry_after, None)


def session_of(
    vault_settings: VaultSettings, registry: CollectorRegistry, rng: Any = TOP
) -> tuple[VaultSession, FakeTransport]:
    session = VaultSession(
        vault_settings,
        Metrics(registry, ["default"], "test"),
        rng=rng,
        monotonic=session_clock.monotonic,
        wall=session_clock.time,
    )
    session.transport.close()
    fake = FakeTransport()
    session.transport = fake  # type: ignore[assignment]
    return session, fake


def approle_session(
    registry: CollectorRegistry, *logins: object, looked_up: dict[str, Any] | None = None
) -> tuple[VaultSession, FakeTransport, Script]:
    """An AppRole session whose logins answer `logins` in turn, each token looked up as
    `looked_up` (60 s and renewable unless given)."""
    session, fake = session_of(approle(), registry)
    login = Script(*logins)
    fake.client.auth.approle.login.side_effect = login
    fake.client.auth.token.lookup_self.side_effect = Script(looked_up or lookup(60))
    return session, fake, login


@contextlib.asynccontextmanager
async def running(session: VaultSession) -> AsyncIterator[VaultSession]:
    """The session with its background loop started, closed at the end whatever happens."""
    await session.start()
    try:
        yield session
    finally:
        await session.close()


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def logins(registry: CollectorRegistry, method: str, result: str = "success") -> float:
    return sample(registry, "reditus_sidecar_vault_login_total", method=method, result=result)


def renewals(registry: CollectorRegistry, result: str) -> float:
    return sample(registry, "reditus_sidecar_vault_token_renewal_total", result=result)


def records(caplog: pytest.LogCaptureFixture, message: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage() == message]


@pytest.fixture
def loop_clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The session's monotonic clock is the (fast-forwarded) loop's; Unix time is WALL + it."""
    clock = types.SimpleNamespace(
        monotonic=lambda: asyncio.get_running_loop().time(),
        time=lambda: WALL + asyncio.get_running_loop().time(),
    )
    monkeypatch.setattr(sys.modules[__name__], "session_clock", clock)


@pytest.fixture
def clock(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The shared fake clock (conftest.py) as the session's, moved by the test: monotonic
    `now` (from 100), Unix time WALL + now."""
    clock.epoch = WALL
    monkeypatch.setattr(sys.modules[__name__], "session_clock", clock)
    return clock


@pytest.fixture
def caplog_vault(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="sidecar.sources.vault")
    return caplog


# --- when a token is still used ------------------------------------------------------------


@pytest.mark.parametrize(("at", "again"), [(109.4, False), (109.5, True), (109.6, True)])
async def test_a_token_is_used_until_half_a_second_before_it_expires(
    clock: FakeClock, registry: CollectorRegistry, at: float, again: bool
) -> None:
    session, fake = session_of(settings(), registry)
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(10))
    first = await session.token()  # granted at 100 for 10 s: expires at 110
    clock.now = at
    second = await session.token()
    assert (second is not first) is again
    assert logins(registry, "token") == (2 if again else 1)
    assert sample(registry, "reditus_sidecar_vault_token_expiry_timestamp_seconds") == WALL + (
        at + 10 if again else 110
    )


async def test_concurrent_callers_share_one_login(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    session, fake = session_of(approle(), registry)
    gate = asyncio.Event()
    fake.client.auth.approle.login.side_effect = Script(Later(gate.wait, logged_in("s.1")))
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(60))
    waiting = [asyncio.create_task(session.token()) for _ in range(3)]
    await asyncio.sleep(0.01)
    gate.set()
    states = await asyncio.gather(*waiting)
    assert {s.token.reveal() for s in states} == {"s.1"}
    assert states[0] is states[1] is states[2]
    assert fake.client.auth.approle.login.call_count == 1
    assert logins(registry, "approle") == 1


# --- the login backoff ---------------------------------------------------------------------


async def test_a_failed_login_is_not_retried_before_its_backoff_ends(
    clock: FakeClock, registry: CollectorRegistry, caplog_vault: Any
) -> None:
    """Within the backoff a caller gets the last error at once, with the time left as
    retry_after; at its end exactly, the next caller logs in."""
    session, fake = session_of(approle(), registry, rng=Draw(0.4321))
    fake.client.auth.approle.login.side_effect = Script(
        refused(503), refused(503), logged_in("s.1")
    )
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(60))
    first_delay = 1.0 * (0.5 + 0.5 * 0.4321)  # step 1 s, drawn at 43.21 % of [50 %, 100 %]
    with pytest.raises(SecretUnavailable) as failed:
        await session.login()
    clock.now = 100.5
    with pytest.raises(SecretUnavailable) as held:
        await session.login()
    assert str(held.value) == str(failed.value)
    assert held.value.retry_after == pytest.approx(first_delay - 0.5)
    assert fake.client.auth.approle.login.call_count == 1
    assert logins(registry, "approle", "error") == 1

    clock.now = 100.0 + first_delay  # the backoff's end: a login again
    with pytest.raises(SecretUnavailable):
        await session.login()
    assert fake.client.auth.approle.login.call_count == 2
    clock.now += 2.0 * (0.5 + 0.5 * 0.4321)  # the second step: 2 s, drawn the same
    assert (await session.login()).token.reveal() == "s.1"
    assert (logins(registry, "approle", "error"), logins(registry, "approle")) == (2, 1)
    retry_in = [r.retry_in for r in records(caplog_vault, "Vault login failed")]  # type: ignore[attr-defined]
    assert retry_in == [0.72, 1.43]  # rounded to 10 ms


async def test_the_login_backoff_starts_over_after_a_login_succeeds(
    clock: FakeClock, registry: CollectorRegistry, caplog_vault: Any
) -> None:
    session, fake = session_of(approle(), registry, rng=Draw(0.4321))
    fake.client.auth.approle.login.side_effect = Script(
        refused(503), logged_in("s.1"), refused(503), refused(503)
    )
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(60))
    with pytest.raises(SecretUnavailable):
        await session.login()
    clock.now += 1.0
    state = await session.login()
    for _ in range(2):  # the token is found bad: two failed logins in a row
        clock.now += 2.0
        with pytest.raises(SecretUnavailable):
            await session.login(stale=state)
    retry_in = [r.retry_in for r in records(caplog_vault, "Vault login failed")]  # type: ignore[attr-defined]
    assert retry_in == [0.72, 0.72, 1.43]  # 1 s; after the success 1 s again, then 2 s


async def test_vaults_retry_after_stretches_the_login_backoff(
    clock: FakeClock, registry: CollectorRegistry, caplog_vault: Any
) -> None:
    session, fake, _login = approle_session(registry, refused(429, 7.0), logged_in("s.1"))
    with pytest.raises(SecretUnavailable):
        await session.login()
    # the log line names the wait the session will keep: Vault's 7 s, not the backoff step
    assert [r.retry_in for r in records(caplog_vault, "Vault login failed")] == [7.0]  # type: ignore[attr-defined]
    clock.now = 106.9  # past the 1 s backoff step, within Vault's 7 s
    with pytest.raises(SecretUnavailable) as held:
        await session.login()
    assert held.value.retry_after == 7.0
    assert fake.client.auth.approle.login.call_count == 1
    clock.now = 107.5
    assert (await session.login()).token.reveal() == "s.1"


# --- the background loop -------------------------------------------------------------------


@pytest.mark.looptime
async def test_renewal_at_two_thirds_of_the_ttl_and_its_backoff_restarts_after_a_success(
    loop_clock: None, registry: CollectorRegistry, caplog_vault: Any
) -> None:
    """Renewed at 40 s of 60; a renewal answered 503 is retried 1 s, then 2 s later (the
    token kept, no login); after a success the backoff starts over at 1 s."""
    session, fake = session_of(settings(), registry)
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(60))
    renew = Script(refused(503), refused(503), renewed(60), refused(503), refused(503), renewed(60))
    fake.client.auth.token.renew_self.side_effect = renew
    async with running(session):
        await asyncio.sleep(100)
        assert renew.at == [40.0, 41.0, 43.0, 83.0, 84.0, 86.0]  # then 126
        assert fake.client.auth.token.lookup_self.call_count == 1  # no login again
        assert (renewals(registry, "error"), renewals(registry, "success")) == (4, 2)
        expiry = sample(registry, "reditus_sidecar_vault_token_expiry_timestamp_seconds")
        assert expiry == pytest.approx(WALL + 86 + 60)
        failed = records(caplog_vault, "Vault token renewal failed")
        assert [r.status for r in failed] == [503] * 4  # type: ignore[attr-defined]
        capped = "the Vault token nears its max TTL; logging in again before it expires"
        assert records(caplog_vault, capped) == []  # every renewal granted what was asked
        (login,) = records(caplog_vault, "logged in to Vault")
        assert (login.method, login.ttl) == ("token", 60)  # type: ignore[attr-defined]
    assert sample(registry, "reditus_sidecar_vault_token_expiry_timestamp_seconds") == 0
    assert fake.closed


@pytest.mark.looptime
async def test_renewal_retries_stay_within_half_the_time_left_then_a_new_login(
    loop_clock: None, registry: CollectorRegistry
) -> None:
    session, fake, login = approle_session(registry, logged_in("s.1"), logged_in("s.2"))
    renew = Script(refused(502))
    fake.client.auth.token.renew_self.side_effect = renew
    async with running(session):
        await asyncio.sleep(60)
        # backoff 1, 2, 4 s, then half of what is left of the token's 60 s each time
        assert renew.at[:8] == [40.0, 41.0, 43.0, 47.0, 53.5, 56.75, 58.375, 59.1875]
        assert login.at == [0.0, 59.59375]  # under 0.5 s left: replaced
        assert (await session.token()).token.reveal() == "s.2"


@pytest.mark.looptime
async def test_a_renewal_that_times_out_at_the_end_is_retried_no_sooner_than_50_ms(
    loop_clock: None, registry: CollectorRegistry
) -> None:
    session, fake, login = approle_session(registry, logged_in("s.1"), logged_in("s.2"))
    timeout = VaultTimeout("Vault at http://127.0.0.1:1 did not answer within 10s")
    fake.client.auth.token.renew_self.side_effect = Script(hang(19.96, timeout))
    async with running(session):
        await asyncio.sleep(61)
        assert login.at == [0.0, 60.01]  # 40 + 19.96, then 0.05 s (half the 0.04 s left: less)
        assert renewals(registry, "error") == 1


def first_renewal_answered(
    status: int, registry: CollectorRegistry
) -> tuple[VaultSession, FakeTransport, Script, Script]:
    """An AppRole session (60 s tokens) whose first renewal Vault answers `status` and
    whose second it grants; logins hand out s.1, then s.2."""
    session, fake, login = approle_session(registry, logged_in("s.1"), logged_in("s.2"))
    renew = Script(refused(status), renewed(60))
    fake.client.auth.token.renew_self.side_effect = renew
    return session, fake, login, renew


@pytest.mark.looptime
@pytest.mark.parametrize("status", [400, 403, 404, 412, 451])
async def test_a_refused_renewal_means_a_new_login_at_once(
    loop_clock: None, registry: CollectorRegistry, caplog_vault: Any, status: int
) -> None:
    session, fake, login, renew = first_renewal_answered(status, registry)
    async with running(session):
        await asyncio.sleep(90)
        assert login.at == [0.0, 40.0]
        assert renew.at == [40.0, 80.0]  # the new token's own renewal
        assert fake.tokens[-1] == "s.2"
        assert (renewals(registry, "error"), renewals(registry, "success")) == (1, 1)
        (refusal,) = records(caplog_vault, "Vault refused to renew the token; logging in again")
        assert refusal.status == status  # type: ignore[attr-defined]


@pytest.mark.looptime
@pytest.mark.parametrize("status", [429, 500, 503])
async def test_an_unavailable_vault_keeps_the_token_and_retries_the_renewal(
    loop_clock: None, registry: CollectorRegistry, status: int
) -> None:
    session, _fake, login, renew = first_renewal_answered(status, registry)
    async with running(session):
        await asyncio.sleep(42)
        assert renew.at == [40.0, 41.0]
        assert login.at == [0.0]
        assert (await session.token()).token.reveal() == "s.1"


@pytest.mark.looptime
async def test_a_non_renewable_token_is_replaced_at_two_thirds_of_its_ttl(
    loop_clock: None, registry: CollectorRegistry
) -> None:
    session, fake, login = approle_session(
        registry,
        logged_in("s.1"),
        logged_in("s.2"),
        logged_in("s.3"),
        looked_up=lookup(30, renewable=False),
    )
    async with running(session):
        await asyncio.sleep(50)
        assert login.at == [0.0, 20.0, 40.0]
        assert fake.client.auth.token.renew_self.call_count == 0


@pytest.mark.looptime
async def test_a_token_that_never_expires_is_neither_renewed_nor_replaced(
    loop_clock: None, registry: CollectorRegistry, tmp_path: Path
) -> None:
    session, fake = session_of(token_file(tmp_path), registry)  # a new login is possible
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(0, renewable=False))
    async with running(session):
        await asyncio.sleep(3600)
        assert fake.client.auth.token.lookup_self.call_count == 1
        assert fake.client.auth.token.renew_self.call_count == 0
        assert sample(registry, "reditus_sidecar_vault_token_expiry_timestamp_seconds") == 0


@pytest.mark.looptime
async def test_a_handed_token_that_cannot_be_renewed_is_left_to_its_ttl(
    loop_clock: None, registry: CollectorRegistry
) -> None:
    """VAULT_TOKEN, not renewable: nothing would help before it expires (no login is
    possible), so it is used as it is, without lookups along the way."""
    session, fake = session_of(settings(), registry)
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(60, renewable=False))
    async with running(session):
        await asyncio.sleep(59)
        assert fake.client.auth.token.lookup_self.call_count == 1
        assert fake.client.auth.token.renew_self.call_count == 0


@pytest.mark.looptime
async def test_a_token_file_still_holding_a_dying_token_is_reread_once_a_second(
    loop_clock: None, registry: CollectorRegistry, tmp_path: Path
) -> None:
    session, fake = session_of(token_file(tmp_path), registry)
    lookups = Script(lookup(0.4), lookup(0.4), lookup(0.4), lookup(3600))
    fake.client.auth.token.lookup_self.side_effect = lookups
    async with running(session):
        await asyncio.sleep(10)
        assert lookups.at == [0.0, 1.0, 2.0, 3.0]
        assert logins(registry, "token") == 4


@pytest.mark.looptime
async def test_failed_logins_in_the_background_wait_out_the_backoff(
    loop_clock: None, registry: CollectorRegistry
) -> None:
    session, _fake, login = approle_session(
        registry, refused(503), refused(503), refused(503), logged_in("s.1")
    )
    async with running(session):
        await asyncio.sleep(10)
        assert login.at == [0.0, 1.0, 3.0, 7.0]
        assert (logins(registry, "approle", "error"), logins(registry, "approle")) == (3, 1)


@pytest.mark.looptime
async def test_a_background_login_is_retried_no_sooner_than_50_ms(
    loop_clock: None, registry: CollectorRegistry
) -> None:
    """A read's failed login at 19.01 holds logins off until 20.01; the loop, due to replace
    the token at 20, is refused at once and tries again 50 ms later, not at 20.01."""
    session, fake, login = approle_session(
        registry,
        logged_in("s.1"),
        refused(503),
        logged_in("s.2"),
        looked_up=lookup(30, renewable=False),
    )
    fake.client.secrets.kv.v2.read_secret_version.side_effect = Script(refused(403))
    async with running(session):
        await asyncio.sleep(19.01)
        with pytest.raises(SecretUnavailable):
            await session.read_kv("kv", "app")  # 403, then the login fails: backoff 1 s
        await asyncio.sleep(2)
        assert login.at == [0.0, 19.01, 20.05]


@pytest.mark.looptime
async def test_a_renewal_finishing_after_a_new_login_keeps_the_new_token(
    loop_clock: None, registry: CollectorRegistry
) -> None:
    """A read answered 403 while a renewal is in flight logs in again; the renewal of the
    old token, answered afterwards, must not put the old token back."""
    session, fake, login = approle_session(registry, logged_in("s.1"), logged_in("s.2"))
    gate = asyncio.Event()
    renew = Script(Later(gate.wait, renewed(60)), renewed(60))
    fake.client.auth.token.renew_self.side_effect = renew
    fake.client.secrets.kv.v2.read_secret_version.side_effect = Script(
        refused(403), {"data": {"data": {"k": "v"}, "metadata": {"version": 2}}}
    )
    async with running(session):
        await asyncio.sleep(40.5)  # the renewal of s.1 is in flight since 40
        assert await session.read_kv("secret", "app") == ({"k": "v"}, 2)
        assert login.at == [0.0, 40.5]
        gate.set()
        await asyncio.sleep(0.1)
        assert (await session.token()).token.reveal() == "s.2"
        expiry = sample(registry, "reditus_sidecar_vault_token_expiry_timestamp_seconds")
        assert expiry == WALL + 40.5 + 60
        await asyncio.sleep(40)
        assert renew.at == [40.0, 80.5]  # s.2's own renewal, at 2/3 of its TTL
        assert fake.tokens[-1] == "s.2"


async def test_start_twice_runs_one_loop(clock: FakeClock, registry: CollectorRegistry) -> None:
    session, fake = session_of(settings(), registry)
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(0, renewable=False))
    await session.start()
    task = session._task
    await session.start()
    assert session._task is task
    await session.close()
    assert task is not None
    assert task.cancelled()


# --- revocation at shutdown -------------------------------------------------------------


@pytest.mark.parametrize(
    ("vault_settings", "mode", "revoked"),
    [
        (approle(), "true", True),
        (approle(), "all", True),
        (approle(), "false", False),
        (settings(), "true", False),  # a token handed to the sidecar is not ours to revoke
        (settings(), "all", True),
    ],
)
async def test_close_revokes_the_token_it_logged_in_for(
    clock: FakeClock,
    registry: CollectorRegistry,
    caplog_vault: pytest.LogCaptureFixture,
    vault_settings: VaultSettings,
    mode: str,
    revoked: bool,
) -> None:
    mode = "".join(mode)  # a fresh string, as config makes it
    session, fake = session_of(
        dataclasses.replace(vault_settings, revoke_on_shutdown=mode), registry
    )
    fake.client.auth.approle.login.side_effect = Script(logged_in("s.1"))
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(60))
    token = (await session.token()).token.reveal()
    await session.close(revoke=True)
    assert fake.client.auth.token.revoke_self.call_count == (1 if revoked else 0)
    if revoked:
        assert (fake.tokens[-1], fake.bounds[-1]) == (token, 2.0)
    done = records(caplog_vault, "revoked the Vault token at shutdown")
    assert len(done) == (1 if revoked else 0)


async def test_close_without_a_token_revokes_nothing(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    session, fake = session_of(approle(), registry)
    await session.close(revoke=True)
    assert fake.tokens == []
    assert fake.closed


@pytest.mark.parametrize(
    ("failure", "message", "field", "value"),
    [
        (
            VaultTimeout("no answer"),
            "revoking the Vault token at shutdown timed out; it lapses at its TTL",
            "detail",
            "no answer within 1.5s",
        ),
        (
            VaultHTTPError(403, ["permission denied for s.1"], None, None),
            "Vault refused to revoke the token at shutdown; it lapses at its TTL",
            "error",
            "permission denied for ********",
        ),
        (
            SecretUnavailable("the Vault session is closed"),
            "could not revoke the Vault token at shutdown; it lapses at its TTL",
            "error",
            "the Vault session is closed",
        ),
    ],
)
async def test_a_failed_revocation_is_a_warning(
    clock: FakeClock,
    registry: CollectorRegistry,
    caplog_vault: pytest.LogCaptureFixture,
    failure: Exception,
    message: str,
    field: str,
    value: str,
) -> None:
    session, fake = session_of(dataclasses.replace(approle(), timeout=1.5), registry)
    fake.client.auth.approle.login.side_effect = Script(logged_in("s.1"))
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(60))
    fake.client.auth.token.revoke_self.side_effect = Script(failure)
    await session.token()
    await session.close(revoke=True)
    assert fake.bounds[-1] == 1.5  # the Vault timeout, when under REVOKE_TIMEOUT
    (warning,) = records(caplog_vault, message)
    assert (warning.levelno, getattr(warning, field)) == (logging.WARNING, value)
    assert records(caplog_vault, "revoked the Vault token at shutdown") == []


# --- KV v2 reads ---------------------------------------------------------------------------


KV_ANSWER = {"data": {"data": {"product_id": "p"}, "metadata": {"version": 3}}}


async def test_a_read_answered_403_logs_in_again_once(
    clock: FakeClock, registry: CollectorRegistry, caplog_vault: Any
) -> None:
    session, fake, _login = approle_session(registry, logged_in("s.1"), logged_in("s.2"))
    read = Script(refused(403), KV_ANSWER, refused(403), refused(403))
    fake.client.secrets.kv.v2.read_secret_version.side_effect = read
    assert await session.read_kv("kv", "app") == ({"product_id": "p"}, 3)
    assert [t for t in fake.tokens if t is not None] == ["s.1", "s.1", "s.2", "s.2"]
    assert len(records(caplog_vault, "permission denied reading the secret; logging in again")) == 1
    with pytest.raises(VaultPermissionDenied) as caught:  # refused again after the new login
        await session.read_kv("kv", "app")
    assert str(caught.value).startswith("vault kv/app: permission denied (HTTP 403)")
    assert logins(registry, "approle") == 3
    fake.client.secrets.kv.v2.read_secret_version.assert_called_with(
        path="app", mount_point="kv", raise_on_deleted_version=True
    )


async def test_a_read_answered_503_is_not_a_reason_to_log_in(
    clock: FakeClock, registry: CollectorRegistry
) -> None:
    session, fake, _login = approle_session(registry, logged_in("s.1"))
    fake.client.secrets.kv.v2.read_secret_version.side_effect = Script(refused(503, 4.0))
    with pytest.raises(SecretUnavailable) as caught:
        await session.read_kv("kv", "app")
    assert str(caught.value) == (
        "vault kv/app: Vault is unavailable (HTTP 503: status 503): sealed, in standby or overloaded"
    )
    assert caught.value.retry_after == 4.0
    assert logins(registry, "approle") == 1


@pytest.mark.parametrize("status", [400, 401, 404])
async def test_a_read_refused_otherwise_than_403_is_not_a_reason_to_log_in(
    clock: FakeClock, registry: CollectorRegistry, status: int
) -> None:
    session, fake, _login = approle_session(registry, logged_in("s.1"), logged_in("s.2"))
    fake.client.secrets.kv.v2.read_secret_version.side_effect = Script(refused(status))
    with pytest.raises(SourceError, match=f"HTTP {status}"):
        await session.read_kv("kv", "app")
    assert logins(registry, "approle") == 1


NOT_KV2 = (
    "vault kv/app: the answer is not a KV version 2 secret: check that kv/ is a KV v2 mount "
    "(REDITUS_SIDECAR_KV_MOUNT)"
)


@pytest.mark.parametrize(
    "answer",
    [
        "text",
        {"data": None},
        {"data": "text"},
        {"data": {"data": {"product_id": "p"}}},  # KV v1: no metadata
        {"data": {"data": {}, "metadata": None}},
        {"data": {"data": {}, "metadata": "text"}},
    ],
)
async def test_an_answer_that_is_not_kv_v2_is_invalid(
    clock: FakeClock, registry: CollectorRegistry, answer: Any
) -> None:
    session, fake = session_of(settings(), registry)
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(0))
    fake.client.secrets.kv.v2.read_secret_version.side_effect = Script(answer)
    with pytest.raises(SecretInvalid) as caught:
        await session.read_kv("kv", "app")
    assert str(caught.value) == NOT_KV2


@pytest.mark.parametrize(
    ("metadata", "version"), [({"version": 7}, 7), ({}, 0), ({"version": "7"}, 0)]
)
async def test_the_version_of_a_kv_answer(
    clock: FakeClock, registry: CollectorRegistry, metadata: Any, version: int
) -> None:
    session, fake = session_of(settings(), registry)
    fake.client.auth.token.lookup_self.side_effect = Script(lookup(0))
    answer = {"data": {"data": {"k": "v"}, "metadata": metadata}}
    fake.client.secrets.kv.v2.read_secret_version.side_effect = Script(answer)
    assert await session.read_kv("kv", "app") == ({"k": "v"}, version)


def deleted(**metadata: Any) -> dict[str, Any]:
    return {"data": {"data": None, "metadata": {"version": 4, **metadata}}}


@pytest.mark.parametrize(
    ("status", "body", "kind", "message", "retry_after"),
    [
        (400, None, SecretUnavailable, "Vault answered HTTP 400 (said 400)", 9.0),
        (401, None, SecretUnavailable, "Vault answered HTTP 401 (said 401)", 9.0),
        (
            403,
            None,
            VaultPermissionDenied,
            'permission denied (HTTP 403): the token\'s policies must allow "read" on path '
            '"kv/data/app" (see deploy/vault/reditus-sidecar.hcl)',
            None,
        ),
        (
            404,
            None,
            SecretUnavailable,
            "no secret there (HTTP 404): check REDITUS_SIDECAR_KV_MOUNT ('kv'), "
            "REDITUS_SIDECAR_KV_PATH ('app') and that kv/ is a KV version 2 mount",
            None,
        ),
        (
            404,
            deleted(destroyed=True, deletion_time=""),
            SecretInvalid,
            "the latest version (4) is destroyed: write a new version (bao kv put -mount=kv "
            "app ...)",
            None,
        ),
        (
            404,
            deleted(destroyed=False, deletion_time="2026-11-29T12:00:00Z"),
            SecretInvalid,
            "the latest version (4) is deleted: undelete it (bao kv undelete -mount=kv "
            "-versions=4 app) or write a new one",
            None,
        ),
        (412, None, SecretUnavailable, "Vault answered HTTP 412 (said 412)", 9.0),
        (428, None, SecretUnavailable, "Vault answered HTTP 428 (said 428)", 9.0),
        (429, None, SecretUnavailable, "Vault is rate limiting us (HTTP 429)", 9.0),
        (430, None, SecretUnavailable, "Vault answered HTTP 430 (said 430)", 9.0),
        (500, None, SecretUnavailable, "Vault answered HTTP 500 (said 500)", 9.0),
        (502, None, SecretUnavailable, "Vault answered HTTP 502 (said 502)", 9.0),
        (
            503,
            None,
            SecretUnavailable,
            "Vault is unavailable (HTTP 503: said 503): sealed, in standby or overloaded",
            9.0,
        ),
        (504, None, SecretUnavailable, "Vault answered HTTP 504 (said 504)", 9.0),
    ],
)
def test_kv_errors_say_what_the_status_means(
    status: int, body: Any, kind: type[SourceError], message: str, retry_after: float | None
) -> None:
    error = kv_error(VaultHTTPError(status, [f"said {status}"], 9.0, body), "kv", "app")
    assert type(error) is kind
    assert str(error) == f"vault kv/app: {message}"
    assert error.retry_after == retry_after
