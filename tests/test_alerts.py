"""Alert rules of deploy/prometheus: real promtool, and the metrics of a real sidecar."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support import ROOT, exported_names, scrape, start_sidecar

pytestmark = pytest.mark.integration

RULES = ROOT / "deploy" / "prometheus" / "reditus-sidecar.rules.yaml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "reditus-sidecar.rules.test.yaml"
WANTED = {
    "ReditusSidecarDown",
    "ReditusSidecarAbsent",
    "ReditusSidecarNotReady",
    "ReditusSidecarSecretStale",
    "ReditusSidecarSecretRefreshFailing",
    "ReditusSidecarVaultLoginFailing",
    "ReditusSidecarVaultTokenNearExpiry",
    "ReditusSidecarTokenErrorRatioHigh",
    "ReditusSidecarVaultClientCertNearExpiry",
    "ReditusSidecarVaultClientCertExpiryImminent",
    "ReditusSidecarVaultClientCertReloadFailing",
    "ReditusSidecarTransitCallsFailing",
    "ReditusSidecarAuditWriteFailing",
    "ReditusSidecarCallersRefused",
}
# One deliberate break per rule of the mTLS, transit and audit features, each of which the
# unit tests must catch: a threshold moved, a `for` shortened past a blip, a guard dropped.
MUTATIONS = [
    ("ReditusSidecarVaultClientCertNearExpiry", "< 7 * 86400", "< 8 * 86400"),
    ("ReditusSidecarVaultClientCertExpiryImminent", "< 86400", "< 2 * 86400"),
    ("ReditusSidecarVaultClientCertReloadFailing", "for: 10m", "for: 0m"),
    ("ReditusSidecarVaultClientCertReloadFailing", 'result="success"', 'result="none"'),
    ("ReditusSidecarTransitCallsFailing", "for: 10m", "for: 5m"),
    ("ReditusSidecarTransitCallsFailing", "> 0.1", "> 1"),
    ("ReditusSidecarAuditWriteFailing", "for: 10m", "for: 4m"),
    ("ReditusSidecarCallersRefused", '{reason="caller_not_allowed"}', ""),
    ("ReditusSidecarCallersRefused", "for: 15m", "for: 3m"),
]
METRIC = re.compile(r"\breditus_sidecar_[a-z_]+\b")


def promtool() -> str:
    found = shutil.which("promtool", path=os.environ.get("PATH", "") + os.pathsep + "/usr/bin")
    if found is None:
        pytest.fail("promtool not found: scripts/setup installs Debian's prometheus package")
    return found


def promtool_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
    )


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_promtool_check_rules() -> None:
    proc = promtool_run("check", "rules", str(RULES), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(rules())} rules found" in proc.stdout


def test_promtool_test_rules() -> None:
    proc = promtool_run("test", "rules", RULE_TESTS.name, cwd=RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_tests_catch_a_changed_rule(tmp_path: Path) -> None:
    """Guards the unit tests: a rule that waits far longer must make them fail."""
    text = RULES.read_text()
    changed, count = re.subn(
        r"(alert: ReditusSidecarNotReady\n\s+expr: .*\n\s+)for: 5m", r"\1for: 50m", text
    )
    assert count == 1
    (tmp_path / RULES.name).write_text(changed)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    proc = promtool_run("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0
    assert "ReditusSidecarNotReady" in proc.stdout + proc.stderr


@pytest.mark.parametrize(("alert", "before", "after"), MUTATIONS)
def test_promtool_tests_catch_a_broken_rule(
    alert: str, before: str, after: str, tmp_path: Path
) -> None:
    """Guards the unit tests of each new rule: the changed rule must make them fail."""
    text = RULES.read_text()
    start = text.index(f"- alert: {alert}\n")
    end = text.find("- alert: ", start + 1)
    end = len(text) if end == -1 else end
    rule = text[start:end]
    assert rule.count(before) == 1, rule
    (tmp_path / RULES.name).write_text(text[:start] + rule.replace(before, after) + text[end:])
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    proc = promtool_run("test", "rules", RULE_TESTS.name, cwd=tmp_path)
    assert proc.returncode != 0
    assert f"alertname: {alert}," in proc.stdout + proc.stderr


def test_every_alert_is_documented_and_has_firing_and_quiet_cases() -> None:
    alerts = {r["alert"]: r for r in rules()}
    assert set(alerts) >= WANTED
    cases = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in cases:
        for check in case["alert_rule_test"]:
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    for name, rule in alerts.items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        for key in ("summary", "description", "runbook"):
            assert rule["annotations"].get(key, "").strip(), f"{name} lacks {key}"
        assert name in firing, f"{name} has no firing test case"
        assert name in quiet, f"{name} has no case where it must stay quiet"


def test_rules_use_only_metrics_the_sidecar_exports(tmp_path: Path) -> None:
    used = {m for r in rules() for m in METRIC.findall(r["expr"])}
    assert used
    with start_sidecar(tmp_path) as sidecar:
        exported = exported_names(scrape(sidecar.metrics_url))
    assert used <= exported, f"not exported: {sorted(used - exported)}"
