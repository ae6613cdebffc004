"""The `vault` source: KV v2 reads through one shared, self-renewing Vault session.

`VaultSession` owns the token: it logs in lazily (or from `start()`), renews at about
two thirds of the TTL, logs in again when the token is not renewable, nears its max
TTL or draws a 403, and backs off exponentially between failed logins. Every product's
`VaultSource` shares it, and concurrent fetches share one in-flight login (a lock), so
a Vault outage never turns into a login storm. No call can stall the event loop or
`close()`: hvac runs in daemon threads bounded by `REDITUS_SIDECAR_VAULT_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import hvac

from ..blocking import cancel_and_wait
from ..config import Product, VaultSettings
from ..errors import SecretInvalid, SourceError
from ..timing import backoff_delay, sleep_or_wake
from .base import SecretMaterial, material_from_mapping
from .vault_auth import Authenticator, TokenState, renew
from .vault_bounds import status_error
from .vault_client import VaultHTTPError, VaultTimeout, VaultTransport
from .vault_tls import ClientPair

if TYPE_CHECKING:
    from ..metrics import Metrics

T = TypeVar("T")

log = logging.getLogger(__name__)
# Revocation speaks on a logger of its own: the one-shot commands silence the session's
# logger (its "login failed, retry in N s" promises a retry they never make), but a token
# they could not revoke is still worth a warning.
revoke_log = logging.getLogger(f"{__name__}.revoke")

RENEW_AT = 2 / 3  # of the TTL: leaves a third of it for retries when Vault is down
EXPIRY_MARGIN = 0.5  # seconds: a token this close to expiry is not used any more
DEFAULT_BACKOFF_MAX = 30.0
STALE_TOKEN_PAUSE = 1.0  # seconds between re-reads of a token file that is about to expire
REVOKE_TIMEOUT = 2.0  # seconds at most for revoke-self at shutdown: exit must fit the grace


class VaultSession:
    """The Vault login shared by every product's source (started and closed once)."""

    def __init__(
        self,
        settings: VaultSettings,
        metrics: Metrics,
        *,
        backoff_max: float = DEFAULT_BACKOFF_MAX,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.backoff_max = backoff_max
        self._monotonic = monotonic
        self._wall = wall
        self.transport = VaultTransport(settings, self._client_cert_loaded)
        if self.transport.pair is not None:
            metrics.vault_client_cert_expiry.set(self.transport.pair.not_after.timestamp())
        self.auth = Authenticator(settings, monotonic)
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._state: TokenState | None = None
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._login_failures = 0
        self._not_before = 0.0
        self._last_error: SourceError | None = None

    # --- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Start background login and renewal; never waits for Vault."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._maintain(), name="vault-token"
            )

    async def close(self, *, revoke: bool = False) -> None:
        """Stop at once, even with a call to a hung Vault in flight (its thread is dropped);
        with `revoke`, first revoke our own token (see `revoke`)."""
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])
        if revoke:
            await self.revoke()
        self.transport.close()
        self._state = None
        self.metrics.vault_token_expiry.set(0)

    async def revoke(self) -> None:
        """Revoke the token we logged in for (REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN): a pod's
        token dies with it instead of living out its TTL. A token we were handed (VAULT_TOKEN,
        a token file) belongs to whoever handed it: only the value `all` revokes it. Bounded
        by min(REVOKE_TIMEOUT, the Vault timeout) so a hung Vault never holds up the exit."""
        mode, state = self.settings.revoke_on_shutdown, self._state
        if mode == "false" or state is None:
            return
        if self.auth.method == "token" and mode != "all":
            revoke_log.debug("not revoking the Vault token: it was handed to the sidecar")
            return
        timeout = min(REVOKE_TIMEOUT, self.settings.timeout)
        token = state.token.reveal()
        try:
            await self.transport.call_within(_revoke_self, token=token, bound=timeout)
        except VaultTimeout:
            revoke_log.warning(
                "revoking the Vault token at shutdown timed out; it lapses at its TTL",
                extra={"detail": f"no answer within {timeout:g}s"},
            )
        except VaultHTTPError as exc:
            revoke_log.warning(
                "Vault refused to revoke the token at shutdown; it lapses at its TTL",
                extra={"status": exc.status, "error": exc.said([token])},
            )
        except SourceError as exc:
            revoke_log.warning(
                "could not revoke the Vault token at shutdown; it lapses at its TTL",
                extra={"error": str(exc)},
            )
        else:
            revoke_log.info(
                "revoked the Vault token at shutdown", extra={"method": self.auth.method}
            )

    def _client_cert_loaded(self, result: str, pair: ClientPair | None) -> None:
        self.metrics.vault_client_cert_reload.labels(result=result).inc()
        if pair is not None:
            self.metrics.vault_client_cert_expiry.set(pair.not_after.timestamp())

    # --- token -----------------------------------------------------------------------

    def _usable(self, state: TokenState | None) -> bool:
        if state is None:
            return False
        expires = state.expires_at
        return expires is None or self._monotonic() < expires - EXPIRY_MARGIN

    async def token(self) -> TokenState:
        """A usable token, logging in first if there is none."""
        state = self._state
        if self._usable(state):
            assert state is not None
            return state
        return await self.login(stale=state)

    async def login(self, stale: TokenState | None = None) -> TokenState:
        """Log in once for everyone waiting; `stale` is the token the caller found bad."""
        async with self._lock:
            current = self._state
            if current is not None and current is not stale and self._usable(current):
                return current  # another caller logged in while we waited
            remaining = self._not_before - self._monotonic()
            if remaining > 0 and self._last_error is not None:
                last = self._last_error
                raise type(last)(str(last), retry_after=max(remaining, last.retry_after or 0))
            try:
                state = await self.auth.login(self.transport)
            except SourceError as exc:
                self._login_failures += 1
                delay = backoff_delay(self._login_failures, self.backoff_max, self._rng)
                delay = max(delay, exc.retry_after or 0)  # Vault's Retry-After, if longer
                self._not_before = self._monotonic() + delay
                self._last_error = exc
                self._count_login("error")
                log.warning(
                    "Vault login failed",
                    extra={
                        "method": self.auth.method,
                        "error": str(exc),
                        "retry_in": round(delay, 2),
                    },
                )
                raise
            self._login_failures = 0
            self._last_error = None
            self._set_state(state)
            self._count_login("success")
            log.info(
                "logged in to Vault",
                extra={"method": self.auth.method, "ttl": state.ttl or None},
            )
            return state

    def _set_state(self, state: TokenState) -> None:
        self._state = state
        self._wake.set()
        self.metrics.vault_token_expiry.set(state.expiry_wall_time(self._monotonic, self._wall))

    def _count_login(self, result: str) -> None:
        self.metrics.vault_login.labels(method=self.auth.method, result=result).inc()

    def _count_renewal(self, result: str) -> None:
        self.metrics.vault_token_renewal.labels(result=result).inc()

    def _due_at(self, state: TokenState) -> float | None:
        """When to renew or log in again; None when nothing would help (or is needed)."""
        if state.ttl <= 0:
            return None
        if (state.renewable and not state.capped) or self.auth.can_relogin:
            return state.granted_at + state.ttl * RENEW_AT
        return None

    async def _maintain(self) -> None:
        """Background: keep a token, renew it, replace it before it dies."""
        renew_failures = 0
        while True:
            self._wake.clear()  # before reading the state: a login after this wakes us
            state = self._state
            if state is not None and self._usable(state):
                due = self._due_at(state)
                wait = None if due is None else due - self._monotonic()
                if wait is None or wait > 0:
                    await sleep_or_wake(self._wake, wait)
                    continue
                if state.renewable and not state.capped:
                    if await self._renew(state):
                        renew_failures = 0
                        continue
                    renew_failures += 1
                    left = (state.expires_at or self._monotonic()) - self._monotonic()
                    delay = backoff_delay(renew_failures, self.backoff_max, self._rng)
                    await asyncio.sleep(max(0.05, min(delay, left / 2)))
                    continue
            await self._relogin(state)

    async def _relogin(self, stale: TokenState | None) -> None:
        """Replace `stale`; after a failure, wait out the login backoff."""
        try:
            fresh = await self.login(stale=stale)
        except SourceError:
            await asyncio.sleep(max(0.05, self._not_before - self._monotonic()))
            return
        if not self._usable(fresh):
            # A token file still holding a dying token: give its writer time.
            await asyncio.sleep(STALE_TOKEN_PAUSE)

    async def _renew(self, state: TokenState) -> bool:
        """Renew once; a refused renewal (4xx) marks the token for a new login, an
        unavailable Vault (429, 5xx) is retried with the token kept."""
        try:
            renewed = await renew(self.transport, state, self._monotonic)
        except VaultHTTPError as exc:
            self._count_renewal("error")
            if exc.unavailable:
                # Sealed, failing over, or a load balancer with no active node behind it:
                # the token is still good. Retry on the backoff; a login would fail too.
                log.warning(
                    "Vault token renewal failed",
                    extra={"status": exc.status, "error": exc.said()},
                )
                return False
            log.warning(
                "Vault refused to renew the token; logging in again",
                extra={"status": exc.status, "error": exc.said()},
            )
            state.capped = True
            state.renewable = False
            return True
        except SourceError as exc:
            self._count_renewal("error")
            log.warning("Vault token renewal failed", extra={"error": str(exc)})
            return False
        self._count_renewal("success")
        if self._state is state:
            self._set_state(renewed)
        log.debug("renewed the Vault token", extra={"ttl": renewed.ttl})
        if renewed.capped:
            log.info(
                "the Vault token nears its max TTL; logging in again before it expires",
                extra={"ttl": renewed.ttl},
            )
        return True

    # --- KV v2 ----------------------------------------------------------------------

    # --- one call, with the token and the 403 re-login ------------------------------

    async def call(
        self,
        fn: Callable[[hvac.Client], T],
        *,
        refused: Callable[[VaultHTTPError], SourceError | T],
        denied: str,
        source: str,
    ) -> T:
        """Run `fn` with our token; on a 403, log in again once (a token revoked or its
        policies changed under us) and retry. Any other refusal, or a second 403, goes to
        `refused`: the error to raise, or (transit's batch that failed item by item) an
        answer after all. `denied` is the log line of the re-login, `source` what was asked."""
        state = await self.token()
        try:
            return await self.transport.call(fn, token=state.token.reveal())
        except VaultHTTPError as exc:
            if exc.status != 403:
                return _answer_or_raise(refused(exc))
        log.info(denied, extra={"source": source, "method": self.auth.method})
        state = await self.login(stale=state)
        try:
            return await self.transport.call(fn, token=state.token.reveal())
        except VaultHTTPError as exc:
            return _answer_or_raise(refused(exc))

    # --- KV v2 ----------------------------------------------------------------------

    async def read_kv(self, mount: str, path: str) -> tuple[Any, int]:
        """The `data` of the latest version and its number; log in again once on 403."""
        response = await self.call(
            lambda c: c.secrets.kv.v2.read_secret_version(
                path=path, mount_point=mount, raise_on_deleted_version=True
            ),
            refused=lambda exc: kv_error(exc, mount, path),
            denied="permission denied reading the secret; logging in again",
            source=f"vault {mount}/{path}",
        )
        body = response.get("data") if isinstance(response, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("metadata"), dict):
            raise SecretInvalid(
                f"vault {mount}/{path}: the answer is not a KV version 2 secret: check that "
                f"{mount}/ is a KV v2 mount (REDITUS_SIDECAR_KV_MOUNT)"
            )
        version = body["metadata"].get("version")
        return body.get("data"), int(version) if isinstance(version, int) else 0


