"""A minimal aiohttp app asking reditus-sidecar for the Reditus widget token.

The app never holds the product secret: it posts the signed-in user's id to the sidecar on
loopback (or its unix socket) and hands the token to the widget.

    REDITUS_SIDECAR_URL=http://127.0.0.1:8787 PORT=3000 python app.py
    curl -H 'X-Example-User: u-123' localhost:3000/api/reditus-token

And the page (../public/, shared with the Express example): open http://localhost:3000/example-login?id=u-123&email=a@b.c
It loads Reditus' script, gets the token from /api/reditus-token (this app, same origin)
and calls gr("loadReferralWidget", {product_id, auth_token, user_details}).

`fetch_token_sync` is the same call with the standard library only, for sync frameworks
(Flask, Django).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
from aiohttp import web

SIDECAR_URL = os.environ.get("REDITUS_SIDECAR_URL", "http://127.0.0.1:8787")
# Set by the Helm chart when sidecar.unixSocket.enabled is true; preferred when present.
SIDECAR_SOCKET = os.environ.get("REDITUS_SIDECAR_UNIX_SOCKET")
HEADERS = {"Content-Type": "application/json", "X-Sidecar-Request": "true"}
TIMEOUT = 2.0
SESSION = web.AppKey("session", aiohttp.ClientSession)
# Reditus' script (the Pageview Tracking Script, which also loads the referral widget).
REDITUS_SCRIPT_URL = os.environ.get("REDITUS_SCRIPT_URL", "https://script.getreditus.com/v2.js")
# Optional: your Reditus customer id, for the snippet's gr("initCustomer") and pageview.
REDITUS_CUSTOMER_ID = os.environ.get("REDITUS_CUSTOMER_ID", "")
PUBLIC_DIR = Path(__file__).resolve().parent.parent / "public"  # shared with the Express example
SESSION_COOKIE = "example_user"
USER_FIELDS = ("id", "email", "first_name", "last_name", "company_id", "company_name")


class SidecarError(Exception):
    """The sidecar could not give a token: status and error code, never the secret."""

    def __init__(self, status: int, code: str, retry_after: str | None = None) -> None:
        super().__init__(f"reditus-sidecar answered {status} {code}")
        self.status, self.code, self.retry_after = status, code, retry_after


async def fetch_token(session: aiohttp.ClientSession, user_id: str) -> dict[str, str]:
    """Ask the sidecar for one user's token: {"token", "productId", "issuedAt"}."""
    url = "http://sidecar/v1/token" if SIDECAR_SOCKET else f"{SIDECAR_URL}/v1/token"
    try:
        async with session.post(url, json={"userId": user_id}, headers=HEADERS) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                code = body.get("error", {}).get("code", "sidecar_error")
                raise SidecarError(response.status, code, response.headers.get("Retry-After"))
            return {"token": str(body["token"]), "productId": str(body["productId"])}
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise SidecarError(502, "sidecar_unreachable") from exc


def fetch_token_sync(user_id: str, sidecar_url: str = SIDECAR_URL) -> str:
    """The same request with urllib (TCP only)."""
    request = urllib.request.Request(  # noqa: S310 - a configured loopback URL
        f"{sidecar_url}/v1/token",
        data=json.dumps({"userId": user_id}).encode(),
        headers=HEADERS,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT) as response:  # noqa: S310
            return str(json.load(response)["token"])
    except urllib.error.HTTPError as exc:
        code = json.loads(exc.read() or b"{}").get("error", {}).get("code", "sidecar_error")
        raise SidecarError(exc.code, code, exc.headers.get("Retry-After")) from None
    except OSError as exc:
        raise SidecarError(502, "sidecar_unreachable") from exc


# --- Stand-in for your session: NOT a login. --------------------------------------------
# Anyone can claim any user here (the X-Example-User header, or the cookie that
# /example-login sets from its query string). In your app the user comes from your login
# and current_user and the /example-login route go away.
def current_user(request: web.Request) -> dict[str, str] | None:
    if user_id := request.headers.get("X-Example-User"):
        return {"id": user_id}
    try:
        saved = json.loads(urllib.parse.unquote(request.cookies[SESSION_COOKIE]))
        user = {key: saved[key] for key in USER_FIELDS if isinstance(saved.get(key), str)}
    except (KeyError, ValueError, AttributeError):
        return None
    return user if user.get("id") else None


async def example_login(request: web.Request) -> web.Response:
    """/example-login?id=u-123&email=...&first_name=...&last_name=..."""
    user = {key: request.query[key] for key in USER_FIELDS if request.query.get(key)}
    if "id" not in user:
        return web.Response(
            status=400, text="example-login needs ?id=USER_ID (email, first_name...)\n"
        )
    response = web.Response(status=303, headers={"Location": "/"})
    response.set_cookie(
        SESSION_COOKIE,
        urllib.parse.quote(json.dumps(user, separators=(",", ":")), safe=""),
        httponly=True,
        samesite="Lax",
        path="/",
    )
    return response


# ------------------------------------------------------------------------------------------


async def reditus_config(request: web.Request) -> web.Response:
    """Reditus' script URL for the page (a tiny script, so the page itself stays static)."""
    config = {"scriptUrl": REDITUS_SCRIPT_URL, "customerId": REDITUS_CUSTOMER_ID}
    return web.Response(
        text=f"window.REDITUS_CONFIG = {json.dumps(config)};\n",
        content_type="text/javascript",
        headers={"Cache-Control": "no-store"},
    )


async def me(request: web.Request) -> web.Response:
    """What the page needs about the signed-in user for the widget's user_details."""
    user = current_user(request)
    if user is None:
        return web.json_response({"error": "not signed in"}, status=401)
    return web.json_response(user, headers={"Cache-Control": "no-store"})


async def index(request: web.Request) -> web.FileResponse:
    return web.FileResponse(PUBLIC_DIR / "index.html")


async def reditus_token(request: web.Request) -> web.Response:
    user = current_user(request)
    if user is None:
        return web.json_response({"error": "not signed in"}, status=401)
    try:
        answer = await fetch_token(request.app[SESSION], user["id"])
    except SidecarError as exc:
        print(exc, flush=True)
        if exc.status == 503:
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
            return web.json_response(
                {"error": "token temporarily unavailable"}, status=503, headers=headers
            )
        return web.json_response({"error": "token unavailable"}, status=502)
    # The product id goes along: the page passes it to gr("loadReferralWidget").
    return web.json_response(answer, headers={"Cache-Control": "no-store"})


async def sidecar_session(app: web.Application):  # type: ignore[no-untyped-def]
    connector = aiohttp.UnixConnector(path=SIDECAR_SOCKET) if SIDECAR_SOCKET else None
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=TIMEOUT)
    ) as session:
        app[SESSION] = session
        yield


def create_app() -> web.Application:
    app = web.Application()
    app.cleanup_ctx.append(sidecar_session)
    app.router.add_get("/api/reditus-token", reditus_token)
    app.router.add_get("/api/me", me)
    app.router.add_get("/example-login", example_login)
    app.router.add_get("/reditus-config.js", reditus_config)
    # The referral page: ../public/index.html and ../public/referral.js.
    app.router.add_get("/", index)
    app.router.add_static("/", PUBLIC_DIR)
    return app


if __name__ == "__main__":
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "3000"))
    web.run_app(create_app(), host=host, port=port, print=lambda msg: print(msg, flush=True))
