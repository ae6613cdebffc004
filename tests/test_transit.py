"""Transit mode against a real OpenBao with the transit engine: the imported HMAC key is the
product secret, tokens from the real sidecar process are byte-identical to jose, rotation
with import-version takes effect at once, and a hung or stopped Vault gets 503s at once.
"""

from __future__ import annotations

import asyncio
import base64
import hmac
import json
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import hvac
import hvac.exceptions
import pytest

from sidecar.devserver import OpenBaoDevServer, find_bao
from sidecar.errors import SecretUnavailable
from sidecar.state import SecretStore
from sidecar.transit import TransitMode
from tests.openbao import Bao, unexported, unique, vault_sidecar, write_file
from tests.support import (
    JoseSigner,
    base_env,
    eventually,
    join_output,
    post_token,
    request_token,
    scrape,
    scrape_value,
    signed_with,
    spawn,
)
from tests.test_revoke import accessors_of_role

pytestmark = pytest.mark.integration

SECRET = "transit-secret-\u00e9\u00df-" + "t" * 60  # non-ASCII: the key is the UTF-8 bytes
NEW = "rotated-secret-" + "n" * 64
PRODUCT_ID = "prod-transit"
TTL = 300
HEADERS = {"X-Sidecar-Request": "true"}
VERSION = 'reditus_sidecar_secret_version{product="default"}'
ERROR_CALLS = 'reditus_sidecar_transit_calls_total{result="error"}'
USER_IDS = ["u-1", "\u00fcser-\u00e9", "\u7528\u6237-42", "emoji-\U0001f600", 'quote"back\\slash']


