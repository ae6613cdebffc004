"""Builds the configured sources: one per product, plus what they share (a Vault session)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from .base import SecretSource
from .file import FileSource

if TYPE_CHECKING:
    from ..config import Settings
    from ..metrics import Metrics


class SharedResource(Protocol):
    """Something several sources use and the process starts and stops once."""

    async def start(self) -> None: ...

    async def close(self, *, revoke: bool = False) -> None: ...


@dataclass
class SourceSet:
    """The sources by product name, and the shared resources behind them."""

    sources: dict[str, SecretSource]
    shared: list[SharedResource] = field(default_factory=list)

    async def start(self) -> None:
        for resource in self.shared:
            await resource.start()

    async def close(self, *, revoke: bool = False) -> None:
        """Close everything; `revoke` (graceful shutdown of `serve`) also gives up the
        credentials the shared resources obtained, as configured."""
        for source in self.sources.values():
            await source.close()
        for resource in reversed(self.shared):
            await resource.close(revoke=revoke)


def build_sources(settings: Settings, metrics: Metrics) -> SourceSet:
    """One source per configured product, of the configured kind."""
    if settings.secret_source == "file":
        sources: dict[str, SecretSource] = {}
        for product in settings.products:
            assert product.secret_file is not None  # enforced by config validation
            sources[product.name] = FileSource(
                product.secret_file,
                product_id_key=product.product_id_key,
                secret_key=product.secret_key,
            )
        return SourceSet(sources)
    if settings.secret_source == "transit":
        return SourceSet({})  # nothing to read: the transit mode owns its Vault session
    from .vault import VaultSession, VaultSource  # hvac is only imported when used

    session = VaultSession(settings.vault, metrics, backoff_max=settings.backoff_max)
    vault_sources: dict[str, SecretSource] = {
        product.name: VaultSource(session, product) for product in settings.products
    }
    return SourceSet(vault_sources, [session])
