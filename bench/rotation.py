"""Rotation under load: time from a secret write to the first token signed with the new
secret, and failed requests during the switch (must be 0), for the file and Vault sources.

    .venv/bin/python bench/rotation.py                      # both sources, 5 rotations each
    .venv/bin/python bench/rotation.py --source vault --rotations 10 --interval 2

The sidecar runs pinned to one core; this script's load (asyncio, N keep-alive
connections sending back to back) to another. Every response is checked: a 200 whose
token verifies with the old or the new secret, nothing else. Printed as markdown.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import common
from common import PRODUCT_ID, Server

HEADERS = {"Content-Type": "application/json", "X-Sidecar-Request": "true"}


def secret_for(n: int) -> str:
    return f"rotation-{n:04d}-" + hashlib.sha256(str(n).encode()).hexdigest()


def signed_with(token: str, secret: str) -> bool:
    head, payload, signature = token.split(".")
    mac = hmac.new(secret.encode(), f"{head}.{payload}".encode(), hashlib.sha512).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode() == signature


@dataclass
class Load:
    """Requests sent back to back on N connections; counts by which secret signed them."""

    url: str
    connections: int
    secrets: list[str]
    by_secret: dict[int, int] = field(default_factory=dict)
    first_seen: dict[int, float] = field(default_factory=dict)
    last_seen: dict[int, float] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    requests: int = 0
    running: bool = True

    async def worker(self, session: aiohttp.ClientSession) -> None:
        body = json.dumps({"userId": "u-rotation"}).encode()
        while self.running:
            try:
                async with session.post(self.url, data=body, headers=HEADERS) as response:
                    payload = await response.read()
                    done = time.monotonic()
                    if response.status != 200:
                        self.failures.append(f"{response.status} {payload[:200]!r}")
                        continue
                    token = json.loads(payload)["token"]
            except (TimeoutError, aiohttp.ClientError) as exc:
                self.failures.append(repr(exc))
                continue
            self.requests += 1
            for index in range(len(self.secrets) - 1, -1, -1):  # newest first: the common case
                if signed_with(token, self.secrets[index]):
                    self.by_secret[index] = self.by_secret.get(index, 0) + 1
                    self.first_seen.setdefault(index, done)
                    self.last_seen[index] = done
                    break
            else:
                self.failures.append("token signed with an unknown secret")

    async def run(self, scenario: Callable[[], Awaitable[None]]) -> None:
        connector = aiohttp.TCPConnector(limit=self.connections)
        timeout = aiohttp.ClientTimeout(total=10)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            workers = [asyncio.create_task(self.worker(session)) for _ in range(self.connections)]
            try:
                await scenario()
            finally:
                self.running = False
                await asyncio.gather(*workers)


@dataclass
class Rotation:
    propagation: float  # s from the write completing to the first new-secret token received
    old_after: float  # s from that first new token to the last old-secret token received


async def rotate_under_load(
    url: str,
    write: Callable[[str], Awaitable[None]],
    rotations: int,
    connections: int,
    settle: float,
) -> tuple[list[Rotation], Load]:
    secrets = [secret_for(n) for n in range(rotations + 1)]
    load = Load(url, connections, secrets)
    results: list[Rotation] = []

    async def scenario() -> None:
        await asyncio.sleep(1.0)  # warm: connections open, steady state
        for n in range(1, rotations + 1):
            await write(secrets[n])
            written = time.monotonic()
            deadline = written + 60
            # Polling at 1 ms is the measurement's resolution; an Event would add a wake-up
            # per response to the hot path of the load workers.
            while n not in load.first_seen and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            if n not in load.first_seen:
                raise RuntimeError(f"rotation {n}: no token with the new secret within 60 s")
            await asyncio.sleep(settle)  # let stragglers signed with the old one land
            first_new = load.first_seen[n]
            results.append(
                Rotation(first_new - written, max(0.0, load.last_seen[n - 1] - first_new))
            )

    await load.run(scenario)
    return results, load


@contextlib.contextmanager
def file_sidecar(tmp: Path) -> Iterator[tuple[Server, Callable[[str], Awaitable[None]]]]:
    secret_file = tmp / "secret.json"
    common.write_secret(secret_file, secret=secret_for(0))
    server = common.start_sidecar(
        "sidecar-file",
        REDITUS_SIDECAR_SECRET_SOURCE="file",
        REDITUS_SIDECAR_SECRET_FILE=str(secret_file),
    )

    async def write(secret: str) -> None:
        common.write_secret(secret_file, secret=secret)  # rename, as Vault Agent does

    try:
        common.wait_token(server)
        yield server, write
    finally:
        server.stop()


@contextlib.contextmanager
def vault_sidecar(interval: float) -> Iterator[tuple[Server, Callable[[str], Awaitable[None]]]]:
    with common.openbao() as bao:
        addr, token = bao.addr, bao.root_token  # type: ignore[attr-defined]
        common.put_secret(bao, secret_for(0))
        server = common.start_sidecar(
            "sidecar-vault",
            REDITUS_SIDECAR_SECRET_SOURCE="vault",
            VAULT_ADDR=addr,
            VAULT_TOKEN=token,
            REDITUS_SIDECAR_REFRESH_INTERVAL=f"{interval:g}",
        )

        async def write(secret: str) -> None:
            # A KV v2 write over the HTTP API, as an operator's `bao kv put` does.
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{addr}/v1/secret/data/reditus",
                    json={"data": {"product_id": PRODUCT_ID, "product_secret": secret}},
                    headers={"X-Vault-Token": token},
                ) as response,
            ):
                response.raise_for_status()

        try:
            common.wait_token(server)
            yield server, write
        finally:
            server.stop()


def summarize(name: str, rotations: list[Rotation], load: Load, seconds: float) -> str:
    props = sorted(r.propagation * 1000 for r in rotations)
    overlap = max(r.old_after for r in rotations) * 1000
    return (
        f"| {name} | {len(rotations)} | {statistics.median(props):.0f} | {props[-1]:.0f} "
        f"| {overlap:.1f} | {load.requests:,} | {load.requests / seconds:,.0f} "
        f"| {len(load.failures)} |"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", choices=("file", "vault", "both"), default="both")
    parser.add_argument("--rotations", type=int, default=5)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument(
        "--interval", type=float, default=2.0, help="REFRESH_INTERVAL for the Vault source (s)"
    )
    args = parser.parse_args()
    if common.LOAD_CORE is not None:
        os.sched_setaffinity(0, {int(common.LOAD_CORE)})
    rows = []
    failures: list[str] = []
    sources = ("file", "vault") if args.source == "both" else (args.source,)
    for source in sources:
        with tempfile.TemporaryDirectory(prefix="bench-rotation-") as tmp:
            context = file_sidecar(Path(tmp)) if source == "file" else vault_sidecar(args.interval)
            with context as (server, write):
                print(f"{source}: {args.rotations} rotations under load", file=sys.stderr)
                started = time.monotonic()
                rotations, load = asyncio.run(
                    rotate_under_load(
                        server.url + "/v1/token", write, args.rotations, args.connections, 0.3
                    )
                )
                seconds = time.monotonic() - started
        label = "file (stat watch)" if source == "file" else f"vault (interval {args.interval:g} s)"
        rows.append(summarize(label, rotations, load, seconds))
        failures += load.failures
    print(f"\n{common.machine()}; {args.connections} connections sending back to back\n")
    print(
        "| source | rotations | propagation p50 ms | max ms | old-secret tokens after "
        "first new (max ms) | requests | req/s | failed |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    print("\n".join(rows))
    for failure in failures[:10]:
        print("failure:", failure, file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
