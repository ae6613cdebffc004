"""Real-OpenBao helpers for the Vault tests: a root client, per-test roles and paths,
a CA and server certificate, service-account-shaped JWTs, and the thinnest Kubernetes
TokenReview responder (no cluster here; it stands in for the API server only).
"""

from __future__ import annotations

import base64
import contextlib
import datetime
import ipaddress
import json
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hvac
import jwt
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from sidecar.config import Settings, load_settings
from sidecar.devserver import OpenBaoDevServer, free_port_pair
from sidecar.metrics import Metrics
from sidecar.sources.vault import VaultSession, VaultSource


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class Bao:
    """A running dev server and a root client to arrange each test's world."""

    server: OpenBaoDevServer
    tls_addr: str | None = None
    ca_file: Path | None = None

    @property
    def addr(self) -> str:
        return self.server.addr

    @property
    def root_token(self) -> str:
        return self.server.root_token

    def root(self) -> hvac.Client:
        return hvac.Client(url=self.addr, token=self.root_token, cert=(), verify=True, timeout=10)

    def put(self, path: str, mount: str = "secret", **data: str) -> int:
        """Write a KV v2 version; returns its number."""
        response = self.root().secrets.kv.v2.create_or_update_secret(
            path=path, mount_point=mount, secret=data
        )
        return int(response["data"]["version"])

    def policy(self, name: str, hcl: str) -> None:
        self.root().sys.create_or_update_acl_policy(name=name, policy=hcl)

    def read_policy(self, path: str, name: str | None = None) -> str:
        """A policy allowing read on one KV v2 data path; returns its name."""
        name = name or unique("read")
        self.policy(name, f'path "secret/data/{path}" {{ capabilities = ["read"] }}\n')
        return name

    def ensure_auth(self, method: str, path: str | None = None) -> str:
        path = path or method
        root = self.root()
        if f"{path}/" not in root.sys.list_auth_methods()["data"]:
            root.sys.enable_auth_method(method, path=path)
        return path

    def token(self, policies: list[str], **kwargs: Any) -> str:
        response = self.root().auth.token.create(policies=policies, **kwargs)
        return str(response["auth"]["client_token"])

    def approle(
        self, policies: list[str], *, mount: str = "approle", **role: Any
    ) -> tuple[str, str, str]:
        """A fresh role: (role name, role id, secret id or "" without bind_secret_id)."""
        self.ensure_auth("approle", mount)
        name = unique("role")
        root = self.root()
        root.auth.approle.create_or_update_approle(
            role_name=name, token_policies=policies, mount_point=mount, **role
        )
        role_id = root.auth.approle.read_role_id(name, mount_point=mount)["data"]["role_id"]
        secret_id = ""
        if role.get("bind_secret_id", True):
            secret_id = root.auth.approle.generate_secret_id(name, mount_point=mount)["data"][
                "secret_id"
            ]
        return name, role_id, secret_id

    def jwt_role(
        self,
        mount: str,
        policy: str,
        *,
        subject: str = "system:serviceaccount:shop:web",
        **extra: object,
    ) -> str:
        """A fresh `jwt` role for tokens with audience `vault` and this subject."""
        role = unique("jwt")
        self.root().write_data(
            f"auth/{mount}/role/{role}",
            data={
                "role_type": "jwt",
                "bound_audiences": ["vault"],
                "user_claim": "sub",
                "bound_subject": subject,
                "token_policies": [policy],
                "token_ttl": "60s",
                **extra,
            },
        )
        return role

    def k8s_role(
        self,
        mount: str,
        policy: str,
        *,
        namespace: str = "shop",
        account: str = "web",
        **extra: object,
    ) -> str:
        """A fresh `kubernetes` role bound to one service account."""
        role = unique("k8s")
        self.root().write_data(
            f"auth/{mount}/role/{role}",
            data={
                "bound_service_account_names": [account],
                "bound_service_account_namespaces": [namespace],
                "token_policies": [policy],
                "token_ttl": "60s",
                **extra,
            },
        )
        return role

    def secret_id(self, role: str, mount: str = "approle") -> str:
        return str(
            self.root().auth.approle.generate_secret_id(role, mount_point=mount)["data"][
                "secret_id"
            ]
        )

    def settings(self, **env: str) -> Settings:
        """Sidecar settings against this server (token auth with root unless overridden)."""
        base = {"VAULT_ADDR": self.addr, "REDITUS_SIDECAR_VAULT_TIMEOUT": "3"}
        if env.get("REDITUS_SIDECAR_VAULT_AUTH", "token") == "token" and not (
            "REDITUS_SIDECAR_VAULT_TOKEN_FILE" in env or "VAULT_TOKEN" in env
        ):
            base["VAULT_TOKEN"] = self.root_token
        return load_settings({**base, **env})


