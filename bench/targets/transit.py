"""The other alternative: the app keeps no secret and asks Vault's transit engine for
the HMAC of every token (`POST transit/hmac/KEY/sha2-512`), over one pooled connection
set. Tokens have the Reditus shape; the key lives in Vault instead of the product secret.

    VAULT_ADDR=... VAULT_TOKEN=... python bench/targets/transit.py PORT KEY_NAME
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import time

import aiohttp
from aiohttp import web

HEADER = base64.urlsafe_b64encode(b'{"alg":"HS512","typ":"JWT"}').rstrip(b"=")


def b64url(data: bytes) -> bytes:
    return base64.urlsafe_b64encode(data).rstrip(b"=")


class Transit:
    def __init__(self, addr: str, token: str, key: str) -> None:
        self.url = f"{addr}/v1/transit/hmac/{key}/sha2-512"
        self.headers = {"X-Vault-Token": token}
        self.session: aiohttp.ClientSession | None = None

    async def handle(self, request: web.Request) -> web.Response:
        if request.headers.get("X-Sidecar-Request", "").lower() != "true":
            raise web.HTTPForbidden()
        data = await request.json()
        user_id = data.get("userId")
        if not isinstance(user_id, str) or not user_id:
            raise web.HTTPBadRequest()
        iat = int(time.time())
        claims = {"ProductId": "prod-bench", "UserId": user_id, "iat": iat}
        payload = json.dumps(claims, separators=(",", ":"), ensure_ascii=False).encode()
        signing_input = HEADER + b"." + b64url(payload)
        assert self.session is not None
        body = {"input": base64.b64encode(signing_input).decode()}
        async with self.session.post(self.url, json=body, headers=self.headers) as answer:
            answer.raise_for_status()
            hmac = (await answer.json())["data"]["hmac"]  # "vault:v1:<base64>"
        signature = b64url(base64.b64decode(hmac.rsplit(":", 1)[1]))
        token = (signing_input + b"." + signature).decode()
        return web.json_response(
            {"token": token, "productId": "prod-bench", "issuedAt": iat},
            headers={"Cache-Control": "no-store"},
        )


async def main(port: int, key: str) -> None:
    transit = Transit(os.environ["VAULT_ADDR"], os.environ["VAULT_TOKEN"], key)
    transit.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=256))
    app = web.Application()
    app.router.add_post("/v1/token", transit.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        factory = None
    else:
        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(int(sys.argv[1]), sys.argv[2]))
