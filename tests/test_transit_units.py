"""Transit mode in process, with a fake Vault session: how a batch answer or an HTTP error
becomes per-item outcomes or one failed call, the operator's message for each status, the
call metrics, the probe's changed/unchanged count, and Retry-After from the probe's
schedule. Clocks are injected: `make_mode` hands the mode the `clock` fixture's."""

from __future__ import annotations

import asyncio
import base64
import hmac
import itertools
import logging
import re
import sys
import time
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import Settings, load_settings
from sidecar.errors import SecretInvalid, SecretUnavailable
from sidecar.metrics import Metrics
from sidecar.sources.vault import VaultSession
from sidecar.sources.vault_client import VaultHTTPError, VaultPermissionDenied
from sidecar.state import SecretStore
from sidecar.timing import JITTER
from sidecar.transit import PROBE_INPUT, TransitMode, parse_hmac, transit_error
from tests.support import FakeClock

KEY = b"transit-unit-key"
Handler = Callable[[list[bytes]], Any]


def settings(**env: str) -> Settings:
    return load_settings(
        {
            "VAULT_ADDR": "http://127.0.0.1:1",
            "VAULT_TOKEN": "unit-token",
            "REDITUS_SIDECAR_SECRET_SOURCE": "transit",
            "REDITUS_SIDECAR_TRANSIT_KEY": "reditus",
            "REDITUS_SIDECAR_PRODUCT_ID": "prod-unit",
            **env,
        }
    )


def mac(data: bytes, version: int = 1) -> str:
    digest = hmac.digest(KEY, data, "sha512")
    return f"vault:v{version}:{base64.b64encode(digest).decode()}"


def signed(version: int = 1) -> Handler:
    """Vault answering every input with its HMAC under key `version`."""
    return lambda inputs: {
        "data": {"batch_results": [{"hmac": mac(data, version)} for data in inputs]}
    }


class FakeSession:
    """What TransitClient uses of a VaultSession; `handler` answers each POST's inputs."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.auth = SimpleNamespace(method="token")
        self.transport = SimpleNamespace(call=self._call)
        self._state = SimpleNamespace(token=SimpleNamespace(reveal=lambda: "unit-token"))
        self.logins: list[Any] = []  # the stale state each login replaced
        self.posts = 0
        self.gate: asyncio.Event | None = None  # when set, each call waits for it
        self.in_flight = 0
        self.most_in_flight = 0
        self.entered = asyncio.Event()  # a call has started

    call = VaultSession.call  # the session's own: the token, the 403 re-login, the errors

    async def token(self) -> Any:
        return self._state

    async def login(self, *, stale: Any = None) -> Any:
        self.logins.append(stale)
        self._state = SimpleNamespace(token=SimpleNamespace(reveal=lambda: "unit-token-2"))
        return self._state

    async def _call(self, fn: Callable[[Any], Any], *, token: str) -> Any:
        def post(url: str, json: dict[str, Any]) -> Any:
            self.posts += 1
            return self.handler([base64.b64decode(i["input"]) for i in json["batch_input"]])

        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        self.entered.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            return fn(SimpleNamespace(adapter=SimpleNamespace(post=post)))
        finally:
            self.in_flight -= 1


#: The clocks handed to each mode: the real ones, unless the `clock` fixture put its own.
mode_clock: Any = time


def make_mode(
    handler: Handler, metrics: Metrics | None = None, rng: Any = None, **env: str
) -> TransitMode:
    """A mode on `handler`; its metrics on a registry of their own unless given."""
    return TransitMode(
        settings(**env),
        SecretStore(["default"]),
        metrics or Metrics(CollectorRegistry(), ["default"], "test"),
        session=FakeSession(handler),  # type: ignore[arg-type]
        rng=rng,
        monotonic=mode_clock.monotonic,
        perf_counter=mode_clock.perf_counter,
        wall=mode_clock.time,
    )


def http_error(status: int, body: Any, *errors: str) -> VaultHTTPError:
    return VaultHTTPError(status=status, errors=list(errors), retry_after=None, body=body)


def raising(*answers: Exception | Handler) -> Handler:
    """Raise (or answer with) each of `answers` in turn, one per POST; the last repeats."""
    queue = list(answers)

    def handler(inputs: list[bytes]) -> Any:
        answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer(inputs)

    return handler


@pytest.fixture
def metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, ["default"], "test")


def session_of(mode: TransitMode) -> FakeSession:
    assert isinstance(mode.session, FakeSession)
    return mode.session


# --- the batch answer ------------------------------------------------------------------


async def test_a_400_with_every_item_failed_is_one_error_per_item_not_a_failed_call() -> None:
    """Vault answers 400 when every item of a batch failed (OpenBao 200), and its body still
    has the items: each request gets its own error, and the call itself succeeded."""
    body = {"data": {"batch_results": [{"error": "bad input 1"}, {"error": "bad input 2"}]}}
    mode = make_mode(raising(http_error(400, body, "bad input 1")))
    first, second = await mode.client.hmac([b"a", b"b"])
    assert isinstance(first, SecretUnavailable)
    assert isinstance(second, SecretUnavailable)
    assert str(first).endswith("bad input 1")
    assert str(second).endswith("bad input 2")


async def test_a_500_fails_the_whole_call_even_with_batch_results_in_its_body() -> None:
    """A 500 is Vault failing, not the items: the call fails as a whole (so the breaker
    opens) even when the body has the same shape as a 400's."""
    body = {"data": {"batch_results": [{"error": "internal error"}]}}
    mode = make_mode(raising(http_error(500, body, "internal error")))
    with pytest.raises(SecretUnavailable, match=r"Vault answered HTTP 500 \(internal error\)"):
        await mode.client.hmac([b"a"])


