"""The value parsers: each takes the raw text and where it came from (the variable, or the
file and key) and returns the value or raises `ConfigError` with a message naming both and
the fix. `table.SETTINGS` names one of these for every setting."""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..audit_key import read_key
from ..callers import MAX_ID
from ..errors import ConfigError
from ..names import PREFIX
from .model import SERVICE_ACCOUNT_TOKEN, Address, RevokeMode

#: a parser: (raw value or None when unset, where it came from) -> the value
Parser = Callable[[str | None, str], Any]
MAX_SHUTDOWN_DELAY = 300.0
_TRANSIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")


def stringify(value: Any, where: str) -> str:
    """A TOML value as the environment would have given it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    raise ConfigError(f"{where}: expected a string or number, got {type(value).__name__}")


def parse_address(raw: str, where: str, *, loopback_only: bool) -> Address:
    """Parse `host:port` or `[v6]:port`; the signing listener must be loopback."""
    match = re.fullmatch(r"\[([^\]]+)\]:(\d+)|([^:\[\]]+):(\d+)", raw.strip())
    if not match:
        raise ConfigError(f"{where}={raw!r}: expected HOST:PORT (IPv6 as [ADDR]:PORT)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 <= port <= 65535:
        raise ConfigError(f"{where}={raw!r}: port must be between 0 and 65535")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"{where}={raw!r}: {host!r} is not an IP address") from None
    if loopback_only and not ip.is_loopback:
        raise ConfigError(
            f"{where}={raw!r}: the signing listener must be a loopback address "
            "(127.0.0.0/8 or ::1); anything else would let other hosts mint tokens"
        )
    return Address(str(ip), port)


def signing_address(raw: str | None, where: str) -> Address | None:
    """A loopback HOST:PORT, or `off` (also `none` or empty) for no TCP signing listener."""
    if raw and raw.strip().lower() not in ("", "none", "off"):
        return parse_address(raw, where, loopback_only=True)
    return None


def any_address(raw: str | None, where: str) -> Address:
    return parse_address(raw or "", where, loopback_only=False)


def socket_path(raw: str | None, where: str) -> Path | None:
    path = Path(raw) if raw else None
    if path is not None and not path.parent.is_dir():
        raise ConfigError(f"{where}={raw!r}: directory {path.parent} does not exist")
    return path


def seconds(raw: str | None, where: str, *, allow_zero: bool) -> float:
    try:
        value = float(raw or "")
    except ValueError:
        raise ConfigError(f"{where}={raw!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        need = "zero or positive" if allow_zero else "positive"
        raise ConfigError(f"{where}={raw!r}: must be {need}")
    return value


def positive_seconds(raw: str | None, where: str) -> float:
    return seconds(raw, where, allow_zero=False)


def seconds_or_off(raw: str | None, where: str) -> float:
    """Seconds, where 0 means off."""
    return seconds(raw, where, allow_zero=True)


def backoff_seconds(raw: str | None, where: str) -> float:
    value = seconds(raw, where, allow_zero=False)
    if value < 1:
        raise ConfigError(f"{PREFIX}BACKOFF_MAX: must be at least 1 (backoff starts at 1 s)")
    return value


def whole_seconds(raw: str | None, where: str) -> int:
    value = seconds(raw, where, allow_zero=True)
    if value != int(value):
        raise ConfigError(f"{where}={raw!r}: must be a whole number of seconds")
    return int(value)


def shutdown_seconds(raw: str | None, where: str) -> float:
    value = seconds(raw, where, allow_zero=True)
    if value > MAX_SHUTDOWN_DELAY:
        raise ConfigError(
            f"{PREFIX}SHUTDOWN_DELAY={value:g}: at most {MAX_SHUTDOWN_DELAY:g} s "
            "(it must fit in the pod's termination grace period with the drain)"
        )
    return value


def boolean(raw: str | None, where: str) -> bool:
    value = (raw or "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}={raw!r}: expected true or false")


def boolean_or_false(raw: str | None, where: str) -> bool:
    """Vault's own flags: unset or empty is false."""
    value = (raw or "").strip()
    return boolean(value, where) if value else False


