"""The Python package: what `python -m build` makes, and that the wheel runs on its own.

Built once per module, with `python -m build --no-isolation` (the test venv's setuptools, so
no download of the backend; the release workflow builds isolated), from a copy of the files
git tracks or would track: an in-place build rewrites the source tree's egg-info, which the
tests' own processes read their version from, and setuptools reads a stale egg-info's file
list back into the sdist, so only a clean tree builds what CI and the release job build.
Files that never belong in a distribution (a venv, node_modules, caches) are planted in the
copy to show they stay out.

- `twine check --strict` and `check-wheel-contents` are clean, and each fails on a broken wheel;
- the wheel's metadata: name, version, PEP 639 license, Python, extras, project URLs,
  classifiers (valid trove classifiers), the description (README.md then CHANGELOG.md);
- the wheel holds the `sidecar` package (every file git has under sidecar/) and its
  dist-info, nothing else; the sdist holds what builds it (`python -m build` makes the wheel
  from the sdist) and none of the planted files;
- the wheel installed with its dependencies into a fresh venv, run from outside the source
  tree without PYTHONPATH: `import sidecar` is the venv's copy, `reditus-sidecar --version`
  prints the version, and `reditus-sidecar serve` on a secret file becomes ready, signs an
  HS512 token with that secret and exits 0 on SIGTERM.

The build and the install time are printed (`pytest -s`), never asserted.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import jwt
import pytest
import trove_classifiers
from packaging.metadata import Metadata
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

import sidecar
from tests.support import ROOT, free_port, post_token, signed_with, wait_http, write_secret

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(600)]

NAME = "reditus-sidecar"
DIST_NAME = "reditus_sidecar"  # the file-name form of NAME (PEP 625, wheel file names)
# Never in a distribution: planted in the copy the build runs on.
PLANTED = (
    ".venv/lib/python3.11/site-packages/planted.py",
    "node_modules/planted/index.js",
    "tests/jose/node_modules/planted/index.js",
    ".cache/planted",
    ".tools/bin/planted",
    ".pytest_cache/planted",
    "sidecar/__pycache__/planted.cpython-311.pyc",
    "dist/planted-0.0.0-py3-none-any.whl",
)
LOCAL_PARTS = {
    ".venv",
    "node_modules",
    ".cache",
    ".tools",
    ".git",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    ".hypothesis",
    "dist",
    "build",
}


def run(
    args: list[str | Path], *, cwd: Path, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def source_files() -> list[str]:
    """The files git tracks, or would track, in the work tree (that exist)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
        timeout=60,
    ).stdout.decode()
    return sorted(name for name in set(listed.split("\0")) if name and (ROOT / name).is_file())


def repository_url(root: Path) -> str:
    """The project's GitHub URL, as CHANGELOG.md's release links spell it."""
    found = re.search(
        r"^\[Unreleased\]: (https://github\.com/[\w.-]+/[\w.-]+)/compare/",
        (root / "CHANGELOG.md").read_text(),
        re.MULTILINE,
    )
    assert found, "CHANGELOG.md has no [Unreleased] compare link"
    return found.group(1)


@dataclass(frozen=True)
class Dists:
    source: Path  # the copy built from (the work tree may change while the tests run)
    wheel: Path
    sdist: Path
    package_files: frozenset[str]  # what git has under sidecar/, as wheel paths
    seconds: float


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> Dists:
    src = tmp_path_factory.mktemp("source")
    files = []
    for name in source_files():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):  # removed by someone since the listing
            shutil.copy2(ROOT / name, src / name)
            files.append(name)
    for name in PLANTED:
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text("planted: must not be in a distribution\n")
    out = tmp_path_factory.mktemp("dist")
    start = time.monotonic()
    proc = run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, src], cwd=src)
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\npython -m build --no-isolation (sdist, then the wheel from it): {seconds:.1f} s")
    built = sorted(p.name for p in out.iterdir())
    version = sidecar.__version__
    assert built == [f"{DIST_NAME}-{version}-py3-none-any.whl", f"{DIST_NAME}-{version}.tar.gz"]
    return Dists(
        source=src,
        wheel=out / built[0],
        sdist=out / built[1],
        package_files=frozenset(n for n in files if n.startswith("sidecar/")),
        seconds=seconds,
    )


def wheel_metadata(wheel: Path) -> tuple[str, Metadata]:
    with zipfile.ZipFile(wheel) as zf:
        text = zf.read(f"{DIST_NAME}-{sidecar.__version__}.dist-info/METADATA").decode()
    return text, Metadata.from_email(text, validate=True)


