"""Vault settings: the sidecar's own (`REDITUS_SIDECAR_VAULT_*`) and Vault's (`VAULT_*`).
Credentials and TLS files are only checked when a source that talks to Vault is in use."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import ConfigError
from ..names import PREFIX
from ..redact import Redacted
from .files import Values
from .model import AuthMethod, RevokeMode, VaultSettings
from .parse import existing_file, nonempty, optional_path


def vault_settings(values: Values, needed: bool) -> VaultSettings:
    """Vault settings; credentials are only checked when the vault source is in use."""
    auth: AuthMethod = values.parse("VAULT_AUTH")
    mount: str | None = values.parse("VAULT_AUTH_MOUNT")
    role: str | None = values.parse("VAULT_ROLE")
    jwt_file: Path = values.parse("VAULT_JWT_FILE")
    role_id: str | None = values.parse("VAULT_ROLE_ID")
    secret_id_file: Path | None = values.parse("VAULT_SECRET_ID_FILE")
    token_file: Path | None = values.parse("VAULT_TOKEN_FILE")
    timeout: float = values.parse("VAULT_TIMEOUT")
    addr: str = values.vault("VAULT_ADDR")
    token: str = values.vault("VAULT_TOKEN")
    cacert_raw: str = values.vault("VAULT_CACERT")
    capath_raw: str = values.vault("VAULT_CAPATH")
    cert_raw: str = values.vault("VAULT_CLIENT_CERT")
    key_raw: str = values.vault("VAULT_CLIENT_KEY")
    server_name = values.vault("VAULT_TLS_SERVER_NAME") or None
    revoke: RevokeMode = values.parse("REVOKE_ON_SHUTDOWN")

    cacert = optional_path(cacert_raw, "VAULT_CACERT")
    capath = optional_path(capath_raw, "VAULT_CAPATH")
    client_cert = optional_path(cert_raw, "VAULT_CLIENT_CERT")
    client_key = optional_path(key_raw, "VAULT_CLIENT_KEY")
    if needed:
        if not addr:
            raise ConfigError("VAULT_ADDR: must be set for the vault and transit secret sources")
        if not re.match(r"^https?://[^/\s]+", addr):
            raise ConfigError(f"VAULT_ADDR={addr!r}: expected http(s)://HOST[:PORT]")
        cacert = existing_file(cacert_raw, "VAULT_CACERT")
        if capath is not None and not capath.is_dir():
            raise ConfigError(f"VAULT_CAPATH={capath_raw!r}: no such directory")
        if (client_cert is None) != (client_key is None):
            given, missing = (
                ("VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY")
                if client_cert
                else ("VAULT_CLIENT_KEY", "VAULT_CLIENT_CERT")
            )
            raise ConfigError(
                f"{given} is set but {missing} is not: a client certificate needs both "
                "its certificate and its private key"
            )
        existing_file(cert_raw, "VAULT_CLIENT_CERT")
        existing_file(key_raw, "VAULT_CLIENT_KEY")
        if auth == "cert" and client_cert is None:
            raise ConfigError(
                f"VAULT_CLIENT_CERT and VAULT_CLIENT_KEY: both must be set for "
                f"{PREFIX}VAULT_AUTH=cert (the login presents that certificate)"
            )
        if auth == "token" and not token and token_file is None:
            raise ConfigError(
                f"VAULT_TOKEN or {PREFIX}VAULT_TOKEN_FILE: one must be set for "
                f"{PREFIX}VAULT_AUTH=token"
            )
        if token_file is not None:
            existing_file(*values.get("VAULT_TOKEN_FILE"))
        if auth == "approle":
            nonempty(*values.get("VAULT_ROLE_ID"))
            if secret_id_file is not None:
                existing_file(*values.get("VAULT_SECRET_ID_FILE"))
        if auth in ("kubernetes", "jwt"):
            nonempty(*values.get("VAULT_ROLE"))
            existing_file(*values.get("VAULT_JWT_FILE"))
    return VaultSettings(
        addr=addr.rstrip("/"),
        auth=auth,
        auth_mount=(mount or auth).strip("/"),
        role=role,
        jwt_file=jwt_file,
        role_id=role_id,
        secret_id_file=secret_id_file,
        token_file=token_file,
        token=Redacted(token) if token else None,
        cacert=cacert,
        namespace=values.vault("VAULT_NAMESPACE") or None,
        skip_verify=values.vault("VAULT_SKIP_VERIFY"),
        timeout=timeout,
        capath=capath,
        client_cert=client_cert,
        client_key=client_key,
        tls_server_name=server_name,
        revoke_on_shutdown=revoke,
    )