async def test_a_batch_of_more_than_256_inputs_gets_one_outcome_each() -> None:
    """The item count is compared by value: a batch beyond CPython's small-int cache (the
    client takes any size, though TransitMode caps its batches at MAX_BATCH) still matches."""
    inputs = [f"header.payload-{i}".encode() for i in range(300)]
    mode = make_mode(signed(version=3))
    outcomes = await mode.client.hmac(inputs)
    assert len(outcomes) == 300
    for data, outcome in zip(inputs, outcomes, strict=True):
        digest = hmac.digest(KEY, data, "sha512")
        assert outcome == (base64.urlsafe_b64encode(digest).rstrip(b"="), 3)


async def test_item_errors_fail_only_their_item_and_vaults_text_is_cut_at_200() -> None:
    """OpenBao answers 200 with an error in each item it could not MAC."""
    good = signed()

    def handler(inputs: list[bytes]) -> Any:
        [ok] = good(inputs[:1])["data"]["batch_results"]
        results = [ok, {"error": "e" * 300}, "not a dict", {"hmac": "vault:v1:not-base64"}]
        return {"data": {"batch_results": results}}

    mode = make_mode(handler)
    ok, long, odd, garbage = await mode.client.hmac([b"a", b"b", b"c", b"d"])
    assert ok == (base64.urlsafe_b64encode(hmac.digest(KEY, b"a", "sha512")).rstrip(b"="), 1)
    assert isinstance(long, SecretUnavailable)
    assert str(long) == "vault transit transit/keys/reditus: " + "e" * 200
    assert str(odd) == "vault transit transit/keys/reditus: not an object"
    assert isinstance(garbage, SecretInvalid)
    assert "not an HMAC of the form vault:vN:" in str(garbage)


@pytest.mark.parametrize(
    "answer",
    [
        {"data": {"batch_results": [{"hmac": mac(b"a")}]}},  # one result for two inputs
        {"data": {"batch_results": [{"hmac": mac(b"a")}] * 3}},  # three
        {"data": {"batch_results": None}},
        {"data": {}},
        {"errors": []},
        ["not", "an", "object"],
    ],
)
async def test_an_answer_without_one_result_per_input_fails_the_call(answer: Any) -> None:
    mode = make_mode(lambda inputs: answer)
    with pytest.raises(SecretInvalid, match="the answer has no batch_results for us"):
        await mode.client.hmac([b"a", b"b"])


