"""The Grafana dashboard of deploy/grafana, evaluated by a real Prometheus.

Two sidecars run: one with the file source, one in transit mode against a real OpenBao that
requires a client certificate (mutual TLS), with the issuance audit on and an allow-list
that refuses a caller of another uid. A real `prometheus` (Debian package) scrapes both ops
ports every second from its own temporary storage; the test sends signing traffic, then
evaluates every panel query through Prometheus' HTTP API the way Grafana would (variables
substituted). Every metric name in the dashboard must exist in the live scrape.
"""

from __future__ import annotations

import concurrent.futures
import datetime
import json
import math
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sidecar.devserver import OpenBaoDevServer
from tests.openbao import (
    Bao,
    make_ca,
    make_client_cert,
    make_server_cert,
    tls_listener,
    unique,
    vault_sidecar,
)
from tests.support import (
    ROOT,
    SidecarProcess,
    exported_names,
    free_port,
    post_token,
    scrape,
    sign_as,
    wait_http,
)
from tests.test_transit import bao_cli, import_key

DASHBOARD = ROOT / "deploy" / "grafana" / "reditus-sidecar.json"
METRIC = re.compile(r"\breditus_sidecar_[a-z_]+\b")
NAMESPACE, POD, TRANSIT_POD = "shop", "shop-7d9c-abcde", "shop-transit-5f6b-fghij"
# What Grafana substitutes; $__rate_interval is at least 4 scrape intervals.
VARIABLES = {
    "$__rate_interval": "15s",
    "$__interval": "1s",
    "$namespace": NAMESPACE,
    "$pod": POD,
}
# Panels that may legitimately be empty for both sidecars (neither has an expiring token).
MAY_BE_EMPTY = {"Vault token time left"}
CERT_LIFETIME = datetime.timedelta(hours=1)
STRANGER = 4998  # uid and gid of a process the transit sidecar's allow-list refuses


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def substitute(expr: str, pod: str = POD) -> str:
    """The expression as Grafana sends it with `pod` selected (a regex: Grafana's multi-value
    variables become `a|b`)."""
    for name, value in sorted({**VARIABLES, "$pod": pod}.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(name, value)
    assert "$" not in expr, expr
    return expr


@dataclass
class Prometheus:
    url: str

    def get(self, path: str, **params: str) -> dict[str, Any]:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:  # noqa: S310
            return json.loads(response.read())

    def query(self, expr: str) -> list[dict[str, Any]]:
        body = self.get("/api/v1/query", query=expr)
        assert body["status"] == "success", body
        return body["data"]["result"]


def prometheus_binary() -> str:
    found = shutil.which("prometheus", path=os.environ.get("PATH", "") + os.pathsep + "/usr/bin")
    if found is None:
        pytest.fail("prometheus not found: scripts/setup installs Debian's prometheus package")
    return found


@pytest.fixture(scope="module")
def transit_sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    """Transit mode over mutual TLS (OpenBao requires a client certificate on its TLS
    listener), the audit written to a file, and only uid 0 (this test) allowed to sign."""
    tmp = tmp_path_factory.mktemp("transit")
    server_ca, ca_key, ca_cert = make_ca(tmp, "server-ca")
    server_cert, server_key = make_server_cert(tmp, ca_key, ca_cert)
    client_ca, client_ca_key, client_ca_cert = make_ca(tmp, "client-ca")
    cert, key = make_client_cert(
        tmp, "client", client_ca_key, client_ca_cert, common_name="shop", lifetime=CERT_LIFETIME
    )
    hcl, port = tls_listener(server_cert, server_key, client_ca=client_ca)
    with OpenBaoDevServer(extra_config=hcl) as server:
        bao = Bao(server)
        bao_cli(bao, tmp, "secrets", "enable", "transit")
        name = unique("dashboard")
        import_key(bao, tmp, name, "dashboard-secret-" + "d" * 64)
        with vault_sidecar(
            f"https://127.0.0.1:{port}",
            VAULT_TOKEN=bao.root_token,
            VAULT_CACERT=str(server_ca),
            VAULT_CLIENT_CERT=str(cert),
            VAULT_CLIENT_KEY=str(key),
            REDITUS_SIDECAR_SECRET_SOURCE="transit",
            REDITUS_SIDECAR_TRANSIT_KEY=name,
            REDITUS_SIDECAR_PRODUCT_ID="prod-dashboard",
            REDITUS_SIDECAR_AUDIT=str(tmp / "audit.jsonl"),
            REDITUS_SIDECAR_ALLOWED_UIDS="0",
        ) as process:
            yield process


def transit_traffic(sidecar: SidecarProcess) -> None:
    """Concurrent tokens (so that some share a transit call) and one refused caller."""
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(
            pool.map(lambda i: post_token(sidecar.api_url, {"userId": f"t-{i}"}), range(16))
        )
    assert all(status == 200 for status, _ in results), results
    status, _ = sign_as("tcp:" + sidecar.api_url.removeprefix("http://"), STRANGER, STRANGER)
    assert status == 403


@pytest.fixture(scope="module")
def prometheus(
    sidecar: SidecarProcess,
    transit_sidecar: SidecarProcess,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    # The labels Kubernetes service discovery would attach.
    static_configs = [
        {
            "targets": [process.metrics_url.removeprefix("http://")],
            "labels": {"namespace": NAMESPACE, "pod": pod},
        }
        for process, pod in ((sidecar, POD), (transit_sidecar, TRANSIT_POD))
    ]
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "reditus-sidecar", "static_configs": static_configs}],
    }
    (workdir / "prometheus.yml").write_text(json.dumps(config))
    port = free_port()
    log = (workdir / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            prometheus_binary(),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--storage.tsdb.retention.time=1h",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(url + "/-/ready", timeout=30, proc=proc)
        server = Prometheus(url)
        # Traffic in several bursts, so that rates over the last seconds are non-zero.
        deadline = time.monotonic() + 30
        while True:
            for i in range(5):
                status, _ = post_token(sidecar.api_url, {"userId": f"user-{i}"})
                assert status == 200
            post_token(sidecar.api_url, {"userId": 7})  # invalid_request
            post_token(sidecar.api_url, {"userId": "u"}, headers={"X-Sidecar-Request": "no"})
            transit_traffic(transit_sidecar)
            wanted = [
                f'sum(rate(reditus_sidecar_tokens_issued_total{{pod="{POD}"}}[15s])) > 0',
                f'sum(rate(reditus_sidecar_token_errors_total{{pod="{POD}"}}[15s])) > 0',
                f'sum(rate(reditus_sidecar_transit_calls_total{{pod="{TRANSIT_POD}"}}[15s])) > 0',
                f'sum(rate(reditus_sidecar_audit_records_total{{pod="{TRANSIT_POD}"}}[15s])) > 0',
                f'sum(rate(reditus_sidecar_token_errors_total{{pod="{TRANSIT_POD}",'
                f' reason="caller_not_allowed"}}[15s])) > 0',
            ]
            if all(server.query(expr) for expr in wanted):
                break
            if time.monotonic() > deadline:
                pytest.fail(
                    "Prometheus saw no signing traffic: "
                    + (workdir / "prometheus.log").read_text()[-2000:]
                )
            time.sleep(0.5)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        log.close()


def test_dashboard_shape() -> None:
    board = dashboard()
    assert board["uid"] == "reditus-sidecar"
    names = [v["name"] for v in board["templating"]["list"]]
    assert names == ["datasource", "namespace", "pod"]
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels():
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}"
            # Every query follows the namespace/pod selection.
            assert 'namespace=~"$namespace"' in target["expr"], panel["title"]
            assert 'pod=~"$pod"' in target["expr"], panel["title"]
    titles = {p["title"] for p in panels()}
    for wanted in (
        "Tokens issued by product",
        "Errors by reason",
        "Signing latency",
        "Secret age",
        "Secret version",
        "Refresh results",
        "Vault logins",
        "Vault token time left",
        "Readiness",
        "Build info",
        "Open connections",
        "Connections shed",
        "Malformed HTTP",
        "Transit calls",
        "Transit call latency",
        "Transit batch size",
        "Client certificate time left",
        "Audit records",
        "Callers refused",
    ):
        assert wanted in titles
    latency = next(p for p in panels() if p["title"] == "Signing latency")
    for target in latency["targets"]:
        assert target["expr"].startswith("histogram_quantile(")
        assert "reditus_sidecar_request_duration_seconds_bucket" in target["expr"]


