"""Vault HA failover under signing load: a 3-node OpenBao Raft cluster behind HAProxy
(only the active node gets traffic, as with a `vault-active` Service), N sidecars, and
the faults an HA Vault goes through.

    .venv/bin/python bench/failover.py                          # 3 sidecars, 20 s seal
    .venv/bin/python bench/failover.py --sidecars 5 --interval 5 --backoff-max 10

Per fault it prints: failover time (signal to the leader -> HAProxy serving the new
active node; for a restart, start -> the node a healthy voter again with HAProxy serving;
for the seal, unseal start -> serving), refresh gap per sidecar (last successful refresh
before -> first after), rotation propagation after the failover (KV write -> first token
signed with the new secret, per sidecar), login attempts per sidecar, failed signing
requests (must be 0). Printed as markdown.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import common

from tests.failover import Gap, MetricsWatch, SigningLoad, gap
from tests.openbao_ha import Cluster, openbao_cluster

KV_PATH = "reditus"


@dataclass
class Row:
    event: str
    failover: float  # s
    gaps: list[Gap]
    propagation: list[float]  # s per sidecar, or [] when no rotation followed
    failed: int


@contextlib.contextmanager
def fleet(
    cluster: Cluster, tmp: Path, count: int, interval: float, backoff_max: float
) -> Iterator[tuple[list[common.Server], list[str]]]:
    """`count` sidecars logging in with AppRole through HAProxy."""
    first = "bench-ha-0-" + secrets.token_hex(32)
    root = cluster.client()
    root.secrets.kv.v2.create_or_update_secret(
        path=KV_PATH, secret={"product_id": common.PRODUCT_ID, "product_secret": first}
    )
    root.sys.create_or_update_acl_policy(
        name="reditus", policy=f'path "secret/data/{KV_PATH}" {{ capabilities = ["read"] }}'
    )
    root.sys.enable_auth_method("approle")
    root.auth.approle.create_or_update_approle(
        role_name="sidecar", token_policies=["reditus"], token_ttl="1h", token_max_ttl="24h"
    )
    role_id = root.auth.approle.read_role_id("sidecar")["data"]["role_id"]
    servers: list[common.Server] = []
    try:
        for index in range(count):
            secret_id_file = tmp / f"secret-id-{index}"
            secret_id_file.write_text(
                root.auth.approle.generate_secret_id("sidecar")["data"]["secret_id"]
            )
            secret_id_file.chmod(0o600)
            servers.append(
                common.start_sidecar(
                    f"sidecar-ha-{index}",
                    core=None,  # N sidecars and 3 OpenBao nodes share the machine
                    VAULT_ADDR=cluster.addr,
                    REDITUS_SIDECAR_VAULT_AUTH="approle",
                    REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
                    REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(secret_id_file),
                    REDITUS_SIDECAR_KV_PATH=KV_PATH,
                    REDITUS_SIDECAR_REFRESH_INTERVAL=f"{interval:g}",
                    REDITUS_SIDECAR_BACKOFF_MAX=f"{backoff_max:g}",
                )
            )
        for server in servers:
            common.wait_token(server)
        yield servers, [first]
    finally:
        for server in servers:
            server.stop()


def run(args: argparse.Namespace, cluster: Cluster, tmp: Path) -> list[Row]:
    rows: list[Row] = []
    with fleet(cluster, tmp, args.sidecars, args.interval, args.backoff_max) as (servers, known):
        loads = [SigningLoad(s.url, known) for s in servers]
        watch = MetricsWatch([s.metrics_url for s in servers])
        for thread in [*loads, watch]:
            thread.start()
        try:
            settle = args.interval * 1.1 + args.backoff_max + 1

            def event(name: str, fault: Callable[[], float], rotate: bool) -> None:
                failed = sum(len(load.failures) for load in loads)
                start = time.monotonic()
                failover = fault()
                # Refreshing again: one interval, or the backoff step the sidecar is in.
                time.sleep(settle)
                gaps = [gap(watch.samples[i], start, time.monotonic()) for i in range(len(loads))]
                propagation = rotation(cluster, loads, known) if rotate else []
                rows.append(
                    Row(
                        name,
                        failover,
                        gaps,
                        propagation,
                        sum(len(load.failures) for load in loads) - failed,
                    )
                )
                print(f"{name}: done", file=sys.stderr)

            time.sleep(2 * args.interval)  # steady state
            for sig, name in (
                (signal.SIGKILL, "leader SIGKILL"),
                (signal.SIGTERM, "leader SIGTERM"),
            ):
                leader = cluster.leader()

                def lose_leader(node=leader, sig=sig) -> float:  # type: ignore[no-untyped-def]
                    started = time.monotonic()
                    assert node.proc is not None
                    node.proc.send_signal(sig)  # timed from here, not from the exit
                    served = cluster.wait_serving(not_on=node) - started
                    node.signal(sig)  # and wait for the process to end
                    return served

                event(name, lose_leader, rotate=True)

                def restart(node=leader) -> float:  # type: ignore[no-untyped-def]
                    started = time.monotonic()
                    cluster.restart(node)
                    return cluster.wait_serving() - started

                event(f"{leader.name} restart + unseal", restart, rotate=False)

            def sealed() -> float:
                cluster.seal_all()
                time.sleep(args.seal)  # the outage itself
                started = time.monotonic()
                cluster.unseal_all()
                return cluster.wait_serving() - started

            event(f"cluster sealed {args.seal:g} s", sealed, rotate=True)

            def proxy() -> float:
                started = time.monotonic()
                cluster.restart_proxy()
                return cluster.wait_serving() - started

            event("HAProxy restart", proxy, rotate=True)
        finally:
            for load in loads:
                load.stop()
            watch.stop()
        for load in loads:
            for failure in load.failures[:5]:
                print("failure:", failure, file=sys.stderr)
    return rows


def rotation(cluster: Cluster, loads: list[SigningLoad], known: list[str]) -> list[float]:
    """Write a new version; seconds until each sidecar's load sees a token signed with it."""
    known.append(f"bench-ha-{len(known)}-" + secrets.token_hex(32))
    index = len(known) - 1
    cluster.client().secrets.kv.v2.create_or_update_secret(
        path=KV_PATH, secret={"product_id": common.PRODUCT_ID, "product_secret": known[-1]}
    )
    written = time.monotonic()
    deadline = written + 60
    while any(index not in load.first_seen for load in loads) and time.monotonic() < deadline:
        time.sleep(0.01)
    return [load.first_seen.get(index, float("nan")) - written for load in loads]


