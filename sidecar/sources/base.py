"""The interface every secret source implements, and what it hands back."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ..errors import SecretInvalid
from ..redact import Redacted


@dataclass(frozen=True)
class SecretMaterial:
    """One read of a product's id and secret.

    `version` is the KV version for Vault, or a load counter starting at 1 for files.
    """

    product_id: str
    secret: Redacted = field(repr=False)
    version: int


class SecretSource(Protocol):
    """Reads one product's secret. The refresher calls it; nothing else does.

    `fetch` raises `SourceError` (or a subclass) with an operator-facing message on
    any failure; it never returns half a secret.
    """

    #: short, secret-free description for logs, e.g. "vault secret/reditus"
    description: str

    async def fetch(self) -> SecretMaterial: ...

    async def changed(self) -> bool:
        """Cheap check whether a re-read may find something new (file sources)."""
        ...

    async def close(self) -> None: ...


def material_from_mapping(
    data: object, *, product_id_key: str, secret_key: str, version: int, where: str
) -> SecretMaterial:
    """Validate a decoded secret document; shared by the file and Vault sources."""
    if not isinstance(data, dict):
        raise SecretInvalid(
            f"{where}: expected an object with fields {product_id_key!r} and {secret_key!r}"
        )
    missing = [key for key in (product_id_key, secret_key) if key not in data]
    if missing:
        raise SecretInvalid(f"{where}: missing field(s) {', '.join(map(repr, missing))}")
    product_id, secret = data[product_id_key], data[secret_key]
    if not isinstance(product_id, str) or not product_id.strip():
        raise SecretInvalid(f"{where}: field {product_id_key!r} must be a non-empty string")
    if not isinstance(secret, str) or not secret:
        raise SecretInvalid(f"{where}: field {secret_key!r} must be a non-empty string")
    return SecretMaterial(product_id=product_id, secret=Redacted(secret), version=version)
