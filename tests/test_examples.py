"""The app examples of deploy/examples, run against a real sidecar.

Each example is started as its own process on a free loopback port, asked for a token as
a signed-in user, and the token must verify with PyJWT under the test secret.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import jwt
import pytest

from tests.support import SidecarProcess, base_env, free_port, start_sidecar

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "deploy" / "examples"


def node() -> str:
    found = shutil.which("node")
    if found is None:
        pytest.fail("node not found on PATH (Node.js >= 18 runs the Express example)")
    if not (EXAMPLES / "node" / "node_modules" / "express").is_dir():
        pytest.fail("deploy/examples/node/node_modules missing: run scripts/setup (npm ci)")
    return found


def command(example: str) -> list[str]:
    if example == "node":
        return [node(), "server.js"]
    return [sys.executable, "app.py"]


@contextmanager
def run_example(example: str, **env: str) -> Iterator[str]:
    """Start an example app; yield its base URL; stop it by PID."""
    port = free_port()
    proc = subprocess.Popen(
        command(example),
        cwd=EXAMPLES / example,
        env=base_env(HOST="127.0.0.1", PORT=str(port), **env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            if proc.poll() is not None:
                output = proc.stdout.read() if proc.stdout else ""
                pytest.fail(f"{example} example exited with {proc.returncode}:\n{output}")
            try:
                get(url + "/api/reditus-token")
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{example} example did not listen on {url}")
                time.sleep(0.05)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def get(url: str, user: str | None = None) -> tuple[int, dict[str, str], dict[str, object]]:
    headers = {"X-Example-User": user} if user else {}
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            return response.status, dict(response.headers), json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read())


def verify(token: str, sidecar: SidecarProcess, user_id: str) -> None:
    assert jwt.get_unverified_header(token) == {"alg": "HS512", "typ": "JWT"}
    claims = jwt.decode(token, sidecar.secret, algorithms=["HS512"])
    assert list(claims) == ["ProductId", "UserId", "iat"]
    assert claims["ProductId"] == sidecar.product_id
    assert claims["UserId"] == user_id
    assert abs(claims["iat"] - time.time()) < 300
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, sidecar.secret + "x", algorithms=["HS512"])


@pytest.fixture(scope="module")
def sidecar(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SidecarProcess]:
    with start_sidecar(tmp_path_factory.mktemp("sidecar")) as process:
        yield process


@pytest.mark.parametrize("example", ["node", "python"])
def test_example_gets_a_token_that_verifies(example: str, sidecar: SidecarProcess) -> None:
    with run_example(example, REDITUS_SIDECAR_URL=sidecar.api_url) as url:
        status, headers, body = get(url + "/api/reditus-token", user="u-42")
        assert status == 200, body
        assert headers.get("Cache-Control") == "no-store"
        verify(str(body["token"]), sidecar, "u-42")
        # Without a signed-in user the app does not ask the sidecar at all.
        status, _, body = get(url + "/api/reditus-token")
        assert status == 401


@pytest.mark.parametrize("example", ["node", "python"])
def test_example_answers_502_when_the_sidecar_is_unreachable(example: str) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    with run_example(example, REDITUS_SIDECAR_URL=closed) as url:
        status, _, body = get(url + "/api/reditus-token", user="u-42")
        assert status == 502
        assert body == {"error": "token unavailable"}


@pytest.mark.parametrize("example", ["node", "python"])
def test_example_passes_on_503_and_retry_after_before_a_secret_is_loaded(
    example: str, tmp_path: Path
) -> None:
    with (
        start_sidecar(tmp_path, wait=False, write=False) as unready,
        run_example(example, REDITUS_SIDECAR_URL=unready.api_url) as url,
    ):
        deadline = time.monotonic() + 20
        while True:
            status, headers, body = get(url + "/api/reditus-token", user="u-42")
            if status == 503 or time.monotonic() > deadline:
                break
            time.sleep(0.1)  # the sidecar's listener is still starting (502)
        assert status == 503, body
        assert body == {"error": "token temporarily unavailable"}
        assert int(headers["Retry-After"]) >= 1


def test_python_example_over_the_unix_socket(tmp_path: Path) -> None:
    # A short directory: unix socket paths are limited to about 100 bytes.
    with tempfile.TemporaryDirectory(prefix="rs-", dir="/tmp") as short:
        socket_path = os.path.join(short, "sidecar.sock")
        closed = f"http://127.0.0.1:{free_port()}"
        with (
            start_sidecar(tmp_path, REDITUS_SIDECAR_UNIX_SOCKET=socket_path) as sidecar,
            # The TCP URL points nowhere: the token can only come through the socket.
            run_example(
                "python", REDITUS_SIDECAR_URL=closed, REDITUS_SIDECAR_UNIX_SOCKET=socket_path
            ) as url,
        ):
            status, _, body = get(url + "/api/reditus-token", user="user-7")
            assert status == 200, body
            verify(str(body["token"]), sidecar, "user-7")


def test_python_sync_helper(sidecar: SidecarProcess) -> None:
    spec = importlib.util.spec_from_file_location(
        "reditus_example_app", EXAMPLES / "python" / "app.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    token = module.fetch_token_sync("sync-user", sidecar.api_url)
    verify(token, sidecar, "sync-user")
    with pytest.raises(module.SidecarError) as info:
        module.fetch_token_sync("", sidecar.api_url)
    assert info.value.status == 400
    assert info.value.code == "invalid_request"