def test_every_metric_in_the_dashboard_is_exported(sidecar: SidecarProcess) -> None:
    exported = exported_names(scrape(sidecar.metrics_url))
    texts = [expr for _, expr in queries()]
    texts += [v.get("definition", "") for v in dashboard()["templating"]["list"]]
    used = {m for text in texts for m in METRIC.findall(text)}
    assert len(used) >= 9
    assert used <= exported, f"not exported by the sidecar: {sorted(used - exported)}"


@pytest.mark.parametrize(
    ("title", "expr"), queries(), ids=[f"{t}-{i}" for i, (t, _) in enumerate(queries())]
)
def test_panel_query_evaluates(title: str, expr: str, prometheus: Prometheus) -> None:
    """With both pods selected: the transit, certificate and audit panels have their data
    from the transit sidecar only."""
    query = substitute(expr, pod=f"{POD}|{TRANSIT_POD}")
    result = prometheus.query(query)
    if title in MAY_BE_EMPTY:
        return
    assert result, f"{title}: no data for {query}"


def test_panel_values_match_the_running_sidecar(prometheus: Prometheus) -> None:
    by_title = {p["title"]: p for p in panels()}

    def values(title: str, index: int = 0) -> list[dict[str, Any]]:
        return prometheus.query(substitute(by_title[title]["targets"][index]["expr"]))

    (ready,) = values("Sidecars ready")
    assert float(ready["value"][1]) == 1
    (not_ready,) = values("Sidecars not ready")
    assert float(not_ready["value"][1]) == 0
    products = {s["metric"]["product"] for s in values("Tokens issued by product")}
    assert products == {"default"}
    reasons = {s["metric"]["reason"] for s in values("Errors by reason")}
    assert {"invalid_request", "missing_request_header"} <= reasons
    (version,) = values("Secret version")
    assert float(version["value"][1]) == 1
    (age,) = values("Secret age")
    assert 0 <= float(age["value"][1]) < 120
    legends = {t["legendFormat"]: t for t in by_title["Signing latency"]["targets"]}
    for p in ("p50", "p90", "p99"):
        (sample,) = prometheus.query(substitute(legends[p]["expr"]))
        # a real quantile of observed requests, not NaN/+Inf (how fast is bench/'s job)
        assert 0 < float(sample["value"][1]) < math.inf
    # The file source never logs in to Vault: its token expiry stays 0 and is hidden.
    assert values("Vault token time left") == []
    (build,) = values("Build info")
    assert build["metric"]["version"]


