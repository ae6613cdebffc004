"""Settings from the environment and an optional TOML file, validated once at start.

The environment wins over the file. Every rejected value raises `ConfigError` with a
message naming the variable (or file key), so `serve` and `check` can exit non-zero
with one precise line. Secrets are held in `Redacted` and never reach a repr.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .audit_key import read_key
from .callers import MAX_ID, CallerPolicy
from .errors import ConfigError
from .names import DEFAULT_PRODUCT, PREFIX
from .redact import Redacted
from .systemd import activation_pending

SERVICE_ACCOUNT_TOKEN = "/var/run/secrets/kubernetes.io/serviceaccount/token"

SourceKind = Literal["vault", "file", "transit"]
AuthMethod = Literal["token", "approle", "kubernetes", "jwt", "cert"]
RevokeMode = Literal["true", "false", "all"]
SOURCE_KINDS: tuple[SourceKind, ...] = ("vault", "file", "transit")
AUTH_METHODS: tuple[AuthMethod, ...] = ("token", "approle", "kubernetes", "jwt", "cert")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("json", "text")
MAX_SHUTDOWN_DELAY = 300.0

# Top-level settings: env suffix -> default. The file uses the same names in lower case.
GLOBAL_KEYS: dict[str, str | None] = {
    "LISTEN": "127.0.0.1:8787",
    "UNIX_SOCKET": None,
    "METRICS_LISTEN": "0.0.0.0:9102",
    "SECRET_SOURCE": "vault",
    "VAULT_AUTH": "token",
    "VAULT_AUTH_MOUNT": None,
    "VAULT_ROLE": None,
    "VAULT_JWT_FILE": SERVICE_ACCOUNT_TOKEN,
    "VAULT_ROLE_ID": None,
    "VAULT_SECRET_ID_FILE": None,
    "VAULT_TOKEN_FILE": None,
    "VAULT_TIMEOUT": "5",
    "KV_MOUNT": "secret",
    "KV_PATH": "reditus",
    "PRODUCT_ID_KEY": "product_id",
    "SECRET_KEY": "product_secret",
    "SECRET_FILE": None,
    "REFRESH_INTERVAL": "30",
    "BACKOFF_MAX": "30",
    "MAX_STALENESS": "0",
    "REQUIRE_HEADER": "true",
    "TOKEN_TTL": "0",
    "SHUTDOWN_DELAY": "0",
    "REVOKE_ON_SHUTDOWN": "true",
    "LOG_LEVEL": "info",
    "LOG_FORMAT": "json",
    "CONFIG": None,
    # transit mode: Vault holds the secret as an HMAC key and signs; the pod never sees it
    "TRANSIT_MOUNT": "transit",
    "TRANSIT_KEY": "reditus",
    "PRODUCT_ID": None,
    # Who may sign, and the record of what was signed (callers.py, audit.py).
    "ALLOWED_UIDS": None,
    "ALLOWED_GIDS": None,
    "AUDIT": "off",
    "AUDIT_FAIL": "open",
    "AUDIT_KEY_FILE": None,
}
# Keys a `[products.NAME]` table may set; unset ones fall back to the top-level values.
PRODUCT_KEYS = ("kv_mount", "kv_path", "product_id_key", "secret_key", "secret_file")
VAULT_ENV = (
    "VAULT_ADDR",
    "VAULT_TOKEN",
    "VAULT_CACERT",
    "VAULT_CAPATH",
    "VAULT_CLIENT_CERT",
    "VAULT_CLIENT_KEY",
    "VAULT_TLS_SERVER_NAME",
    "VAULT_NAMESPACE",
    "VAULT_SKIP_VERIFY",
)
# Kubernetes injects service-link variables (REDITUS_SIDECAR_PORT_9102_TCP, ...) for a
# Service named reditus-sidecar; they are not ours and must not be reported as typos.
_SERVICE_LINK = re.compile(r"^(SERVICE_HOST|SERVICE_PORT.*|PORT|PORT_\d+_(TCP|UDP|SCTP).*)$")
_PRODUCT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


@dataclass(frozen=True)
class Address:
    """A host and port to bind."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Product:
    """One Reditus product: where its id and secret live."""

    name: str
    kv_mount: str
    kv_path: str
    product_id_key: str
    secret_key: str
    secret_file: Path | None


