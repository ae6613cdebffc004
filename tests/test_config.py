"""Configuration: every bad value gets a precise message naming it, and a non-zero exit."""

from __future__ import annotations

from pathlib import Path

import pytest

from sidecar.config import load_settings
from sidecar.errors import ConfigError
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
