"""A minimal aiohttp app asking reditus-sidecar for the Reditus widget token.

The app never holds the product secret: it posts the signed-in user's id to the sidecar on
loopback (or its unix socket) and hands the token to the widget.

    REDITUS_SIDECAR_URL=http://127.0.0.1:8787 PORT=3000 python app.py
    curl -H 'X-Example-User: u-123' localhost:3000/api/reditus-token

`fetch_token_sync` is the same call with the standard library only, for sync frameworks
(Flask, Django).
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request

import aiohttp
from aiohttp import web

SIDECAR_URL = os.environ.get("REDITUS_SIDECAR_URL", "http://127.0.0.1:8787")
# Set by the Helm chart when sidecar.unixSocket.enabled is true; preferred when present.
SIDECAR_SOCKET = os.environ.get("REDITUS_SIDECAR_UNIX_SOCKET")
HEADERS = {"Content-Type": "application/json", "X-Sidecar-Request": "true"}
TIMEOUT = 2.0
SESSION = web.AppKey("session", aiohttp.ClientSession)


class SidecarError(Exception):
    """The sidecar could not give a token: status and error code, never the secret."""

    def __init__(self, status: int, code: str, retry_after: str | None = None) -> None:
        super().__init__(f"reditus-sidecar answered {status} {code}")
        self.status, self.code, self.retry_after = status, code, retry_after


async def fetch_token(session: aiohttp.ClientSession, user_id: str) -> str:
    """Ask the sidecar for one user's token."""
    url = "http://sidecar/v1/token" if SIDECAR_SOCKET else f"{SIDECAR_URL}/v1/token"
    try:
        async with session.post(url, json={"userId": user_id}, headers=HEADERS) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                code = body.get("error", {}).get("code", "sidecar_error")
                raise SidecarError(response.status, code, response.headers.get("Retry-After"))
            return str(body["token"])
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


def current_user_id(request: web.Request) -> str | None:
    """Stand-in for your session: in your app the user id comes from your login."""
    return request.headers.get("X-Example-User")


async def reditus_token(request: web.Request) -> web.Response:
    user_id = current_user_id(request)
    if not user_id:
        return web.json_response({"error": "not signed in"}, status=401)
    try:
        token = await fetch_token(request.app[SESSION], user_id)
    except SidecarError as exc:
        print(exc, flush=True)
        if exc.status == 503:
            headers = {"Retry-After": exc.retry_after} if exc.retry_after else None
            return web.json_response(
                {"error": "token temporarily unavailable"}, status=503, headers=headers
            )
        return web.json_response({"error": "token unavailable"}, status=502)
    return web.json_response({"token": token}, headers={"Cache-Control": "no-store"})


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
    return app


if __name__ == "__main__":
    host = os.environ.get("HOST", "127.0.0.1")
    port = int(os.environ.get("PORT", "3000"))
    web.run_app(create_app(), host=host, port=port, print=lambda msg: print(msg, flush=True))
