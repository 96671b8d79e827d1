"""Live dependency checks for `check-config`: Manager auth, AMQP, Postgres."""

from __future__ import annotations

import asyncio
from typing import Any

import aio_pika
import asyncpg

from workflow_orchestrator.logging import redact_text
from workflow_orchestrator.manager.client import ManagerClient
from workflow_orchestrator.messaging.directory import Resolver
from workflow_orchestrator.settings import Settings


async def live_checks(settings: Settings) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    manager = ManagerClient(settings.manager_url, settings.oauth_login_url, settings.oauth_client_id,
                            settings.oauth_client_secret.get_secret_value(), attempts=1, timeout=5)
    try:
        try:
            await manager.token(refresh=True)
            exchange = await manager.get_exchange(settings.exchange_id)
            out["manager"] = {"ok": True, "detail": f"authenticated; exchange {exchange.get('name')!r}"}
        except Exception as exc:
            out["manager"] = {"ok": False, "detail": redact_text(str(exc) or type(exc).__name__)}
        try:
            amqp = settings.amqp_url.get_secret_value() if settings.amqp_url else None
            route = await Resolver(manager, settings.exchange_id, settings.broker_id, amqp).own_route(
                settings.queue_name)
            conn = await asyncio.wait_for(aio_pika.connect(route.url, timeout=5), 10)
            await conn.close()
            out["amqp"] = {"ok": True, "detail": f"connected; orchestration queue {route.routing_key}"}
        except Exception as exc:
            out["amqp"] = {"ok": False, "detail": redact_text(f"{type(exc).__name__}: {exc}")}
    finally:
        await manager.close()
    try:
        pg = await asyncio.wait_for(asyncpg.connect(settings.database_url.get_secret_value()), 10)
        version = await pg.fetchval("SHOW server_version")
        await pg.close()
        out["ledger"] = {"ok": True, "detail": f"postgres {version}"}
    except Exception as exc:
        out["ledger"] = {"ok": False, "detail": redact_text(f"{type(exc).__name__}: {exc}")}
    return out
