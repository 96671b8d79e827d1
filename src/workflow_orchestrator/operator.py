"""Operator commands behind the CLI (SPEC §9): create, execute, status, cancel, dlq.

Each takes the service's Settings and returns plain data for the CLI to print. Every failure a
user can act on is raised as OperatorError with one readable line (secrets masked).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any

import aio_pika
import aiormq
import asyncpg
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from workflow_orchestrator.client.orchestration import OrchestrationClient
from workflow_orchestrator.domain.events import format_elapsed, iso, parse_time
from workflow_orchestrator.ledger.store import Ledger
from workflow_orchestrator.logging import redact_text
from workflow_orchestrator.manager.client import (
    Conflict,
    ManagerClient,
    ManagerError,
    NotFound,
    TransientManagerError,
)
from workflow_orchestrator.messaging.broker import BrokerPool, PublishFailed, declare_route
from workflow_orchestrator.messaging.directory import Resolver
from workflow_orchestrator.messaging.topology import Route, error_queue_name
from workflow_orchestrator.settings import Settings

# Record fields `status` shows (the event log is shown separately).
STATUS_FIELDS = ("id", "deployment_repo", "deployment_repo_git_ref", "source_repo", "source_repo_git_ref",
                 "source_commit_hash", "milestones", "current_step", "workflow_completed", "workflow_error",
                 "workflow_start_time", "step_time", "workflow_duration", "workflow_step_durations",
                 "scheduled_start_time", "execute_options")
# Headers of a dead-lettered message that replay removes: ours (x-error-*) and the broker's own
# dead-lettering history, which would otherwise keep growing with every round trip.
_ERROR_HEADERS = ("x-error-reason", "x-error-at", "x-death", "x-first-death-reason", "x-first-death-queue",
                  "x-first-death-exchange", "x-last-death-reason", "x-last-death-queue", "x-last-death-exchange")
PREVIEW_CHARS = 120


class OperatorError(Exception):
    """A failure the user can act on; str() is one line."""


def _line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return redact_text(" ".join(text.split()))


# ---- connections ---------------------------------------------------------------------------
def _manager(settings: Settings) -> ManagerClient:
    return ManagerClient(settings.manager_url, settings.oauth_login_url, settings.oauth_client_id,
                         settings.oauth_client_secret.get_secret_value(), attempts=2,
                         timeout=settings.manager_timeout.total_seconds())


def _amqp_url(settings: Settings) -> str | None:
    return settings.amqp_url.get_secret_value() if settings.amqp_url else None


@asynccontextmanager
async def _friendly() -> AsyncIterator[None]:
    """Translate infrastructure failures into one OperatorError line."""
    try:
        yield
    except OperatorError:
        raise
    except TransientManagerError as exc:
        raise OperatorError(f"the Manager is not reachable: {_line(exc)}") from None
    except ManagerError as exc:
        raise OperatorError(f"the Manager refused: {_line(exc)}") from None
    except PublishFailed as exc:
        raise OperatorError(f"the broker did not accept the message: {_line(exc)}") from None
    except (aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError) as exc:
        raise OperatorError(f"broker error: {type(exc).__name__}: {_line(exc)}") from None
    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise OperatorError(f"ledger database error: {type(exc).__name__}: {_line(exc)}") from None
    except (TimeoutError, OSError) as exc:
        raise OperatorError(f"a dependency is not reachable: {type(exc).__name__}: {_line(exc)}") from None
    except LookupError as exc:  # the Manager's records do not lead to a broker (no connection, no exchange)
        raise OperatorError(f"cannot find the broker: {_line(exc)}") from None


@asynccontextmanager
async def _session(settings: Settings) -> AsyncIterator[OrchestrationClient]:
    manager = _manager(settings)
    pool = BrokerPool(app_id=f"workflow-orchestrator-cli@{settings.hostname}")
    client = OrchestrationClient(manager, pool, broker_id=settings.broker_id, exchange_id=settings.exchange_id,
                                 queue_name=settings.queue_name, amqp_url=_amqp_url(settings),
                                 queue_type=settings.queue_type, delivery_limit=settings.delivery_limit,
                                 confirm_timeout=settings.publish_timeout.total_seconds())
    try:
        async with _friendly():
            await manager.start()
            yield client
    finally:
        await pool.close()
        await manager.close()


async def _workflow(manager: ManagerClient, wid: str) -> dict[str, Any]:
    try:
        return await manager.get_workflow(wid)
    except NotFound:
        raise OperatorError(f"workflow {wid} not found") from None


async def _check_exchange(manager: ManagerClient, xid: str | None, what: str) -> None:
    if xid is None:
        return
    try:
        await manager.get_exchange(xid)
    except NotFound:
        raise OperatorError(f"{what} messaging exchange {xid} not found") from None


def state_of(record: dict[str, Any]) -> str:
    """`completed`, `failed`, `running` or `not started`."""
    if record.get("workflow_completed"):
        return "failed" if record.get("workflow_error") else "completed"
    return "running" if record.get("current_step") else "not started"


# ---- workflows -----------------------------------------------------------------------------
async def create(settings: Settings, *, deployment_repo: str, deployment_ref: str | None = None,
                 source_repo: str | None = None, source_ref: str | None = None,
                 milestones: list[str] | None = None) -> dict[str, Any]:
    """Create a workflow in the Manager; returns {id, workflow: the stored record}."""
    fields: dict[str, Any] = {"deployment_repo": deployment_repo}
    for key, value in (("deployment_repo_git_ref", deployment_ref), ("source_repo", source_repo),
                       ("source_repo_git_ref", source_ref), ("milestones", milestones)):
        if value is not None:
            fields[key] = value
    async with _session(settings) as client:
        wid = await client.manager.create_workflow(fields)
        return {"id": wid, "workflow": await _workflow(client.manager, wid)}


async def execute(settings: Settings, wid: str, *, force_build: bool = False, build_exchange: str | None = None,
                  deploy_exchange: str | None = None, etcd_token: str | None = None,
                  via_queue: bool = False) -> dict[str, Any]:
    """Start a workflow through the Manager's execute, or (via_queue) by publishing the start
    message to this instance's orchestration queue."""
    extra: dict[str, Any] = {} if etcd_token is None else {"etcd_token": etcd_token}
    async with _session(settings) as client:
        record = await _workflow(client.manager, wid)
        if record.get("workflow_completed") or record.get("current_step"):
            raise OperatorError(f"workflow {wid} has already been started ({state_of(record)})")
        await _check_exchange(client.manager, build_exchange, "build")
        await _check_exchange(client.manager, deploy_exchange, "deploy")
        try:
            message_id = await client.start(wid, via="queue" if via_queue else "manager", force_build=force_build,
                                            build_exchange=build_exchange, deploy_exchange=deploy_exchange, **extra)
        except Conflict:
            raise OperatorError(f"workflow {wid} has already been executed (the Manager answered 409)") from None
        except NotFound:
            raise OperatorError(f"workflow {wid} not found") from None
    return {"id": wid, "executed": True, "via": "queue" if via_queue else "manager", "message_id": message_id}


