"""The current secret per product: immutable snapshots, replaced whole by the refresher.

The API reads a snapshot with one dict lookup and signs with it; the refresher swaps in
a new one in a single assignment on the event loop, so a request never sees half a secret.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from .signer import RemoteSigner, TokenSigner


@dataclass(frozen=True)
class Snapshot:
    """One loaded secret, ready to sign (or, in transit mode, the key version last seen)."""

    signer: TokenSigner | RemoteSigner
    version: int
    loaded_at: float  # unix time


class SecretStore:
    """Snapshots by product, plus when each was last confirmed by its source."""

    def __init__(
        self,
        products: Iterable[str],
        *,
        max_staleness: float = 0.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.products = tuple(products)
        self.max_staleness = max_staleness
        self._monotonic = monotonic
        self._snapshots: dict[str, Snapshot] = {}
        self._confirmed: dict[str, float] = {}
        self.shutting_down = False

    def current(self, product: str) -> Snapshot | None:
        """The snapshot to sign with, or None if absent or staler than allowed."""
        snapshot = self._snapshots.get(product)
        if snapshot is None or (self.max_staleness and self.age(product) > self.max_staleness):
            return None
        return snapshot

    def peek(self, product: str) -> Snapshot | None:
        """The loaded snapshot regardless of staleness (for change detection)."""
        return self._snapshots.get(product)

    def replace(self, product: str, snapshot: Snapshot) -> None:
        self._snapshots[product] = snapshot
        self.confirm(product)

    def confirm(self, product: str) -> None:
        """The source answered and the secret in use is still right."""
        self._confirmed[product] = self._monotonic()

    def age(self, product: str) -> float:
        """Seconds since the last successful read (inf if never)."""
        confirmed = self._confirmed.get(product)
        return float("inf") if confirmed is None else self._monotonic() - confirmed

    def ready(self) -> bool:
        """Every product can sign now, and the process is not shutting down."""
        return not self.shutting_down and all(self.current(p) is not None for p in self.products)