# --- TLS ---------------------------------------------------------------------------------


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(directory: Path, name: str) -> tuple[Path, rsa.RSAPrivateKey, x509.Certificate]:
    """A self-signed CA; returns its PEM file, key and certificate."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    path = directory / f"{name}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return path, key, cert


def make_server_cert(
    directory: Path,
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    *,
    dns_names: tuple[str, ...] = (),
) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (or only for `dns_names`) signed by the CA;
    returns (cert file, key file)."""
    names: list[x509.GeneralName] = [x509.DNSName(name) for name in dns_names] or [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    ]
    return make_leaf(
        directory,
        "server",
        ca_key,
        ca_cert,
        common_name="openbao-test",
        usage=x509.oid.ExtendedKeyUsageOID.SERVER_AUTH,
        names=names,
    )


def make_client_cert(
    directory: Path,
    name: str,
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    *,
    common_name: str,
    lifetime: datetime.timedelta = datetime.timedelta(hours=1),
) -> tuple[Path, Path]:
    """A TLS client certificate (negative `lifetime`: already expired): (cert, key)."""
    return make_leaf(
        directory,
        name,
        ca_key,
        ca_cert,
        common_name=common_name,
        usage=x509.oid.ExtendedKeyUsageOID.CLIENT_AUTH,
        lifetime=lifetime,
    )


def make_leaf(
    directory: Path,
    name: str,
    ca_key: rsa.RSAPrivateKey,
    ca_cert: x509.Certificate,
    *,
    common_name: str,
    usage: x509.ObjectIdentifier,
    names: list[x509.GeneralName] | None = None,
    lifetime: datetime.timedelta = datetime.timedelta(days=1),
) -> tuple[Path, Path]:
    """A certificate signed by the CA, written as NAME.pem and NAME-key.pem."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    start = min(now, now + lifetime) - datetime.timedelta(minutes=5)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(now + lifetime)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
    )
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def tls_listener(cert: Path, key: Path, client_ca: Path | None = None) -> tuple[str, int]:
    """An extra OpenBao listener config with TLS on a free port: (HCL, port). With
    `client_ca`, every connection must present a client certificate that CA signed."""
    port = free_port_pair()
    mutual = (
        f'  tls_client_ca_file = "{client_ca}"\n  tls_require_and_verify_client_cert = true\n'
        if client_ca
        else ""
    )
    hcl = f"""
