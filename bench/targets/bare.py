"""Framework ceiling: an aiohttp handler that reads the body and answers a fixed JSON,
no validation, no signing, no metrics. What the sidecar's own work is measured against.

    python bench/targets/bare.py PORT [asyncio|uvloop]
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

# A real response, so both send the same number of bytes.
BODY = (
    b'{"token": "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJQcm9kdWN0SWQiOiJwcm9kLWJlbmNoIiwiVXNl'
    b"cklkIjoidS0xMjMiLCJpYXQiOjE3OTU0NjA0NjV9.XMOVvzjcQ_4chff3OgjCnz-6Yiu2eWh9ilfrLVvtxv6Nq6q3"
    b'-FTFln0dgeSk6LwNwpOYPJ2Ph7GJieOM_jirIw", "productId": "prod-bench", "issuedAt": 1795460465}'
)


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def main(port: int) -> None:
    app = web.Application()
    app.router.add_post("/v1/token", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


if __name__ == "__main__":
    port, loop = int(sys.argv[1]), (sys.argv[2] if len(sys.argv) > 2 else "asyncio")
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main(port))