async def status(settings: Settings, wid: str) -> dict[str, Any]:
    """The record's key fields, its state and event log, and the run in the ledger if in flight."""
    async with _session(settings) as client:
        record = await _workflow(client.manager, wid)
    out: dict[str, Any] = {k: record.get(k) for k in STATUS_FIELDS}
    out["state"] = state_of(record)
    out["event_log"] = list(record.get("event_log") or [])
    out["run"] = None
    if out["state"] in ("running", "not started"):
        # Best effort: the record alone answers the question; the ledger adds attempt and deadline.
        try:
            runs = await asyncio.wait_for(in_flight(settings), 10)
            out["run"] = next((r for r in runs if r["workflow_id"] == wid), None)
        except (OperatorError, TimeoutError):
            pass
    return out


async def in_flight(settings: Settings) -> list[dict[str, Any]]:
    """Runs in the ledger that have not finished: id, milestone, attempt, phase, age, deadline."""
    ledger = Ledger(settings.database_url.get_secret_value(), max_size=2)
    now = datetime.now(UTC)
    async with _friendly():
        try:
            await ledger.start(read_only=True)
            rows = await ledger.active_runs()
        finally:
            await ledger.close()
    out = []
    for r in rows:
        started = parse_time(r.get("workflow_start_time"))
        deadline = parse_time(r.get("next_timer"))
        out.append({
            "workflow_id": r["workflow_id"], "milestone": r.get("current_step"), "attempt": r.get("attempt"),
            "phase": r.get("phase"), "started": iso(started) if started else None,
            "age": format_elapsed((now - started).total_seconds() if started else None),
            "deadline": iso(deadline) if deadline else None,
        })
    return out


