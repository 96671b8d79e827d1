"""HTTP routes of the sandbox Manager (SPEC §3) and their middlewares: request counting, JSON
errors, bearer-token authentication."""

from __future__ import annotations

import json
import re
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote

import asyncpg
import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from workflow_orchestrator.sandbox.auth import OAuthError, Tokens, basic_credentials, bearer_token
from workflow_orchestrator.sandbox.openapi import OPENAPI
from workflow_orchestrator.sandbox.publisher import PublishError, StartPublisher
from workflow_orchestrator.sandbox.seed import Seed
from workflow_orchestrator.sandbox.store import Store
from workflow_orchestrator.sandbox.validation import (
    BadRequest,
    ExecuteOptions,
    ModuleIn,
    SystemEventIn,
    WorkflowCreate,
    WorkflowPatch,
    parse_json,
    require_object,
    storable_text,
    trim_repo,
    validate,
)

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PUBLIC_PATHS = frozenset({"/oauth/token", "/openapi.json", "/healthz"})
_INT64 = (-(2**63), 2**63 - 1)
_MAX_LOOKBACK_HOURS = 24 * 365 * 1000  # beyond this, "all" is what anyone means
_DEFAULT_LOOKBACK_HOURS = 24  # as the Manager: the last day unless asked otherwise
_INTEGER = re.compile(r"^[+-]?[0-9]{1,1000}$")
_PATH_INT = re.compile(r"^-?[0-9]{1,19}$")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def json_text(text: str, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(text=text, status=status, content_type="application/json", headers=headers)


def json_error(status: int, error: str, fields: dict[str, str] | None = None,
               headers: dict[str, str] | None = None) -> web.Response:
    body: dict[str, Any] = {"error": error}
    if fields:
        body["fields"] = fields
    return web.json_response(body, status=status, headers=headers)


def _not_found(what: str) -> web.Response:
    return json_error(404, f"{what} not found")


# ---- parameters -------------------------------------------------------------------------
def _uuid_param(request: web.Request) -> uuid.UUID | None:
    try:
        return uuid.UUID(request.match_info["id"])
    except ValueError:
        return None


def _int_param(request: web.Request) -> int | None:
    raw = request.match_info["id"]
    if not _PATH_INT.match(raw):
        return None
    value = int(raw)
    return value if _INT64[0] <= value <= _INT64[1] else None


def _text_param(request: web.Request, name: str) -> str | None:
    value = request.match_info[name]
    return value if value and storable_text(value) else None


def _query_text(request: web.Request, name: str) -> str | None:
    value = request.query.get(name)
    if value is not None and not storable_text(value):
        raise BadRequest("invalid query parameter", {name: "contains a NUL character or invalid text"})
    return value


def _query_bool(request: web.Request, name: str) -> bool | None:
    value = _query_text(request, name)
    if value is None:
        return None
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise BadRequest("invalid query parameter", {name: "must be true or false"})


def _query_since(request: web.Request) -> datetime | None:
    raw = _query_text(request, "lookback")
    hours = _DEFAULT_LOOKBACK_HOURS
    if raw is not None:
        if not _INTEGER.match(raw.strip()):
            raise BadRequest("invalid query parameter", {"lookback": "must be a whole number of hours"})
        hours = int(raw.strip())
    if hours <= 0 or hours > _MAX_LOOKBACK_HOURS:
        return None
    return datetime.now(UTC) - timedelta(hours=hours)


async def _body(request: web.Request, *, optional: bool = False) -> dict[str, Any]:
    value = parse_json(await request.read(), empty={} if optional else ...)
    return require_object(value)


# ---- middlewares ------------------------------------------------------------------------
class RequestStats:
    """Requests per `METHOD /route/{template}` since start or the last reset."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.since = datetime.now(UTC)

    def reset(self) -> None:
        self.counts.clear()
        self.since = datetime.now(UTC)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        if resource is not None:
            self.counts[f"{request.method} {resource.canonical}"] += 1
        return await handler(request)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error is JSON; bad input is a 400, never a 500."""
    try:
        return await handler(request)
    except BadRequest as exc:
        return json_error(400, exc.error, exc.fields)
    except OAuthError as exc:
        headers = {"WWW-Authenticate": 'Basic realm="sandbox"'} if exc.status == 401 else {}
        return web.json_response({"error": exc.error, "error_description": exc.description},
                                 status=exc.status, headers={**headers, "Cache-Control": "no-store"})
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items() if k.lower() in ("allow", "www-authenticate")}
        return json_error(exc.status, exc.reason.lower(), headers=headers)
    except asyncpg.DataError as exc:
        # Input Postgres refused that validation let through; still the client's input.
        return json_error(400, f"invalid input: {type(exc).__name__}")
    except (OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError,
            asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
        log.warning("sandbox.database_unavailable", error=type(exc).__name__)
        return json_error(503, "the database is unavailable", headers={"Retry-After": "1"})
    except Exception:
        log.exception("sandbox.unhandled_error", method=request.method, path=request.path)
        return json_error(500, "internal error")


def auth_middleware(tokens: Tokens) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in PUBLIC_PATHS:
            return await handler(request)
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return json_error(401, "unauthorized: a bearer token is required",
                              headers={"WWW-Authenticate": 'Bearer realm="sandbox"'})
        if not await tokens.valid(token):
            return json_error(401, "unauthorized: the token is unknown or expired",
                              headers={"WWW-Authenticate": 'Bearer realm="sandbox", error="invalid_token"'})
        return await handler(request)

    return middleware


# ---- routes -----------------------------------------------------------------------------
class Api:
    """The route handlers; each does at most one query on its success path."""

    def __init__(self, store: Store, tokens: Tokens, publisher: StartPublisher, seed: Seed,
                 stats: RequestStats) -> None:
        self.store = store
        self.tokens = tokens
        self.publisher = publisher
        self.seed = seed
        self.stats = stats

    def install(self, app: web.Application) -> None:
        r = app.router
        r.add_post("/oauth/token", self.token)
        r.add_get("/openapi.json", self.openapi, allow_head=False)
        r.add_get("/healthz", self.healthz, allow_head=False)
        r.add_get("/workflows", self.list_workflows, allow_head=False)
        r.add_post("/workflows", self.create_workflow)
        r.add_get("/workflows/{id}", self.show_workflow, allow_head=False)
        r.add_put("/workflows/{id}", self.update_workflow)
        r.add_delete("/workflows/{id}", self.delete_workflow)
        r.add_post("/workflows/{id}/execute", self.execute_workflow)
        r.add_get("/messaging/exchanges/{id}", self.show_exchange, allow_head=False)
        r.add_get("/messaging/exchanges/{id}/brokers", self.exchange_brokers, allow_head=False)
        r.add_get("/messaging/exchanges/{id}/clusters", self.exchange_clusters, allow_head=False)
        r.add_get("/messaging/exchanges/{id}/modules", self.list_modules, allow_head=False)
        r.add_post("/messaging/exchanges/{id}/modules", self.register_module)
        r.add_get("/messaging/exchanges/{id}/modules/{hostname}", self.show_module, allow_head=False)
        r.add_delete("/messaging/exchanges/{id}/modules/{hostname}", self.delete_module)
        r.add_get("/messaging/brokers/{id}", self.show_broker, allow_head=False)
        r.add_get("/messaging/brokers/{id}/connections", self.broker_connections, allow_head=False)
        r.add_get("/clusters", self.list_clusters, allow_head=False)
        r.add_get("/clusters/{etcd_token}", self.show_cluster, allow_head=False)
        r.add_get("/system_events", self.list_system_events, allow_head=False)
        r.add_post("/system_events", self.create_system_event)
        r.add_get("/sandbox/stats", self.show_stats, allow_head=False)
        r.add_post("/sandbox/stats/reset", self.reset_stats)

    # ---- public ----------------------------------------------------------------------------
    async def token(self, request: web.Request) -> web.Response:
        raw = await request.read()
        params: dict[str, Any]
        if request.content_type == "application/json":
            try:
                params = require_object(parse_json(raw, empty={}))
            except BadRequest as exc:
                raise OAuthError("invalid_request", exc.error) from None
        else:
            try:
                params = dict(parse_qsl(raw.decode("utf-8"), keep_blank_values=True))
            except (UnicodeDecodeError, ValueError):
                raise OAuthError("invalid_request", "the body is not form-encoded UTF-8") from None
        grant_type = params.get("grant_type")
        if not isinstance(grant_type, str) or not grant_type:
            raise OAuthError("invalid_request", "grant_type is required")
        if grant_type != "client_credentials":
            raise OAuthError("unsupported_grant_type", "only client_credentials is supported")
        basic = basic_credentials(request.headers.get("Authorization", ""))
        client_id, secret = basic if basic is not None else (params.get("client_id"), params.get("client_secret"))
        if not isinstance(client_id, str) or not isinstance(secret, str) or not client_id \
                or not storable_text(client_id):
            raise OAuthError("invalid_client", "client authentication is required", 401)
        issued = await self.tokens.issue(client_id, secret)
        return web.json_response(
            {"access_token": issued.access_token, "token_type": "Bearer", "expires_in": issued.expires_in},
            headers={"Cache-Control": "no-store", "Pragma": "no-cache"})

    async def openapi(self, request: web.Request) -> web.Response:
        return web.json_response(OPENAPI)

    async def healthz(self, request: web.Request) -> web.Response:
        try:
            await self.store.ping()
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
            return web.json_response({"status": "unavailable", "database": "down"}, status=503)
        return web.json_response({"status": "ok"})

    # ---- workflows -------------------------------------------------------------------------
    async def list_workflows(self, request: web.Request) -> web.Response:
        since = _query_since(request)
        deployment_repo = _query_text(request, "deployment_repo")
        source_repo = _query_text(request, "source_repo")
        return json_text(await self.store.workflows_json(
            since,
            None if deployment_repo is None else trim_repo(deployment_repo),
            None if source_repo is None else trim_repo(source_repo)))

    async def create_workflow(self, request: web.Request) -> web.Response:
        record = validate(WorkflowCreate, await _body(request), "workflow").record()
        created = await self.store.create_workflow(record)
        if created is None:
            return json_error(409, f"workflow {record['id']} already exists")
        return json_text(created, 201, headers={"Location": f"/workflows/{record['id']}"})

    async def show_workflow(self, request: web.Request) -> web.Response:
        wid = _uuid_param(request)
        text = None if wid is None else await self.store.workflow_json(wid)
        return _not_found("workflow") if text is None else json_text(text)

    async def update_workflow(self, request: web.Request) -> web.Response:
        wid = _uuid_param(request)
        if wid is None:
            return _not_found("workflow")
        changes = validate(WorkflowPatch, await _body(request), "workflow").changes()
        if not await self.store.update_workflow(wid, changes):
            return _not_found("workflow")
        return web.Response(status=204)

    async def delete_workflow(self, request: web.Request) -> web.Response:
        wid = _uuid_param(request)
        if wid is None or not await self.store.delete_workflow(wid):
            return _not_found("workflow")
        return web.Response(status=204)

    async def execute_workflow(self, request: web.Request) -> web.Response:
        wid = _uuid_param(request)
        if wid is None:
            return _not_found("workflow")
        options = validate(ExecuteOptions, await _body(request, optional=True), "execute options").options()
        sent: list[str] = []

        async def publish(record: dict[str, Any]) -> None:
            sent.append(await self._publish_start(record, options))

        try:
            refusal = await self.store.execute_workflow(wid, options, publish)
        except PublishError as exc:
            log.warning("sandbox.start_not_published", workflow_id=str(wid), error=str(exc))
            return json_error(503, f"the start message could not be published: {exc}",
                              headers={"Retry-After": "5"})
        if refusal == "not_found":
            return _not_found("workflow")
        if refusal is not None:
            return json_error(409, f"workflow {wid} has already been {refusal}")
        return web.json_response({"id": str(wid), "message_id": sent[0]}, status=202,
                                 headers={"Location": f"/workflows/{wid}"})

    async def _publish_start(self, record: dict[str, Any], options: dict[str, Any]) -> str:
        """The start message as the Manager sends it: the record, the execute options, and the
        routing fields that tell the orchestrator where it is and where notifications go."""
        seed = self.seed
        # From the seed, not a query: this runs inside the execute transaction, and a second pool
        # connection per request could exhaust the pool under concurrent executes.
        exchange = seed.exchange(seed.orchestrator_exchange_id)
        message = {
            **record, **options,
            "id": record["id"], "workflow_id": record["id"],
            "workflow_orchestration_exchange_id": seed.orchestrator_exchange_id,
            "workflow_orchestration_broker_id": seed.orchestrator_broker_id,
            "orchestration_queue_name": seed.orchestration_queue_name,
            "notifications_exchange_id": seed.orchestrator_exchange_id,
            "notifications_broker_id": seed.orchestrator_broker_id,
        }
        key = seed.orchestration_queue_name
        if exchange.routing_key:
            key = f"{exchange.routing_key}.{key}"
        return await self.publisher.publish(
            exchange.root_exchange_name, key, json.dumps(message).encode(),
            correlation_id=record["id"], type_="workflow.start")

    # ---- exchanges -------------------------------------------------------------------------
    async def show_exchange(self, request: web.Request) -> web.Response:
        xid = _int_param(request)
        text = None if xid is None else await self.store.exchange_json(xid)
        return _not_found("exchange") if text is None else json_text(text)

    async def exchange_brokers(self, request: web.Request) -> web.Response:
        xid = _int_param(request)
        text = None if xid is None else await self.store.exchange_brokers_json(xid)
        return _not_found("exchange") if text is None else json_text(text)

    async def exchange_clusters(self, request: web.Request) -> web.Response:
        allow = _query_bool(request, "allow_docker_builds")
        xid = _int_param(request)
        text = None if xid is None else await self.store.exchange_clusters_json(xid, allow)
        return _not_found("exchange") if text is None else json_text(text)

    async def list_modules(self, request: web.Request) -> web.Response:
        xid = _int_param(request)
        text = None if xid is None else await self.store.modules_json(xid)
        return _not_found("exchange") if text is None else json_text(text)

    async def register_module(self, request: web.Request) -> web.Response:
        xid = _int_param(request)
        if xid is None:
            return _not_found("exchange")
        module = validate(ModuleIn, await _body(request), "module")
        text = await self.store.upsert_module(xid, module.hostname, module.type, module.status, module.workload)
        if text is None:
            return _not_found("exchange")
        location = f"/messaging/exchanges/{xid}/modules/{quote(module.hostname, safe='')}"
        return json_text(text, 201, headers={"Location": location})

    async def show_module(self, request: web.Request) -> web.Response:
        xid, hostname = _int_param(request), _text_param(request, "hostname")
        text = None if xid is None or hostname is None else await self.store.module_json(xid, hostname)
        return _not_found("module") if text is None else json_text(text)

    async def delete_module(self, request: web.Request) -> web.Response:
        xid, hostname = _int_param(request), _text_param(request, "hostname")
        if xid is None or hostname is None or not await self.store.delete_module(xid, hostname):
            return _not_found("module")
        return web.Response(status=204)

    # ---- brokers, clusters -----------------------------------------------------------------
    async def show_broker(self, request: web.Request) -> web.Response:
        bid = _int_param(request)
        text = None if bid is None else await self.store.broker_json(bid)
        return _not_found("broker") if text is None else json_text(text)

    async def broker_connections(self, request: web.Request) -> web.Response:
        bid = _int_param(request)
        text = None if bid is None else await self.store.broker_connections_json(bid)
        return _not_found("broker") if text is None else json_text(text)

    async def list_clusters(self, request: web.Request) -> web.Response:
        return json_text(await self.store.clusters_json(_query_bool(request, "allow_docker_builds")))

    async def show_cluster(self, request: web.Request) -> web.Response:
        token = _text_param(request, "etcd_token")
        text = None if token is None else await self.store.cluster_json(token)
        return _not_found("cluster") if text is None else json_text(text)

    # ---- system events ---------------------------------------------------------------------
    async def create_system_event(self, request: web.Request) -> web.Response:
        event = validate(SystemEventIn, await _body(request), "system event")
        text, created = await self.store.create_system_event(
            event.type, event.severity, event.message, event.data, event.unique)
        return json_text(text, 201 if created else 200)

    async def list_system_events(self, request: web.Request) -> web.Response:
        return json_text(await self.store.system_events_json(_query_since(request)))

    # ---- sandbox ---------------------------------------------------------------------------
    async def show_stats(self, request: web.Request) -> web.Response:
        return web.json_response({
            "requests": dict(sorted(self.stats.counts.items())),
            "since": self.stats.since.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
        })

    async def reset_stats(self, request: web.Request) -> web.Response:
        self.stats.reset()
        return web.Response(status=204)
