"""The coalescer on its own: batches bounded and ordered, each caller gets its own outcome,
and a failed call refuses at once (the callers queued behind it, and everyone in the
backoff window) instead of queueing them behind a dead remote end.

The remote end here is an in-process coroutine the test releases by hand, so the
interleaving is exact; the real transit round trip is in tests/test_transit.py.
"""

from __future__ import annotations

import asyncio
import logging
import random

import pytest

from sidecar.coalescer import Coalescer
from sidecar.errors import SecretUnavailable, SourceError
from tests.support import FakeClock


class Remote:
    """Records each batch; every call waits until the test releases it."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.gates: list[asyncio.Future[Exception | None]] = []
        self.called = asyncio.Event()

    async def call(self, items: list[str]) -> list[str | SourceError]:
        self.batches.append(list(items))
        gate: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()
        self.gates.append(gate)
        self.called.set()
        failure = await gate
        if failure is not None:
            raise failure
        return [SecretUnavailable(f"bad {i}") if i.startswith("bad") else i.upper() for i in items]

    async def wait_calls(self, count: int) -> None:
        while len(self.gates) < count:
            self.called.clear()
            await asyncio.wait_for(self.called.wait(), 5)

    def release(self, index: int, failure: Exception | None = None) -> None:
        self.gates[index].set_result(failure)


def make(remote: Remote, clock: FakeClock | None = None, **kwargs: int) -> Coalescer[str, str]:
    return Coalescer(
        remote.call,
        max_batch=kwargs.pop("max_batch", 3),
        backoff_max=kwargs.pop("backoff_max", 8),
        rng=random.Random(1),
        monotonic=clock or FakeClock(),
        **kwargs,
    )


async def test_first_request_goes_alone_the_rest_coalesce_up_to_the_cap() -> None:
    remote = Remote()
    coalescer = make(remote)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await remote.wait_calls(1)
    rest = [asyncio.ensure_future(coalescer.submit(x)) for x in "bcdefg"]
    await asyncio.sleep(0)
    assert remote.batches == [["a"]]  # one call in flight: the others wait for it
    remote.release(0)
    await remote.wait_calls(2)
    remote.release(1)
    await remote.wait_calls(3)
    remote.release(2)
    assert await first == "A"
    assert await asyncio.gather(*rest) == list("BCDEFG")
    assert remote.batches == [["a"], ["b", "c", "d"], ["e", "f", "g"]]


async def test_an_item_error_fails_only_that_item() -> None:
    remote = Remote()
    coalescer = make(remote)
    blocker = asyncio.ensure_future(coalescer.submit("x"))
    await remote.wait_calls(1)
    items = [asyncio.ensure_future(coalescer.submit(x)) for x in ("a", "bad-b", "c")]
    remote.release(0)
    await remote.wait_calls(2)
    remote.release(1)
    results = await asyncio.gather(*items, return_exceptions=True)
    assert results[0] == "A"
    assert results[2] == "C"
    assert isinstance(results[1], SecretUnavailable)
    assert str(results[1]) == "bad bad-b"
    assert await blocker == "X"
    assert not coalescer.failing  # an item error is not the remote end failing


async def test_a_failed_call_fails_the_waiting_requests_and_refuses_at_once(
    caplog: pytest.LogCaptureFixture, clock: FakeClock
) -> None:
    caplog.set_level(logging.WARNING, logger="sidecar.coalescer")
    remote = Remote()
    coalescer = make(remote, clock)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await remote.wait_calls(1)
    waiting = [asyncio.ensure_future(coalescer.submit(x)) for x in "bcde"]
    remote.release(0, SecretUnavailable("vault is down"))
    outcomes = await asyncio.gather(first, *waiting, return_exceptions=True)
    assert all(isinstance(o, SecretUnavailable) for o in outcomes)
    assert str(outcomes[0]) == "vault is down"
    assert coalescer.failing
    window = coalescer.refused_for()
    assert 0.5 <= window < 1.0  # the first backoff step; the callers are told 1 s at least
    assert [o.retry_after for o in outcomes] == [1.0] * 5  # type: ignore[union-attr]
    assert len(remote.batches) == 1  # the waiting ones were not sent after the failure
    (warning,) = [r for r in caplog.records if r.name == "sidecar.coalescer"]
    assert warning.error == "vault is down"  # type: ignore[attr-defined]
    assert warning.retry_in == round(window, 2)  # type: ignore[attr-defined]
    # In the backoff window: refused without a call.
    with pytest.raises(SecretUnavailable, match=r"vault is down \(refusing for 1.0 s") as refused:
        await coalescer.submit("f")
    assert refused.value.retry_after == 1.0
    assert len(remote.batches) == 1
    # After it: one call probes, and the others are refused while it is in flight.
    clock.now += window + 0.01
    assert coalescer.refused_for() == 0.0
    probe = asyncio.ensure_future(coalescer.submit("g"))
    await remote.wait_calls(2)
    with pytest.raises(SecretUnavailable, match=r"refusing for 1.0 s") as refused:
        await coalescer.submit("h")
    assert refused.value.retry_after == 1.0  # the probe's outcome is about a second away
    remote.release(1)
    assert await probe == "G"
    assert not coalescer.failing
    second = asyncio.ensure_future(coalescer.submit("i"))
    await remote.wait_calls(3)
    remote.release(2)
    assert await second == "I"


async def test_the_window_grows_with_failures_and_honours_retry_after(clock: FakeClock) -> None:
    remote = Remote()
    coalescer = make(remote, clock, backoff_max=8)
    windows = []
    for index in range(5):
        attempt = asyncio.ensure_future(coalescer.submit("a"))
        await remote.wait_calls(index + 1)
        remote.release(index, SecretUnavailable("down"))
        with pytest.raises(SecretUnavailable):
            await attempt
        windows.append(coalescer.refused_for())
        clock.now += windows[-1] + 0.01
    assert windows[0] <= 1.0
    assert windows[-1] >= 4.0  # 8 s cap, jitter in [50 %, 100 %]
    assert max(windows) <= 8.0
    attempt = asyncio.ensure_future(coalescer.submit("a"))
    await remote.wait_calls(6)
    remote.release(5, SecretUnavailable("rate limited", retry_after=7.5))
    with pytest.raises(SecretUnavailable):
        await attempt
    assert coalescer.refused_for() >= 7.5


async def test_a_full_queue_refuses_instead_of_growing() -> None:
    remote = Remote()
    coalescer = make(remote, max_queue=2)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await remote.wait_calls(1)
    queued = [asyncio.ensure_future(coalescer.submit(x)) for x in "bc"]
    await asyncio.sleep(0)
    with pytest.raises(SecretUnavailable, match="2 signing requests already wait") as refused:
        await coalescer.submit("d")
    assert refused.value.retry_after == 1
    remote.release(0)
    await remote.wait_calls(2)
    remote.release(1)
    assert [await first, *await asyncio.gather(*queued)] == ["A", "B", "C"]


async def test_by_default_4096_requests_may_wait() -> None:
    remote = Remote()
    coalescer = Coalescer(remote.call, max_batch=3)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await remote.wait_calls(1)
    queued = [asyncio.ensure_future(coalescer.submit(str(i))) for i in range(4096)]
    await asyncio.sleep(0)
    assert not any(task.done() for task in queued)  # all 4096 wait
    refused = asyncio.ensure_future(coalescer.submit("one too many"))
    await asyncio.sleep(0)
    assert refused.done()  # at once, not queued
    with pytest.raises(SecretUnavailable, match="4096 signing requests already wait"):
        await refused
    await coalescer.close()
    outcomes = await asyncio.gather(first, *queued, return_exceptions=True)
    assert all(isinstance(o, SecretUnavailable) for o in outcomes)


async def test_a_crashing_call_fails_its_batch_and_the_queue_moves_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A bug in the call (not a SourceError) is this batch's 500, not a breaker opening."""
    remote = Remote()
    coalescer = make(remote)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await remote.wait_calls(1)
    queued = asyncio.ensure_future(coalescer.submit("b"))
    await asyncio.sleep(0)
    remote.release(0, RuntimeError("a bug"))
    with pytest.raises(RuntimeError, match="a bug"):
        await asyncio.wait_for(first, 5)
    assert "a batch call crashed" in caplog.messages
    assert not coalescer.failing
    await remote.wait_calls(2)  # the request queued behind it is sent, no new one needed
    remote.release(1)
    assert await asyncio.wait_for(queued, 5) == "B"
    assert remote.batches == [["a"], ["b"]]