listener "tcp" {{
  address = "127.0.0.1:{port}"
  cluster_address = "127.0.0.1:{port + 1}"
  tls_cert_file = "{cert}"
  tls_key_file = "{key}"
{mutual}}}
"""
    return hcl, port


# --- JWT / Kubernetes ------------------------------------------------------------------


def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> str:
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def service_account_jwt(
    key: rsa.RSAPrivateKey,
    *,
    namespace: str = "shop",
    name: str = "web",
    audience: str = "vault",
    lifetime: int = 600,
) -> str:
    """A token shaped like a projected Kubernetes service-account token."""
    now = int(time.time())
    claims = {
        "aud": [audience],
        "exp": now + lifetime,
        "iat": now,
        "nbf": now,
        "iss": "https://kubernetes.default.svc.cluster.local",
        "sub": f"system:serviceaccount:{namespace}:{name}",
        "kubernetes.io": {
            "namespace": namespace,
            "serviceaccount": {"name": name, "uid": str(uuid.uuid4())},
        },
    }
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": "test"})


def _claims(token: str) -> dict[str, Any]:
    """Unverified payload: the responder decides by membership, not by signature."""
    payload = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))))


@dataclass
class TokenReviewer:
    """Answers TokenReview for tokens in `accepted`; refuses every other token."""

    accepted: set[str] = field(default_factory=set)
    reviews: int = 0
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, body: dict[str, Any]) -> dict[str, Any]:
        self.reviews += 1
        token = str((body.get("spec") or {}).get("token") or "")
        status: dict[str, Any] = {"authenticated": False, "error": "token not accepted"}
        if token in self.accepted:
            claims = _claims(token)
            sa = claims["kubernetes.io"]["serviceaccount"]
            status = {
                "authenticated": True,
                "user": {
                    "username": claims["sub"],
                    "uid": sa["uid"],
                    "groups": ["system:serviceaccounts"],
                },
                "audiences": claims["aud"],
            }
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "status": status,
        }


@contextlib.contextmanager
def token_reviewer() -> Iterator[TokenReviewer]:
    reviewer = TokenReviewer()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length) or b"{}")
            data = json.dumps(reviewer.answer(body)).encode()
            self.send_response(201)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    reviewer.server = server
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield reviewer
    finally:
        server.shutdown()
        server.server_close()


def write_file(path: Path, content: str) -> Path:
    """A credential file as Kubernetes or Vault Agent would leave it (mode 0600)."""
    path.write_text(content)
    path.chmod(0o600)
    return path


# --- the sidecar as a process against OpenBao ------------------------------------------


@contextlib.contextmanager
def vault_sidecar(vault_addr: str, *, wait: bool = True, **env: str) -> Iterator[Any]:
    """`python -m sidecar serve` with the vault source; env adds or overrides variables."""
    from tests.support import run_sidecar

    full = {
        "VAULT_ADDR": vault_addr,
        "REDITUS_SIDECAR_REFRESH_INTERVAL": "0.5",
        "REDITUS_SIDECAR_BACKOFF_MAX": "1",
        "REDITUS_SIDECAR_VAULT_TIMEOUT": "1",
        **env,
    }
    with run_sidecar(full, wait=wait) as sidecar:
        yield sidecar


# --- sessions and their metrics -------------------------------------------------------


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


def logins(registry: CollectorRegistry, method: str, result: str = "success") -> float:
    return sample(registry, "reditus_sidecar_vault_login_total", method=method, result=result)


def approle_session(
    openbao: Bao,
    kv_path: str,
    tmp_path: Path,
    metrics: Metrics,
    leak_guard: Any,
    *,
    secret_id: str | None = None,
    policy: str | None = None,
    **role_options: str,
) -> tuple[VaultSession, VaultSource]:
    """An AppRole role with `policy` (default: read on `kv_path`) and a session logging in
    with it (with `secret_id` instead of the issued one, to test refusals)."""
    policies = [policy or openbao.read_policy(kv_path)]
    _, role_id, issued = openbao.approle(policies, **role_options)
    secret_id = secret_id or issued
    leak_guard.add(secret_id)
    return session_for(
        openbao,
        metrics,
        REDITUS_SIDECAR_VAULT_AUTH="approle",
        REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
        REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(write_file(tmp_path / "sid", secret_id)),
        REDITUS_SIDECAR_KV_PATH=kv_path,
    )


def unexported() -> Metrics:
    """Metrics for a session whose test reads none of them (a registry of their own)."""
    return Metrics(CollectorRegistry(), ["default"], "test")


def session_for(
    openbao: Bao, metrics: Metrics, *, backoff_max: float = 2, **env: str
) -> tuple[VaultSession, VaultSource]:
    """A Vault session with `openbao.settings(**env)` and the source of its one product."""
    settings = openbao.settings(**env)
    session = VaultSession(settings.vault, metrics, backoff_max=backoff_max)
    return session, VaultSource(session, settings.products[0])
