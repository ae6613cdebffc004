"""What the issuance audit and the caller check cost.

    .venv/bin/python bench/audit.py              # 5 s per configuration
    .venv/bin/python bench/audit.py --seconds 2

The sidecar (file source) is pinned to the server core and wrk (one thread, 50
connections) to the load core, once per audit configuration: off, a file failing open,
the same with the user-id HMAC key, and a file failing closed (each response waits for
its record's write). The configurations take turns, `--repeat` times, and the best run of
each is printed (on a shared machine the best is the least disturbed): req/s, p50/p99,
server CPU and records written.
Then the in-process cost of identifying a peer, which a listener pays once per connection:
SO_PEERCRED on the unix socket, an inet_diag lookup on TCP (with an allow-list or audit).
"""

from __future__ import annotations

import argparse
import socket
import tempfile
import time
import urllib.request
from pathlib import Path

import common
from prometheus_client import CollectorRegistry

from sidecar.audit import QUEUE_LIMIT, AuditLog, Entry
from sidecar.callers import Caller, TcpPeers, peer_credentials
from sidecar.config import AuditSettings
from sidecar.metrics import Metrics

CONNECTIONS = 50


def written(metrics_url: str) -> int:
    with urllib.request.urlopen(metrics_url + "/metrics", timeout=5) as response:  # noqa: S310
        for line in response.read().decode().splitlines():
            if line.startswith("reditus_sidecar_audit_records_total "):
                return int(float(line.split()[-1]))
    return 0


def run(name: str, seconds: float, tmp: Path, **env: str) -> tuple[common.LoadResult, int]:
    secret = tmp / f"secret-{name}.json"
    common.write_secret(secret)
    server = common.start_sidecar(
        name,
        REDITUS_SIDECAR_SECRET_SOURCE="file",
        REDITUS_SIDECAR_SECRET_FILE=str(secret),
        **env,
    )
    try:
        common.wait_token(server)
        common.wrk(server, CONNECTIONS, 1)  # warm-up
        result = common.wrk(server, CONNECTIONS, seconds)
        return result, written(server.metrics_url)
    finally:
        server.stop()


def peercred_cost(rounds: int = 100_000) -> float:
    """Microseconds per SO_PEERCRED read (and the Caller built from it), best of 5."""
    left, right = socket.socketpair(socket.AF_UNIX)
    best = float("inf")
    with left, right:
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(rounds):
                peer_credentials(left)
            best = min(best, (time.perf_counter() - started) / rounds * 1e6)
    return best


def inet_diag_cost(rounds: int = 10_000) -> float:
    """Microseconds per inet_diag lookup of a loopback TCP peer's owner, best of 5."""
    peers = TcpPeers()
    with socket.create_server(("127.0.0.1", 0)) as server:
        client = socket.create_connection(server.getsockname())
        conn, _ = server.accept()
        with client, conn:
            assert peers.uid(conn) is not None
            best = float("inf")
            for _ in range(5):
                started = time.perf_counter()
                for _ in range(rounds):
                    peers.uid(conn)
                best = min(best, (time.perf_counter() - started) / rounds * 1e6)
    peers.close()
    return best


def audit_costs(tmp: Path) -> tuple[float, float, float]:
    """Microseconds, best of 5: queueing one record on the event loop (all a request pays
    when failing open), and the writer thread's formatting of one, without and with HMAC."""
    import asyncio

    key = tmp / "micro.key"
    key.write_bytes(b"k" * 32)
    rounds = QUEUE_LIMIT - 1  # the writer is not started: every record stays queued

    async def submit() -> float:
        best = float("inf")
        for _ in range(5):
            metrics = Metrics(CollectorRegistry(), ["default"], "bench")
            audit = AuditLog(AuditSettings(str(tmp / "m.log"), False, None), metrics)
            audit._loop = asyncio.get_running_loop()
            started = time.perf_counter()
            for _ in range(rounds):
                audit.submit(
                    request_id="0123456789abcdef", product="default", product_id="p",
                    version=1, issued_at=1795460465, caller="tcp", user_id="u-123",
                )  # fmt: skip
            best = min(best, (time.perf_counter() - started) / rounds * 1e6)
        return best

    def line(key_file: Path | None) -> float:
        metrics = Metrics(CollectorRegistry(), ["default"], "bench")
        audit = AuditLog(AuditSettings(str(tmp / "m.log"), False, key_file), metrics)
        entry = Entry(
            time.time(), "0123456789abcdef", "default", "p", 1, 1795460465,
            Caller(uid=1000, gid=1000, pid=42), "u-123", None,
        )  # fmt: skip
        best = float("inf")
        for _ in range(5):
            started = time.perf_counter()
            for _ in range(20_000):
                audit._line(entry)
            best = min(best, (time.perf_counter() - started) / 20_000 * 1e6)
        return best

    return asyncio.run(submit()), line(None), line(key)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    print(f"\n{common.machine()}; {args.seconds:g} s per configuration, wrk -t1 -c{CONNECTIONS}\n")
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as name:
        tmp = Path(name)
        key = tmp / "audit.key"
        key.write_bytes(b"k" * 32)
        configurations: dict[str, dict[str, str]] = {
            "off": {},
            "file, open": {"REDITUS_SIDECAR_AUDIT": str(tmp / "a1.log")},
            "file, open, user HMAC": {
                "REDITUS_SIDECAR_AUDIT": str(tmp / "a2.log"),
                "REDITUS_SIDECAR_AUDIT_KEY_FILE": str(key),
            },
            "file, closed": {
                "REDITUS_SIDECAR_AUDIT": str(tmp / "a3.log"),
                "REDITUS_SIDECAR_AUDIT_FAIL": "closed",
            },
        }
        best: dict[str, tuple[common.LoadResult, int]] = {}
        for _ in range(args.repeat):
            for label, env in configurations.items():
                result = run(label, args.seconds, tmp, **env)
                if label not in best or result[0].rps > best[label][0].rps:
                    best[label] = result
    print("| audit | req/s | p50 ms | p99 ms | server CPU % | errors | records written |")
    print("|---|---|---|---|---|---|---|")
    for label, (load, records) in best.items():
        print(
            f"| {label} | {load.rps:,.0f} | {load.p50_ms:.2f} | {load.p99_ms:.2f} "
            f"| {load.cpu_percent:.0f} | {load.errors} | {records:,} |"
        )
    with tempfile.TemporaryDirectory(prefix="bench-audit-") as name:
        queued, formatted, hashed = audit_costs(Path(name))
    print(f"\naudit record queued on the event loop: {queued:.2f} us")
    print(f"audit record formatted by the writer: {formatted:.2f} us ({hashed:.2f} us with HMAC)")
    print(f"SO_PEERCRED read per unix connection: {peercred_cost():.2f} us")
    print(f"inet_diag lookup per TCP connection: {inet_diag_cost():.2f} us")


if __name__ == "__main__":
    main()
