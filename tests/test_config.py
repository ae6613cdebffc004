"""Configuration: every bad value gets a precise message naming it, and a non-zero exit."""

from __future__ import annotations

import dataclasses
import operator
from pathlib import Path

import pytest

from sidecar.config import AuditSettings, TransitSettings, VaultSettings, load_settings
from sidecar.errors import ConfigError
from sidecar.redact import Redacted
from tests.support import base_env, join_output, spawn, write_secret


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "secret.json"
    write_secret(path)
    return path


@pytest.fixture
def file_env(secret_file: Path) -> dict[str, str]:
    return {
        "REDITUS_SIDECAR_SECRET_SOURCE": "file",
        "REDITUS_SIDECAR_SECRET_FILE": str(secret_file),
    }


def test_defaults_match_the_contract(file_env: dict[str, str]) -> None:
    settings = load_settings(file_env)
    assert str(settings.listen) == "127.0.0.1:8787"
    assert str(settings.metrics_listen) == "0.0.0.0:9102"
    assert settings.refresh_interval == 30
    assert settings.backoff_max == 30
    assert settings.max_staleness == 0
    assert settings.require_header is True
    assert settings.token_ttl == 0
    assert (settings.log_level, settings.log_format) == ("info", "json")
    assert [p.name for p in settings.products] == ["default"]
    vault_defaults = load_settings({"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "t"})
    product = vault_defaults.products[0]
    assert (product.kv_mount, product.kv_path) == ("secret", "reditus")
    assert (product.product_id_key, product.secret_key) == ("product_id", "product_secret")
    assert vault_defaults.vault.auth == "token"
    assert vault_defaults.vault.auth_mount == "token"
    assert vault_defaults.vault.revoke_on_shutdown == "true"
    cert = load_settings(
        {
            "VAULT_ADDR": "https://v:8200",
            "REDITUS_SIDECAR_VAULT_AUTH": "cert",
            "VAULT_CLIENT_CERT": "/etc/passwd",
            "VAULT_CLIENT_KEY": "/etc/passwd",
        }
    ).vault
    assert (cert.auth_mount, cert.role) == ("cert", None)


@pytest.mark.parametrize(
    ("address", "host", "port"),
    [
        ("127.0.0.1:1", "127.0.0.1", 1),
        ("127.1.2.3:8787", "127.1.2.3", 8787),
        ("[::1]:8788", "::1", 8788),
        ("localhost:8789", "127.0.0.1", 8789),
    ],
)
def test_loopback_listen_addresses_are_accepted(
    file_env: dict[str, str], address: str, host: str, port: int
) -> None:
    settings = load_settings({**file_env, "REDITUS_SIDECAR_LISTEN": address})
    assert settings.listen is not None
    assert (settings.listen.host, settings.listen.port) == (host, port)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REDITUS_SIDECAR_LISTEN": "0.0.0.0:8787"}, "REDITUS_SIDECAR_LISTEN='0.0.0.0:8787': the signing listener must be a loopback address"),
        ({"REDITUS_SIDECAR_LISTEN": "10.1.2.3:8787"}, "must be a loopback address"),
        ({"REDITUS_SIDECAR_LISTEN": "[::]:8787"}, "must be a loopback address"),
        ({"REDITUS_SIDECAR_LISTEN": "example.com:8787"}, "is not an IP address"),
        ({"REDITUS_SIDECAR_LISTEN": "127.0.0.1"}, "REDITUS_SIDECAR_LISTEN='127.0.0.1': expected HOST:PORT"),
        ({"REDITUS_SIDECAR_LISTEN": "127.0.0.1:99999"}, "port must be between 0 and 65535"),
        ({"REDITUS_SIDECAR_METRICS_LISTEN": "nope"}, "REDITUS_SIDECAR_METRICS_LISTEN='nope': expected HOST:PORT"),
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "s3"}, "REDITUS_SIDECAR_SECRET_SOURCE='s3': expected one of vault, file, transit"),
        ({"REDITUS_SIDECAR_REFRESH_INTERVAL": "0"}, "REDITUS_SIDECAR_REFRESH_INTERVAL='0': must be positive"),
        ({"REDITUS_SIDECAR_REFRESH_INTERVAL": "-5"}, "must be positive"),
        ({"REDITUS_SIDECAR_REFRESH_INTERVAL": "soon"}, "expected a number of seconds"),
        ({"REDITUS_SIDECAR_BACKOFF_MAX": "0"}, "REDITUS_SIDECAR_BACKOFF_MAX='0': must be positive"),
        ({"REDITUS_SIDECAR_BACKOFF_MAX": "0.5"}, "REDITUS_SIDECAR_BACKOFF_MAX: must be at least 1"),
        ({"REDITUS_SIDECAR_MAX_STALENESS": "-1"}, "REDITUS_SIDECAR_MAX_STALENESS='-1': must be zero or positive"),
        ({"REDITUS_SIDECAR_MAX_STALENESS": "5"}, "at least REDITUS_SIDECAR_REFRESH_INTERVAL"),
        ({"REDITUS_SIDECAR_TOKEN_TTL": "1.5"}, "REDITUS_SIDECAR_TOKEN_TTL='1.5': must be a whole number"),
        ({"REDITUS_SIDECAR_REQUIRE_HEADER": "maybe"}, "REDITUS_SIDECAR_REQUIRE_HEADER='maybe': expected true or false"),
        ({"REDITUS_SIDECAR_LOG_LEVEL": "loud"}, "REDITUS_SIDECAR_LOG_LEVEL='loud'"),
        ({"REDITUS_SIDECAR_SECRET_FILE": ""}, "REDITUS_SIDECAR_SECRET_FILE: must be set"),
        ({"REDITUS_SIDECAR_SECRET_FILE": "/no/such/dir/s.json"}, "directory /no/such/dir does not exist"),
        ({"REDITUS_SIDECAR_LISTEN": "off"}, "nothing would serve signing"),
        ({"REDITUS_SIDECAR_UNIX_SOCKET": "/no/such/dir/s.sock"}, "REDITUS_SIDECAR_UNIX_SOCKET='/no/such/dir/s.sock': directory"),
    ],
)  # fmt: skip
def test_bad_values_are_refused(file_env: dict[str, str], env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**file_env, **env})
    assert needle in str(info.value)


