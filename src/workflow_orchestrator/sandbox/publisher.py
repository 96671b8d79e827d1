"""Publishing the start message of `POST /workflows/{id}/execute` (SPEC §4.2).

One robust aio-pika connection and one confirming channel, opened on first use and reused; the
target exchange and queues are declared once per process before the first publish to them.
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime

import aio_pika
import aiormq
from aio_pika.abc import AbstractExchange, AbstractRobustChannel, AbstractRobustConnection

from workflow_orchestrator.messaging.topology import QueueType, error_queue_arguments, error_queue_name, queue_arguments
from workflow_orchestrator.settings import mask_url


class PublishError(Exception):
    """The start message could not be handed to the broker; the text holds no credentials."""


class StartPublisher:
    """Publishes persistent JSON messages with confirms and `mandatory`."""

    def __init__(self, url: str | None, *, timeout: float = 10.0,
                 queue_type: QueueType = "classic", delivery_limit: int = 20) -> None:
        self._url = url
        self._timeout = timeout
        self._queue_type: QueueType = queue_type
        self._delivery_limit = delivery_limit
        self._lock = asyncio.Lock()
        self._connection: AbstractRobustConnection | None = None
        self._channel: AbstractRobustChannel | None = None
        self._exchanges: dict[str, AbstractExchange] = {}
        self._declared: set[tuple[str, str]] = set()

    async def publish(self, exchange_name: str, routing_key: str, body: bytes, *, correlation_id: str,
                      type_: str) -> str:
        """Publish `body` to the queue `routing_key` behind topic exchange `exchange_name` and wait
        for the broker's confirm. Returns the message id; raises PublishError."""
        message = aio_pika.Message(
            body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            message_id=str(uuid.uuid4()), correlation_id=correlation_id, type=type_, app_id="sandbox-manager",
            timestamp=datetime.now(UTC),
        )
        for attempt in (1, 2):
            try:
                exchange = await self._prepare(exchange_name, routing_key)
                await exchange.publish(message, routing_key, mandatory=True, timeout=self._timeout)
                return str(message.message_id)
            except PublishError:
                raise
            except (aio_pika.exceptions.DeliveryError, aiormq.exceptions.ChannelClosed) as exc:
                # Returned or refused, so not delivered: the exchange, queue or binding was
                # deleted behind our back. Declare again and retry once.
                self._forget(exchange_name, routing_key)
                if attempt == 2:
                    raise PublishError(f"{type(exc).__name__}: {mask_url(str(exc))[:300]}") from None
            except (TimeoutError, aio_pika.exceptions.AMQPException, aiormq.exceptions.AMQPError,
                    OSError) as exc:
                self._forget(exchange_name, routing_key)
                raise PublishError(f"{type(exc).__name__}: {mask_url(str(exc))[:300]}") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def _forget(self, exchange_name: str, queue: str) -> None:
        self._declared.discard((exchange_name, queue))
        self._exchanges.pop(exchange_name, None)

    async def close(self) -> None:
        async with self._lock:
            if self._connection is not None:
                await self._connection.close()
            self._connection = self._channel = None
            self._exchanges.clear()
            self._declared.clear()

    async def _prepare(self, exchange_name: str, queue: str) -> AbstractExchange:
        async with self._lock:
            if self._connection is None:
                url = self._url
                if url is None:
                    raise PublishError("no broker connection: set SANDBOX_AMQP_URL or seed a connection "
                                       "for the orchestrator's broker")
                try:
                    connection = await asyncio.wait_for(
                        aio_pika.connect_robust(url, client_properties={"connection_name": "sandbox-manager"}),
                        self._timeout)
                except (TimeoutError, aio_pika.exceptions.AMQPException, aiormq.exceptions.AMQPError,
                        OSError) as exc:
                    raise PublishError(f"cannot connect to the broker at {mask_url(url)}: "
                                       f"{type(exc).__name__}") from None
                self._connection = connection
            if self._channel is None:
                self._channel = await self._connection.channel(publisher_confirms=True, on_return_raises=True)
            if (exchange_name, queue) not in self._declared:
                await self._declare(self._connection, exchange_name, queue)
                self._declared.add((exchange_name, queue))
            if exchange_name not in self._exchanges:
                self._exchanges[exchange_name] = await self._channel.declare_exchange(
                    exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
            return self._exchanges[exchange_name]

    async def _declare(self, connection: AbstractRobustConnection, exchange_name: str, queue: str) -> None:
        """Exchange, queue (bound with its own name) and error queue, as the consumer declares
        them, so the start message waits in the queue even before the orchestrator runs."""
        error_queue = error_queue_name(queue)
        error_args = error_queue_arguments(self._queue_type)
        # Each step on its own short-lived channel: a queue that already exists with other
        # arguments (declared by a differently configured consumer) makes the broker close the
        # channel with PRECONDITION_FAILED; that queue is then used as it is.
        for name, args in ((queue, queue_arguments(queue, self._queue_type, self._delivery_limit)),
                           (error_queue, error_args)):
            channel = await connection.channel(publisher_confirms=False)
            try:
                await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
                await channel.declare_queue(name, durable=True, arguments=args)
            except aiormq.exceptions.ChannelPreconditionFailed:
                pass
            finally:
                if not channel.is_closed:
                    await channel.close()
        channel = await connection.channel(publisher_confirms=False)
        try:
            bound = await channel.get_queue(queue, ensure=False)
            await bound.bind(exchange_name, routing_key=queue)
        finally:
            await channel.close()
