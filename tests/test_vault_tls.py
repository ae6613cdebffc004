"""Mutual TLS towards a real OpenBao listener that requires client certificates, the
`cert` auth method, client-certificate renewal without a restart, VAULT_CAPATH and
VAULT_TLS_SERVER_NAME, and the `check` message for each way TLS can fail.

The listener's certificate names only `vault.reditus.test` (no IP address), so every
client here must send that name (VAULT_TLS_SERVER_NAME) while dialling 127.0.0.1.

First, without Vault: the SSL context sidecar/sources/vault_tls.py builds, in a TLS
handshake in memory against a server presenting a chosen certificate; the CA files it
reads; and the client certificate's notAfter read from its DER.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from prometheus_client import CollectorRegistry

from sidecar.config import VaultSettings, load_settings
from sidecar.devserver import OpenBaoDevServer, free_port_pair
from sidecar.errors import ConfigError
from sidecar.metrics import Metrics
from sidecar.sources.vault import VaultSession, VaultSource
from sidecar.sources.vault_tls import PairError, build_context, ca_bundle, not_after, signature
from tests.openbao import (
    Bao,
    make_ca,
    make_client_cert,
    make_leaf,
    make_server_cert,
    sample,
    tls_listener,
    unique,
)
from tests.test_check import failed_line, run_check

SERVER_NAME = "vault.reditus.test"
SECRET = "tls-secret-" + "t" * 64


MIB = 1024 * 1024  # the bound on a CA file, spelled out: a test must not follow the constant


@dataclass
class Pki:
    ca: Path
    server: tuple[Path, Path]  # names SERVER_NAME in its SAN
    cn_only: tuple[Path, Path]  # SERVER_NAME only as its common name, no SAN
    stranger: tuple[Path, Path]  # signed by a CA nobody trusts
    client: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    tmp = tmp_path_factory.mktemp("pki")
    ca, key, cert = make_ca(tmp, "pieces-ca")
    _, other_key, other_cert = make_ca(tmp, "other-ca")
    server_auth = x509.oid.ExtendedKeyUsageOID.SERVER_AUTH
    return Pki(
        ca=ca,
        server=make_server_cert(tmp, key, cert, dns_names=(SERVER_NAME,)),
        cn_only=make_leaf(tmp, "cn-only", key, cert, common_name=SERVER_NAME, usage=server_auth),
        stranger=make_leaf(
            tmp, "stranger", other_key, other_cert, common_name=SERVER_NAME, usage=server_auth
        ),
        client=make_client_cert(tmp, "client", key, cert, common_name="sidecar"),
    )


def vault_settings(**env: str) -> VaultSettings:
    return load_settings(
        {"VAULT_ADDR": f"https://{SERVER_NAME}:8200", "VAULT_TOKEN": "t", **env}
    ).vault


def context_for(settings: VaultSettings) -> ssl.SSLContext:
    context, _ = build_context(settings, ca_bundle(settings)[0])
    return context


def handshake(context: ssl.SSLContext, server: tuple[Path, Path]) -> None:
    """A TLS handshake, in memory, with a server presenting `server` (cert, key) to a client
    asking for SERVER_NAME; raises ssl.SSLCertVerificationError when the client refuses it."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(*server)
    to_client, to_server = ssl.MemoryBIO(), ssl.MemoryBIO()
    ends = [
        context.wrap_bio(to_client, to_server, server_hostname=SERVER_NAME),
        server_context.wrap_bio(to_server, to_client, server_side=True),
    ]
    for _ in range(5):
        finished = 0
        for end in ends:
            try:
                end.do_handshake()
                finished += 1
            except ssl.SSLWantReadError:
                pass
        if finished == len(ends):
            return
    raise AssertionError("the handshake did not finish")


def test_vault_cacert_is_the_only_trust(pki: Pki) -> None:
    context = context_for(vault_settings(VAULT_CACERT=str(pki.ca)))
    handshake(context, pki.server)
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(context, pki.stranger)
    # Not the default bundle as well, or any public CA could vouch for the name.
    (trusted,) = context.get_ca_certs()
    assert trusted["subject"] == ((("commonName", "pieces-ca"),),)


def test_the_server_name_must_be_in_the_san_not_the_common_name(pki: Pki) -> None:
    context = context_for(vault_settings(VAULT_CACERT=str(pki.ca)))
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(context, pki.cn_only)  # as Go's crypto/tls and urllib3: SANs only


def test_without_a_ca_setting_the_default_bundle_decides(pki: Pki) -> None:
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        handshake(context_for(vault_settings()), pki.server)


def test_skip_verify_accepts_any_server_unless_a_ca_is_given(pki: Pki, tmp_path: Path) -> None:
    handshake(context_for(vault_settings(VAULT_SKIP_VERIFY="true")), pki.stranger)
    shutil.copy(pki.ca, tmp_path / "ca.pem")
    for given in ({"VAULT_CACERT": str(pki.ca)}, {"VAULT_CAPATH": str(tmp_path)}):
        context = context_for(vault_settings(VAULT_SKIP_VERIFY="true", **given))
        with pytest.raises(ssl.SSLCertVerificationError):
            handshake(context, pki.stranger)


