"""How a hand-written benchmark target serves its one handler: POST /v1/token on loopback,
on the loop named on its command line, until it is killed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def serve(handle: Handler, port: int, loop: str) -> None:
    factory = None
    if loop == "uvloop":
        import uvloop

        factory = uvloop.new_event_loop

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/v1/token", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        await asyncio.Event().wait()

    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(main())