async def cancel(settings: Settings, wid: str, reason: str) -> dict[str, Any]:
    """Publish the cancel control message to this instance's orchestration queue."""
    async with _session(settings) as client:
        record = await _workflow(client.manager, wid)
        if record.get("workflow_completed"):
            raise OperatorError(f"workflow {wid} has already finished ({state_of(record)}); nothing to cancel")
        message_id = await client.cancel(wid, reason)
    return {"id": wid, "cancel_requested": True, "reason": reason, "message_id": message_id}


# ---- dead letters --------------------------------------------------------------------------
@asynccontextmanager
async def _error_queue(settings: Settings) -> AsyncIterator[tuple[Route, AbstractConnection]]:
    """The orchestration route of this instance and a connection to its broker."""
    manager = _manager(settings)
    try:
        async with _friendly():
            resolver = Resolver(manager, settings.exchange_id, settings.broker_id, _amqp_url(settings))
            route = await resolver.own_route(settings.queue_name)
            conn = await _connect(route)
            try:
                yield route, conn
            finally:
                await conn.close()
    finally:
        await manager.close()


async def _connect(route: Route) -> AbstractConnection:
    errors = []
    for url in (route.url, *route.failover_urls):
        try:
            return await aio_pika.connect(url, timeout=10)
        except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
            errors.append(type(exc).__name__)
    raise OperatorError(f"cannot connect to the broker for {route.routing_key} ({', '.join(errors)})")


def _header(headers: dict[str, Any], key: str) -> str | None:
    value = headers.get(key)
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return None if value is None else str(value)


def describe(message: AbstractIncomingMessage) -> dict[str, Any]:
    """message_id, workflow, reason, at, size and a body preview of a dead-lettered message."""
    headers = dict(message.headers or {})
    reason = _header(headers, "x-error-reason")
    if reason is None and (broker := _header(headers, "x-first-death-reason")):
        reason = f"dead-lettered by the broker: {broker}"
    at = _header(headers, "x-error-at") or (iso(message.timestamp) if message.timestamp else None)
    preview = " ".join(message.body[:PREVIEW_CHARS * 4].decode("utf-8", "replace").split())
    if len(preview) > PREVIEW_CHARS:
        preview = preview[:PREVIEW_CHARS - 1] + "…"
    return {"message_id": message.message_id, "workflow_id": message.correlation_id, "type": message.type,
            "reason": reason, "at": at, "size": len(message.body), "preview": preview}


async def _browse(conn: AbstractConnection, queue_name: str,
                  visit: Callable[[AbstractIncomingMessage], Awaitable[bool]]) -> None:
    """Get each message that is in the queue now once, without acking it; `visit` returns False
    to stop. Messages `visit` does not ack go back to the queue when the channel closes."""
    channel = await conn.channel()
    try:
        try:
            queue = await channel.declare_queue(queue_name, passive=True)
        except aiormq.exceptions.ChannelNotFoundEntity:
            return  # no error queue yet: nothing was ever dead-lettered
        # At most the messages present at the start: a replayed message that the orchestrator
        # dead-letters again while we browse must not be replayed in a loop.
        for _ in range(int(queue.declaration_result.message_count or 0)):
            message = await queue.get(no_ack=False, fail=False)
            if message is None or not await visit(message):
                break
    finally:
        if not channel.is_closed:
            await channel.close()


