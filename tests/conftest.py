"""Shared fixtures, and the line between unit and integration tests.

Every test gets a fresh metrics registry; nothing global leaks.

Unit and integration
--------------------
A test is *integration* when it starts or talks to another process: OpenBao, the sidecar
run as `python -m sidecar`, node (the reference `jose` signer), podman, helm, chromium, any
command. Every other test is a *unit* test: it runs inside the pytest process (in-process
aiohttp apps, and servers the test runs itself on loopback, included) and takes
milliseconds. `pytest -m "not integration"` runs the unit tests alone.

A test is marked `integration`
1. by its module's `pytestmark` when all the file's tests are integration, or all but a few
   (at most four) quick in-process checks, which then run with them;
2. by `@pytest.mark.integration` on the test elsewhere;
3. automatically, when it uses (itself or through another fixture) one of PROCESS_FIXTURES:
   `openbao`, `bao`, `sidecar`, `jose`.
A test without the marker that starts a process fails and says so (`_no_processes`), so the
unit tier never waits on one.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Generator, Iterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from tests.support import FakeClock, JoseSigner, SidecarProcess, start_sidecar

# --- unit and integration ---

# Fixtures that start a process (or use one that does): a test using one is integration.
PROCESS_FIXTURES = frozenset({"openbao", "bao", "sidecar", "jose"})


@pytest.hookimpl(tryfirst=True)  # before `-m` selects on the markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if PROCESS_FIXTURES.intersection(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def _refuse_process(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
    raise AssertionError(
        f"a test not marked `integration` started a process ({args!r}): mark it, as "
        "tests/conftest.py says"
    )


@contextlib.contextmanager
def _no_processes(item: pytest.Item) -> Iterator[None]:
    """While a unit test sets up and runs (its module and session fixtures included),
    starting a process fails it."""
    if item.get_closest_marker("integration") is not None:
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(subprocess.Popen, "__init__", _refuse_process)
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Generator[None, None, None]:
    with _no_processes(item):
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, None, None]:
    with _no_processes(item):
        return (yield)


# --- in process ---


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def clock() -> FakeClock:
    """A monotonic clock at 100 s that moves only when the test moves it (`clock.now`).
    A file whose code reads a module's `time` overrides this fixture with one that
    requests it and patches that module (tests/test_vault_session.py)."""
    return FakeClock()


# --- processes: the reference signer and the sidecar ---


@pytest.fixture(scope="module")
def jose() -> Iterator[JoseSigner]:
    """The Reditus guide's `jose` code (node, tests/jose), one process per test module."""
    signer = JoseSigner()
    yield signer
    signer.close()


@pytest.fixture(scope="module")
def sidecar(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[SidecarProcess]:
    """One `python -m sidecar serve` per test module, on a file secret refreshed every
    second (`tests.support.start_sidecar`), stopped after the module's tests. Variables for
    it, as a dict, by indirect parametrisation (one process per distinct dict):
    `@pytest.mark.parametrize("sidecar", [{"REDITUS_SIDECAR_TOKEN_TTL": "600"}], indirect=True)`.
    A test that stops, signals or floods its sidecar starts its own instead:
    `with start_sidecar(tmp_path, **env) as sidecar:`."""
    env: dict[str, Any] = getattr(request, "param", {})  # REDITUS_* names, not `wait` & co.
    with start_sidecar(tmp_path_factory.mktemp("sidecar"), **env) as process:
        yield process


# --- OpenBao ---
# `openbao`: one real OpenBao dev server per test session (per xdist worker; started on a free
# loopback port, stopped by PID); tests stay independent through their own KV paths, policies
# and roles. `bao`: a server of the test module's own, for what must not share one.

from sidecar.devserver import OpenBaoDevServer  # noqa: E402
from sidecar.metrics import Metrics  # noqa: E402
from tests.openbao import (  # noqa: E402
    Bao,
    make_ca,
    make_server_cert,
    public_pem,
    rsa_key,
    tls_listener,
    token_reviewer,
    unique,
)


@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bao]:
    """A dev server that also listens with TLS (a test CA) on a second port."""
    tls_dir = tmp_path_factory.mktemp("openbao-tls")
    _, ca_key, ca_cert = make_ca(tls_dir, "test-ca")
    cert, key = make_server_cert(tls_dir, ca_key, ca_cert)
    hcl, tls_port = tls_listener(cert, key)
    server = OpenBaoDevServer(extra_config=hcl)
    with server:
        yield Bao(server, tls_addr=f"https://127.0.0.1:{tls_port}", ca_file=tls_dir / "test-ca.pem")


@pytest.fixture(scope="module")
def bao() -> Iterator[Bao]:
    """A dev server of this test module's own (plain HTTP): its tokens are only this
    module's to count, its engines this module's to enable (a module overrides `bao` with a
    fixture that requests it and enables one), its default KV path `reditus` free."""
    with OpenBaoDevServer() as server:
        yield Bao(server)


@pytest.fixture
def kv_path(openbao: Bao) -> str:
    """A fresh KV v2 path holding a valid secret (version 1)."""
    path = unique("reditus")
    openbao.put(path, product_id="prod-1", product_secret="secret-one-" + "x" * 64)
    return path


@pytest.fixture
def vault_metrics(registry: CollectorRegistry) -> Metrics:
    return Metrics(registry, ["default"], "test")


@pytest.fixture(scope="session")
def jwt_auth(openbao: Bao) -> tuple[str, object]:
    """The `jwt` auth method validating tokens against a key this session generated."""
    key = rsa_key()
    mount = openbao.ensure_auth("jwt")
    openbao.root().write_data(
        f"auth/{mount}/config",
        data={"jwt_validation_pubkeys": [public_pem(key)], "bound_issuer": ""},
    )
    return mount, key


@pytest.fixture(scope="session")
def k8s_auth(openbao: Bao) -> Iterator[tuple[str, object]]:
    """The `kubernetes` auth method, its API server played by a TokenReview responder."""
    with token_reviewer() as reviewer:
        mount = openbao.ensure_auth("kubernetes")
        openbao.root().write_data(
            f"auth/{mount}/config",
            data={
                "kubernetes_host": reviewer.url,
                "disable_local_ca_jwt": True,
                # required with disable_local_ca_jwt; unused, the responder speaks plain HTTP
                "kubernetes_ca_cert": openbao.ca_file.read_text() if openbao.ca_file else "",
            },
        )
        yield mount, reviewer


class LeakGuard:
    """Collects every credential a test handles; none may appear in a log record."""

    def __init__(self) -> None:
        self.values: set[str] = set()

    def add(self, *values: str) -> None:
        self.values.update(v for v in values if v)


@pytest.fixture
def leak_guard(caplog: pytest.LogCaptureFixture) -> Iterator[LeakGuard]:
    caplog.set_level("DEBUG")
    guard = LeakGuard()
    yield guard
    assert guard.values, "the test registered no credential to look for"
    for record in caplog.records:
        text = record.getMessage() + " " + repr(record.__dict__)
        for value in guard.values:
            assert value not in text, f"a credential leaked into log record {record.name}"
