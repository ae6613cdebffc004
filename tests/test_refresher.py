"""The refresher: last-known-good, change detection, backoff, refresh-now, atomic swaps."""

from __future__ import annotations

import asyncio
import logging
import random
from pathlib import Path
from typing import Any

import jwt
import pytest
from prometheus_client import CollectorRegistry

from sidecar.api import create_api_app
from sidecar.errors import SecretUnavailable
from sidecar.metrics import Metrics
from sidecar.ops import create_ops_app
from sidecar.redact import Redacted
from sidecar.refresher import MIN_SPACING, Refresher
from sidecar.sources.base import SecretMaterial
from sidecar.sources.file import FileSource
from sidecar.state import SecretStore
from sidecar.timing import backoff_delay
from tests.support import FakeClock, eventually_async, write_secret


class ScriptedSource:
    """A real in-memory source whose next answer the test sets (no I/O to fake)."""

    description = "scripted"

    def __init__(self) -> None:
        self.answer: SecretMaterial | Exception = SecretUnavailable("not yet")
        self.calls = 0

    async def fetch(self) -> SecretMaterial:
        self.calls += 1
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    async def changed(self) -> bool:
        return False

    async def close(self) -> None:
        return None


def material(secret: str, version: int, product_id: str = "p") -> SecretMaterial:
    return SecretMaterial(product_id=product_id, secret=Redacted(secret), version=version)


def refresher(
    registry: CollectorRegistry, source: object, **kwargs: float
) -> tuple[Refresher, SecretStore]:
    metrics = Metrics(registry, ["default"], "test")
    store = SecretStore(["default"])
    options = {"interval": 30.0, "backoff_max": 30.0, **kwargs}
    return (
        Refresher({"default": source}, store, metrics, clock=lambda: 1000.0, **options),  # type: ignore[dict-item, arg-type]
        store,
    )


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_keeps_the_last_good_secret_through_errors(registry: CollectorRegistry) -> None:
    src = ScriptedSource()
    ref, store = refresher(registry, src)
    assert not await ref.refresh("default")
    assert store.current("default") is None
    src.answer = material("one", 1)
    assert await ref.refresh("default")
    snapshot = store.current("default")
    assert snapshot is not None
    src.answer = SecretUnavailable("vault down")
    assert not await ref.refresh("default")
    assert store.current("default") is snapshot
    name = "reditus_sidecar_secret_refresh_total"
    assert sample(registry, name, product="default", result="error") == 2
    assert sample(registry, name, product="default", result="changed") == 1
    assert sample(registry, "reditus_sidecar_secret_version", product="default") == 1


async def test_unchanged_reads_confirm_without_replacing(registry: CollectorRegistry) -> None:
    src = ScriptedSource()
    src.answer = material("one", 4)
    ref, store = refresher(registry, src)
    await ref.refresh("default")
    first = store.current("default")
    await ref.refresh("default")
    assert store.current("default") is first
    name = "reditus_sidecar_secret_refresh_total"
    assert sample(registry, name, product="default", result="unchanged") == 1
    last = "reditus_sidecar_secret_last_refresh_success_timestamp_seconds"
    assert sample(registry, last, product="default") == 1000.0


async def test_unchanged_reads_keep_the_secret_fresh_under_max_staleness(
    registry: CollectorRegistry,
) -> None:
    """An unchanged read confirms the secret: without it every pod would go unready once
    MAX_STALENESS passed without a rotation."""
    clock = FakeClock(0.0)
    store = SecretStore(["default"], max_staleness=10.0, monotonic=clock)
    src = ScriptedSource()
    src.answer = material("one", 4)
    ref = Refresher(
        {"default": src},  # type: ignore[dict-item]
        store,
        Metrics(registry, ["default"], "test"),
        interval=5.0,
        backoff_max=5.0,
    )
    assert await ref.refresh("default")
    for _ in range(5):  # 40 s of unchanged reads every 8 s, each within the 10 s bound
        clock.now += 8.0
        assert await ref.refresh("default")
        assert store.current("default") is not None
    clock.now += 11.0  # no read for longer than MAX_STALENESS: now it is stale
    assert store.current("default") is None


