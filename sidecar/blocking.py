"""Blocking calls off the event loop, in daemon threads.

A daemon thread rather than the loop's executor: a call stuck on a hung Vault or a hung
network mount can then delay neither `close()` nor the interpreter's exit; its late
result is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def start_in_thread(fn: Callable[[], T], *, name: str) -> asyncio.Future[T]:
    """Start `fn` in a new daemon thread; the returned future receives its outcome."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def deliver(setter: Callable[[Any], None], value: Any) -> None:
        if not future.done():
            setter(value)

    def run() -> None:
        try:
            result = fn()
        except BaseException as exc:
            outcome: tuple[Callable[[Any], None], Any] = (future.set_exception, exc)
        else:
            outcome = (future.set_result, result)
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(deliver, *outcome)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future


async def cancel_and_wait(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel background loops and wait until they have ended.

    One `cancel()` is not always enough on Python 3.11: `asyncio.wait_for` drops a
    cancellation that arrives just as the awaited call completes, and a `while True` loop
    then goes on for ever while its owner awaits it. So cancel again until each is done."""
    pending = {task for task in tasks if not task.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=0.1)
