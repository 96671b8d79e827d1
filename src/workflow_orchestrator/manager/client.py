"""Manager API client (SPEC §3): OAuth2 client credentials, retries, typed calls, caches.

httpx with the aiohttp transport (httpx-aiohttp): the Manager is on the hot path and the default
httpx transport costs 2-3x the CPU per request on this machine kind (see README, benchmarks).
Concurrency is bounded by a semaphore so a burst of deliveries cannot open unbounded sockets.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import httpx
from authlib.integrations.httpx_client import AsyncOAuth2Client
from httpx_aiohttp import AiohttpTransport
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_exponential_jitter

from workflow_orchestrator import jsonio

Observer = Callable[[str, str, float], None]  # (endpoint template, status, seconds)


class ManagerError(Exception):
    """A Manager call failed; `status` is the HTTP status (0 for a network failure)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class TransientManagerError(ManagerError):
    """Worth retrying: network errors, timeouts, 429, 5xx."""


class NotFound(ManagerError):
    pass


class Conflict(ManagerError):
    pass


class _TTLCache:
    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.data: dict[Any, tuple[float, Any]] = {}

    def get(self, key: Any) -> tuple[bool, Any]:
        hit = self.data.get(key)
        if hit is None or hit[0] < time.monotonic():
            return False, None
        return True, hit[1]

    def put(self, key: Any, value: Any) -> None:
        self.data[key] = (time.monotonic() + self.ttl, value)


