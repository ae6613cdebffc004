"""Every setting, once: its name, default, parser, documentation and group.

`load` reads values through this table, `files` refuses file keys outside it, and
`docs` renders docs/configuration.md from it (tests/test_configuration_docs.py fails
when that file is stale). A `REDITUS_SIDECAR_*` setting may also be given in the TOML
file as its name in lower case without the prefix (`refresh_interval = 10`); Vault's own
`VAULT_*` variables come from the environment only, as in the Vault CLI.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..names import PREFIX
from . import parse
from .model import AUTH_METHODS, LOG_FORMATS, LOG_LEVELS, SERVICE_ACCOUNT_TOKEN, SOURCE_KINDS
from .parse import Parser

Group = Literal["service", "vault", "products", "transit", "refresh", "callers", "audit", "logs"]

#: the groups in the order the reference shows them: (group, title, what it covers)
GROUPS: tuple[tuple[Group, str, str], ...] = (
    ("service", "Listeners and requests", "Where the sidecar serves and what a request needs."),
    (
        "vault",
        "Vault",
        "How to reach and log in to Vault or OpenBao, for the `vault` and `transit` sources. "
        "Vault's own variables work as Vault users expect; `~/.vault-token` is never read.",
    ),
    (
        "products",
        "Where the secret lives",
        "For the `vault` source (KV v2) and the `file` source. A `[products.NAME]` table of the "
        "config file may set each of these for one product; keys it does not set fall back to "
        "the top-level values.",
    ),
    ("transit", "Transit mode", "For the `transit` source: the secret stays in Vault."),
    (
        "refresh",
        "Refresh and readiness",
        "How often signing material is re-read, and when being stale makes the sidecar unready.",
    ),
    (
        "callers",
        "Who may sign",
        "The caller allow-list: while both are unset, any caller that reaches a listener may sign.",
    ),
    ("audit", "The issuance audit", "One record per issued token."),
    ("logs", "Logs and the config file", ""),
)


@dataclass(frozen=True)
class Setting:
    """One setting: `default` is the raw text used when it is unset (None: unset), and
    `parse(raw, where)` turns raw text into the value or raises `ConfigError`."""

    name: str
    default: str | None
    parse: Parser
    doc: str
    group: Group
    #: the default as the reference shows it, when the raw text alone does not say it
    shown: str | None = None
    #: a `[products.NAME]` table may set it for one product
    product: bool = False

    @property
    def ours(self) -> bool:
        """A `REDITUS_SIDECAR_*` variable (not one of Vault's own)."""
        return self.name.startswith(PREFIX)

    @property
    def suffix(self) -> str:
        return self.name.removeprefix(PREFIX)

    @property
    def file_key(self) -> str | None:
        """The key of the TOML file, None when only the environment may set it."""
        return self.suffix.lower() if self.ours and self.suffix != "CONFIG" else None


S = Setting
# fmt: off
SETTINGS: tuple[Setting, ...] = (
    # --- service
    S("REDITUS_SIDECAR_LISTEN", "127.0.0.1:8787", parse.signing_address,
      "signing listener; a non-loopback address is refused at start. `off` disables it (then a "
      "unix socket is required)", "service"),
    S("REDITUS_SIDECAR_UNIX_SOCKET", None, parse.socket_path,
      "also serve signing on this unix socket, mode 0660 from creation (a stale socket is "
      "replaced; one another process answers on is an error, exit 1)", "service"),
    S("REDITUS_SIDECAR_METRICS_LISTEN", "0.0.0.0:9102", parse.any_address,
      "`/metrics`, `/healthz`, `/readyz`", "service"),
    S("REDITUS_SIDECAR_SECRET_SOURCE", "vault", parse.choice(*SOURCE_KINDS),
      "`vault`, `file` or `transit` (the secret stays in Vault as a transit HMAC key; see "
      "[Transit mode](../README.md#transit-mode))", "service"),
    S("REDITUS_SIDECAR_REQUIRE_HEADER", "true", parse.boolean,
      "require `X-Sidecar-Request: true` on signing requests", "service"),
    S("REDITUS_SIDECAR_TOKEN_TTL", "0", parse.whole_seconds,
      "adds `exp = iat + TTL` when set (whole seconds)", "service", shown="`0` (no `exp`)"),
    S("REDITUS_SIDECAR_SHUTDOWN_DELAY", "0", parse.shutdown_seconds,
      "after `SIGTERM`, keep serving this long with `/readyz` at 503 before draining (at most "
      "300; a second signal ends it). For plain-container pods, whose app still needs tokens "
      "while it shuts down; the chart sets 5 s in `sidecar.mode=container`", "service",
      shown="`0` s"),
    # --- vault: ours
    S("REDITUS_SIDECAR_VAULT_AUTH", "token", parse.choice(*AUTH_METHODS),
      "`token`, `approle`, `kubernetes`, `jwt`, `cert` (TLS certificate auth: needs "
      "`VAULT_CLIENT_CERT`/`KEY`)", "vault"),
    S("REDITUS_SIDECAR_VAULT_AUTH_MOUNT", None, parse.text, "auth mount path", "vault",
      shown="the method's name"),
    S("REDITUS_SIDECAR_VAULT_ROLE", None, parse.stripped_or_none,
      "role for `kubernetes` / `jwt` (required); for `cert`, the cert role to log in with (sent "
      "as `name`; optional: unset, Vault tries every role that trusts the certificate)", "vault"),
    S("REDITUS_SIDECAR_VAULT_JWT_FILE", SERVICE_ACCOUNT_TOKEN, parse.jwt_path,
      "service-account / JWT token file, re-read at every login", "vault"),
    S("REDITUS_SIDECAR_VAULT_ROLE_ID", None, parse.stripped_or_none, "AppRole role id", "vault"),
    S("REDITUS_SIDECAR_VAULT_SECRET_ID_FILE", None, parse.optional_path,
      "AppRole secret id file, re-read at every login", "vault"),
    S("REDITUS_SIDECAR_VAULT_TOKEN_FILE", None, parse.optional_path,
      "read the Vault token from a file (e.g. written by Vault Agent), re-read at every login",
      "vault"),
    S("REDITUS_SIDECAR_VAULT_TIMEOUT", "5", parse.positive_seconds,
      "timeout of each Vault request (a hung Vault never stalls signing)", "vault",
      shown="`5` s"),
    S("REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN", "true", parse.revoke_mode,
      "at graceful shutdown (`SIGTERM`/`SIGINT`, after draining) revoke the sidecar's own Vault "
      "token (`auth/token/revoke-self`, given at most min(2 s, `VAULT_TIMEOUT`)). `true`: only a "
      "token it obtained by logging in (`approle`, `kubernetes`, `jwt`, `cert`); a token it was "
      "handed (`VAULT_TOKEN`, `REDITUS_SIDECAR_VAULT_TOKEN_FILE`) is left alone. `all`: revoke "
      "a handed token too. `false`: never", "vault"),
    # --- vault: Vault's own variables, read the way the Vault CLI reads them
    S("VAULT_ADDR", None, parse.stripped,
      "Vault's address, `http(s)://HOST[:PORT]`; required for the `vault` and `transit` "
      "sources", "vault"),
    S("VAULT_TOKEN", None, parse.stripped,
      "the Vault token for `REDITUS_SIDECAR_VAULT_AUTH=token` (or "
      "`REDITUS_SIDECAR_VAULT_TOKEN_FILE`)", "vault"),
    S("VAULT_NAMESPACE", None, parse.stripped,
      "the Vault namespace (Enterprise, or OpenBao's) every request is made in", "vault"),
    S("VAULT_CACERT", None, parse.stripped,
      "PEM file (or bundle) of the CA(s) that signed Vault's certificate", "vault"),
    S("VAULT_CAPATH", None, parse.stripped,
      "directory of CA PEM files; every file below it must hold PEM certificates (any names, no "
      "`c_rehash` links). Ignored when `VAULT_CACERT` is set, as in the Vault CLI. Neither set: "
      "the CA bundle of `requests` (certifi)", "vault"),
    S("VAULT_CLIENT_CERT", None, parse.stripped,
      "client certificate (PEM) for mutual TLS and the `cert` auth method; with "
      "`VAULT_CLIENT_KEY`, both or neither. Re-read when either file changes (checked before "
      "each Vault request: inode, mtime, size), so cert-manager's renewal in place or a secret "
      "volume's `..data` swap is used without a restart; a pair that does not load (a "
      "certificate whose key is not written yet) keeps the previous pair in use, logs a warning "
      "and counts `reditus_sidecar_vault_client_cert_reload_total{result=\"error\"}`. A "
      "certificate past its `notAfter` is reported before connecting", "vault"),
    S("VAULT_CLIENT_KEY", None, parse.stripped,
      "the unencrypted private key (PEM) of `VAULT_CLIENT_CERT`; both or neither", "vault"),
    S("VAULT_TLS_SERVER_NAME", None, parse.stripped,
      "name sent as SNI and required in Vault's certificate, when `VAULT_ADDR` names Vault "
      "otherwise (an IP, a Service alias)", "vault"),
    S("VAULT_SKIP_VERIFY", None, parse.boolean_or_false,
      "`true`: Vault's certificate is not verified (logged loudly at start); ignored when "
      "`VAULT_CACERT` or `VAULT_CAPATH` is set", "vault",
      shown="`false`"),
    # --- products
    S("REDITUS_SIDECAR_KV_MOUNT", "secret", parse.text, "KV v2 mount", "products", product=True),
    S("REDITUS_SIDECAR_KV_PATH", "reditus", parse.text, "KV v2 path of the secret", "products",
      product=True),
    S("REDITUS_SIDECAR_PRODUCT_ID_KEY", "product_id", parse.text,
      "field name of the product id inside the secret", "products", product=True),
    S("REDITUS_SIDECAR_SECRET_KEY", "product_secret", parse.text,
      "field name of the product secret inside the secret", "products", product=True),
    S("REDITUS_SIDECAR_SECRET_FILE", None, parse.text,
      'for `file`: JSON `{"product_id": .., "product_secret": ..}`, re-read when it changes',
      "products", product=True),
    # --- transit
    S("REDITUS_SIDECAR_TRANSIT_MOUNT", "transit", parse.transit_name,
      "for `transit`: the transit engine's mount", "transit"),
    S("REDITUS_SIDECAR_TRANSIT_KEY", "reditus", parse.transit_name,
      "for `transit`: the `hmac` key holding the product secret", "transit"),
    S("REDITUS_SIDECAR_PRODUCT_ID", None, parse.transit_product_id,
      "the product id when it is not read with the secret: required for `transit` (exit 2 "
      "without it)", "transit"),
    # --- refresh
    S("REDITUS_SIDECAR_REFRESH_INTERVAL", "30", parse.positive_seconds,
      "how often the secret is re-read (±10 % jitter)", "refresh", shown="`30` s"),
    S("REDITUS_SIDECAR_BACKOFF_MAX", "30", parse.backoff_seconds,
      "cap of the exponential backoff (from 1 s, with jitter) after failures", "refresh",
      shown="`30` s"),
    S("REDITUS_SIDECAR_MAX_STALENESS", "0", parse.seconds_or_off,
      "past this many seconds without a successful read, `/readyz` fails and signing answers "
      "503; must be ≥ the refresh interval", "refresh", shown="`0` (off)"),
    # --- callers
    S("REDITUS_SIDECAR_ALLOWED_UIDS", None, parse.ids,
      "comma-separated numeric uids allowed to sign (see "
      "[who may mint](../README.md#who-may-mint-the-caller-allow-list)). When this or "
      "`_GIDS` is set, a caller is allowed if its uid is listed **or** its gid is listed, anyone "
      "else gets 403 `caller_not_allowed`; on TCP only the uid is known, and a caller the "
      "kernel cannot identify is refused", "callers"),
    S("REDITUS_SIDECAR_ALLOWED_GIDS", None, parse.ids,
      "comma-separated numeric gids allowed to sign on the unix socket (the caller's primary "
      "gid, as the kernel reports it; TCP callers have no gid here)", "callers"),
    # --- audit
    S("REDITUS_SIDECAR_AUDIT", "off", parse.audit_target,
      "`off`, `stdout` or an absolute file path: one JSON record per issued token (see "
      "[what was minted](../README.md#what-was-minted-the-issuance-audit)). The file is "
      "created mode 0600, appended to, and reopened "
      "when it was moved or removed", "audit"),
    S("REDITUS_SIDECAR_AUDIT_FAIL", "open", parse.choice("open", "closed"),
      "`open`: a record that cannot be written is counted and lost, signing goes on. `closed`: "
      "a token is released only once its record is written, else 503 `audit_unavailable`",
      "audit"),
    S("REDITUS_SIDECAR_AUDIT_KEY_FILE", None, parse.audit_key_file,
      "a key (at least 32 bytes; a trailing newline is ignored): records then carry "
      "`user_hmac`, HMAC-SHA256 of the user id under it, and `user_key_id`. Re-read within a "
      "second when the file changes", "audit"),
    # --- logs and the file
    S("REDITUS_SIDECAR_LOG_LEVEL", "info", parse.choice(*LOG_LEVELS),
      "`debug`, `info`, `warning`, `error`", "logs"),
    S("REDITUS_SIDECAR_LOG_FORMAT", "json", parse.choice(*LOG_FORMATS),
      "`json` (one object per line on stdout) or `text`", "logs"),
    S("REDITUS_SIDECAR_CONFIG", None, parse.text,
      "path of the TOML config file (same as `--config`)", "logs"),
)
# fmt: on

BY_NAME: dict[str, Setting] = {setting.name: setting for setting in SETTINGS}
#: our settings: name without the prefix -> raw default
GLOBAL_KEYS: dict[str, str | None] = {s.suffix: s.default for s in SETTINGS if s.ours}
#: keys the top level of the config file may set
FILE_KEYS = frozenset(s.file_key for s in SETTINGS if s.file_key) | {"products"}
#: keys a `[products.NAME]` table may set; unset ones fall back to the top-level values
PRODUCT_KEYS = tuple(s.file_key for s in SETTINGS if s.product and s.file_key)
#: Vault's own variables
VAULT_ENV = tuple(s.name for s in SETTINGS if not s.ours)