@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({}, "VAULT_ADDR: must be set"),
        ({"VAULT_ADDR": "127.0.0.1:8200"}, "VAULT_ADDR='127.0.0.1:8200': expected http(s)://"),
        ({"VAULT_ADDR": "http://v:8200"}, "VAULT_TOKEN or REDITUS_SIDECAR_VAULT_TOKEN_FILE"),
        ({"VAULT_ADDR": "http://v:8200", "REDITUS_SIDECAR_VAULT_AUTH": "ldap"}, "REDITUS_SIDECAR_VAULT_AUTH='ldap': expected one of token, approle, kubernetes, jwt"),
        ({"VAULT_ADDR": "http://v:8200", "REDITUS_SIDECAR_VAULT_AUTH": "approle"}, "REDITUS_SIDECAR_VAULT_ROLE_ID: must be set"),
        ({"VAULT_ADDR": "http://v:8200", "REDITUS_SIDECAR_VAULT_AUTH": "approle", "REDITUS_SIDECAR_VAULT_ROLE_ID": "r", "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE": "/nope"}, "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE='/nope': no such file"),
        ({"VAULT_ADDR": "http://v:8200", "REDITUS_SIDECAR_VAULT_AUTH": "kubernetes"}, "REDITUS_SIDECAR_VAULT_ROLE: must be set"),
        ({"VAULT_ADDR": "http://v:8200", "REDITUS_SIDECAR_VAULT_AUTH": "jwt", "REDITUS_SIDECAR_VAULT_ROLE": "r", "REDITUS_SIDECAR_VAULT_JWT_FILE": "/nope/jwt"}, "REDITUS_SIDECAR_VAULT_JWT_FILE='/nope/jwt': no such file"),
        ({"VAULT_ADDR": "http://v:8200", "REDITUS_SIDECAR_VAULT_TOKEN_FILE": "/nope"}, "REDITUS_SIDECAR_VAULT_TOKEN_FILE='/nope': no such file"),
        ({"VAULT_ADDR": "https://v:8200", "VAULT_TOKEN": "t", "VAULT_CACERT": "/nope.pem"}, "VAULT_CACERT='/nope.pem': no such file"),
        ({"VAULT_ADDR": "https://v:8200", "VAULT_TOKEN": "t", "VAULT_SKIP_VERIFY": "perhaps"}, "VAULT_SKIP_VERIFY='perhaps'"),
        ({"VAULT_ADDR": "http://v:8200", "VAULT_TOKEN": "t", "REDITUS_SIDECAR_KV_PATH": "/"}, "REDITUS_SIDECAR_KV_PATH: must not be empty"),
        ({"VAULT_ADDR": "https://v:8200", "VAULT_TOKEN": "t", "VAULT_CAPATH": "/nope"}, "VAULT_CAPATH='/nope': no such directory"),
        ({"VAULT_ADDR": "https://v:8200", "VAULT_TOKEN": "t", "VAULT_CLIENT_CERT": "/etc/passwd"}, "VAULT_CLIENT_CERT is set but VAULT_CLIENT_KEY is not"),
        ({"VAULT_ADDR": "https://v:8200", "VAULT_TOKEN": "t", "VAULT_CLIENT_KEY": "/etc/passwd"}, "VAULT_CLIENT_KEY is set but VAULT_CLIENT_CERT is not"),
        ({"VAULT_ADDR": "https://v:8200", "VAULT_TOKEN": "t", "VAULT_CLIENT_CERT": "/nope.crt", "VAULT_CLIENT_KEY": "/etc/passwd"}, "VAULT_CLIENT_CERT='/nope.crt': no such file"),
        ({"VAULT_ADDR": "https://v:8200", "REDITUS_SIDECAR_VAULT_AUTH": "cert"}, "VAULT_CLIENT_CERT and VAULT_CLIENT_KEY: both must be set for REDITUS_SIDECAR_VAULT_AUTH=cert"),
        ({"VAULT_ADDR": "http://v:8200", "VAULT_TOKEN": "t", "REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN": "always"}, "REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN='always': expected true, false or all"),
    ],
)  # fmt: skip
def test_bad_vault_values_are_refused(env: dict[str, str], needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env)
    assert needle in str(info.value)


