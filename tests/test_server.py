"""The real process: serve, metrics, probes, unix socket, rotation, SIGHUP, SIGTERM, logs."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import jwt
import pytest

from tests.support import (
    ROOT,
    TEST_PRODUCT_ID,
    TEST_SECRET,
    base_env,
    eventually,
    eventually_async,
    free_port,
    join_output,
    metric_value,
    post_token,
    request_token,
    scrape,
    scrape_value,
    sign_on_socket,
    signed_with,
    spawn,
    start_sidecar,
    wait_http,
    write_secret,
)

pytestmark = pytest.mark.integration

HEADERS = {"Content-Type": "application/json", "X-Sidecar-Request": "true"}


def test_serves_tokens_that_verify(tmp_path: Path) -> None:
    with start_sidecar(tmp_path) as sidecar:
        status, body = post_token(sidecar.api_url, {"userId": "u-42"})
        assert status == 200
        claims = jwt.decode(str(body["token"]), TEST_SECRET, algorithms=["HS512"])
        assert claims["ProductId"] == TEST_PRODUCT_ID
        assert claims["UserId"] == "u-42"
        assert abs(claims["iat"] - time.time()) < 60


def test_metrics_move_and_pass_promtool(tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool missing: run scripts/setup"
    with start_sidecar(tmp_path) as sidecar:
        for _ in range(3):
            post_token(sidecar.api_url, {"userId": "u"})
        post_token(sidecar.api_url, {"userId": 5})
        post_token(sidecar.api_url, {"userId": "u"}, headers={"X-Sidecar-Request": "no"})
        text = scrape(sidecar.metrics_url)
        check = subprocess.run(
            [promtool, "check", "metrics"], input=text, capture_output=True, text=True, check=False
        )
        assert check.returncode == 0, check.stdout + check.stderr
        assert metric_value(text, 'reditus_sidecar_tokens_issued_total{product="default"}') == 3
        assert (
            metric_value(text, 'reditus_sidecar_token_errors_total{reason="invalid_request"}') == 1
        )
        assert (
            metric_value(
                text, 'reditus_sidecar_token_errors_total{reason="missing_request_header"}'
            )
            == 1
        )
        assert (
            metric_value(text, 'reditus_sidecar_request_duration_seconds_count{endpoint="token"}')
            == 5
        )
        assert metric_value(text, 'reditus_sidecar_secret_version{product="default"}') == 1
        assert metric_value(text, "reditus_sidecar_ready") == 1
        assert 'reditus_sidecar_build_info{version="' in text
        # real samples, not just the HELP line: set when the secret was loaded
        for series in (
            'reditus_sidecar_secret_last_refresh_success_timestamp_seconds{product="default"}',
            'reditus_sidecar_secret_loaded_timestamp_seconds{product="default"}',
        ):
            assert abs(metric_value(text, series) - time.time()) < 60, series
        assert (
            metric_value(
                text, 'reditus_sidecar_secret_refresh_total{product="default",result="changed"}'
            )
            == 1
        )
        for name in (
            "reditus_sidecar_vault_login_total",
            "reditus_sidecar_vault_token_expiry_timestamp_seconds",
        ):
            assert name in text
        assert TEST_SECRET not in text
        assert "_created" not in text


def test_token_ttl_adds_exp_to_served_tokens(tmp_path: Path) -> None:
    with start_sidecar(tmp_path, REDITUS_SIDECAR_TOKEN_TTL="600") as sidecar:
        status, body = post_token(sidecar.api_url, {"userId": "u-ttl"})
        assert status == 200
        claims = jwt.decode(str(body["token"]), TEST_SECRET, algorithms=["HS512"])
        assert list(claims) == ["ProductId", "UserId", "iat", "exp"]
        assert claims["exp"] == claims["iat"] + 600 == body["issuedAt"] + 600


def test_probes(tmp_path: Path) -> None:
    with start_sidecar(tmp_path) as sidecar:
        with urllib.request.urlopen(sidecar.metrics_url + "/healthz") as response:  # noqa: S310
            assert json.loads(response.read()) == {"status": "ok"}
        with urllib.request.urlopen(sidecar.metrics_url + "/readyz") as response:  # noqa: S310
            body = json.loads(response.read())
        assert body["status"] == "ready"
        assert body["products"]["default"]["version"] == 1
        assert TEST_SECRET not in json.dumps(body)


def test_cold_start_answers_503_until_the_secret_appears(tmp_path: Path) -> None:
    with start_sidecar(tmp_path, wait=False, write=False) as sidecar:
        wait_http(sidecar.metrics_url + "/readyz", timeout=20, proc=sidecar.proc, want=503)
        status, headers, body = request_token(sidecar.api_url, {"userId": "u"})
        assert status == 503
        assert body["error"]["code"] == "secret_unavailable"  # type: ignore[index]
        assert int(headers["Retry-After"]) >= 1
        assert sidecar.secret_file is not None
        write_secret(sidecar.secret_file)
        sidecar.wait_ready(timeout=10)
        assert post_token(sidecar.api_url, {"userId": "u"})[0] == 200


def test_rotation_under_load_loses_no_request(tmp_path: Path) -> None:
    """Swap the file while clients hammer the API: every token verifies with one secret."""
    new_secret = "rotated-secret-" + "z" * 60

    async def run(api_url: str, secret_file: Path) -> list[str]:
        tokens: list[str] = []
        stop = asyncio.Event()

        async def client(session: aiohttp.ClientSession) -> None:
            while not stop.is_set():
                async with session.post(
                    api_url + "/v1/token", json={"userId": "u"}, headers=HEADERS
                ) as response:
                    assert response.status == 200, await response.text()
                    tokens.append((await response.json())["token"])

        async with aiohttp.ClientSession() as session:
            workers = [asyncio.create_task(client(session)) for _ in range(8)]
            # the swap lands while the load is on (tokens flowing), not after a nap
            await eventually_async(lambda: len(tokens) >= 50, what="tokens before the swap")
            write_secret(secret_file, "prod-rotated", new_secret)
            await eventually_async(
                lambda: signed_with(tokens[-1], new_secret), what="a token with the new secret"
            )
            # and the load goes on after the switch: old-secret tokens would show up here
            switched = len(tokens)
            await eventually_async(lambda: len(tokens) >= switched + 50, what="tokens after it")
            stop.set()
            await asyncio.gather(*workers)
        return tokens

    with start_sidecar(tmp_path) as sidecar:
        assert sidecar.secret_file is not None
        tokens = asyncio.run(run(sidecar.api_url, sidecar.secret_file))
        text = scrape(sidecar.metrics_url)
    old = [signed_with(token, TEST_SECRET) for token in tokens]
    new = [signed_with(token, new_secret) for token in tokens]
    assert all(a or b for a, b in zip(old, new, strict=True))
    first_new = new.index(True)
    assert not any(old[first_new:]), "an old-secret token was issued after the switch"
    assert jwt.decode(tokens[-1], new_secret, algorithms=["HS512"])["ProductId"] == "prod-rotated"
    assert metric_value(text, 'reditus_sidecar_secret_version{product="default"}') == 2


def test_invalid_secret_file_keeps_the_last_good_one(tmp_path: Path) -> None:
    with start_sidecar(tmp_path) as sidecar:
        assert sidecar.secret_file is not None
        sidecar.secret_file.write_text('{"product_id": "p"}')
        # The refresher counts the error before it logs it, and the line then goes through
        # the log writer, the pipe and the test's reader thread: wait for the line itself.
        eventually(
            lambda: any("missing field(s) 'product_secret'" in line for line in sidecar.lines),
            what="the invalid-file warning in the sidecar's output",
        )
        series = 'reditus_sidecar_secret_refresh_total{product="default",result="error"}'
        assert scrape_value(sidecar.metrics_url, series) > 0  # counted before it was logged
        status, body = post_token(sidecar.api_url, {"userId": "u"})
        assert status == 200
        jwt.decode(str(body["token"]), TEST_SECRET, algorithms=["HS512"])


def test_sighup_rereads_at_once(tmp_path: Path) -> None:
    with start_sidecar(tmp_path, REDITUS_SIDECAR_REFRESH_INTERVAL="3600") as sidecar:
        before = metric_value(
            scrape(sidecar.metrics_url),
            'reditus_sidecar_secret_refresh_total{product="default",result="unchanged"}',
        )
        sidecar.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            after = metric_value(
                scrape(sidecar.metrics_url),
                'reditus_sidecar_secret_refresh_total{product="default",result="unchanged"}',
            )
            if after > before:
                break
            time.sleep(0.05)
        assert after == before + 1


def test_unix_socket_serves_with_mode_0660_and_any_host(tmp_path: Path) -> None:
    sock = tmp_path / "run" / "sidecar.sock"
    sock.parent.mkdir()
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(sock))  # a leftover from a crashed run must not block the start
    stale.close()
    with start_sidecar(tmp_path, REDITUS_SIDECAR_UNIX_SOCKET=str(sock)) as sidecar:
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o660

        status, body = sign_on_socket(sock)  # its Host is "sidecar": not checked here
        assert status == 200
        jwt.decode(str(body["token"]), TEST_SECRET, algorithms=["HS512"])
        # the TCP listener, unlike the socket, refuses a name a DNS-rebinding page would send
        status, body = post_token(sidecar.api_url, {"userId": "u"}, headers={"Host": "sidecar"})
        assert (status, body["error"]["code"]) == (403, "host_not_allowed")  # type: ignore[index]
        assert sidecar.stop() == 0
    assert not sock.exists()


def test_sigterm_finishes_in_flight_requests(tmp_path: Path) -> None:
    """Requests whose bodies are still arriving when SIGTERM lands all get their token, and
    new connections are refused meanwhile."""

    async def run(
        sidecar_api: str, metrics_url: str, proc: subprocess.Popen[str], lines: list[str]
    ) -> list[int]:
        host, port = sidecar_api.removeprefix("http://").split(":")
        body = b'{"userId": "u-in-flight"}'
        head = (
            f"POST /v1/token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"X-Sidecar-Request: true\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        streams = [await asyncio.open_connection(host, int(port)) for _ in range(10)]
        for _reader, writer in streams:
            writer.write(head + body[:5])  # the request is accepted, its body half sent
            await writer.drain()
        in_flight = "reditus_sidecar_requests_in_flight"
        await asyncio.to_thread(
            eventually, lambda: scrape_value(metrics_url, in_flight) == 10, what="10 in flight"
        )
        proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(
            eventually,
            lambda: any("finishing in-flight requests" in line for line in lines),
            what="the drain",
        )

        def refused() -> bool:
            try:
                socket.create_connection((host, int(port)), timeout=2).close()
            except ConnectionRefusedError:
                return True
            return False

        # the listener stops accepting while the ten requests are still held open
        await asyncio.to_thread(eventually, refused, timeout=5, what="new connections refused")
        statuses = []
        for reader, writer in streams:
            writer.write(body[5:])
            await writer.drain()
            status_line = await asyncio.wait_for(reader.readline(), 10)
            statuses.append(int(status_line.split()[1]))
            writer.close()
        return statuses

    with start_sidecar(tmp_path) as sidecar:
        statuses = asyncio.run(
            run(sidecar.api_url, sidecar.metrics_url, sidecar.proc, sidecar.lines)
        )
        assert statuses == [200] * 10
        assert sidecar.proc.wait(15) == 0


def test_logs_carry_no_secret_token_or_user_id(tmp_path: Path) -> None:
    with start_sidecar(tmp_path) as sidecar:
        status, body = post_token(sidecar.api_url, {"userId": "user-PRIVATE-77"})
        assert status == 200
        post_token(sidecar.api_url, {"userId": "x\n"})
        reread = 'reditus_sidecar_secret_refresh_total{product="default",result="unchanged"}'
        before = scrape_value(sidecar.metrics_url, reread)
        sidecar.proc.send_signal(signal.SIGHUP)
        eventually(
            lambda: scrape_value(sidecar.metrics_url, reread) > before, what="the SIGHUP re-read"
        )
        assert sidecar.stop() == 0
        output = sidecar.output()
        token = str(body["token"])
    records = sidecar.log_records()
    assert records, output
    assert all({"ts", "level", "msg"} <= set(r) for r in records)
    assert any(r["msg"] == "secret loaded" for r in records)
    for needle in (TEST_SECRET, token, token.split(".")[2], "user-PRIVATE-77"):
        assert needle not in output


def test_port_in_use_is_a_clear_failure(tmp_path: Path) -> None:
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    secret = tmp_path / "s.json"
    write_secret(secret)
    env = base_env(
        REDITUS_SIDECAR_SECRET_SOURCE="file",
        REDITUS_SIDECAR_SECRET_FILE=str(secret),
        REDITUS_SIDECAR_LISTEN=f"127.0.0.1:{port}",
        REDITUS_SIDECAR_METRICS_LISTEN=f"127.0.0.1:{free_port()}",
    )
    try:
        proc, lines = spawn(["serve"], env)
        assert proc.wait(20) == 1
        join_output(proc)
    finally:
        busy.close()
    assert any("cannot listen" in line for line in lines)
    assert not any("Traceback" in line for line in lines)


def test_sign_and_check_commands(tmp_path: Path) -> None:
    secret = tmp_path / "s.json"
    write_secret(secret)
    env = base_env(REDITUS_SIDECAR_SECRET_SOURCE="file", REDITUS_SIDECAR_SECRET_FILE=str(secret))
    proc, lines = spawn(["sign", "--user-id", "u-cli"], env)
    assert proc.wait(20) == 0
    join_output(proc)
    token = next(line for line in lines if line.count(".") == 2)
    assert jwt.decode(token, TEST_SECRET, algorithms=["HS512"])["UserId"] == "u-cli"
    proc, lines = spawn(["check"], env)
    assert proc.wait(20) == 0
    join_output(proc)
    assert any("product default: ok" in line and TEST_PRODUCT_ID in line for line in lines)
    secret.write_text("{}")
    proc, lines = spawn(["check"], env)
    assert proc.wait(20) == 1
    join_output(proc)
    assert any("FAILED" in line and "missing field(s)" in line for line in lines)
    proc, lines = spawn(["sign", "--user-id", "bad\u0007"], env)
    assert proc.wait(20) == 2
    join_output(proc)
    assert any("control character" in line for line in lines)


def test_without_uvloop_the_commands_run_on_plain_asyncio(tmp_path: Path) -> None:
    """uvloop comes with the `speed` extra only; an install without it signs all the same."""
    secret = tmp_path / "s.json"
    write_secret(secret)
    env = base_env(REDITUS_SIDECAR_SECRET_SOURCE="file", REDITUS_SIDECAR_SECRET_FILE=str(secret))
    blocked = (
        "import sys; sys.modules['uvloop'] = None; from sidecar.__main__ import main; "
        "sys.exit(main(['sign', '--user-id', 'u-plain']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", blocked],
        env=env,
        cwd=ROOT,  # the sidecar/ of this tree, as spawn() runs it
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert signed_with(result.stdout.strip(), TEST_SECRET)


@pytest.mark.parametrize(
    ("args", "missing"), [([], "COMMAND"), (["sign", "--product", "default"], "--user-id")]
)
def test_a_missing_command_or_user_id_is_a_usage_error(args: list[str], missing: str) -> None:
    proc, lines = spawn(args, base_env())
    assert proc.wait(20) == 2
    join_output(proc)
    assert f"the following arguments are required: {missing}" in lines[-1]
    assert not any("Traceback" in line for line in lines)


def test_one_shot_commands_print_their_result_and_warnings_only(tmp_path: Path) -> None:
    """`check` and `sign` print their result; of the logs only warnings join it (here: an
    unknown variable), and at REDITUS_SIDECAR_LOG_LEVEL=error not even those."""
    secret = tmp_path / "s.json"
    write_secret(secret)
    env = base_env(
        REDITUS_SIDECAR_SECRET_SOURCE="file",
        REDITUS_SIDECAR_SECRET_FILE=str(secret),
        REDITUS_SIDECAR_TYPO="1",
    )
    proc, lines = spawn(["check"], env)
    assert proc.wait(20) == 0
    join_output(proc)
    warning, result = lines
    assert json.loads(warning)["msg"] == "ignoring unknown variables (typo?)"
    assert json.loads(warning)["detail"] == "REDITUS_SIDECAR_TYPO"
    assert result.startswith("check: product default: ok")
    for command in (["check"], ["sign", "--user-id", "u-quiet"]):
        proc, lines = spawn(command, {**env, "REDITUS_SIDECAR_LOG_LEVEL": "error"})
        assert proc.wait(20) == 0
        join_output(proc)
        assert len(lines) == 1, lines
    assert signed_with(lines[0], TEST_SECRET)


def test_debug_logs_carry_the_request_id_and_text_format_works(tmp_path: Path) -> None:
    with start_sidecar(tmp_path, REDITUS_SIDECAR_LOG_LEVEL="debug") as sidecar:
        post_token(sidecar.api_url, {"userId": "u-dbg"}, headers={"X-Request-Id": "req-7"})
        post_token(sidecar.api_url, {"userId": 7}, headers={"X-Request-Id": "req-8"})
        eventually(
            lambda: {"req-7", "req-8"} <= {r.get("request_id") for r in sidecar.log_records()},
            what="both request log lines",
        )
    records = {r.get("request_id"): r for r in sidecar.log_records() if "request_id" in r}
    assert records["req-7"]["msg"] == "token issued"
    assert records["req-8"]["code"] == "invalid_request"
    assert "u-dbg" not in sidecar.output()
    with start_sidecar(tmp_path, REDITUS_SIDECAR_LOG_FORMAT="text") as sidecar:
        pass
    assert any(line.startswith("info") and "secret loaded" in line for line in sidecar.lines)
    assert sidecar.log_records() == []


def test_two_products_from_a_config_file(tmp_path: Path) -> None:
    default_file, shop_file = tmp_path / "default.json", tmp_path / "shop.json"
    write_secret(default_file, "prod-default", TEST_SECRET)
    shop_secret = "shop-secret-" + "s" * 60
    write_secret(shop_file, "prod-shop", shop_secret)
    config = tmp_path / "sidecar.toml"
    config.write_text(
        'secret_source = "file"\n'
        f'[products.default]\nsecret_file = "{default_file}"\n'
        f'[products.shop-eu]\nsecret_file = "{shop_file}"\n'
    )
    with start_sidecar(tmp_path, write=False, REDITUS_SIDECAR_CONFIG=str(config)) as sidecar:
        status, body = post_token(sidecar.api_url, {"userId": "u", "product": "shop-eu"})
        assert status == 200
        claims = jwt.decode(str(body["token"]), shop_secret, algorithms=["HS512"])
        assert claims["ProductId"] == "prod-shop"
        status, body = post_token(sidecar.api_url, {"userId": "u"})
        assert jwt.decode(str(body["token"]), TEST_SECRET, algorithms=["HS512"])["ProductId"] == (
            "prod-default"
        )
        status, body = post_token(sidecar.api_url, {"userId": "u", "product": "shop-us"})
        assert (status, body["error"]["code"]) == (404, "unknown_product")  # type: ignore[index]
        text = scrape(sidecar.metrics_url)
    assert metric_value(text, 'reditus_sidecar_tokens_issued_total{product="shop-eu"}') == 1
    assert metric_value(text, 'reditus_sidecar_tokens_issued_total{product="default"}') == 1


def test_sighup_rereads_every_product(tmp_path: Path) -> None:
    files = {"default": tmp_path / "default.json", "shop-eu": tmp_path / "shop.json"}
    config = tmp_path / "sidecar.toml"
    config.write_text(
        'secret_source = "file"\n'
        + "".join(f'[products.{name}]\nsecret_file = "{path}"\n' for name, path in files.items())
    )
    for name, path in files.items():
        write_secret(path, f"prod-{name}", TEST_SECRET + name)
    with start_sidecar(
        tmp_path,
        write=False,
        REDITUS_SIDECAR_CONFIG=str(config),
        REDITUS_SIDECAR_REFRESH_INTERVAL="3600",
    ) as sidecar:

        def unchanged(product: str) -> float:
            series = (
                f'reditus_sidecar_secret_refresh_total{{product="{product}",result="unchanged"}}'
            )
            return metric_value(scrape(sidecar.metrics_url), series)

        before = {name: unchanged(name) for name in files}
        sidecar.proc.send_signal(signal.SIGHUP)
        for name in files:
            eventually(lambda name=name: unchanged(name) > before[name], what=f"{name} re-read")
