"""The container build file: hadolint, its shape, and its install steps for real.

No image can be built here (no container engine, no base images), so the build stage's
RUN steps are performed in a clean temporary virtualenv, on a build context holding only
what the Dockerfile COPYs and .dockerignore admits.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
VENV_IN_IMAGE = "/opt/reditus-sidecar"


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [arg for kw, arg in self.instructions if kw == keyword]


def parse_dockerfile(text: str) -> tuple[dict[str, str], list[Stage]]:
    """Instructions per stage, with continuation lines joined and comments dropped."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    args: dict[str, str] = {}
    stages: list[Stage] = []
    for line in logical:
        keyword, _, rest = line.partition(" ")
        keyword = keyword.upper()
        rest = rest.strip()
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            base = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], words[0])
            stages.append(Stage(base=base, name=name))
        elif keyword == "ARG" and not stages:
            key, _, value = rest.partition("=")
            args[key] = value
        else:
            stages[-1].instructions.append((keyword, rest))
    return args, stages


def tool(name: str) -> str:
    search = os.pathsep.join([os.environ.get("PATH", ""), str(ROOT / ".venv" / "bin")])
    found = shutil.which(name, path=search)
    if found is None:
        pytest.fail(f"{name} not found on PATH nor in .venv/bin: run scripts/setup")
    return found


def dockerignore_admits(patterns: list[str], path: str) -> bool:
    """Docker's rule: the last matching pattern wins; '!' re-includes; a pattern matching a
    parent directory covers what is inside it."""
    admitted = True
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.rstrip("/")
        matched = any(
            fnmatch.fnmatch(prefix, pat)
            or (pat.startswith("**/") and fnmatch.fnmatch(prefix.split("/")[-1], pat[3:]))
            for prefix in prefixes
        )
        if matched:
            admitted = negate
    return admitted


def dockerignore() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def test_hadolint_clean() -> None:
    proc = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == ""


def test_hadolint_does_flag_a_bad_dockerfile(tmp_path: Path) -> None:
    """Guards the test above: the binary really lints (root user, unpinned apt, no USER)."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install -y curl\n")
    proc = subprocess.run(
        [tool("hadolint"), str(bad)], capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode != 0
    assert "DL3007" in proc.stdout  # the :latest tag


def test_dockerfile_shape() -> None:
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    assert len(stages) >= 2, "multi-stage"
    build, final = stages[0], stages[-1]
    assert build.name
    assert "slim" in final.base
    assert build.base == final.base, "the venv's interpreter path must exist in the final stage"
    # Only the built virtualenv reaches the final stage: no sources, no pip.
    copies = final.all("COPY")
    assert copies
    assert all(c.startswith(f"--from={build.name} ") for c in copies), copies
    assert not final.all("RUN")
    assert not final.all("ADD")
    (user,) = final.all("USER")
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) > 0
    assert gid.isdigit()
    assert int(gid) > 0
    assert final.all("ENTRYPOINT") == ['["reditus-sidecar"]']
    assert final.all("CMD") == ['["serve"]']
    exposed = {p for line in final.all("EXPOSE") for p in line.split()}
    assert exposed == {"9102"}, "only the ops port; signing stays on loopback"


def test_dockerignore_admits_what_the_build_copies_and_nothing_else() -> None:
    patterns = dockerignore()
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    sources = []
    for copy in stages[0].all("COPY"):
        words = copy.split()
        sources += [w for w in words[:-1] if not w.startswith("--")]
    assert "sidecar" in sources
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: no such file in the repository"
        assert dockerignore_admits(patterns, source), f".dockerignore excludes {source}"
    assert dockerignore_admits(patterns, "sidecar/__main__.py")
    for excluded in (".git/HEAD", ".venv/bin/python", "tests/test_helm.py", "helm/x", ".tools/x"):
        assert not dockerignore_admits(patterns, excluded), excluded
    assert not dockerignore_admits(patterns, "sidecar/__pycache__/api.cpython-311.pyc")


@pytest.mark.slow
def test_build_stage_install_steps_in_a_clean_venv(tmp_path: Path) -> None:
    """Perform the build stage's RUN steps (venv, pip install of the package, the smoke
    check) with the image's venv path redirected into tmp_path, on a context made only of
    the COPYed files; then the installed entrypoint must run outside the repository."""
    _, stages = parse_dockerfile(DOCKERFILE.read_text())
    build = stages[0]
    patterns = dockerignore()
    context = tmp_path / "src"
    context.mkdir()
    venv = tmp_path / "opt" / "reditus-sidecar"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "VIRTUAL_ENV"))}
    env["PATH"] = os.pathsep.join([str(Path(sys._base_executable).parent), "/usr/bin", "/bin"])
    python = Path(sys._base_executable)
    for keyword, arg in build.instructions:
        if keyword == "ENV":
            for item in shlex.split(arg):
                key, _, value = item.partition("=")
                env[key] = value
        elif keyword == "COPY":
            words = arg.split()
            for source in words[:-1]:
                src = ROOT / source
                if src.is_dir():
                    shutil.copytree(
                        src,
                        context / source,
                        ignore=lambda d, names: [
                            n
                            for n in names
                            if not dockerignore_admits(
                                patterns, str((Path(d) / n).relative_to(ROOT))
                            )
                        ],
                    )
                else:
                    shutil.copy2(src, context / src.name)
        elif keyword == "RUN":
            command = arg.replace(VENV_IN_IMAGE, str(venv))
            # The image's "python" is its base interpreter; here it is ours.
            command = re.sub(r"^python ", f"{shlex.quote(str(python))} ", command)
            proc = subprocess.run(
                ["bash", "-ec", command],
                cwd=context,
                env=env,
                capture_output=True,
                text=True,
                timeout=240,
                check=False,
            )
            assert proc.returncode == 0, f"RUN {command}\n{proc.stdout[-3000:]}\n{proc.stderr}"
    entrypoint = venv / "bin" / "reditus-sidecar"
    assert entrypoint.exists()
    proc = subprocess.run(
        [str(entrypoint), "--help"],
        cwd=tmp_path,
        env={"PATH": f"{venv / 'bin'}:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for command in ("serve", "sign", "check"):
        assert command in proc.stdout
    # The package came from the context, not from the repository checkout.
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sidecar; print(sidecar.__file__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(venv)), where
    # Runtime only: no test tooling in the image's virtualenv.
    installed = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.lower()
    assert "aiohttp==" in installed
    assert "hvac==" in installed
    assert "pytest" not in installed
    assert "openbao" not in installed
