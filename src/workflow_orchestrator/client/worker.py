"""A worker module (builder, deployer, ...): consume a logical queue, run a handler per request,
call back to the orchestrator, acknowledge last (SPEC §6, §7).

The request is acknowledged only after its callback is confirmed by the broker, so a crash at any
point redelivers the request rather than losing it. A redelivered request that this process has
already handled (same message_id or dispatch_id) is acknowledged without running the handler again;
its callback is re-sent if it had not been confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import aio_pika
import structlog
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection
from pydantic import ValidationError

from workflow_orchestrator.client.orchestration import OrchestrationClient, Outbound
from workflow_orchestrator.client.request import OrchestrationRequest
from workflow_orchestrator.manager.client import ManagerClient, ManagerError, TransientManagerError
from workflow_orchestrator.messaging.broker import BrokerPool, PublishFailed
from workflow_orchestrator.messaging.consumer import ACK, Consumer, Outcome
from workflow_orchestrator.messaging.directory import Resolver
from workflow_orchestrator.messaging.topology import QueueType, Route

log = structlog.get_logger(__name__)

Handler = Callable[[OrchestrationRequest], Awaitable[OrchestrationRequest | None]]

# Fields of the incoming request a handler's returned request must keep, so the callback still
# reaches the orchestrator and is recognised as the answer to this dispatch.
_ECHOED = ("id", "workflow_id", "dispatch_id", "current_step", "workflow_orchestration_exchange_id",
           "workflow_orchestration_broker_id", "orchestration_queue_name", "notifications_exchange_id",
           "notifications_broker_id")


class StepFailed(Exception):
    """Raised by a handler: the milestone failed with `message` (and `reason`)."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message if reason is None else f"{message} ({reason})")
        self.message = message
        self.reason = reason


@dataclass
class _Entry:
    """What this process did with one request: callbacks still to confirm, or done."""

    callback: Outbound | None = None
    chat: Outbound | None = None
    done: bool = False