def _answer_or_raise(outcome: SourceError | T) -> T:
    if isinstance(outcome, SourceError):
        raise outcome from None
    return outcome


def _revoke_self(client: hvac.Client) -> int:
    """POST auth/token/revoke-self; Vault answers 204, which hvac hands back raw."""
    response = client.auth.token.revoke_self()
    return int(getattr(response, "status_code", 0))


def kv_error(exc: VaultHTTPError, mount: str, path: str) -> SourceError:
    """An operator-facing error for a failed KV v2 read."""
    data_path = f"{mount}/data/{path}"
    where = f"vault {mount}/{path}"
    if exc.status == 404:
        body = exc.body if isinstance(exc.body, dict) else {}
        metadata = (body.get("data") or {}).get("metadata") or {}
        version = metadata.get("version")
        if metadata.get("destroyed"):
            return SecretInvalid(
                f"{where}: the latest version ({version}) is destroyed: write a new version "
                f"(bao kv put -mount={mount} {path} ...)"
            )
        if metadata.get("deletion_time"):
            return SecretInvalid(
                f"{where}: the latest version ({version}) is deleted: undelete it "
                f"(bao kv undelete -mount={mount} -versions={version} {path}) or write a new one"
            )
    return status_error(
        "kv",
        exc,
        where=where,
        capability="read",
        path=data_path,
        policy="reditus-sidecar.hcl",
        mount=mount,
        kv_path=path,
    )


class VaultSource:
    """One product's secret at KV v2 `mount/path`, read through the shared session."""

    def __init__(self, session: VaultSession, product: Product) -> None:
        self.session = session
        self.product = product
        self.description = f"vault {product.kv_mount}/{product.kv_path}"

    async def changed(self) -> bool:
        return False  # Vault cannot tell us; the refresher polls on its interval

    async def fetch(self) -> SecretMaterial:
        p = self.product
        data, version = await self.session.read_kv(p.kv_mount, p.kv_path)
        return material_from_mapping(
            data,
            product_id_key=p.product_id_key,
            secret_key=p.secret_key,
            version=version,
            where=f"{self.description} version {version}",
        )

    async def close(self) -> None:
        return None  # the session is shared and closed once, by the source set