async def test_a_burst_rides_in_calls_of_64_one_call_at_a_time() -> None:
    """README "Performance": one call in flight carrying up to MAX_BATCH = 64 inputs."""
    sizes: list[int] = []
    answer = signed()

    def handler(inputs: list[bytes]) -> Any:
        sizes.append(len(inputs))
        return answer(inputs)

    mode = make_mode(handler)
    session = session_of(mode)
    session.gate = asyncio.Event()
    first = asyncio.ensure_future(mode.signer.sign_remote("u-first", 1_700_000_000))
    await asyncio.wait_for(session.entered.wait(), timeout=5)  # the first goes alone, at once
    rest = [
        asyncio.ensure_future(mode.signer.sign_remote(f"u-{i}", 1_700_000_000)) for i in range(200)
    ]
    for _ in range(20):  # nothing else may start while that call is in flight
        await asyncio.sleep(0)
    assert session.in_flight == 1
    session.gate.set()
    await asyncio.gather(first, *rest)
    assert sizes == [1, 64, 64, 64, 8]
    assert session.most_in_flight == 1


async def test_a_403_logs_in_again_once_and_retries_with_the_new_token() -> None:
    mode = make_mode(raising(http_error(403, None, "permission denied"), signed(version=2)))
    stale = await mode.session.token()
    [outcome] = await mode.client.hmac([b"a"])
    assert isinstance(outcome, tuple)
    assert outcome[1] == 2
    assert session_of(mode).logins == [stale]
    assert session_of(mode).posts == 2


async def test_a_403_after_logging_in_again_names_the_policy_it_needs() -> None:
    mode = make_mode(raising(http_error(403, None, "permission denied")))
    with pytest.raises(VaultPermissionDenied, match=r'"update" on path "transit/hmac/reditus/'):
        await mode.client.hmac([b"a"])
    assert len(session_of(mode).logins) == 1
    assert session_of(mode).posts == 2


async def test_an_error_that_is_not_a_403_is_not_retried_with_a_new_login() -> None:
    """Only a 403 may mean our token went stale: a 400 or 401 is answered as it is."""
    for status in (400, 401, 500):
        mode = make_mode(raising(http_error(status, None, "no")))
        with pytest.raises(SecretUnavailable, match=f"HTTP {status}"):
            await mode.client.hmac([b"a"])
        assert session_of(mode).logins == []
        assert session_of(mode).posts == 1


def b64(length: int) -> str:
    return base64.b64encode(bytes(range(length))).decode()


def test_parse_hmac_gives_the_unpadded_base64url_signature_and_the_version() -> None:
    digest = hmac.digest(KEY, b"x", "sha512")
    assert parse_hmac(mac(b"x", version=12)) == (
        base64.urlsafe_b64encode(digest).rstrip(b"="),
        12,
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (None, "not an HMAC of the form vault:vN:"),
        ("vault:vX:" + b64(64), "not an HMAC of the form vault:vN:"),
        ("vault:v1:" + b64(64) + "=", "not an HMAC of the form vault:vN:"),
        ("vault:v1:abcde", "not valid base64"),  # 5 characters cannot be base64
        ("vault:v1:" + b64(63)[:-1] + "==", "not valid base64"),  # excess padding
        ("vault:v1:" + b64(32), "is 32 bytes, not 64: is the algorithm sha2-512?"),  # sha2-256
        ("vault:v1:" + b64(63), "is 63 bytes, not 64"),
        ("vault:v1:" + b64(65), "is 65 bytes, not 64"),
        ("vault:v1:" + b64(128), "is 128 bytes, not 64"),
    ],
)
def test_parse_hmac_refuses_what_is_not_a_sha512_hmac(value: object, message: str) -> None:
    with pytest.raises(SecretInvalid, match=re.escape(message)):
        parse_hmac(value)


# --- the operator's message --------------------------------------------------------------


@pytest.mark.parametrize("status", [400, 404])
def test_a_400_or_404_names_the_mount_and_key_settings(status: int) -> None:
    """Vault answers 404 when the mount has no such path (a wrong TRANSIT_MOUNT) and 400
    when the key is missing or not of type hmac: both point at the two settings."""
    exc = http_error(status, None, 'no handler for route "transitx/hmac/reditus/sha2-512"')
    error = transit_error(exc, settings(REDITUS_SIDECAR_TRANSIT_MOUNT="transitx").transit)  # type: ignore[arg-type]
    assert isinstance(error, SecretUnavailable)
    assert f"Vault refused the HMAC (HTTP {status}: no handler for route" in str(error)
    assert "REDITUS_SIDECAR_TRANSIT_MOUNT ('transitx')" in str(error)
    assert "REDITUS_SIDECAR_TRANSIT_KEY ('reditus')" in str(error)


