"""Transit mode: the product secret lives only in a Vault transit key of type `hmac`
(imported, non-exportable); Vault computes each token's HMAC-SHA512 and the pod never
holds the secret. A mode, not a secret source: there is nothing to read and refresh, so
`TransitMode` stands where the `Refresher` stands (both are a `freshness.Freshness`).

Login, renewal and re-login are the shared `VaultSession`'s. Concurrent tokens are
coalesced into `batch_input` calls (`Coalescer`): one call at a time carries up to
`MAX_BATCH` signing inputs, and a failed or hung call opens a breaker so requests are
refused at once instead of queueing behind a dead Vault. A probe every refresh interval
keeps `/readyz` and the key-version metric honest when no tokens are asked for: its answer
says what the key's version is, even when that is lower than one seen before.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry

from . import __version__
from .blocking import cancel_and_wait
from .coalescer import Coalescer
from .config import Settings, TransitSettings
from .errors import SecretInvalid, SecretUnavailable, SourceError
from .metrics import Metrics
from .names import DEFAULT_PRODUCT
from .signer import RemoteSigner, b64url
from .sources.vault import VaultSession
from .sources.vault_bounds import status_error
from .sources.vault_client import VaultHTTPError
from .state import SecretStore, Snapshot
from .timing import jittered, sleep_or_wake

log = logging.getLogger(__name__)

# Chosen by measurement (README "Performance"): one call in flight carrying up to 64
# inputs keeps OpenBao's and our per-call costs (a thread, an HTTP round trip, JSON) off
# the per-token path; a second call in flight bought nothing on two cores.
MAX_BATCH = 64
MAX_IN_FLIGHT = 1
#: What the readiness probe asks Vault to MAC: not a JWT (no dots), so its MAC signs nothing.
PROBE_INPUT = b"reditus-sidecar transit probe"
_HMAC = re.compile(r"^vault:v(\d+):([A-Za-z0-9+/]+={0,2})$")
_SHA512_BYTES = 64

Outcome = tuple[bytes, int] | SourceError  # (base64url signature, key version) or the error


def parse_hmac(value: object) -> tuple[bytes, int]:
    """`vault:vN:<std base64>` -> (base64url signature without padding, N)."""
    match = _HMAC.match(value) if isinstance(value, str) else None
    if match is None:
        raise SecretInvalid("Vault's transit answer is not an HMAC of the form vault:vN:...")
    try:
        digest = base64.b64decode(match.group(2), validate=True)
    except binascii.Error:
        raise SecretInvalid("Vault's transit answer is not valid base64") from None
    if len(digest) != _SHA512_BYTES:
        raise SecretInvalid(
            f"Vault's transit HMAC is {len(digest)} bytes, not 64: is the algorithm sha2-512?"
        )
    return b64url(digest), int(match.group(1))


class TransitClient:
    """`POST MOUNT/hmac/KEY/sha2-512` with `batch_input`, through the shared session."""

    def __init__(self, session: VaultSession, settings: TransitSettings) -> None:
        self.session = session
        self.settings = settings
        self.path = f"/v1/{settings.mount}/hmac/{settings.key}/sha2-512"
        self.description = f"vault transit {settings.mount}/keys/{settings.key}"

    async def hmac(self, inputs: Sequence[bytes]) -> list[Outcome]:
        """One outcome per input; raises `SourceError` when the whole call failed."""
        body = {"batch_input": [{"input": base64.b64encode(data).decode()} for data in inputs]}
        path, count = self.path, len(inputs)
        response = await self.session.call(
            lambda c: c.adapter.post(url=path, json=body),
            refused=lambda exc: self._refused(exc, count),
            denied="permission denied by transit; logging in again",
            source=self.description,
        )
        return self._outcomes(response, count)

    def _refused(self, exc: VaultHTTPError, count: int) -> Any:
        """Vault answers 400 when every item of a batch failed: still one error per item,
        so that answer is taken; any other refusal is the error of the whole call."""
        if exc.status == 400 and isinstance(exc.body, dict):
            with contextlib.suppress(SecretInvalid):
                self._outcomes(exc.body, count)
                return exc.body
        return transit_error(exc, self.settings)

    def _outcomes(self, response: Any, count: int) -> list[Outcome]:
        data = response.get("data") if isinstance(response, dict) else None
        results = data.get("batch_results") if isinstance(data, dict) else None
        if not isinstance(results, list) or len(results) != count:
            raise SecretInvalid(f"{self.description}: the answer has no batch_results for us")
        outcomes: list[Outcome] = []
        for item in results:
            error = item.get("error") if isinstance(item, dict) else "not an object"
            if error:
                outcomes.append(SecretUnavailable(f"{self.description}: {str(error)[:200]}"))
                continue
            try:
                outcomes.append(parse_hmac(item.get("hmac")))
            except SecretInvalid as exc:
                outcomes.append(exc)
        return outcomes


def transit_error(exc: VaultHTTPError, settings: TransitSettings) -> SourceError:
    """An operator-facing error for a failed transit call."""
    where = f"vault transit {settings.mount}/keys/{settings.key}"
    path = f"{settings.mount}/hmac/{settings.key}/sha2-512"
    return status_error(
        "transit",
        exc,
        where=where,
        capability="update",
        path=path,
        policy="reditus-sidecar-transit.hcl",
        mount=settings.mount,
        key=settings.key,
    )


class TransitSigner(RemoteSigner):
    """Tokens whose HMAC the coalescer gets from transit; nothing secret in the pod."""

    __slots__ = ("_coalescer",)

    def __init__(
        self, product_id: str, coalescer: Coalescer[bytes, tuple[bytes, int]], *, ttl: int = 0
    ) -> None:
        super().__init__(product_id, ttl=ttl)
        self._coalescer = coalescer

    async def sign_remote(self, user_id: str, iat: int) -> tuple[str, int]:
        signing_input = self.signing_input(user_id, iat)
        signature, version = await self._coalescer.submit(signing_input)
        return (signing_input + b"." + signature).decode("ascii"), version


class TransitMode:
    """Transit signing for the one product: the session, the coalescer, the probe, and
    what the store and metrics say. The `Freshness` of transit mode, as the `Refresher` is
    that of the local-key sources."""

    product = DEFAULT_PRODUCT

    def __init__(
        self,
        settings: Settings,
        store: SecretStore,
        metrics: Metrics,
        *,
        session: VaultSession | None = None,
        max_batch: int | None = None,
        max_in_flight: int | None = None,
        rng: random.Random | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        perf_counter: Callable[[], float] = time.perf_counter,
        wall: Callable[[], float] = time.time,
    ) -> None:
        assert settings.transit is not None  # checked by load_settings
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.interval = settings.refresh_interval
        self._monotonic = monotonic
        self._perf_counter = perf_counter
        self._wall = wall
        self.session = session or VaultSession(
            settings.vault,
            metrics,
            backoff_max=settings.backoff_max,
            monotonic=monotonic,
            wall=wall,
        )
        self.client = TransitClient(self.session, settings.transit)
        self.description = self.client.description
        self.coalescer: Coalescer[bytes, tuple[bytes, int]] = Coalescer(
            self._call,
            max_batch=max_batch or MAX_BATCH,
            max_in_flight=max_in_flight or MAX_IN_FLIGHT,
            backoff_max=settings.backoff_max,
            rng=rng,
        )
        self.signer = TransitSigner(
            settings.transit.product_id, self.coalescer, ttl=settings.token_ttl
        )
        self._rng = rng or random.Random()  # noqa: S311 - jitter, not cryptography
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._next_probe = 0.0
        self._batch_size = metrics.transit_batch_size
        self._call_duration = metrics.transit_call_duration
        self._calls = {r: metrics.transit_calls.labels(result=r) for r in ("success", "error")}

    # --- the batch call ---------------------------------------------------------------

    async def _call(self, inputs: list[bytes]) -> list[Outcome]:
        started = self._perf_counter()
        try:
            outcomes = await self.client.hmac(inputs)
        except SourceError:
            self._observe(len(inputs), started, "error")
            raise
        self._observe(len(inputs), started, "success")
        versions = [o[1] for o in outcomes if isinstance(o, tuple)]
        if versions:
            self._seen(max(versions))
        return outcomes

    def _observe(self, size: int, started: float, result: str) -> None:
        self._batch_size.observe(size)
        self._call_duration.observe(self._perf_counter() - started)
        self._calls[result].inc()

    def _seen(self, version: int, *, probed: bool = False) -> None:
        """Vault signed with key `version`: the store is confirmed, or moves to it.

        A token's answer only moves it up: a standby that has not seen a rotation yet may
        still sign with the previous version. The probe's answer is taken as it is, or one
        answer with a version the key does not have (a key deleted and created again, which
        starts at 1 again; a bogus answer from something in between) would stay in the
        store and in `reditus_sidecar_secret_version` until a restart."""
        current = self.store.peek(self.product)
        now = self._wall()
        self.metrics.secret_last_success.labels(product=self.product).set(now)
        if current is not None and (
            current.version == version or (current.version > version and not probed)
        ):
            self.store.confirm(self.product)
            return
        self.store.replace(self.product, Snapshot(self.signer, version=version, loaded_at=now))
        self.metrics.secret_version.labels(product=self.product).set(version)
        self.metrics.secret_loaded.labels(product=self.product).set(now)
        extra = {
            "product": self.product,
            "product_id": self.signer.product_id,
            "source": self.description,
            "version": version,
            "previous_version": current.version if current else None,
        }
        if current is None:
            log.info("transit key in use", extra=extra)
        elif version > current.version:
            log.info("transit key rotated", extra=extra)
        else:
            log.warning(
                "transit key version went back: the key was created again, or an earlier "
                "answer claimed a version it does not have",
                extra=extra,
            )

    # --- the probe --------------------------------------------------------------------

    async def probe(self) -> bool:
        """One cheap HMAC through the coalescer (it shares a batch with any traffic)."""
        previous = self.store.peek(self.product)
        try:
            _, version = await self.coalescer.submit(PROBE_INPUT)
        except SourceError as exc:
            self._count_probe("error")
            log.warning(
                "transit probe failed",
                extra={"product": self.product, "source": self.description, "error": str(exc)},
            )
            return False
        self._seen(version, probed=True)
        changed = previous is None or previous.version != version
        self._count_probe("changed" if changed else "unchanged")
        return True

    def _count_probe(self, result: str) -> None:
        self.metrics.secret_refresh.labels(product=self.product, result=result).inc()

    async def _loop(self) -> None:
        while True:
            self._wake.clear()
            if await self.probe():
                delay = jittered(self.interval, self._rng)
            else:
                delay = max(0.05, self.coalescer.refused_for())
            self._next_probe = self._monotonic() + delay
            await sleep_or_wake(self._wake, delay)

    # --- Freshness: what the server asks of whatever keeps signing material fresh ------

    def retry_after(self, _product: str) -> int:
        """Whole seconds until signing may work again (for Retry-After)."""
        wait = self.coalescer.refused_for() or (self._next_probe - self._monotonic())
        return max(1, min(int(self.settings.backoff_max), round(wait)))

    def refresh_now(self) -> None:
        """SIGHUP: probe now (shows a new key version without waiting for traffic); a storm
        of them owes one probe, and one log line."""
        if not self._wake.is_set():
            log.info("refresh requested")
        self._wake.set()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="transit")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            await cancel_and_wait([task])  # the probe loop sleeps in sleep_or_wake
        await self.coalescer.close()


async def sign_once(settings: Settings, user_id: str | None, iat: int) -> tuple[str, int]:
    """For `check` and `sign`: one HMAC from transit (the probe input when `user_id` is
    None); returns (token or "", key version). The token it logged in for is revoked at
    the end, as `serve` does at shutdown."""
    store = SecretStore([DEFAULT_PRODUCT])
    # A one-shot command exports no metrics: they go to a registry of their own.
    metrics = Metrics(CollectorRegistry(), [DEFAULT_PRODUCT], __version__)
    mode = TransitMode(settings, store, metrics)
    await mode.session.start()
    try:
        if user_id is None:
            _, version = await mode.coalescer.submit(PROBE_INPUT)
            return "", version
        return await mode.signer.sign_remote(user_id, iat)
    finally:
        await mode.stop()
        await mode.session.close(revoke=True)
