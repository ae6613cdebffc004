"""The app examples of deploy/examples, run against a real sidecar.

Each example is started as its own process on a free loopback port, asked for a token as
a signed-in user, and the token must verify with PyJWT under the test secret.

The examples' referral page (deploy/examples/public/) is driven in headless Chromium: Reditus' script
cannot be loaded here, so the app is configured (REDITUS_SCRIPT_URL) with a stand-in served
by this test that records the page's gr() calls the way the real script takes them over.
The recorded auth_token must verify, and the browser must only have talked to the app and
the script's host, never to the sidecar.
"""

from __future__ import annotations

import contextlib
import http.server
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlencode, urlsplit

import jwt
import pytest
from playwright.sync_api import expect

from tests.browser import chromium
from tests.support import (
    SidecarProcess,
    base_env,
    eventually,
    free_port,
    scrape,
    start_sidecar,
)

pytestmark = pytest.mark.integration

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


@pytest.mark.parametrize("example", ["node", "python"])
def test_example_gets_a_token_that_verifies(example: str, sidecar: SidecarProcess) -> None:
    with run_example(example, REDITUS_SIDECAR_URL=sidecar.api_url) as url:
        status, headers, body = get(url + "/api/reditus-token", user="u-42")
        assert status == 200, body
        assert headers.get("Cache-Control") == "no-store"
        assert set(body) == {"token", "productId"}
        assert body["productId"] == sidecar.product_id
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


# --- The referral page in a browser ----------------------------------------------------------

REDITUS_SCRIPT_URL = "https://script.getreditus.com/v2.js"  # the examples' default
ISSUED = 'reditus_sidecar_tokens_issued_total{product="default"}'
ERRORS = "reditus_sidecar_token_errors_total"
USER = {"id": "u-page-7", "email": "ada@example.com", "first_name": "Ada", "last_name": "Byron"}

# Stand-in for Reditus' script, with the real one's contract towards the page: before it
# arrives, the page's loader snippet queues gr() calls in gr.q; the script replaces gr and
# runs the queue. Each call is recorded (as JSON) in window.__reditus; loadReferralWidget
# makes window.referralWidget available, whose show() is counted.
STAND_IN_SCRIPT = b"""(function () {
  var record = (window.__reditus = {calls: [], shown: 0});
  function gr() {
    var args = JSON.parse(JSON.stringify(Array.prototype.slice.call(arguments)));
    record.calls.push(args);
    if (args[0] === "loadReferralWidget") {
      window.referralWidget = {show: function () { record.shown += 1; }};
    }
  }
  var queued = (window.gr && window.gr.q) || [];
  window.gr = gr;
  for (var i = 0; i < queued.length; i++) gr.apply(null, queued[i]);
})();
"""


@contextlib.contextmanager
def stand_in_script() -> Iterator[tuple[str, list[str]]]:
    """Serve STAND_IN_SCRIPT on its own loopback port (another origin than the app's);
    yield its URL and the paths requested from it."""
    hits: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            hits.append(self.path)
            self.send_response(200)
            self.send_header("Content-Type", "text/javascript")
            self.send_header("Content-Length", str(len(STAND_IN_SCRIPT)))
            self.end_headers()
            self.wfile.write(STAND_IN_SCRIPT)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v2.js", hits
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def counters(sidecar: SidecarProcess) -> tuple[float, float]:
    """(tokens issued, token errors of any reason) from one scrape of the sidecar."""
    issued = errors = 0.0
    for line in scrape(sidecar.metrics_url).splitlines():
        if line.startswith(ISSUED + " "):
            issued = float(line.split()[-1])
        elif line.startswith(ERRORS + "{"):
            errors += float(line.split()[-1])
    return issued, errors


def origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def test_example_pages_default_to_reditus_script() -> None:
    for example in ("node", "python"):
        with run_example(example) as url:
            with urllib.request.urlopen(url + "/reditus-config.js", timeout=10) as response:  # noqa: S310
                config = response.read().decode()
            assert response.headers["Content-Type"].startswith("text/javascript")
        prefix, _, rest = config.partition(" = ")
        assert prefix == "window.REDITUS_CONFIG", config
        assert json.loads(rest.rstrip().removesuffix(";")) == {
            "scriptUrl": REDITUS_SCRIPT_URL,
            "customerId": "",
        }


@pytest.mark.parametrize("example", ["node", "python"])
def test_example_page_loads_the_widget_with_a_token_from_the_app(
    example: str, sidecar: SidecarProcess, tmp_path: Path
) -> None:
    with (
        stand_in_script() as (script_url, script_hits),
        run_example(
            example,
            REDITUS_SIDECAR_URL=sidecar.api_url,
            REDITUS_SCRIPT_URL=script_url,
            REDITUS_CUSTOMER_ID="cust-test",
        ) as url,
        chromium(tmp_path / "chromium-home") as browser,
    ):
        context = browser.new_context()
        seen: list[str] = []  # every URL the browser asked for, from any page or worker
        context.on("request", lambda request: seen.append(request.url))
        page = context.new_page()
        status = page.locator("#status")

        # Signed out: the page asks its app, gets 401, and asks Reditus for nothing.
        issued_before, errors_before = counters(sidecar)
        page.goto(url + "/")
        expect(status).to_have_attribute("data-state", "signed-out", timeout=15_000)
        page.wait_for_function("window.__reditus !== undefined", timeout=15_000)
        assert [c[0] for c in page.evaluate("window.__reditus.calls")] == [
            "initCustomer",
            "track",
        ]

        # Signed in through the example's stand-in login, which redirects to the page.
        loads = 2
        for n in range(1, loads + 1):
            if n == 1:
                page.goto(url + "/example-login?" + urlencode(USER))
            else:
                page.reload()
            assert page.url == url + "/"
            expect(status).to_have_attribute("data-state", "ready", timeout=15_000)
            calls: list[list[Any]] = page.evaluate("window.__reditus.calls")
            assert calls[:2] == [["initCustomer", "cust-test"], ["track", "pageview"]]
            assert [c[0] for c in calls] == ["initCustomer", "track", "loadReferralWidget"]
            assert len(calls[2]) == 2
            options = calls[2][1]
            assert set(options) == {"product_id", "auth_token", "user_details"}
            assert options["product_id"] == sidecar.product_id
            assert options["user_details"] == {
                "email": USER["email"],
                "first_name": USER["first_name"],
                "last_name": USER["last_name"],
            }
            verify(options["auth_token"], sidecar, USER["id"])

            # Part 3: the button opens the widget Reditus' script made available.
            page.click("#refer")
            page.wait_for_function("window.__reditus.shown === 1", timeout=15_000)

            # Exactly one token per page load, asked for by the app: none refused.
            def issued_for_this_load(n: int = n) -> bool:
                return counters(sidecar)[0] - issued_before >= n

            eventually(issued_for_this_load, timeout=10, what=f"token {n} counted")
            issued, errors = counters(sidecar)
            assert (issued - issued_before, errors - errors_before) == (n, 0)

        context.close()

    # The browser talked to the app and to the script's host, and to nothing else: not to
    # the sidecar (whose port no page names), not to Reditus.
    assert {origin(u) for u in seen} == {url, origin(script_url)}, seen
    assert urlsplit(sidecar.api_url).netloc not in " ".join(seen)
    api = [urlsplit(u).path for u in seen if u.startswith(url + "/api/")]
    assert api.count("/api/reditus-token") == 1 + loads, seen  # signed out, then each load
    assert script_hits == ["/v2.js"] * (1 + loads)
