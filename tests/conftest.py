"""Shared fixtures. Every test gets a fresh metrics registry; nothing global leaks."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


# --- OpenBao fixtures ---
# One real OpenBao dev server per test session (started on a free loopback port, stopped
# by PID); tests stay independent through their own KV paths, policies and roles.

from collections.abc import Iterator  # noqa: E402

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
