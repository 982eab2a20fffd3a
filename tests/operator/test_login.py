"""`operator.login`: kopf's session carries our credentials and a bounded connection
pool, so a burst of kopf's requests queues for connections instead of opening one
TLS connection per request (the 1,000-model bench's RSS peak)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import kopf
import pytest
import yaml
from aiohttp import web

from edgeslim.operator import login


def test_the_pool_holds_every_watch_and_room_for_requests() -> None:
    cluster_wide = login.connection_limit(0)
    assert cluster_wide == login.WATCHED_KINDS + login.SCANNING_WATCHES + 16
    # One watch per kind in each namespace: the requests' share stays the same.
    three = login.connection_limit(3)
    assert three - 3 * login.WATCHED_KINDS - login.SCANNING_WATCHES == 16
    assert login.connection_limit(1) == cluster_wide


def _kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "current-context": "ctx",
                "contexts": [{"name": "ctx", "context": {"cluster": "c", "user": "u"}}],
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": "t0ken"}}],
            }
        )
    )
    return path


async def _burst(kubeconfig_dir: Path, requests: int) -> tuple[int, int, set[str], int]:
    """`requests` GETs at once through the login's session against a real HTTP
    server: (answered, most in flight at once, Authorization headers seen,
    distinct client connections)."""
    in_flight, most, auth, peers = 0, 0, set(), set()

    async def handle(request: web.Request) -> web.Response:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        auth.add(request.headers.get("Authorization", ""))
        peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        await asyncio.sleep(0.05)
        in_flight -= 1
        return web.json_response({})

    app = web.Application()
    app.router.add_get("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    config = _kubeconfig(kubeconfig_dir / "config", f"http://127.0.0.1:{port}")
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("KUBECONFIG", str(config))
            mp.delenv("KUBERNETES_SERVICE_HOST", raising=False)
            ctx = await login.login()
        assert isinstance(ctx, kopf.AiohttpSession)
        assert ctx.server == f"http://127.0.0.1:{port}"
        session = ctx.aiohttp_session

        async def get() -> int:
            async with session.get(ctx.server + "/") as r:
                await r.read()
                return r.status

        statuses = await asyncio.gather(*(get() for _ in range(requests)))
        await session.close()
    finally:
        await runner.cleanup()
    return sum(s == 200 for s in statuses), most, auth, len(peers)


def test_a_burst_of_requests_shares_a_bounded_pool(tmp_path: Path) -> None:
    login.watch(0)
    limit = login.connection_limit(0)
    answered, most, auth, connections = asyncio.run(_burst(tmp_path, 4 * limit))
    assert answered == 4 * limit  # all answered: the rest queued for a connection
    assert most <= limit and connections <= limit
    assert auth == {"Bearer t0ken"}
