"""Pooled robust AMQP connections and a confirming publisher (SPEC §4.2, §6)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import aiormq
import structlog
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractQueue, AbstractRobustConnection
from aiormq import spec

from workflow_orchestrator import jsonio
from workflow_orchestrator.messaging.directory import Resolver
from workflow_orchestrator.messaging.topology import (
    QueueType,
    Route,
    error_queue_arguments,
    error_queue_name,
    queue_arguments,
)

log = structlog.get_logger(__name__)


class PublishFailed(Exception):
    """The broker did not confirm a message (unreachable, timeout, nack or unroutable)."""


@dataclass(frozen=True)
class OutMessage:
    exchange_id: str
    queue: str
    body: dict[str, Any]
    type: str
    message_id: str
    correlation_id: str


class _Link:
    """One robust connection with one confirming channel, shared by all publishers to it."""

    def __init__(self, conn: AbstractRobustConnection, channel: AbstractChannel) -> None:
        self.conn = conn
        self.channel = channel
        self.declared: set[tuple[str, str]] = set()
        self.lock = asyncio.Lock()


class BrokerPool:
    """Connections pooled per broker URL; failover URLs are tried when the primary is down."""

    def __init__(self, app_id: str, connect_timeout: float = 10.0) -> None:
        self.app_id = app_id
        self.connect_timeout = connect_timeout
        self._links: dict[str, _Link] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def connection(self, url: str) -> AbstractRobustConnection:
        return (await self._link(url)).conn

    async def _link(self, url: str) -> _Link:
        link = self._links.get(url)
        if link is not None and not link.conn.is_closed:
            return link
        async with self._locks.setdefault(url, asyncio.Lock()):
            if url in self._links and not self._links[url].conn.is_closed:
                return self._links[url]
            conn = await aio_pika.connect_robust(url, timeout=self.connect_timeout,
                                                 client_properties={"connection_name": self.app_id})
            channel = await conn.channel(publisher_confirms=True, on_return_raises=True)
            link = self._links[url] = _Link(conn, channel)
            return link

    async def link_for(self, route: Route) -> _Link:
        errors = []
        for url in (route.url, *route.failover_urls):
            try:
                return await self._link(url)
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                errors.append(type(exc).__name__)
        raise PublishFailed(f"no broker connection for {route.routing_key} could be opened ({', '.join(errors)})")

    async def close(self) -> None:
        links, self._links = list(self._links.values()), {}
        for link in links:
            try:
                await link.conn.close()
            except Exception:
                pass


async def declare_route(channel: AbstractChannel, route: Route, queue_type: QueueType,
                        delivery_limit: int) -> tuple[AbstractExchange, AbstractQueue]:
    """The topic exchange, the queue bound with its routing key, and its error queue."""
    if route.exchange_name:
        exchange = await channel.declare_exchange(route.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
    else:
        exchange = channel.default_exchange
    queue = await channel.declare_queue(route.routing_key, durable=True,
                                        arguments=queue_arguments(route.routing_key, queue_type, delivery_limit))
    if route.exchange_name:
        await queue.bind(exchange, route.routing_key)
    await channel.declare_queue(error_queue_name(route.routing_key), durable=True,
                                arguments=error_queue_arguments(queue_type))
    return exchange, queue


class Publisher:
    """Publishes JSON messages to logical queues of messaging exchanges and waits for confirms."""

    def __init__(self, resolver: Resolver, pool: BrokerPool, *, queue_type: QueueType = "classic",
                 delivery_limit: int = 20, confirm_timeout: float = 10.0,
                 observe: Callable[[float], None] | None = None) -> None:
        self.resolver = resolver
        self.pool = pool
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.confirm_timeout = confirm_timeout
        self.observe = observe

    async def publish(self, msg: OutMessage) -> None:
        route, link = await self._target(msg)
        await self._send(msg, route, link)

    async def publish_all(self, messages: list[OutMessage], attempts: int = 1) -> None:
        """Publish and wait for every confirm. The messages reach the broker in list order (a
        workflow's chat notifications arrive in the order of its events); their confirms are awaited
        together. Broker hiccups are retried briefly, re-sending only the unconfirmed messages;
        raises PublishFailed if some stay unconfirmed."""
        remaining = messages
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(0.2 * 2 ** attempt, 2.0))
            # Where each message goes is settled first, one after the other (lookups, declarations:
            # these may wait); then the sends start in order, and each writes its frames before its
            # first wait, so no message can overtake an earlier one.
            sends: list[Awaitable[None]] = []
            for m in remaining:
                try:
                    route, link = await self._target(m)
                except PublishFailed as exc:
                    sends.append(_raise(exc))
                else:
                    sends.append(self._send(m, route, link))
            results = await asyncio.gather(*sends, return_exceptions=True)
            failed = [(m, r) for m, r in zip(remaining, results, strict=True) if isinstance(r, BaseException)]
            for _, r in failed:
                if not isinstance(r, PublishFailed):
                    raise r
            if not failed:
                return
            remaining = [m for m, _ in failed]
        raise failed[0][1]

    async def _target(self, msg: OutMessage) -> tuple[Route, _Link]:
        """The route of a message and the link to its broker, its queues declared."""
        try:
            route = await self.resolver.route(msg.exchange_id, msg.queue)
        except LookupError as exc:
            raise PublishFailed(str(exc)) from None
        link = await self.pool.link_for(route)
        key = (route.exchange_name, route.routing_key)
        if key not in link.declared:
            async with link.lock:
                if key not in link.declared:
                    await declare_route(link.channel, route, self.queue_type, self.delivery_limit)
                    link.declared.add(key)
        return route, link

    async def _send(self, msg: OutMessage, route: Route, link: _Link) -> None:
        # aiormq directly, with wait=False: the confirm is still awaited, but not the socket drain, so
        # concurrent publishes on the shared channel do not queue behind each other's drain (each
        # held the channel's lock for two turns of the event loop), and no aio_pika.Message is built.
        properties = spec.Basic.Properties(
            content_type="application/json",
            delivery_mode=2,  # persistent
            message_id=msg.message_id,
            correlation_id=msg.correlation_id,
            message_type=msg.type,
            app_id=self.pool.app_id,
            timestamp=datetime.now(UTC),
        )
        started = time.perf_counter()
        try:
            channel = cast(aiormq.Channel, await link.channel.get_underlay_channel())
            await channel.basic_publish(jsonio.dumps(msg.body), exchange=route.exchange_name,
                                        routing_key=route.routing_key, properties=properties, mandatory=True,
                                        timeout=self.confirm_timeout, wait=False)
        except (TimeoutError, aio_pika.exceptions.AMQPError, OSError, RuntimeError) as exc:
            raise PublishFailed(f"{msg.type} to {route.routing_key} not confirmed: {type(exc).__name__}") from None
        if self.observe is not None:
            self.observe(time.perf_counter() - started)


async def _raise(exc: BaseException) -> None:
    raise exc
