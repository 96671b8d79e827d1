"""Lifecycle of `workflow-orchestrator run`: build everything from Settings, run the consumer, the
timer loop, module registration and the health server; drain on SIGTERM; close in reverse."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import aio_pika
import structlog
from aiohttp import web

from workflow_orchestrator.engine import Engine
from workflow_orchestrator.ledger.store import Ledger
from workflow_orchestrator.logging import redact_text
from workflow_orchestrator.manager.client import ManagerClient, ManagerError, TransientManagerError
from workflow_orchestrator.messaging.broker import BrokerPool, Publisher
from workflow_orchestrator.messaging.consumer import Consumer, dead_letter
from workflow_orchestrator.messaging.directory import Resolver
from workflow_orchestrator.metrics import Metrics
from workflow_orchestrator.settings import Settings

log = structlog.get_logger("workflow_orchestrator.app")

MODULE_TYPE = "workflow_orchestrator"
REGISTER_EVERY = 30.0


class StartupError(Exception):
    """The service cannot start; the message says why (exit code 1)."""


def manager_client(settings: Settings, metrics: Metrics | None = None) -> ManagerClient:
    return ManagerClient(
        settings.manager_url, settings.oauth_login_url, settings.oauth_client_id,
        settings.oauth_client_secret.get_secret_value(), concurrency=settings.manager_concurrency,
        timeout=settings.manager_timeout.total_seconds(),
        observe=metrics.observe_manager if metrics else None,
    )


class Service:
    """The running orchestrator. `await run()` returns when stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.manager = manager_client(settings, self.metrics)
        self.ledger = Ledger(settings.database_url.get_secret_value(), max_size=settings.prefetch + 8,
                             replica=settings.hostname,
                             observe=self.metrics.observe_ledger_round_trip)
        amqp = settings.amqp_url.get_secret_value() if settings.amqp_url else None
        self.resolver = Resolver(self.manager, settings.exchange_id, settings.broker_id, amqp)
        self.pool = BrokerPool(app_id=f"workflow-orchestrator@{settings.hostname}")
        self.publisher = Publisher(self.resolver, self.pool, queue_type=settings.queue_type,
                                   delivery_limit=settings.delivery_limit,
                                   confirm_timeout=settings.publish_timeout.total_seconds(),
                                   observe=self.metrics.observe_confirm)
        self.engine = Engine(settings, self.manager, self.publisher, self.ledger, self.metrics)
        self.consumer: Consumer | None = None
        self.consumer_conn: aio_pika.abc.AbstractRobustConnection | None = None
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []
        self.timer_tasks: set[asyncio.Task[None]] = set()
        self.health: dict[str, str | None] = {"manager": "starting", "ledger": "starting", "consuming": "starting"}
        self.http: web.AppRunner | None = None
        self.disconnected_since: float | None = None

    # ---- start ---------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        await self.manager.start()
        await self._http_start()
        await self._until_ok("manager", self._check_manager)
        await self._until_ok("ledger", self._start_ledger)
        await self._until_ok("consuming", self._start_consumer)
        await self._register("active")
        self.tasks = [asyncio.create_task(c()) for c in (self._timer_loop, self._heartbeat_loop, self._health_loop)]
        queue = self.consumer.route.routing_key if self.consumer else None
        log.info("started", exchange_id=s.exchange_id, queue=queue, hostname=s.hostname)

    async def _start_consumer(self) -> None:
        s = self.settings
        route = await self.resolver.own_route(s.queue_name)
        try:
            self.consumer_conn = await aio_pika.connect_robust(
                route.url, client_properties={"connection_name": f"workflow-orchestrator@{s.hostname} consumer"})
        except (aio_pika.exceptions.ProbableAuthenticationError, aio_pika.exceptions.AuthenticationError) as exc:
            raise StartupError(f"the broker of exchange {s.exchange_id} refused the credentials: "
                               f"{redact_text(str(exc))}") from None
        except (aio_pika.exceptions.AMQPConnectionError, aio_pika.exceptions.ConnectionClosed) as exc:
            raise OSError(f"broker of exchange {s.exchange_id} unreachable: {redact_text(str(exc))}") from None
        self.consumer = Consumer(self.consumer_conn, route, self._on_message, prefetch=s.prefetch,
                                 queue_type=s.queue_type, delivery_limit=s.delivery_limit)
        self.engine.dead_letter = self._dead_letter
        await self.consumer.start()
        self.disconnected_since = None

    async def _watch_broker(self) -> None:
        """Belt and braces over aio-pika's robust reconnect: a consumer connection that stays down
        for 15 s (seen after full broker restarts) is replaced by a new one."""
        conn = self.consumer_conn
        if conn is None or conn.connected.is_set():
            self.disconnected_since = None
            return
        now = time.monotonic()
        if self.disconnected_since is None:
            self.disconnected_since = now
            return
        if now - self.disconnected_since < 15:
            return
        log.warning("broker connection still down; reconnecting from scratch")
        self.health["consuming"] = "reconnecting to the broker"
        old, old_consumer = conn, self.consumer
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.close(), 5)
        await self.pool.close()
        try:
            await self._start_consumer()
        except Exception as exc:
            log.warning("reconnect failed", error=redact_text(f"{type(exc).__name__}: {exc}"))
            self.consumer = old_consumer
            self.consumer_conn = old
            self.disconnected_since = now - 10
            return
        self.health["consuming"] = None

    async def _until_ok(self, part: str, check: Callable[[], Awaitable[None]]) -> None:
        """Retry a dependency that is down for a transient reason; fail at once on a permanent one."""
        delay = 0.5
        while True:
            try:
                await check()
                self.health[part] = None
                return
            except TransientManagerError as exc:
                self.health[part] = str(exc)
            except ManagerError as exc:
                raise StartupError(f"Manager: {exc}") from None
            except (TimeoutError, OSError) as exc:
                self.health[part] = f"{type(exc).__name__}: {exc}"
            except StartupError:
                raise
            except Exception as exc:
                raise StartupError(f"{part}: {type(exc).__name__}: {redact_text(str(exc))}") from None
            log.warning("waiting for dependency", part=part, error=self.health[part], retry_in=delay)
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
                raise StartupError(f"stopped while waiting for {part}")
            except TimeoutError:
                delay = min(delay * 2, 10.0)

    async def _check_manager(self) -> None:
        await self.manager.token(refresh=True)
        await self.manager.get_exchange(self.settings.exchange_id)

    async def _start_ledger(self) -> None:
        if self.ledger.pool is None:
            await self.ledger.start()
        else:
            await self.ledger.ping()

    async def _on_message(self, message: aio_pika.abc.AbstractIncomingMessage) -> Any:
        return await self.engine.on_delivery(message.body, message.message_id)

    async def _dead_letter(self, body: bytes, message_id: str | None, reason: str) -> None:
        assert self.consumer is not None and self.consumer.dl_channel is not None
        msg = aio_pika.Message(body, message_id=message_id, content_type="application/json")
        await dead_letter(self.consumer.dl_channel, self.consumer.route, msg, reason)  # type: ignore[arg-type]

    async def _register(self, status: str) -> None:
        try:
            await self.manager.register_module(self.settings.exchange_id, self.settings.hostname, MODULE_TYPE,
                                               status, self.engine.in_flight)
        except ManagerError as exc:
            log.warning("module registration failed", error=str(exc))

    # ---- loops ---------------------------------------------------------------------------
    async def _timer_loop(self) -> None:
        s = self.settings
        sem = asyncio.Semaphore(s.prefetch)
        last_purge = 0.0
        while not self.stopping.is_set():
            try:
                rows = await self.ledger.claim_due(s.prefetch, timedelta(seconds=120))
                if time.monotonic() - last_purge > 600:
                    last_purge = time.monotonic()
                    await self.ledger.purge(s.ledger_retention)
            except Exception as exc:
                log.warning("timer claim failed", error=f"{type(exc).__name__}: {exc}")
                rows = []
            for row in rows:
                await sem.acquire()
                task = asyncio.create_task(self.engine.on_timer(row))
                self.timer_tasks.add(task)
                task.add_done_callback(self._timer_done(sem))
            if len(rows) < s.prefetch:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.stopping.wait(), s.timer_poll_interval.total_seconds())

    def _timer_done(self, sem: asyncio.Semaphore) -> Callable[[asyncio.Task[None]], None]:
        def done(task: asyncio.Task[None]) -> None:
            self.timer_tasks.discard(task)
            sem.release()

        return done

    async def _heartbeat_loop(self) -> None:
        while not self.stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), REGISTER_EVERY)
            if self.stopping.is_set():
                return
            await self._register("active")

    async def _health_loop(self) -> None:
        """Stop consuming while the Manager or the ledger is unreachable; resume when back."""
        while not self.stopping.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), 2.0)
            if self.stopping.is_set():
                return
            try:
                await asyncio.wait_for(self.ledger.ping(), 5)
                self.health["ledger"] = None
            except Exception as exc:
                self.health["ledger"] = f"{type(exc).__name__}"
            else:
                with contextlib.suppress(Exception):  # wo_active_workflows follows the ledger within 2 s
                    self.metrics.active.set(await asyncio.wait_for(self.ledger.count_active(), 5))
            if time.monotonic() - self.manager.last_ok > 10 or self.manager.last_error:
                try:
                    await asyncio.wait_for(self.manager.request(
                        "GET", f"/messaging/exchanges/{self.settings.exchange_id}", "/messaging/exchanges/{id}"), 15)
                    self.health["manager"] = None
                except Exception as exc:
                    self.health["manager"] = str(exc) or type(exc).__name__
            await self._watch_broker()
            await self._apply_health()

    async def _apply_health(self) -> None:
        c = self.consumer
        if c is None:
            return
        down = self.health["manager"] or self.health["ledger"]
        if down and c.consuming:
            log.warning("dependency down; pausing consumption", manager=self.health["manager"],
                        ledger=self.health["ledger"])
            await c.pause()
            self.health["consuming"] = "paused: dependency down"
        elif not down and not c.consuming:
            await c.resume()
            self.health["consuming"] = None
        self.metrics.ready.set(0 if self.not_ready() else 1)

    def not_ready(self) -> dict[str, str]:
        return {k: v for k, v in self.health.items() if v}

    # ---- HTTP ----------------------------------------------------------------------------
    async def _http_start(self) -> None:
        if not self.settings.http_port:
            return
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        self.http = web.AppRunner(app, access_log=None)
        await self.http.setup()
        await web.TCPSite(self.http, "0.0.0.0", self.settings.http_port).start()

    async def _healthz(self, _: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, _: web.Request) -> web.Response:
        bad = self.not_ready()
        return web.json_response({"status": "not ready" if bad else "ready", "failing": bad},
                                 status=503 if bad else 200)

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    # ---- stop ----------------------------------------------------------------------------
    async def stop(self) -> None:
        """Stop consuming, let in-flight work finish within the grace period, close in reverse."""
        self.stopping.set()
        grace = self.settings.shutdown_grace.total_seconds()
        if self.consumer is not None:
            await self.consumer.drain(grace)
        for t in self.tasks:
            t.cancel()
        if self.timer_tasks:
            _, still = await asyncio.wait(set(self.timer_tasks), timeout=grace)
            for t in still:
                t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.consumer is not None:
            await self.consumer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.manager.delete_module(self.settings.exchange_id, self.settings.hostname), 5)
        if self.consumer_conn is not None:
            with contextlib.suppress(Exception):
                await self.consumer_conn.close()
        await self.pool.close()
        await self.ledger.close()
        await self.manager.close()
        if self.http is not None:
            await self.http.cleanup()
        log.info("stopped")


async def run_service(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; 0 on a clean stop."""
    service = Service(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, service.stopping.set)
    try:
        starting = asyncio.create_task(service.start())
        stop_wait = asyncio.create_task(service.stopping.wait())
        done, _ = await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if starting in done:
            starting.result()
            # Everything loaded at start-up (modules, pools, caches) is long-lived: keep it out of the
            # cyclic GC. Full collections over it took ~45 ms each, stalling every step in flight
            # (the callback→dispatch p99 of the benchmark); now they scan only what came later.
            gc.collect()
            gc.freeze()
            await stop_wait
        else:
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, StartupError):
                await starting
    finally:
        await service.stop()
    return 0
