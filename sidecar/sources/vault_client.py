"""The one place that touches hvac and requests: building clients explicitly, running
their blocking calls off the event loop, and turning their failures into our errors.

hvac is built so that it never reads `VAULT_TOKEN`, `~/.vault-token`, `VAULT_CACERT`,
`VAULT_CLIENT_CERT` or `REQUESTS_CA_BUNDLE` behind our back: every setting comes from
`VaultSettings`. Its exceptions drop the response headers, so a `requests` response hook
records `Retry-After` (and the status) in a thread-local that the same worker thread
reads when it translates the exception.

Whatever answers at VAULT_ADDR is not trusted to be small or quick: each call has a total
deadline and its answer a size limit (`vault_bounds`), so neither a huge body nor one
dripped a byte at a time can hold memory, a thread or a connection past the call.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import re
import ssl
import threading
import urllib.parse
from collections.abc import Callable
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import requests
import requests.utils

from ..blocking import start_in_thread
from ..config import VaultSettings
from ..errors import ConfigError, SecretUnavailable, SourceError
from .vault_bounds import (
    HVAC_STATUS,
    MAX_ANSWER_BYTES,
    AnswerTooLarge,
    BoundedAdapter,
    BoundedTLSAdapter,
    Deadline,
    VaultAnswerTooLarge,
    VaultHTTPError,
    VaultLoginRefused,
    VaultPermissionDenied,
    VaultTimeout,
    VaultTLSError,
    VaultUnreachable,
    parse_retry_after,
    working_for,
)
from .vault_tls import ClientPair, PairError, Signature, build_context, ca_bundle, signature

log = logging.getLogger(__name__)

# The errors live with the status table (vault_errors); they are imported from here too.
__all__ = [
    "VaultAnswerTooLarge",
    "VaultHTTPError",
    "VaultLoginRefused",
    "VaultPermissionDenied",
    "VaultTLSError",
    "VaultTimeout",
    "VaultTransport",
    "VaultUnreachable",
    "parse_retry_after",
]

T = TypeVar("T")

# Extra time the event loop grants a call beyond the HTTP timeout before giving up on it.
CALL_GRACE = 0.5


class VaultTransport:
    """HTTP to Vault: one requests session, per-call hvac clients, bounded calls."""

    def __init__(
        self,
        settings: VaultSettings,
        on_reload: Callable[[str, ClientPair | None], None] | None = None,
    ) -> None:
        self.settings = settings
        self.addr = settings.addr
        self.timeout = settings.timeout
        self._on_reload = on_reload
        if settings.cacert is not None and settings.capath is not None:
            log.info("VAULT_CAPATH is ignored: VAULT_CACERT is set (as for the Vault CLI)")
        if settings.skip_verify and settings.cacert is None and settings.capath is None:
            self.verify = False
            log.warning(
                "VAULT_SKIP_VERIFY is set: Vault's TLS certificate is NOT verified; "
                "anyone on the path can read the product secret"
            )
            import urllib3

            urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
        else:
            self.verify = True
        self._ca_pem, self.trust = ca_bundle(settings)
        try:
            context, self.pair = build_context(settings, self._ca_pem)
        except PairError as exc:
            raise ConfigError(str(exc)) from None
        self._failed: Signature | None = None  # a pair we could not load; retried on change
        self._local = threading.local()
        self._session = self._new_session(context)
        self._closed = False

    def _new_session(self, context: ssl.SSLContext) -> requests.Session:
        session = requests.Session()
        # No .netrc, no REQUESTS_CA_BUNDLE: only what VaultSettings says. Proxies from
        # HTTPS_PROXY/NO_PROXY are still honoured, resolved once for VAULT_ADDR.
        session.trust_env = False
        session.verify = self.verify
        session.proxies = requests.utils.get_environ_proxies(self.addr)
        session.hooks["response"].append(self._remember)
        session.mount("https://", BoundedTLSAdapter(context, self.settings.tls_server_name))
        session.mount("http://", BoundedAdapter())
        return session

    def reload_client_cert(self) -> None:
        """Use the client pair anew when its files changed; keep the old one while the new
        one cannot be loaded (half written: a cert without its key yet)."""
        s = self.settings
        if self.pair is None or s.client_cert is None or s.client_key is None:
            return
        now = signature(s.client_cert, s.client_key)
        if now is None or now == self.pair.signature or now == self._failed:
            return
        try:
            context, pair = build_context(s, self._ca_pem)
        except PairError as exc:
            self._failed = now
            log.warning(
                "cannot load the renewed Vault client certificate; still using the previous one",
                extra={"error": str(exc)},
            )
            if self._on_reload is not None:
                self._on_reload("error", None)
            return
        old, self._session = self._session, self._new_session(context)
        self.pair, self._failed = pair, None
        old.close()  # idle connections only: a call in flight keeps its own connection
        log.info(
            "loaded the renewed Vault client certificate",
            extra={"detail": f"valid until {pair.not_after:%Y-%m-%dT%H:%M:%SZ}"} if pair else {},
        )
        if self._on_reload is not None:
            self._on_reload("success", pair)

    def _check_expiry(self) -> None:
        if self.pair is not None and self.pair.not_after <= datetime.datetime.now(datetime.UTC):
            raise VaultTLSError(
                f"the client certificate VAULT_CLIENT_CERT={self.settings.client_cert} expired "
                f"at {self.pair.not_after:%Y-%m-%dT%H:%M:%SZ}: renew it (and its key, "
                "VAULT_CLIENT_KEY); it is re-read when the files change"
            )

    def _remember(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        self._local.status = response.status_code
        self._local.retry_after = response.headers.get("Retry-After")

    def client(self, token: str | None, timeout: float | None = None) -> hvac.Client:
        """An hvac client for one call; the token is explicit ("" means none)."""
        return hvac.Client(
            url=self.addr,
            token=token or "",  # never None: hvac would read VAULT_TOKEN / ~/.vault-token
            cert=(),  # never None: hvac would read VAULT_CLIENT_CERT (the adapter holds ours)
            verify=self.verify,
            timeout=timeout or self.timeout,
            session=self._session,
            namespace=self.settings.namespace,
        )

    def _blocking(
        self,
        fn: Callable[[hvac.Client], T],
        token: str | None,
        timeout: float,
        deadline: Deadline,
    ) -> T:
        """The call in its worker thread, its connections bound to `deadline`: whatever a
        connection cut at the deadline makes requests raise is reported as the timeout."""
        with working_for(deadline):
            try:
                return self._translated(fn, token, timeout)
            except (SourceError, VaultHTTPError):
                if deadline.stopped:
                    raise self._timeout_error() from None
                raise

    def _translated(self, fn: Callable[[hvac.Client], T], token: str | None, timeout: float) -> T:
        self._local.status = None
        self._local.retry_after = None
        try:
            result = fn(self.client(token, timeout))
            if isinstance(result, requests.Response):  # hvac's way of saying "not JSON"
                raise ValueError(result.headers.get("Content-Type"))
            return result
        except hvac.exceptions.VaultError as exc:
            status = getattr(self._local, "status", None) or HVAC_STATUS.get(type(exc), 0)
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
            if "SSL" in str(exc):  # TLS 1.3: a refused client certificate shows on the read
                raise self._tls_error(exc) from None
            raise self._unreachable(exc) from None
        except AnswerTooLarge:
            raise VaultAnswerTooLarge(
                f"Vault's answer exceeds {MAX_ANSWER_BYTES >> 20} MiB: {self.addr} sent more "
                "than any answer the sidecar needs, and the rest was not read; check "
                "VAULT_ADDR (and any proxy in between)"
            ) from None
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
        return await self.call_within(fn, token=token, bound=self.timeout)

    async def call_within(
        self, fn: Callable[[hvac.Client], T], *, token: str | None, bound: float
    ) -> T:
        """`call` with a tighter bound in seconds (the revocation at shutdown)."""
        if self._closed:
            raise SecretUnavailable("the Vault session is closed")
        self.reload_client_cert()
        self._check_expiry()
        deadline = Deadline(bound)
        # Fires even when the caller has stopped waiting (a timeout, a cancelled task):
        # what it ends is the worker thread's connection, not the wait.
        timer = asyncio.get_running_loop().call_later(bound, deadline.expire)
        future = start_in_thread(
            lambda: self._blocking(fn, token, bound, deadline), name="vault-call"
        )

        def answered(done: asyncio.Future[T]) -> None:
            if not done.cancelled():  # the thread has ended: no connection left to cut
                timer.cancel()

        future.add_done_callback(answered)
        try:
            return await asyncio.wait_for(future, bound + CALL_GRACE)
        except TimeoutError:
            raise self._timeout_error() from None

    def close(self) -> None:
        self._closed = True
        self._session.close()

    def _timeout_error(self) -> VaultTimeout:
        return VaultTimeout(
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
        """Name the failure and the variable or file that fixes it."""
        text = str(exc)
        s = self.settings
        match = re.search(r"certificate verify failed: ([^(')\"]+)", text)
        if match:
            detail = f"certificate verify failed: {match.group(1).strip()}"
            hint = self._untrusted_hint(match.group(1))
        elif "doesn't match" in text:  # urllib3's own check of VAULT_TLS_SERVER_NAME
            detail = "certificate verify failed: name mismatch"
            hint = self._untrusted_hint("mismatch")
        elif "WRONG_VERSION_NUMBER" in text or "wrong version number" in text:
            detail = "the server did not speak TLS"
            hint = "use http:// in VAULT_ADDR if Vault listens without TLS"
        elif _alert(text, "CERTIFICATE_REQUIRED", "certificate required") or (
            s.client_cert is None and _alert(text, "BAD_CERTIFICATE", "HANDSHAKE_FAILURE")
        ):
            detail = "Vault requires a client certificate"
            hint = "set VAULT_CLIENT_CERT and VAULT_CLIENT_KEY to a certificate its listener trusts"
        elif _alert(text, "CERTIFICATE_EXPIRED", "certificate expired"):
            detail = "the client certificate expired"
            hint = (
                f"Vault refused the client certificate VAULT_CLIENT_CERT={s.client_cert} as "
                "expired: renew it (and VAULT_CLIENT_KEY)"
            )
        elif _alert(
            text, "BAD_CERTIFICATE", "UNKNOWN_CA", "CERTIFICATE_UNKNOWN", "DECRYPT_ERROR"
        ) or (s.client_cert is not None and _alert(text, "EOF occurred", "UNEXPECTED_EOF")):
            # Vault (Go) refuses a client certificate by closing the handshake: an EOF here.
            detail = "client certificate refused"
            hint = (
                f"Vault refused the client certificate VAULT_CLIENT_CERT={s.client_cert}: it "
                "must be signed by a CA in the listener's tls_client_ca_file, be within its "
                "validity and allow client authentication"
            )
        else:
            detail = "handshake failed"
            hint = f"check VAULT_ADDR and the TLS settings ({self.trust})"
        return VaultTLSError(f"TLS connection to Vault at {self.addr} failed ({detail}): {hint}")

    def _untrusted_hint(self, reason: str) -> str:
        s = self.settings
        if "mismatch" in reason or "match" in reason:
            if s.tls_server_name:
                return (
                    f"Vault's certificate is not valid for VAULT_TLS_SERVER_NAME="
                    f"{s.tls_server_name}: set it to a name the certificate carries"
                )
            host = urllib.parse.urlsplit(self.addr).hostname
            return (
                f"Vault's certificate is not valid for {host}: use an address it names in "
                "VAULT_ADDR, or set VAULT_TLS_SERVER_NAME to a name it carries"
            )
        if "expired" in reason:
            return "Vault's own certificate has expired: renew it on the Vault listener"
        if s.cacert is None and s.capath is None:
            return (
                "Vault's certificate is not trusted: set VAULT_CACERT to the PEM file "
                "(or VAULT_CAPATH to a directory) of the CA that signed it"
            )
        return (
            f"Vault's certificate is not trusted: {self.trust} does not hold the CA that signed it"
        )


def _alert(text: str, *names: str) -> bool:
    """Whether an OpenSSL error text carries one of these TLS alerts."""
    return any(name in text or name.lower().replace("_", " ") in text for name in names)
