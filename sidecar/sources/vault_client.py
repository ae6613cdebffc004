"""The one place that touches hvac and requests: building clients explicitly, running
their blocking calls off the event loop, and turning their failures into our errors.

hvac is built so that it never reads `VAULT_TOKEN`, `~/.vault-token`, `VAULT_CACERT`,
`VAULT_CLIENT_CERT` or `REQUESTS_CA_BUNDLE` behind our back: every setting comes from
`VaultSettings`. Its exceptions drop the response headers, so a `requests` response hook
records `Retry-After` (and the status) in a thread-local that the same worker thread
reads when it translates the exception.
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
import requests.utils

from ..blocking import start_in_thread
from ..config import VaultSettings
from ..errors import SecretUnavailable, VaultAuthError

log = logging.getLogger(__name__)

T = TypeVar("T")

# Extra time the event loop grants a call beyond the HTTP timeout before giving up on it.
CALL_GRACE = 0.5
MAX_VAULT_MESSAGE = 200


class VaultUnreachable(SecretUnavailable):
    """No HTTP answer from Vault: connection refused, DNS, timeout."""


class VaultTLSError(SecretUnavailable):
    """The TLS handshake with Vault failed (usually an untrusted certificate)."""


class VaultLoginRefused(VaultAuthError):
    """Vault refused our credentials at login."""


class VaultPermissionDenied(VaultAuthError):
    """Vault accepted our token but its policies do not allow the read."""


@dataclass
class VaultHTTPError(Exception):
    """Vault answered with an error status; what hvac knew plus the headers it drops."""

    status: int
    errors: list[str]
    retry_after: float | None
    body: Any

    def said(self, scrub: Iterable[str] = ()) -> str:
        """Vault's own error text, shortened and with any credential we hold masked."""
        text = "; ".join(e for e in self.errors if isinstance(e, str)) or "no error text"
        for value in scrub:
            if value:
                text = text.replace(value, "********")
        text = " ".join(text.split())
        return text[:MAX_VAULT_MESSAGE] + ("..." if len(text) > MAX_VAULT_MESSAGE else "")


