"""Publishing to another exchange goes through that exchange's broker restriction (SPEC §4.2):
exchange 2 is reachable only through broker 2, a different RabbitMQ virtual host."""

from __future__ import annotations

import asyncio
import json
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import aio_pika

from tests.support.sandbox import random_seed, running_sandbox, write_seed
from tests.support.services import AMQP_URL, fresh_database, require
from workflow_orchestrator.app import Service
from workflow_orchestrator.manager.client import ManagerClient
from workflow_orchestrator.messaging.topology import queue_arguments
from workflow_orchestrator.sandbox.seed import connection_seed
from workflow_orchestrator.settings import load_settings


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=60)


def seed_file(seed: dict[str, object]) -> Path:
    return write_seed(Path(tempfile.mkdtemp(prefix="wo-seed-")) / "sandbox.toml", seed)


async def test_a_deploy_to_a_restricted_exchange_goes_through_its_own_broker() -> None:
    vhost = f"wo-test-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbitmqctl, "add_vhost", vhost)
    try:
        await asyncio.to_thread(rabbitmqctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
        west_url = require(AMQP_URL).rstrip("/") + "/" + vhost
        seed = random_seed()
        seed["brokers"] = [{"id": 1, "name": "east-broker"}, {"id": 2, "name": "west-broker"}]
        seed["connections"] = [connection_seed(AMQP_URL), connection_seed(west_url, id=2, broker_id=2)]
        seed["exchange_brokers"] = [{"id": 9001, "messaging_exchange_id": 2, "messaging_broker_id": 2}]
        east, west = seed["exchanges"]
        west_token = next(c["etcd_token"] for c in seed["clusters"] if c["messaging_exchange_id"] == 2)
        async with fresh_database("wo_ledger") as db, running_sandbox(amqp_url="", seed_file=seed_file(seed)) as sb:
            manager = ManagerClient(sb.url, sb.token_url, sb.client_id, sb.client_secret)
            await manager.register_module("2", "deployer-west", "deployer", "active", [])
            service = Service(load_settings(
                exchange_id="1", broker_id="1", manager_url=sb.url, oauth_login_url=sb.token_url,
                oauth_client_id=sb.client_id, oauth_client_secret=sb.client_secret, database_url=db,
                http_port=0, hostname=f"orch-{vhost}"))
            await service.start()
            west_conn = await aio_pika.connect(west_url)
            east_conn = await aio_pika.connect(AMQP_URL)
            try:
                wid = await manager.create_workflow({"deployment_repo": "acme/web", "milestones": ["build"]})
                await manager.put_workflow(wid, {"milestones": ["deploy"]})
                record = await manager.get_workflow(wid)
                wch = await west_conn.channel()
                name = f"{west['routing_key']}.deployer"  # as the west deployer declares it
                queue = await wch.declare_queue(name, durable=True, arguments=queue_arguments(name))
                ch = await east_conn.channel(publisher_confirms=True)  # a start, as the Manager sends it
                ex = await ch.get_exchange(east["root_exchange_name"])
                await ex.publish(aio_pika.Message(json.dumps({**record, "etcd_token": west_token}).encode(),
                                                  message_id=str(uuid.uuid4())),
                                 routing_key=f"{east['routing_key']}.workflow_orchestration")
                deadline = time.monotonic() + 20
                msg = None
                while msg is None and time.monotonic() < deadline:
                    msg = await queue.get(no_ack=True, fail=False)
                    if msg is None:
                        await asyncio.sleep(0.05)
                assert msg is not None, "the deploy request did not arrive in the west broker's vhost"
                req = json.loads(msg.body)
                assert req["id"] == wid and req["current_step"] == "deploy"
                assert str(req["workflow_orchestration_exchange_id"]) == "1", "callbacks come home to exchange 1"
                record = await manager.get_workflow(wid)
                assert any(f"Dispatching a deploy request to exchange 2, deployment cluster {west_token}..." in e
                           for e in record["event_log"])
            finally:
                await west_conn.close()
                await service.stop()
                await manager.close()
                ch = await east_conn.channel()
                for q in ("workflow_orchestration", "notifications_hipchat"):
                    for name in (f"{east['routing_key']}.{q}", f"{east['routing_key']}.{q}_error"):
                        await ch.queue_delete(name)
                await ch.exchange_delete(east["root_exchange_name"])
                await east_conn.close()
    finally:
        await asyncio.to_thread(rabbitmqctl, "delete_vhost", vhost)
