"""A real browser proves the guard: a page of another origin cannot get a token.

Headless Chromium (the Debian package, driven by Playwright) opens a page served by this
test on loopback under the foreign origin http://attacker.test:PORT, and its JavaScript
tries every way a web page has to make a browser POST to the real sidecar process: a CORS
fetch with the required header (preflighted), a no-cors fetch, a text/plain form crafted
to look like JSON, the same against http://localhost, and a DNS-rebinding page whose own
origin is the sidecar's port. Each attempt must reach the sidecar (its refusal counters
move, so the test cannot pass because nothing arrived), be refused by the guard, and leave
no token anywhere the page, or even the browser, could see.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from playwright.sync_api import Error as PlaywrightError
from playwright.sync_api import Page, Request, Response

from tests.browser import chromium
from tests.support import SidecarProcess, eventually, free_port, scrape, start_sidecar

pytestmark = pytest.mark.integration

ATTACKER = "attacker.test"
ISSUED = 'reditus_sidecar_tokens_issued_total{product="default"}'
ERRORS = "reditus_sidecar_token_errors_total"
# The refusals that come from the browser guard itself (405 is the answer to a CORS
# preflight). Any other reason (415 for text/plain, 400 for the body) would mean the guard
# let the request through and a later check happened to stop it.
GUARD_REASONS = frozenset(
    {"method_not_allowed", "missing_request_header", "browser_origin", "host_not_allowed"}
)
# attacker.test resolves to loopback: a name of this test's own that makes the page's
# origin plainly foreign to the sidecar's. The browser's own Local Network Access block
# would stop the rebinding page (its document has no address, so Chromium counts it
# public) before the sidecar sees it; lifted: other browsers, older ones, or a user's
# "allow" click do not have it, and what is under test is the sidecar's guard.
EXTRA_ARGS = ["--disable-features=LocalNetworkAccessChecks"]

PAGE = b"""<!doctype html>
<html><head><meta charset="utf-8"><title>attacker</title></head>
<body><h1>a page of another origin</h1></body></html>
"""

# Each attempt is a JS function of the sidecar's base URL; it resolves (never rejects)
# to whatever the page could read: a response's status, type and text, or the error.
CORS_FETCH = """async (base) => {
  try {
    const r = await fetch(base + "/v1/token", {
      method: "POST",
      headers: {"Content-Type": "application/json", "X-Sidecar-Request": "true"},
      body: JSON.stringify({userId: "victim"}),
    });
    return {outcome: "response", status: r.status, type: r.type, text: await r.text()};
  } catch (e) {
    return {outcome: "error", text: String(e)};
  }
}"""

# In no-cors mode the browser silently drops both headers (not CORS-safelisted) and sends
# the string body as text/plain;charset=UTF-8; the response is opaque to the page.
NO_CORS_FETCH = """async (base) => {
  try {
    const r = await fetch(base + "/v1/token", {
      method: "POST",
      mode: "no-cors",
      headers: {"Content-Type": "application/json", "X-Sidecar-Request": "true"},
      body: '{"userId":"victim"}',
    });
    return {outcome: "response", status: r.status, type: r.type, text: await r.text()};
  } catch (e) {
    return {outcome: "error", text: String(e)};
  }
}"""

# text/plain forms send `name=value\\r\\n`: this name and value make the body read
# {"userId":"x", "a":"="} - valid JSON. The form targets an iframe; its load event is the
# end of the attempt. The sidecar's answer is cross-origin, so contentDocument is null.
FORM_POST = """(base) => new Promise((resolve) => {
  const frame = document.createElement("iframe");
  frame.name = "sink-" + Math.random().toString(36).slice(2);
  document.body.appendChild(frame);
  const form = document.createElement("form");
  form.method = "POST";
  form.enctype = "text/plain";
  form.action = base + "/v1/token";
  form.target = frame.name;
  const field = document.createElement("input");
  field.type = "hidden";
  field.name = '{"userId":"x", "a":"';
  field.value = '"}';
  form.appendChild(field);
  document.body.appendChild(form);
  frame.addEventListener("load", () => {
    let text;
    try {
      const doc = frame.contentDocument;
      text = doc === null ? "contentDocument is null" : doc.documentElement.outerHTML;
    } catch (e) {
      text = String(e);
    }
    resolve({outcome: "loaded", text: text});
  }, {once: true});
  form.submit();
})"""


class _PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(PAGE)))
        self.end_headers()
        self.wfile.write(PAGE)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@contextlib.contextmanager
def attacker_site() -> Iterator[int]:
    """The attacker's page on a free loopback port; yields the port."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), _PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@dataclass
class Attempt:
    name: str
    page_saw: dict[str, Any]  # what the page's JavaScript could read
    refusals: dict[str, float]  # token_errors_total increase at the sidecar, by reason
    issued: float  # tokens_issued_total increase at the sidecar
    browser_got: list[str]  # the sidecar's answers as the browser itself received them


def _errors(sidecar: SidecarProcess) -> tuple[float, dict[str, float]]:
    """(tokens issued, refusals by reason) from one scrape."""
    issued, errors = 0.0, {}
    for line in scrape(sidecar.metrics_url).splitlines():
        if line.startswith(ISSUED + " "):
            issued = float(line.split()[-1])
        elif line.startswith(ERRORS + '{reason="'):
            reason = line.split('"')[1]
            errors[reason] = float(line.split()[-1])
    return issued, errors