async def test_a_fresh_coalescer_refuses_for_nothing_whatever_the_clock() -> None:
    clock = FakeClock(0.0)  # time.monotonic()'s reference point is undefined
    coalescer = make(Remote(), clock)
    assert coalescer.refused_for() == 0.0
    assert not coalescer.failing


async def test_one_item_a_call_two_calls_in_flight() -> None:
    remote = Remote()
    coalescer = make(remote, max_batch=1, max_in_flight=2)
    tasks = [asyncio.ensure_future(coalescer.submit(x)) for x in "abc"]
    await remote.wait_calls(2)
    await asyncio.sleep(0)
    assert remote.batches == [["a"], ["b"]]  # "c" waits for a free slot
    remote.release(1)
    await remote.wait_calls(3)
    assert remote.batches == [["a"], ["b"], ["c"]]
    remote.release(0)
    remote.release(2)
    assert await asyncio.gather(*tasks) == ["A", "B", "C"]


async def test_an_in_flight_limit_past_256_holds_exactly() -> None:
    """The count of calls is compared by value: past the small integers CPython shares, an
    identity test would never see the limit reached."""
    remote = Remote()
    coalescer = make(remote, max_batch=1, max_in_flight=300)
    tasks = [asyncio.ensure_future(coalescer.submit(f"i{n}")) for n in range(301)]
    await remote.wait_calls(300)
    await asyncio.sleep(0)
    assert len(remote.batches) == 300  # the 301st waits for a free slot
    remote.release(0)
    await remote.wait_calls(301)
    assert remote.batches[-1] == ["i300"]
    for index in range(1, 301):
        remote.release(index)
    assert len(await asyncio.gather(*tasks)) == 301


@pytest.mark.parametrize(("max_batch", "max_in_flight"), [(0, 1), (1, 0), (-1, 1), (1, -1)])
def test_a_batch_or_in_flight_limit_below_1_is_refused(max_batch: int, max_in_flight: int) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        make(Remote(), max_batch=max_batch, max_in_flight=max_in_flight)


async def test_close_answers_everyone_waiting() -> None:
    remote = Remote()
    coalescer = make(remote)
    first = asyncio.ensure_future(coalescer.submit("a"))
    await remote.wait_calls(1)
    second = asyncio.ensure_future(coalescer.submit("b"))
    await asyncio.sleep(0)
    await coalescer.close()
    for task in (first, second):
        with pytest.raises(SecretUnavailable, match="shutting down"):
            await task
