"""Vault HA failover: three real sidecars (AppRole) under steady signing load, talking to a
3-node OpenBao Raft cluster through HAProxy (tests/openbao_ha.py), through the faults an
HA Vault goes through: the leader killed, the leader stopped (step-down), a node restarted
and unsealed, the whole cluster sealed, the load balancer restarted.

Checked at every fault: no signing request fails (each answer a 200 with a token that
verifies with a secret written so far); refreshes succeed again within one backoff step
(plus one Vault call that may time out) of HAProxy serving the new active node; login
attempts stay within one per backoff step; the refresh-error and last-success metrics
show the outage and clear after it; a rotation written after a failover reaches every
sidecar within one refresh interval (plus a backoff step).

The whole cluster stays sealed for SEAL_SECONDS (20 s, several backoff steps), as in bench/failover.py.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from sidecar.timing import BACKOFF_INITIAL, JITTER
from tests.failover import Gap, MetricsWatch, SigningLoad, gap, parse
from tests.openbao import vault_sidecar, write_file
from tests.openbao_ha import Cluster, openbao_cluster
from tests.support import SidecarProcess, eventually, scrape, scrape_value

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SIDECARS = 3
INTERVAL = 1.0  # REDITUS_SIDECAR_REFRESH_INTERVAL
BACKOFF_MAX = 2.0  # REDITUS_SIDECAR_BACKOFF_MAX
VAULT_TIMEOUT = 2.0  # REDITUS_SIDECAR_VAULT_TIMEOUT
SEAL_SECONDS = 20.0  # ten backoff steps: logins must stay bounded across all of them
SLACK = 3.0  # scheduling on a shared 2-core machine, and the 0.1 s scrape period
# From HAProxy serving the new active node to a successful refresh: the backoff step the
# sidecar is in, plus one call that may have gone to the dead node and time out.
RECOVERY = BACKOFF_MAX + VAULT_TIMEOUT + SLACK
# From a KV write to every sidecar holding the new version: one interval (with jitter).
PROPAGATION = INTERVAL * (1 + JITTER) + SLACK
KV_PATH = "reditus-ha"


@dataclass
class Fleet:
    cluster: Cluster
    sidecars: list[SidecarProcess]
    loads: list[SigningLoad]
    watch: MetricsWatch
    secrets: list[str]

    def refreshed(self, index: int) -> float:
        return self.watch.fresh(index).refreshed


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    with openbao_cluster(tmp_path_factory.mktemp("openbao-ha")) as running:
        yield running


@pytest.fixture(scope="module")
def first_secret(cluster: Cluster) -> str:
    """The product secret (version 1), a read policy, and the AppRole auth method."""
    first = "ha-secret-0-" + secrets.token_hex(32)
    root = cluster.client()
    root.secrets.kv.v2.create_or_update_secret(
        path=KV_PATH, secret={"product_id": "prod-ha", "product_secret": first}
    )
    root.sys.create_or_update_acl_policy(
        name="reditus-ha", policy=f'path "secret/data/{KV_PATH}" {{ capabilities = ["read"] }}'
    )
    root.sys.enable_auth_method("approle")
    return first


def approle_env(cluster: Cluster, role: str, directory: Path, **options: str) -> dict[str, str]:
    """A fresh AppRole role (with `options`) and the sidecar settings logging in with it."""
    root = cluster.client()
    root.auth.approle.create_or_update_approle(
        role_name=role, token_policies=["reditus-ha"], **options
    )
    role_id = root.auth.approle.read_role_id(role)["data"]["role_id"]
    secret_id = root.auth.approle.generate_secret_id(role)["data"]["secret_id"]
    return {
        "REDITUS_SIDECAR_VAULT_AUTH": "approle",
        "REDITUS_SIDECAR_VAULT_ROLE_ID": role_id,
        "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE": str(
            write_file(directory / f"secret-id-{role}", secret_id)
        ),
        "REDITUS_SIDECAR_KV_PATH": KV_PATH,
        "REDITUS_SIDECAR_REFRESH_INTERVAL": str(INTERVAL),
        "REDITUS_SIDECAR_BACKOFF_MAX": str(BACKOFF_MAX),
        "REDITUS_SIDECAR_VAULT_TIMEOUT": str(VAULT_TIMEOUT),
    }


@pytest.fixture
def fleet(cluster: Cluster, first_secret: str, tmp_path: Path) -> Iterator[Fleet]:
    with contextlib.ExitStack() as stack:
        sidecars = [
            # A short, renewable token: renewals happen during the faults too.
            stack.enter_context(
                vault_sidecar(
                    cluster.addr,
                    **approle_env(
                        cluster, f"ha-{index}", tmp_path, token_ttl="30s", token_max_ttl="10m"
                    ),
                )
            )
            for index in range(SIDECARS)
        ]
        known = [first_secret]
        loads = [SigningLoad(s.api_url, known) for s in sidecars]
        watch = MetricsWatch([s.metrics_url for s in sidecars])
        for thread in [*loads, watch]:
            thread.start()
        stack.callback(watch.stop)
        for load in loads:
            stack.callback(load.stop)
        yield Fleet(cluster, sidecars, loads, watch, known)


def backoff_steps(seconds: float, cap: float) -> int:
    """How many backoff steps fit in `seconds` at most: each step is at least half of
    min(cap, 1 s * 2^(n-1)) (jitter), and one more attempt may end the outage."""
    steps, elapsed = 1, 0.0
    while True:
        elapsed += 0.5 * min(cap, BACKOFF_INITIAL * 2 ** (steps - 1))
        if elapsed > seconds:
            return steps
        steps += 1


def recover(fleet: Fleet, fault: Callable[[], None], what: str) -> list[Gap]:
    """Run `fault`, wait for HAProxy to serve an active node, then for every sidecar to
    refresh successfully; check the logins it cost. Returns each sidecar's gap."""
    start = time.monotonic()
    fault()
    fleet.cluster.wait_serving()
    serving = [fleet.refreshed(i) for i in range(SIDECARS)]
    for index, count in enumerate(serving):
        eventually(
            lambda i=index, c=count: fleet.refreshed(i) > c,  # type: ignore[misc]
            timeout=RECOVERY,
            what=f"{what}: sidecar {index} refreshing again\n{fleet.sidecars[index].output()}",
        )
    end = time.monotonic()
    gaps = [gap(fleet.watch.samples[i], start, end) for i in range(SIDECARS)]
    steps = backoff_steps(end - start, BACKOFF_MAX)
    for index, sidecar_gap in enumerate(gaps):
        assert sidecar_gap.logins <= steps, (
            f"{what}: sidecar {index} tried {sidecar_gap.logins} logins in {end - start:.1f} s"
        )
    return gaps


