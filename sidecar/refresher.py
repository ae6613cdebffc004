"""Background refresh of every product's secret: interval with jitter, capped exponential
backoff on errors, last-known-good, and `refresh_now()` for SIGHUP.

One task per product, so a slow or failing product never delays another. A failed read
never touches the snapshot in use: signing goes on with the last good secret.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping

from .blocking import cancel_and_wait
from .errors import SourceError
from .metrics import Metrics
from .signer import TokenSigner
from .sources.base import SecretMaterial, SecretSource
from .state import SecretStore, Snapshot
from .timing import backoff_delay, jittered, sleep_or_wake

log = logging.getLogger(__name__)

FILE_WATCH_INTERVAL = 1.0  # how often a source that can tell `changed()` is asked
MIN_SPACING = 1.0  # early reads (SIGHUP, file changes) of one product at most this often


class Refresher:
    """Keeps the store's snapshots fresh from the sources (a `freshness.Freshness`)."""

    def __init__(
        self,
        sources: Mapping[str, SecretSource],
        store: SecretStore,
        metrics: Metrics,
        *,
        interval: float,
        backoff_max: float,
        token_ttl: int = 0,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.sources = dict(sources)
        self.store = store
        self.metrics = metrics
        self.interval = interval
        self.backoff_max = backoff_max
        self.token_ttl = token_ttl
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._wake = {name: asyncio.Event() for name in self.sources}
        self._next_attempt: dict[str, float] = {}
        self._retry_floor: dict[str, float | None] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._failing: set[str] = set()  # products whose last read failed

    async def refresh(self, product: str) -> bool:
        """Read one product's secret once; True if the store now holds a good one."""
        source = self.sources[product]
        try:
            material = await source.fetch()
        except SourceError as exc:
            self.metrics.secret_refresh.labels(product=product, result="error").inc()
            self._retry_floor[product] = exc.retry_after
            log.warning(
                "secret refresh failed",
                extra={"product": product, "source": source.description, "error": str(exc)},
            )
            return False
        except Exception:
            # A bug must not kill the refresh loop; the traceback goes to the log only.
            self.metrics.secret_refresh.labels(product=product, result="error").inc()
            log.exception("secret refresh crashed", extra={"product": product})
            return False
        self._install(product, material)
        return True

    def _install(self, product: str, material: SecretMaterial) -> None:
        now = self.clock()
        current = self.store.peek(product)
        signer = TokenSigner(material.product_id, material.secret, ttl=self.token_ttl)
        if (
            current is not None
            and current.version == material.version
            and isinstance(current.signer, TokenSigner)
            and current.signer.same_key(signer)
        ):
            self.store.confirm(product)
            result = "unchanged"
        else:
            self.store.replace(
                product, Snapshot(signer=signer, version=material.version, loaded_at=now)
            )
            self.metrics.secret_version.labels(product=product).set(material.version)
            self.metrics.secret_loaded.labels(product=product).set(now)
            result = "changed"
            log.info(
                "secret loaded" if current is None else "secret rotated",
                extra={
                    "product": product,
                    "product_id": material.product_id,
                    "version": material.version,
                    "previous_version": current.version if current else None,
                },
            )
            if signer.key_length_warning:
                log.warning(
                    "weak product secret",
                    extra={"product": product, "detail": signer.key_length_warning},
                )
        self.metrics.secret_last_success.labels(product=product).set(now)
        self.metrics.secret_refresh.labels(product=product, result=result).inc()

    async def _loop(self, product: str) -> None:
        failures = 0
        wake = self._wake[product]
        while True:
            self._retry_floor.pop(product, None)
            # Cleared before the read: a SIGHUP arriving during it is owed one more read.
            wake.clear()
            started = self._monotonic()
            if await self.refresh(product):
                failures = 0
                self._failing.discard(product)
                delay = jittered(self.interval, self.rng)
            else:
                failures += 1
                self._failing.add(product)
                delay = backoff_delay(failures, self.backoff_max, self.rng)
                floor = self._retry_floor.get(product)
                if floor:  # the source's Retry-After, within our own cap
                    delay = max(delay, min(floor, self.backoff_max))
            self._next_attempt[product] = self._monotonic() + delay
            if await sleep_or_wake(wake, delay):
                # Woken early (SIGHUP, file change): reads stay MIN_SPACING apart, and
                # every wake until then is served by that one read.
                await asyncio.sleep(max(0.0, started + MIN_SPACING - self._monotonic()))

    async def _watch(self) -> None:
        """Wake a product's loop as soon as its source says the secret may have changed.

        A product whose last read failed is left to its backoff: a file that stays broken
        (or is a directory) is retried on the backoff schedule, not every second."""
        while True:
            await asyncio.sleep(FILE_WATCH_INTERVAL)
            for product, source in self.sources.items():
                if product not in self._failing and await source.changed():
                    self._wake[product].set()

    @staticmethod
    def _monotonic() -> float:
        """The clock every delay here runs on: the event loop's (time.monotonic unless a
        test fast-forwards it), so the spacing and backoff can be tested without waiting."""
        return asyncio.get_running_loop().time()

    def retry_after(self, product: str) -> int:
        """Whole seconds until the next read of this product (for Retry-After)."""
        due = self._next_attempt.get(product)
        if due is None:
            return 1
        return max(1, min(int(self.backoff_max), round(due - self._monotonic())))

    def refresh_now(self) -> None:
        """Re-read every product at once (SIGHUP); a storm of them coalesces into at most
        one read in flight and one more after it, per product, and one log line per read."""
        if not all(event.is_set() for event in self._wake.values()):
            log.info("refresh requested")
        for event in self._wake.values():
            event.set()

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._loop(name), name=f"refresh:{name}") for name in self.sources
        ]
        self._tasks.append(loop.create_task(self._watch(), name="refresh:watch"))

    async def stop(self) -> None:
        await cancel_and_wait(self._tasks)
        self._tasks = []