def test_vault_token_never_shows_in_repr() -> None:
    settings = load_settings({"VAULT_ADDR": "http://v:8200", "VAULT_TOKEN": "hvs.SUPERSECRET"})
    assert "SUPERSECRET" not in repr(settings)
    assert settings.vault.token is not None
    assert settings.vault.token.reveal() == "hvs.SUPERSECRET"


def test_config_file_adds_products_and_env_wins(tmp_path: Path, secret_file: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f"""
secret_source = "file"
refresh_interval = 10
token_ttl = 600
[products.default]
secret_file = "{secret_file}"
[products.shop-eu]
secret_file = "{secret_file}"
secret_key = "eu_secret"
"""
    )
    settings = load_settings({"REDITUS_SIDECAR_REFRESH_INTERVAL": "3"}, str(config))
    assert settings.refresh_interval == 3  # env wins
    assert settings.token_ttl == 600
    assert [p.name for p in settings.products] == ["default", "shop-eu"]
    shop = settings.product("shop-eu")
    assert shop is not None
    assert shop.secret_key == "eu_secret"
    assert shop.product_id_key == "product_id"  # falls back to the top level


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("refresh_intervall = 3", "unknown key 'refresh_intervall'"),
        ("[products.x]\nkv_pth = 'a'", "products.x: unknown key 'kv_pth'"),
        ("products = 3", "[products] must be a table"),
        ("listen = [1]", "listen: expected a string or number"),
        ("not toml ===", "not valid TOML"),
        ("[products.'bad name!']\nkv_path = 'a'", "a product name is"),
    ],
)
def test_bad_config_files_are_refused(tmp_path: Path, text: str, needle: str) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_settings({"VAULT_ADDR": "http://v:8200", "VAULT_TOKEN": "t"}, str(config))
    assert needle in str(info.value)


def test_missing_config_file_is_refused_naming_how_it_was_given() -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, "/no/such/config.toml")
    assert str(info.value) == "--config '/no/such/config.toml': no such file"
    with pytest.raises(ConfigError) as info:
        load_settings({"REDITUS_SIDECAR_CONFIG": "/no/such/config.toml"})
    assert str(info.value) == "REDITUS_SIDECAR_CONFIG '/no/such/config.toml': no such file"


def test_unknown_variables_are_reported_but_service_links_are_not(file_env: dict[str, str]) -> None:
    env = {
        **file_env,
        "REDITUS_SIDECAR_REFRESH_INTERVALL": "3",
        "REDITUS_SIDECAR_SERVICE_HOST": "10.0.0.1",
        "REDITUS_SIDECAR_PORT_9102_TCP_ADDR": "10.0.0.1",
        "REDITUS_SIDECAR_PORT": "tcp://10.0.0.1:9102",
    }
    assert load_settings(env).unknown_env == ("REDITUS_SIDECAR_REFRESH_INTERVALL",)


@pytest.mark.integration
@pytest.mark.parametrize("command", ["serve", "check", "sign --user-id u-1"])
def test_cli_exits_2_with_one_clear_line(command: str, file_env: dict[str, str]) -> None:
    env = base_env(**file_env, REDITUS_SIDECAR_LISTEN="0.0.0.0:8787")
    proc, lines = spawn(command.split(), env)
    assert proc.wait(30) == 2
    join_output(proc)
    output = "\n".join(lines)
    assert "configuration error: REDITUS_SIDECAR_LISTEN='0.0.0.0:8787'" in output
    assert "loopback" in output
    assert "Traceback" not in output