async def test_max_staleness_counts_from_the_last_success_while_reads_keep_failing(
    registry: CollectorRegistry, aiohttp_client: Any
) -> None:
    """Issue 19: with MAX_STALENESS set and every read failing, /readyz fails and signing
    answers 503 `secret_unavailable` once MAX_STALENESS has passed since the last *good*
    read. A failed read must neither count as a success nor be the only moment staleness
    is looked at. The refresher runs its real loop (failures every few ms of real time);
    the store's staleness clock is a fake one the test moves."""
    clock = FakeClock(0.0)
    store = SecretStore(["default"], max_staleness=10.0, monotonic=clock)
    metrics = Metrics(registry, ["default"], "test")
    src = ScriptedSource()
    src.answer = material("one", 1)
    ref = Refresher(
        {"default": src},
        store,
        metrics,
        interval=0.01,
        backoff_max=0.01,
        clock=lambda: 1000.0,
    )
    api = await aiohttp_client(create_api_app(store, metrics, retry_after=ref.retry_after))
    ops = await aiohttp_client(create_ops_app(store, registry))

    def failed() -> float:
        name = "reditus_sidecar_secret_refresh_total"
        return sample(registry, name, product="default", result="error") or 0.0

    async def two_more_failures(what: str) -> None:
        """Let the refresher fail at least twice at the current fake time."""
        before = failed()
        await eventually_async(lambda: failed() >= before + 2, what=what)

    async def readyz() -> tuple[int, dict[str, Any]]:
        response = await ops.get("/readyz")
        return response.status, (await response.json())["products"]["default"]

    async def sign() -> tuple[int, dict[str, Any], str | None]:
        response = await api.post(
            "/v1/token",
            json={"userId": "u"},
            headers={"X-Sidecar-Request": "true", "Content-Type": "application/json"},
        )
        return response.status, await response.json(), response.headers.get("Retry-After")

    ref.start()
    try:
        await eventually_async(lambda: store.peek("default") is not None, what="the good read")
        src.answer = SecretUnavailable("vault down")  # from now on every read fails
        await two_more_failures("failures right after the good read")
        clock.now = 9.5  # 9.5 s since the good read, reads failing all along
        await two_more_failures("failures at 9.5 s")
        status, product = await readyz()
        assert (status, product["usable"], product["secondsSinceRefresh"]) == (200, True, 9.5)
        status, body, _ = await sign()
        assert status == 200, body
        assert jwt.decode(body["token"], "one", algorithms=["HS512"])["UserId"] == "u"

        clock.now = 10.5  # past MAX_STALENESS since the good read, failures still going on
        await two_more_failures("failures at 10.5 s")
        status, product = await readyz()
        assert (status, product["loaded"], product["usable"]) == (503, True, False)
        assert product["secondsSinceRefresh"] == 10.5  # measured from the success only
        status, body, retry_after = await sign()
        assert (status, body["error"]["code"]) == (503, "secret_unavailable")
        assert retry_after is not None
        assert int(retry_after) >= 1
        clock.now = 60.0  # and it stays so for as long as the reads fail
        await two_more_failures("failures at 60 s")
        assert (await readyz())[0] == 503
        assert (await sign())[0] == 503

        src.answer = material("one", 1)  # the source answers again: fresh at once
        await eventually_async(lambda: store.current("default") is not None, what="recovery")
        status, product = await readyz()
        assert (status, product["usable"], product["secondsSinceRefresh"]) == (200, True, 0.0)
        assert (await sign())[0] == 200
    finally:
        await ref.stop()


class Extreme:
    """A stand-in random source: every draw is the top (or bottom) of its range."""

    def __init__(self, top: bool) -> None:
        self.top = top

    def uniform(self, low: float, high: float) -> float:
        return high if self.top else low


