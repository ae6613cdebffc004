"""`load_settings`: every setting read through the table, the checks that span several
settings, and the one `Settings`. The environment wins over the file; the first rejected
value raises `ConfigError` with a message naming the variable (or file key), so `serve`
and `check` can exit non-zero with one precise line."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import ConfigError
from ..names import PREFIX
from ..systemd import activation_pending
from .access import audit_settings, caller_policy
from .files import Values, load_file
from .model import Address, Settings, SourceKind
from .products import products, transit_settings
from .table import GLOBAL_KEYS
from .vault import vault_settings

# Kubernetes injects service-link variables (REDITUS_SIDECAR_PORT_9102_TCP, ...) for a
# Service named reditus-sidecar; they are not ours and must not be reported as typos.
_SERVICE_LINK = re.compile(r"^(SERVICE_HOST|SERVICE_PORT.*|PORT|PORT_\d+_(TCP|UDP|SCTP).*)$")


def load_settings(env: Mapping[str, str] | None = None, config_file: str | None = None) -> Settings:
    """Build and validate the settings; raise ConfigError on the first bad value."""
    env = dict(os.environ if env is None else env)
    given_as = "--config" if config_file else f"{PREFIX}CONFIG"
    config_file = config_file or env.get(PREFIX + "CONFIG") or None
    file_values = load_file(config_file, given_as) if config_file else {}
    values = Values(env, file_values, config_file or "")

    # Started by a systemd socket unit, the signing sockets are systemd's: no own TCP
    # listener unless one is asked for explicitly.
    activated = activation_pending(env)
    listen: Address | None = None
    if not (activated and PREFIX + "LISTEN" not in env and "listen" not in file_values):
        listen = values.parse("LISTEN")
    unix_socket: Path | None = values.parse("UNIX_SOCKET")
    if listen is None and unix_socket is None and not activated:
        raise ConfigError(
            f"{PREFIX}LISTEN is off and {PREFIX}UNIX_SOCKET is unset: nothing would serve signing"
        )
    metrics_listen: Address = values.parse("METRICS_LISTEN")

    secret_source: SourceKind = values.parse("SECRET_SOURCE")
    vault = vault_settings(values, secret_source in ("vault", "transit"))

    refresh_interval: float = values.parse("REFRESH_INTERVAL")
    backoff_max: float = values.parse("BACKOFF_MAX")
    max_staleness: float = values.parse("MAX_STALENESS")
    if 0 < max_staleness < refresh_interval:
        raise ConfigError(
            f"{PREFIX}MAX_STALENESS={max_staleness:g}: must be 0 (off) or at least "
            f"{PREFIX}REFRESH_INTERVAL ({refresh_interval:g}), or the sidecar would "
            "go unready between two normal refreshes"
        )
    token_ttl: int = values.parse("TOKEN_TTL")
    shutdown_delay: float = values.parse("SHUTDOWN_DELAY")

    found = products(values, file_values.get("products", {}), secret_source)
    transit = transit_settings(values, found) if secret_source == "transit" else None
    unknown = tuple(
        sorted(
            name
            for name in env
            if name.startswith(PREFIX)
            and name[len(PREFIX) :] not in GLOBAL_KEYS
            and not _SERVICE_LINK.match(name[len(PREFIX) :])
        )
    )
    return Settings(
        listen=listen,
        unix_socket=unix_socket,
        metrics_listen=metrics_listen,
        secret_source=secret_source,
        vault=vault,
        products=found,
        refresh_interval=refresh_interval,
        backoff_max=backoff_max,
        max_staleness=max_staleness,
        require_header=values.parse("REQUIRE_HEADER"),
        token_ttl=token_ttl,
        log_level=values.parse("LOG_LEVEL"),
        log_format=values.parse("LOG_FORMAT"),
        shutdown_delay=shutdown_delay,
        unknown_env=unknown,
        transit=transit,
        callers=caller_policy(values),
        audit=audit_settings(values),
    )