def bao_cli(bao: Bao, home: Path, *args: str) -> str:
    result = subprocess.run(
        [str(find_bao()), *args],
        env={**bao.server.env(), "HOME": str(home), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def import_key(bao: Bao, home: Path, key: str, secret: str, *, command: str = "import") -> None:
    """`bao transit import[-version]` with the secret's UTF-8 bytes, by @file (not argv)."""
    material = home / "key.b64"
    material.write_text(base64.b64encode(secret.encode()).decode())
    args = ["type=hmac", "exportable=false"] if command == "import" else []
    bao_cli(bao, home, "transit", command, f"transit/keys/{key}", f"@{material}", *args)
    material.unlink()


@pytest.fixture(scope="module")
def bao(bao: Bao, tmp_path_factory: pytest.TempPathFactory) -> Bao:
    """The module's own server (conftest.py) with the transit engine enabled."""
    bao_cli(bao, tmp_path_factory.mktemp("bao-home"), "secrets", "enable", "transit")
    return bao


@pytest.fixture
def key(bao: Bao, tmp_path: Path) -> str:
    name = unique("reditus")
    import_key(bao, tmp_path, name, SECRET)
    return name


def transit_env(bao: Bao, key: str, **extra: str) -> dict[str, str]:
    return {
        "VAULT_TOKEN": bao.root_token,
        "REDITUS_SIDECAR_SECRET_SOURCE": "transit",
        "REDITUS_SIDECAR_TRANSIT_KEY": key,
        "REDITUS_SIDECAR_PRODUCT_ID": PRODUCT_ID,
        **extra,
    }


def test_transit_hmac_is_hmac_sha512_keyed_with_the_secret(bao: Bao, key: str) -> None:
    data = b"eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJ4IjoxfQ"
    answer = bao.root().adapter.post(
        f"/v1/transit/hmac/{key}/sha2-512", json={"input": base64.b64encode(data).decode()}
    )
    prefix, version, mac = answer["data"]["hmac"].split(":")
    assert (prefix, version) == ("vault", "v1")
    assert base64.b64decode(mac) == hmac.digest(SECRET.encode(), data, "sha512")
    # ... and the key cannot be read back.
    with pytest.raises(hvac.exceptions.InvalidRequest):
        bao.root().adapter.get(f"/v1/transit/export/hmac-key/{key}")


async def test_tokens_are_byte_identical_to_jose(bao: Bao, key: str, jose: JoseSigner) -> None:
    env = transit_env(bao, key, REDITUS_SIDECAR_TOKEN_TTL=str(TTL))
    with vault_sidecar(bao.addr, **env) as sidecar:
        for user_id in USER_IDS:
            status, body = post_token(sidecar.api_url, {"userId": user_id})
            assert status == 200, body
            iat = int(body["issuedAt"])  # type: ignore[call-overload]
            assert body["productId"] == PRODUCT_ID
            assert body["token"] == jose.sign(SECRET, PRODUCT_ID, user_id, iat, exp=iat + TTL)
        # Concurrent requests share batch calls, and each gets its own token.
        users = [f"u-{i}" for i in range(60)]
        async with aiohttp.ClientSession() as http:

            async def one(user_id: str) -> dict[str, object]:
                url = sidecar.api_url + "/v1/token"
                async with http.post(url, json={"userId": user_id}, headers=HEADERS) as answer:
                    assert answer.status == 200
                    return dict(await answer.json())

            bodies = await asyncio.gather(*(one(u) for u in users))
        for user_id, body in zip(users, bodies, strict=True):
            iat = int(body["issuedAt"])  # type: ignore[call-overload]
            assert body["token"] == jose.sign(SECRET, PRODUCT_ID, user_id, iat, exp=iat + TTL)
        text = scrape(sidecar.metrics_url)
        assert scrape_value(sidecar.metrics_url, VERSION) == 1
        issued = 'reditus_sidecar_tokens_issued_total{product="default"}'
        assert f"{issued} {float(len(USER_IDS) + len(users))}" in text
        calls = scrape_value(sidecar.metrics_url, "reditus_sidecar_transit_batch_size_count")
        items = scrape_value(sidecar.metrics_url, "reditus_sidecar_transit_batch_size_sum")
        assert items >= len(USER_IDS) + len(users)
        assert calls < items  # some calls carried several tokens
    assert SECRET not in sidecar.output()


def test_import_version_takes_effect_at_once(bao: Bao, key: str, tmp_path: Path) -> None:
    with vault_sidecar(bao.addr, **transit_env(bao, key)) as sidecar:
        status, body = post_token(sidecar.api_url, {"userId": "u-rot"})
        assert status == 200
        assert signed_with(str(body["token"]), SECRET)
        import_key(bao, tmp_path, key, NEW, command="import-version")
        status, body = post_token(sidecar.api_url, {"userId": "u-rot"})
        assert status == 200
        assert signed_with(str(body["token"]), NEW)
        assert not signed_with(str(body["token"]), SECRET)
        assert scrape_value(sidecar.metrics_url, VERSION) == 2
        assert any(r.get("msg") == "transit key rotated" for r in sidecar.log_records())


def test_a_hung_then_stopped_vault_gets_503_at_once(tmp_path: Path) -> None:
    with OpenBaoDevServer() as server:
        bao = Bao(server)
        bao_cli(bao, tmp_path, "secrets", "enable", "transit")
        import_key(bao, tmp_path, "reditus", SECRET)
        env = transit_env(
            bao,
            "reditus",
            REDITUS_SIDECAR_BACKOFF_MAX="30",
            REDITUS_SIDECAR_REFRESH_INTERVAL="60",  # no probe in the way
        )
        with vault_sidecar(bao.addr, **env) as sidecar:
            assert post_token(sidecar.api_url, {"userId": "u-1"})[0] == 200
            server.pause()
            try:

                async def burst(count: int) -> list[tuple[int, str | None, object]]:
                    async with aiohttp.ClientSession() as http:

                        async def one() -> tuple[int, str | None, object]:
                            url = sidecar.api_url + "/v1/token"
                            async with http.post(url, json={"userId": "u"}, headers=HEADERS) as r:
                                return r.status, r.headers.get("Retry-After"), await r.json()

                        return await asyncio.gather(*(one() for _ in range(count)))

                # Everyone waiting on the hung call gets the 503 when it times out...
                answers = asyncio.run(burst(20))
                assert {status for status, _, _ in answers} == {503}
                assert all(int(retry or 0) >= 1 for _, retry, _ in answers)
                assert all(b["error"]["code"] == "secret_unavailable" for *_, b in answers)  # type: ignore[index]
                assert scrape_value(sidecar.metrics_url, ERROR_CALLS) == 1
                # ... and later requests are refused without a call each (at most one
                # probe per backoff window waits for Vault).
                for _ in range(10):
                    status, headers, _ = request_token(sidecar.api_url, {"userId": "u"})
                    assert status == 503
                    assert int(headers["Retry-After"]) >= 1
                assert scrape_value(sidecar.metrics_url, ERROR_CALLS) <= 3
            finally:
                server.resume()
            eventually(  # back by itself once the backoff window ends
                lambda: post_token(sidecar.api_url, {"userId": "u-2"})[0] == 200,
                timeout=30,
                what="signing after Vault resumed",
            )
            server.stop()
            status, headers, body = request_token(sidecar.api_url, {"userId": "u-3"})
            assert status == 503
            assert body["error"]["code"] == "secret_unavailable"  # type: ignore[index]
            assert int(headers["Retry-After"]) >= 1
            assert sidecar.proc.poll() is None


def test_check_and_sign_commands_use_transit(bao: Bao, key: str) -> None:
    env = base_env(VAULT_ADDR=bao.addr, **transit_env(bao, key))
    proc, lines = spawn(["check"], env)
    assert proc.wait(30) == 0, lines
    join_output(proc)
    assert lines == [
        f"check: product default: ok (product id {PRODUCT_ID!r}, transit key version 1)"
    ]
    proc, lines = spawn(["sign", "--user-id", "u-cli"], env)
    assert proc.wait(30) == 0, lines
    join_output(proc)
    token, *logs = lines  # the token alone: no info logs of the Vault session
    assert logs == []
    assert signed_with(token, SECRET)
    proc, lines = spawn(["check"], {**env, "REDITUS_SIDECAR_TRANSIT_KEY": "missing"})
    assert proc.wait(30) == 1
    join_output(proc)
    assert "REDITUS_SIDECAR_TRANSIT_KEY ('missing')" in "\n".join(lines)
    assert "Traceback" not in "\n".join(lines)


def test_check_and_sign_in_transit_mode_revoke_the_token_they_logged_in_for(
    bao: Bao, key: str, tmp_path: Path
) -> None:
    """Each run logs in with AppRole; none leaves its token alive behind it."""
    policy = unique("transit-hmac")
    bao.policy(policy, f'path "transit/hmac/{key}/sha2-512" {{ capabilities = ["update"] }}\n')
    role, role_id, secret_id = bao.approle([policy], token_ttl="300s")
    env = base_env(
        VAULT_ADDR=bao.addr,
        REDITUS_SIDECAR_SECRET_SOURCE="transit",
        REDITUS_SIDECAR_TRANSIT_KEY=key,
        REDITUS_SIDECAR_PRODUCT_ID=PRODUCT_ID,
        REDITUS_SIDECAR_VAULT_AUTH="approle",
        REDITUS_SIDECAR_VAULT_ROLE_ID=role_id,
        REDITUS_SIDECAR_VAULT_SECRET_ID_FILE=str(write_file(tmp_path / "sid", secret_id)),
    )
    for command in (["check"], ["sign", "--user-id", "u-cli"]):
        proc, lines = spawn(command, env)
        assert proc.wait(30) == 0, lines
        join_output(proc)
        assert len(lines) == 1, lines  # the result alone: the revocation went through
    assert signed_with(lines[0], SECRET)
    assert accessors_of_role(bao, role) == []


async def test_a_wrong_mount_is_a_404_that_names_the_mount_setting(bao: Bao, key: str) -> None:
    """Vault has no route under a mount that does not exist (404, unlike the 400 of a
    missing key): the error still points at REDITUS_SIDECAR_TRANSIT_MOUNT."""
    settings = bao.settings(
        REDITUS_SIDECAR_SECRET_SOURCE="transit",
        REDITUS_SIDECAR_TRANSIT_MOUNT="transitx",
        REDITUS_SIDECAR_TRANSIT_KEY=key,
        REDITUS_SIDECAR_PRODUCT_ID=PRODUCT_ID,
    )
    mode = TransitMode(settings, SecretStore(["default"]), unexported())
    try:
        with pytest.raises(SecretUnavailable) as caught:
            await mode.client.hmac([b"header.payload"])
    finally:
        await mode.stop()
        await mode.session.close()
    assert "Vault refused the HMAC (HTTP 404: no handler for route" in str(caught.value)
    assert "REDITUS_SIDECAR_TRANSIT_MOUNT ('transitx')" in str(caught.value)


def ready(sidecar: object) -> int:
    try:
        with urllib.request.urlopen(sidecar.metrics_url + "/readyz", timeout=5) as answer:  # type: ignore[attr-defined]  # noqa: S310
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_ready_after_the_first_transit_answer_and_sighup_probes(bao: Bao, tmp_path: Path) -> None:
    name = unique("later")
    env = transit_env(bao, name, REDITUS_SIDECAR_REFRESH_INTERVAL="60")
    with vault_sidecar(bao.addr, wait=False, **env) as sidecar:
        eventually(lambda: "transit probe failed" in sidecar.output(), what="a failed probe")
        assert ready(sidecar) == 503
        status, headers, body = request_token(sidecar.api_url, {"userId": "u"})
        assert (status, body["error"]["code"]) == (503, "secret_unavailable")  # type: ignore[index]
        assert int(headers["Retry-After"]) >= 1
        import_key(bao, tmp_path, name, SECRET)  # the probe retries on the backoff schedule
        eventually(lambda: ready(sidecar) == 200, timeout=15, what="ready once the key exists")
        assert scrape_value(sidecar.metrics_url, VERSION) == 1
        # A new version shows on SIGHUP, before any token asks for it.
        import_key(bao, tmp_path, name, NEW, command="import-version")
        sidecar.proc.send_signal(signal.SIGHUP)
        eventually(lambda: scrape_value(sidecar.metrics_url, VERSION) == 2, what="probe on SIGHUP")
        status, body = post_token(sidecar.api_url, {"userId": "u"})
        assert status == 200
        assert signed_with(str(body["token"]), NEW)


def test_a_key_deleted_and_created_again_shows_its_version_at_the_next_probe(
    bao: Bao, key: str, tmp_path: Path
) -> None:
    """A key created again under its name starts again at version 1. Tokens are signed with
    it at once; the version metric used to stay at the old key's number until a restart,
    and now follows at the next probe (here on SIGHUP)."""
    env = transit_env(bao, key, REDITUS_SIDECAR_REFRESH_INTERVAL="60")
    with vault_sidecar(bao.addr, **env) as sidecar:
        import_key(bao, tmp_path, key, NEW, command="import-version")
        sidecar.proc.send_signal(signal.SIGHUP)
        eventually(lambda: scrape_value(sidecar.metrics_url, VERSION) == 2, what="version 2")
        root = bao.root()
        root.write_data(f"transit/keys/{key}/config", data={"deletion_allowed": True})
        root.adapter.delete(f"/v1/transit/keys/{key}")
        import_key(bao, tmp_path, key, SECRET)  # the same name again: version 1
        status, body = post_token(sidecar.api_url, {"userId": "u-again"})
        assert status == 200
        assert signed_with(str(body["token"]), SECRET)
        sidecar.proc.send_signal(signal.SIGHUP)
        eventually(lambda: scrape_value(sidecar.metrics_url, VERSION) == 1, what="version 1")
        assert any(
            str(r.get("msg")).startswith("transit key version went back")
            and (r.get("version"), r.get("previous_version")) == (1, 2)
            for r in sidecar.log_records()
        )


def test_the_audit_records_the_transit_key_version(bao: Bao, key: str, tmp_path: Path) -> None:
    """Each record carries the version Vault signed that token with (the `N` of `vault:vN:`),
    not a count of loads; and never the secret, which this pod never had anyway."""
    audit = tmp_path / "audit.jsonl"
    env = transit_env(bao, key, REDITUS_SIDECAR_AUDIT=str(audit))
    with vault_sidecar(bao.addr, **env) as sidecar:
        assert post_token(sidecar.api_url, {"userId": "u-before"})[0] == 200
        import_key(bao, tmp_path, key, NEW, command="import-version")
        status, body = post_token(sidecar.api_url, {"userId": "u-after"})
        assert status == 200
        assert signed_with(str(body["token"]), NEW)
        eventually(lambda: len(audit.read_text().splitlines()) == 2, what="two audit records")
    first, second = (json.loads(line) for line in audit.read_text().splitlines())
    assert (first["version"], second["version"]) == (1, 2)
    assert first["product_id"] == second["product_id"] == PRODUCT_ID
    assert "u-after" not in audit.read_text()
    assert str(body["token"]) not in audit.read_text()
