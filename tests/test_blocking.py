"""start_in_thread: results and errors reach the loop; a call that never returns cannot hold
up the interpreter's exit (a hung Vault or network mount must not stop a shutdown)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from sidecar.blocking import cancel_and_wait, start_in_thread
from tests.support import ROOT, eventually_async


async def test_the_result_and_the_exception_reach_the_loop() -> None:
    assert await start_in_thread(lambda: 42, name="t") == 42

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await start_in_thread(fail, name="t")


@pytest.mark.integration
def test_a_call_that_never_returns_does_not_hold_the_exit() -> None:
    script = textwrap.dedent(
        """
        import asyncio, threading
        from sidecar.blocking import start_in_thread

        async def main():
            start_in_thread(threading.Event().wait, name="stuck")  # never returns
            print("leaving", flush=True)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=20
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "leaving\n"


async def test_cancel_and_wait_ends_a_loop_that_lost_a_cancellation() -> None:
    """Python 3.11's wait_for can swallow a cancellation; the loop must still be stopped."""
    rounds = []

    async def loop() -> None:
        swallowed = False
        while True:
            try:
                await asyncio.sleep(0.01)
            except asyncio.CancelledError:
                if swallowed:
                    raise
                swallowed = True  # what wait_for does when the call completes at that moment
            rounds.append(1)

    task = asyncio.get_running_loop().create_task(loop())
    await eventually_async(lambda: rounds, what="the loop running")
    await asyncio.wait_for(cancel_and_wait([task]), 5)
    assert task.cancelled()


@pytest.mark.looptime
async def test_cancel_and_wait_cancels_again_a_tenth_of_a_second_later() -> None:
    """On a fast-forwarded loop clock: a loop that swallowed the first cancellation is
    cancelled again after 0.1 s, so a shutdown is not held up by a lost cancellation."""
    loop = asyncio.get_running_loop()
    cancelled_at: list[float] = []

    async def stubborn() -> None:
        while True:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                cancelled_at.append(loop.time())
                if len(cancelled_at) == 2:
                    raise

    task = loop.create_task(stubborn())
    await asyncio.sleep(0)  # it runs up to its first sleep
    began = loop.time()
    await cancel_and_wait([task])
    assert [round(at - began, 3) for at in cancelled_at] == [0.0, 0.1]