def rotate(fleet: Fleet) -> None:
    """Write a new KV version; every sidecar must load it, and sign with it, in time."""
    secret = f"ha-secret-{len(fleet.secrets)}-" + secrets.token_hex(32)
    fleet.secrets.append(secret)  # before the write: the load must accept it at once
    answer = fleet.cluster.client().secrets.kv.v2.create_or_update_secret(
        path=KV_PATH, secret={"product_id": "prod-ha", "product_secret": secret}
    )
    version = int(answer["data"]["version"])
    newest = len(fleet.secrets) - 1
    for index in range(SIDECARS):
        eventually(
            lambda i=index: fleet.watch.fresh(i).version == version,  # type: ignore[misc]
            timeout=PROPAGATION,
            what=f"sidecar {index} loading version {version}",
        )
        eventually(
            lambda i=index: newest in fleet.loads[i].first_seen,  # type: ignore[misc]
            timeout=5,
            what=f"sidecar {index} signing with version {version}",
        )


def test_signing_and_refresh_survive_vault_failovers(fleet: Fleet) -> None:
    cluster = fleet.cluster
    report: dict[str, list[Gap]] = {}

    leader = cluster.leader()
    report["leader SIGKILL"] = recover(
        fleet, lambda: leader.signal(signal.SIGKILL), "leader SIGKILL"
    )
    rotate(fleet)
    report["node restart + unseal"] = recover(
        fleet, lambda: cluster.restart(leader), "node restart"
    )

    leader = cluster.leader()
    report["leader SIGTERM"] = recover(
        fleet, lambda: leader.signal(signal.SIGTERM), "leader SIGTERM"
    )
    cluster.restart(leader)

    def sealed_outage() -> None:
        cluster.seal_all()
        try:
            sealed_at = time.monotonic()
            errors = [fleet.watch.fresh(i).errors for i in range(SIDECARS)]
            for index in range(SIDECARS):
                # the outage shows: refreshes fail, the last success stands still
                eventually(
                    lambda i=index: fleet.watch.fresh(i).errors >= errors[i] + 2,  # type: ignore[misc]
                    timeout=SEAL_SECONDS + SLACK,
                    what=f"sidecar {index} counting refresh errors while sealed",
                )
            stalled = [fleet.watch.fresh(i) for i in range(SIDECARS)]
            time.sleep(max(0.0, sealed_at + SEAL_SECONDS - time.monotonic()))  # the outage
            eventually(
                lambda: all(
                    fleet.watch.fresh(i).errors > stalled[i].errors for i in range(SIDECARS)
                ),
                timeout=BACKOFF_MAX + SLACK,
                what="refreshes failing on while sealed",
            )
            for index, before in enumerate(stalled):
                now = fleet.watch.fresh(index)
                assert now.last_success == before.last_success, f"sidecar {index} read sealed"
                assert now.ready == 1, f"sidecar {index} not ready with a good secret"
        finally:
            cluster.unseal_all()  # also after a failure: the next test needs the cluster

    report["cluster sealed"] = recover(fleet, sealed_outage, "cluster sealed")
    # ... and clears after it: two more good refreshes and no new error.
    for index in range(SIDECARS):
        after = fleet.watch.fresh(index)
        eventually(
            lambda i=index, r=after.refreshed: fleet.refreshed(i) >= r + 2,  # type: ignore[misc]
            timeout=2 * PROPAGATION,
            what=f"sidecar {index} refreshing after the seal",
        )
        assert fleet.watch.fresh(index).errors == after.errors
    rotate(fleet)

    report["HAProxy restart"] = recover(fleet, cluster.restart_proxy, "HAProxy restart")

    for index, load in enumerate(fleet.loads):
        assert load.failures == [], f"sidecar {index}: {load.failures[:5]}"
        assert load.ok > 0
    for event, gaps in report.items():
        figures = ", ".join(
            f"gap {g.seconds:.2f} s / {g.errors:g} errors / {g.logins:g} logins" for g in gaps
        )
        print(f"{event}: {figures}")