def test_a_ca_file_up_to_1_mib_is_read_a_larger_one_refused(pki: Pki, tmp_path: Path) -> None:
    pem = pki.ca.read_bytes()
    bundle = tmp_path / "bundle.pem"
    bundle.write_bytes(pem + b"#" * (MIB - len(pem)))
    settings = vault_settings(VAULT_CACERT=str(bundle))
    assert ca_bundle(settings) == (bundle.read_text(), f"VAULT_CACERT={bundle}")
    bundle.write_bytes(pem + b"#" * (MIB + 1 - len(pem)))
    with pytest.raises(ConfigError, match="holds no PEM certificate"):
        ca_bundle(settings)


def test_an_unreadable_file_under_vault_capath_is_a_configuration_error(
    pki: Pki, tmp_path: Path
) -> None:
    capath = tmp_path / "cas"
    capath.mkdir()
    shutil.copy(pki.ca, capath / "ca.pem")
    (capath / "gone.pem").symlink_to(tmp_path / "removed.pem")  # a dangling link
    with pytest.raises(ConfigError, match=r"VAULT_CAPATH: cannot read .*gone\.pem: No such file"):
        ca_bundle(vault_settings(VAULT_CAPATH=str(capath)))


def test_a_client_pair_that_cannot_be_read_is_a_pair_error(pki: Pki, tmp_path: Path) -> None:
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    shutil.copy(pki.client[0], cert)
    shutil.copy(pki.client[1], key)
    settings = vault_settings(VAULT_CLIENT_CERT=str(cert), VAULT_CLIENT_KEY=str(key))
    _, pair = build_context(settings, None)
    assert pair is not None
    assert pair.signature == signature(cert, key)
    key.unlink()  # mid-renewal
    assert signature(cert, key) is None
    with pytest.raises(PairError, match="does not exist"):
        build_context(settings, None)
    key.mkdir()
    with pytest.raises(PairError, match=r"cannot read VAULT_CLIENT_CERT=.*: Is a directory"):
        build_context(dataclasses.replace(settings, client_key=key), None)


# --- notAfter, from the DER -----------------------------------------------------------------


def tlv(tag: int, content: bytes) -> bytes:
    """One DER TLV, with the short (< 128) or long length form."""
    if len(content) < 0x80:
        return bytes([tag, len(content)]) + content
    size = len(content).to_bytes((len(content).bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(size)]) + size + content


def der_certificate(path: Path, *, version: bool, issuer_size: int) -> datetime.datetime:
    """A certificate's framing as not_after reads it (v3 with the [0] version field, or
    v1 without), its issuer `issuer_size` bytes long; writes the PEM, returns its notAfter."""
    validity = tlv(0x17, b"260101000000Z") + tlv(0x17, b"301231235959Z")  # UTCTime
    fields = [
        tlv(0x02, b"\x05"),  # serial
        tlv(0x30, tlv(0x06, b"\x2a\x86\x48\x86\xf7\x0d\x01\x01\x0b")),  # signature algorithm
        tlv(0x30, b"i" * issuer_size),  # issuer (the content is never read)
        tlv(0x30, validity),
        tlv(0x30, b"subject"),
        tlv(0x30, b"k" * 300),  # subject public key info
    ]
    if version:
        fields.insert(0, tlv(0xA0, tlv(0x02, b"\x02")))
    tbs = tlv(0x30, b"".join(fields))
    der = tlv(0x30, tbs + tlv(0x30, b"alg") + tlv(0x03, b"\x00" + b"s" * 256))
    path.write_text(ssl.DER_cert_to_PEM_cert(der))
    return datetime.datetime(2030, 12, 31, 23, 59, 59, tzinfo=datetime.UTC)


def test_not_after_of_a_real_certificate(pki: Pki) -> None:
    cert = x509.load_pem_x509_certificate(pki.client[0].read_bytes())
    assert not_after(pki.client[0]) == cert.not_valid_after_utc


@pytest.mark.parametrize("version", [True, False], ids=["v3", "v1"])
@pytest.mark.parametrize("issuer_size", [20, 127, 128, 200, 300])  # short, long 0x81, 0x82
def test_not_after_with_either_version_and_any_length_form(
    tmp_path: Path, version: bool, issuer_size: int
) -> None:
    path = tmp_path / "cert.pem"
    expected = der_certificate(path, version=version, issuer_size=issuer_size)
    assert not_after(path) == expected