class ManagerClient:
    """Typed calls of the Manager API. Create, `await start()`, use, `await close()`."""

    def __init__(
        self,
        base_url: str,
        token_url: str,
        client_id: str,
        client_secret: str,
        *,
        concurrency: int = 32,
        timeout: float = 10.0,
        attempts: int = 4,
        max_backoff: float = 2.0,
        observe: Observer | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token_url = token_url
        self._client_id = client_id
        self._client_secret = client_secret
        self._timeout = timeout
        self._attempts = attempts
        self._max_backoff = max_backoff
        self._observe = observe
        self._sem = asyncio.Semaphore(concurrency)
        self._limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        self._http: httpx.AsyncClient | None = None
        self._token: str | None = None
        self._token_expires = 0.0
        self._token_lock = asyncio.Lock()
        self._clusters = _TTLCache(300)
        self._exchanges = _TTLCache(300)
        self._modules = _TTLCache(30)
        self.last_ok = 0.0
        self.last_error: str | None = None

    async def start(self) -> None:
        if self._http is None:
            self._http = httpx.AsyncClient(
                base_url=self.base_url,
                transport=AiohttpTransport(limits=self._limits),
                timeout=self._timeout,
                headers={"Accept": "application/json"},
            )

    async def close(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def __aenter__(self) -> ManagerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- auth ----------------------------------------------------------------------------
    async def token(self, *, refresh: bool = False, stale: str | None = None) -> str:
        """The cached bearer token, fetched (form-encoded, RFC 6749) when absent or near expiry."""
        if not refresh and self._token and time.monotonic() < self._token_expires:
            return self._token
        async with self._token_lock:
            if self._token and self._token != stale and time.monotonic() < self._token_expires:
                return self._token
            oauth = AsyncOAuth2Client(self._client_id, self._client_secret,
                                      token_endpoint_auth_method="client_secret_post", timeout=self._timeout)
            try:
                tok = await oauth.fetch_token(self.token_url, grant_type="client_credentials")
            except Exception as exc:  # authlib raises OAuthError or its HTTP library's errors
                response = getattr(exc, "response", None)
                status = int(getattr(response, "status_code", 0) or 0)
                oauth_error = getattr(exc, "error", None)  # authlib's OAuthError: the server said no
                if oauth_error and not status:
                    status = 401
                kind = TransientManagerError if status in (0, 429) or status >= 500 else ManagerError
                detail = oauth_error or type(exc).__name__
                raise kind(f"token request to the OAuth endpoint failed: {detail}", status) from None
            finally:
                await oauth.aclose()
            self._token = str(tok["access_token"])
            expires_in = float(tok.get("expires_in") or 3600)
            self._token_expires = time.monotonic() + max(5.0, expires_in - min(60.0, expires_in / 10))
            return self._token

    # ---- transport -----------------------------------------------------------------------
    async def request(self, method: str, path: str, endpoint: str, *, json: Any = None,
                      params: dict[str, str] | None = None) -> httpx.Response:
        """One API call with retries on transient failures; raises ManagerError subclasses."""
        # The first attempt runs without tenacity: setting up its retry machinery on every call cost
        # ~2% of an orchestration step's CPU, and retrying is the rare path.
        try:
            return await self._once(method, path, endpoint, json, params)
        except TransientManagerError as exc:
            if self._attempts <= 1:
                raise
            first: TransientManagerError | None = exc
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential_jitter(multiplier=0.05, max=self._max_backoff),
            retry=retry_if_exception_type(TransientManagerError),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if first is not None:  # attempt 1, made above: tenacity counts it and waits as before
                    error, first = first, None
                    raise error
                return await self._once(method, path, endpoint, json, params)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _once(self, method: str, path: str, endpoint: str, body: Any,
                    params: dict[str, str] | None) -> httpx.Response:
        if self._http is None:
            await self.start()
        assert self._http is not None
        token = await self.token()
        for refreshed in (False, True):
            started = time.perf_counter()
            try:
                async with self._sem:
                    headers = {"Authorization": f"Bearer {token}"}
                    content = None
                    if body is not None:
                        content = jsonio.dumps(body)
                        headers["Content-Type"] = "application/json"
                    resp = await self._http.request(method, path, content=content, params=params, headers=headers)
            except httpx.TransportError as exc:
                self._seen(endpoint, "error", started, f"{method} {endpoint}: {type(exc).__name__}")
                raise TransientManagerError(f"Manager unreachable on {method} {endpoint}: "
                                            f"{type(exc).__name__}") from None
            status = resp.status_code
            self._seen(endpoint, str(status), started, None if status < 500 else f"{method} {endpoint}: {status}")
            if status == 401 and not refreshed:
                token = await self.token(refresh=True, stale=token)
                continue
            break
        if status < 300:
            return resp
        text = f"Manager answered {status} to {method} {path}"
        if status == 404:
            raise NotFound(text, status)
        if status == 409:
            raise Conflict(text, status)
        if status == 429 or status >= 500:
            raise TransientManagerError(text, status)
        raise ManagerError(f"{text}: {resp.text[:300]}", status)

    def _seen(self, endpoint: str, status: str, started: float, error: str | None) -> None:
        if error is None:
            self.last_ok = time.monotonic()
        self.last_error = error
        if self._observe is not None:
            self._observe(endpoint, status, time.perf_counter() - started)

    async def _json(self, path: str, endpoint: str, params: dict[str, str] | None = None) -> Any:
        return (await self.request("GET", path, endpoint, params=params)).json()

    # ---- workflows -----------------------------------------------------------------------
    async def get_workflow(self, wid: str) -> dict[str, Any]:
        data = await self._json(f"/workflows/{quote(wid, safe='')}", "/workflows/{id}")
        if not isinstance(data, dict):
            raise ManagerError("Manager returned a workflow that is not an object")
        return data

    async def put_workflow(self, wid: str, fields: dict[str, Any]) -> None:
        await self.request("PUT", f"/workflows/{quote(wid, safe='')}", "/workflows/{id}", json=fields)

    async def create_workflow(self, fields: dict[str, Any]) -> str:
        resp = await self.request("POST", "/workflows", "/workflows", json=fields)
        location = resp.headers.get("Location", "")
        if location:
            return str(location).rstrip("/").rsplit("/", 1)[-1]
        data: dict[str, Any] = resp.json()
        return str(data["id"])

    async def execute_workflow(self, wid: str, options: dict[str, Any]) -> None:
        await self.request("POST", f"/workflows/{quote(wid, safe='')}/execute", "/workflows/{id}/execute",
                           json=options)

    async def list_workflows(self, **filters: str) -> list[dict[str, Any]]:
        data = await self._json("/workflows", "/workflows", params=filters or None)
        return list(data)

    async def post_system_event(self, type_: str, severity: str, message: str, data: dict[str, Any],
                                unique: bool = False) -> None:
        await self.request("POST", "/system_events", "/system_events", json={
            "type": type_, "severity": severity, "message": message, "data": data, "unique": unique})

    # ---- messaging topology (cached) -----------------------------------------------------
    async def _cached(self, cache: _TTLCache, key: Any, path: str, endpoint: str,
                      params: dict[str, str] | None = None, missing: Any = ...) -> Any:
        hit, value = cache.get(key)
        if hit:
            return value
        try:
            value = await self._json(path, endpoint, params)
        except NotFound:
            if missing is ...:
                raise
            value = missing
        cache.put(key, value)
        return value

    def cached_fact(self, kind: str, key: str) -> tuple[bool, Any]:
        """A lookup decide() needs, if it is in the caches and fresh (no I/O)."""
        if kind == "build_clusters":
            return self._clusters.get(("xc", key))
        if kind == "global_build_clusters":
            return self._clusters.get(("c",))
        if kind == "modules":
            return self._modules.get(key)
        if kind == "cluster":
            return self._clusters.get(("t", key))
        return False, None

    async def get_exchange(self, xid: str) -> dict[str, Any]:
        return dict(await self._cached(self._exchanges, ("x", xid), f"/messaging/exchanges/{xid}",
                                       "/messaging/exchanges/{id}"))

    async def get_exchange_brokers(self, xid: str) -> list[dict[str, Any]]:
        return list(await self._cached(self._exchanges, ("xb", xid), f"/messaging/exchanges/{xid}/brokers",
                                       "/messaging/exchanges/{id}/brokers", missing=[]))

    async def get_broker(self, bid: str) -> dict[str, Any]:
        return dict(await self._cached(self._exchanges, ("b", bid), f"/messaging/brokers/{bid}",
                                       "/messaging/brokers/{id}"))

    async def get_broker_connections(self, bid: str) -> list[dict[str, Any]]:
        return list(await self._cached(self._exchanges, ("bc", bid), f"/messaging/brokers/{bid}/connections",
                                       "/messaging/brokers/{id}/connections", missing=[]))

    async def get_exchange_build_clusters(self, xid: str) -> list[dict[str, Any]]:
        return list(await self._cached(self._clusters, ("xc", xid), f"/messaging/exchanges/{xid}/clusters",
                                       "/messaging/exchanges/{id}/clusters", {"allow_docker_builds": "true"},
                                       missing=[]))

    async def get_build_clusters(self) -> list[dict[str, Any]]:
        return list(await self._cached(self._clusters, ("c",), "/clusters", "/clusters",
                                       {"allow_docker_builds": "true"}))

    async def get_cluster(self, etcd_token: str) -> dict[str, Any] | None:
        value = await self._cached(self._clusters, ("t", etcd_token), f"/clusters/{quote(etcd_token, safe='')}",
                                   "/clusters/{etcd_token}", missing=None)
        return None if value is None else dict(value)

    async def get_modules(self, xid: str, *, fresh: bool = False) -> list[dict[str, Any]]:
        """Modules registered in an exchange (cached 30 s; `fresh` bypasses and refills the cache)."""
        if fresh:
            self._modules.data.pop(xid, None)
        return list(await self._cached(self._modules, xid, f"/messaging/exchanges/{xid}/modules",
                                       "/messaging/exchanges/{id}/modules", missing=[]))

    async def register_module(self, xid: str, hostname: str, type_: str, status: str, workload: Any) -> None:
        await self.request("POST", f"/messaging/exchanges/{xid}/modules", "/messaging/exchanges/{id}/modules",
                           json={"hostname": hostname, "type": type_, "status": status, "workload": workload})

    async def delete_module(self, xid: str, hostname: str) -> None:
        try:
            await self.request("DELETE", f"/messaging/exchanges/{xid}/modules/{quote(hostname, safe='')}",
                               "/messaging/exchanges/{id}/modules/{hostname}")
        except NotFound:
            pass
