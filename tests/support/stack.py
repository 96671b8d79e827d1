"""A whole site for integration tests: the sandbox Manager (over HTTP, on Postgres), the real
RabbitMQ, a ledger database, and orchestrator Services started in-process. Every name (routing
keys, exchanges, databases, cluster tokens) is random per stack, so tests can run in parallel."""

from __future__ import annotations

import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
from aio_pika.abc import AbstractIncomingMessage, AbstractRobustConnection

from tests.support.sandbox import running_sandbox
from tests.support.services import AMQP_URL, fresh_database, require
from workflow_orchestrator.app import Service
from workflow_orchestrator.manager.client import ManagerClient
from workflow_orchestrator.messaging.topology import (
    QueueType,
    error_queue_arguments,
    error_queue_name,
    queue_arguments,
)
from workflow_orchestrator.sandbox.seed import connection_seed, dump_seed
from workflow_orchestrator.settings import Settings, load_settings

WORKER_QUEUES = ("builder", "deployer", "deploy_oa", "notifications_hipchat", "notifications_email")


def seed_toml(r: str, root: str, rk: dict[str, str]) -> str:
    """Two exchanges on one broker; a build cluster, deploy clusters in both exchanges, and one
    cluster without an exchange."""
    return dump_seed({
        "orchestrator_exchange_id": 1, "orchestrator_broker_id": 1,
        "clients": [{"client_id": "test-client", "client_secret": f"test-secret-{r}"}],
        "exchanges": [{"id": 1, "name": "east", "routing_key": rk["1"], "root_exchange_name": root},
                      {"id": 2, "name": "west", "routing_key": rk["2"], "root_exchange_name": root}],
        "brokers": [{"id": 1, "name": "local"}],
        "connections": [connection_seed(AMQP_URL)],
        "clusters": [
            {"id": 1, "etcd_token": f"build-{r}", "messaging_exchange_id": 1, "allow_docker_builds": True},
            {"id": 2, "etcd_token": f"deploy-{r}", "messaging_exchange_id": 1},
            {"id": 3, "etcd_token": f"deploy-west-{r}", "messaging_exchange_id": 2},
            {"id": 4, "etcd_token": f"orphan-{r}"},
        ],
    })


