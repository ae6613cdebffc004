"""Settings from the environment and an optional TOML file, validated once at start.

Split by job: `model` (the frozen settings), `parse` (value parsers and their messages),
`table` (every setting: name, default, parser, doc, group), `files` (the TOML file and the
env-then-file lookup), `vault`, `products` (per-source settings), `access` (callers and
audit), `load` (`load_settings`) and `docs` (docs/configuration.md from the table).
"""

from __future__ import annotations

from .load import load_settings
from .model import (
    Address,
    AuditSettings,
    Product,
    Settings,
    TransitSettings,
    VaultSettings,
)
from .parse import parse_address
from .table import GLOBAL_KEYS

__all__ = [
    "GLOBAL_KEYS",
    "Address",
    "AuditSettings",
    "Product",
    "Settings",
    "TransitSettings",
    "VaultSettings",
    "load_settings",
    "parse_address",
]
