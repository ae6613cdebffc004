"""What keeps signing material fresh, as the server sees it.

Two things do: the `Refresher` (local key: it reads each product's secret from its source
on an interval) and `TransitMode` (the key stays in Vault: a probe keeps readiness and the
key version honest). The server starts and stops one of them, turns SIGHUP into
`refresh_now()`, and asks it for the Retry-After of a product that cannot sign yet.
"""

from __future__ import annotations

from typing import Protocol


class Freshness(Protocol):
    """Keeps the store's snapshots usable: started once, stopped once."""

    def start(self) -> None:
        """Start the background work (needs a running event loop); never waits for it."""

    async def stop(self) -> None:
        """Stop the background work and wait until it has ended."""

    def refresh_now(self) -> None:
        """SIGHUP: look again at once; a storm of them coalesces."""

    def retry_after(self, product: str) -> int:
        """Whole seconds until `product` may be able to sign (for Retry-After)."""