@pytest.mark.integration
@pytest.mark.parametrize(
    ("env", "needle"),
    [
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "consul"}, "REDITUS_SIDECAR_SECRET_SOURCE='consul': expected one of vault, file, transit"),
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "vault", "VAULT_ADDR": "http://127.0.0.1:1", "REDITUS_SIDECAR_VAULT_AUTH": "kerberos"}, "REDITUS_SIDECAR_VAULT_AUTH='kerberos'"),
        ({"REDITUS_SIDECAR_REFRESH_INTERVAL": "0"}, "REDITUS_SIDECAR_REFRESH_INTERVAL='0': must be positive"),
        ({"REDITUS_SIDECAR_METRICS_LISTEN": "127.0.0.1:http"}, "REDITUS_SIDECAR_METRICS_LISTEN='127.0.0.1:http': expected HOST:PORT"),
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "vault", "VAULT_ADDR": "http://127.0.0.1:1", "REDITUS_SIDECAR_VAULT_AUTH": "approle", "REDITUS_SIDECAR_VAULT_ROLE_ID": "r", "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE": "/no/such/secret-id"}, "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE='/no/such/secret-id': no such file"),
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "transit", "VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "t"}, "REDITUS_SIDECAR_PRODUCT_ID: must be set for REDITUS_SIDECAR_SECRET_SOURCE=transit"),
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "transit", "VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "t", "REDITUS_SIDECAR_PRODUCT_ID": " "}, "REDITUS_SIDECAR_PRODUCT_ID: must be set for REDITUS_SIDECAR_SECRET_SOURCE=transit"),
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "transit", "REDITUS_SIDECAR_PRODUCT_ID": "p"}, "VAULT_ADDR: must be set for the vault and transit secret sources"),
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "transit", "VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "t", "REDITUS_SIDECAR_PRODUCT_ID": "p", "REDITUS_SIDECAR_TRANSIT_KEY": "../sys"}, "REDITUS_SIDECAR_TRANSIT_KEY='../sys': expected a Vault path"),
        ({"REDITUS_SIDECAR_SECRET_SOURCE": "transit", "VAULT_ADDR": "http://127.0.0.1:1", "VAULT_TOKEN": "t", "REDITUS_SIDECAR_PRODUCT_ID": "p", "REDITUS_SIDECAR_TRANSIT_MOUNT": ""}, "REDITUS_SIDECAR_TRANSIT_MOUNT: must not be empty"),
    ],
)  # fmt: skip
def test_serve_refuses_bad_values_as_a_process(
    file_env: dict[str, str], env: dict[str, str], needle: str
) -> None:
    proc, lines = spawn(["serve"], base_env(**{**file_env, **env}))
    assert proc.wait(30) == 2
    join_output(proc)
    output = "\n".join(lines)
    assert needle in output
    assert len(lines) == 1, output
    assert "Traceback" not in output


@pytest.mark.integration
def test_cli_refuses_a_missing_config_file() -> None:
    proc, lines = spawn(["serve", "--config", "/no/such.toml"], base_env())
    assert proc.wait(30) == 2
    join_output(proc)
    assert any("--config '/no/such.toml': no such file" in line for line in lines)


def test_transit_settings(tmp_path: Path) -> None:
    env = {
        "REDITUS_SIDECAR_SECRET_SOURCE": "transit",
        "VAULT_ADDR": "http://127.0.0.1:8200",
        "VAULT_TOKEN": "t",
        "REDITUS_SIDECAR_PRODUCT_ID": " prod-7 ",
    }
    transit = load_settings(env).transit
    assert transit is not None
    assert (transit.mount, transit.key, transit.product_id) == ("transit", "reditus", "prod-7")
    nested = {**env, "REDITUS_SIDECAR_TRANSIT_MOUNT": "/team/transit/"}
    assert load_settings(nested).transit.mount == "team/transit"  # type: ignore[union-attr]
    assert load_settings({**env, "REDITUS_SIDECAR_SECRET_SOURCE": "vault"}).transit is None
    config = tmp_path / "sidecar.toml"
    config.write_text('[products.a]\nkv_path = "a"\n[products.b]\nkv_path = "b"\n')
    with pytest.raises(ConfigError, match="transit signs for one product"):
        load_settings({**env, "REDITUS_SIDECAR_CONFIG": str(config)})


# --- Boundaries, defaults and every value read as given (each row pins one comparison,
# constant or default of sidecar/config.py that no other fast test would notice changing).

VAULT_BASE = {"VAULT_ADDR": "http://127.0.0.1:8200", "VAULT_TOKEN": "t"}


