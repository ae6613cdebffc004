"""When to try again: capped exponential backoff, interval jitter, and the wait that a
wake-up (SIGHUP, a new token, a changed file) ends early.

A leaf: the refresher, the transit probe, the Vault session and the coalescer all time
their retries with it, and it imports nothing of the sidecar's.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

BACKOFF_INITIAL = 1.0
JITTER = 0.1  # +-10 % on the normal interval spreads many pods' reads over time


def backoff_delay(failures: int, cap: float, rng: random.Random) -> float:
    """Exponential from 1 s, capped, with jitter in [50 %, 100 %] of the step."""
    step = min(cap, BACKOFF_INITIAL * 2 ** max(0, failures - 1))
    return float(step * rng.uniform(0.5, 1.0))


def jittered(interval: float, rng: random.Random) -> float:
    """`interval`, give or take JITTER of it."""
    return interval * rng.uniform(1 - JITTER, 1 + JITTER)


async def sleep_or_wake(wake: asyncio.Event, seconds: float | None) -> bool:
    """Wait `seconds` (None: for ever) or until `wake` is set; True when woken early.

    The caller clears `wake` before the work whose next turn it waits for, so a wake-up
    arriving during that work is not lost: the wait then ends at once."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(wake.wait(), seconds)
        return True
    return False
