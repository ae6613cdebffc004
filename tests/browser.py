"""Headless Debian Chromium for the tests, through Playwright: kept off every network but
loopback, with its own HOME, and every process it started stopped by PID afterwards
(its crash handler outlives the browser otherwise). `playwright install` is never used:
scripts/setup installs the Debian package."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from playwright.sync_api import Browser, sync_playwright

CHROMIUM = "/usr/bin/chromium"
# No proxy, no background traffic, no name resolves but loopback (and the names a test
# maps there itself).
BASE_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--no-proxy-server",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def resolver_rules(hosts: Sequence[str]) -> str:
    mapped = "".join(f"MAP {host} 127.0.0.1, " for host in hosts)
    return f"--host-resolver-rules={mapped}MAP * ~NOTFOUND, EXCLUDE localhost, EXCLUDE 127.0.0.1"


def _alive(pid: int) -> bool:
    """Whether a process exists and is not a zombie (a zombie has exited already)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _parent(pid: int) -> int:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def chromium_pids(marker: str) -> set[int]:
    """Chromium processes of this test: those descending from this process (the browser
    and its children, under Playwright's driver) and those naming `marker`, the test's own
    HOME (crashpad handlers detach to PID 1 but keep --database=HOME/...)."""
    mine = os.getpid()
    found: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        cmd = _cmdline(pid)
        if marker in cmd:
            found.add(pid)
            continue
        if "chromium" not in cmd and "crashpad" not in cmd:
            continue
        ancestor, hops = _parent(pid), 0
        while ancestor > 1 and hops < 64:
            if ancestor == mine:
                found.add(pid)
                break
            ancestor, hops = _parent(ancestor), hops + 1
    return {pid for pid in found if _alive(pid)}


def stop_leftovers(pids: set[int], marker: str) -> None:
    """Whatever of ours outlived browser.close(): a grace period, then SIGTERM, then
    SIGKILL, each by PID and each followed by up to 5 s of waiting for the exits."""
    for sig in (None, signal.SIGTERM, signal.SIGKILL):
        left = {pid for pid in pids | chromium_pids(marker) if _alive(pid)}
        if not left:
            return
        for pid in left:
            cmd = _cmdline(pid)
            if sig is not None and (marker in cmd or "chromium" in cmd):  # not a reused PID
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while any(_alive(pid) for pid in left) and time.monotonic() < deadline:
            time.sleep(0.05)
    assert not chromium_pids(marker), "chromium processes outlived the test"


@contextlib.contextmanager
def chromium(
    home: Path, *, hosts: Sequence[str] = (), extra_args: Sequence[str] = ()
) -> Iterator[Browser]:
    """Headless Debian chromium, HOME (crash database, config) under the test's tmp dir,
    `hosts` resolved to 127.0.0.1; every process it started is gone afterwards."""
    if shutil.which(CHROMIUM) is None:
        pytest.fail(
            f"{CHROMIUM} is missing: scripts/setup installs the Debian package `chromium`",
            pytrace=False,
        )
    home.mkdir()
    env: dict[str, str | float | bool] = {
        **os.environ,
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
    }
    marker = str(home)
    pids: set[int] = set()
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=[*BASE_ARGS, *extra_args, resolver_rules(hosts)],
                env=env,
                headless=True,
            )
            pids = chromium_pids(marker)
            try:
                yield browser
            finally:
                pids |= chromium_pids(marker)
                browser.close()
    finally:
        stop_leftovers(pids, marker)
