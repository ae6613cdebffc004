"""The chart's rendered sidecar configuration, run by the real sidecar against real OpenBao.

No cluster runs here, so the pod is played by hand: each volume the rendered sidecar
mounts becomes a directory holding what Kubernetes would put there (the projected
service-account token, the AppRole secret-id, the CA bundle, the CSI-rendered file), the
mount paths in the rendered env are redirected to those directories, and
`reditus-sidecar sign` runs with exactly that environment. The token it prints must
verify with the secret stored in OpenBao: env names, auth wiring, file names inside the
volumes and the CA all have to be right for that.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from tests.openbao import Bao, service_account_jwt
from tests.support import ROOT, base_env
from tests.test_helm import NAMESPACE, RELEASE, helm_template, of_kind, sidecar_container

pytestmark = pytest.mark.integration

CI = ROOT / "helm" / "reditus-sidecar" / "ci"
KV_SECRET = "secret-one-" + "x" * 64  # what the kv_path fixture stores
KV_PRODUCT = "prod-1"


def render(scenario: str, **settings: str) -> dict[str, Any]:
    args = ["-f", str(CI / scenario)]
    for key, value in settings.items():
        args += ["--set-string", f"{key}={value}"]
    docs = [d for d in yaml.safe_load_all(helm_template(*args).stdout) if d]
    (deployment,) = of_kind(docs, "Deployment")
    return dict(deployment["spec"]["template"]["spec"])


def play_pod(
    spec: dict[str, Any],
    root: Path,
    files: dict[str, dict[str, str]],
    refs: dict[tuple[str, str], str] | None = None,
) -> dict[str, str]:
    """The sidecar's environment with every mount redirected under `root`, and the
    volumes filled with `files` ({volume name: {file name: content}})."""
    sidecar = sidecar_container(spec)
    volumes = {v["name"] for v in spec["volumes"]}
    mounts: dict[str, Path] = {}
    for mount in sidecar["volumeMounts"]:
        assert mount["name"] in volumes
        directory = root / mount["name"]
        directory.mkdir(parents=True, exist_ok=True)
        for name, content in files.get(mount["name"], {}).items():
            (directory / name).write_text(content)
        mounts[mount["mountPath"]] = directory
    env: dict[str, str] = {}
    for item in sidecar["env"]:
        if "valueFrom" in item:
            ((_source, ref),) = item["valueFrom"].items()
            env[item["name"]] = (refs or {})[(ref["name"], ref["key"])]
            continue
        value = str(item["value"])
        for mount_path, directory in mounts.items():
            if value.startswith(mount_path.rstrip("/") + "/"):
                value = str(directory) + value[len(mount_path.rstrip("/")) :]
        env[item["name"]] = value
    return env


def run_sign(env: dict[str, str], user: str = "u-helm") -> subprocess.CompletedProcess[str]:
    """`reditus-sidecar sign` with exactly the pod's environment."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", "sign", "--user-id", user],
        env=base_env(**env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def sign(env: dict[str, str]) -> str:
    proc = run_sign(env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip().splitlines()[-1]


def assert_signed_with(token: str, secret: str, product: str, user: str = "u-helm") -> None:
    claims = jwt.decode(token, secret, algorithms=["HS512"])
    assert claims["ProductId"] == product
    assert claims["UserId"] == user


def test_file_source_scenario_signs(tmp_path: Path) -> None:
    spec = render("file-source-values.yaml")
    secret = {"product_id": "prod-csi", "product_secret": "csi-rendered-" + "y" * 48}
    env = play_pod(spec, tmp_path, {"reditus-secret": {"reditus.json": json.dumps(secret)}})
    assert_signed_with(sign(env), secret["product_secret"], "prod-csi")


def test_kubernetes_auth_scenario_signs_over_tls(
    openbao: Bao, kv_path: str, jwt_auth: tuple[str, Any], k8s_auth: tuple[str, Any], tmp_path: Path
) -> None:
    _, key = jwt_auth
    mount, reviewer = k8s_auth
    assert openbao.tls_addr is not None
    assert openbao.ca_file is not None
    account = f"{RELEASE}-reditus-sidecar"  # the ServiceAccount the chart creates
    role = openbao.k8s_role(
        mount,
        openbao.read_policy(kv_path),
        namespace=NAMESPACE,
        account=account,
        audience="https://vault.example.com",
    )
    spec = render(
        "kubernetes-auth-values.yaml",
        **{
            "sidecar.vault.address": openbao.tls_addr,
            "sidecar.vault.namespace": "",
            "sidecar.vault.auth.mount": mount,
            "sidecar.vault.auth.role": role,
            "sidecar.vault.kv.mount": "secret",
            "sidecar.vault.kv.path": kv_path,
        },
    )
    assert spec["serviceAccountName"] == account
    token = service_account_jwt(
        key, namespace=NAMESPACE, name=account, audience="https://vault.example.com"
    )
    reviewer.accepted.add(token)
    env = play_pod(
        spec,
        tmp_path,
        {
            "reditus-sidecar-sa-token": {"token": token},
            "reditus-sidecar-vault-ca": {"ca.crt": openbao.ca_file.read_text()},
        },
    )
    assert env["VAULT_ADDR"].startswith("https://")
    assert_signed_with(sign(env), KV_SECRET, KV_PRODUCT)


def approle_pod(
    openbao: Bao, kv_path: str, root: Path, file_name: str = "secret-id"
) -> tuple[dict[str, str], str]:
    """The approle scenario's pod with its secret id stored as `file_name` in the
    AppRole volume: (environment, secret id)."""
    assert openbao.tls_addr is not None
    assert openbao.ca_file is not None
    _, role_id, secret_id = openbao.approle([openbao.read_policy(kv_path)], mount="approle-apps")
    spec = render(
        "approle-values.yaml",
        **{"sidecar.vault.auth.approle.roleId": role_id, "sidecar.vault.kv.path": kv_path},
    )
    env = play_pod(
        spec,
        root,
        {
            "reditus-sidecar-approle": {file_name: secret_id},
            "reditus-sidecar-vault-ca": {"ca.crt": openbao.ca_file.read_text()},
        },
        # VAULT_ADDR comes from the ConfigMap the scenario names.
        refs={("vault-connection", "VAULT_ADDR"): openbao.tls_addr},
    )
    return env, secret_id


def test_approle_scenario_signs(openbao: Bao, kv_path: str, tmp_path: Path) -> None:
    env, _ = approle_pod(openbao, kv_path, tmp_path)
    assert_signed_with(sign(env), KV_SECRET, KV_PRODUCT)


def test_jwt_scenario_signs(
    openbao: Bao, kv_path: str, jwt_auth: tuple[str, Any], tmp_path: Path
) -> None:
    mount, key = jwt_auth
    # The scenario runs as the existing ServiceAccount "shop".
    subject = f"system:serviceaccount:{NAMESPACE}:shop"
    role = openbao.jwt_role(mount, openbao.read_policy(kv_path), subject=subject)
    spec = render(
        "jwt-values.yaml",
        **{
            "sidecar.vault.address": openbao.addr,
            "sidecar.vault.auth.mount": mount,
            "sidecar.vault.auth.role": role,
            "sidecar.vault.kv.path": kv_path,
        },
    )
    token = service_account_jwt(key, namespace=NAMESPACE, name=spec["serviceAccountName"])
    env = play_pod(spec, tmp_path, {"reditus-sidecar-sa-token": {"token": token}})
    assert_signed_with(sign(env), KV_SECRET, KV_PRODUCT)


def test_token_scenario_signs(openbao: Bao, kv_path: str, tmp_path: Path) -> None:
    spec = render(
        "plain-container-values.yaml",
        **{"sidecar.vault.address": openbao.addr, "sidecar.vault.kv.path": kv_path},
    )
    vault_token = openbao.token([openbao.read_policy(kv_path)])
    env = play_pod(spec, tmp_path, {"reditus-sidecar-vault-token": {"token": vault_token}})
    assert_signed_with(sign(env), KV_SECRET, KV_PRODUCT)


def test_a_wrong_mount_path_would_be_caught(openbao: Bao, kv_path: str, tmp_path: Path) -> None:
    """Guards the tests above: a secret-id placed under another file name than the one the
    rendered env names makes the real sidecar fail, naming the file it looked for."""
    env, secret_id = approle_pod(openbao, kv_path, tmp_path, file_name="secret_id")
    proc = run_sign(env, user="u")
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    wanted = env["REDITUS_SIDECAR_VAULT_SECRET_ID_FILE"]
    assert f"REDITUS_SIDECAR_VAULT_SECRET_ID_FILE={wanted!r}: no such file" in output
    assert secret_id not in output
