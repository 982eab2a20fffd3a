"""/metrics, /healthz and /readyz on one port, served from kopf's own event loop.

Served from the loop on purpose: if the loop hangs, /healthz stops answering
and the kubelet restarts the operator -- which is what liveness is for.
"""

from __future__ import annotations

from collections.abc import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from edgeslim.metrics import REGISTRY


def app(ready: Callable[[], bool]) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(
            body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(_: web.Request) -> web.Response:
        if ready():
            return web.Response(text="ok\n")
        return web.Response(status=503, text="starting\n")

    application = web.Application()
    application.add_routes(
        [web.get("/metrics", metrics), web.get("/healthz", healthz), web.get("/readyz", readyz)]
    )
    return application


async def serve(ready: Callable[[], bool], port: int, host: str = "0.0.0.0") -> web.AppRunner:
    runner = web.AppRunner(app(ready), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