async def test_the_interval_is_jittered() -> None:
    """+-10 %: many pods started together must not read Vault in lockstep."""
    for top, expected in ((True, 110), (False, 90)):
        src = ScriptedSource()
        src.answer = material("one", 1)
        ref, _store = refresher(CollectorRegistry(), src, interval=100.0, backoff_max=1000.0)
        ref.rng = Extreme(top)  # type: ignore[assignment]
        ref.start()
        try:
            await eventually_async(lambda src=src: src.calls == 1, what="the first read")
            await eventually_async(lambda ref=ref: ref.retry_after("default") > 1)
            assert ref.retry_after("default") == expected
        finally:
            await ref.stop()


async def test_retry_after_follows_the_backoff(registry: CollectorRegistry) -> None:
    src = ScriptedSource()  # always failing
    ref, _store = refresher(registry, src, interval=100.0, backoff_max=30.0)
    ref.rng = Extreme(True)  # type: ignore[assignment]
    ref.start()
    try:
        # a failed read schedules the next attempt before the loop yields: the step of the
        # second failure is visible as soon as the second call is
        await eventually_async(lambda: src.calls == 1, what="the first attempt")
        assert ref.retry_after("default") == 1
        await eventually_async(lambda: src.calls == 2, what="the second attempt")
        assert ref.retry_after("default") == 2  # the second backoff step, 2 s
    finally:
        await ref.stop()


async def test_a_success_starts_the_backoff_again_from_one_second(
    registry: CollectorRegistry,
) -> None:
    src = ScriptedSource()
    src.answer = material("one", 1)
    ref, _store = refresher(registry, src, interval=100.0, backoff_max=30.0)
    ref.rng = Extreme(True)  # type: ignore[assignment]
    assert ref.retry_after("default") == 1  # nothing scheduled yet: retry in a second
    ref.start()
    try:
        await eventually_async(lambda: src.calls == 1, what="the good read")
        src.answer = SecretUnavailable("down")
        ref.refresh_now()
        await eventually_async(lambda: src.calls == 2, what="the first failure")
        assert ref.retry_after("default") == 1
        await eventually_async(lambda: src.calls == 3, what="the second failure")
        assert ref.retry_after("default") == 2
    finally:
        await ref.stop()


@pytest.mark.looptime
@pytest.mark.parametrize(
    ("top", "expected"),
    [
        # the top of the jitter: steps 1, 2, 4, 8; the interval 100 s * 1.1 after the success
        (True, [0.0, 1.0, 3.0, 7.0, 15.0, 125.0, 126.0, 128.0]),
        # the bottom: half steps 0.5, 1, 2, 4; the interval 100 s * 0.9
        (False, [0.0, 0.5, 1.5, 3.5, 7.5, 97.5, 98.0, 99.0]),
    ],
)
async def test_a_success_after_grown_backoff_starts_it_again_from_one_second(
    registry: CollectorRegistry, top: bool, expected: list[float]
) -> None:
    """Issue 19: four failures grow the backoff to 8 s; one good read must bring the next
    failure's delay back to the first step (1 s, then 2 s), not on to 16 s. On the
    fast-forwarded loop clock, with the jitter pinned at either end of its range."""
    loop = asyncio.get_running_loop()
    src = TimedSource()
    src.answer = SecretUnavailable("vault down")
    ref, store = refresher(registry, src, interval=100.0, backoff_max=30.0)
    ref.rng = Extreme(top)  # type: ignore[assignment]
    began = loop.time()
    ref.start()
    try:
        await eventually_async(lambda: len(src.reads) == 4, what="four failed reads")
        src.answer = material("one", 1)  # the fifth read, 8 s (or 4 s) on, succeeds
        await eventually_async(lambda: store.current("default") is not None, what="the good read")
        src.answer = SecretUnavailable("vault down again")
        await eventually_async(lambda: len(src.reads) == 6, what="the first failure after it")
        assert ref.retry_after("default") == 1  # what a 503 tells callers: the first step again
        await eventually_async(lambda: len(src.reads) == 8, what="two more failures")
        assert [round(at - began, 3) for at in src.reads] == expected
    finally:
        await ref.stop()


