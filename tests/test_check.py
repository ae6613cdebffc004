"""`reditus-sidecar check` as a process against a real OpenBao: exit 0 when the secret
reads, and for each way it can fail a distinct, actionable message and exit 1. The
output never carries a token, a secret id or the product secret.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from sidecar.devserver import free_port_pair
from tests.openbao import Bao, make_ca, unique, write_file
from tests.support import ROOT, base_env

pytestmark = pytest.mark.integration

PRODUCT_SECRET = "check-secret-" + "c" * 64


def run_check(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "check"],
        env=base_env(REDITUS_SIDECAR_VAULT_TIMEOUT="3", **env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def approle_env(openbao: Bao, tmp_path) -> dict[str, str]:
    """A working AppRole set-up for a fresh path holding a valid secret."""
    path = unique("check")
    openbao.put(path, product_id="prod-check", product_secret=PRODUCT_SECRET)
    _, role_id, secret_id = openbao.approle([openbao.read_policy(path)])
    return {
        "VAULT_ADDR": openbao.addr,
        "REDITUS_SIDECAR_VAULT_AUTH": "approle",
        "REDITUS_SIDECAR_VAULT_ROLE_ID": role_id,
        "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE": str(write_file(tmp_path / "sid", secret_id)),
        "REDITUS_SIDECAR_KV_PATH": path,
    }


def assert_clean(result: subprocess.CompletedProcess[str], *values: str) -> None:
    output = result.stdout + result.stderr
    for value in (PRODUCT_SECRET, *values):
        assert value not in output


def test_ok(openbao, approle_env, tmp_path) -> None:
    result = run_check(approle_env)
    assert result.returncode == 0, result.stderr
    assert "check: product default: ok (product id 'prod-check', version 1)" in result.stdout
    assert_clean(result, (tmp_path / "sid").read_text())


def failed_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if "check: product default" in line]
    assert lines, result.stderr
    return lines[0]


def test_vault_unreachable(approle_env) -> None:
    approle_env["VAULT_ADDR"] = f"http://127.0.0.1:{free_port_pair()}"
    result = run_check(approle_env)
    line = failed_line(result)
    assert "unreachable (connection refused)" in line
    assert "VAULT_ADDR" in line
    # one line: no log line promising a retry that a one-shot command never makes
    assert result.stdout + result.stderr == line + "\n", result.stdout + result.stderr


def test_tls_failure(openbao, approle_env, tmp_path) -> None:
    wrong_ca, _, _ = make_ca(tmp_path, "wrong-ca")
    approle_env.update(VAULT_ADDR=str(openbao.tls_addr), VAULT_CACERT=str(wrong_ca))
    line = failed_line(run_check(approle_env))
    assert "TLS" in line
    assert "certificate verify failed" in line
    assert "VAULT_CACERT" in line


def test_tls_with_the_right_ca(openbao, approle_env) -> None:
    approle_env.update(VAULT_ADDR=str(openbao.tls_addr), VAULT_CACERT=str(openbao.ca_file))
    assert run_check(approle_env).returncode == 0


def test_authentication_refused(approle_env, tmp_path) -> None:
    wrong = "11111111-2222-3333-4444-555555555555"
    write_file(tmp_path / "sid", wrong)
    result = run_check(approle_env)
    line = failed_line(result)
    assert "Vault refused the approle login" in line
    assert "REDITUS_SIDECAR_VAULT_ROLE_ID" in line
    assert_clean(result, wrong)


def test_token_refused(openbao, approle_env) -> None:
    bogus = "s.not-a-real-token-" + "t" * 12
    env = {k: v for k, v in approle_env.items() if "ROLE_ID" not in k and "SECRET_ID" not in k}
    env.update(REDITUS_SIDECAR_VAULT_AUTH="token", VAULT_TOKEN=bogus)
    result = run_check(env)
    line = failed_line(result)
    assert "Vault refused the token" in line
    assert "VAULT_TOKEN" in line
    assert_clean(result, bogus)


def test_permission_denied(openbao, approle_env) -> None:
    other = unique("check-other")
    openbao.put(other, product_id="prod-other", product_secret=PRODUCT_SECRET)
    approle_env["REDITUS_SIDECAR_KV_PATH"] = other
    line = failed_line(run_check(approle_env))
    assert "permission denied" in line
    assert f'"secret/data/{other}"' in line
    assert "policies" in line


def test_path_missing(openbao) -> None:
    env = {
        "VAULT_ADDR": openbao.addr,
        "VAULT_TOKEN": openbao.root_token,
        "REDITUS_SIDECAR_KV_PATH": unique("missing"),
    }
    result = run_check(env)
    line = failed_line(result)
    assert "HTTP 404" in line
    assert "REDITUS_SIDECAR_KV_MOUNT" in line
    assert "REDITUS_SIDECAR_KV_PATH" in line
    assert_clean(result, openbao.root_token)


def test_fields_missing(openbao, approle_env) -> None:
    openbao.put(approle_env["REDITUS_SIDECAR_KV_PATH"], product_id="prod-check")
    line = failed_line(run_check(approle_env))
    assert "missing field(s) 'product_secret'" in line
    assert "version 2" in line
