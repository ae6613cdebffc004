"""Mutual TLS towards a real OpenBao listener that requires client certificates, the
`cert` auth method, client-certificate renewal without a restart, VAULT_CAPATH and
VAULT_TLS_SERVER_NAME, and the `check` message for each way TLS can fail.

The listener's certificate names only `vault.reditus.test` (no IP address), so every
client here must send that name (VAULT_TLS_SERVER_NAME) while dialling 127.0.0.1.
"""

from __future__ import annotations

import datetime
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from sidecar.config import load_settings
from sidecar.devserver import OpenBaoDevServer, free_port_pair
from sidecar.metrics import Metrics
from sidecar.sources.vault import VaultSession, VaultSource
from tests.openbao import (
    Bao,
    make_ca,
    make_client_cert,
    make_server_cert,
    sample,
    tls_listener,
    unique,
)
from tests.test_check import failed_line, run_check

SERVER_NAME = "vault.reditus.test"
SECRET = "tls-secret-" + "t" * 64


@dataclass
class MutualTLS:
    """An OpenBao dev server with a client-certificate-only TLS listener and cert auth."""

    bao: Bao
    tls_addr: str
    server_ca: Path
    client_ca: tuple[Path, object, object]
    role: str
    kv_path: str
    tmp: Path

    def client_cert(self, name: str, common_name: str, **kwargs: object) -> tuple[Path, Path]:
        _, key, cert = self.client_ca
        return make_client_cert(self.tmp, name, key, cert, common_name=common_name, **kwargs)  # type: ignore[arg-type]

    def env(self, cert: Path, key: Path, **extra: str) -> dict[str, str]:
        return {
            "VAULT_ADDR": self.tls_addr,
            "VAULT_CACERT": str(self.server_ca),
            "VAULT_TLS_SERVER_NAME": SERVER_NAME,
            "VAULT_CLIENT_CERT": str(cert),
            "VAULT_CLIENT_KEY": str(key),
            "REDITUS_SIDECAR_VAULT_AUTH": "cert",
            "REDITUS_SIDECAR_VAULT_ROLE": self.role,
            "REDITUS_SIDECAR_KV_PATH": self.kv_path,
            **extra,
        }

    def identity(self, token: str) -> str:
        """The common name Vault's cert auth recorded for the token's login."""
        data = self.bao.root().auth.token.lookup(token)["data"]
        return str(data["meta"]["common_name"])


@pytest.fixture(scope="module")
def mtls(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MutualTLS]:
    tmp = tmp_path_factory.mktemp("mtls")
    server_ca, ca_key, ca_cert = make_ca(tmp, "server-ca")
    cert, key = make_server_cert(tmp, ca_key, ca_cert, dns_names=(SERVER_NAME,))
    client_ca = make_ca(tmp, "client-ca")
    hcl, port = tls_listener(cert, key, client_ca=client_ca[0])
    with OpenBaoDevServer(extra_config=hcl) as server:
        bao = Bao(server)
        kv_path = unique("mtls")
        bao.put(kv_path, product_id="prod-tls", product_secret=SECRET)
        mount = bao.ensure_auth("cert")
        role = unique("cert")
        bao.root().write_data(
            f"auth/{mount}/certs/{role}",
            data={
                "certificate": client_ca[0].read_text(),
                "token_policies": [bao.read_policy(kv_path)],
                "token_ttl": "60s",
            },
        )
        yield MutualTLS(bao, f"https://127.0.0.1:{port}", server_ca, client_ca, role, kv_path, tmp)


def mounted_like_kubernetes(directory: Path, cert: Path, key: Path) -> tuple[Path, Path]:
    """tls.crt/tls.key -> ..data/ -> a versioned folder, as a secret volume lays them out."""
    directory.mkdir()
    swap_secret_volume(directory, cert, key)
    for name in ("tls.crt", "tls.key"):
        (directory / name).symlink_to(f"..data/{name}")
    return directory / "tls.crt", directory / "tls.key"


def swap_secret_volume(directory: Path, cert: Path, key: Path) -> None:
    """The kubelet's atomic update: a new folder, then one rename of the ..data link."""
    version = directory / f"..{unique('v')}"
    version.mkdir()
    shutil.copy(cert, version / "tls.crt")
    shutil.copy(key, version / "tls.key")
    link = directory / "..data_tmp"
    link.symlink_to(version.name)
    os.replace(link, directory / "..data")


async def test_cert_login_follows_renewed_client_certificates(mtls: MutualTLS, tmp_path) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, ["default"], "test")
    first = mtls.client_cert("first", "sidecar-first", lifetime=datetime.timedelta(minutes=10))
    second = mtls.client_cert("second", "sidecar-second")
    third = mtls.client_cert("third", "sidecar-third")
    live_cert, live_key = first[0], first[1]
    settings = load_settings(mtls.env(live_cert, live_key))
    session = VaultSession(settings.vault, metrics, backoff_max=1)
    source = VaultSource(session, settings.products[0])
    try:
        assert (await source.fetch()).secret.reveal() == SECRET
        state = await session.token()
        assert mtls.identity(state.token.reveal()) == "sidecar-first"

        # cert-manager writes in place: the certificate first, its key a moment later.
        shutil.copy(second[0], live_cert)
        assert (await source.fetch()).secret.reveal() == SECRET  # the old pair still works
        state = await session.login(stale=state)
        assert mtls.identity(state.token.reveal()) == "sidecar-first"
        assert (
            sample(registry, "reditus_sidecar_vault_client_cert_reload_total", result="error") == 1
        )

        shutil.copy(second[1], live_key)
        state = await session.login(stale=state)
        assert mtls.identity(state.token.reveal()) == "sidecar-second"
        assert (await source.fetch()).secret.reveal() == SECRET
        assert (
            sample(registry, "reditus_sidecar_vault_client_cert_reload_total", result="success")
            == 1
        )
    finally:
        await session.close()

    # A Kubernetes secret volume: both files change with one symlink swap.
    cert, key = mounted_like_kubernetes(tmp_path / "volume", *second)
    session = VaultSession(load_settings(mtls.env(cert, key)).vault, metrics, backoff_max=1)
    try:
        state = await session.token()
        assert mtls.identity(state.token.reveal()) == "sidecar-second"
        swap_secret_volume(tmp_path / "volume", *third)
        state = await session.login(stale=state)
        assert mtls.identity(state.token.reveal()) == "sidecar-third"
        expiry = sample(registry, "reditus_sidecar_vault_client_cert_expiry_timestamp_seconds")
        assert expiry > datetime.datetime.now(datetime.UTC).timestamp() + 30 * 60
    finally:
        await session.close()


