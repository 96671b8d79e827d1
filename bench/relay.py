"""The bare relay: the least any orchestration step must do, as a baseline for the benchmark.

For each message of its queue: GET the workflow from the Manager, PUT it back with the next
milestone as `current_step`, publish one persistent message with a publisher confirm to the next
worker queue (or to the `done` queue after the last milestone), then ack. No ledger, no event log,
no notifications, no retries: a floor, not a product. Same libraries and settings as the service:
aio-pika with `prefetch`, httpx over the aiohttp transport, a bearer token from the OAuth endpoint,
orjson to encode, the start-up objects frozen out of the GC.

    RELAY_AMQP_URL RELAY_MANAGER_URL RELAY_TOKEN_URL RELAY_CLIENT_ID RELAY_CLIENT_SECRET
    RELAY_EXCHANGE (topic exchange) RELAY_ROUTING_KEY (queue prefix) [RELAY_QUEUE] [PREFETCH]
    python bench/relay.py
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import signal
import sys
import uuid
from datetime import UTC, datetime
from typing import Any, cast

import aio_pika
import aiormq
import httpx
from aio_pika.abc import AbstractChannel, AbstractIncomingMessage
from aiormq import spec
from httpx_aiohttp import AiohttpTransport

from workflow_orchestrator import jsonio
from workflow_orchestrator.domain.models import WORKFLOW_FIELDS
from workflow_orchestrator.messaging.topology import queue_arguments

# Next worker queue (logical) per milestone; after the last milestone: DONE.
NEXT_QUEUE = {"build": "relay_builder", "config": "relay_builder", "deploy": "relay_deployer"}
DONE = "relay_done"


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, default)
    if not value:
        sys.exit(f"error: {name} is required")
    return value


class Relay:
    def __init__(self) -> None:
        self.amqp_url = env("RELAY_AMQP_URL")
        self.manager_url = env("RELAY_MANAGER_URL")
        self.token_url = env("RELAY_TOKEN_URL")
        self.client_id = env("RELAY_CLIENT_ID")
        self.client_secret = env("RELAY_CLIENT_SECRET")
        self.exchange_name = env("RELAY_EXCHANGE")
        self.routing_key = env("RELAY_ROUTING_KEY")
        self.queue = f"{self.routing_key}.{env('RELAY_QUEUE', 'relay_orchestration')}"
        self.prefetch = int(env("PREFETCH", "32"))
        limits = httpx.Limits(max_connections=self.prefetch, max_keepalive_connections=self.prefetch)
        self.http = httpx.AsyncClient(base_url=self.manager_url, transport=AiohttpTransport(limits=limits),
                                      timeout=10.0, headers={"Accept": "application/json"})
        self.auth: dict[str, str] = {}
        self.put_headers: dict[str, str] = {}
        self.channel: AbstractChannel | None = None
        self.stopping = asyncio.Event()

    async def run(self) -> None:
        resp = await self.http.post(self.token_url, data={
            "grant_type": "client_credentials", "client_id": self.client_id, "client_secret": self.client_secret})
        resp.raise_for_status()
        self.auth = {"Authorization": f"Bearer {resp.json()['access_token']}"}
        self.put_headers = {**self.auth, "Content-Type": "application/json"}
        conn = await aio_pika.connect_robust(self.amqp_url, client_properties={"connection_name": "bench-relay"})
        try:
            consume = await conn.channel()
            await consume.set_qos(prefetch_count=self.prefetch)
            publish = await conn.channel(publisher_confirms=True, on_return_raises=True)
            self.channel = publish
            exchange = await publish.declare_exchange(self.exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
            queue = await consume.declare_queue(self.queue, durable=True, arguments=queue_arguments(self.queue))
            await queue.bind(exchange, self.queue)
            tag = await queue.consume(self.on_message)
            gc.collect()
            gc.freeze()  # as the service does after start-up
            await self.stopping.wait()
            await queue.cancel(tag)
        finally:
            await conn.close()
            await self.http.aclose()

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        try:
            await self.relay(message)
        except Exception as exc:  # a floor does not retry cleverly: back to the queue, say why
            print(f"relay: {type(exc).__name__}: {exc}; requeued", file=sys.stderr, flush=True)
            await message.nack(requeue=True)
            return
        await message.ack()

    async def relay(self, message: AbstractIncomingMessage) -> None:
        body: dict[str, Any] = json.loads(message.body)
        wid = str(body["id"])
        resp = await self.http.get(f"/workflows/{wid}", headers=self.auth)
        resp.raise_for_status()
        record: dict[str, Any] = resp.json()
        milestones = list(record.get("milestones") or [])
        current = body.get("current_step")
        index = milestones.index(current) + 1 if current in milestones else 0
        nxt = milestones[index] if index < len(milestones) else None
        fields = {k: record.get(k) for k in WORKFLOW_FIELDS if k != "id"}
        fields["current_step"] = nxt
        fields["workflow_completed"] = nxt is None
        resp = await self.http.put(f"/workflows/{wid}", content=jsonio.dumps(fields), headers=self.put_headers)
        resp.raise_for_status()
        body["current_step"] = nxt
        queue = NEXT_QUEUE[nxt] if nxt is not None else DONE
        # Published as the service publishes (aiormq's basic_publish, confirm awaited, drain not).
        properties = spec.Basic.Properties(
            content_type="application/json", delivery_mode=2, message_id=str(uuid.uuid4()), correlation_id=wid,
            message_type=f"{queue}.request", app_id="bench-relay", timestamp=datetime.now(UTC))
        assert self.channel is not None
        channel = cast(aiormq.Channel, await self.channel.get_underlay_channel())
        await channel.basic_publish(jsonio.dumps(body), exchange=self.exchange_name,
                                    routing_key=f"{self.routing_key}.{queue}", properties=properties,
                                    mandatory=True, timeout=10.0, wait=False)

async def main() -> None:
    relay = Relay()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, relay.stopping.set)
    await relay.run()


if __name__ == "__main__":
    asyncio.run(main())