def spread(values: list[float], digits: int = 1) -> str:
    if not values:
        return "-"
    low, high = min(values), max(values)
    return (
        f"{low:.{digits}f}"
        if round(low, digits) == round(high, digits)
        else (f"{low:.{digits}f}-{high:.{digits}f}")
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidecars", type=int, default=3)
    parser.add_argument("--interval", type=float, default=5.0, help="REFRESH_INTERVAL (s)")
    parser.add_argument("--backoff-max", type=float, default=5.0, help="BACKOFF_MAX (s)")
    parser.add_argument("--seal", type=float, default=20.0, help="seconds the cluster stays sealed")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-failover-") as tmp:
        started = time.monotonic()
        with openbao_cluster(Path(tmp) / "cluster") as cluster:
            print(f"cluster up in {time.monotonic() - started:.1f} s", file=sys.stderr)
            rows = run(args, cluster, Path(tmp))
    machine = common.machine().split(", pinning")[0]  # nothing is pinned here
    print(
        f"\n{machine}, nothing pinned; {args.sidecars} sidecars, "
        f"REFRESH_INTERVAL={args.interval:g} s, BACKOFF_MAX={args.backoff_max:g} s, "
        "one signing client per sidecar\n"
    )
    print(
        "| event | failover s | refresh gap s (per sidecar) | failed refreshes | logins "
        "| rotation after it s | failed requests |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.event} | {row.failover:.2f} | {spread([g.seconds for g in row.gaps])} "
            f"| {spread([g.errors for g in row.gaps], 0)} "
            f"| {spread([g.logins for g in row.gaps], 0)} "
            f"| {spread(row.propagation, 2)} | {row.failed} |"
        )
    return 1 if any(row.failed for row in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