@dataclass(frozen=True)
class VaultSettings:
    """How to reach and log in to Vault (or OpenBao)."""

    addr: str
    auth: AuthMethod
    auth_mount: str
    role: str | None
    jwt_file: Path
    role_id: str | None
    secret_id_file: Path | None
    token_file: Path | None
    token: Redacted | None = field(repr=False)
    cacert: Path | None
    namespace: str | None
    skip_verify: bool
    timeout: float
    capath: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    tls_server_name: str | None = None
    # "true": revoke tokens we logged in for; "all": also a handed VAULT_TOKEN / token file
    revoke_on_shutdown: RevokeMode = "true"


@dataclass(frozen=True)
class TransitSettings:
    """Transit mode: where the HMAC key lives and the product id it signs for."""

    mount: str
    key: str
    product_id: str


@dataclass(frozen=True)
class AuditSettings:
    """Where issuance records go and what happens when they cannot be written."""

    target: str  # "stdout" or a file path
    fail_closed: bool
    key_file: Path | None


@dataclass(frozen=True)
class Settings:
    """Everything the sidecar needs, checked once."""

    listen: Address | None
    unix_socket: Path | None
    metrics_listen: Address
    secret_source: SourceKind
    vault: VaultSettings
    products: tuple[Product, ...]
    refresh_interval: float
    backoff_max: float
    max_staleness: float
    require_header: bool
    token_ttl: int
    log_level: str
    log_format: str
    shutdown_delay: float = 0.0
    unknown_env: tuple[str, ...] = ()
    transit: TransitSettings | None = None
    callers: CallerPolicy | None = None
    audit: AuditSettings | None = None

    def product(self, name: str) -> Product | None:
        for product in self.products:
            if product.name == name:
                return product
        return None


class _Values:
    """Looks a key up in the environment first, then in the config file."""

    def __init__(self, env: Mapping[str, str], file_values: Mapping[str, Any], file: str) -> None:
        self.env = env
        self.file_values = file_values
        self.file = file

    def get(self, suffix: str) -> tuple[str | None, str]:
        """The raw value and where it came from, for error messages."""
        name = PREFIX + suffix
        if name in self.env:
            return self.env[name], name
        key = suffix.lower()
        if key in self.file_values:
            value = self.file_values[key]
            return _stringify(value, f"{self.file}: {key}"), f"{self.file}: {key}"
        return GLOBAL_KEYS[suffix], name


def _stringify(value: Any, where: str) -> str:
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


def _seconds(raw: str | None, where: str, *, allow_zero: bool) -> float:
    try:
        value = float(raw or "")
    except ValueError:
        raise ConfigError(f"{where}={raw!r}: expected a number of seconds") from None
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        need = "zero or positive" if allow_zero else "positive"
        raise ConfigError(f"{where}={raw!r}: must be {need}")
    return value


def _boolean(raw: str | None, where: str) -> bool:
    value = (raw or "").strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{where}={raw!r}: expected true or false")


def _choice(raw: str | None, where: str, choices: tuple[str, ...]) -> str:
    value = (raw or "").strip().lower()
    if value not in choices:
        raise ConfigError(f"{where}={raw!r}: expected one of {', '.join(choices)}")
    return value


def _existing_file(raw: str | None, where: str) -> Path | None:
    if not raw:
        return None
    path = Path(raw)
    if not path.is_file():
        raise ConfigError(f"{where}={raw!r}: no such file")
    return path


def _nonempty(raw: str | None, where: str) -> str:
    if raw is None:
        raise ConfigError(f"{where}: must be set")
    if not raw.strip():
        raise ConfigError(f"{where}: must not be empty")
    return raw.strip()


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
    allowed = {key.lower() for key in GLOBAL_KEYS} - {"config"} | {"products"}
    for key in data:
        if key not in allowed:
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


