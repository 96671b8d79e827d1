"""What the client library puts on the wire, and the Worker's delivery rules, against the real
RabbitMQ and the sandbox Manager. Callbacks are routed to exchange 2's orchestration queue, which
no orchestrator consumes here, so each test can read exactly what was sent."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aio_pika
import pytest

from tests.support.services import AMQP_URL
from tests.support.stack import Stack, running_stack
from workflow_orchestrator.client import OrchestrationClient, OrchestrationRequest, Worker
from workflow_orchestrator.manager.client import NotFound

Handler = Callable[[OrchestrationRequest], Awaitable[OrchestrationRequest | None]]


async def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


def make_worker(s: Stack, handler: Handler, queue: str = "builder", **kw: Any) -> Worker:
    return Worker(queue, "2", handler, manager=s.manager, broker_id="1", amqp_url=AMQP_URL,
                  hostname=f"{queue}-{s.r}-{uuid.uuid4().hex[:6]}", shutdown_grace=5, **kw)


def request_for(wid: str, **extra: Any) -> dict[str, Any]:
    """A dispatched request whose callbacks go to exchange 2 (unconsumed here)."""
    return {
        "id": wid, "workflow_id": wid, "deployment_repo": "acme/web-deploy", "milestones": ["build"],
        "current_step": "build", "workflow_completed": False, "workflow_error": False,
        "event_log": [f"[OA][{wid}][acme/web-deploy] Starting workflow..."],
        "workflow_orchestration_exchange_id": 2, "workflow_orchestration_broker_id": 1,
        "orchestration_queue_name": "workflow_orchestration", "notifications_exchange_id": 2,
        "notifications_broker_id": 1, "dispatch_id": str(uuid.uuid4()), **extra,
    }


async def count(s: Stack, x: str, q: str) -> int:
    ch = await s.amqp.channel()
    try:
        queue = await ch.declare_queue(s.queue(x, q), passive=True)
        return int(queue.declaration_result.message_count or 0)
    finally:
        await ch.close()


async def test_a_request_with_unknown_fields_comes_back_intact() -> None:
    async def echo(request: OrchestrationRequest) -> None:
        return None

    async with running_stack(start=False, modules=False) as s:
        wid = str(uuid.uuid4())
        sent = request_for(wid, source_commit_hash=None, deploy_extra={"nested": [1, 2.5, None, True, "é"]},
                           x_trace_id="t-123", deployable_units=[{"name": "web", "count": 3}])
        async with make_worker(s, echo) as worker:
            await s.publish("2", "builder", sent)
            msg = await s.take_message("2", "workflow_orchestration", wid)
            await eventually(lambda: worker.handled == 1, "request acknowledged")
        assert json.loads(msg.body) == sent, "the callback is the request, unchanged in meaning"
        assert msg.type == "workflow.continue"
        assert msg.correlation_id == wid
        assert msg.content_type == "application/json"
        assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
        assert msg.app_id == f"builder@{worker.hostname}"
        assert msg.timestamp is not None and msg.message_id


async def test_a_resent_request_is_acked_without_running_the_handler_again() -> None:
    calls: list[str] = []

    async def build(request: OrchestrationRequest) -> None:
        calls.append(str(request.dispatch_id))

    async with running_stack(start=False, modules=False) as s:
        wid = str(uuid.uuid4())
        body = request_for(wid)
        async with make_worker(s, build) as worker:
            first = await s.publish("2", "builder", body)
            await s.publish("2", "builder", body, message_id=first)  # the same message re-sent
            await s.publish("2", "builder", body)  # the same dispatch under another message id
            await eventually(lambda: worker.handled + worker.duplicates == 3, "three deliveries settled")
            assert calls == [body["dispatch_id"]]
            assert (worker.handled, worker.duplicates) == (1, 2)
            assert await count(s, "2", "workflow_orchestration") == 1, "one callback only"
            assert await count(s, "2", "builder") == 0, "every copy acknowledged"


async def test_bad_bodies_are_dead_lettered_and_the_worker_carries_on() -> None:
    async def build(request: OrchestrationRequest) -> None:
        return None

    async with running_stack(start=False, modules=False) as s:
        wid = str(uuid.uuid4())
        async with make_worker(s, build) as worker:
            bad = await s.publish("2", "builder", b"{not json")
            wrong = await s.publish("2", "builder", {"id": wid, "current_step": 7})
            await s.publish("2", "builder", request_for(wid))
            await s.take_message("2", "workflow_orchestration", wid)
            await eventually(lambda: worker.handled == 1, "the good request acknowledged")
            parked = {m.message_id: m for m in [await s.take_message("2", "builder_error") for _ in range(2)]}
        assert worker.handled == 1
        assert parked[bad].body == b"{not json"
        assert str(parked[bad].headers["x-error-reason"]).startswith("not a request: ")
        assert "current_step" in str(parked[wrong].headers["x-error-reason"])
        assert parked[wrong].headers["x-error-at"]


async def test_a_callback_to_an_unknown_exchange_is_parked() -> None:
    calls: list[str] = []

    async def build(request: OrchestrationRequest) -> None:
        calls.append("build")

    async with running_stack(start=False, modules=False) as s:
        wid = str(uuid.uuid4())
        async with make_worker(s, build):
            await s.publish("2", "builder", request_for(wid, workflow_orchestration_exchange_id=999))
            parked = await s.take_message("2", "builder_error", wid)
        assert calls == ["build"]
        assert "callback could not be routed" in str(parked.headers["x-error-reason"])


async def test_a_request_unfinished_at_shutdown_is_redelivered() -> None:
    started = asyncio.Event()
    handled_by: list[str] = []

    async def stuck(request: OrchestrationRequest) -> None:
        started.set()
        await asyncio.Event().wait()  # never finishes; the drain cancels it

    async def quick(request: OrchestrationRequest) -> None:
        handled_by.append("second")

    async with running_stack(start=False, modules=False) as s:
        wid = str(uuid.uuid4())
        first = make_worker(s, stuck)
        await first.start()
        await s.publish("2", "builder", request_for(wid))
        await asyncio.wait_for(started.wait(), 20)
        await first.stop(grace=0.2)
        assert first.handled == 0
        async with make_worker(s, quick) as second:
            await s.take_message("2", "workflow_orchestration", wid)
            await eventually(lambda: second.handled == 1, "redelivered request handled")
            assert handled_by == ["second"]


async def test_start_cancel_and_notify_messages() -> None:
    async with running_stack(start=False, modules=False) as s, OrchestrationClient.connect(
            manager_url=s.sandbox.url, token_url=f"{s.sandbox.url}/oauth/token", client_id=s.sandbox.client_id,
            client_secret=s.sandbox.client_secret, broker_id="1", exchange_id="2", amqp_url=AMQP_URL) as client:
        wid = await s.workflow(["build"])
        start_id = await client.start(wid, via="queue", force_build=True, build_exchange=1, custom={"k": "v"})
        start = await s.take_message("2", "workflow_orchestration", wid)
        body = json.loads(start.body)
        record = await s.record(wid)
        assert start.message_id == start_id and start.type == "workflow.start" and start.correlation_id == wid
        assert {k: body[k] for k in record} == record, "the start message carries the record"
        assert body["workflow_id"] == wid and body["force_build"] is True
        assert body["build_messaging_exchange_id"] == 1 and body["custom"] == {"k": "v"}
        assert (body["workflow_orchestration_exchange_id"], body["workflow_orchestration_broker_id"],
                body["notifications_exchange_id"], body["orchestration_queue_name"]) == (
                    "2", "1", "2", "workflow_orchestration")

        await client.cancel(wid, "not needed")
        cancel = await s.take_message("2", "workflow_orchestration", wid)
        assert json.loads(cancel.body) == {"id": wid, "action": "cancel", "reason": "not needed"}
        assert cancel.type == "workflow.cancel"

        request = OrchestrationRequest.from_payload(
            request_for(wid, notifications_config={"hipchat": {"room_names": ["ops"]}}))
        await client.notify(request, "Tests passed", success=True)
        chat = await s.take_message("2", "notifications_hipchat", wid)
        assert json.loads(chat.body) == {"is_success": True, "prefix": f"[OA][{wid}][acme/web-deploy]",
                                         "message": "Tests passed", "room_names": ["ops"]}
        assert chat.type == "notification.chat"
        assert request.event_log is not None
        assert request.event_log[-1] == f"[OA][{wid}][acme/web-deploy] Tests passed"

        request.source_commit_hash = "c0ffee"
        await client.save(request)
        saved = await s.record(wid)
        assert saved["source_commit_hash"] == "c0ffee"
        assert saved["event_log"] == request.event_log


async def test_a_worker_for_an_unknown_exchange_fails_to_start_and_leaves_nothing_open() -> None:
    async def build(request: OrchestrationRequest) -> None:
        return None

    async with running_stack(start=False, modules=False) as s:
        worker = Worker("builder", "999", build, manager=s.manager, broker_id="1", amqp_url=AMQP_URL,
                        hostname=f"builder-{s.r}")
        with pytest.raises(NotFound):
            await worker.start()
        assert worker.route is None
