"""deploy/vault/setup-kubernetes-auth.sh against a real OpenBao, on a Kubernetes auth mount
that is already configured (a platform team's, shared by many teams): its config is kept,
only the policy and the role are written, unless OVERWRITE_AUTH_CONFIG=true asks for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.openbao import (
    Bao,
    TokenReviewer,
    rsa_key,
    service_account_jwt,
    token_reviewer,
    unique,
)
from tests.test_vault_policy import exported, product_id_as_pod, run_script

pytestmark = pytest.mark.integration

SHARED_REVIEWER_JWT = service_account_jwt(rsa_key(), namespace="kube-system", name="reviewer")


@pytest.fixture
def reviewer() -> Iterator[TokenReviewer]:
    with token_reviewer() as responder:
        yield responder


@pytest.fixture
def shared_mount(openbao: Bao, reviewer: TokenReviewer) -> str:
    """A Kubernetes auth mount configured by its owners, token reviewer JWT included."""
    mount = openbao.ensure_auth("kubernetes", unique("kubernetes"))
    assert openbao.ca_file is not None
    openbao.root().write_data(
        f"auth/{mount}/config",
        data={
            "kubernetes_host": reviewer.url,
            "kubernetes_ca_cert": openbao.ca_file.read_text(),
            "token_reviewer_jwt": SHARED_REVIEWER_JWT,
            "disable_local_ca_jwt": True,
        },
    )
    return mount


def mount_config(openbao: Bao, mount: str) -> dict[str, Any]:
    return dict(openbao.root().read(f"auth/{mount}/config")["data"])


def team_env(openbao: Bao, mount: str, kv_path: str, **extra: str) -> dict[str, str]:
    """What a team runs, as documented: its own API server URL and CA given."""
    assert openbao.ca_file is not None
    return {
        **openbao.server.env(),
        "KUBERNETES_HOST": "https://team-cluster.example:6443",
        "KUBERNETES_CA_CERT": str(openbao.ca_file),
        "DISABLE_LOCAL_CA_JWT": "true",
        "NAMESPACE": "shop",
        "SERVICE_ACCOUNT": "web",
        "KV_PATH": kv_path,
        "AUTH_MOUNT": mount,
        "POLICY": unique("policy"),
        "ROLE": unique("role"),
        **extra,
    }


async def test_setup_kubernetes_auth_keeps_a_configured_mount(
    openbao: Bao, shared_mount: str, reviewer: TokenReviewer, kv_path: str, tmp_path: Path
) -> None:
    before = mount_config(openbao, shared_mount)
    assert before["token_reviewer_jwt_set"] is True
    env = team_env(openbao, shared_mount, kv_path)
    first = run_script("setup-kubernetes-auth.sh", env)
    after = mount_config(openbao, shared_mount)
    assert (after["kubernetes_host"], after["token_reviewer_jwt_set"]) == (reviewer.url, True)
    assert after == before
    # Without KUBERNETES_HOST too: a kept config does not need it.
    again = run_script(
        "setup-kubernetes-auth.sh", {k: v for k, v in env.items() if k != "KUBERNETES_HOST"}
    )
    assert mount_config(openbao, shared_mount) == before
    for result in (first, again):
        assert f"auth/{shared_mount} is already configured (kubernetes_host={reviewer.url})" in (
            result.stderr
        )
        assert "OVERWRITE_AUTH_CONFIG=true" in result.stderr
    assert "KUBERNETES_HOST=https://team-cluster.example:6443 differs" in first.stderr
    assert "not used: KUBERNETES_HOST KUBERNETES_CA_CERT DISABLE_LOCAL_CA_JWT" in first.stderr

    # The role was written and works through the mount's own config (its TokenReview API).
    token = service_account_jwt(rsa_key(), namespace="shop", name="web")
    reviewer.accepted.add(token)
    assert await product_id_as_pod(openbao, exported(again.stdout), tmp_path, token) == "prod-1"
    assert reviewer.reviews >= 1


def test_setup_kubernetes_auth_overwrites_only_when_asked(
    openbao: Bao, shared_mount: str, kv_path: str
) -> None:
    env = team_env(openbao, shared_mount, kv_path, OVERWRITE_AUTH_CONFIG="true")
    result = run_script("setup-kubernetes-auth.sh", env)
    assert f"auth/{shared_mount} config replaced (OVERWRITE_AUTH_CONFIG=true" in result.stderr
    config = mount_config(openbao, shared_mount)
    assert config["kubernetes_host"] == "https://team-cluster.example:6443"
    assert config["token_reviewer_jwt_set"] is False


def test_setup_kubernetes_auth_configures_an_unconfigured_mount(openbao: Bao, kv_path: str) -> None:
    mount = openbao.ensure_auth("kubernetes", unique("kubernetes"))
    run_script("setup-kubernetes-auth.sh", team_env(openbao, mount, kv_path))
    assert mount_config(openbao, mount)["kubernetes_host"] == "https://team-cluster.example:6443"


def test_setup_kubernetes_auth_needs_the_host_to_configure(openbao: Bao, kv_path: str) -> None:
    mount = unique("kubernetes")
    env = {k: v for k, v in team_env(openbao, mount, kv_path).items() if k != "KUBERNETES_HOST"}
    result = run_script("setup-kubernetes-auth.sh", env, succeed=False)
    assert "set KUBERNETES_HOST" in result.stderr
    # Refused before anything was written: neither the mount nor the policy exists.
    root = openbao.root()
    assert f"{mount}/" not in root.sys.list_auth_methods()["data"]
    assert env["POLICY"] not in root.sys.list_acl_policies()["data"]["keys"]


def test_setup_kubernetes_auth_leaves_an_unreadable_config_alone(
    openbao: Bao, shared_mount: str, kv_path: str
) -> None:
    """A token that may write the config but not read it cannot tell whether the mount is
    configured: the script stops rather than overwrite it."""
    policy = unique("writer")
    openbao.policy(
        policy,
        'path "*" { capabilities = ["create", "read", "update", "delete", "list", "sudo"] }\n'
        f'path "auth/{shared_mount}/config" {{ capabilities = ["update"] }}\n',
    )
    before = mount_config(openbao, shared_mount)
    env = team_env(openbao, shared_mount, kv_path, VAULT_TOKEN=openbao.token([policy]))
    result = run_script("setup-kubernetes-auth.sh", env, succeed=False)
    assert f"cannot read auth/{shared_mount}/config" in result.stderr
    assert "permission denied" in result.stderr
    assert mount_config(openbao, shared_mount) == before


def test_setup_kubernetes_auth_refuses_an_unknown_overwrite_value(
    openbao: Bao, shared_mount: str, kv_path: str
) -> None:
    before = mount_config(openbao, shared_mount)
    env = team_env(openbao, shared_mount, kv_path, OVERWRITE_AUTH_CONFIG="yes")
    result = run_script("setup-kubernetes-auth.sh", env, succeed=False)
    assert "OVERWRITE_AUTH_CONFIG must be true or false, not 'yes'" in result.stderr
    assert mount_config(openbao, shared_mount) == before