def load_settings(env: Mapping[str, str] | None = None, config_file: str | None = None) -> Settings:
    """Build and validate the settings; raise ConfigError on the first bad value."""
    env = dict(os.environ if env is None else env)
    given_as = "--config" if config_file else f"{PREFIX}CONFIG"
    config_file = config_file or env.get(PREFIX + "CONFIG") or None
    file_values = load_file(config_file, given_as) if config_file else {}
    values = _Values(env, file_values, config_file or "")

    def raw(suffix: str) -> tuple[str | None, str]:
        return values.get(suffix)

    # Started by a systemd socket unit, the signing sockets are systemd's: no own TCP
    # listener unless one is asked for explicitly.
    activated = activation_pending(env)
    listen_raw, where = raw("LISTEN")
    if activated and PREFIX + "LISTEN" not in env and "listen" not in file_values:
        listen_raw = "off"
    listen = None
    if listen_raw and listen_raw.strip().lower() not in ("", "none", "off"):
        listen = parse_address(listen_raw, where, loopback_only=True)
    socket_raw, where = raw("UNIX_SOCKET")
    unix_socket = Path(socket_raw) if socket_raw else None
    if unix_socket is not None and not unix_socket.parent.is_dir():
        raise ConfigError(f"{where}={socket_raw!r}: directory {unix_socket.parent} does not exist")
    if listen is None and unix_socket is None and not activated:
        raise ConfigError(
            f"{PREFIX}LISTEN is off and {PREFIX}UNIX_SOCKET is unset: nothing would serve signing"
        )
    metrics_raw, where = raw("METRICS_LISTEN")
    metrics_listen = parse_address(metrics_raw or "", where, loopback_only=False)

    secret_source = _choice(*raw("SECRET_SOURCE"), SOURCE_KINDS)
    vault = _vault_settings(values, env, secret_source in ("vault", "transit"))

    refresh_interval = _seconds(*raw("REFRESH_INTERVAL"), allow_zero=False)
    backoff_max = _seconds(*raw("BACKOFF_MAX"), allow_zero=False)
    if backoff_max < 1:
        raise ConfigError(f"{PREFIX}BACKOFF_MAX: must be at least 1 (backoff starts at 1 s)")
    max_staleness = _seconds(*raw("MAX_STALENESS"), allow_zero=True)
    if 0 < max_staleness < refresh_interval:
        raise ConfigError(
            f"{PREFIX}MAX_STALENESS={max_staleness:g}: must be 0 (off) or at least "
            f"{PREFIX}REFRESH_INTERVAL ({refresh_interval:g}), or the sidecar would "
            "go unready between two normal refreshes"
        )
    ttl_raw, where = raw("TOKEN_TTL")
    ttl = _seconds(ttl_raw, where, allow_zero=True)
    if ttl != int(ttl):
        raise ConfigError(f"{where}={ttl_raw!r}: must be a whole number of seconds")

    shutdown_delay = _seconds(*raw("SHUTDOWN_DELAY"), allow_zero=True)
    if shutdown_delay > MAX_SHUTDOWN_DELAY:
        raise ConfigError(
            f"{PREFIX}SHUTDOWN_DELAY={shutdown_delay:g}: at most {MAX_SHUTDOWN_DELAY:g} s "
            "(it must fit in the pod's termination grace period with the drain)"
        )

    products = _products(values, file_values.get("products", {}), secret_source)
    transit = _transit_settings(values, products) if secret_source == "transit" else None
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
        secret_source=secret_source,  # type: ignore[arg-type]
        vault=vault,
        products=products,
        refresh_interval=refresh_interval,
        backoff_max=backoff_max,
        max_staleness=max_staleness,
        require_header=_boolean(*raw("REQUIRE_HEADER")),
        token_ttl=int(ttl),
        log_level=_choice(*raw("LOG_LEVEL"), LOG_LEVELS),
        log_format=_choice(*raw("LOG_FORMAT"), LOG_FORMATS),
        shutdown_delay=shutdown_delay,
        unknown_env=unknown,
        transit=transit,
        callers=_caller_policy(values),
        audit=_audit_settings(values),
    )


_TRANSIT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*(/[A-Za-z0-9][A-Za-z0-9_.-]*)*$")


def _transit_settings(values: _Values, products: tuple[Product, ...]) -> TransitSettings:
    """Transit mode signs for one product with one key: both named here, checked once."""
    if len(products) != 1 or products[0].name != DEFAULT_PRODUCT:
        raise ConfigError(
            f"{PREFIX}SECRET_SOURCE=transit signs for one product: remove the [products] "
            "tables (run one sidecar per product)"
        )
    names = {}
    for suffix in ("TRANSIT_MOUNT", "TRANSIT_KEY"):
        raw, where = values.get(suffix)
        value = _nonempty(raw, where).strip("/")
        if not _TRANSIT_NAME.match(value):
            raise ConfigError(
                f"{where}={raw!r}: expected a Vault path of letters, digits, '.', '_', '-'"
            )
        names[suffix] = value
    raw, where = values.get("PRODUCT_ID")
    if raw is None or not raw.strip():
        raise ConfigError(
            f"{where}: must be set for {PREFIX}SECRET_SOURCE=transit (the product id from "
            "the Reditus dashboard; transit holds only the secret)"
        )
    return TransitSettings(
        mount=names["TRANSIT_MOUNT"], key=names["TRANSIT_KEY"], product_id=raw.strip()
    )


