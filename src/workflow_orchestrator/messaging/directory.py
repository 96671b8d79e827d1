"""Resolving a messaging exchange to a broker connection, the way OpenAperture does (SPEC §4.2)."""

from __future__ import annotations

import random
from typing import Any, Protocol
from urllib.parse import quote

import structlog

from workflow_orchestrator.messaging.topology import Route, queue_name

log = structlog.get_logger(__name__)


class Directory(Protocol):
    """The Manager lookups messaging needs (the Manager client implements it)."""

    async def get_exchange(self, xid: str) -> dict[str, Any]: ...
    async def get_exchange_brokers(self, xid: str) -> list[dict[str, Any]]: ...
    async def get_broker(self, bid: str) -> dict[str, Any]: ...
    async def get_broker_connections(self, bid: str) -> list[dict[str, Any]]: ...


def connection_url(conn: dict[str, Any]) -> str:
    """AMQP URL of a broker connection record {username, password, host, port, virtual_host}."""
    port = int(conn.get("port") or 5672)
    scheme = "amqps" if port == 5671 else "amqp"
    user = quote(str(conn.get("username") or "guest"), safe="")
    password = quote(str(conn.get("password") or ""), safe="")
    vhost = quote(str(conn.get("virtual_host") or "/"), safe="")
    return f"{scheme}://{user}:{password}@{conn.get('host') or 'localhost'}:{port}/{vhost}"


class Resolver:
    """exchange id + logical queue -> Route. `amqp_url`, when set, is used for everything."""

    def __init__(self, directory: Directory, own_exchange_id: str, own_broker_id: str,
                 amqp_url: str | None = None) -> None:
        self.directory = directory
        self.own_exchange_id = own_exchange_id
        self.own_broker_id = own_broker_id
        self.amqp_url = amqp_url

    async def route(self, exchange_id: str, queue: str) -> Route:
        """Where to publish to `queue` of an exchange: its broker chosen as OpenAperture does."""
        return await self._route(exchange_id, queue, None)

    async def own_route(self, queue: str) -> Route:
        """`queue` of this instance's exchange on this instance's broker (BROKER_ID): where it consumes."""
        return await self._route(self.own_exchange_id, queue, self.own_broker_id)

    async def _route(self, exchange_id: str, queue: str, broker_id: str | None) -> Route:
        exchange = await self.directory.get_exchange(exchange_id)
        name = queue_name(exchange.get("routing_key"), queue)
        root = str(exchange.get("root_exchange_name") or "")
        if self.amqp_url:
            return Route(root, name, self.amqp_url)
        primary, failover = await self._urls(broker_id or await self._broker_for(exchange_id))
        return Route(root, name, primary, failover)

    async def _broker_for(self, exchange_id: str) -> str:
        rows = await self.directory.get_exchange_brokers(exchange_id)
        if rows:
            return str(random.choice(rows)["messaging_broker_id"])
        if exchange_id != self.own_exchange_id:
            own = await self.directory.get_exchange_brokers(self.own_exchange_id)
            if own:
                log.warning("exchange has no broker restrictions; using this exchange's", exchange_id=exchange_id)
                return str(random.choice(own)["messaging_broker_id"])
        return self.own_broker_id

    async def _urls(self, broker_id: str) -> tuple[str, tuple[str, ...]]:
        conns = await self.directory.get_broker_connections(broker_id)
        if not conns:
            raise LookupError(f"broker {broker_id} has no connections in the Manager")
        primary = connection_url(random.choice(conns))
        failover: list[str] = []
        broker = await self.directory.get_broker(broker_id)
        fid = broker.get("failover_broker_id")
        if fid is not None:
            failover = [connection_url(c) for c in await self.directory.get_broker_connections(str(fid))]
        return primary, tuple(failover)