_STATUS = {
    hvac.exceptions.InvalidRequest: 400,
    hvac.exceptions.Unauthorized: 401,
    hvac.exceptions.Forbidden: 403,
    hvac.exceptions.InvalidPath: 404,
    hvac.exceptions.PreconditionFailed: 412,
    hvac.exceptions.RateLimitExceeded: 429,
    hvac.exceptions.InternalServerError: 500,
    hvac.exceptions.VaultNotInitialized: 501,
    hvac.exceptions.BadGateway: 502,
    hvac.exceptions.VaultDown: 503,
}


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class VaultTransport:
    """HTTP to Vault: one requests session, per-call hvac clients, bounded calls."""

    def __init__(self, settings: VaultSettings) -> None:
        self.settings = settings
        self.addr = settings.addr
        self.timeout = settings.timeout
        if settings.cacert is not None:
            self.verify: bool | str = str(settings.cacert)
        elif settings.skip_verify:
            self.verify = False
            log.warning(
                "VAULT_SKIP_VERIFY is set: Vault's TLS certificate is NOT verified; "
                "anyone on the path can read the product secret"
            )
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        else:
            self.verify = True
        self._local = threading.local()
        self._session = self._new_session()
        self._closed = False

    def _new_session(self) -> requests.Session:
        session = requests.Session()
        # No .netrc, no REQUESTS_CA_BUNDLE: only what VaultSettings says. Proxies from
        # HTTPS_PROXY/NO_PROXY are still honoured, resolved once for VAULT_ADDR.
        session.trust_env = False
        session.verify = self.verify
        session.proxies = requests.utils.get_environ_proxies(self.addr)
        session.hooks["response"].append(self._remember)
        return session

    def _remember(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._local.status = response.status_code
        self._local.retry_after = response.headers.get("Retry-After")

    def client(self, token: str | None) -> hvac.Client:
        """An hvac client for one call; the token is explicit ("" means none)."""
        return hvac.Client(
            url=self.addr,
            token=token or "",  # never None: hvac would read VAULT_TOKEN / ~/.vault-token
            cert=(),  # never None: hvac would read VAULT_CLIENT_CERT
            verify=self.verify,
            timeout=self.timeout,
            session=self._session,
            namespace=self.settings.namespace,
        )

    def _blocking(self, fn: Callable[[hvac.Client], T], token: str | None) -> T:
        self._local.status = None
        self._local.retry_after = None
        try:
            result = fn(self.client(token))
            if isinstance(result, requests.Response):  # hvac's way of saying "not JSON"
                raise ValueError(result.headers.get("Content-Type"))
            return result
        except hvac.exceptions.VaultError as exc:
            status = getattr(self._local, "status", None) or _STATUS.get(type(exc), 0)
            errors = exc.errors if isinstance(exc.errors, list) else [str(exc.args[0] or "")]
            raise VaultHTTPError(
                status=int(status),
                errors=[str(e) for e in errors],
                retry_after=parse_retry_after(getattr(self._local, "retry_after", None)),
                body=exc.json,
            ) from None
        except requests.exceptions.SSLError as exc:
            raise self._tls_error(exc) from None
        except requests.exceptions.Timeout:
            raise self._timeout_error() from None
        except requests.exceptions.ConnectionError as exc:
            raise self._unreachable(exc) from None
        except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema):
            raise VaultUnreachable(f"VAULT_ADDR={self.addr!r} is not a usable URL") from None
        except ValueError:  # JSON decoding: a proxy or another service answered
            raise VaultUnreachable(
                f"{self.addr} answered with something that is not Vault's JSON API: "
                "check VAULT_ADDR (and any proxy in between)"
            ) from None
        except requests.exceptions.RequestException as exc:
            raise VaultUnreachable(
                f"request to Vault at {self.addr} failed: {type(exc).__name__}"
            ) from None

    async def call(self, fn: Callable[[hvac.Client], T], *, token: str | None) -> T:
        """Run one blocking hvac call off the loop (see `blocking`), bounded by the timeout."""
        if self._closed:
            raise SecretUnavailable("the Vault session is closed")
        future = start_in_thread(lambda: self._blocking(fn, token), name="vault-call")
        try:
            return await asyncio.wait_for(future, self.timeout + CALL_GRACE)
        except TimeoutError:
            raise self._timeout_error() from None

    def close(self) -> None:
        self._closed = True
        self._session.close()

    def _timeout_error(self) -> VaultUnreachable:
        return VaultUnreachable(
            f"Vault at {self.addr} did not answer within {self.timeout:g}s "
            "(REDITUS_SIDECAR_VAULT_TIMEOUT): it is hung, overloaded or unreachable"
        )

    def _unreachable(self, exc: Exception) -> VaultUnreachable:
        text = str(exc)
        if "Connection refused" in text:
            reason = "connection refused"
        elif "Name or service not known" in text or "nodename nor servname" in text:
            reason = "host name not found"
        elif "Network is unreachable" in text or "No route to host" in text:
            reason = "no route to host"
        else:
            reason = "connection failed"
        return VaultUnreachable(
            f"Vault at {self.addr} is unreachable ({reason}): check VAULT_ADDR and that "
            "Vault is running and reachable from here"
        )

    def _tls_error(self, exc: Exception) -> VaultTLSError:
        text = str(exc)
        match = re.search(r"certificate verify failed: ([^(')\"]+)", text)
        if match:
            detail = f"certificate verify failed: {match.group(1).strip()}"
            ca = (
                f"VAULT_CACERT={self.settings.cacert} does not hold the CA that signed it"
                if self.settings.cacert
                else "set VAULT_CACERT to the PEM file of the CA that signed it"
            )
            hint = f"Vault's certificate is not trusted: {ca}"
        elif "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
            detail = "the server did not speak TLS"
            hint = "use http:// in VAULT_ADDR if Vault listens without TLS"
        else:
            detail = "handshake failed"
            hint = "check VAULT_ADDR and VAULT_CACERT"
        return VaultTLSError(f"TLS connection to Vault at {self.addr} failed ({detail}): {hint}")
