"""Scale simulation: many sidecars (processes) against one OpenBao dev server.

    .venv/bin/python bench/scale.py                        # 50 pods, 2 s interval, 60 s
    .venv/bin/python bench/scale.py --pods 20 --seconds 30 --quick-ttl

Each sidecar logs in with its own AppRole token (short TTLs, so renewals and re-logins
happen inside the run) and re-reads the KV secret every `--interval` seconds (+-10 %
jitter). OpenBao's file audit device records every request: the measured rates are
compared with the capacity model of docs/scale.md. Then secrets are rotated and each
sidecar's `reditus_sidecar_secret_loaded_timestamp_seconds` says when it switched.
Low-memory settings per process: MALLOC_ARENA_MAX=2, warning-level logs.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import datetime
from pathlib import Path

import common
from common import PRODUCT_ID

AUDIT = """
audit "file" "bench" {{
  options {{
    file_path = "{}"
  }}
}}
"""
CATEGORIES = {
    "secret/data/reditus": "KV read",
    "auth/approle/login": "login",
    "auth/token/renew-self": "renewal",
    "auth/token/lookup-self": "token lookup",
}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def audit_entries(path: Path) -> list[tuple[float, str]]:
    """(unix time, request path) of every answered request in the audit log."""
    entries = []
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        if entry.get("type") != "response":
            continue
        entries.append((parse_time(entry["time"]), entry["request"]["path"]))
    return entries


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url + "/metrics", timeout=5) as response:  # noqa: S310
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("reditus_sidecar_secret_"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def parse_time(stamp: str) -> float:
    """Unix time of an RFC 3339 stamp with up to nanoseconds (Python parses microseconds)."""
    stamp = re.sub(r"(\.\d{6})\d*", r"\1", stamp).replace("Z", "+00:00")
    return datetime.fromisoformat(stamp).timestamp()


def auth_cycle(ttl: float, max_ttl: float) -> tuple[float, int]:
    """(seconds between logins, renewals per login) of the sidecar's token schedule:
    renew at 2/3 of the TTL; once Vault caps a renewal at the max TTL, log in again
    at 2/3 of that capped TTL."""
    granted, current, renewals = 0.0, float(ttl), 0
    while True:
        due = granted + current * 2 / 3
        if current < ttl:  # capped: the next step is a new login
            return due, renewals
        granted, current, renewals = due, min(ttl, max_ttl - due), renewals + 1


def kv_read_capacity(bao: object, seconds: int = 5) -> float:
    """KV reads/s this OpenBao answers flat out (50 connections, audit device on), for
    scale: how many pods' refreshes one node carries."""
    url = f"{bao.addr}/v1/secret/data/reditus"  # type: ignore[attr-defined]
    token = bao.root_token  # type: ignore[attr-defined]
    args = ["wrk", "-t1", "-c50", f"-d{seconds}s", "-H", f"X-Vault-Token: {token}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    return float(match.group(1)) if match else 0.0


def write_secret(bao: object, n: int) -> tuple[int, float]:
    """A new KV version: (version number, unix time OpenBao created it)."""
    out = common.bao_cli(
        bao,
        "kv",
        "put",
        "-format=json",
        "secret/reditus",
        f"product_id={PRODUCT_ID}",
        f"product_secret=scale-secret-{n:04d}-" + "s" * 64,
    )
    data = json.loads(out)["data"]
    return int(data["version"]), parse_time(data["created_time"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pods", type=int, default=50)
    parser.add_argument("--interval", type=float, default=2.0, help="REFRESH_INTERVAL (s)")
    parser.add_argument("--seconds", type=float, default=60.0, help="measurement window (s)")
    parser.add_argument("--rotations", type=int, default=3)
    parser.add_argument("--ttl", type=int, default=30, help="AppRole token_ttl (s)")
    parser.add_argument("--max-ttl", type=int, default=60, help="AppRole token_max_ttl (s)")
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-scale-")))
        audit = tmp / "audit.log"
        # OpenBao only takes audit devices from its configuration file, not the API.
        bao = stack.enter_context(common.openbao(core=None, extra_config=AUDIT.format(audit)))
        common.bao_cli(bao, "auth", "enable", "approle")
        common.bao_cli(
            bao,
            "policy",
            "write",
            "reditus",
            "-",
            stdin='path "secret/data/reditus" { capabilities = ["read"] }\n',
        )
        common.bao_cli(
            bao,
            "write",
            "auth/approle/role/sidecar",
            "token_policies=reditus",
            f"token_ttl={args.ttl}s",
            f"token_max_ttl={args.max_ttl}s",
        )
        role_id = json.loads(
            common.bao_cli(bao, "read", "-format=json", "auth/approle/role/sidecar/role-id")
        )["data"]["role_id"]
        write_secret(bao, 0)

        pods: list[common.Server] = []
        started = time.monotonic()
        try:
            for n in range(args.pods):
                secret_id = json.loads(
                    common.bao_cli(
                        bao, "write", "-f", "-format=json", "auth/approle/role/sidecar/secret-id"
                    )
                )["data"]["secret_id"]
                secret_id_file = tmp / f"secret-id-{n}"
                secret_id_file.write_text(secret_id)
                pod = common.start_sidecar(
                    f"pod{n}",
                    core=None,
                    VAULT_ADDR=bao.addr,  # type: ignore[attr-defined]
                    REDITUS_SIDECAR_SECRET_SOURCE="vault",
                    REDITUS_SIDECAR_VAULT_AUTH="approle",
                    REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
                    REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(secret_id_file),
                    REDITUS_SIDECAR_REFRESH_INTERVAL=f"{args.interval:g}",
                    MALLOC_ARENA_MAX="2",
                )
                pods.append(pod)
            for pod in pods:
                common.wait_token(pod, timeout=120)
            ready_after = time.monotonic() - started
            print(f"{args.pods} sidecars ready after {ready_after:.1f} s", file=sys.stderr)
            rss = [common.rss_mib(pod.proc.pid) for pod in pods]

            window_start = time.time()
            time.sleep(args.seconds)
            window_end = time.time()

            # Rotations: write, wait past one interval, read when each pod switched.
            propagation: list[float] = []
            for n in range(1, args.rotations + 1):
                version, written = write_secret(bao, n)
                time.sleep(args.interval * 1.1 + 1.5)
                for pod in pods:
                    values = scrape(pod.metrics_url)
                    loaded = values['reditus_sidecar_secret_version{product="default"}']
                    if int(loaded) != version:
                        raise RuntimeError(f"{pod.name} still on version {loaded}, not {version}")
                    switched = values[
                        'reditus_sidecar_secret_loaded_timestamp_seconds{product="default"}'
                    ]
                    propagation.append(switched - written)
        finally:
            for pod in pods:
                pod.stop()
        entries = audit_entries(audit)
        kv_capacity = kv_read_capacity(bao)

    in_window = [(t, p) for t, p in entries if window_start <= t < window_end]
    counts = collections.Counter(CATEGORIES.get(p, p) for _, p in in_window)
    all_counts = collections.Counter(CATEGORIES.get(p, p) for _, p in entries)
    window = window_end - window_start
    reads = sorted(t for t, p in in_window if p == "secret/data/reditus")
    per_second = collections.Counter(int(t - window_start) for t in reads)
    seconds_rates = [per_second.get(s, 0) for s in range(int(window))]
    per_100ms = collections.Counter(int((t - window_start) * 10) for t in reads)
    cycle, renewals = auth_cycle(args.ttl, args.max_ttl)
    model = {
        "KV read": args.pods / args.interval,
        "renewal": args.pods * renewals / cycle,
        "login": args.pods / cycle,
        "token lookup": args.pods / cycle,
    }
    print(f"\n{common.machine()}")
    print(
        f"{args.pods} sidecars, REFRESH_INTERVAL {args.interval:g} s (+-10 % jitter), AppRole "
        f"token_ttl {args.ttl} s / max {args.max_ttl} s, window {window:.0f} s after all ready "
        f"({ready_after:.0f} s to start them all)\n"
    )
    print("| Vault requests in the window | measured /s | model /s | model |")
    print("|---|---:|---:|---|")
    formulas = {
        "KV read": "pods / interval",
        "renewal": f"pods x {renewals} per login cycle of {cycle:.1f} s",
        "login": f"pods / {cycle:.1f} s (2/3 of the TTL Vault capped at token_max_ttl)",
        "token lookup": "one per login (TTL and renewability)",
    }
    for name in ("KV read", "renewal", "login", "token lookup"):
        print(
            f"| {name} | {counts.get(name, 0) / window:.2f} | {model[name]:.2f} "
            f"| {formulas[name]} |"
        )
    others = {k: v for k, v in counts.items() if k not in model}
    for name, count in sorted(others.items()):
        print(f"| {name} | {count / window:.2f} | - | |")
    total = sum(counts.values()) / window
    print(f"| **total** | **{total:.2f}** | **{sum(model.values()):.2f}** | |")
    print(
        f"\nWhole run (start-up included): {dict(all_counts)}; "
        f"sidecar RSS after start: median {statistics.median(rss):.1f} MiB, "
        f"max {max(rss):.1f} MiB, sum {sum(rss):.0f} MiB"
    )
    mean = statistics.mean(seconds_rates)
    print("\n| KV reads, spread over the window | value |\n|---|---:|")
    print(f"| per 1 s: mean | {mean:.1f} |")
    print(f"| per 1 s: stdev | {statistics.pstdev(seconds_rates):.1f} |")
    print(f"| per 1 s: min / max | {min(seconds_rates)} / {max(seconds_rates)} |")
    print(f"| per 100 ms: max (mean {mean / 10:.1f}) | {max(per_100ms.values())} |")
    print(
        f"\nOne OpenBao dev node (in-memory storage, file audit device) answered "
        f"{kv_capacity:,.0f} KV reads/s flat out (wrk, 50 connections, both cores shared)."
    )
    print("\n| rotation propagation (write -> sidecar switched) | ms |\n|---|---:|")
    print(f"| samples | {len(propagation)} |")
    for label, q in (("p50", 0.5), ("p99", 0.99)):
        print(f"| {label} | {percentile(propagation, q) * 1000:.0f} |")
    print(f"| max | {max(propagation) * 1000:.0f} |")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