# --- `check`, one message per TLS failure -------------------------------------------------


def test_check_ok_with_cert_auth(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(unique("ok"), "sidecar-check")
    result = run_check(mtls.env(cert, key))
    assert result.returncode == 0, result.stderr
    assert "ok (product id 'prod-tls', version 1)" in result.stdout


def test_check_name_mismatch(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(unique("name"), "sidecar-check")
    env = mtls.env(cert, key)
    del env["VAULT_TLS_SERVER_NAME"]
    line = failed_line(run_check(env))
    assert "not valid for 127.0.0.1" in line, line
    assert "VAULT_TLS_SERVER_NAME" in line, line
    env["VAULT_TLS_SERVER_NAME"] = "other.reditus.test"
    line = failed_line(run_check(env))
    assert "not valid for VAULT_TLS_SERVER_NAME=other.reditus.test" in line, line


def test_check_unknown_ca(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(unique("ca"), "sidecar-check")
    env = mtls.env(cert, key, VAULT_CACERT=str(mtls.client_ca[0]))
    line = failed_line(run_check(env))
    assert "certificate verify failed" in line, line
    assert f"VAULT_CACERT={mtls.client_ca[0]} does not hold the CA" in line, line


def test_check_client_certificate_refused(mtls: MutualTLS, tmp_path) -> None:
    _, other_key, other_cert = make_ca(tmp_path, "other-client-ca")
    cert, key = make_client_cert(tmp_path, "stranger", other_key, other_cert, common_name="x")
    line = failed_line(run_check(mtls.env(cert, key)))
    assert f"Vault refused the client certificate VAULT_CLIENT_CERT={cert}" in line, line


def test_check_client_certificate_missing(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(unique("none"), "sidecar-check")
    env = mtls.env(cert, key, REDITUS_SIDECAR_VAULT_AUTH="token", VAULT_TOKEN="s.unused")
    del env["VAULT_CLIENT_CERT"], env["VAULT_CLIENT_KEY"]
    line = failed_line(run_check(env))
    assert "requires a client certificate" in line, line
    assert "VAULT_CLIENT_CERT" in line, line


def test_check_expired_client_certificate_before_connecting(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(
        unique("old"), "sidecar-old", lifetime=-datetime.timedelta(hours=1)
    )
    env = mtls.env(cert, key, VAULT_ADDR=f"https://127.0.0.1:{free_port_pair()}")  # nobody there
    line = failed_line(run_check(env))
    assert f"the client certificate VAULT_CLIENT_CERT={cert} expired at" in line, line


def test_check_client_pair_mismatch_is_a_configuration_error(mtls: MutualTLS) -> None:
    first = mtls.client_cert(unique("a"), "a")
    second = mtls.client_cert(unique("b"), "b")
    result = run_check(mtls.env(first[0], second[1]))
    assert result.returncode == 2, result.stderr
    assert "the private key does not match the certificate" in result.stderr
    assert "Traceback" not in result.stderr


# --- VAULT_CAPATH, read as the Vault CLI reads it ---------------------------------------


def test_capath_trusts_every_pem_below_it(openbao: Bao, tmp_path) -> None:
    capath = tmp_path / "cas"
    capath.mkdir()
    make_ca(capath, "unrelated-ca")
    assert openbao.ca_file is not None
    shutil.copy(openbao.ca_file, capath / "vault-ca.crt")  # any name: no c_rehash links
    env = {"VAULT_ADDR": str(openbao.tls_addr), "VAULT_TOKEN": openbao.root_token}
    path = unique("capath")
    openbao.put(path, product_id="prod-capath", product_secret=SECRET)
    env["REDITUS_SIDECAR_KV_PATH"] = path
    assert run_check({**env, "VAULT_CAPATH": str(capath)}).returncode == 0

    # VAULT_CACERT wins over VAULT_CAPATH, as in the Vault CLI: a wrong file is not rescued.
    wrong = capath / "unrelated-ca.pem"
    line = failed_line(run_check({**env, "VAULT_CAPATH": str(capath), "VAULT_CACERT": str(wrong)}))
    assert f"VAULT_CACERT={wrong} does not hold the CA" in line, line

    (capath / "vault-ca.crt").unlink()
    line = failed_line(run_check({**env, "VAULT_CAPATH": str(capath)}))
    assert f"VAULT_CAPATH={capath} does not hold the CA" in line, line

    (capath / "README").write_text("not a certificate\n")
    result = run_check({**env, "VAULT_CAPATH": str(capath)})
    assert result.returncode == 2
    assert f"VAULT_CAPATH: {capath / 'README'} holds no PEM certificate" in result.stderr
