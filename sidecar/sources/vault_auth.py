"""Vault auth methods: where each one's credentials come from, and what Vault says back.

Credential files (token file, AppRole secret id, Kubernetes/JWT token) are re-read at
every login: Vault Agent rewrites token files, projected service-account tokens rotate,
secret ids get replaced. Nothing here keeps a credential longer than one login, and
nothing puts one into a message: Vault's own error text is scrubbed of them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac

from ..config import VaultSettings
from ..errors import SecretUnavailable
from ..names import PREFIX
from ..redact import Redacted
from .vault_bounds import status_error
from .vault_client import VaultHTTPError, VaultLoginRefused, VaultTransport

MAX_CREDENTIAL_BYTES = 64 * 1024


@dataclass
class TokenState:
    """A Vault token and what we know of its lifetime (monotonic clock)."""

    token: Redacted = field(repr=False)
    renewable: bool
    ttl: float  # seconds granted at `granted_at`; 0 means it never expires
    granted_at: float
    increment: int  # what to ask for at renewal: the token's creation TTL
    capped: bool = False  # a renewal granted less than asked: max TTL is near

    @property
    def expires_at(self) -> float | None:
        return self.granted_at + self.ttl if self.ttl > 0 else None

    def expiry_wall_time(
        self,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> float:
        """Unix time of expiry for the gauge; 0 when the token never expires."""
        if self.ttl <= 0:
            return 0.0
        return wall() + (self.granted_at + self.ttl - monotonic())


def read_credential(path: Path, what: str, variable: str) -> str:
    """Read a credential file fresh; the message names the file, never its content."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_CREDENTIAL_BYTES + 1)
    except FileNotFoundError:
        raise SecretUnavailable(f"{what} file {path} ({variable}) does not exist") from None
    except OSError as exc:
        raise SecretUnavailable(
            f"cannot read the {what} file {path} ({variable}): {exc.strerror}"
        ) from None
    if len(raw) > MAX_CREDENTIAL_BYTES:
        raise SecretUnavailable(f"{what} file {path} ({variable}) is larger than 64 KiB")
    try:
        value = raw.decode().strip()
    except UnicodeDecodeError:
        raise SecretUnavailable(f"{what} file {path} ({variable}) is not UTF-8 text") from None
    if not value:
        raise SecretUnavailable(f"{what} file {path} ({variable}) is empty")
    return value