def test_renewal_answered_503_keeps_the_token(
    cluster: Cluster, first_secret: str, tmp_path: Path
) -> None:
    """A renewal that meets an unavailable Vault (sealed, failing over, or no active node
    behind the load balancer: 503) is retried with the same token, not taken for a
    refusal: no login is attempted. Here HAProxy has every node taken out of rotation
    while the 6 s token comes up for renewal (at 4 s)."""
    env = approle_env(cluster, "renew-503", tmp_path, token_ttl="6s", token_max_ttl="10m")
    assert cluster.proxy is not None
    with vault_sidecar(cluster.addr, **env) as sidecar:

        def renewals(result: str) -> float:
            return scrape_value(
                sidecar.metrics_url,
                f'reditus_sidecar_vault_token_renewal_total{{result="{result}"}}',
            )

        cluster.proxy.set_servers(enabled=False)
        try:
            eventually(lambda: renewals("error") >= 1, timeout=10, what="a renewal meeting 503")
        finally:
            cluster.proxy.set_servers(enabled=True)
            cluster.wait_serving()
        eventually(lambda: renewals("success") >= 1, timeout=10, what="the renewal retried")
        seen = parse(scrape(sidecar.metrics_url), 0)
        assert (seen.logins, seen.login_errors) == (1, 0), sidecar.output()
        # HAProxy's answer is an HTML page: the log says so instead of quoting the markup.
        failed = [r for r in sidecar.log_records() if r.get("msg") == "Vault token renewal failed"]
        assert failed, sidecar.output()
        assert all("an HTML page, not a Vault answer" in str(r["error"]) for r in failed)
        assert "<html" not in sidecar.output().lower()
