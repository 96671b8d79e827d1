"""Consuming one logical queue: QoS, explicit outcomes, dead-lettering with a reason, pause/resume.

It moves bytes: each delivery is handed to the function it was given, which returns an Outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

import aio_pika
import structlog
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage, AbstractQueue, AbstractRobustConnection

from workflow_orchestrator.messaging.broker import declare_route
from workflow_orchestrator.messaging.topology import QueueType, Route, error_queue_name

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Outcome:
    """ack: done; dead_letter: park in the error queue with `reason`; requeue: try again later."""

    kind: Literal["ack", "dead_letter", "requeue"]
    reason: str = ""


ACK = Outcome("ack")
Handler = Callable[[AbstractIncomingMessage], Awaitable[Outcome]]


async def dead_letter(channel: AbstractChannel, route: Route, message: AbstractIncomingMessage, reason: str,
                      timeout: float = 10.0) -> None:
    """Copy the message to the error queue with x-error-reason / x-error-at, confirmed."""
    headers = dict(message.headers or {})
    headers["x-error-reason"] = reason[:1000]
    headers["x-error-at"] = datetime.now(UTC).isoformat()
    copy = aio_pika.Message(
        message.body, headers=headers, content_type=message.content_type,
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=message.message_id,
        correlation_id=message.correlation_id, type=message.type, app_id=message.app_id,
        timestamp=message.timestamp,
    )
    await channel.default_exchange.publish(copy, error_queue_name(route.routing_key), mandatory=True,
                                           timeout=timeout)


class Consumer:
    """Consumes `route` with at most `prefetch` deliveries in flight, each as its own task."""

    def __init__(self, conn: AbstractRobustConnection, route: Route, handler: Handler, *, prefetch: int,
                 queue_type: QueueType = "classic", delivery_limit: int = 20) -> None:
        self.conn = conn
        self.route = route
        self.handler = handler
        self.prefetch = prefetch
        self.queue_type = queue_type
        self.delivery_limit = delivery_limit
        self.channel: AbstractChannel | None = None
        self.dl_channel: AbstractChannel | None = None
        self.queue: AbstractQueue | None = None
        self.tag: str | None = None
        self.in_flight: set[asyncio.Task[None]] = set()

    @property
    def consuming(self) -> bool:
        return self.tag is not None

    async def start(self) -> None:
        self.channel = await self.conn.channel()
        self.dl_channel = await self.conn.channel(publisher_confirms=True, on_return_raises=True)
        await self.channel.set_qos(prefetch_count=self.prefetch)
        # Consume on the declared queue object: the robust channel restores it and its consumer
        # after a reconnect (a queue fetched with get_queue(ensure=False) is not restored).
        _, self.queue = await declare_route(self.channel, self.route, self.queue_type, self.delivery_limit)
        await self.resume()

    async def resume(self) -> None:
        if self.tag is None and self.queue is not None:
            self.tag = await self.queue.consume(self._on_message)
            log.info("consuming", queue=self.route.routing_key, prefetch=self.prefetch)

    async def pause(self) -> None:
        """Stop taking new deliveries (in-flight ones finish)."""
        if self.tag is not None and self.queue is not None:
            tag, self.tag = self.tag, None
            try:
                await self.queue.cancel(tag)
            except Exception as exc:
                log.warning("cancel consumer failed", error=type(exc).__name__)
            log.info("paused consuming", queue=self.route.routing_key)

    async def _on_message(self, message: AbstractIncomingMessage) -> None:
        task = asyncio.current_task()
        if task is not None:
            self.in_flight.add(task)
        try:
            outcome = await self.handler(message)
            await self._settle(message, outcome)
        except asyncio.CancelledError:
            # Shutting down mid-message: leave it unacked; the broker redelivers it.
            raise
        except Exception:
            log.exception("delivery handler crashed; requeueing")
            await self._settle(message, Outcome("requeue"))
        finally:
            if task is not None:
                self.in_flight.discard(task)

    async def _settle(self, message: AbstractIncomingMessage, outcome: Outcome) -> None:
        if outcome.kind == "ack":
            await message.ack()
        elif outcome.kind == "dead_letter":
            assert self.dl_channel is not None
            await dead_letter(self.dl_channel, self.route, message, outcome.reason)
            await message.ack()
        else:
            await message.nack(requeue=True)

    async def drain(self, grace: float) -> None:
        """Pause, wait up to `grace` seconds for in-flight deliveries, then cancel the rest."""
        await self.pause()
        pending = set(self.in_flight)
        if pending:
            _, still = await asyncio.wait(pending, timeout=grace)
            for t in still:
                t.cancel()
            if still:
                await asyncio.wait(still, timeout=2)

    async def close(self) -> None:
        for ch in (self.channel, self.dl_channel):
            if ch is not None and not ch.is_closed:
                try:
                    await ch.close()
                except Exception:
                    pass