class _Memory:
    """A bounded LRU of handled requests, keyed by message_id and by dispatch_id."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._data: OrderedDict[str, _Entry] = OrderedDict()

    def get(self, keys: list[str]) -> _Entry | None:
        for k in keys:
            entry = self._data.get(k)
            if entry is not None:
                self._data.move_to_end(k)
                return entry
        return None

    def put(self, keys: list[str], entry: _Entry) -> None:
        for k in keys:
            self._data[k] = entry
            self._data.move_to_end(k)
        while len(self._data) > self.size:
            self._data.popitem(last=False)


# The module type a worker registers as, by the queue it consumes: the orchestrator dispatches to
# the deploy_oa queue only where a `deployer` module is registered (SPEC §5.3), as in the original,
# where the deployer serves that queue too. Other queues: the queue's name (builder, deployer).
MODULE_TYPE_OF_QUEUE = {"deploy_oa": "deployer"}


class Worker:
    """Consumes logical queue `queue` of messaging exchange `exchange_id` and hands each request
    to `handler`. Returning (a request or None) reports the milestone completed; raising
    StepFailed or any other exception reports it failed.

    Registers itself as a module `{hostname, type: module_type}` in the exchange while running.
    Use `async with worker:` or `await worker.start()` / `await worker.stop()`, or `await
    worker.run()` to run until SIGTERM/SIGINT and then drain.
    """

    def __init__(self, queue: str, exchange_id: str, handler: Handler, *, manager: ManagerClient,
                 broker_id: str, hostname: str, amqp_url: str | None = None, module_type: str | None = None,
                 prefetch: int = 8, queue_type: QueueType = "classic", delivery_limit: int = 20,
                 confirm_timeout: float = 10.0, register_every: float = 30.0, shutdown_grace: float = 30.0,
                 remember: int = 10_000, publish_attempts: int = 3) -> None:
        self.queue = queue
        self.exchange_id = exchange_id
        self.handler = handler
        self.manager = manager
        self.broker_id = broker_id
        self.hostname = hostname
        self.amqp_url = amqp_url
        self.module_type = module_type or MODULE_TYPE_OF_QUEUE.get(queue, queue)
        self.prefetch = prefetch
        self.queue_type: QueueType = queue_type
        self.delivery_limit = delivery_limit
        self.register_every = register_every
        self.shutdown_grace = shutdown_grace
        self.publish_attempts = publish_attempts
        self.pool = BrokerPool(app_id=f"{self.module_type}@{hostname}")
        self.client = OrchestrationClient(manager, self.pool, broker_id=broker_id, exchange_id=exchange_id,
                                          amqp_url=amqp_url, queue_type=queue_type, delivery_limit=delivery_limit,
                                          confirm_timeout=confirm_timeout)
        self.route: Route | None = None
        self.handled = 0  # requests handled (handler run and callback confirmed)
        self.duplicates = 0  # re-sent requests acknowledged without running the handler
        self.stopping = asyncio.Event()
        self._memory = _Memory(remember)
        self._running: dict[str, asyncio.Future[None]] = {}
        self._in_flight: dict[int, str] = {}  # delivery task id -> workflow id (the module's workload)
        self._conn: AbstractRobustConnection | None = None
        self._consumer: Consumer | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        self._registered = False

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        """Declare and consume the queue, then register the module."""
        try:
            resolver = Resolver(self.manager, self.exchange_id, self.broker_id, self.amqp_url)
            self.route = route = await resolver.own_route(self.queue)
            self._conn = await self._connect(route)
            self._consumer = Consumer(self._conn, route, self._on_message, prefetch=self.prefetch,
                                      queue_type=self.queue_type, delivery_limit=self.delivery_limit)
            await self._consumer.start()
        except BaseException:
            await self.stop(grace=0)  # `async with` does not call __aexit__ when start fails
            raise
        self._registered = True
        await self._register()
        self._heartbeat = asyncio.create_task(self._heartbeat_loop())
        log.info("worker started", queue=route.routing_key, module_type=self.module_type, hostname=self.hostname)

    async def _connect(self, route: Route) -> AbstractRobustConnection:
        errors: list[str] = []
        for url in (route.url, *route.failover_urls):
            try:
                return await aio_pika.connect_robust(
                    url, client_properties={"connection_name": f"{self.module_type}@{self.hostname}"})
            except (TimeoutError, OSError, aio_pika.exceptions.AMQPError) as exc:
                errors.append(type(exc).__name__)
        raise ConnectionError(f"cannot connect to the broker of exchange {self.exchange_id} ({', '.join(errors)})")

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let in-flight ones finish within `grace` seconds (the rest are
        redelivered), deregister, close."""
        self.stopping.set()
        if self._consumer is not None:
            await self._consumer.drain(self.shutdown_grace if grace is None else grace)
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeat
            self._heartbeat = None
        if self._consumer is not None:
            await self._consumer.close()
            self._consumer = None
        if self._registered:
            self._registered = False
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.manager.delete_module(self.exchange_id, self.hostname), 5)
        if self._conn is not None:
            with contextlib.suppress(Exception):
                await self._conn.close()
            self._conn = None
        await self.pool.close()
        log.info("worker stopped", handled=self.handled, duplicates=self.duplicates)

    async def run(self) -> None:
        """Run until SIGTERM or SIGINT, then drain and stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            await self.start()
            await self.stopping.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            await self.stop()

    async def __aenter__(self) -> Worker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def workload(self) -> list[str]:
        """Workflow ids in flight (reported as the module's workload)."""
        return sorted(set(self._in_flight.values()))

    async def _register(self) -> None:
        try:
            await self.manager.register_module(self.exchange_id, self.hostname, self.module_type, "active",
                                               self.workload)
        except ManagerError as exc:
            log.warning("module registration failed", error=str(exc))

    async def _heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), self.register_every)
            if not self.stopping.is_set():
                await self._register()

    # ---- one request ---------------------------------------------------------------------
    async def _on_message(self, message: AbstractIncomingMessage) -> Outcome:
        try:
            request = OrchestrationRequest.from_json(message.body)
            wid = request.workflow_ref
        except ValidationError as exc:
            fields = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
            return self._bad(message, f"invalid fields: {fields}")
        except ValueError as exc:  # not JSON / not an object / no workflow id
            return self._bad(message, f"not a request: {exc}")
        keys = [f"m:{message.message_id}"] if message.message_id else []
        if request.dispatch_id:
            keys.append(f"d:{request.dispatch_id}")
        bound = log.bind(workflow_id=wid, dispatch_id=request.dispatch_id, milestone=request.current_step,
                         message_id=message.message_id)
        # A copy of the same dispatch already in flight here: wait for it, then decide.
        while (running := next((self._running[k] for k in keys if k in self._running), None)) is not None:
            await asyncio.shield(running)
        entry = self._memory.get(keys)
        if entry is not None and entry.done:
            self.duplicates += 1
            bound.info("re-sent request acknowledged; already handled")
            return ACK
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for k in keys:
            self._running[k] = done
        task_id = id(asyncio.current_task())
        self._in_flight[task_id] = wid
        try:
            if entry is None:
                entry = await self._handle(request, bound)
                self._memory.put(keys, entry)
            else:
                self.duplicates += 1
                bound.info("re-sent request; re-sending its unconfirmed callback")
            return await self._deliver(entry, message, bound)
        finally:
            self._in_flight.pop(task_id, None)
            for k in keys:
                self._running.pop(k, None)
            done.set_result(None)

    def _bad(self, message: AbstractIncomingMessage, reason: str) -> Outcome:
        log.warning("bad request dead-lettered", reason=reason, size=len(message.body),
                    message_id=message.message_id)
        return Outcome("dead_letter", reason)

    async def _handle(self, request: OrchestrationRequest, bound: Any) -> _Entry:
        """Run the handler and prepare the callback (and, on failure, a chat notification)."""
        original = request.copy_request()
        try:
            result = await self.handler(request)
        except StepFailed as exc:
            bound.info("milestone failed", message=exc.message, reason=exc.reason)
            return self._failed(request, exc.message, exc.reason)
        except Exception as exc:
            bound.exception("handler crashed; reporting the milestone failed")
            step = request.current_step or "(unknown)"
            return self._failed(request, f"The {self.module_type} on {self.hostname} failed while processing "
                                         f"milestone {step}", f"{type(exc).__name__}: {exc}")
        outgoing = result if result is not None else request
        for key in _ECHOED:
            if key in original.model_fields_set and key not in outgoing.model_fields_set:
                setattr(outgoing, key, getattr(original, key))
        bound.info("milestone completed")
        return _Entry(callback=self.client.callback(outgoing))

    def _failed(self, request: OrchestrationRequest, message: str, reason: str | None) -> _Entry:
        text = self.client.mark_failed(request, message, reason)
        return _Entry(callback=self.client.callback(request), chat=self.client.chat(request, text, success=False))

    async def _deliver(self, entry: _Entry, message: AbstractIncomingMessage, bound: Any) -> Outcome:
        """Send the callback (retrying with backoff), then the chat (best effort); ack when confirmed."""
        assert entry.callback is not None
        delay = 0.5
        for attempt in range(1, self.publish_attempts + 1):
            try:
                await self.client.send(entry.callback)
                break
            except (PublishFailed, TransientManagerError) as exc:
                bound.warning("callback not confirmed", attempt=attempt, error=str(exc))
                if attempt == self.publish_attempts:
                    # Requeue: the redelivery finds the prepared callback here and re-sends it
                    # without running the handler again. The pause keeps a broker outage from
                    # turning into a hot redelivery loop.
                    await asyncio.sleep(delay)
                    return Outcome("requeue", str(exc))
                await asyncio.sleep(delay)
                delay *= 2
            except ManagerError as exc:
                # The callback's exchange cannot be resolved (unknown exchange or broker): retrying
                # cannot help; park the request for an operator.
                return self._bad(message, f"callback could not be routed: {exc}")
        if entry.chat is not None:
            await self.client.try_send(entry.chat)
        entry.done, entry.callback, entry.chat = True, None, None
        self.handled += 1
        return ACK
