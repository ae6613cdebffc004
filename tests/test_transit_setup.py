"""deploy/vault/ for transit mode against a real OpenBao: setup-transit.sh enables the
engine, imports the secret as a non-exportable HMAC key (never echoing it), rotates with
ROTATE=true, and writes a policy that is enough for the sidecar and refuses the rest.
"""

from __future__ import annotations

import base64
import hmac
import re
import subprocess
from pathlib import Path

import hvac
import hvac.exceptions
import pytest

from sidecar.state import SecretStore
from sidecar.transit import TransitMode
from tests.openbao import Bao, unexported, unique
from tests.test_vault_policy import run_script

pytestmark = pytest.mark.integration

SECRET = "setup-secret-\u00e9-" + "s" * 60
NEW = "setup-rotated-" + "r" * 60


def run_setup(
    env: dict[str, str],
    stdin: str | None = None,
    script: str = "setup-transit.sh",
    *,
    succeed: bool = True,
) -> subprocess.CompletedProcess[str]:
    return run_script(script, env, stdin, succeed=succeed)


async def sign_probe(openbao: Bao, token: str, mount: str, key: str) -> tuple[bytes, int]:
    """One HMAC through the sidecar's own transit client, as `token`."""
    settings = openbao.settings(
        VAULT_TOKEN=token,
        REDITUS_SIDECAR_SECRET_SOURCE="transit",
        REDITUS_SIDECAR_TRANSIT_MOUNT=mount,
        REDITUS_SIDECAR_TRANSIT_KEY=key,
        REDITUS_SIDECAR_PRODUCT_ID="prod-setup",
    )
    mode = TransitMode(settings, SecretStore(["default"]), unexported())
    try:
        [outcome] = await mode.client.hmac([b"header.payload"])
    finally:
        await mode.stop()
        await mode.session.close()
    assert isinstance(outcome, tuple), outcome
    return outcome


def expected(secret: str) -> bytes:
    digest = hmac.digest(secret.encode(), b"header.payload", "sha512")
    return base64.urlsafe_b64encode(digest).rstrip(b"=")


async def test_setup_transit_script(openbao: Bao, tmp_path: Path) -> None:
    mount, key, policy = unique("transit"), unique("key"), unique("policy")
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET + "\n")  # as an editor leaves it
    env = {
        **openbao.server.env(),
        "HOME": str(tmp_path),
        "TRANSIT_MOUNT": mount,
        "TRANSIT_KEY": key,
        "POLICY": policy,
        "SECRET_FILE": str(secret_file),
    }
    first = run_setup(env)
    again = run_setup(env)  # idempotent: the key is left alone
    assert "left alone" in again.stderr
    values = dict(line.split("=", 1) for line in first.stdout.splitlines())
    assert values == {
        "REDITUS_SIDECAR_SECRET_SOURCE": "transit",
        "REDITUS_SIDECAR_TRANSIT_MOUNT": mount,
        "REDITUS_SIDECAR_TRANSIT_KEY": key,
    }
    root = openbao.root()
    config = root.adapter.get(f"/v1/{mount}/keys/{key}")["data"]
    assert (config["type"], config["exportable"], config["latest_version"]) == ("hmac", False, 1)
    token = openbao.token([policy], ttl="10m")
    assert await sign_probe(openbao, token, mount, key) == (expected(SECRET), 1)

    # ROTATE=true, the new secret on stdin: version 2 signs from now on.
    rotate = {k: v for k, v in env.items() if k != "SECRET_FILE"}
    rotated = run_setup({**rotate, "ROTATE": "true"}, stdin=NEW)
    assert await sign_probe(openbao, token, mount, key) == (expected(NEW), 2)
    for result in (first, again, rotated):
        for secret in (SECRET, NEW, base64.b64encode(SECRET.encode()).decode()):
            assert secret not in result.stdout + result.stderr


# A secret longer than HMAC-SHA512's 128-byte block: the check value hashes the key first.
LONG = "setup-long-" + "\u00e9" * 40 + "l" * 150


def check_value(secret: str) -> str:
    """The check value setup-transit.sh prints, computed from the secret here."""
    return hmac.new(secret.encode(), b"reditus-sidecar check", "sha512").hexdigest()[:16]


def printed_check(stderr: str) -> str:
    [value] = re.findall(r"check value ([0-9a-f]{16}) ", stderr)
    return value


def transit_env(openbao: Bao, home: Path, **extra: str) -> dict[str, str]:
    """The environment of setup-transit.sh for a fresh mount, key and policy; its temporary
    files go to HOME/tmp."""
    (home / "tmp").mkdir()
    return {
        **openbao.server.env(),
        "HOME": str(home),
        "TMPDIR": str(home / "tmp"),
        "TRANSIT_MOUNT": unique("transit"),
        "TRANSIT_KEY": unique("key"),
        "POLICY": unique("policy"),
        **extra,
    }


