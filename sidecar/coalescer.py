"""Concurrent requests for one remote operation, coalesced into bounded batch calls, with a
breaker that refuses at once while the remote end is failing.

When no call is in flight a request is sent at once (no added latency at low load); while
calls are in flight, new requests accumulate and the next free slot sends up to `max_batch`
of them in one call. A failed call opens the breaker for a backoff window: the batch and
everything queued behind it fail at once, and so does every request in the window, so a
hung remote end costs one timeout, not one per request. After the window, one call probes;
others are refused until it succeeds.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from .errors import SecretUnavailable, SourceError
from .timing import backoff_delay

log = logging.getLogger(__name__)

I = TypeVar("I")  # noqa: E741 - the item type
R = TypeVar("R")

#: One call's outcome: a result or an error for each item, in order.
BatchCall = Callable[[list[I]], Awaitable[Sequence[R | SourceError]]]


class Coalescer(Generic[I, R]):
    """Runs `call` on batches of submitted items; each submitter gets its own outcome."""

    def __init__(
        self,
        call: BatchCall[I, R],
        *,
        max_batch: int,
        max_in_flight: int = 1,
        max_queue: int = 4096,
        backoff_max: float = 30.0,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_batch < 1 or max_in_flight < 1:
            raise ValueError("max_batch and max_in_flight must be at least 1")
        self._call = call
        self.max_batch = max_batch
        self.max_in_flight = max_in_flight
        self.max_queue = max_queue
        self.backoff_max = backoff_max
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._monotonic = monotonic
        self._queue: deque[tuple[I, asyncio.Future[R]]] = deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._failures = 0
        self._refuse_until = 0.0
        self._last_error: SourceError | None = None

    @property
    def failing(self) -> bool:
        """The last call failed: the breaker is open or probing."""
        return self._failures > 0

    def refused_for(self) -> float:
        """Seconds until the breaker lets a call through again (0 when closed)."""
        return max(0.0, self._refuse_until - self._monotonic())

    async def submit(self, item: I) -> R:
        """The item's result; raises its own error, or `SecretUnavailable` at once while
        the breaker is open (or probing), or when the queue is full."""
        if self._failures:
            remaining = self.refused_for()
            if remaining > 0 or self._tasks:
                raise self._refusal(max(remaining, 1.0))
        if len(self._queue) >= self.max_queue:
            raise SecretUnavailable(
                f"{len(self._queue)} signing requests already wait for Vault", retry_after=1
            )
        future: asyncio.Future[R] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        self._launch()
        return await future

    def _refusal(self, retry_after: float) -> SecretUnavailable:
        return SecretUnavailable(
            f"{self._last_error} (refusing for {retry_after:.1f} s before trying again)",
            retry_after=retry_after,
        )

    def _launch(self) -> None:
        # While failing, a single call probes; the breaker refuses the rest.
        limit = 1 if self._failures else self.max_in_flight
        while self._queue and len(self._tasks) < limit:
            size = min(self.max_batch, len(self._queue))
            batch = [self._queue.popleft() for _ in range(size)]
            task = asyncio.get_running_loop().create_task(self._run(batch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _run(self, batch: list[tuple[I, asyncio.Future[R]]]) -> None:
        try:
            outcomes = await self._call([item for item, _ in batch])
        except SourceError as exc:
            window = self._open(exc)
            failure = type(exc)(str(exc), retry_after=max(window, 1.0))
            for _, future in batch:
                _settle_error(future, failure)
            self._fail_queue()
            return
        except asyncio.CancelledError:  # close(): shutting down
            for _, future in batch:
                _settle_error(future, SecretUnavailable("shutting down"))
            raise
        except Exception as exc:  # a bug: only this batch sees it (as a 500)
            for _, future in batch:
                _settle_error(future, exc)
            log.exception("a batch call crashed")
        else:
            self._failures = 0
            self._last_error = None
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if isinstance(outcome, SourceError):
                    _settle_error(future, outcome)
                elif not future.done():
                    future.set_result(outcome)
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._tasks.discard(task)
        self._launch()  # after a crash too: what waits behind it must not wait for a new submit

    def _open(self, exc: SourceError) -> float:
        """Refuse for a backoff window (at least the remote end's own Retry-After)."""
        self._failures += 1
        delay = backoff_delay(self._failures, self.backoff_max, self._rng)
        if exc.retry_after:
            delay = max(delay, min(exc.retry_after, self.backoff_max))
        self._refuse_until = self._monotonic() + delay
        self._last_error = exc
        log.warning(
            "remote signing failed; refusing at once until the backoff ends",
            extra={"error": str(exc), "retry_in": round(delay, 2)},
        )
        return delay

    def _fail_queue(self) -> None:
        """Requests that waited behind the failed call get the refusal too, now."""
        refusal = self._refusal(max(self.refused_for(), 1.0))
        while self._queue:
            _, future = self._queue.popleft()
            _settle_error(future, refusal)

    async def close(self) -> None:
        """Cancel calls in flight; their submitters get an error."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        while self._queue:
            _settle_error(self._queue.popleft()[1], SecretUnavailable("shutting down"))


def _settle_error(future: asyncio.Future[R], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
