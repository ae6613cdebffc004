"""Side-by-side throughput and latency of the sidecar and the alternatives, on loopback.

    .venv/bin/python bench/run.py            # 5 s per load level
    .venv/bin/python bench/run.py --quick    # 2 s per level, for a smoke run
    .venv/bin/python bench/run.py --only sidecar-file,bare-asyncio --connections 50

Each target runs pinned to one core, wrk (one thread) to another. Printed as markdown:
req/s, p50/p99 latency, errors, server CPU (% of one core) and RSS after each level,
then the ratios the README's targets are stated in, and the in-process signing ceiling.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import common
from common import PRODUCT_ID, PYTHON, SECRET, Server

Target = Callable[[], contextlib.AbstractContextManager[Server]]


@contextlib.contextmanager
def sidecar_vault() -> Iterator[Server]:
    """`reditus-sidecar serve` reading KV v2 from an OpenBao dev server."""
    with common.openbao() as bao:
        common.put_secret(bao, SECRET)
        server = common.start_sidecar(
            "sidecar-vault",
            REDITUS_SIDECAR_SECRET_SOURCE="vault",
            VAULT_ADDR=bao.addr,  # type: ignore[attr-defined]
            VAULT_TOKEN=bao.root_token,  # type: ignore[attr-defined]
        )
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def sidecar_transit(max_batch: int, max_in_flight: int) -> Iterator[Server]:
    """`reditus-sidecar serve` in transit mode, its key imported by setup-transit.sh."""
    with common.openbao() as bao:
        env = common.clean_env(**bao.env(), VAULT_CLI=str(bao.bao))  # type: ignore[attr-defined]
        subprocess.run(
            ["bash", str(common.ROOT / "deploy" / "vault" / "setup-transit.sh")],
            env=env,
            input=SECRET,
            capture_output=True,
            text=True,
            check=True,
        )
        launcher = [PYTHON, str(common.BENCH / "targets" / "sidecar_transit.py")]
        server = common.start_sidecar(
            f"sidecar-transit-{max_batch}x{max_in_flight}",
            [*launcher, str(max_batch), str(max_in_flight)],
            REDITUS_SIDECAR_SECRET_SOURCE="transit",
            REDITUS_SIDECAR_PRODUCT_ID=PRODUCT_ID,
            VAULT_ADDR=bao.addr,  # type: ignore[attr-defined]
            VAULT_TOKEN=bao.root_token,  # type: ignore[attr-defined]
        )
        server.extra_pids = (bao.pid,)  # type: ignore[attr-defined]
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def express_jose() -> Iterator[Server]:
    """The Reditus guide's route: Express + jose in Node."""
    express = common.BENCH / "express"
    if not (express / "node_modules" / "jose").is_dir():
        subprocess.run(
            ["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=express, check=True
        )
    port = common.free_port()
    env = common.clean_env(PORT=str(port), PRODUCT_ID=PRODUCT_ID, PRODUCT_SECRET=SECRET)
    env["NODE_ENV"] = "production"
    server = common.start(
        "express", ["node", str(express / "server.mjs")], env, f"http://127.0.0.1:{port}"
    )
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def vault_transit() -> Iterator[Server]:
    """An app that asks OpenBao's transit engine for each token's HMAC (both on the server core)."""
    with common.openbao() as bao:
        common.bao_cli(bao, "secrets", "enable", "transit")
        common.bao_cli(bao, "write", "-f", "transit/keys/reditus")
        port = common.free_port()
        env = common.clean_env(**bao.env())  # type: ignore[attr-defined]
        server = common.start(
            "transit",
            [PYTHON, str(common.BENCH / "targets" / "transit.py"), str(port), "reditus"],
            env,
            f"http://127.0.0.1:{port}",
        )
        server.extra_pids = (bao.pid,)  # type: ignore[attr-defined]
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def bare(loop: str) -> Iterator[Server]:
    """The framework ceiling: aiohttp answering a fixed body."""
    port = common.free_port()
    args = [PYTHON, str(common.BENCH / "targets" / "bare.py"), str(port), loop]
    server = common.start(f"bare-{loop}", args, common.clean_env(), f"http://127.0.0.1:{port}")
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def lean() -> Iterator[Server]:
    """The lean reference: a hand-written aiohttp handler doing the sidecar's essential work."""
    port = common.free_port()
    args = [PYTHON, str(common.BENCH / "targets" / "lean.py"), str(port), "uvloop"]
    server = common.start("lean-aiohttp", args, common.clean_env(), f"http://127.0.0.1:{port}")
    try:
        yield server
    finally:
        server.stop()


ASYNCIO_LAUNCHER = [PYTHON, str(common.BENCH / "targets" / "sidecar_asyncio.py")]
TARGETS: dict[str, tuple[str, Target]] = {
    "sidecar-file": (
        "sidecar `serve`, file source, uvloop",
        lambda: common.sidecar_file([PYTHON, "-m", "sidecar", "serve"]),
    ),
    "sidecar-file-asyncio": (
        "sidecar `serve`, file source, plain asyncio",
        lambda: common.sidecar_file(ASYNCIO_LAUNCHER),
    ),
    "sidecar-vault": ("sidecar `serve`, Vault source (OpenBao), uvloop", sidecar_vault),
    "sidecar-transit": (
        "sidecar `serve`, transit mode, batches of up to 64, one call in flight (default)",
        lambda: sidecar_transit(64, 1),
    ),
    "sidecar-transit-nobatch": (
        "sidecar `serve`, transit mode, one token per call, up to 64 calls in flight",
        lambda: sidecar_transit(1, 64),
    ),
    "express-jose": ("Express 5 + jose (the guide's route), Node", express_jose),
    "vault-transit": ("aiohttp app + OpenBao transit HMAC per token", vault_transit),
    "lean-aiohttp": (
        "hand-written aiohttp handler: header checks, strict JSON, userId rules, HS512, two "
        "metric updates, uvloop (the request path's target)",
        lean,
    ),
    "bare-uvloop": ("bare aiohttp, no signing, uvloop", lambda: bare("uvloop")),
    "bare-asyncio": ("bare aiohttp, no signing, plain asyncio", lambda: bare("asyncio")),
}

SIGNING_CEILING = """
import sys, time
sys.path.insert(0, {root!r})
import jwt
from sidecar.redact import Redacted
from sidecar.signer import TokenSigner
key, n = {secret!r}.encode(), 0
def rate(fn, seconds):
    count, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(200):
            fn()
        count += 200
    return count / seconds
payload = {{"ProductId": "prod-bench", "UserId": "u-123", "iat": 1795460465}}
headers = {{"typ": "JWT"}}
print(rate(lambda: jwt.encode(payload, key, algorithm="HS512", headers=headers), {seconds}))
signer = TokenSigner("prod-bench", Redacted({secret!r}))
print(rate(lambda: signer.sign("u-123", 1795460465), {seconds}))
"""


def signing_ceiling(seconds: float) -> tuple[float, float]:
    """ops/s of PyJWT's jwt.encode and of the sidecar's TokenSigner.sign, in-process."""
    code = SIGNING_CEILING.format(root=str(common.ROOT), secret=SECRET, seconds=seconds)
    out = subprocess.run(
        common.pinned([PYTHON, "-c", code], common.SERVER_CORE),
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    return float(out[0]), float(out[1])


def measure(
    name: str, target: Target, levels: list[int], seconds: float
) -> dict[int, common.LoadResult]:
    results: dict[int, common.LoadResult] = {}
    with target() as server:
        body = common.wait_token(server)
        assert str(body.get("token", "")).count(".") == 2, body
        common.wrk(server, 50, 1)  # warm-up: connection set-up, caches, JIT (Node)
        for connections in levels:
            results[connections] = common.wrk(server, connections, seconds)
            r = results[connections]
            print(
                f"  {name:22} c={connections:<4} {r.rps:9.0f} req/s  p99 {r.p99_ms:7.2f} ms",
                file=sys.stderr,
            )
    return results


def table(all_results: dict[str, dict[int, common.LoadResult]], levels: list[int]) -> str:
    lines = [
        "| target | conns | req/s | p50 ms | p99 ms | errors | CPU % | RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, results in all_results.items():
        for c in levels:
            r = results[c]
            lines.append(
                f"| {name} | {c} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.errors} "
                f"| {r.cpu_percent:.0f} | {r.rss_mib:.1f} |"
            )
    return "\n".join(lines)


def ratios(all_results: dict[str, dict[int, common.LoadResult]], levels: list[int]) -> str:
    """The targets: sidecar vs Express (≥ 5x) and vs the bare ceiling on its loop (≥ 0.80x)."""
    pairs = [
        ("sidecar-file", "express-jose", "≥ 5x"),
        ("sidecar-file-asyncio", "express-jose", "≥ 5x"),
        ("sidecar-file-asyncio", "bare-asyncio", "≥ 0.80x"),
        ("sidecar-file", "bare-uvloop", "≥ 0.80x"),
        ("sidecar-vault", "sidecar-file", "≈ 1x"),
        ("sidecar-file", "vault-transit", ""),
        ("sidecar-transit", "vault-transit", ""),
        ("sidecar-transit", "sidecar-transit-nobatch", ""),
    ]
    lines = [
        "| ratio (req/s) | " + " | ".join(f"c={c}" for c in levels) + " | target |",
        "|---|" + "---:|" * len(levels) + "---|",
    ]
    for a, b, goal in pairs:
        if a in all_results and b in all_results:
            cells = [
                f"{all_results[a][c].rps / all_results[b][c].rps:.2f}x"
                if all_results[b][c].rps
                else "-"
                for c in levels
            ]
            lines.append(f"| {a} / {b} | " + " | ".join(cells) + f" | {goal} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s per level instead of 5 s")
    parser.add_argument("--seconds", type=float, help="seconds per load level")
    parser.add_argument("--connections", default="1,10,50,200", help="comma-separated load levels")
    parser.add_argument("--only", help=f"comma-separated subset of {', '.join(TARGETS)}")
    args = parser.parse_args()
    seconds = args.seconds or (2.0 if args.quick else 5.0)
    levels = [int(c) for c in args.connections.split(",")]
    names = args.only.split(",") if args.only else list(TARGETS)
    unknown = set(names) - set(TARGETS)
    if unknown:
        parser.error(f"unknown targets: {', '.join(sorted(unknown))}")

    started = time.monotonic()
    all_results = {}
    for name in names:
        print(f"{name}: {TARGETS[name][0]}", file=sys.stderr)
        all_results[name] = measure(name, TARGETS[name][1], levels, seconds)
    jwt_rate, signer_rate = signing_ceiling(min(seconds, 3.0))

    print(f"\n{common.machine()}; {seconds:g} s per level, wrk -t1\n")
    print("| target | what |\n|---|---|")
    for name in names:
        print(f"| {name} | {TARGETS[name][0]} |")
    print()
    print(table(all_results, levels))
    print()
    print(ratios(all_results, levels))
    print()
    print("| in-process signing, one core | ops/s |\n|---|---:|")
    print(f"| PyJWT `jwt.encode` HS512 | {jwt_rate:,.0f} |")
    print(f"| sidecar `TokenSigner.sign` | {signer_rate:,.0f} |")
    print(f"\n(total {time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
