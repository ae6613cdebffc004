"""start_in_thread: results and errors reach the loop; a call that never returns cannot hold
up the interpreter's exit (a hung Vault or network mount must not stop a shutdown)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sidecar.blocking import start_in_thread
from tests.support import ROOT


async def test_the_result_and_the_exception_reach_the_loop() -> None:
    assert await start_in_thread(lambda: 42, name="t") == 42

    def fail() -> None:
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        await start_in_thread(fail, name="t")


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