async def test_rotation_swaps_the_whole_snapshot(registry: CollectorRegistry) -> None:
    src = ScriptedSource()
    src.answer = material("secret-one", 1, "p1")
    ref, store = refresher(registry, src)
    await ref.refresh("default")
    src.answer = material("secret-two", 2, "p2")
    await ref.refresh("default")
    snapshot = store.current("default")
    assert snapshot is not None
    assert snapshot.version == 2
    claims = jwt.decode(snapshot.signer.sign("u", 1), "secret-two", algorithms=["HS512"])
    assert claims["ProductId"] == "p2"  # id and secret always travel together
    assert sample(registry, "reditus_sidecar_secret_version", product="default") == 2


async def test_a_crashing_source_is_counted_not_fatal(registry: CollectorRegistry) -> None:
    src = ScriptedSource()
    src.answer = RuntimeError("bug")
    ref, _store = refresher(registry, src)
    assert not await ref.refresh("default")
    name = "reditus_sidecar_secret_refresh_total"
    assert sample(registry, name, product="default", result="error") == 1


def test_backoff_steps_double_from_one_second_to_the_cap() -> None:
    top = [backoff_delay(n, 30, Extreme(True)) for n in range(1, 8)]  # type: ignore[arg-type]
    bottom = [backoff_delay(n, 30, Extreme(False)) for n in range(1, 8)]  # type: ignore[arg-type]
    assert top == [1, 2, 4, 8, 16, 30, 30]
    assert bottom == [0.5, 1, 2, 4, 8, 15, 15]
    assert backoff_delay(0, 30, Extreme(True)) == 1  # type: ignore[arg-type]


def test_backoff_grows_from_one_second_to_the_cap() -> None:
    rng = random.Random(7)
    steps = [max(backoff_delay(n, 30, rng) for _ in range(200)) for n in range(1, 9)]
    lows = [min(backoff_delay(n, 30, rng) for _ in range(200)) for n in range(1, 9)]
    assert lows[0] >= 0.5
    assert steps[0] <= 1.0
    assert steps[1] <= 2.0
    assert steps[2] <= 4.0
    assert all(step <= 30 for step in steps)
    assert steps[-1] > 25  # reaches the cap
    assert lows[-1] >= 15  # jitter stays within half of the step


async def test_loop_retries_soon_after_errors_and_recovers(registry: CollectorRegistry) -> None:
    src = ScriptedSource()
    ref, store = refresher(registry, src, interval=60.0, backoff_max=2.0)
    ref.start()
    try:
        await eventually_async(lambda: src.calls == 1, what="the first, failing read")
        src.answer = material("one", 1)
        # the backoff (<= 1 s) brings the next attempt
        await eventually_async(lambda: store.current("default") is not None, within=5)
        calls = src.calls
        # healthy: the next read is due after the 60 s interval (capped at BACKOFF_MAX for
        # Retry-After), no longer on the backoff's 1 s step
        await eventually_async(lambda: ref.retry_after("default") == 2)
        assert src.calls == calls
        ref.refresh_now()  # SIGHUP
        await eventually_async(lambda: src.calls == calls + 1, what="the SIGHUP read")
    finally:
        await ref.stop()


class GatedSource(ScriptedSource):
    """A source whose reads wait until the test opens the gate: a read 'in flight'."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = material("one", 1)
        self.gate = asyncio.Event()
        self.reading = asyncio.Event()

    async def fetch(self) -> SecretMaterial:
        self.reading.set()
        await self.gate.wait()
        self.reading.clear()
        return await super().fetch()


@pytest.mark.looptime
async def test_a_storm_of_sighups_coalesces_into_one_more_read(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.refresher")

    def requested() -> int:
        return [r.getMessage() for r in caplog.records].count("refresh requested")

    src = GatedSource()
    ref, _store = refresher(registry, src, interval=3600.0)
    ref.start()
    try:
        await asyncio.wait_for(src.reading.wait(), 5)  # the first read is in flight
        for _ in range(100):
            ref.refresh_now()
        assert requested() == 1  # a line per read owed, not per signal
        src.gate.set()
        await eventually_async(lambda: src.calls == 2, what="the one extra read")
        for _ in range(100):  # and a second storm after it: again one read, spaced
            ref.refresh_now()
        await eventually_async(lambda: src.calls == 3, what="the read after the second storm")
        assert requested() == 2
        await asyncio.sleep(10 * MIN_SPACING)  # loop time, fast-forwarded: nothing else was owed
        assert src.calls == 3
    finally:
        await ref.stop()


async def test_a_sighup_during_a_read_is_not_lost(registry: CollectorRegistry) -> None:
    src = GatedSource()
    ref, _store = refresher(registry, src, interval=3600.0)
    ref.start()
    try:
        await asyncio.wait_for(src.reading.wait(), 5)
        ref.refresh_now()
        src.gate.set()
        await eventually_async(lambda: src.calls == 2, what="the read owed to the SIGHUP")
    finally:
        await ref.stop()


class TimedSource(ScriptedSource):
    """Answers at once and notes the loop time of every read and every `changed()` call."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = material("one", 1)
        self.reads: list[float] = []
        self.asked: list[float] = []

    async def fetch(self) -> SecretMaterial:
        self.reads.append(asyncio.get_running_loop().time())
        return await super().fetch()

    async def changed(self) -> bool:
        self.asked.append(asyncio.get_running_loop().time())
        return False


