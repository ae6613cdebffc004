"""The TOML config file, and the lookup of one setting: the environment first, then the
file, then the table's default."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from typing import Any

from ..errors import ConfigError
from ..names import PREFIX
from .parse import stringify
from .table import BY_NAME, FILE_KEYS, PRODUCT_KEYS


def load_file(path: str, where: str = "--config") -> dict[str, Any]:
    """Read the TOML config file; unknown keys are refused so a typo cannot pass.
    `where` names how it was given (the option or the variable) for error messages."""
    try:
        with open(path, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"{where} {path!r}: no such file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where} {path!r}: not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{where} {path!r}: cannot read: {exc.strerror}") from None
    for key in data:
        if key not in FILE_KEYS:
            raise ConfigError(f"{path}: unknown key {key!r}")
    products = data.get("products", {})
    if not isinstance(products, dict):
        raise ConfigError(f"{path}: [products] must be a table of named products")
    for name, table in products.items():
        if not isinstance(table, dict):
            raise ConfigError(f"{path}: products.{name} must be a table")
        for key in table:
            if key not in PRODUCT_KEYS:
                raise ConfigError(
                    f"{path}: products.{name}: unknown key {key!r} "
                    f"(allowed: {', '.join(PRODUCT_KEYS)})"
                )
    return data


class Values:
    """Looks a setting up in the environment first, then in the config file."""

    def __init__(self, env: Mapping[str, str], file_values: Mapping[str, Any], file: str) -> None:
        self.env = env
        self.file_values = file_values
        self.file = file

    def get(self, suffix: str) -> tuple[str | None, str]:
        """The raw value of `REDITUS_SIDECAR_<suffix>` and where it came from."""
        setting = BY_NAME[PREFIX + suffix]
        if setting.name in self.env:
            return self.env[setting.name], setting.name
        key = setting.file_key
        if key is not None and key in self.file_values:
            where = f"{self.file}: {key}"
            return stringify(self.file_values[key], where), where
        return setting.default, setting.name

    def parse(self, suffix: str) -> Any:
        """`REDITUS_SIDECAR_<suffix>` through the table's parser."""
        return BY_NAME[PREFIX + suffix].parse(*self.get(suffix))

    def vault(self, name: str) -> Any:
        """One of Vault's own variables (environment only) through the table's parser."""
        setting = BY_NAME[name]
        return setting.parse(self.env.get(name, setting.default), name)
