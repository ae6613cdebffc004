"""Framework ceiling: an aiohttp handler that reads the body and answers a fixed JSON,
no validation, no signing, no metrics. What the sidecar's own work is measured against.

    python bench/targets/bare.py PORT [asyncio|uvloop]
"""

from __future__ import annotations

import sys

from aiohttp import web
from serving import serve  # bench/targets/, beside this script

# A real response, so both send the same number of bytes.
BODY = (
    b'{"token": "eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCJ9.eyJQcm9kdWN0SWQiOiJwcm9kLWJlbmNoIiwiVXNl'
    b"cklkIjoidS0xMjMiLCJpYXQiOjE3OTU0NjA0NjV9.XMOVvzjcQ_4chff3OgjCnz-6Yiu2eWh9ilfrLVvtxv6Nq6q3"
    b'-FTFln0dgeSk6LwNwpOYPJ2Ph7GJieOM_jirIw", "productId": "prod-bench", "issuedAt": 1795460465}'
)


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


if __name__ == "__main__":
    serve(handle, int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "asyncio")