class AlwaysChangedFailingSource(TimedSource):
    """Says on every watch tick that it changed, and fails every read."""

    def __init__(self) -> None:
        super().__init__()
        self.answer = SecretUnavailable("a directory, not a file")

    async def changed(self) -> bool:
        await super().changed()
        return True


@pytest.mark.looptime
async def test_file_watch_leaves_a_failing_source_to_the_backoff(
    registry: CollectorRegistry,
) -> None:
    """A source that changes on every stat (a directory at the secret path does) but fails
    to read is read on the backoff schedule, 1 s, 2 s, 4 s..., not on every 1 s watch tick."""
    loop = asyncio.get_running_loop()
    src = AlwaysChangedFailingSource()
    ref, store = refresher(registry, src, interval=3600.0, backoff_max=30.0)
    ref.rng = Extreme(True)  # type: ignore[assignment]
    began = loop.time()
    ref.start()
    try:
        await asyncio.sleep(10.5)
        assert [round(at - began, 3) for at in src.reads] == [0.0, 1.0, 3.0, 7.0]
        assert store.current("default") is None
        errors = sample(
            registry, "reditus_sidecar_secret_refresh_total", product="default", result="error"
        )
        assert errors == 4
    finally:
        await ref.stop()


async def test_retry_after_from_the_source_stretches_the_backoff(
    registry: CollectorRegistry,
) -> None:
    src = ScriptedSource()
    src.answer = SecretUnavailable("busy", retry_after=5)
    ref, _store = refresher(registry, src, interval=60.0, backoff_max=10.0)
    ref.start()
    try:
        await eventually_async(lambda: ref.retry_after("default") > 1, what="the first read")
        assert src.calls == 1
        assert ref.retry_after("default") >= 4
    finally:
        await ref.stop()


async def test_file_changes_are_picked_up_without_waiting_for_the_interval(
    registry: CollectorRegistry, tmp_path: Path
) -> None:
    path = tmp_path / "s.json"
    write_secret(path, "p", "one")
    src = FileSource(path, product_id_key="product_id", secret_key="product_secret")
    ref, store = refresher(registry, src, interval=3600.0)
    ref.start()
    try:
        await eventually_async(lambda: store.current("default"), what="the first read")
        write_secret(path, "p", "two")
        # the 1 s watch notices, long before the hour
        await eventually_async(
            lambda: (snap := store.current("default")) is not None and snap.version == 2,
            what="the watch re-read",
        )
        snapshot = store.current("default")
        assert snapshot is not None
        assert snapshot.version == 2
        jwt.decode(snapshot.signer.sign("u", 1), "two", algorithms=["HS512"])
    finally:
        await ref.stop()