@pytest.mark.parametrize(
    ("env", "attribute", "expected"),
    [
        ({"REDITUS_SIDECAR_SHUTDOWN_DELAY": "300"}, "shutdown_delay", 300.0),
        ({"REDITUS_SIDECAR_SHUTDOWN_DELAY": "0.5"}, "shutdown_delay", 0.5),
        ({"REDITUS_SIDECAR_BACKOFF_MAX": "1"}, "backoff_max", 1.0),
        ({"REDITUS_SIDECAR_REFRESH_INTERVAL": "0.5"}, "refresh_interval", 0.5),
        ({"REDITUS_SIDECAR_MAX_STALENESS": "30"}, "max_staleness", 30.0),
        ({"REDITUS_SIDECAR_MAX_STALENESS": "600"}, "max_staleness", 600.0),
        ({"REDITUS_SIDECAR_MAX_STALENESS": "1", "REDITUS_SIDECAR_REFRESH_INTERVAL": "0.5"}, "max_staleness", 1.0),
        ({"REDITUS_SIDECAR_TOKEN_TTL": "2.0"}, "token_ttl", 2),
        ({"REDITUS_SIDECAR_TOKEN_TTL": "86400"}, "token_ttl", 86400),
        ({"REDITUS_SIDECAR_VAULT_TIMEOUT": "0.25"}, "vault.timeout", 0.25),
        ({"REDITUS_SIDECAR_LISTEN": "127.0.0.1:65535"}, "listen.port", 65535),
        ({"REDITUS_SIDECAR_METRICS_LISTEN": "0.0.0.0:0"}, "metrics_listen.port", 0),
        ({"REDITUS_SIDECAR_METRICS_LISTEN": "[::]:65535"}, "metrics_listen.port", 65535),
        ({"REDITUS_SIDECAR_REQUIRE_HEADER": "false"}, "require_header", False),
        ({"REDITUS_SIDECAR_REQUIRE_HEADER": " Off "}, "require_header", False),
        ({"REDITUS_SIDECAR_REQUIRE_HEADER": "0"}, "require_header", False),
        ({"REDITUS_SIDECAR_REQUIRE_HEADER": "no"}, "require_header", False),
        ({"REDITUS_SIDECAR_REQUIRE_HEADER": "YES"}, "require_header", True),
        ({"REDITUS_SIDECAR_REQUIRE_HEADER": "1"}, "require_header", True),
        ({"REDITUS_SIDECAR_REQUIRE_HEADER": "on"}, "require_header", True),
        ({"REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN": " ALL "}, "vault.revoke_on_shutdown", "all"),
        ({"REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN": "false"}, "vault.revoke_on_shutdown", "false"),
        ({"REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN": "0"}, "vault.revoke_on_shutdown", "false"),
        ({"REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN": "1"}, "vault.revoke_on_shutdown", "true"),
        ({"REDITUS_SIDECAR_LOG_LEVEL": "DEBUG", "REDITUS_SIDECAR_LOG_FORMAT": "Text"}, "log_format", "text"),
        ({"REDITUS_SIDECAR_LOG_LEVEL": " Warning "}, "log_level", "warning"),
        ({"REDITUS_SIDECAR_ALLOWED_UIDS": "0,4294967294"}, "callers.uids", frozenset({0, 4294967294})),
        ({"REDITUS_SIDECAR_ALLOWED_UIDS": "7"}, "callers.gids", frozenset()),
        ({"REDITUS_SIDECAR_AUDIT": "OFF"}, "audit", None),
        ({"REDITUS_SIDECAR_AUDIT": " "}, "audit", None),
        ({"REDITUS_SIDECAR_AUDIT": "STDOUT"}, "audit", AuditSettings("stdout", fail_closed=False, key_file=None)),
        ({"REDITUS_SIDECAR_AUDIT": "stdout", "REDITUS_SIDECAR_AUDIT_FAIL": "Closed"}, "audit", AuditSettings("stdout", fail_closed=True, key_file=None)),
        ({"REDITUS_SIDECAR_AUDIT": "stdout", "REDITUS_SIDECAR_AUDIT_FAIL": "open"}, "audit.fail_closed", False),
    ],
)  # fmt: skip
def test_values_at_and_inside_the_limits_are_accepted(
    file_env: dict[str, str], env: dict[str, str], attribute: str, expected: object
) -> None:
    settings = load_settings({**file_env, **env})
    assert operator.attrgetter(attribute)(settings) == expected


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDITUS_SIDECAR_SHUTDOWN_DELAY": "300.5"}, "REDITUS_SIDECAR_SHUTDOWN_DELAY=300.5: at most 300 s (it must fit in the pod's termination grace period with the drain)"),
        ({"REDITUS_SIDECAR_SHUTDOWN_DELAY": "-0.5"}, "REDITUS_SIDECAR_SHUTDOWN_DELAY='-0.5': must be zero or positive"),
        ({"REDITUS_SIDECAR_BACKOFF_MAX": "0.999"}, "REDITUS_SIDECAR_BACKOFF_MAX: must be at least 1 (backoff starts at 1 s)"),
        ({"REDITUS_SIDECAR_REFRESH_INTERVAL": "inf"}, "REDITUS_SIDECAR_REFRESH_INTERVAL='inf': must be positive"),
        ({"REDITUS_SIDECAR_REFRESH_INTERVAL": "nan"}, "REDITUS_SIDECAR_REFRESH_INTERVAL='nan': must be positive"),
        ({"REDITUS_SIDECAR_REFRESH_INTERVAL": ""}, "REDITUS_SIDECAR_REFRESH_INTERVAL='': expected a number of seconds"),
        ({"REDITUS_SIDECAR_MAX_STALENESS": "0.5"}, "REDITUS_SIDECAR_MAX_STALENESS=0.5: must be 0 (off) or at least REDITUS_SIDECAR_REFRESH_INTERVAL (30), or the sidecar would go unready between two normal refreshes"),
        ({"REDITUS_SIDECAR_MAX_STALENESS": "29.5"}, "REDITUS_SIDECAR_MAX_STALENESS=29.5: must be 0 (off) or at least REDITUS_SIDECAR_REFRESH_INTERVAL (30), or the sidecar would go unready between two normal refreshes"),
        ({"REDITUS_SIDECAR_MAX_STALENESS": "inf"}, "REDITUS_SIDECAR_MAX_STALENESS='inf': must be zero or positive"),
        ({"REDITUS_SIDECAR_TOKEN_TTL": "-1"}, "REDITUS_SIDECAR_TOKEN_TTL='-1': must be zero or positive"),
        ({"REDITUS_SIDECAR_TOKEN_TTL": "0.5"}, "REDITUS_SIDECAR_TOKEN_TTL='0.5': must be a whole number of seconds"),
        ({"REDITUS_SIDECAR_VAULT_TIMEOUT": "0"}, "REDITUS_SIDECAR_VAULT_TIMEOUT='0': must be positive"),
        ({"REDITUS_SIDECAR_LISTEN": "127.0.0.1:65536"}, "REDITUS_SIDECAR_LISTEN='127.0.0.1:65536': port must be between 0 and 65535"),
        ({"REDITUS_SIDECAR_METRICS_LISTEN": "[::1]:65536"}, "REDITUS_SIDECAR_METRICS_LISTEN='[::1]:65536': port must be between 0 and 65535"),
        ({"REDITUS_SIDECAR_METRICS_LISTEN": "metrics.svc:9102"}, "REDITUS_SIDECAR_METRICS_LISTEN='metrics.svc:9102': 'metrics.svc' is not an IP address"),
        ({"REDITUS_SIDECAR_LISTEN": "localhost.:8787"}, "REDITUS_SIDECAR_LISTEN='localhost.:8787': 'localhost.' is not an IP address"),
        ({"REDITUS_SIDECAR_LISTEN": "[2001:db8::1]:8787"}, "REDITUS_SIDECAR_LISTEN='[2001:db8::1]:8787': the signing listener must be a loopback address (127.0.0.0/8 or ::1); anything else would let other hosts mint tokens"),
        ({"REDITUS_SIDECAR_LOG_FORMAT": "xml"}, "REDITUS_SIDECAR_LOG_FORMAT='xml': expected one of json, text"),
        ({"REDITUS_SIDECAR_LOG_LEVEL": "trace"}, "REDITUS_SIDECAR_LOG_LEVEL='trace': expected one of debug, info, warning, error"),
        ({"REDITUS_SIDECAR_AUDIT": "tmp.log"}, "REDITUS_SIDECAR_AUDIT='tmp.log': expected off, stdout or an absolute file path"),
        ({"REDITUS_SIDECAR_ALLOWED_GIDS": "4294967295"}, "REDITUS_SIDECAR_ALLOWED_GIDS='4294967295': 4294967295 is larger than the largest id 4294967294"),
        ({"REDITUS_SIDECAR_LISTEN": " none ", "REDITUS_SIDECAR_UNIX_SOCKET": ""}, "REDITUS_SIDECAR_LISTEN is off and REDITUS_SIDECAR_UNIX_SOCKET is unset: nothing would serve signing"),
    ],
)  # fmt: skip
def test_values_past_the_limits_are_refused_with_the_exact_message(
    file_env: dict[str, str], env: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({**file_env, **env})
    assert str(info.value) == message


def test_vault_defaults_are_the_documented_ones() -> None:
    vault = load_settings(VAULT_BASE).vault
    assert vault == VaultSettings(
        addr="http://127.0.0.1:8200",
        auth="token",
        auth_mount="token",
        role=None,
        jwt_file=Path("/var/run/secrets/kubernetes.io/serviceaccount/token"),
        role_id=None,
        secret_id_file=None,
        token_file=None,
        token=Redacted("t"),
        cacert=None,
        namespace=None,
        skip_verify=False,
        timeout=5.0,
        capath=None,
        client_cert=None,
        client_key=None,
        tls_server_name=None,
        revoke_on_shutdown="true",
    )
    # the token's field is not even in the repr, not just masked
    assert "token=" not in repr(vault)


def test_every_vault_setting_is_read_as_given(tmp_path: Path) -> None:
    files = {name: tmp_path / name for name in ("ca.pem", "client.pem", "client.key", "sid")}
    for path in files.values():
        path.write_text("x")
    env = {
        "VAULT_ADDR": " https://vault.example:8200/ ",
        "VAULT_CACERT": str(files["ca.pem"]),
        "VAULT_CAPATH": str(tmp_path),
        "VAULT_CLIENT_CERT": str(files["client.pem"]),
        "VAULT_CLIENT_KEY": str(files["client.key"]),
        "VAULT_TLS_SERVER_NAME": " vault.internal ",
        "VAULT_NAMESPACE": " team-a ",
        "VAULT_SKIP_VERIFY": "true",
        "REDITUS_SIDECAR_VAULT_AUTH": "AppRole",
        "REDITUS_SIDECAR_VAULT_AUTH_MOUNT": "/approle-prod/",
        "REDITUS_SIDECAR_VAULT_ROLE_ID": " role-1 ",
        "REDITUS_SIDECAR_VAULT_SECRET_ID_FILE": str(files["sid"]),
        "REDITUS_SIDECAR_VAULT_ROLE": " cert-role ",
        "REDITUS_SIDECAR_VAULT_JWT_FILE": str(tmp_path / "jwt"),
        "REDITUS_SIDECAR_VAULT_TIMEOUT": "2.5",
        "REDITUS_SIDECAR_REVOKE_ON_SHUTDOWN": "all",
    }
    assert load_settings(env).vault == VaultSettings(
        addr="https://vault.example:8200",
        auth="approle",
        auth_mount="approle-prod",
        role="cert-role",
        jwt_file=tmp_path / "jwt",
        role_id="role-1",
        secret_id_file=files["sid"],
        token_file=None,
        token=None,
        cacert=files["ca.pem"],
        namespace="team-a",
        skip_verify=True,
        timeout=2.5,
        capath=tmp_path,
        client_cert=files["client.pem"],
        client_key=files["client.key"],
        tls_server_name="vault.internal",
        revoke_on_shutdown="all",
    )
    # a token file alone: no VAULT_TOKEN, so no token held
    token_file = tmp_path / "token"
    token_file.write_text("hvs.x")
    env = {
        **VAULT_BASE,
        "VAULT_TOKEN": "",
        "REDITUS_SIDECAR_VAULT_TOKEN_FILE": str(token_file),
        "VAULT_SKIP_VERIFY": "0",
    }
    vault = load_settings(env).vault
    assert (vault.token, vault.token_file, vault.skip_verify) == (None, token_file, False)


def test_vault_paths_unused_by_the_file_source_are_kept_unchecked(file_env: dict[str, str]) -> None:
    """With the file source nothing Vault-related is checked: the paths are kept as given and
    the KV location may be empty (it is read only by the vault source)."""
    env = {
        **file_env,
        "VAULT_CACERT": "/nope/ca.pem",
        "VAULT_CAPATH": "/nope",
        "REDITUS_SIDECAR_KV_PATH": "/",
        "REDITUS_SIDECAR_KV_MOUNT": "",
    }
    settings = load_settings(env)
    assert (settings.vault.cacert, settings.vault.capath) == (Path("/nope/ca.pem"), Path("/nope"))
    assert (settings.products[0].kv_mount, settings.products[0].kv_path) == ("", "")
    unset = load_settings(file_env).vault
    assert (unset.cacert, unset.capath, unset.client_cert, unset.client_key) == (None,) * 4
    with pytest.raises(ConfigError) as info:
        load_settings({**VAULT_BASE, "REDITUS_SIDECAR_KV_MOUNT": "/"})
    assert str(info.value) == "REDITUS_SIDECAR_KV_MOUNT: must not be empty"


@pytest.mark.parametrize("listen", ["off", " OFF ", "none", ""])
def test_a_unix_socket_alone_serves_signing(
    file_env: dict[str, str], tmp_path: Path, listen: str
) -> None:
    env = {
        **file_env,
        "REDITUS_SIDECAR_LISTEN": listen,
        "REDITUS_SIDECAR_UNIX_SOCKET": str(tmp_path / "s.sock"),
    }
    settings = load_settings(env)
    assert (settings.listen, settings.unix_socket) == (None, tmp_path / "s.sock")
    assert load_settings(file_env).unix_socket is None


@pytest.mark.parametrize(
    ("metrics", "shown"),
    [
        ("0.0.0.0:9102", "0.0.0.0:9102"),
        ("[::1]:9102", "[::1]:9102"),
        ("[::]:0", "[::]:0"),
        ("[2001:db8::1]:9102", "[2001:db8::1]:9102"),
        ("[fe80::1]:9102", "[fe80::1]:9102"),
    ],
)
def test_addresses_print_as_they_are_bound(
    file_env: dict[str, str], metrics: str, shown: str
) -> None:
    settings = load_settings({**file_env, "REDITUS_SIDECAR_METRICS_LISTEN": metrics})
    assert str(settings.metrics_listen) == shown


def test_products_are_found_by_exact_name(tmp_path: Path, secret_file: Path) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text(
        f'[products.default]\nsecret_file = "{secret_file}"\n'
        f'[products.shop-eu]\nsecret_file = "{secret_file}"\n'
    )
    settings = load_settings({"REDITUS_SIDECAR_SECRET_SOURCE": "file"}, str(config))
    assert [settings.product(name).name for name in ("default", "shop-eu")] == [  # type: ignore[union-attr]
        "default",
        "shop-eu",
    ]
    for missing in ("nope", "a", "shop", "zzz"):
        assert settings.product(missing) is None


def test_file_values_are_converted_and_errors_name_the_file(
    tmp_path: Path, file_env: dict[str, str]
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text("require_header = false\nrefresh_interval = 2.5\ntoken_ttl = 60\n")
    settings = load_settings(file_env, str(config))
    assert (settings.require_header, settings.refresh_interval, settings.token_ttl) == (
        False,
        2.5,
        60,
    )
    config.write_text("require_header = true\n")
    assert load_settings(file_env, str(config)).require_header is True
    for text, message in [
        ("listen = [1]", f"{config}: listen: expected a string or number, got list"),
        ("refresh_interval = 0", f"{config}: refresh_interval='0': must be positive"),
        ("[products.p]\nsecret_key = {a = 1}", f"{config}: products.p.secret_key: expected a string or number, got dict"),
        ("[products.p]\nsecret_key = ''", f"{config}: products.p.secret_key: must not be empty"),
        ("[products]\np = 3", f"{config}: products.p must be a table"),
        ("config = 'other.toml'", f"{config}: unknown key 'config'"),
    ]:  # fmt: skip
        config.write_text(text)
        with pytest.raises(ConfigError) as info:
            load_settings(file_env, str(config))
        assert str(info.value) == message


def test_an_unreadable_config_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings({}, str(tmp_path))
    assert str(info.value) == f"--config {str(tmp_path)!r}: cannot read: Is a directory"


TRANSIT = {**VAULT_BASE, "REDITUS_SIDECAR_SECRET_SOURCE": "transit", "REDITUS_SIDECAR_PRODUCT_ID": "p"}  # fmt: skip


@pytest.mark.parametrize(
    ("tables", "accepted"),
    [
        ("[products.default]\n", True),
        ("[products.default]\nkv_path = 'ignored'\n", True),
        ("[products.a]\n", False),
        ("[products.shop-eu]\n", False),
        ("[products.default]\n[products.b]\n", False),
        ("[products.a]\n[products.default]\n", False),
    ],
)
def test_transit_signs_for_the_default_product_only(
    tmp_path: Path, tables: str, accepted: bool
) -> None:
    config = tmp_path / "sidecar.toml"
    config.write_text(tables)
    if accepted:
        transit = load_settings(TRANSIT, str(config)).transit
        assert transit == TransitSettings("transit", "reditus", "p")
        return
    with pytest.raises(ConfigError) as info:
        load_settings(TRANSIT, str(config))
    assert str(info.value) == (
        "REDITUS_SIDECAR_SECRET_SOURCE=transit signs for one product: remove the [products] "
        "tables (run one sidecar per product)"
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"REDITUS_SIDECAR_PRODUCT_ID": None}, "REDITUS_SIDECAR_PRODUCT_ID: must be set for REDITUS_SIDECAR_SECRET_SOURCE=transit (the product id from the Reditus dashboard; transit holds only the secret)"),
        ({"REDITUS_SIDECAR_PRODUCT_ID": " "}, "REDITUS_SIDECAR_PRODUCT_ID: must be set for REDITUS_SIDECAR_SECRET_SOURCE=transit (the product id from the Reditus dashboard; transit holds only the secret)"),
        ({"REDITUS_SIDECAR_TRANSIT_KEY": "../sys"}, "REDITUS_SIDECAR_TRANSIT_KEY='../sys': expected a Vault path of letters, digits, '.', '_', '-'"),
        ({"REDITUS_SIDECAR_TRANSIT_MOUNT": " / "}, "REDITUS_SIDECAR_TRANSIT_MOUNT=' / ': expected a Vault path of letters, digits, '.', '_', '-'"),
        ({"REDITUS_SIDECAR_TRANSIT_MOUNT": ""}, "REDITUS_SIDECAR_TRANSIT_MOUNT: must not be empty"),
        ({"VAULT_ADDR": None}, "VAULT_ADDR: must be set for the vault and transit secret sources"),
    ],
)  # fmt: skip
def test_bad_transit_values_are_refused(env: dict[str, str | None], message: str) -> None:
    merged = {**TRANSIT, **env}
    with pytest.raises(ConfigError) as info:
        load_settings({key: value for key, value in merged.items() if value is not None})
    assert str(info.value) == message


def test_audit_to_a_file_with_a_key(file_env: dict[str, str], tmp_path: Path) -> None:
    key_file = tmp_path / "audit.key"
    key_file.write_bytes(b"k" * 32 + b"\n")
    env = {
        **file_env,
        "REDITUS_SIDECAR_AUDIT": str(tmp_path / "audit.jsonl"),
        "REDITUS_SIDECAR_AUDIT_KEY_FILE": str(key_file),
    }
    assert load_settings(env).audit == AuditSettings(
        str(tmp_path / "audit.jsonl"), fail_closed=False, key_file=key_file
    )


def test_settings_cannot_change_after_the_check(file_env: dict[str, str]) -> None:
    """Validated once: every part of the settings refuses assignment afterwards."""
    settings = load_settings({**file_env, "REDITUS_SIDECAR_AUDIT": "stdout"})
    transit = load_settings(TRANSIT).transit
    parts = [
        (settings, "token_ttl"),
        (settings.listen, "port"),
        (settings.products[0], "secret_key"),
        (settings.vault, "addr"),
        (settings.audit, "target"),
        (transit, "key"),
    ]
    for part, name in parts:
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(part, name, "changed")
