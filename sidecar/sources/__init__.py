"""Secret sources: where a product's id and secret come from (Vault KV v2, or a file)."""

from .base import SecretMaterial, SecretSource

__all__ = ["SecretMaterial", "SecretSource"]
