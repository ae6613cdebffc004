"""Rotation through the real process and a real OpenBao: under concurrent signing
requests none fails, every token verifies with the old or the new secret and none with
the old one after the switch; SIGHUP picks a new version up at once.
"""

from __future__ import annotations

import asyncio
import signal
import time

import aiohttp
import pytest

from tests.openbao import Bao, unique, vault_sidecar
from tests.support import eventually_async, post_token, scrape_value, signed_with

pytestmark = pytest.mark.integration

OLD = "old-secret-" + "o" * 64
NEW = "new-secret-" + "n" * 64
HEADERS = {"X-Sidecar-Request": "true"}
VERSION = 'reditus_sidecar_secret_version{product="default"}'


@pytest.fixture
def path(bao: Bao) -> str:
    """A fresh KV path on the module's own server, holding the old secret (version 1)."""
    path = unique("reditus")
    bao.put(path, product_id="prod-rot", product_secret=OLD)
    return path


def which_secret(token: str) -> str | None:
    """ "old" or "new": the secret the token verifies with, if any."""
    for name, secret in (("old", OLD), ("new", NEW)):
        if signed_with(token, secret):
            return name
    return None


async def test_rotation_under_concurrent_requests(bao: Bao, path: str) -> None:
    results: list[tuple[float, float, int, str | None]] = []
    stop = asyncio.Event()

    async def worker(http: aiohttp.ClientSession, url: str) -> None:
        while not stop.is_set():
            started = time.monotonic()
            async with http.post(url, json={"userId": "u-rot"}, headers=HEADERS) as response:
                body = await response.json()
            results.append(
                (started, time.monotonic(), response.status, which_secret(body.get("token", "")))
            )

    with vault_sidecar(
        bao.addr, VAULT_TOKEN=bao.root_token, REDITUS_SIDECAR_KV_PATH=path
    ) as sidecar:
        assert scrape_value(sidecar.metrics_url, VERSION) == 1
        async with aiohttp.ClientSession() as http:
            url = sidecar.api_url + "/v1/token"
            workers = [asyncio.ensure_future(worker(http, url)) for _ in range(8)]
            # the new version lands while the load is on (answers flowing), not after a nap
            await eventually_async(lambda: len(results) >= 50, what="answers before the put")
            await asyncio.to_thread(bao.put, path, product_id="prod-rot", product_secret=NEW)
            await eventually_async(
                lambda: any(kind == "new" for *_, kind in results),
                within=15,
                what="a token with the new secret",
            )
            # requests started after the switch: an old-secret token among them is the bug
            switched = len(results)
            await eventually_async(lambda: len(results) >= switched + 100, what="answers after it")
            stop.set()
            await asyncio.gather(*workers)
        assert scrape_value(sidecar.metrics_url, VERSION) == 2

    assert results
    assert {status for _, _, status, _ in results} == {200}
    assert all(kind in ("old", "new") for *_, kind in results)
    switch = min(end for _, end, _, kind in results if kind == "new")
    after = [kind for started, _, _, kind in results if started > switch]
    assert after
    assert set(after) == {"new"}


def test_sighup_reads_the_new_version_at_once(bao: Bao, path: str) -> None:
    with vault_sidecar(
        bao.addr,
        VAULT_TOKEN=bao.root_token,
        REDITUS_SIDECAR_KV_PATH=path,
        REDITUS_SIDECAR_REFRESH_INTERVAL="300",
    ) as sidecar:
        bao.put(path, product_id="prod-rot", product_secret=NEW)
        status, body = post_token(sidecar.api_url, {"userId": "u"})
        assert status == 200
        assert which_secret(str(body["token"])) == "old"  # next read is minutes away
        sidecar.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while which_secret(str(post_token(sidecar.api_url, {"userId": "u"})[1]["token"])) != "new":
            assert time.monotonic() < deadline, "SIGHUP did not trigger a read"
            time.sleep(0.05)
        assert scrape_value(sidecar.metrics_url, VERSION) == 2