def _bodies(responses: list[Response]) -> list[str]:
    """Take the responses seen so far with their bodies, read before any navigation drops
    them. Chromium keeps no body it withheld from the page (Opaque Response Blocking
    stops a JSON answer to a no-cors fetch in the network service)."""
    taken, responses[:] = list(responses), []
    out = []
    for response in taken:
        try:
            body = response.text()
        except PlaywrightError:
            body = "<body not kept by the browser>"
        out.append(f"{response.status} {response.url}: {body}")
    return out


def attempt(
    sidecar: SidecarProcess,
    page: Page,
    received: list[Response],
    name: str,
    script: str,
    arg: str | None,
) -> Attempt:
    """Run one attack and wait until the sidecar has counted what reached it: a refusal or
    a token. The JS promise settles only after the answer (or the preflight's), so this
    holds at once; the deadline only bounds a failure."""
    issued_before, before = _errors(sidecar)
    saw: dict[str, Any] = page.evaluate(script, arg)  # awaits the JS promise
    delta: dict[str, float] = {}
    issued = [0.0]

    def counted() -> bool:
        issued_now, now = _errors(sidecar)
        delta.clear()
        delta.update({r: now[r] - before.get(r, 0.0) for r in now if now[r] != before.get(r)})
        issued[0] = issued_now - issued_before
        return sum(delta.values()) > 0 or issued[0] > 0

    eventually(
        counted, timeout=10, what=f"{name}: the sidecar counted nothing (the page saw {saw})"
    )
    return Attempt(name, saw, dict(delta), issued[0], _bodies(received))


def test_a_page_of_another_origin_gets_no_token(tmp_path: Path) -> None:
    with (
        start_sidecar(tmp_path) as sidecar,
        attacker_site() as page_port,
        chromium(tmp_path / "chromium-home", hosts=[ATTACKER], extra_args=EXTRA_ARGS) as browser,
    ):
        port = urlsplit(sidecar.api_url).port
        targets = {"127.0.0.1": f"http://127.0.0.1:{port}", "localhost": f"http://localhost:{port}"}
        issued_before, _ = _errors(sidecar)

        context = browser.new_context()
        page = context.new_page()
        # What the browser itself sent to and got from the sidecar's port (DevTools' view,
        # more than the page may read; CORS preflights do not show here, and a request
        # shows even when its preflight failed and it never left the browser).
        sent: list[Request] = []
        received: list[Response] = []
        page.on("request", lambda r: sent.append(r) if urlsplit(r.url).port == port else None)
        page.on("response", lambda r: received.append(r) if urlsplit(r.url).port == port else None)
        page.goto(f"http://{ATTACKER}:{page_port}/")
        assert page.evaluate("location.origin") == f"http://{ATTACKER}:{page_port}"

        attempts: list[Attempt] = []
        for host, base in targets.items():
            attempts.append(
                attempt(sidecar, page, received, f"cors fetch -> {host}", CORS_FETCH, base)
            )
            attempts.append(
                attempt(sidecar, page, received, f"no-cors fetch -> {host}", NO_CORS_FETCH, base)
            )
            attempts.append(
                attempt(sidecar, page, received, f"text/plain form -> {host}", FORM_POST, base)
            )

        # DNS rebinding: the browser believes the page came from attacker.test:SIDECAR_PORT
        # (Playwright answers that one navigation; the fetch that follows is not routed).
        rebind_url = f"http://{ATTACKER}:{port}/"
        page.route(rebind_url, lambda route: route.fulfill(body=PAGE, content_type="text/html"))
        page.goto(rebind_url)
        received.clear()  # the page itself, fulfilled above
        # To the browser the sidecar is now the page's own origin: a relative fetch is
        # same-origin, needs no preflight, and the custom header goes along.
        attempts.append(
            attempt(sidecar, page, received, f"rebinding fetch -> {ATTACKER}", CORS_FETCH, "")
        )

        issued_after, _ = _errors(sidecar)
        context.close()

    report = "\n".join(
        [f"{a.name}: sidecar refused {a.refusals}, issued {a.issued:g}; page saw {a.page_saw}"
         for a in attempts]
        + [f"browser sent {r.method} {r.url} {r.post_data!r}" for r in sent]
        + [f"browser received {body}" for a in attempts for body in a.browser_got]
    )  # fmt: skip
    print(report)  # shown with -s or -rP: what each attempt met
    assert issued_after == issued_before, f"a token was issued:\n{report}"
    assert not [a for a in attempts if a.issued], f"a token was issued:\n{report}"
    # The form's crafted body went out as JSON-looking text/plain, twice (two hosts).
    forms = [r for r in sent if r.post_data == '{"userId":"x", "a":"="}\r\n']
    assert len(forms) == 2, f"the text/plain forms did not send the crafted body:\n{report}"
    for a in attempts:
        assert set(a.refusals) <= GUARD_REASONS, f"{a.name} got past the guard:\n{report}"
        assert "eyJ" not in str(a.page_saw), f"{a.name}: a token reached the page:\n{report}"
        if a.name.startswith("cors"):  # the preflight reached the sidecar and was refused
            assert a.refusals.get("method_not_allowed", 0) >= 1, report
            assert a.page_saw["outcome"] == "error", report
        if a.name.startswith("no-cors"):
            assert a.page_saw["type"] == "opaque", report
            assert a.page_saw["text"] == "", report
    bodies = [body for a in attempts for body in a.browser_got]
    assert not [b for b in bodies if "eyJ" in b], f"a token reached the browser:\n{report}"