def sdist_metadata(sdist: Path) -> Metadata:
    with tarfile.open(sdist) as tf:
        member = tf.extractfile(f"{DIST_NAME}-{sidecar.__version__}/PKG-INFO")
        assert member is not None
        return Metadata.from_email(member.read().decode(), validate=True)


# --- the tools ----------------------------------------------------------------------------


def twine_check(*paths: Path) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", "twine", "--no-color", "check", "--strict", *paths], cwd=ROOT)


def check_wheel_contents(wheel: Path, pyproject: Path) -> subprocess.CompletedProcess[str]:
    # With pyproject's [tool.check-wheel-contents] (toplevel = sidecar).
    return run(
        [sys.executable, "-m", "check_wheel_contents", "--config", pyproject, wheel],
        cwd=wheel.parent,
    )


def test_twine_check_strict_is_clean(dists: Dists) -> None:
    proc = twine_check(dists.wheel, dists.sdist)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("PASSED") == 2, proc.stdout


def test_check_wheel_contents_is_clean(dists: Dists) -> None:
    proc = check_wheel_contents(dists.wheel, dists.source / "pyproject.toml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip().endswith(": OK"), proc.stdout


def rewritten(wheel: Path, dest: Path, change: dict[str, str]) -> Path:
    """A copy of `wheel` with members replaced or added, and its RECORD saying so (the
    tools read the file list from RECORD)."""
    info = f"{DIST_NAME}-{sidecar.__version__}.dist-info"
    copy = dest / wheel.name
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(copy, "w") as out:
        record = [
            row
            for row in src.read(f"{info}/RECORD").decode().splitlines()
            if row.split(",")[0] not in change
        ]
        for name, text in change.items():
            digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest())
            record.append(f"{name},sha256={digest.rstrip(b'=').decode()},{len(text.encode())}")
        for item in src.infolist():
            if item.filename not in change and item.filename != f"{info}/RECORD":
                out.writestr(item, src.read(item))
        for name, text in change.items():
            out.writestr(name, text)
        out.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return copy


def test_twine_check_fails_without_the_description_content_type(
    dists: Dists, tmp_path: Path
) -> None:
    """README.md read as reStructuredText (the default without a content type) is refused."""
    text, _ = wheel_metadata(dists.wheel)
    name = f"{DIST_NAME}-{sidecar.__version__}.dist-info/METADATA"
    assert "Description-Content-Type: text/markdown\n" in text
    broken = rewritten(
        dists.wheel, tmp_path, {name: text.replace("Description-Content-Type: text/markdown\n", "")}
    )
    proc = twine_check(broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "`long_description_content_type` missing" in proc.stdout


def test_check_wheel_contents_fails_on_a_stray_top_level_package(
    dists: Dists, tmp_path: Path
) -> None:
    broken = rewritten(dists.wheel, tmp_path, {"tests/__init__.py": ""})
    proc = check_wheel_contents(broken, dists.source / "pyproject.toml")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "W005" in proc.stdout  # a common top-level name (tests)
    assert "W202" in proc.stdout  # not in pyproject's [tool.check-wheel-contents] toplevel


# --- metadata ---------------------------------------------------------------------------


def test_wheel_metadata(dists: Dists) -> None:
    _, meta = wheel_metadata(dists.wheel)
    project = tomllib.loads((dists.source / "pyproject.toml").read_text())["project"]
    assert meta.name == NAME
    assert str(meta.version) == sidecar.__version__ == project["version"]
    assert meta.summary == project["description"]
    # PEP 639: an SPDX expression and the license file, no legacy License field or classifier.
    assert meta.metadata_version == "2.4"
    assert meta.license_expression == "Apache-2.0"
    assert meta.license_files == ["LICENSE"]
    assert meta.license is None
    assert meta.requires_python == SpecifierSet(">=3.11")
    # Runtime dependencies are pyproject's, unconditional; every other one is behind an extra.
    requires = [Requirement(str(r)) for r in meta.requires_dist or []]
    runtime = {str(r) for r in requires if r.marker is None}
    assert runtime == {str(Requirement(d)) for d in project["dependencies"]}
    extras = {str(e) for e in meta.provides_extra or []}
    assert extras == set(project["optional-dependencies"])
    assert "speed" in extras
    speed = {
        r.name: str(r.specifier)
        for r in requires
        if r.marker is not None and r.marker.evaluate({"extra": "speed"})
    }
    assert speed == {"uvloop": ">=0.19"}
    repo = repository_url(dists.source)
    assert meta.project_urls == {
        "Homepage": repo,
        "Documentation": f"{repo}#readme",
        "Source": repo,
        "Issues": f"{repo}/issues",
        "Changelog": f"{repo}/blob/main/CHANGELOG.md",
    }
    classifiers = set(meta.classifiers or [])
    pythons = {
        c for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)
    }
    assert pythons == {f"Programming Language :: Python :: 3.{minor}" for minor in (11, 12, 13)}
    assert classifiers >= {
        "Operating System :: POSIX :: Linux",
        "Framework :: aiohttp",
        "Topic :: Security",
        "Typing :: Typed",
    }
    # PyPI refuses an upload naming a classifier it does not know.
    assert classifiers <= trove_classifiers.classifiers, classifiers - trove_classifiers.classifiers
    assert not any(c.startswith("License ::") for c in classifiers), (
        "PEP 639: no license classifier"
    )
    # Each Python classifier is allowed by Requires-Python.
    assert meta.requires_python is not None
    for c in pythons:
        assert meta.requires_python.contains(c.rsplit(" ", 1)[1] + ".0"), c
    assert set(meta.keywords or []) >= {"reditus", "jwt", "vault", "openbao", "sidecar"}
    # The long description: README.md, then CHANGELOG.md, as Markdown.
    assert meta.description_content_type == "text/markdown"
    description = meta.description or ""
    readme = (dists.source / "README.md").read_text()
    changelog = (dists.source / "CHANGELOG.md").read_text()
    assert description.startswith(readme.rstrip("\n"))
    assert changelog.strip() in description


