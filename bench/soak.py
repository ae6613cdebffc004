"""Soak: as many signing requests as fit in N minutes, with the sidecar's RSS sampled
along the way; flat memory is the point (no per-request leak in the handler, metrics or
logging).

    .venv/bin/python bench/soak.py                  # 3 minutes, 50 connections
    .venv/bin/python bench/soak.py --minutes 10 --source vault
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import common
from common import SECRET, Server


@contextlib.contextmanager
def sidecar(source: str) -> Iterator[Server]:
    with contextlib.ExitStack() as stack:
        if source == "file":
            secret = Path(stack.enter_context(tempfile.TemporaryDirectory())) / "secret.json"
            common.write_secret(secret)
            env = {
                "REDITUS_SIDECAR_SECRET_SOURCE": "file",
                "REDITUS_SIDECAR_SECRET_FILE": str(secret),
            }
        else:
            bao = stack.enter_context(common.openbao(core=common.LOAD_CORE))
            common.put_secret(bao, SECRET)
            env = {
                "REDITUS_SIDECAR_SECRET_SOURCE": "vault",
                "VAULT_ADDR": bao.addr,  # type: ignore[attr-defined]
                "VAULT_TOKEN": bao.root_token,  # type: ignore[attr-defined]
            }
        server = common.start_sidecar(
            f"sidecar-{source}", REDITUS_SIDECAR_REFRESH_INTERVAL="5", **env
        )
        stack.callback(server.stop)
        common.wait_token(server)
        yield server


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--source", choices=("file", "vault"), default="file")
    args = parser.parse_args()
    seconds = args.minutes * 60

    with sidecar(args.source) as server:
        pid = server.proc.pid
        common.wrk(server, args.connections, 2)  # warm-up, so "start" is the steady state
        samples = [(0.0, common.rss_mib(pid))]
        cpu_before = common.cpu_seconds(pid)
        wrk = subprocess.Popen(
            common.pinned(
                [
                    "wrk",
                    "-t1",
                    f"-c{args.connections}",
                    f"-d{round(seconds)}s",
                    "--timeout",
                    "5s",
                    "-s",
                    str(common.WRK_SCRIPT),
                    server.url + "/v1/token",
                ],
                common.LOAD_CORE,
            ),
            stdout=subprocess.PIPE,
            text=True,
        )
        started = time.monotonic()
        step = max(1.0, seconds / 12)
        while wrk.poll() is None:
            time.sleep(min(step, 1.0))
            now = time.monotonic() - started
            if now - samples[-1][0] >= step:
                samples.append((now, common.rss_mib(pid)))
        out = wrk.communicate()[0]
        samples.append((time.monotonic() - started, common.rss_mib(pid)))
        cpu = common.cpu_seconds(pid) - cpu_before
        peak = common.rss_mib(pid, "VmHWM")
    match = common.WRK_LINE.search(out)
    if match is None:
        raise SystemExit(f"unexpected wrk output:\n{out}")
    requests, micros, p50, p99, errors, non2xx = (int(g) for g in match.groups())

    print(f"\n{common.machine()}")
    print(
        f"soak: sidecar ({args.source} source), {args.connections} connections, "
        f"{micros / 1e6:.0f} s\n"
    )
    print(
        "| requests | req/s | p50 ms | p99 ms | errors | CPU s "
        "| RSS start MiB | RSS end MiB | peak MiB |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {requests:,} | {requests / (micros / 1e6):,.0f} | {p50 / 1000:.2f} | {p99 / 1000:.2f} "
        f"| {errors + non2xx} | {cpu:.0f} | {samples[0][1]:.1f} | {samples[-1][1]:.1f} "
        f"| {peak:.1f} |"
    )
    print("\nRSS over time (s: MiB): " + ", ".join(f"{t:.0f}: {m:.1f}" for t, m in samples))
    return 1 if errors + non2xx else 0


if __name__ == "__main__":
    sys.exit(main())