def choice_of(raw: str | None, where: str, choices: tuple[str, ...]) -> str:
    value = (raw or "").strip().lower()
    if value not in choices:
        raise ConfigError(f"{where}={raw!r}: expected one of {', '.join(choices)}")
    return value


def choice(*choices: str) -> Parser:
    """A parser accepting one of `choices` (any case, surrounding blanks ignored)."""

    def parse(raw: str | None, where: str) -> str:
        return choice_of(raw, where, choices)

    return parse


def revoke_mode(raw: str | None, where: str) -> RevokeMode:
    """`true`/`false` (and the usual spellings), or `all` to revoke a handed token too."""
    if (raw or "").strip().lower() == "all":
        return "all"
    try:
        return "true" if boolean(raw, where) else "false"
    except ConfigError:
        raise ConfigError(f"{where}={raw!r}: expected true, false or all") from None


def text(raw: str | None, where: str) -> str | None:
    """The value as given (checked where it is used: by source, or per product)."""
    return raw


def stripped(raw: str | None, where: str) -> str:
    """Vault's own variables: surrounding blanks dropped, unset is empty."""
    return (raw or "").strip()


def stripped_or_none(raw: str | None, where: str) -> str | None:
    return raw.strip() if raw else None


def optional_path(raw: str | None, where: str) -> Path | None:
    return Path(raw) if raw else None


def jwt_path(raw: str | None, where: str) -> Path:
    return Path(raw or SERVICE_ACCOUNT_TOKEN)


def existing_file(raw: str | None, where: str) -> Path | None:
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{where}={raw!r}: no such file")
    return path


def nonempty(raw: str | None, where: str) -> str:
    if raw is None:
        raise ConfigError(f"{where}: must be set")
    if not raw.strip():
        raise ConfigError(f"{where}: must not be empty")
    return raw.strip()


def transit_name(raw: str | None, where: str) -> str:
    value = nonempty(raw, where).strip("/")
    if not _TRANSIT_NAME.match(value):
        raise ConfigError(
            f"{where}={raw!r}: expected a Vault path of letters, digits, '.', '_', '-'"
        )
    return value


def transit_product_id(raw: str | None, where: str) -> str:
    if raw is None or not raw.strip():
        raise ConfigError(
            f"{where}: must be set for {PREFIX}SECRET_SOURCE=transit (the product id from "
            "the Reditus dashboard; transit holds only the secret)"
        )
    return raw.strip()


def ids(raw: str | None, where: str) -> frozenset[int]:
    """Comma-separated numeric uids or gids; empty means unset."""
    if raw is None or not raw.strip():
        return frozenset()
    found = set()
    for item in raw.split(","):
        item_text = item.strip()
        if not item_text.isascii() or not item_text.isdigit():
            shown = f"{item_text!r} is not" if item_text else "an empty item is not"
            raise ConfigError(f"{where}={raw!r}: {shown} a numeric id (comma-separated numbers)")
        value = int(item_text)
        if value > MAX_ID:
            raise ConfigError(f"{where}={raw!r}: {value} is larger than the largest id {MAX_ID}")
        found.add(value)
    return frozenset(found)


def audit_target(raw: str | None, where: str) -> str | None:
    """`off` (None), `stdout`, or an absolute path of a regular file in an existing directory."""
    target = (raw or "").strip()
    if target.lower() in ("", "off"):
        return None
    if target.lower() == "stdout":
        return "stdout"
    path = Path(target)
    if not path.is_absolute():
        raise ConfigError(f"{where}={raw!r}: expected off, stdout or an absolute file path")
    if path.is_symlink():
        raise ConfigError(f"{where}={raw!r}: is a symbolic link; name the file itself")
    if path.is_dir():
        raise ConfigError(f"{where}={raw!r}: is a directory; name a file in it")
    if path.exists() and not path.is_file():
        raise ConfigError(f"{where}={raw!r}: is not a regular file (a FIFO, socket or device)")
    if not path.parent.is_dir():
        raise ConfigError(f"{where}={raw!r}: directory {path.parent} does not exist")
    return target


def audit_key_file(raw: str | None, where: str) -> Path | None:
    key_file = existing_file(raw, where)
    if key_file is not None:
        read_key(key_file)  # a bad key is a configuration error, found at start
    return key_file