def test_sdist_metadata_is_the_wheels(dists: Dists) -> None:
    _, wheel = wheel_metadata(dists.wheel)
    sdist = sdist_metadata(dists.sdist)
    for field in (
        "name",
        "version",
        "license_expression",
        "license_files",
        "requires_python",
        "requires_dist",
        "provides_extra",
        "project_urls",
        "classifiers",
        "keywords",
        "description",
    ):
        assert getattr(sdist, field) == getattr(wheel, field), field


# --- contents ---------------------------------------------------------------------------


def test_wheel_holds_the_sidecar_package_and_nothing_else(dists: Dists) -> None:
    info = f"{DIST_NAME}-{sidecar.__version__}.dist-info"
    with zipfile.ZipFile(dists.wheel) as zf:
        names = set(zf.namelist())
        license_text = zf.read(f"{info}/licenses/LICENSE").decode()
        top_level = zf.read(f"{info}/top_level.txt").decode().split()
        entry_points = zf.read(f"{info}/entry_points.txt").decode()
    assert "sidecar/py.typed" in dists.package_files, "the Typing :: Typed marker (PEP 561)"
    assert "sidecar/__init__.py" in dists.package_files
    dist_info = {
        f"{info}/{n}"
        for n in (
            "METADATA",
            "WHEEL",
            "RECORD",
            "entry_points.txt",
            "top_level.txt",
            "licenses/LICENSE",
        )
    }
    assert names - dist_info == dists.package_files, (
        "the wheel holds every file git has under sidecar/, only those"
    )
    assert names >= dist_info
    assert license_text == (dists.source / "LICENSE").read_text()
    assert top_level == ["sidecar"]
    assert "reditus-sidecar = sidecar.__main__:main" in entry_points


def test_sdist_holds_what_builds_it_and_nothing_local(dists: Dists) -> None:
    prefix = f"{DIST_NAME}-{sidecar.__version__}/"
    with tarfile.open(dists.sdist) as tf:
        members = tf.getmembers()
    assert all(m.name == prefix.rstrip("/") or m.name.startswith(prefix) for m in members)
    names = {m.name.removeprefix(prefix) for m in members if m.isfile()}
    assert names >= {"pyproject.toml", "PKG-INFO", "README.md", "LICENSE", "CHANGELOG.md"}
    assert names >= dists.package_files
    for name in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md"):
        with tarfile.open(dists.sdist) as tf:
            member = tf.extractfile(prefix + name)
            assert member is not None
            assert member.read() == (dists.source / name).read_bytes(), name
    local = sorted(n for n in names if LOCAL_PARTS & set(Path(n).parts) or n.endswith(".pyc"))
    assert local == [], "files of this machine in the sdist"
    assert not [n for n in names if "planted" in n]
    assert not [n for n in names if n.startswith("tests/")], "a partial test suite"


# --- installed into a fresh venv -------------------------------------------------------


@dataclass(frozen=True)
class Installed:
    home: Path  # the working directory: outside the source tree
    python: Path
    bin: Path
    env: dict[str, str]
    seconds: float


