"""Per-source settings: the products a local key is read for (the `vault` and `file`
sources), and transit mode's one key and product id."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..names import DEFAULT_PRODUCT, PREFIX
from .files import Values
from .model import Product, TransitSettings
from .parse import nonempty, stringify
from .table import PRODUCT_KEYS

_PRODUCT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def products(
    values: Values, tables: Mapping[str, Mapping[str, Any]], source: str
) -> tuple[Product, ...]:
    """Named products from the file, or the single `default` product from the top level."""
    defaults = {key: values.get(key.upper()) for key in PRODUCT_KEYS}
    if not tables:
        tables = {DEFAULT_PRODUCT: {}}
    found = []
    for name, table in tables.items():
        if not _PRODUCT_NAME.match(name):
            raise ConfigError(
                f"products.{name}: a product name is 1-63 letters, digits, '.', '_' or '-'"
            )

        def pick(key: str, table: Mapping[str, Any] = table, name: str = name) -> tuple[str, str]:
            if key in table:
                where = f"{values.file}: products.{name}.{key}"
                return stringify(table[key], where), where
            value, where = defaults[key]
            return value or "", where

        kv_mount, _ = pick("kv_mount")
        kv_path, kv_where = pick("kv_path")
        id_key, id_where = pick("product_id_key")
        secret_key, key_where = pick("secret_key")
        secret_file_raw, file_where = pick("secret_file")
        secret_file = Path(secret_file_raw) if secret_file_raw else None
        if source == "vault":
            nonempty(kv_mount.strip("/"), f"{PREFIX}KV_MOUNT")
            nonempty(kv_path.strip("/"), kv_where)
        nonempty(id_key, id_where)
        nonempty(secret_key, key_where)
        if source == "file":
            if secret_file is None:
                raise ConfigError(f"{PREFIX}SECRET_FILE: must be set for the file secret source")
            if not secret_file.parent.is_dir():
                raise ConfigError(
                    f"{file_where}={secret_file_raw!r}: directory {secret_file.parent} "
                    "does not exist"
                )
        found.append(
            Product(
                name=name,
                kv_mount=kv_mount.strip("/"),
                kv_path=kv_path.strip("/"),
                product_id_key=id_key,
                secret_key=secret_key,
                secret_file=secret_file,
            )
        )
    return tuple(found)


def transit_settings(values: Values, products: tuple[Product, ...]) -> TransitSettings:
    """Transit mode signs for one product with one key: both named here, checked once."""
    if len(products) != 1 or products[0].name != DEFAULT_PRODUCT:
        raise ConfigError(
            f"{PREFIX}SECRET_SOURCE=transit signs for one product: remove the [products] "
            "tables (run one sidecar per product)"
        )
    return TransitSettings(
        mount=values.parse("TRANSIT_MOUNT"),
        key=values.parse("TRANSIT_KEY"),
        product_id=values.parse("PRODUCT_ID"),
    )