@pytest.mark.parametrize("secret", [SECRET, LONG], ids=["short", "longer-than-a-block"])
async def test_setup_transit_prints_the_check_value(
    openbao: Bao, tmp_path: Path, secret: str
) -> None:
    env = transit_env(openbao, tmp_path)
    mount, key = env["TRANSIT_MOUNT"], env["TRANSIT_KEY"]
    imported = run_setup(env, stdin=secret)
    assert printed_check(imported.stderr) == check_value(secret)
    token = openbao.token([env["POLICY"]], ttl="10m")
    assert await sign_probe(openbao, token, mount, key) == (expected(secret), 1)
    # An existing key left alone: its check value, as Vault computes it.
    kept = run_setup(env)
    assert "left alone" in kept.stderr
    assert printed_check(kept.stderr) == check_value(secret)
    rotated = run_setup({**env, "ROTATE": "true"}, stdin=NEW)
    assert printed_check(rotated.stderr) == check_value(NEW)
    assert await sign_probe(openbao, token, mount, key) == (expected(NEW), 2)
    for result in (imported, kept, rotated):
        assert secret not in result.stdout + result.stderr
    assert list((tmp_path / "tmp").iterdir()) == []


@pytest.mark.parametrize(
    ("content", "via"),
    [
        (SECRET.encode() + b"\r\n", "file"),
        (SECRET.encode() + b"\r\n\r\n", "file"),
        (SECRET.encode() + b"\n\n", "file"),
        (SECRET.encode() + b"\r\n", "stdin"),
    ],
    ids=["crlf-file", "two-crlf-file", "two-lf-file", "crlf-stdin"],
)
async def test_setup_transit_drops_line_ends_at_the_end(
    openbao: Bao, tmp_path: Path, content: bytes, via: str
) -> None:
    env = transit_env(openbao, tmp_path)
    if via == "file":
        (tmp_path / "secret").write_bytes(content)
        result = run_setup({**env, "SECRET_FILE": str(tmp_path / "secret")})
    else:
        result = run_setup(env, stdin=content.decode())
    assert printed_check(result.stderr) == check_value(SECRET)
    token = openbao.token([env["POLICY"]], ttl="10m")
    signed = await sign_probe(openbao, token, env["TRANSIT_MOUNT"], env["TRANSIT_KEY"])
    assert signed == (expected(SECRET), 1)


SECRET_BYTES = len(SECRET.encode())


