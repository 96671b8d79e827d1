"""The Manager client against a scripted Manager (SPEC §3): OAuth2 client credentials sent
form-encoded, the bearer token cached and refreshed once on a 401, retries on 429 and 5xx, other
4xx permanent, lookups cached."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from aiohttp import web

from workflow_orchestrator.manager.client import ManagerClient, ManagerError, TransientManagerError


class ScriptedManager:
    """Answers each path with the next status of its script (then 200), and records every call."""

    def __init__(self) -> None:
        self.scripts: dict[str, list[int]] = {}
        self.calls: list[tuple[str, str, str | None, str | None]] = []  # method, path, Accept, Authorization
        self.token_requests: list[tuple[str | None, dict[str, str]]] = []  # content type, form
        self.revoked: set[str] = set()
        self.url = ""

    async def token(self, request: web.Request) -> web.Response:
        form = dict(await request.post())
        self.token_requests.append((request.content_type, {k: str(v) for k, v in form.items()}))
        return web.json_response({"access_token": f"tok-{len(self.token_requests)}", "token_type": "Bearer",
                                  "expires_in": 3600})

    async def api(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization")
        self.calls.append((request.method, request.path, request.headers.get("Accept"), auth))
        if auth is None or auth.removeprefix("Bearer ") in self.revoked:
            return web.json_response({"error": "invalid token"}, status=401)
        script = self.scripts.get(request.path, [])
        status = script.pop(0) if script else 200
        if status != 200:
            return web.json_response({"error": f"scripted {status}"}, status=status)
        if request.method == "PUT":
            return web.Response(status=204)
        return web.json_response({"id": request.path.rsplit("/", 1)[-1], "etcd_token": "t"})

    def count(self, path: str) -> int:
        return sum(1 for _, p, _, _ in self.calls if p == path)


@asynccontextmanager
async def scripted() -> AsyncIterator[tuple[ScriptedManager, ManagerClient]]:
    manager = ScriptedManager()
    app = web.Application()
    app.router.add_post("/oauth/token", manager.token)
    app.router.add_route("*", "/{tail:.*}", manager.api)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    manager.url = f"http://127.0.0.1:{port}"
    client = ManagerClient(manager.url, f"{manager.url}/oauth/token", "the-client", "the-secret",
                           attempts=4, max_backoff=0.05)
    try:
        async with client:
            yield manager, client
    finally:
        await runner.cleanup()


async def test_the_token_is_requested_form_encoded_once_and_sent_with_every_call() -> None:
    async with scripted() as (m, client):
        await client.get_workflow("w1")
        await client.put_workflow("w1", {"current_step": "build"})
        assert m.token_requests == [("application/x-www-form-urlencoded", {
            "grant_type": "client_credentials", "client_id": "the-client", "client_secret": "the-secret"})]
        assert [(method, accept, auth) for method, _, accept, auth in m.calls] == [
            ("GET", "application/json", "Bearer tok-1"), ("PUT", "application/json", "Bearer tok-1")]


async def test_a_401_refreshes_the_token_once_then_the_call_succeeds() -> None:
    async with scripted() as (m, client):
        await client.get_workflow("w1")
        m.revoked.add("tok-1")
        assert (await client.get_workflow("w2"))["id"] == "w2"
        assert len(m.token_requests) == 2
        assert [auth for _, p, _, auth in m.calls if p == "/workflows/w2"] == ["Bearer tok-1", "Bearer tok-2"]


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_429_and_5xx_are_retried(status: int) -> None:
    async with scripted() as (m, client):
        m.scripts["/workflows/w1"] = [status, status]
        assert (await client.get_workflow("w1"))["id"] == "w1"
        assert m.count("/workflows/w1") == 3


async def test_a_manager_that_keeps_failing_is_a_transient_error_after_the_attempts() -> None:
    async with scripted() as (m, client):
        m.scripts["/workflows/w1"] = [429] * 10
        with pytest.raises(TransientManagerError) as caught:
            await client.get_workflow("w1")
        assert caught.value.status == 429 and m.count("/workflows/w1") == 4


@pytest.mark.parametrize("status", [400, 403, 422])
async def test_other_4xx_are_permanent_and_not_retried(status: int) -> None:
    async with scripted() as (m, client):
        m.scripts["/workflows/w1"] = [status]
        with pytest.raises(ManagerError) as caught:
            await client.put_workflow("w1", {"current_step": "build"})
        assert not isinstance(caught.value, TransientManagerError) and caught.value.status == status
        assert m.count("/workflows/w1") == 1


async def test_lookups_are_cached_and_the_workflow_never_is() -> None:
    async with scripted() as (m, client):
        for _ in range(3):
            await client.get_cluster("t")
            await client.get_exchange("1")
            await client.get_modules("1")
            await client.get_workflow("w1")
        assert (m.count("/clusters/t"), m.count("/messaging/exchanges/1"),
                m.count("/messaging/exchanges/1/modules"), m.count("/workflows/w1")) == (1, 1, 1, 3)
        await client.get_modules("1", fresh=True)
        assert m.count("/messaging/exchanges/1/modules") == 2, "fresh bypasses the module cache"