class Stack:
    def __init__(self, r: str, sandbox: Any, db_url: str, amqp: AbstractRobustConnection) -> None:
        self.r = r
        self.sandbox = sandbox
        self.db_url = db_url
        self.amqp = amqp
        self.root = f"wo-test-{r}"
        self.rk = {"1": f"t{r}.east", "2": f"t{r}.west"}
        self.build_token = f"build-{r}"
        self.deploy_token = f"deploy-{r}"
        self.west_token = f"deploy-west-{r}"
        self.orphan_token = f"orphan-{r}"
        self.services: list[Service] = []
        self.processes: list[Any] = []  # subprocess replicas (tests.support.proc), killed at the end
        self.manager = ManagerClient(sandbox.url, f"{sandbox.url}/oauth/token", sandbox.client_id,
                                     sandbox.client_secret)

    # ---- orchestrator --------------------------------------------------------------------
    def settings(self, **over: Any) -> Settings:
        base: dict[str, Any] = dict(
            exchange_id="1", broker_id="1", manager_url=self.sandbox.url,
            oauth_login_url=f"{self.sandbox.url}/oauth/token", oauth_client_id=self.sandbox.client_id,
            oauth_client_secret=self.sandbox.client_secret, database_url=self.db_url, http_port=0,
            ui_url="https://ui.test", hostname=f"orch-{self.r}-{len(self.services)}", prefetch=16,
            timer_poll_interval="100ms", transient_backoff="300ms", shutdown_grace="5s",
        )
        base.update(over)
        return load_settings(**base)

    async def start_orchestrator(self, **over: Any) -> Service:
        service = Service(self.settings(**over))
        self.services.append(service)
        await service.start()
        return service

    async def stop_orchestrators(self) -> None:
        for s in self.services:
            await s.stop()
        self.services.clear()

    # ---- Manager -------------------------------------------------------------------------
    async def workflow(self, milestones: list[str], **fields: Any) -> str:
        body = {"deployment_repo": "acme/web-deploy", "deployment_repo_git_ref": "master",
                "source_repo": "acme/web", "source_repo_git_ref": "abc123", "milestones": milestones, **fields}
        wid = await self.manager.create_workflow(body)
        # The Manager prepends `config` to milestones without build/config; tests want theirs as given.
        if (await self.record(wid))["milestones"] != milestones:
            await self.manager.put_workflow(wid, {"milestones": milestones})
        return wid

    async def record(self, wid: str) -> dict[str, Any]:
        return await self.manager.get_workflow(wid)

    async def module(self, exchange_id: str, kind: str) -> None:
        await self.manager.register_module(exchange_id, f"{kind}-{exchange_id}-{self.r}", kind, "active", [])

    async def wait_record(self, wid: str, pred: Callable[[dict[str, Any]], bool], timeout: float = 30.0,
                          what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        rec: dict[str, Any] = {}
        while time.monotonic() < deadline:
            rec = await self.record(wid)
            if pred(rec):
                return rec
            await asyncio.sleep(0.05)
        raise AssertionError(f"workflow {wid}: {what} not reached in {timeout}s; record={json.dumps(rec)[:2000]}")

    async def wait_finished(self, wid: str, timeout: float = 30.0) -> dict[str, Any]:
        return await self.wait_record(wid, lambda r: r.get("workflow_completed") is True, timeout, "finished")

    # ---- AMQP ----------------------------------------------------------------------------
    def queue(self, x: str, q: str) -> str:
        return f"{self.rk[x]}.{q}"

    async def declare_worker_queues(self, queue_type: QueueType = "classic") -> None:
        """As the workers would: with the orchestrator's arguments (declarations must agree)."""
        ch = await self.amqp.channel()
        ex = await ch.declare_exchange(self.root, aio_pika.ExchangeType.TOPIC, durable=True)
        for x in ("1", "2"):
            for q in (*WORKER_QUEUES, "workflow_orchestration"):
                name = self.queue(x, q)
                queue = await ch.declare_queue(name, durable=True, arguments=queue_arguments(name, queue_type))
                await queue.bind(ex, name)
                await ch.declare_queue(error_queue_name(name), durable=True,
                                       arguments=error_queue_arguments(queue_type))
        await ch.close()

    async def publish(self, x: str, q: str, body: dict[str, Any] | bytes, message_id: str | None = None,
                      **props: Any) -> str:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        mid = message_id or str(uuid.uuid4())
        ch = await self.amqp.channel(publisher_confirms=True, on_return_raises=True)
        ex = await ch.get_exchange(self.root)
        await ex.publish(aio_pika.Message(raw, content_type="application/json", delivery_mode=2, message_id=mid,
                                          **props), routing_key=self.queue(x, q), mandatory=True)
        await ch.close()
        return mid

    async def start(self, wid: str, **request: Any) -> None:
        """A start message as the Manager's execute publishes it."""
        rec = await self.record(wid)
        await self.publish("1", "workflow_orchestration", {**rec, "workflow_id": wid, **request})

    async def take_message(self, x: str, q: str, wid: str | None = None,
                           timeout: float = 20.0) -> AbstractIncomingMessage:
        ch = await self.amqp.channel()
        queue = await ch.get_queue(self.queue(x, q), ensure=False)
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                try:
                    msg = await queue.get(no_ack=True, fail=False)
                except aiormq.exceptions.ChannelNotFoundEntity:  # not declared yet (by its publisher)
                    msg = None
                    ch = await self.amqp.channel()
                    queue = await ch.get_queue(self.queue(x, q), ensure=False)
                if msg is None:
                    await asyncio.sleep(0.05)
                    continue
                if wid is None or wid in msg.body.decode(errors="replace"):
                    return msg
            raise AssertionError(f"nothing on {self.queue(x, q)} for {wid} within {timeout}s")
        finally:
            await ch.close()

    async def take(self, x: str, q: str, wid: str | None = None, timeout: float = 20.0) -> dict[str, Any]:
        body: dict[str, Any] = json.loads((await self.take_message(x, q, wid, timeout)).body)
        return body

    async def wait_consuming(self, x: str = "1", timeout: float = 30.0) -> None:
        """Until some process consumes the orchestration queue of exchange x."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                ch = await self.amqp.channel()
                q = await ch.declare_queue(self.queue(x, "workflow_orchestration"), passive=True)
                consumers = q.declaration_result.consumer_count
                await ch.close()
                if consumers:
                    return
            except Exception:
                pass
            await asyncio.sleep(0.2)
        raise AssertionError(f"nobody consumes {self.queue(x, 'workflow_orchestration')} after {timeout}s")

    async def drain(self, x: str, q: str) -> list[dict[str, Any]]:
        ch = await self.amqp.channel()
        queue = await ch.get_queue(self.queue(x, q), ensure=False)
        out = []
        while (msg := await queue.get(no_ack=True, fail=False)) is not None:
            out.append(json.loads(msg.body))
        await ch.close()
        return out

    async def echo(self, request: dict[str, Any], **changes: Any) -> None:
        """Call back as a worker does: the request, changed, to the orchestration queue."""
        body = {**request, **changes}
        await self.publish(str(request["workflow_orchestration_exchange_id"]),
                           request.get("orchestration_queue_name") or "workflow_orchestration", body)


@asynccontextmanager
async def running_stack(*, start: bool = True, modules: bool = True, queues: bool = True,
                        **orchestrator: Any) -> AsyncIterator[Stack]:
    """Sandbox + queues (unless queues=False: then the orchestrator declares what it uses) + one
    orchestrator unless start=False; builder/deployer modules in both exchanges unless modules=False."""
    r = uuid.uuid4().hex[:8]
    stack_holder: list[Stack] = []
    root, rk = f"wo-test-{r}", {"1": f"t{r}.east", "2": f"t{r}.west"}
    with_tmp = _write(f"wo-seed-{r}.toml", seed_toml(r, root, rk))
    amqp = await aio_pika.connect_robust(require(AMQP_URL))
    try:
        async with fresh_database("wo_ledger") as db_url, running_sandbox(seed_file=with_tmp) as sandbox:
            stack = Stack(r, sandbox, db_url, amqp)
            stack_holder.append(stack)
            await stack.manager.start()
            if queues:
                await stack.declare_worker_queues(orchestrator.get("queue_type", "classic"))
            if modules:
                for x in ("1", "2"):
                    await stack.module(x, "builder")
                    await stack.module(x, "deployer")
            try:
                if start:
                    await stack.start_orchestrator(**orchestrator)
                yield stack
            finally:
                for proc in stack.processes:
                    proc.kill()
                await stack.stop_orchestrators()
                await stack.manager.close()
                await _delete_queues(stack)
    finally:
        await amqp.close()
        _remove(with_tmp)


def _write(name: str, text: str) -> Path:
    path = Path(tempfile.gettempdir()) / name
    path.write_text(text)
    return path


def _remove(path: Path) -> None:
    path.unlink(missing_ok=True)


async def _delete_queues(stack: Stack) -> None:
    ch = await stack.amqp.channel()
    try:
        for x in ("1", "2"):
            for q in (*WORKER_QUEUES, "workflow_orchestration"):
                for name in (stack.queue(x, q), f"{stack.queue(x, q)}_error"):
                    await ch.queue_delete(name)
        await ch.exchange_delete(stack.root)
    finally:
        await ch.close()