async def dlq_list(settings: Settings, limit: int = 100) -> dict[str, Any]:
    """Up to `limit` messages of the error queue (left in place) and the queue's name."""
    found: list[dict[str, Any]] = []
    async with _error_queue(settings) as (route, conn):
        name = error_queue_name(route.routing_key)

        async def visit(message: AbstractIncomingMessage) -> bool:
            found.append(describe(message))
            return len(found) < limit

        await _browse(conn, name, visit)
    return {"queue": name, "messages": found}


async def dlq_replay(settings: Settings, *, message_id: str | None = None, limit: int | None = None) -> dict[str, Any]:
    """Move messages (all, those with `message_id`, or the first `limit`) back to the
    orchestration queue through its topic exchange, without the error headers. Each is
    publisher-confirmed before its error-queue copy is acked."""
    replayed: list[dict[str, Any]] = []
    async with _error_queue(settings) as (route, conn):
        name = error_queue_name(route.routing_key)
        publish_channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
        exchange, _ = await declare_route(publish_channel, route, settings.queue_type, settings.delivery_limit)
        timeout = settings.publish_timeout.total_seconds()

        async def visit(message: AbstractIncomingMessage) -> bool:
            if limit is not None and len(replayed) >= limit:
                return False
            if message_id is not None and message.message_id != message_id:
                return True
            headers = {k: v for k, v in (message.headers or {}).items() if k not in _ERROR_HEADERS}
            copy = aio_pika.Message(
                message.body, headers=headers, content_type=message.content_type or "application/json",
                content_encoding=message.content_encoding, delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                message_id=message.message_id, correlation_id=message.correlation_id, type=message.type,
                app_id=message.app_id, timestamp=message.timestamp or datetime.now(UTC),
            )
            try:
                await exchange.publish(copy, route.routing_key, mandatory=True, timeout=timeout)
            except (TimeoutError, aio_pika.exceptions.AMQPError, aiormq.exceptions.AMQPError) as exc:
                raise OperatorError(f"replay stopped after {len(replayed)} message(s): {message.message_id} was "
                                    f"not confirmed ({type(exc).__name__}); it stays in {name}") from None
            await message.ack()
            replayed.append(describe(message))
            return True

        try:
            await _browse(conn, name, visit)
        finally:
            if not publish_channel.is_closed:
                await publish_channel.close()
    if message_id is not None and not replayed:
        raise OperatorError(f"no message with message_id {message_id} in {name}")
    return {"queue": name, "target": route.routing_key, "replayed": replayed}


async def dlq_count(settings: Settings) -> dict[str, Any]:
    """The error queue's name and its number of ready messages."""
    async with _error_queue(settings) as (route, conn):
        name = error_queue_name(route.routing_key)
        channel = await conn.channel()
        try:
            queue = await channel.declare_queue(name, passive=True)
            count = int(queue.declaration_result.message_count or 0)
        except aiormq.exceptions.ChannelNotFoundEntity:
            count = 0
        finally:
            if not channel.is_closed:
                await channel.close()
    return {"queue": name, "count": count}


async def dlq_purge(settings: Settings) -> dict[str, Any]:
    """Delete every message of the error queue; returns how many."""
    async with _error_queue(settings) as (route, conn):
        name = error_queue_name(route.routing_key)
        channel = await conn.channel()
        try:
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aiormq.exceptions.ChannelNotFoundEntity:
                return {"queue": name, "purged": 0}
            result = await queue.purge()
            purged = int(getattr(result, "message_count", 0) or 0)
        finally:
            if not channel.is_closed:
                await channel.close()
    return {"queue": name, "purged": purged}