@pytest.mark.parametrize(
    ("content", "refusal"),
    [
        (b"\xef\xbb\xbf" + SECRET.encode(), "starts with a UTF-8 byte order mark"),
        (b"\xef\xbb\xbf" + SECRET.encode() + b"\r\n", "starts with a UTF-8 byte order mark"),
        (b"ab\xef\xbb\xbfcd", "contains a UTF-8 byte order mark (bytes EF BB BF) at byte 3"),
        (
            SECRET.encode() + b"\r",
            f"contains a carriage return (CR, 0x0d) at byte {SECRET_BYTES + 1};",
        ),
        (b"ab\r\ncd\r\n", "contains a carriage return (CR, 0x0d) at byte 3;"),
        (b"ab\rcd", "contains a carriage return (CR, 0x0d) at byte 3;"),
        (b"ab\ncd\n", "contains the control character 0x0a at byte 3;"),
        (b"ab\tcd", "contains the control character 0x09 at byte 3;"),
        (b"abc\x7f", "contains the control character 0x7f at byte 4;"),
        (b"\x1b[0mab", "contains the control character 0x1b at byte 1;"),
        (b"ab\xc2\x85cd", "contains a C1 control character (U+0080 to U+009F) at byte 3"),
        (b"ab\x00cd", "contains a NUL byte"),
        ("ab".encode("utf-16"), "contains a NUL byte"),
        (b"\r\n\n", "is empty"),
    ],
    ids=[
        "bom",
        "bom-crlf",
        "bom-inside",
        "lone-cr-at-end",
        "two-lines-crlf",
        "cr-inside",
        "two-lines-lf",
        "tab",
        "del",
        "escape",
        "c1-control",
        "nul",
        "utf-16",
        "only-line-ends",
    ],
)
def test_setup_transit_refuses_what_would_corrupt_the_key(
    openbao: Bao, tmp_path: Path, content: bytes, refusal: str
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_bytes(content)
    env = transit_env(openbao, tmp_path, SECRET_FILE=str(secret_file))
    result = run_setup(env, succeed=False)
    assert result.returncode == 1
    assert f"setup-transit: the product secret {refusal}" in result.stderr
    assert "nothing was imported" in result.stderr
    assert result.stdout == ""
    assert SECRET not in result.stderr
    assert list((tmp_path / "tmp").iterdir()) == []  # no copy of the secret left behind
    with pytest.raises(hvac.exceptions.InvalidPath):
        openbao.root().adapter.get(f"/v1/{env['TRANSIT_MOUNT']}/keys/{env['TRANSIT_KEY']}")


async def test_setup_transit_rotation_refuses_a_bom_on_stdin(openbao: Bao, tmp_path: Path) -> None:
    env = transit_env(openbao, tmp_path)
    run_setup(env, stdin=SECRET)
    refused = run_setup({**env, "ROTATE": "true"}, stdin="\ufeff" + NEW + "\r\n", succeed=False)
    assert "starts with a UTF-8 byte order mark" in refused.stderr
    root = openbao.root()
    config = root.adapter.get(f"/v1/{env['TRANSIT_MOUNT']}/keys/{env['TRANSIT_KEY']}")["data"]
    assert config["latest_version"] == 1
    token = openbao.token([env["POLICY"]], ttl="10m")
    signed = await sign_probe(openbao, token, env["TRANSIT_MOUNT"], env["TRANSIT_KEY"])
    assert signed == (expected(SECRET), 1)


@pytest.fixture(scope="module")
def transit_token(openbao: Bao, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(mount, key, token holding only the deployed transit policy for that key)."""
    mount, key, policy = unique("transit"), unique("key"), unique("policy")
    env = {
        **openbao.server.env(),
        "HOME": str(tmp_path_factory.mktemp("home")),
        "TRANSIT_MOUNT": mount,
        "TRANSIT_KEY": key,
        "POLICY": policy,
    }
    run_setup(env, stdin=SECRET)
    run_setup({**env, "TRANSIT_KEY": "other", "POLICY": unique("policy")}, stdin=SECRET)
    return mount, key, openbao.token([policy], ttl="10m")


@pytest.mark.parametrize(
    ("method", "path", "payload"),
    [
        ("POST", "{mount}/hmac/{key}/sha2-256", {"input": "eA=="}),
        ("POST", "{mount}/hmac/{key}", {"input": "eA=="}),
        ("POST", "{mount}/hmac/other/sha2-512", {"input": "eA=="}),
        ("POST", "{mount}/verify/{key}/sha2-512", {"input": "eA==", "hmac": "vault:v1:eA=="}),
        ("GET", "{mount}/keys/{key}", None),
        ("GET", "{mount}/export/hmac-key/{key}", None),
        ("POST", "{mount}/keys/{key}/rotate", {}),
        ("POST", "{mount}/keys/{key}/config", {"exportable": True}),
        ("POST", "{mount}/keys/{key}/import_version", {"ciphertext": "eA=="}),
        ("DELETE", "{mount}/keys/{key}", None),
        ("LIST", "{mount}/keys", None),
        ("GET", "{mount}/wrapping_key", None),
        ("GET", "secret/data/reditus", None),
    ],
)
def test_transit_policy_refuses_everything_else(
    openbao: Bao, transit_token: tuple[str, str, str], method: str, path: str, payload: object
) -> None:
    mount, key, token = transit_token
    client = hvac.Client(url=openbao.addr, token=token, cert=(), verify=True, timeout=5)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.adapter.request(method, "/v1/" + path.format(mount=mount, key=key), json=payload)


async def test_transit_policy_is_enough_for_the_sidecar(
    openbao: Bao, transit_token: tuple[str, str, str]
) -> None:
    mount, key, token = transit_token
    assert await sign_probe(openbao, token, mount, key) == (expected(SECRET), 1)


async def test_approle_setup_binds_the_transit_policy(
    openbao: Bao, transit_token: tuple[str, str, str], tmp_path: Path
) -> None:
    mount, key, _ = transit_token
    secret_id_file = tmp_path / "secret-id"
    env = {
        **openbao.server.env(),
        "HOME": str(tmp_path),
        "SECRET_SOURCE": "transit",
        "TRANSIT_MOUNT": mount,
        "TRANSIT_KEY": key,
        "AUTH_MOUNT": unique("approle"),
        "POLICY": unique("policy"),
        "SECRET_ID_FILE": str(secret_id_file),
    }
    result = run_setup(env, script="setup-approle.sh")
    values = dict(line.split("=", 1) for line in result.stdout.splitlines())
    assert values["REDITUS_SIDECAR_SECRET_SOURCE"] == "transit"
    assert values["REDITUS_SIDECAR_TRANSIT_KEY"] == key
    assert not [name for name in values if "_KV_" in name]
    login = openbao.root().auth.approle.login(
        values["REDITUS_SIDECAR_VAULT_ROLE_ID"],
        secret_id_file.read_text().strip(),
        mount_point=env["AUTH_MOUNT"],
    )
    token = login["auth"]["client_token"]
    assert await sign_probe(openbao, token, mount, key) == (expected(SECRET), 1)
    client = hvac.Client(url=openbao.addr, token=token, cert=(), verify=True, timeout=5)
    with pytest.raises(hvac.exceptions.Forbidden):
        client.secrets.kv.v2.read_secret_version("reditus", raise_on_deleted_version=True)
