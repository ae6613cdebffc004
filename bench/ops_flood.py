"""Does a flood on the ops port (the pod IP, reachable cluster-wide) hurt signing or probes?

    .venv/bin/python bench/ops_flood.py            # 8 s per scenario
    .venv/bin/python bench/ops_flood.py --seconds 4

The sidecar (file source, uvloop) is pinned to the server core; wrk signs at 50
connections from the load core while one flood at a time runs there too:
  - none:    signing alone
  - scrape:  1,000 connections looping GET /metrics as fast as they are answered (wrk)
  - headers: connections that each send a maximal unfinished request head, reopened
             as the sidecar closes them
  - idle:    3,000 connections that send nothing, reopened as they are closed
Meanwhile a probe asks /healthz every 50 ms, as kubelet would (2 s timeout). Printed as
markdown: signing req/s and p99, /healthz p50/p99/max and failures, the sidecar's RSS peak.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import common
from common import PYTHON, Server

from sidecar.listener import MAX_FIELD_SIZE, MAX_HEADERS

PROBE = """
import sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + seconds
while time.monotonic() < end:
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            response.read()
        print(time.perf_counter() - started, flush=True)
    except OSError:
        print("fail", flush=True)
    time.sleep(0.05)
"""


class Probe:
    """GET /healthz every 50 ms with kubelet's 2 s timeout, from a process of its own (a
    thread here would share this process's GIL with the flood and time that instead)."""

    def __init__(self, url: str, seconds: float) -> None:
        self.proc = subprocess.Popen(
            [PYTHON, "-c", PROBE, url + "/healthz", str(seconds)],
            stdout=subprocess.PIPE,
            text=True,
        )

    def results(self) -> tuple[list[float], int]:
        out, _ = self.proc.communicate(timeout=60)
        lines = out.split()
        return sorted(float(x) for x in lines if x != "fail"), lines.count("fail")


def big_head() -> bytes:
    fields = b"".join(
        b"X-Flood-%d: %s\r\n" % (n, b"a" * (MAX_FIELD_SIZE - 64)) for n in range(MAX_HEADERS - 2)
    )
    return b"GET /metrics HTTP/1.1\r\nHost: flood\r\n" + fields


async def reopening_flood(url: str, count: int, payload: bytes, stop: threading.Event) -> None:
    """`count` connections, each reopened as soon as the sidecar closes it."""
    host, port = url.removeprefix("http://").split(":")

    async def one() -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection(host, int(port))
            except OSError:
                await asyncio.sleep(0.01)
                continue
            if payload:
                writer.write(payload)
            with contextlib.suppress(OSError):
                while not stop.is_set() and not reader.at_eof():
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(reader.read(65536), 0.2)
            writer.close()

    await asyncio.gather(*(one() for _ in range(count)))


@contextlib.contextmanager
def flood(kind: str, server: Server, seconds: float) -> Iterator[None]:
    stop = threading.Event()
    if kind == "none":
        yield
        return
    if kind == "scrape":
        proc = subprocess.Popen(
            common.pinned(
                [
                    "wrk",
                    "-t1",
                    "-c1000",
                    f"-d{round(seconds) + 2}s",
                    server.metrics_url + "/metrics",
                ],
                common.LOAD_CORE,
            ),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            yield
        finally:
            proc.terminate()
            proc.wait(10)
        return
    count, payload = (320, big_head()) if kind == "headers" else (3000, b"")
    thread = threading.Thread(
        target=lambda: asyncio.run(reopening_flood(server.metrics_url, count, payload, stop)),
        daemon=True,
    )
    thread.start()
    try:
        time.sleep(1.0)  # let the flood reach the cap before measuring
        yield
    finally:
        stop.set()
        thread.join(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"Measured {common.machine()}, {args.seconds:g} s per scenario\n")
    print(
        "| ops flood | signing req/s | signing p99 ms | /healthz p50 ms | p99 ms | max ms "
        "| /healthz failed | RSS peak MiB |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for kind in ("none", "scrape", "headers", "idle"):
        with common.sidecar_file([PYTHON, "-m", "sidecar", "serve"]) as server:
            common.wait_token(server)
            with flood(kind, server, args.seconds):
                probe = Probe(server.metrics_url, args.seconds)
                result = common.wrk(server, 50, args.seconds)
                latencies, failures = probe.results()
            peak = common.rss_mib(server.proc.pid, "VmHWM")
        lat = latencies or [float("nan")]
        print(
            f"| {kind} | {result.rps:,.0f} | {result.p99_ms:.2f} "
            f"| {1000 * lat[len(lat) // 2]:.1f} | {1000 * lat[int(len(lat) * 0.99)]:.1f} "
            f"| {1000 * lat[-1]:.1f} | {failures} | {peak:.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    sys.exit(main())