async def test_logs_say_loaded_then_rotated_and_warn_on_a_weak_secret_once(
    registry: CollectorRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    src = ScriptedSource()
    ref, _store = refresher(registry, src)
    strong = "s" * 64
    caplog.set_level(logging.INFO, logger="sidecar.refresher")
    src.answer = material(strong, 1)
    await ref.refresh("default")
    await ref.refresh("default")  # unchanged: no record
    src.answer = material("short", 2)
    await ref.refresh("default")
    await ref.refresh("default")  # the weak secret again: no second warning
    records = [
        (r.msg, getattr(r, "version", None), getattr(r, "previous_version", None))
        for r in caplog.records
        if r.name == "sidecar.refresher"
    ]
    assert records == [
        ("secret loaded", 1, None),
        ("secret rotated", 2, 1),
        ("weak product secret", None, None),
    ]
    assert all(strong not in r.getMessage() + str(r.__dict__) for r in caplog.records)


async def test_any_other_version_is_installed_even_an_older_one(
    registry: CollectorRegistry,
) -> None:
    """Vault's version is what the metric and the logs report: a source that answers an
    older version (a restored backup) with the same secret is still a change."""
    src = ScriptedSource()
    ref, store = refresher(registry, src)
    src.answer = material("same", 5)
    await ref.refresh("default")
    src.answer = material("same", 4)
    await ref.refresh("default")
    assert store.current("default").version == 4  # type: ignore[union-attr]
    assert sample(registry, "reditus_sidecar_secret_version", product="default") == 4
    assert (
        sample(
            registry, "reditus_sidecar_secret_refresh_total", product="default", result="changed"
        )
        == 2
    )


async def test_a_newer_version_is_a_change_and_a_large_one_read_again_is_not(
    registry: CollectorRegistry,
) -> None:
    src = ScriptedSource()
    ref, store = refresher(registry, src)
    for version in (5, 6, 1000, 1000):  # same secret; versions past the small-int cache
        src.answer = material("same", int(str(version)))  # a new int object, as a read gives
        await ref.refresh("default")
        assert store.current("default").version == version  # type: ignore[union-attr]
    changed = sample(
        registry, "reditus_sidecar_secret_refresh_total", product="default", result="changed"
    )
    unchanged = sample(
        registry, "reditus_sidecar_secret_refresh_total", product="default", result="unchanged"
    )
    assert (changed, unchanged) == (3, 1)
    assert sample(registry, "reditus_sidecar_secret_version", product="default") == 1000


async def test_retry_after_is_never_below_one_second(registry: CollectorRegistry) -> None:
    """Retry-After: 0 would tell clients to hammer; even a sub-second backoff says 1."""
    src = ScriptedSource()  # always failing
    ref, _store = refresher(registry, src, interval=100.0, backoff_max=0.5)
    ref.start()
    try:
        await eventually_async(lambda: src.calls >= 1, what="the first attempt")
        assert ref.retry_after("default") == 1
    finally:
        await ref.stop()


@pytest.mark.looptime
async def test_an_early_read_waits_out_the_spacing_and_a_late_one_waits_for_nothing(
    registry: CollectorRegistry,
) -> None:
    """On a fast-forwarded loop clock: a SIGHUP right after a read is served MIN_SPACING
    after that read, one long after the last read is served at once."""
    loop = asyncio.get_running_loop()
    src = TimedSource()
    ref, _store = refresher(registry, src, interval=3600.0)
    ref.start()
    try:
        await eventually_async(lambda: len(src.reads) == 1, what="the first read")
        ref.refresh_now()
        await eventually_async(lambda: len(src.reads) == 2, what="the early read")
        assert src.reads[1] - src.reads[0] == pytest.approx(MIN_SPACING, abs=1e-3)
        await asyncio.sleep(10 * MIN_SPACING)
        asked_at = loop.time()
        ref.refresh_now()
        await eventually_async(lambda: len(src.reads) == 3, what="the late read")
        assert src.reads[2] == pytest.approx(asked_at, abs=1e-3)
    finally:
        await ref.stop()


@pytest.mark.looptime
async def test_the_watch_asks_the_source_once_a_second(registry: CollectorRegistry) -> None:
    loop = asyncio.get_running_loop()
    src = TimedSource()
    ref, _store = refresher(registry, src, interval=3600.0)
    began = loop.time()
    ref.start()
    try:
        await asyncio.sleep(10.5)
        ticks = [round(at - began, 3) for at in src.asked]
        assert ticks == [float(n) for n in range(1, 11)]
    finally:
        await ref.stop()