class Authenticator:
    """Logs in with one configured method; `login` returns a token and its raw auth data."""

    def __init__(
        self, settings: VaultSettings, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        self.settings = settings
        self._monotonic = monotonic
        self.method = settings.auth
        self.mount = settings.auth_mount
        self._held: list[str] = []  # credentials of the current login, for scrubbing only

    @property
    def can_relogin(self) -> bool:
        """Whether a new login can yield a new token (a static VAULT_TOKEN cannot)."""
        return self.method != "token" or self.settings.token_file is not None

    def hint(self) -> str:
        """What an operator should check when Vault refuses the login."""
        if self.method == "token":
            source = (
                f"the token in {self.settings.token_file} ({PREFIX}VAULT_TOKEN_FILE)"
                if self.settings.token_file
                else "VAULT_TOKEN"
            )
            return (
                f"{source} is invalid, expired or revoked (or lacks the `default` policy, "
                "which allows auth/token/lookup-self)"
            )
        if self.method == "approle":
            return (
                f"check {PREFIX}VAULT_ROLE_ID and the secret id in "
                f"{PREFIX}VAULT_SECRET_ID_FILE (expired, used up, or for another role?)"
            )
        if self.method == "cert":
            role = (
                f"the cert role {self.settings.role!r} ({PREFIX}VAULT_ROLE)"
                if self.settings.role
                else f"a cert role at auth/{self.mount}"
            )
            return (
                f"check that {role} trusts the client certificate "
                f"VAULT_CLIENT_CERT={self.settings.client_cert} (its CA, allowed names, "
                "constraints) and that it has not expired"
            )
        return (
            f"check {PREFIX}VAULT_ROLE ({self.settings.role!r}) and that the role accepts the "
            f"token in {self.settings.jwt_file} ({PREFIX}VAULT_JWT_FILE): bound service "
            "account, namespace, audience, issuer or signing key"
        )

    def _credentials(self) -> dict[str, str]:
        """Read this method's credentials now (files are re-read every time)."""
        s = self.settings
        if self.method == "token":
            if s.token_file is not None:
                return {
                    "token": read_credential(
                        s.token_file, "Vault token", f"{PREFIX}VAULT_TOKEN_FILE"
                    )
                }
            assert s.token is not None  # enforced by config validation
            return {"token": s.token.reveal()}
        if self.method == "approle":
            creds = {"role_id": s.role_id or ""}
            if s.secret_id_file is not None:
                creds["secret_id"] = read_credential(
                    s.secret_id_file, "AppRole secret id", f"{PREFIX}VAULT_SECRET_ID_FILE"
                )
            return creds
        if self.method == "cert":
            return {}  # the TLS connection presents VAULT_CLIENT_CERT (reloaded on change)
        return {"jwt": read_credential(s.jwt_file, "JWT", f"{PREFIX}VAULT_JWT_FILE")}

    def _login_call(self, creds: dict[str, str]) -> Any:
        s = self.settings
        if self.method == "approle":
            return lambda c: c.auth.approle.login(
                creds["role_id"], creds.get("secret_id"), use_token=False, mount_point=self.mount
            )
        if self.method == "cert":
            body = {"name": s.role} if s.role else {}
            return lambda c: c.adapter.post(f"/v1/auth/{self.mount}/login", json=body)
        if self.method == "kubernetes":
            return lambda c: c.auth.kubernetes.login(
                s.role, creds["jwt"], use_token=False, mount_point=self.mount
            )
        return lambda c: c.auth.jwt.jwt_login(
            s.role, creds["jwt"], use_token=False, path=self.mount
        )

    async def login(self, transport: VaultTransport) -> TokenState:
        """Log in (or, for `token`, load the token) and learn its lifetime."""
        creds = self._credentials()
        self._held = [v for k, v in creds.items() if k != "role_id"]
        try:
            if self.method == "token":
                token, auth = creds["token"], None
            else:
                try:
                    response = await transport.call(self._login_call(creds), token=None)
                except VaultHTTPError as exc:
                    raise self._refused(exc, f"auth/{self.mount}/login") from None
                auth = (response.get("auth") if isinstance(response, dict) else None) or {}
                token = auth.get("client_token") or ""
                if not token:
                    raise VaultLoginRefused(
                        f"Vault's {self.method} login at auth/{self.mount} returned no token"
                    )
            self._held.append(token)
            return await self._describe(transport, token, auth)
        finally:
            self._held = []

    async def _describe(
        self, transport: VaultTransport, token: str, auth: dict[str, Any] | None
    ) -> TokenState:
        """lookup-self for TTL and renewability; the login answer is the fallback."""
        now = self._monotonic()
        try:
            response = await transport.call(_lookup_self, token=token)
            data = (response.get("data") if isinstance(response, dict) else None) or {}
        except VaultHTTPError as exc:
            if auth is None:  # `token`: the lookup is the only check the token works
                raise self._refused(exc, "auth/token/lookup-self") from None
            data = {}
        if auth is not None and not data:
            ttl = float(auth.get("lease_duration") or 0)
            return TokenState(Redacted(token), bool(auth.get("renewable")), ttl, now, int(ttl))
        ttl = float(data.get("ttl") or 0)
        creation = int(data.get("creation_ttl") or ttl)
        return TokenState(Redacted(token), bool(data.get("renewable")), ttl, now, creation)

    def _refused(self, exc: VaultHTTPError, where: str) -> Exception:
        said = exc.said(self._held)
        if self.method == "cert" and "TLS connection" in said:
            return VaultLoginRefused(
                f"Vault refused the cert login (HTTP {exc.status} on {where}: {said}): cert "
                "auth needs VAULT_ADDR to be an https:// address of Vault itself (a TLS-"
                "terminating proxy in between hides the client certificate)"
            )
        return status_error(
            "login",
            exc,
            # Vault's "no handler for route": no auth method there, whatever the status
            status=404
            if exc.status not in (400, 401, 403) and "no handler for route" in said
            else None,
            scrub=self._held,
            where=where,
            what="the token" if self.method == "token" else f"the {self.method} login",
            hint=self.hint(),
            method=self.method,
            mount=self.mount,
            prefix=PREFIX,
        )


def _lookup_self(client: hvac.Client) -> Any:
    return client.auth.token.lookup_self()


async def renew(
    transport: VaultTransport,
    state: TokenState,
    monotonic: Callable[[], float] = time.monotonic,
) -> TokenState:
    """Renew the token; `capped` when Vault granted less than asked (max TTL near)."""
    token = state.token.reveal()
    increment = max(1, state.increment)
    response = await transport.call(
        lambda c: c.auth.token.renew_self(increment=increment), token=token
    )
    auth = (response.get("auth") if isinstance(response, dict) else None) or {}
    ttl = float(auth.get("lease_duration") or 0)
    return TokenState(
        state.token,
        bool(auth.get("renewable", state.renewable)),
        ttl,
        monotonic(),
        state.increment,
        capped=ttl < increment,
    )
