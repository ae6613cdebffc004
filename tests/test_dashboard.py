"""The Grafana dashboard of deploy/grafana, evaluated by a real Prometheus.

A sidecar runs with the file source; a real `prometheus` (Debian package) scrapes its ops
port every second from its own temporary storage; the test sends signing traffic, then
evaluates every panel query through Prometheus' HTTP API the way Grafana would (variables
substituted). Every metric name in the dashboard must exist in the live scrape.
"""

from __future__ import annotations

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

from tests.support import (
    ROOT,
    SidecarProcess,
    exported_names,
    free_port,
    post_token,
    scrape,
    start_sidecar,
    wait_http,
)

DASHBOARD = ROOT / "deploy" / "grafana" / "reditus-sidecar.json"
METRIC = re.compile(r"\breditus_sidecar_[a-z_]+\b")
NAMESPACE, POD = "shop", "shop-7d9c-abcde"
# What Grafana substitutes; $__rate_interval is at least 4 scrape intervals.
VARIABLES = {
    "$__rate_interval": "15s",
    "$__interval": "1s",
    "$namespace": NAMESPACE,
    "$pod": POD,
}
# Panels that may legitimately be empty with a file-source sidecar.
MAY_BE_EMPTY = {"Vault token time left"}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [p for p in dashboard()["panels"] if p["type"] != "row"]


def queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in panels() for t in p["targets"]]


def substitute(expr: str) -> str:
    for name, value in sorted(VARIABLES.items(), key=lambda kv: -len(kv[0])):
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
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    with start_sidecar(tmp_path_factory.mktemp("sidecar")) as process:
        yield process


@pytest.fixture(scope="module")
def prometheus(
    sidecar: SidecarProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    workdir = tmp_path_factory.mktemp("prometheus")
    target = sidecar.metrics_url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "reditus-sidecar",
                # The labels Kubernetes service discovery would attach.
                "static_configs": [
                    {"targets": [target], "labels": {"namespace": NAMESPACE, "pod": POD}}
                ],
            }
        ],
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
            issued = server.query(
                f'sum(rate(reditus_sidecar_tokens_issued_total{{pod="{POD}"}}[15s])) > 0'
            )
            errors = server.query("sum(rate(reditus_sidecar_token_errors_total[15s])) > 0")
            if issued and errors:
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
    result = prometheus.query(substitute(expr))
    if title in MAY_BE_EMPTY:
        return
    assert result, f"{title}: no data for {substitute(expr)}"


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
        assert body["data"] == [{"namespace": NAMESPACE, "pod": POD}[label]]