def test_variable_queries_find_the_pod(prometheus: Prometheus) -> None:
    """The namespace/pod variables' label_values() queries, through the same API Grafana
    uses for them."""
    for variable in dashboard()["templating"]["list"][1:]:
        match = re.fullmatch(r"label_values\((.*), (\w+)\)", variable["definition"])
        assert match, variable["definition"]
        selector, label = match.groups()
        body = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": substitute(selector)})
        assert body["status"] == "success"
        assert body["data"] == {"namespace": [NAMESPACE], "pod": sorted([POD, TRANSIT_POD])}[label]


def test_transit_certificate_and_audit_panels(prometheus: Prometheus) -> None:
    by_title = {p["title"]: p for p in panels()}

    def values(title: str, pod: str, legend: str | None = None) -> list[dict[str, Any]]:
        targets = by_title[title]["targets"]
        target = (
            targets[0]
            if legend is None
            else next(t for t in targets if t["legendFormat"] == legend)
        )
        return prometheus.query(substitute(target["expr"], pod=pod))

    def by_label(samples: list[dict[str, Any]], label: str) -> dict[str, float]:
        return {s["metric"][label]: float(s["value"][1]) for s in samples}

    calls = by_label(values("Transit calls", TRANSIT_POD), "result")
    assert calls["success"] > 0
    assert calls["error"] == 0
    # The file-source pod makes no transit calls: its pre-initialised series stay at 0.
    assert set(by_label(values("Transit calls", POD), "result").values()) == {0}
    for p in ("p50", "p90", "p99"):
        (sample,) = values("Transit call latency", TRANSIT_POD, p)
        assert 0 < float(sample["value"][1]) < math.inf
    (mean,) = values("Transit batch size", TRANSIT_POD, "mean")
    assert 1 <= float(mean["value"][1]) <= 8  # 8 requests at a time at most
    for p in ("p50", "p99"):
        (sample,) = values("Transit batch size", TRANSIT_POD, p)
        # histogram_quantile interpolates inside the (0, 1] bucket: below 1 is fine
        assert 0 < float(sample["value"][1]) <= 8

    (left,) = values("Client certificate time left", TRANSIT_POD)
    assert 0 < float(left["value"][1]) <= CERT_LIFETIME.total_seconds()
    assert values("Client certificate time left", POD) == []  # no client certificate

    (written,) = values("Audit records", TRANSIT_POD, "written")
    assert float(written["value"][1]) > 0
    lost = by_label(values("Audit records", TRANSIT_POD, "lost {{reason}}"), "reason")
    assert lost == {"write": 0, "queue_full": 0, "exit": 0}
    (refused,) = values("Callers refused", TRANSIT_POD)
    assert refused["metric"]["pod"] == TRANSIT_POD
    assert float(refused["value"][1]) > 0
    (none_refused,) = values("Callers refused", POD)
    assert float(none_refused["value"][1]) == 0
