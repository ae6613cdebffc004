"""What the configuration yields: frozen settings, checked once by `load.load_settings`.
Secrets are held in `Redacted` and never reach a repr."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..callers import CallerPolicy
from ..redact import Redacted

SourceKind = Literal["vault", "file", "transit"]
AuthMethod = Literal["token", "approle", "kubernetes", "jwt", "cert"]
RevokeMode = Literal["true", "false", "all"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("vault", "file", "transit")
AUTH_METHODS: tuple[AuthMethod, ...] = ("token", "approle", "kubernetes", "jwt", "cert")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"


@dataclass(frozen=True)
class Address:
    """A host and port to bind."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Product:
    """One Reditus product: where its id and secret live."""

    name: str
    kv_mount: str
    kv_path: str
    product_id_key: str
    secret_key: str
    secret_file: Path | None


@dataclass(frozen=True)
class VaultSettings:
    """How to reach and log in to Vault (or OpenBao)."""

    addr: str
    auth: AuthMethod
    auth_mount: str
    role: str | None
    jwt_file: Path
    role_id: str | None
    secret_id_file: Path | None
    token_file: Path | None
    token: Redacted | None = field(repr=False)
    cacert: Path | None
    namespace: str | None
    skip_verify: bool
    timeout: float
    capath: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    tls_server_name: str | None = None
    # "true": revoke tokens we logged in for; "all": also a handed VAULT_TOKEN / token file
    revoke_on_shutdown: RevokeMode = "true"


@dataclass(frozen=True)
class TransitSettings:
    """Transit mode: where the HMAC key lives and the product id it signs for."""

    mount: str
    key: str
    product_id: str


@dataclass(frozen=True)
class AuditSettings:
    """Where issuance records go and what happens when they cannot be written."""

    target: str  # "stdout" or a file path
    fail_closed: bool
    key_file: Path | None


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar needs, checked once."""

    listen: Address | None
    unix_socket: Path | None
    metrics_listen: Address
    secret_source: SourceKind
    vault: VaultSettings
    products: tuple[Product, ...]
    refresh_interval: float
    backoff_max: float
    max_staleness: float
    require_header: bool
    token_ttl: int
    log_level: str
    log_format: str
    shutdown_delay: float = 0.0
    unknown_env: tuple[str, ...] = ()
    transit: TransitSettings | None = None
    callers: CallerPolicy | None = None
    audit: AuditSettings | None = None

    def product(self, name: str) -> Product | None:
        for product in self.products:
            if product.name == name:
                return product
        return None
