"""A fault-injecting HTTP proxy in front of the Manager: answers 500 to workflow calls while
`fail_workflow_calls` is set, passes everything else through."""

from __future__ import annotations

import asyncio
from typing import Any

import aiohttp
from aiohttp import web


class FaultyProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.fail_workflow_calls = False
        self.stall_workflow_calls = 0.0  # seconds to hold each /workflows call before answering
        self.failed = 0
        self.url = ""
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> FaultyProxy:
        self._session = aiohttp.ClientSession()
        await self.restart()
        return self

    async def restart(self, port: int = 0) -> None:
        """(Re)start listening; after stop(), on the same port as before."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port or self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{self.port}"

    async def stop(self) -> None:
        """The Manager is gone: connections are refused until restart()."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aexit__(self, *exc: Any) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if self.stall_workflow_calls and request.path.startswith("/workflows"):
            self.failed += 1
            await asyncio.sleep(self.stall_workflow_calls)  # the client times out first
            return web.json_response({"error": "injected stall"}, status=504)  # never reaches the Manager
        if self.fail_workflow_calls and request.path.startswith("/workflows"):
            self.failed += 1
            return web.json_response({"error": "injected fault"}, status=500)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs, headers=headers,
                                         data=await request.read()) as resp:
            body = await resp.read()
            out = {k: v for k, v in resp.headers.items()
                   if k.lower() not in ("content-length", "transfer-encoding", "content-encoding", "connection")}
            return web.Response(status=resp.status, body=body, headers=out)