def test_another_status_says_only_what_vault_answered() -> None:
    error = transit_error(http_error(502, None, "bad gateway"), settings().transit)  # type: ignore[arg-type]
    assert str(error) == "vault transit transit/keys/reditus: Vault answered HTTP 502 (bad gateway)"


# --- metrics, the probe, Retry-After --------------------------------------------------


@pytest.fixture
def clock(clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """The shared fake clock (conftest.py) as the mode's clocks: perf_counter and monotonic
    move only when the test says so; Unix time is the real one."""
    monkeypatch.setattr(sys.modules[__name__], "mode_clock", clock)
    return clock


async def test_the_call_duration_is_the_round_trip(
    clock: FakeClock, registry: CollectorRegistry, metrics: Metrics
) -> None:
    answer = signed()

    def slow(inputs: list[bytes]) -> Any:
        clock.perf += 0.25  # the round trip to Vault
        return answer(inputs)

    mode = make_mode(slow, metrics)
    await mode.signer.sign_remote("u-1", 1_700_000_000)
    name = "reditus_sidecar_transit_call_duration_seconds"
    assert registry.get_sample_value(f"{name}_count") == 1
    assert registry.get_sample_value(f"{name}_sum") == 0.25
    success = {"result": "success"}
    assert registry.get_sample_value("reditus_sidecar_transit_calls_total", success) == 1


async def test_the_probe_counts_a_new_key_version_as_changed_and_the_same_as_unchanged(
    registry: CollectorRegistry,
    metrics: Metrics,
) -> None:
    version = 1
    mode = make_mode(lambda inputs: signed(version)(inputs), metrics)

    def probes(result: str) -> float | None:
        labels = {"product": "default", "result": result}
        return registry.get_sample_value("reditus_sidecar_secret_refresh_total", labels)

    assert await mode.probe()  # the first answer: changed (from nothing)
    assert (probes("changed"), probes("unchanged")) == (1, 0)
    assert await mode.probe()  # the same version again
    assert (probes("changed"), probes("unchanged")) == (1, 1)
    version = 2  # an import-version in Vault
    assert await mode.probe()
    assert (probes("changed"), probes("unchanged")) == (2, 1)
    assert registry.get_sample_value("reditus_sidecar_secret_version", {"product": "default"}) == 2


class Bound:
    """An rng whose jitter is always the lowest (`upper` False) or highest allowed."""

    def __init__(self, upper: bool) -> None:
        self.upper = upper

    def uniform(self, a: float, b: float) -> float:
        return b if self.upper else a


@pytest.mark.parametrize("upper", [False, True])
async def test_retry_after_counts_down_to_the_next_probe_and_is_at_least_1(
    clock: FakeClock, upper: bool
) -> None:
    """Signing that failed is retried at the next probe: the interval times the jitter from
    the probe's answer; once that moment has passed, 1 (never 0)."""
    probed = asyncio.Event()
    answer = signed()

    def handler(inputs: list[bytes]) -> Any:
        assert inputs == [PROBE_INPUT]
        probed.set()
        return answer(inputs)

    mode = make_mode(
        handler,
        rng=Bound(upper),
        REDITUS_SIDECAR_REFRESH_INTERVAL="100",
        REDITUS_SIDECAR_BACKOFF_MAX="600",
    )
    assert mode.retry_after("default") == 1  # no probe yet: due now
    mode.start()
    try:
        await asyncio.wait_for(probed.wait(), timeout=5)
        expected = round(100 * (1 + JITTER if upper else 1 - JITTER))  # 110 or 90
        for _ in range(100):  # the loop schedules the next probe right after the answer
            if mode.retry_after("default") != 1:
                break
            await asyncio.sleep(0)
        assert mode.retry_after("default") == expected
        clock.now += expected - 10
        assert mode.retry_after("default") == 10
        clock.now += 10.3  # the probe is overdue
        assert mode.retry_after("default") == 1
    finally:
        await mode.stop()


async def test_the_first_key_version_is_logged_in_use_and_a_later_one_rotated(
    caplog: pytest.LogCaptureFixture,
) -> None:
    version = 1
    mode = make_mode(lambda inputs: signed(version)(inputs))
    with caplog.at_level(logging.INFO, logger="sidecar.transit"):
        await mode.signer.sign_remote("u-1", 1_700_000_000)
        await mode.signer.sign_remote("u-2", 1_700_000_000)  # the same version: no log
        version = 2
        await mode.signer.sign_remote("u-3", 1_700_000_000)
    keys = [r for r in caplog.records if r.getMessage().startswith("transit key")]
    assert [(r.getMessage(), r.version, r.previous_version) for r in keys] == [  # type: ignore[attr-defined]
        ("transit key in use", 1, None),
        ("transit key rotated", 2, 1),
    ]
    assert mode.store.peek("default").version == 2  # type: ignore[union-attr]


async def test_an_older_key_version_in_an_answer_does_not_move_the_store_back(
    registry: CollectorRegistry,
    metrics: Metrics,
) -> None:
    """A Vault node that has not seen the rotation yet may sign with the previous version:
    the store keeps the newest version it has seen, and nothing is logged as a rotation."""
    version = 2
    mode = make_mode(lambda inputs: signed(version)(inputs), metrics)
    await mode.signer.sign_remote("u-1", 1_700_000_000)
    loaded = registry.get_sample_value(
        "reditus_sidecar_secret_loaded_timestamp_seconds", {"product": "default"}
    )
    version = 1
    _, used = await mode.signer.sign_remote("u-2", 1_700_000_000)
    assert used == 1  # that token was signed with version 1, and says so
    assert mode.store.peek("default").version == 2  # type: ignore[union-attr]
    assert registry.get_sample_value("reditus_sidecar_secret_version", {"product": "default"}) == 2
    assert (
        registry.get_sample_value(
            "reditus_sidecar_secret_loaded_timestamp_seconds", {"product": "default"}
        )
        == loaded
    )


async def test_a_key_version_past_256_is_still_unchanged_when_it_repeats(
    registry: CollectorRegistry,
    metrics: Metrics,
) -> None:
    """Versions are compared by value (a key rotated daily passes 256 in under a year)."""
    mode = make_mode(signed(version=300), metrics)
    assert await mode.probe()
    assert await mode.probe()
    labels = {"product": "default", "result": "unchanged"}
    assert registry.get_sample_value("reditus_sidecar_secret_refresh_total", labels) == 1
    assert mode.store.peek("default").version == 300  # type: ignore[union-attr]


async def test_each_answer_confirms_the_store_and_stamps_the_last_success(
    registry: CollectorRegistry,
    metrics: Metrics,
) -> None:
    mode = make_mode(signed(), metrics)
    name = "reditus_sidecar_secret_last_refresh_success_timestamp_seconds"
    assert registry.get_sample_value(name, {"product": "default"}) == 0
    before = time.time()
    await mode.signer.sign_remote("u-1", 1_700_000_000)
    stamped = registry.get_sample_value(name, {"product": "default"})
    assert stamped is not None
    assert stamped >= before
    assert mode.store.age("default") < float("inf")


async def test_a_failed_probe_is_counted_logged_and_not_ready(
    caplog: pytest.LogCaptureFixture, registry: CollectorRegistry, metrics: Metrics
) -> None:
    mode = make_mode(raising(http_error(500, None, "sealed")), metrics)
    with caplog.at_level(logging.WARNING, logger="sidecar.transit"):
        assert not await mode.probe()
    labels = {"product": "default", "result": "error"}
    assert registry.get_sample_value("reditus_sidecar_secret_refresh_total", labels) == 1
    [record] = [r for r in caplog.records if r.getMessage() == "transit probe failed"]
    assert "Vault answered HTTP 500 (sealed)" in record.error  # type: ignore[attr-defined]
    assert mode.store.peek("default") is None


async def test_stop_ends_the_probe_loop() -> None:
    mode = make_mode(signed(), rng=Bound(upper=True))
    mode.start()
    mode.start()  # a second start is a no-op
    loops = [t for t in asyncio.all_tasks() if t.get_name() == "transit"]
    assert len(loops) == 1
    await mode.stop()
    assert loops[0].done()
    assert not [t for t in asyncio.all_tasks() if t.get_name() == "transit"]


@pytest.mark.looptime
async def test_a_probe_whose_own_item_failed_is_tried_again_50_ms_later() -> None:
    """The call went through (the breaker stays closed) but the probe's item failed: the
    next probe comes 50 ms later (loop time), neither at once (a busy loop) nor seconds
    later."""
    loop = asyncio.get_running_loop()
    times: list[float] = []
    five = asyncio.Event()

    def handler(inputs: list[bytes]) -> Any:
        times.append(loop.time())
        if len(times) == 5:
            five.set()
        return {"data": {"batch_results": [{"error": "no"} for _ in inputs]}}

    mode = make_mode(handler)
    mode.start()
    try:
        await asyncio.wait_for(five.wait(), timeout=5)
    finally:
        await mode.stop()
    gaps = [later - earlier for earlier, later in itertools.pairwise(times[:5])]
    assert gaps == pytest.approx([0.05] * 4)


async def test_retry_after_while_the_breaker_is_open_is_the_refusal_window(
    clock: FakeClock,
) -> None:
    """After a failed call the breaker refuses for at least Vault's own Retry-After: that
    window, not the time to the next probe, is what a refused caller is told."""
    failed = VaultHTTPError(status=500, errors=["sealed"], retry_after=40.4, body=None)
    mode = make_mode(
        raising(failed),
        rng=Bound(upper=False),
        REDITUS_SIDECAR_REFRESH_INTERVAL="100",
        REDITUS_SIDECAR_BACKOFF_MAX="600",
    )
    with pytest.raises(SecretUnavailable, match="HTTP 500"):
        await mode.signer.sign_remote("u-1", 1_700_000_000)
    assert mode.retry_after("default") == 40  # 40.4 s, less the moments since


async def test_a_probe_answered_with_a_lower_version_counts_as_changed_and_is_believed(
    registry: CollectorRegistry,
    metrics: Metrics,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A key deleted and imported again under the same name starts again at version 1: the
    probe says Vault's key changed, and the store and the version metric follow it down
    (they used to keep the higher version until a restart)."""
    version = 3
    mode = make_mode(lambda inputs: signed(version)(inputs), metrics)
    assert await mode.probe()
    version = 1
    with caplog.at_level(logging.INFO, logger="sidecar.transit"):
        assert await mode.probe()
    labels = {"product": "default", "result": "changed"}
    assert registry.get_sample_value("reditus_sidecar_secret_refresh_total", labels) == 2
    assert mode.store.peek("default").version == 1  # type: ignore[union-attr]
    assert registry.get_sample_value("reditus_sidecar_secret_version", {"product": "default"}) == 1
    [record] = [r for r in caplog.records if r.getMessage().startswith("transit key version")]
    assert record.levelno == logging.WARNING
    assert (record.version, record.previous_version) == (1, 3)  # type: ignore[attr-defined]


async def test_a_bogus_version_in_a_token_answer_lasts_until_the_next_probe(
    registry: CollectorRegistry,
    metrics: Metrics,
) -> None:
    """One answer claiming a version the key does not have (here from something between us
    and Vault) used to pin the store and `reditus_sidecar_secret_version` at it for good,
    since lower versions were ignored. Tokens still only move it up; the probe, which asks
    what the key is now, brings it back."""
    version = 2
    mode = make_mode(lambda inputs: signed(version)(inputs), metrics)

    def gauge() -> float | None:
        return registry.get_sample_value("reditus_sidecar_secret_version", {"product": "default"})

    await mode.signer.sign_remote("u-1", 1_700_000_000)
    version = 4_000_000_000
    await mode.signer.sign_remote("u-2", 1_700_000_000)
    assert gauge() == 4_000_000_000
    version = 2
    _, used = await mode.signer.sign_remote("u-3", 1_700_000_000)
    assert (used, gauge()) == (2, 4_000_000_000)  # a token's answer never moves it down
    assert await mode.probe()
    assert gauge() == 2
    assert mode.store.peek("default").version == 2  # type: ignore[union-attr]


async def test_a_sighup_storm_logs_one_line_per_probe_it_owes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.transit")
    mode = make_mode(raising(RuntimeError("unused")))
    for _ in range(100):
        mode.refresh_now()
    assert [r.getMessage() for r in caplog.records].count("refresh requested") == 1