# --- Caller allow-list and issuance audit ---


def _ids(raw: str | None, where: str) -> frozenset[int]:
    """Comma-separated numeric uids or gids; empty means unset."""
    if raw is None or not raw.strip():
        return frozenset()
    ids = set()
    for item in raw.split(","):
        text = item.strip()
        if not text.isascii() or not text.isdigit():
            shown = f"{text!r} is not" if text else "an empty item is not"
            raise ConfigError(f"{where}={raw!r}: {shown} a numeric id (comma-separated numbers)")
        value = int(text)
        if value > MAX_ID:
            raise ConfigError(f"{where}={raw!r}: {value} is larger than the largest id {MAX_ID}")
        ids.add(value)
    return frozenset(ids)


def _caller_policy(values: _Values) -> CallerPolicy | None:
    uids = _ids(*values.get("ALLOWED_UIDS"))
    gids = _ids(*values.get("ALLOWED_GIDS"))
    return CallerPolicy(uids, gids) if uids or gids else None


def _audit_settings(values: _Values) -> AuditSettings | None:
    raw, where = values.get("AUDIT")
    target = (raw or "").strip()
    if target.lower() in ("", "off"):
        return None
    if target.lower() == "stdout":
        target = "stdout"
    else:
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
    fail = _choice(*values.get("AUDIT_FAIL"), ("open", "closed"))
    key_raw, key_where = values.get("AUDIT_KEY_FILE")
    key_file = _existing_file(key_raw, key_where)
    if key_file is not None:
        read_key(key_file)  # a bad key is a configuration error, found at start
    return AuditSettings(target=target, fail_closed=fail == "closed", key_file=key_file)


def _vault_settings(values: _Values, env: Mapping[str, str], needed: bool) -> VaultSettings:
    """Vault settings; credentials are only checked when the vault source is in use."""
    auth = _choice(*values.get("VAULT_AUTH"), AUTH_METHODS)
    mount_raw, _ = values.get("VAULT_AUTH_MOUNT")
    role, role_where = values.get("VAULT_ROLE")
    jwt_file_raw, jwt_where = values.get("VAULT_JWT_FILE")
    role_id, role_id_where = values.get("VAULT_ROLE_ID")
    secret_id_raw, secret_id_where = values.get("VAULT_SECRET_ID_FILE")
    token_file_raw, token_file_where = values.get("VAULT_TOKEN_FILE")
    timeout = _seconds(*values.get("VAULT_TIMEOUT"), allow_zero=False)
    addr = env.get("VAULT_ADDR", "").strip()
    token = env.get("VAULT_TOKEN", "").strip()
    cacert_raw = env.get("VAULT_CACERT", "").strip()
    capath_raw = env.get("VAULT_CAPATH", "").strip()
    cert_raw = env.get("VAULT_CLIENT_CERT", "").strip()
    key_raw = env.get("VAULT_CLIENT_KEY", "").strip()
    server_name = env.get("VAULT_TLS_SERVER_NAME", "").strip() or None
    skip_raw = env.get("VAULT_SKIP_VERIFY", "").strip()
    revoke = _revoke_mode(*values.get("REVOKE_ON_SHUTDOWN"))

    secret_id_file = Path(secret_id_raw) if secret_id_raw else None
    token_file = Path(token_file_raw) if token_file_raw else None
    cacert = Path(cacert_raw) if cacert_raw else None
    capath = Path(capath_raw) if capath_raw else None
    client_cert = Path(cert_raw) if cert_raw else None
    client_key = Path(key_raw) if key_raw else None
    if needed:
        if not addr:
            raise ConfigError("VAULT_ADDR: must be set for the vault and transit secret sources")
        if not re.match(r"^https?://[^/\s]+", addr):
            raise ConfigError(f"VAULT_ADDR={addr!r}: expected http(s)://HOST[:PORT]")
        cacert = _existing_file(cacert_raw, "VAULT_CACERT")
        if capath is not None and not capath.is_dir():
            raise ConfigError(f"VAULT_CAPATH={capath_raw!r}: no such directory")
        if (client_cert is None) != (client_key is None):
            given, missing = (
                ("VAULT_CLIENT_CERT", "VAULT_CLIENT_KEY")
                if client_cert
                else ("VAULT_CLIENT_KEY", "VAULT_CLIENT_CERT")
            )
            raise ConfigError(
                f"{given} is set but {missing} is not: a client certificate needs both "
                "its certificate and its private key"
            )
        _existing_file(cert_raw, "VAULT_CLIENT_CERT")
        _existing_file(key_raw, "VAULT_CLIENT_KEY")
        if auth == "cert" and client_cert is None:
            raise ConfigError(
                f"VAULT_CLIENT_CERT and VAULT_CLIENT_KEY: both must be set for "
                f"{PREFIX}VAULT_AUTH=cert (the login presents that certificate)"
            )
        if auth == "token" and not token and token_file is None:
            raise ConfigError(
                f"VAULT_TOKEN or {PREFIX}VAULT_TOKEN_FILE: one must be set for "
                f"{PREFIX}VAULT_AUTH=token"
            )
        if token_file is not None:
            _existing_file(token_file_raw, token_file_where)
        if auth == "approle":
            _nonempty(role_id, role_id_where)
            if secret_id_file is not None:
                _existing_file(secret_id_raw, secret_id_where)
        if auth in ("kubernetes", "jwt"):
            _nonempty(role, role_where)
            _existing_file(jwt_file_raw, jwt_where)
    return VaultSettings(
        addr=addr.rstrip("/"),
        auth=auth,  # type: ignore[arg-type]
        auth_mount=(mount_raw or auth).strip("/"),
        role=role.strip() if role else None,
        jwt_file=Path(jwt_file_raw or SERVICE_ACCOUNT_TOKEN),
        role_id=role_id.strip() if role_id else None,
        secret_id_file=secret_id_file,
        token_file=token_file,
        token=Redacted(token) if token else None,
        cacert=cacert,
        namespace=env.get("VAULT_NAMESPACE", "").strip() or None,
        skip_verify=_boolean(skip_raw, "VAULT_SKIP_VERIFY") if skip_raw else False,
        timeout=timeout,
        capath=capath,
        client_cert=client_cert,
        client_key=client_key,
        tls_server_name=server_name,
        revoke_on_shutdown=revoke,
    )