def test_not_after_of_generalized_time_and_of_the_first_certificate_in_a_chain(
    tmp_path: Path, pki: Pki
) -> None:
    """A notAfter past 2049 is a GeneralizedTime (RFC 5280); a certificate file may hold
    its chain after it, and the first certificate is the one presented."""
    validity = tlv(0x17, b"260101000000Z") + tlv(0x18, b"20600630120000Z")  # GeneralizedTime
    fields = [tlv(0x02, b"\x05"), tlv(0x30, b"alg"), tlv(0x30, b"issuer"), tlv(0x30, validity)]
    der = tlv(0x30, tlv(0x30, b"".join(fields)) + tlv(0x30, b"alg") + tlv(0x03, b"\x00s"))
    path = tmp_path / "chain.pem"
    path.write_text(ssl.DER_cert_to_PEM_cert(der) + pki.client[0].read_text())
    assert not_after(path) == datetime.datetime(2060, 6, 30, 12, 0, 0, tzinfo=datetime.UTC)


def test_not_after_of_something_else_is_a_pair_error(tmp_path: Path) -> None:
    path = tmp_path / "cert.pem"
    with pytest.raises(PairError, match="cannot read its validity"):
        not_after(path)  # missing: OSError
    path.write_text("not a certificate\n")
    with pytest.raises(PairError, match="cannot read its validity"):
        not_after(path)  # no PEM block: ValueError
    path.write_text(ssl.DER_cert_to_PEM_cert(tlv(0x30, tlv(0x30, tlv(0x02, b"\x05")))))
    with pytest.raises(PairError, match="cannot read its validity"):
        not_after(path)  # a to-be-signed part without a validity: IndexError


# --- a real OpenBao listener ------------------------------------------------------------------


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


def staged_folder(directory: Path) -> Path:
    """A versioned folder whose files exist (their inode numbers fixed) but are empty."""
    version = directory / f"..{unique('v')}"
    version.mkdir()
    for name in ("tls.crt", "tls.key"):
        (version / name).touch()
    return version


def swap_secret_volume(directory: Path, cert: Path, key: Path, version: Path | None = None) -> None:
    """The kubelet's atomic update: a new folder, then one rename of the ..data link."""
    version = version or staged_folder(directory)
    shutil.copy(cert, version / "tls.crt")  # into the file as it is: its inode stays
    shutil.copy(key, version / "tls.key")
    link = directory / "..data_tmp"
    link.symlink_to(version.name)
    os.replace(link, directory / "..data")


@pytest.mark.integration
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

        # The kubelet deletes old folders, so a renewal's files may reuse lower inode
        # numbers than the files in use: any change of the files is a renewal.
        volume = tmp_path / "volume"
        low, high = sorted(
            (staged_folder(volume), staged_folder(volume)),
            key=lambda folder: (folder / "tls.crt").stat().st_ino,
        )
        swap_secret_volume(volume, *second, version=high)
        state = await session.login(stale=state)
        assert mtls.identity(state.token.reveal()) == "sidecar-second"
        swap_secret_volume(volume, *third, version=low)
        state = await session.login(stale=state)
        assert mtls.identity(state.token.reveal()) == "sidecar-third"
    finally:
        await session.close()


# --- `check`, one message per TLS failure -------------------------------------------------


@pytest.mark.integration
def test_check_ok_with_cert_auth(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(unique("ok"), "sidecar-check")
    result = run_check(mtls.env(cert, key))
    assert result.returncode == 0, result.stderr
    assert "ok (product id 'prod-tls', version 1)" in result.stdout


@pytest.mark.integration
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


@pytest.mark.integration
def test_check_unknown_ca(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(unique("ca"), "sidecar-check")
    env = mtls.env(cert, key, VAULT_CACERT=str(mtls.client_ca[0]))
    line = failed_line(run_check(env))
    assert "certificate verify failed" in line, line
    assert f"VAULT_CACERT={mtls.client_ca[0]} does not hold the CA" in line, line


@pytest.mark.integration
def test_check_client_certificate_refused(mtls: MutualTLS, tmp_path) -> None:
    _, other_key, other_cert = make_ca(tmp_path, "other-client-ca")
    cert, key = make_client_cert(tmp_path, "stranger", other_key, other_cert, common_name="x")
    line = failed_line(run_check(mtls.env(cert, key)))
    assert f"Vault refused the client certificate VAULT_CLIENT_CERT={cert}" in line, line


@pytest.mark.integration
def test_check_client_certificate_missing(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(unique("none"), "sidecar-check")
    env = mtls.env(cert, key, REDITUS_SIDECAR_VAULT_AUTH="token", VAULT_TOKEN="s.unused")
    del env["VAULT_CLIENT_CERT"], env["VAULT_CLIENT_KEY"]
    line = failed_line(run_check(env))
    assert "requires a client certificate" in line, line
    assert "VAULT_CLIENT_CERT" in line, line


@pytest.mark.integration
def test_check_expired_client_certificate_before_connecting(mtls: MutualTLS) -> None:
    cert, key = mtls.client_cert(
        unique("old"), "sidecar-old", lifetime=-datetime.timedelta(hours=1)
    )
    env = mtls.env(cert, key, VAULT_ADDR=f"https://127.0.0.1:{free_port_pair()}")  # nobody there
    line = failed_line(run_check(env))
    assert f"the client certificate VAULT_CLIENT_CERT={cert} expired at" in line, line


@pytest.mark.integration
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
