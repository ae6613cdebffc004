"""The Helm chart, with the real helm, kubernetes-validate and the chart's own schema.

No cluster runs here: the chart is linted, rendered for every ci/ scenario, validated
against the Kubernetes OpenAPI schemas of the oldest and newest supported versions, and
the rendered manifests are checked for the properties the sidecar's security rests on.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "reditus-sidecar"
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
RELEASE = "shop"
NAMESPACE = "shop"
OLDEST_KUBERNETES = "1.29.0"  # native sidecars (restartable init containers) are on by default
CRD_GROUP = "monitoring.coreos.com/"

# The sidecar's variables the chart may set: the README's configuration table.
DOCUMENTED_ENV = {
    "VAULT_ADDR",
    "VAULT_CACERT",
    "VAULT_CAPATH",
    "VAULT_CLIENT_CERT",
    "VAULT_CLIENT_KEY",
    "VAULT_TLS_SERVER_NAME",
    "VAULT_NAMESPACE",
    "REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN",
    "REDITUS_SIDECAR_LISTEN",
    "REDITUS_SIDECAR_UNIX_SOCKET",
    "REDITUS_SIDECAR_METRICS_LISTEN",
    "REDITUS_SIDECAR_SECRET_SOURCE",
    "REDITUS_SIDECAR_VAULT_AUTH",
    "REDITUS_SIDECAR_VAULT_AUTH_MOUNT",
    "REDITUS_SIDECAR_VAULT_ROLE",
    "REDITUS_SIDECAR_VAULT_JWT_FILE",
    "REDITUS_SIDECAR_VAULT_ROLE_ID",
    "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE",
    "REDITUS_SIDECAR_VAULT_TOKEN_FILE",
    "REDITUS_SIDECAR_KV_MOUNT",
    "REDITUS_SIDECAR_KV_PATH",
    "REDITUS_SIDECAR_PRODUCT_ID_KEY",
    "REDITUS_SIDECAR_SECRET_KEY",
    "REDITUS_SIDECAR_SECRET_FILE",
    "REDITUS_SIDECAR_REFRESH_INTERVAL",
    "REDITUS_SIDECAR_BACKOFF_MAX",
    "REDITUS_SIDECAR_MAX_STALENESS",
    "REDITUS_SIDECAR_REQUIRE_HEADER",
    "REDITUS_SIDECAR_TOKEN_TTL",
    "REDITUS_SIDECAR_LOG_LEVEL",
    "REDITUS_SIDECAR_LOG_FORMAT",
    "REDITUS_SIDECAR_SHUTDOWN_DELAY",
    "REDITUS_SIDECAR_TRANSIT_MOUNT",
    "REDITUS_SIDECAR_TRANSIT_KEY",
    "REDITUS_SIDECAR_PRODUCT_ID",
    "REDITUS_SIDECAR_ALLOWED_UIDS",
    "REDITUS_SIDECAR_ALLOWED_GIDS",
    "REDITUS_SIDECAR_AUDIT",
    "REDITUS_SIDECAR_AUDIT_FAIL",
    "REDITUS_SIDECAR_AUDIT_KEY_FILE",
}
FILE_ENV = (
    "VAULT_CACERT",
    "VAULT_CLIENT_CERT",
    "VAULT_CLIENT_KEY",
    "REDITUS_SIDECAR_VAULT_JWT_FILE",
    "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE",
    "REDITUS_SIDECAR_VAULT_TOKEN_FILE",
    "REDITUS_SIDECAR_SECRET_FILE",
    "REDITUS_SIDECAR_AUDIT_KEY_FILE",
)


def tool(name: str) -> str:
    """A tool from PATH, or from the project's .venv/bin and .tools/bin (scripts/setup)."""
    search = os.pathsep.join(
        [os.environ.get("PATH", ""), str(ROOT / ".venv" / "bin"), str(ROOT / ".tools" / "bin")]
    )
    found = shutil.which(name, path=search)
    if found is None:
        pytest.fail(f"{name} not found on PATH nor in .venv/bin or .tools/bin: run scripts/setup")
    return found


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        pytest.fail(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def helm_template(
    *extra: str, chart: Path = CHART, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(tool("helm"), "template", RELEASE, str(chart), "-n", NAMESPACE, *extra, check=check)


def values_args(scenario: str | None) -> list[str]:
    return [] if scenario is None else ["-f", str(CHART / "ci" / scenario)]


@cache
def rendered_text(scenario: str | None) -> str:
    return helm_template(*values_args(scenario)).stdout


def rendered(scenario: str | None) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(rendered_text(scenario)) if doc]


def of_kind(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def pod_spec(docs: list[dict[str, Any]]) -> dict[str, Any]:
    (deployment,) = of_kind(docs, "Deployment")
    return deployment["spec"]["template"]["spec"]


def sidecar_container(spec: dict[str, Any]) -> dict[str, Any]:
    found = [
        c
        for c in spec.get("initContainers", []) + spec["containers"]
        if c["name"] == "reditus-sidecar"
    ]
    assert len(found) == 1, "exactly one reditus-sidecar container per pod"
    return found[0]


def env_of(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


ALL = [None, *SCENARIOS]
ALL_IDS = ["defaults", *SCENARIOS]


def test_every_scenario_of_the_issue_exists() -> None:
    wanted = {"kubernetes-auth", "approle", "jwt", "file-source", "plain-container", "monitoring"}
    assert wanted <= {s.removesuffix("-values.yaml") for s in SCENARIOS}


@pytest.mark.parametrize("scenario", ALL, ids=ALL_IDS)
def test_lint_strict(scenario: str | None) -> None:
    proc = run(tool("helm"), "lint", "--strict", str(CHART), *values_args(scenario))
    assert "0 chart(s) failed" in proc.stdout


@pytest.mark.parametrize("version", ["oldest", "newest"])
def test_kubernetes_schema_validation(version: str, tmp_path: Path) -> None:
    """Every rendered core object is valid for the oldest supported and the newest bundled
    Kubernetes; Prometheus-operator objects are unknown to the validator (checked below)."""
    validator = tool("kubernetes-validate")
    kube = OLDEST_KUBERNETES if version == "oldest" else newest_bundled_kubernetes()
    files = []
    for scenario, name in zip(ALL, ALL_IDS, strict=True):
        docs = [d for d in rendered(scenario) if not d["apiVersion"].startswith(CRD_GROUP)]
        # The helm test pod is validated too (it is an ordinary Pod).
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(docs))
        files.append(str(path))
    proc = run(validator, "--strict", "-k", kube, *files, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "did not validate" not in proc.stdout
    passed = proc.stdout.count(" passed for resource ")
    expected = sum(
        1
        for scenario in ALL
        for d in rendered(scenario)
        if not d["apiVersion"].startswith(CRD_GROUP)
    )
    assert passed == expected, proc.stdout


def newest_bundled_kubernetes() -> str:
    """The newest Kubernetes version whose schemas kubernetes-validate ships."""
    import kubernetes_validate

    schemas = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    versions = [
        tuple(int(x) for x in m.group(1).split("."))
        for p in schemas.iterdir()
        if (m := re.fullmatch(r"v(\d+\.\d+\.\d+)-local-strict", p.name))
    ]
    assert versions, f"no schemas found in {schemas}"
    return ".".join(str(x) for x in max(versions))


def test_native_mode_is_refused_before_kubernetes_1_29_and_plain_mode_validates() -> None:
    proc = helm_template("--kube-version", "1.28.0", check=False)
    assert proc.returncode != 0
    assert "sidecar.mode=native needs Kubernetes >= 1.29" in proc.stderr
    # The plain-container mode is the one for older clusters: it renders and is valid for
    # the oldest schemas the validator ships, where restartable init containers do not exist.
    text = helm_template(
        "--kube-version", "1.25.0", *values_args("plain-container-values.yaml")
    ).stdout
    proc = subprocess.run(
        [tool("kubernetes-validate"), "--strict", "-k", "1.25.0", "-"],
        input=text,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validator_rejects_the_native_shape_on_kubernetes_1_27(tmp_path: Path) -> None:
    """Guards the test above: the validator does know restartPolicy is new on init containers."""
    path = tmp_path / "native.yaml"
    path.write_text(yaml.safe_dump_all(of_kind(rendered(None), "Deployment")))
    proc = run(tool("kubernetes-validate"), "--strict", "-k", "1.27.0", str(path), check=False)
    assert proc.returncode != 0
    assert "restartPolicy" in proc.stdout


@pytest.mark.parametrize("scenario", ALL, ids=ALL_IDS)
def test_sidecar_container_is_hardened(scenario: str | None) -> None:
    docs = rendered(scenario)
    spec = pod_spec(docs)
    sidecar = sidecar_container(spec)
    sc = sidecar["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert isinstance(sc["runAsUser"], int)
    assert sc["runAsUser"] > 0
    assert isinstance(sc["runAsGroup"], int)
    assert sc["runAsGroup"] > 0
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert "add" not in sc["capabilities"]
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sidecar["resources"]["requests"]["memory"]
    assert sidecar["resources"]["limits"]["memory"]
    # The writable /tmp a read-only root filesystem needs is an emptyDir.
    volumes = {v["name"]: v for v in spec["volumes"]}
    (tmp,) = [m for m in sidecar["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]]
    # Pod level: no service links (REDITUS_SIDECAR_* variables of a Service would leak into
    # the sidecar's configuration), no API token, non-root, seccomp.
    assert spec["enableServiceLinks"] is False
    assert spec["automountServiceAccountToken"] is False
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"


@pytest.mark.parametrize("scenario", ALL, ids=ALL_IDS)
def test_signing_listener_is_loopback_only_and_never_exposed(scenario: str | None) -> None:
    docs = rendered(scenario)
    spec = pod_spec(docs)
    sidecar = sidecar_container(spec)
    env = env_of(sidecar)
    app = next(c for c in spec["containers"] if c["name"] == "app")
    if "REDITUS_SIDECAR_ALLOWED_UIDS" in env:
        # The socket's allow-list is on: TCP cannot identify callers, so it is off.
        assert env["REDITUS_SIDECAR_LISTEN"] == "off"
        assert "REDITUS_SIDECAR_URL" not in env_of(app)
        env = {**env, "REDITUS_SIDECAR_LISTEN": "127.0.0.1:8787"}  # the port must stay closed
    host, _, port = env["REDITUS_SIDECAR_LISTEN"].rpartition(":")
    assert host == "127.0.0.1"
    assert env["REDITUS_SIDECAR_METRICS_LISTEN"] == "0.0.0.0:9102"
    assert sidecar["ports"] == [{"name": "ops", "containerPort": 9102, "protocol": "TCP"}]
    for container in spec.get("initContainers", []) + spec["containers"]:
        for p in container.get("ports", []):
            assert p["containerPort"] != int(port), container["name"]
    for service in of_kind(docs, "Service"):
        for p in service["spec"]["ports"]:
            assert p["port"] != int(port)
            assert p.get("targetPort") not in (int(port), str(port))
        if service["metadata"]["name"].endswith("-metrics"):
            assert service["spec"]["ports"] == [
                {"name": "ops", "port": 9102, "targetPort": "ops", "protocol": "TCP"}
            ]
    # The app learns where to ask: the loopback URL, unless only the socket signs.
    if env_of(sidecar)["REDITUS_SIDECAR_LISTEN"] != "off":
        assert env_of(app)["REDITUS_SIDECAR_URL"] == f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("scenario", ALL, ids=ALL_IDS)
def test_probes_use_the_ops_port(scenario: str | None) -> None:
    sidecar = sidecar_container(pod_spec(rendered(scenario)))
    paths = {
        kind: (sidecar[kind]["httpGet"]["path"], sidecar[kind]["httpGet"]["port"])
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
    }
    assert paths == {
        "startupProbe": ("/readyz", "ops"),
        "readinessProbe": ("/readyz", "ops"),
        "livenessProbe": ("/healthz", "ops"),
    }
    startup = sidecar["startupProbe"]
    # The app waits for the startup probe: give Vault time, but poll often.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60
    assert startup["periodSeconds"] <= 2


def test_native_sidecar_shape() -> None:
    spec = pod_spec(rendered(None))
    names = [c["name"] for c in spec["initContainers"]]
    assert names == ["reditus-sidecar"]
    assert spec["initContainers"][0]["restartPolicy"] == "Always"
    assert [c["name"] for c in spec["containers"]] == ["app"]


def test_plain_container_mode() -> None:
    spec = pod_spec(rendered("plain-container-values.yaml"))
    assert "initContainers" not in spec
    assert [c["name"] for c in spec["containers"]] == ["app", "reditus-sidecar"]
    sidecar = sidecar_container(spec)
    assert "restartPolicy" not in sidecar
    digest = "sha256:" + "0123456789abcdef" * 4
    assert sidecar["image"] == f"registry.example.com/platform/reditus-sidecar@{digest}"


def shutdown_delay(*args: str) -> tuple[str | None, int]:
    """REDITUS_SIDECAR_SHUTDOWN_DELAY of the rendered sidecar (None when unset) and the
    pod's terminationGracePeriodSeconds."""
    spec = pod_spec([d for d in yaml.safe_load_all(helm_template(*args).stdout) if d])
    return env_of(sidecar_container(spec)).get("REDITUS_SIDECAR_SHUTDOWN_DELAY"), spec[
        "terminationGracePeriodSeconds"
    ]


@pytest.mark.parametrize("scenario", ALL, ids=ALL_IDS)
def test_shutdown_delay_follows_the_mode_and_fits_the_grace_period(scenario: str | None) -> None:
    """Plain containers get SIGTERM with the app, so the sidecar keeps signing 5 s by
    default; native sidecars are stopped after the app and get no delay. The grace period
    covers the delay plus the sidecar's 10 s drain."""
    spec = pod_spec(rendered(scenario))
    native = "reditus-sidecar" in {c["name"] for c in spec.get("initContainers", [])}
    delay = env_of(sidecar_container(spec)).get("REDITUS_SIDECAR_SHUTDOWN_DELAY")
    assert delay == (None if native else "5")
    assert spec["terminationGracePeriodSeconds"] > int(delay or 0) + 10


def test_plain_container_scenario_has_the_default_shutdown_delay() -> None:
    assert "plain-container-values.yaml" in SCENARIOS
    assert shutdown_delay(*values_args("plain-container-values.yaml")) == ("5", 30)


@pytest.mark.parametrize(
    ("settings", "expected"),
    [
        ([], (None, 30)),
        (["sidecar.shutdownDelay=3"], ("3", 30)),  # explicit: honoured in native mode too
        (["sidecar.shutdownDelay=0"], (None, 30)),
        (["sidecar.mode=container", "sidecar.shutdownDelay=0"], (None, 30)),
        (
            [
                "sidecar.mode=container",
                "sidecar.shutdownDelay=20",
                "deployment.terminationGracePeriodSeconds=34",
            ],
            ("20", 34),
        ),
        # Back to the mode's default, as from a parent chart's values.
        (["sidecar.mode=container", "sidecar.shutdownDelay=null"], ("5", 30)),
    ],
)
def test_explicit_shutdown_delay_wins_over_the_mode_default(
    settings: list[str], expected: tuple[str | None, int]
) -> None:
    assert shutdown_delay(*[a for s in settings for a in ("--set", s)]) == expected


def test_grace_period_check_is_left_to_an_embedding_chart() -> None:
    """With deployment.enabled=false the chart does not own the pod, so a short grace
    period of its own values must not fail the parent's rendering."""
    proc = helm_template(
        "--set",
        "deployment.enabled=false",
        "--set",
        "sidecar.mode=container",
        "--set",
        "deployment.terminationGracePeriodSeconds=5",
    )
    assert "kind: ServiceAccount" in proc.stdout


@pytest.mark.parametrize("scenario", ALL, ids=ALL_IDS)
def test_selectors_use_name_and_instance_only(scenario: str | None) -> None:
    docs = rendered(scenario)
    expected = {"app.kubernetes.io/name": "reditus-sidecar", "app.kubernetes.io/instance": RELEASE}
    selectors: list[tuple[str, dict[str, str]]] = []
    for doc in docs:
        kind, spec = doc["kind"], doc.get("spec", {})
        if kind in ("Deployment", "PodDisruptionBudget", "PodMonitor", "ServiceMonitor"):
            selectors.append((kind, spec["selector"]["matchLabels"]))
        elif kind == "Service":
            selectors.append((kind, spec["selector"]))
        elif kind == "NetworkPolicy":
            selectors.append((kind, spec["podSelector"]["matchLabels"]))
    assert selectors
    for kind, selector in selectors:
        assert not any(k.startswith("helm.sh/") for k in selector), kind
        extra = set(selector) - set(expected)
        # The ServiceMonitor picks the metrics Service among the release's Services.
        assert extra <= ({"app.kubernetes.io/component"} if kind == "ServiceMonitor" else set())
        assert {k: selector[k] for k in expected} == expected, kind
    (deployment,) = of_kind(docs, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert expected.items() <= pod_labels.items()
    # The helm test pod must not be selected by the workload's selectors.
    for pod in of_kind(docs, "Pod"):
        labels = pod["metadata"]["labels"]
        assert not expected.items() <= labels.items()


@pytest.mark.parametrize("scenario", ALL, ids=ALL_IDS)
def test_env_names_are_documented_and_files_are_mounted(scenario: str | None) -> None:
    """Every variable is one the README documents, and every file it names lies inside a
    volume mounted into the sidecar (a wrong mountPath would leave the sidecar without
    credentials only at run time)."""
    spec = pod_spec(rendered(scenario))
    sidecar = sidecar_container(spec)
    names = [e["name"] for e in sidecar["env"]]
    assert len(names) == len(set(names)), "duplicate env vars"
    assert set(names) <= DOCUMENTED_ENV
    env = env_of(sidecar)
    volumes = {v["name"] for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in sidecar["volumeMounts"]}
    assert set(mounts.values()) <= volumes
    for name in FILE_ENV:
        if name in env:
            path = env[name]
            assert any(path.startswith(mp.rstrip("/") + "/") for mp in mounts), (name, path)


def test_kubernetes_auth_wiring() -> None:
    docs = rendered("kubernetes-auth-values.yaml")
    spec = pod_spec(docs)
    env = env_of(sidecar_container(spec))
    assert env["REDITUS_SIDECAR_SECRET_SOURCE"] == "vault"
    assert env["REDITUS_SIDECAR_VAULT_AUTH"] == "kubernetes"
    assert env["REDITUS_SIDECAR_VAULT_ROLE"] == "shop-reditus"
    assert env["VAULT_ADDR"] == "https://vault.vault.svc:8200"
    assert env["VAULT_NAMESPACE"] == "shop"
    assert env["REDITUS_SIDECAR_KV_MOUNT"] == "kv"
    assert env["REDITUS_SIDECAR_KV_PATH"] == "shop/reditus"
    volumes = {v["name"]: v for v in spec["volumes"]}
    projected = volumes["reditus-sidecar-sa-token"]["projected"]["sources"][0]
    assert projected["serviceAccountToken"] == {
        "audience": "https://vault.example.com",
        "expirationSeconds": 1800,
        "path": "token",
    }
    assert env["REDITUS_SIDECAR_VAULT_JWT_FILE"].endswith("/token")
    assert volumes["reditus-sidecar-vault-ca"]["configMap"]["name"] == "vault-ca"
    # The created ServiceAccount is the one the pod runs as (the Vault role binds it).
    (account,) = of_kind(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    # No AppRole or token material in this mode.
    assert not {"REDITUS_SIDECAR_VAULT_SECRET_ID_FILE", "REDITUS_SIDECAR_VAULT_TOKEN_FILE"} & set(
        env
    )


def test_approle_wiring() -> None:
    spec = pod_spec(rendered("approle-values.yaml"))
    env = env_of(sidecar_container(spec))
    assert env["REDITUS_SIDECAR_VAULT_AUTH"] == "approle"
    assert env["REDITUS_SIDECAR_VAULT_AUTH_MOUNT"] == "approle-apps"
    assert env["REDITUS_SIDECAR_VAULT_ROLE_ID"] == "6a1d0c1e-8c1b-4c7e-9d35-0f6b2a7c3e11"
    assert env["VAULT_ADDR"] == {
        "configMapKeyRef": {"name": "vault-connection", "key": "VAULT_ADDR"}
    }
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes["reditus-sidecar-approle"]["secret"]
    assert secret["secretName"] == "reditus-approle"
    assert secret["items"] == [{"key": "secret-id", "path": "secret-id"}]
    assert env["REDITUS_SIDECAR_VAULT_SECRET_ID_FILE"].endswith("/secret-id")
    ca = volumes["reditus-sidecar-vault-ca"]["secret"]
    assert ca["secretName"] == "vault-tls"
    assert ca["items"] == [{"key": "ca.pem", "path": "ca.crt"}]
    assert env["VAULT_CACERT"].endswith("/ca.crt")
    assert "reditus-sidecar-sa-token" not in volumes
    assert "REDITUS_SIDECAR_VAULT_JWT_FILE" not in env


def test_jwt_wiring_with_existing_service_account_and_unix_socket() -> None:
    docs = rendered("jwt-values.yaml")
    spec = pod_spec(docs)
    sidecar = sidecar_container(spec)
    env = env_of(sidecar)
    assert env["REDITUS_SIDECAR_VAULT_AUTH"] == "jwt"
    assert env["REDITUS_SIDECAR_VAULT_AUTH_MOUNT"] == "jwt-k8s"
    assert env["REDITUS_SIDECAR_MAX_STALENESS"] == "600"
    assert of_kind(docs, "ServiceAccount") == []
    assert spec["serviceAccountName"] == "shop"
    # The socket directory is shared by the sidecar and the app; both know the path.
    socket = env["REDITUS_SIDECAR_UNIX_SOCKET"]
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert env_of(app)["REDITUS_SIDECAR_UNIX_SOCKET"] == socket
    socket_dir = socket.rsplit("/", 1)[0]
    for container in (sidecar, app):
        (mount,) = [m for m in container["volumeMounts"] if m["mountPath"] == socket_dir]
        assert mount["name"] == "reditus-sidecar-socket"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "emptyDir" in volumes["reditus-sidecar-socket"]
    # Group access to the 0660 socket comes from the pod's fsGroup.
    assert spec["securityContext"]["fsGroup"] == sidecar["securityContext"]["runAsGroup"]


def test_socket_allow_list_is_the_app_user_and_turns_tcp_off() -> None:
    spec = pod_spec(rendered("jwt-values.yaml"))
    env = env_of(sidecar_container(spec))
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert app["securityContext"]["runAsUser"] == 10001
    assert env["REDITUS_SIDECAR_ALLOWED_UIDS"] == "10001"
    assert "REDITUS_SIDECAR_ALLOWED_GIDS" not in env
    assert env["REDITUS_SIDECAR_LISTEN"] == "off"
    assert set(env_of(app)) == {"REDITUS_SIDECAR_UNIX_SOCKET"}


def test_socket_allow_list_falls_back_to_the_pod_user_and_takes_extra_ids() -> None:
    args = ["--set", "sidecar.unixSocket.enabled=true"]
    docs = [d for d in yaml.safe_load_all(helm_template(*args).stdout) if d]
    assert env_of(sidecar_container(pod_spec(docs)))["REDITUS_SIDECAR_ALLOWED_UIDS"] == "65532"
    args += ["--set", "sidecar.unixSocket.allowedUids={1001,4000000000,1001}"]
    args += ["--set", "sidecar.unixSocket.allowedGids={3000}"]
    docs = [d for d in yaml.safe_load_all(helm_template(*args).stdout) if d]
    env = env_of(sidecar_container(pod_spec(docs)))
    assert env["REDITUS_SIDECAR_ALLOWED_UIDS"] == "65532,1001,4000000000"
    assert env["REDITUS_SIDECAR_ALLOWED_GIDS"] == "3000"


def test_socket_without_allowed_ids_keeps_tcp() -> None:
    args = [
        "--set",
        "sidecar.unixSocket.enabled=true",
        "--set",
        "sidecar.unixSocket.allowAppUser=false",
    ]
    spec = pod_spec([d for d in yaml.safe_load_all(helm_template(*args).stdout) if d])
    env = env_of(sidecar_container(spec))
    assert not {"REDITUS_SIDECAR_ALLOWED_UIDS", "REDITUS_SIDECAR_ALLOWED_GIDS"} & set(env)
    assert env["REDITUS_SIDECAR_LISTEN"] == "127.0.0.1:8787"
    app = next(c for c in spec["containers"] if c["name"] == "app")
    assert env_of(app)["REDITUS_SIDECAR_URL"] == "http://127.0.0.1:8787"


def test_audit_goes_to_stdout_by_default_and_its_key_is_mounted() -> None:
    env = env_of(sidecar_container(pod_spec(rendered(None))))
    assert env["REDITUS_SIDECAR_AUDIT"] == "stdout"
    assert env["REDITUS_SIDECAR_AUDIT_FAIL"] == "open"
    assert "REDITUS_SIDECAR_AUDIT_KEY_FILE" not in env
    args = ["--set", "sidecar.audit.keySecret.name=audit-key", "--set", "sidecar.audit.fail=closed"]
    spec = pod_spec([d for d in yaml.safe_load_all(helm_template(*args).stdout) if d])
    sidecar = sidecar_container(spec)
    env = env_of(sidecar)
    assert env["REDITUS_SIDECAR_AUDIT_FAIL"] == "closed"
    assert env["REDITUS_SIDECAR_AUDIT_KEY_FILE"] == "/var/run/secrets/reditus-sidecar/audit-key/key"
    volumes = {v["name"]: v for v in spec["volumes"]}
    secret = volumes["reditus-sidecar-audit-key"]["secret"]
    assert secret["secretName"] == "audit-key"
    assert secret["items"] == [{"key": "audit-key", "path": "key"}]
    mounts = {m["name"]: m for m in sidecar["volumeMounts"]}
    assert mounts["reditus-sidecar-audit-key"]["readOnly"] is True
    args = ["--set", "sidecar.audit.target=off", "--set", "sidecar.audit.keySecret.name=k"]
    spec = pod_spec([d for d in yaml.safe_load_all(helm_template(*args).stdout) if d])
    env = env_of(sidecar_container(spec))
    assert env["REDITUS_SIDECAR_AUDIT"] == "off"
    assert not {"REDITUS_SIDECAR_AUDIT_FAIL", "REDITUS_SIDECAR_AUDIT_KEY_FILE"} & set(env)
    assert "reditus-sidecar-audit-key" not in {v["name"] for v in spec["volumes"]}


def test_file_source_wiring() -> None:
    spec = pod_spec(rendered("file-source-values.yaml"))
    sidecar = sidecar_container(spec)
    env = env_of(sidecar)
    assert env["REDITUS_SIDECAR_SECRET_SOURCE"] == "file"
    assert env["REDITUS_SIDECAR_SECRET_FILE"] == "/mnt/reditus/reditus.json"
    assert not [n for n in env if n.startswith("VAULT_") or "_VAULT_" in n or "_KV_" in n]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["reditus-secret"]["csi"]["driver"] == "secrets-store.csi.k8s.io"
    assert "reditus-sidecar-sa-token" not in volumes


def test_transit_wiring() -> None:
    spec = pod_spec(rendered("transit-values.yaml"))
    env = env_of(sidecar_container(spec))
    assert env["REDITUS_SIDECAR_SECRET_SOURCE"] == "transit"
    assert env["REDITUS_SIDECAR_TRANSIT_MOUNT"] == "transit-shop"
    assert env["REDITUS_SIDECAR_TRANSIT_KEY"] == "reditus-shop"
    assert env["REDITUS_SIDECAR_PRODUCT_ID"] == "prod-7f3a"
    assert env["VAULT_ADDR"] == "https://vault.vault.svc:8200"
    assert env["REDITUS_SIDECAR_VAULT_AUTH"] == "kubernetes"
    assert env["REDITUS_SIDECAR_VAULT_ROLE"] == "reditus-sidecar-transit"
    assert not [n for n in env if "_KV_" in n or n.endswith(("_SECRET_KEY", "_ID_KEY"))]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "serviceAccountToken" in volumes["reditus-sidecar-sa-token"]["projected"]["sources"][0]
    # KV mode sets no transit variables.
    default_env = env_of(sidecar_container(pod_spec(rendered(None))))
    assert not [n for n in default_env if "TRANSIT" in n or n.endswith("_PRODUCT_ID")]


def test_token_auth_wiring() -> None:
    spec = pod_spec(rendered("plain-container-values.yaml"))
    env = env_of(sidecar_container(spec))
    assert env["REDITUS_SIDECAR_VAULT_AUTH"] == "token"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["reditus-sidecar-vault-token"]["secret"]["secretName"] == "reditus-vault-token"
    assert env["REDITUS_SIDECAR_VAULT_TOKEN_FILE"].endswith("/token")


def test_cert_auth_wiring() -> None:
    """The kubernetes.io/tls Secret is mounted whole (a subPath mount would never see
    cert-manager's renewal) and its two files are the client pair; the CA directory, the
    server name and the revocation value reach the sidecar."""
    spec = pod_spec(rendered("cert-auth-values.yaml"))
    sidecar = sidecar_container(spec)
    env = env_of(sidecar)
    assert env["REDITUS_SIDECAR_VAULT_AUTH"] == "cert"
    assert env["REDITUS_SIDECAR_VAULT_ROLE"] == "shop-reditus"
    assert env["VAULT_TLS_SERVER_NAME"] == "vault.vault.svc"
    assert env["REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN"] == "all"
    volumes = {v["name"]: v for v in spec["volumes"]}
    tls = volumes["reditus-sidecar-vault-tls"]["secret"]
    assert tls["secretName"] == "shop-reditus-vault-client"
    assert [item["path"] for item in tls["items"]] == ["tls.crt", "tls.key"]
    (mount,) = [m for m in sidecar["volumeMounts"] if m["name"] == "reditus-sidecar-vault-tls"]
    assert "subPath" not in mount
    assert env["VAULT_CLIENT_CERT"] == mount["mountPath"] + "/tls.crt"
    assert env["VAULT_CLIENT_KEY"] == mount["mountPath"] + "/tls.key"
    assert volumes["reditus-sidecar-vault-capath"]["configMap"]["name"] == "vault-cas"
    (capath,) = [m for m in sidecar["volumeMounts"] if m["name"] == "reditus-sidecar-vault-capath"]
    assert env["VAULT_CAPATH"] == capath["mountPath"]
    assert "VAULT_CACERT" not in env


def test_revocation_default_and_no_tls_by_default() -> None:
    env = env_of(sidecar_container(pod_spec(rendered(None))))
    assert env["REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN"] == "true"
    assert not {"VAULT_CAPATH", "VAULT_CLIENT_CERT", "VAULT_TLS_SERVER_NAME"} & set(env)


def test_add_ons_are_off_by_default() -> None:
    kinds = sorted(d["kind"] for d in rendered(None))
    assert kinds == ["Deployment", "ServiceAccount"]


def test_monitoring_scenario_add_ons() -> None:
    docs = rendered("monitoring-values.yaml")
    kinds = {d["kind"] for d in docs}
    assert {
        "Service",
        "PodMonitor",
        "PrometheusRule",
        "ConfigMap",
        "NetworkPolicy",
        "PodDisruptionBudget",
        "Pod",
    } <= kinds
    (monitor,) = of_kind(docs, "PodMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "ops"
    assert endpoint["path"] == "/metrics"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    # The PrometheusRule carries exactly the promtool-tested rules of deploy/prometheus.
    (rule,) = of_kind(docs, "PrometheusRule")
    source = yaml.safe_load((ROOT / "deploy/prometheus/reditus-sidecar.rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    # The dashboard ConfigMap carries deploy/grafana's dashboard, labelled for Grafana.
    (dashboard,) = of_kind(docs, "ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["annotations"]["grafana_folder"] == "Reditus"
    data = dashboard["data"]["reditus-sidecar.json"]
    assert json.loads(data) == json.loads(
        (ROOT / "deploy/grafana/reditus-sidecar.json").read_text()
    )
    # NetworkPolicy: only the ops port from Prometheus' namespace and the test pod.
    (policy,) = of_kind(docs, "NetworkPolicy")
    ops_rule = policy["spec"]["ingress"][0]
    assert ops_rule["ports"] == [{"port": "ops", "protocol": "TCP"}]
    (test_pod,) = of_kind(docs, "Pod")
    admitted = ops_rule["from"][0]["podSelector"]["matchLabels"]
    assert admitted.items() <= test_pod["metadata"]["labels"].items()
    assert all(p["port"] != 8787 for r in policy["spec"]["ingress"] for p in r["ports"])
    (pdb,) = of_kind(docs, "PodDisruptionBudget")
    assert pdb["spec"]["minAvailable"] == 2


def test_service_monitor_scenario_renders_the_metrics_service() -> None:
    docs = rendered("servicemonitor-values.yaml")
    (monitor,) = of_kind(docs, "ServiceMonitor")
    (service,) = of_kind(docs, "Service")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"][0]["port"] == service["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"


def test_helm_test_pod_checks_health_and_readiness_on_the_ops_port() -> None:
    docs = rendered("monitoring-values.yaml")
    (pod,) = of_kind(docs, "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = " ".join(pod["spec"]["containers"][0]["command"])
    (service,) = of_kind(docs, "Service")
    base = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    assert base in script
    assert "/healthz" in script
    assert "/readyz" in script
    assert pod["spec"]["restartPolicy"] == "Never"
    assert pod["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] is False


def test_bundled_rules_and_dashboard_are_copies_of_deploy() -> None:
    pairs = [
        ("deploy/prometheus/reditus-sidecar.rules.yaml", "files/reditus-sidecar.rules.yaml"),
        ("deploy/grafana/reditus-sidecar.json", "files/reditus-sidecar.json"),
    ]
    for source, copy in pairs:
        assert (CHART / copy).read_bytes() == (ROOT / source).read_bytes(), (
            f"{copy} differs from {source}: cp {source} helm/reditus-sidecar/{copy}"
        )


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("sidecar.lissten=127.0.0.1:8787", "lissten"),
        ("metrics.podMonitor.enabeld=true", "enabeld"),
        ("sidecar.mode=sidecar", "/sidecar/mode"),
        ("sidecar.vault.auth.method=ldap", "/sidecar/vault/auth/method"),
        ("sidecar.source=consul", "/sidecar/source"),
        ("sidecar.transit.keyy=x", "keyy"),
        ("sidecar.transit.key=a/b", "/sidecar/transit/key"),
        ("sidecar.listen=0.0.0.0:8787", "/sidecar/listen"),
        ("sidecar.opsPort=70000", "/sidecar/opsPort"),
        ("sidecar.shutdownDelay=-1", "/sidecar/shutdownDelay"),
        ("sidecar.shutdownDelay=301", "/sidecar/shutdownDelay"),  # the sidecar's own cap
        ("sidecar.vault.revokeOnShutdown=sometimes", "/sidecar/vault/revokeOnShutdown"),
        ("sidecar.vault.tls.clientCertSecert=x", "clientCertSecert"),
        ("sidecar.unixSocket.allowedUids[0]=-1", "/sidecar/unixSocket/allowedUids/0"),
        ("sidecar.unixSocket.allowedGids[0]=staff", "/sidecar/unixSocket/allowedGids/0"),
        ("sidecar.audit.target=audit.log", "/sidecar/audit/target"),
        ("sidecar.audit.fail=maybe", "/sidecar/audit/fail"),
    ],
)
def test_schema_rejects_typos_bad_enums_and_exposed_listeners(setting: str, message: str) -> None:
    proc = helm_template("--set", setting, check=False)
    assert proc.returncode != 0
    assert "schema" in proc.stderr.lower()
    assert message in proc.stderr


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        (["sidecar.vault.auth.method=approle"], "approle.roleId is required"),
        (
            ["sidecar.vault.auth.method=approle", "sidecar.vault.auth.approle.roleId=r"],
            "secretIdSecret.name",
        ),
        (["sidecar.vault.auth.method=token"], "token.secret.name or"),
        (["sidecar.vault.auth.method=cert"], "needs sidecar.vault.tls.clientCertSecret"),
        (["sidecar.vault.auth.role="], "role is required"),
        (
            ["sidecar.vault.caCert.configMap=a", "sidecar.vault.caCert.secret=b"],
            "only one of",
        ),
        (["sidecar.maxStaleness=10"], "at least sidecar.refreshInterval (30)"),
        (["sidecar.source=transit"], "sidecar.transit.productId (the product id"),
        (
            ["sidecar.unixSocket.enabled=true", "deployment.podSecurityContext.runAsUser=null"],
            "sidecar.unixSocket.allowAppUser needs the app's uid",
        ),
        (
            ["sidecar.mode=container", "deployment.terminationGracePeriodSeconds=15"],
            "deployment.terminationGracePeriodSeconds (15) must be greater than"
            " sidecar.shutdownDelay (5, the default in container mode) + 10 s",
        ),
        (
            ["sidecar.shutdownDelay=25"],
            "terminationGracePeriodSeconds (30) must be greater than sidecar.shutdownDelay (25)",
        ),
        (
            ["sidecar.shutdownDelay=17"],  # 17 + 10 s drain fits in 30; the revocation does not
            "sidecar.shutdownDelay (17) + 10 s (its drain of in-flight signing requests) + 3 s"
            " (revoking its Vault token",
        ),
    ],
)
def test_inconsistent_values_fail_with_a_clear_message(settings: list[str], message: str) -> None:
    args = [a for s in settings for a in ("--set", s)]
    proc = helm_template(*args, check=False)
    assert proc.returncode != 0
    assert message in proc.stderr


def test_the_grace_check_counts_the_revocation_only_when_the_sidecar_revokes() -> None:
    helm_template(
        "--set", "sidecar.shutdownDelay=17", "--set", "sidecar.vault.revokeOnShutdown=false"
    )
    helm_template(
        *values_args("file-source-values.yaml"), "--set", "sidecar.shutdownDelay=17"
    )  # no Vault, nothing to revoke


def notes(*args: str) -> str:
    proc = run(
        tool("helm"), "install", RELEASE, str(CHART), "-n", NAMESPACE, "--dry-run=client", *args
    )
    return proc.stdout.split("NOTES:", 1)[1]


def test_notes_warn_about_inconsistent_values() -> None:
    default = notes()
    assert "app.image is still the placeholder" in default
    assert "sidecar.vault.address is empty" in default
    configured = notes(*values_args("kubernetes-auth-values.yaml"))
    # The NetworkPolicy is opt-in, so its warning is the only one of a configured install.
    assert configured.count("WARNING") == 1
    assert "WARNING: networkPolicy.enabled is false: the ops port 9102" in configured
    assert "WARNING" not in notes(
        *values_args("kubernetes-auth-values.yaml"), "--set", "networkPolicy.enabled=true"
    )
    assert (
        'Vault role "shop-reditus" must allow ServiceAccount "shop-reditus-sidecar"' in configured
    )
    file_without_volume = notes(
        *values_args("kubernetes-auth-values.yaml"), "--set", "sidecar.source=file"
    )
    assert "nothing provides /vault/secrets/reditus.json" in file_without_volume
    insecure = notes(
        *values_args("kubernetes-auth-values.yaml"),
        "--set",
        "sidecar.vault.address=http://vault.vault.svc:8200",
        "--set",
        "sidecar.requireHeader=false",
    )
    assert "plain http to a remote host" in insecure
    assert "requireHeader is false" in insecure
    library = notes("--set", "deployment.enabled=false")
    assert '"reditus-sidecar.container"' in library
    assert "POST http://127.0.0.1:8787/v1/token" not in library
    # The chart's policy cannot protect the parent's pods: say so instead of warning.
    assert "networkPolicy.enabled is false" not in library
    assert "a NetworkPolicy of yours" in library
    monitoring = notes(*values_args("monitoring-values.yaml"))
    assert "install the Prometheus operator's CRDs first" in monitoring
    assert "helm test" in monitoring


def test_notes_say_the_ops_port_is_open_without_the_network_policy() -> None:
    text = " ".join(notes().split())
    assert (
        "networkPolicy.enabled is false: the ops port 9102 (/metrics, /healthz, /readyz)"
        " is reachable from anywhere in the cluster"
    ) in text
    assert "never signing" in text
    assert "set networkPolicy.enabled=true" in text
    assert "networkPolicy.metricsFrom" in text
    assert "reachable from anywhere" not in notes(*values_args("monitoring-values.yaml"))


def test_notes_explain_the_shutdown_delay() -> None:
    plain = " ".join(notes(*values_args("plain-container-values.yaml")).split())
    assert "After SIGTERM the sidecar keeps signing for 5 s (sidecar.shutdownDelay)" in plain
    native = notes()
    assert "shutdownDelay" not in native
    assert "only makes each pod take 7 s longer" in " ".join(
        notes("--set", "sidecar.shutdownDelay=7").split()
    )
    no_delay = notes(
        *values_args("plain-container-values.yaml"), "--set", "sidecar.shutdownDelay=0"
    )
    assert "sidecar.shutdownDelay is 0 in container mode" in no_delay
    library = " ".join(
        notes("--set", "deployment.enabled=false", "--set", "sidecar.mode=container").split()
    )
    assert "terminationGracePeriodSeconds must be greater than 18" in library
    assert "+ 3 s to revoke its Vault token" in library
    no_revoke = " ".join(
        notes(
            "--set",
            "deployment.enabled=false",
            "--set",
            "sidecar.mode=container",
            "--set",
            "sidecar.vault.revokeOnShutdown=false",
        ).split()
    )
    assert "terminationGracePeriodSeconds must be greater than 15" in no_revoke


def test_every_values_key_is_commented() -> None:
    """vault-helm's rule: each key of a chart-owned map has a comment right above it
    (Kubernetes objects given as defaults, like resources, are commented as a whole)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for number, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z_][\w.-]*):", line)
        if not match or line.lstrip().startswith(("#", "-")):
            continue
        indent, key = len(match.group(1)), match.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = [k for _, k in stack]
        stack.append((indent, key))
        if not chart_owned(schema, parent):
            continue
        previous = lines[number - 1].strip() if number else ""
        if not previous.startswith("#"):
            missing.append(".".join([*parent, key]))
    assert not missing, f"values.yaml keys without a comment above them: {missing}"


def chart_owned(schema: dict[str, Any], path: list[str]) -> bool:
    """True when the schema node at `path` is a map of the chart's own keys."""
    node = schema
    for key in path:
        node = resolve(schema, node)
        node = node.get("properties", {}).get(key)
        if node is None:
            return False
    return resolve(schema, node).get("additionalProperties") is False


def resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    if ref:
        return schema["definitions"][ref.rsplit("/", 1)[1]]
    return node


def test_values_schema_accepts_every_ci_scenario_and_describes_keys() -> None:
    """The schema is strict where it should be: every chart-owned map rejects unknown keys,
    and every top-level section has the keys values.yaml sets (no stale schema)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    assert schema["additionalProperties"] is False
    validator = jsonschema.Draft7Validator(schema)
    for scenario in SCENARIOS:
        overrides = yaml.safe_load((CHART / "ci" / scenario).read_text())
        errors = [e.message for e in validator.iter_errors(merge(values, overrides))]
        assert not errors, (scenario, errors)

    def walk(value: Any, node: dict[str, Any], path: str) -> None:
        node = resolve(schema, node)
        if node.get("additionalProperties") is False and isinstance(value, dict):
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is not in the schema"
                walk(child, node["properties"][key], f"{path}.{key}")

    walk(values, schema, "values")


def merge(base: Any, override: Any) -> Any:
    """Helm's value merge: maps merge key by key, anything else is replaced."""
    if isinstance(base, dict) and isinstance(override, dict):
        return {k: merge(base.get(k), v) if k in base else v for k, v in override.items()} | {
            k: v for k, v in base.items() if k not in override
        }
    return override


def test_embedding_the_named_template_in_another_chart(tmp_path: Path) -> None:
    """A user's chart declares this chart as a dependency, turns its Deployment off and
    includes the sidecar container and volumes in its own pod (README's example)."""
    parent = tmp_path / "shop"
    (parent / "templates").mkdir(parents=True)
    shutil.copytree(CHART, parent / "charts" / "reditus-sidecar")
    readme = (CHART / "README.md").read_text()
    blocks = re.findall(r"```yaml\n(.*?)```", readme, re.S)
    chart_yaml = next(b for b in blocks if b.startswith("# shop/Chart.yaml"))
    values_yaml = next(b for b in blocks if b.startswith("# shop/values.yaml"))
    deployment = next(b for b in blocks if b.startswith("# shop/templates/deployment.yaml"))
    (parent / "Chart.yaml").write_text(chart_yaml)
    (parent / "values.yaml").write_text(values_yaml)
    (parent / "templates" / "deployment.yaml").write_text(deployment)
    proc = run(tool("helm"), "template", "shop", str(parent), "-n", NAMESPACE)
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    deployments = of_kind(docs, "Deployment")
    assert [d["metadata"]["name"] for d in deployments] == ["shop"]
    spec = deployments[0]["spec"]["template"]["spec"]
    sidecar = sidecar_container(spec)
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar in spec["initContainers"]
    # The subchart's own defaults and metadata apply: image tag = its appVersion.
    app_version = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
    assert sidecar["image"].endswith(f":{app_version}")
    env = env_of(sidecar)
    assert env["REDITUS_SIDECAR_LISTEN"] == "127.0.0.1:8787"
    assert env["VAULT_ADDR"] == "https://vault.shop.example:8200"
    mounts = {m["name"] for m in sidecar["volumeMounts"]}
    assert mounts <= {v["name"] for v in spec["volumes"]}
    (account,) = of_kind(docs, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    app = next(c for c in spec["containers"] if c["name"] == "shop")
    assert env_of(app)["REDITUS_SIDECAR_URL"] == "http://127.0.0.1:8787"
    path = tmp_path / "embedded.yaml"
    path.write_text(proc.stdout)
    check = run(tool("kubernetes-validate"), "--strict", "-k", OLDEST_KUBERNETES, str(path))
    assert "did not validate" not in check.stdout