def _revoke_mode(raw: str | None, where: str) -> RevokeMode:
    """`true`/`false` (and the usual spellings), or `all` to revoke a handed token too."""
    if (raw or "").strip().lower() == "all":
        return "all"
    try:
        return "true" if _boolean(raw, where) else "false"
    except ConfigError:
        raise ConfigError(f"{where}={raw!r}: expected true, false or all") from None


def _products(
    values: _Values, tables: Mapping[str, Mapping[str, Any]], source: str
) -> tuple[Product, ...]:
    """Named products from the file, or the single `default` product from the top level."""
    defaults = {key: values.get(key.upper()) for key in PRODUCT_KEYS}
    if not tables:
        tables = {DEFAULT_PRODUCT: {}}
    products = []
    for name, table in tables.items():
        if not _PRODUCT_NAME.match(name):
            raise ConfigError(
                f"products.{name}: a product name is 1-63 letters, digits, '.', '_' or '-'"
            )

        def pick(key: str, table: Mapping[str, Any] = table, name: str = name) -> tuple[str, str]:
            if key in table:
                where = f"{values.file}: products.{name}.{key}"
                return _stringify(table[key], where), where
            value, where = defaults[key]
            return value or "", where

        kv_mount, _ = pick("kv_mount")
        kv_path, kv_where = pick("kv_path")
        id_key, id_where = pick("product_id_key")
        secret_key, key_where = pick("secret_key")
        secret_file_raw, file_where = pick("secret_file")
        secret_file = Path(secret_file_raw) if secret_file_raw else None
        if source == "vault":
            _nonempty(kv_mount.strip("/"), f"{PREFIX}KV_MOUNT")
            _nonempty(kv_path.strip("/"), kv_where)
        _nonempty(id_key, id_where)
        _nonempty(secret_key, key_where)
        if source == "file":
            if secret_file is None:
                raise ConfigError(f"{PREFIX}SECRET_FILE: must be set for the file secret source")
            if not secret_file.parent.is_dir():
                raise ConfigError(
                    f"{file_where}={secret_file_raw!r}: directory {secret_file.parent} "
                    "does not exist"
                )
        products.append(
            Product(
                name=name,
                kv_mount=kv_mount.strip("/"),
                kv_path=kv_path.strip("/"),
                product_id_key=id_key,
                secret_key=secret_key,
                secret_file=secret_file,
            )
        )
    return tuple(products)