def clean_env() -> dict[str, str]:
    """This process's environment without anything that points Python or the sidecar
    somewhere: no PYTHONPATH, no venv, no REDITUS_/VAULT_/BAO_ variables."""
    drop = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH", "VIRTUAL_ENV"}
    return {
        k: v
        for k, v in os.environ.items()
        if k not in drop and not k.startswith(("REDITUS_", "VAULT_", "BAO_"))
    }


def pins_of_this_venv() -> str:
    """The versions the suite runs with, as pip constraints: the fresh venv gets the same
    dependency versions (and pip finds them where it found them for this venv)."""
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name and canonicalize_name(name) != NAME:
            pins.setdefault(canonicalize_name(name), f"{name}=={dist.version}")
    return "\n".join(sorted(pins.values())) + "\n"


@pytest.fixture(scope="module")
def installed(dists: Dists, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """The wheel with its dependencies in a new venv that has no pip of its own: this venv's
    pip installs into it (`pip --python`), from the same index, local wheels and caches it
    uses, pinned to this venv's versions."""
    home = tmp_path_factory.mktemp("fresh")
    assert not home.resolve().is_relative_to(ROOT)
    venv = home / "venv"
    constraints = home / "constraints.txt"
    constraints.write_text(pins_of_this_venv())
    env = clean_env()
    start = time.monotonic()
    made = run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=home, env=env)
    assert made.returncode == 0, made.stderr
    python = venv / "bin" / "python"
    proc = run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            python,
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--constraint",
            constraints,
            dists.wheel,
        ],
        cwd=home,
        env=env,
        timeout=540,
    )
    seconds = time.monotonic() - start
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    print(f"\nfresh venv + pip install of the wheel with its dependencies: {seconds:.1f} s")
    return Installed(home=home, python=python, bin=venv / "bin", env=env, seconds=seconds)


def test_the_installed_package_is_the_venvs_own(installed: Installed) -> None:
    probe = (
        "import importlib.util, json, sidecar, sys, sysconfig; "
        "print(json.dumps({'file': sidecar.__file__, 'version': sidecar.__version__, "
        "'purelib': sysconfig.get_path('purelib'), 'prefix': sys.prefix, "
        "'absent': [m for m in ('pytest', 'jwt', 'uvloop', 'pip') if importlib.util.find_spec(m)]}))"
    )
    proc = run([installed.python, "-c", probe], cwd=installed.home, env=installed.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    assert Path(found["prefix"]) == installed.python.parent.parent
    purelib = Path(found["purelib"])
    assert purelib.is_relative_to(installed.python.parent.parent)
    assert Path(found["file"]) == purelib / "sidecar" / "__init__.py"
    assert not Path(found["file"]).resolve().is_relative_to(ROOT)
    assert found["version"] == sidecar.__version__
    # Runtime only: no test tools, no optional extra, and (made --without-pip) no installer.
    assert found["absent"] == []
    # Every dependency the wheel declares is there, at a version it allows.
    check = run(
        [sys.executable, "-m", "pip", "--python", installed.python, "check"],
        cwd=installed.home,
        env=installed.env,
        timeout=120,
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_the_console_script_prints_the_version(installed: Installed) -> None:
    proc = run(
        [installed.bin / "reditus-sidecar", "--version"],
        cwd=installed.home,
        env=installed.env,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [NAME, sidecar.__version__]


def test_the_installed_sidecar_serves_signs_and_stops(installed: Installed, tmp_path: Path) -> None:
    secret = "package-test-" + secrets.token_hex(32)
    secret_file = tmp_path / "reditus-secret.json"
    write_secret(secret_file, product_id="prod-package", secret=secret)
    api_port, metrics_port = free_port(), free_port()
    env = {
        **installed.env,
        "REDITUS_SIDECAR_SECRET_SOURCE": "file",
        "REDITUS_SIDECAR_SECRET_FILE": str(secret_file),
        "REDITUS_SIDECAR_LISTEN": f"127.0.0.1:{api_port}",
        "REDITUS_SIDECAR_METRICS_LISTEN": f"127.0.0.1:{metrics_port}",
    }
    log = tmp_path / "sidecar.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [installed.bin / "reditus-sidecar", "serve"],
            cwd=installed.home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        try:
            wait_http(f"http://127.0.0.1:{metrics_port}/readyz", timeout=30, proc=proc, want=200)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text()}") from None
        status, body = post_token(f"http://127.0.0.1:{api_port}", {"userId": "u-1"})
        assert status == 200, body
        token = str(body["token"])
        assert signed_with(token, secret)
        assert not signed_with(token, secret + "-other")
        claims = jwt.decode(token, secret, algorithms=["HS512"])
        assert (claims["ProductId"], claims["UserId"]) == ("prod-package", "u-1")
        assert body["productId"] == "prod-package"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
