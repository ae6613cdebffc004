"""deploy/vault/: the least-privilege policy is enough for the sidecar and refuses
everything else, the demo uses the very same text, and both setup scripts work (twice)
against a real OpenBao.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import pytest

from sidecar.demo import POLICY_HCL, policy_for
from tests.openbao import Bao, service_account_jwt, session_for, unexported, unique, write_file
from tests.support import ROOT, base_env

DEPLOY = ROOT / "deploy" / "vault"
POLICY_FILE = DEPLOY / "reditus-sidecar.hcl"


def test_demo_uses_the_deployed_policy() -> None:
    assert POLICY_FILE.read_text() == POLICY_HCL
    assert policy_for() == POLICY_HCL
    assert '"kv/data/shop/reditus"' in policy_for("kv", "shop/reditus")


@pytest.fixture
def policy_token(openbao: Bao) -> str:
    """A token holding only the deployed policy (and Vault's `default`)."""
    name = unique("deployed")
    openbao.policy(name, POLICY_FILE.read_text())
    openbao.put("reditus", product_id="prod-policy", product_secret="p" * 64)
    openbao.put("other", product_id="prod-other", product_secret="o" * 64)
    return openbao.token([name], ttl="10m")


async def test_policy_is_enough_for_the_sidecar(openbao, policy_token) -> None:
    session, source = session_for(openbao, unexported(), VAULT_TOKEN=policy_token)
    try:
        material = await source.fetch()
        assert material.product_id == "prod-policy"
        state = await session.token()
        assert state.renewable
        assert state.ttl > 0
        from sidecar.sources.vault_auth import renew

        assert (await renew(session.transport, state)).ttl > 0
    finally:
        await session.close()


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("GET", "secret/data/other", None),
        ("GET", "secret/data/reditus-other", None),
        ("GET", "secret/metadata/reditus", None),
        ("LIST", "secret/metadata", None),
        ("POST", "secret/data/reditus", {"data": {"product_secret": "stolen"}}),
        ("DELETE", "secret/data/reditus", None),
        ("POST", "secret/delete/reditus", {"versions": [1]}),
        ("GET", "sys/policies/acl", None),
        ("GET", "auth/approle/role", None),
        ("POST", "auth/token/create", {}),
    ],
)
def test_policy_refuses_everything_else(openbao, policy_token, method, path, payload) -> None:
    client = hvac.Client(url=openbao.addr, token=policy_token, cert=(), verify=True, timeout=5)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.adapter.request(method, f"/v1/{path}", json=payload)


def run_script(
    script: str, env: dict[str, str], stdin: str | None = None, *, succeed: bool = True
) -> subprocess.CompletedProcess[str]:
    """A deploy/vault script with the venv's tools (bao) on PATH; it must succeed (or,
    with succeed=False, fail)."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    result = subprocess.run(
        ["bash", str(DEPLOY / script)],
        env=base_env(PATH=path, **env),
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode == 0) is succeed, result.stderr
    return result


async def product_id_as_pod(
    openbao: Any, values: dict[str, str], tmp_path: Path, token: str
) -> str:
    """Log in with the variables a set-up script printed and a service-account token, as
    the pod would, and read the product id."""
    session, source = session_for(
        openbao, unexported(), **values,
        REDITUS_SIDECAR_VAULT_JWT_FILE=str(write_file(tmp_path / "sa", token)),
    )  # fmt: skip
    try:
        return (await source.fetch()).product_id
    finally:
        await session.close()


def exported(stdout: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in stdout.splitlines() if "=" in line)


async def test_setup_approle_script(openbao, tmp_path) -> None:
    path, mount = unique("approle-script"), unique("approle")
    openbao.put(path, product_id="prod-script", product_secret="s" * 64)
    secret_id_file = tmp_path / "secret-id"
    env = {
        **openbao.server.env(),
        "KV_PATH": path,
        "AUTH_MOUNT": mount,
        "POLICY": unique("policy"),
        "SECRET_ID_FILE": str(secret_id_file),
    }
    run_script("setup-approle.sh", env)
    result = run_script("setup-approle.sh", env)  # idempotent: a second run succeeds
    assert secret_id_file.stat().st_mode & 0o777 == 0o600
    secret_id = secret_id_file.read_text().strip()
    assert secret_id not in result.stdout + result.stderr
    values = exported(result.stdout)
    assert values["REDITUS_SIDECAR_VAULT_AUTH_MOUNT"] == mount
    session, source = session_for(
        openbao, unexported(), **values, REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(secret_id_file)
    )
    try:
        material = await source.fetch()
        assert material.product_id == "prod-script"
        # ... and the role's policy refuses the neighbour path.
        token = (await session.token()).token.reveal()
        client = hvac.Client(url=openbao.addr, token=token, cert=(), verify=True, timeout=5)
        with pytest.raises(hvac.exceptions.Forbidden):
            client.secrets.kv.v2.read_secret_version("reditus", raise_on_deleted_version=True)
    finally:
        await session.close()


async def test_setup_kubernetes_auth_script(openbao, tmp_path, jwt_auth, k8s_auth) -> None:
    _, key = jwt_auth
    _, reviewer = k8s_auth
    path, mount = unique("k8s-script"), unique("kubernetes")
    openbao.put(path, product_id="prod-k8s", product_secret="k" * 64)
    env = {
        **openbao.server.env(),
        "KUBERNETES_HOST": reviewer.url,
        "KUBERNETES_CA_CERT": str(openbao.ca_file),
        "DISABLE_LOCAL_CA_JWT": "true",
        "NAMESPACE": "shop",
        "SERVICE_ACCOUNT": "web",
        "KV_PATH": path,
        "AUTH_MOUNT": mount,
        "POLICY": unique("policy"),
        "ROLE": "reditus-sidecar",
    }
    run_script("setup-kubernetes-auth.sh", env)
    values = exported(run_script("setup-kubernetes-auth.sh", env).stdout)
    token = service_account_jwt(key, namespace="shop", name="web")
    reviewer.accepted.add(token)
    assert await product_id_as_pod(openbao, values, tmp_path, token) == "prod-k8s"
