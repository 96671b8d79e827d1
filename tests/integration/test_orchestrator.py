"""The orchestrator core against the real RabbitMQ, the sandbox Manager over HTTP and Postgres:
per milestone type, what arrives on the worker queue, what is saved, what is notified."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

import aio_pika
import aiormq
import pytest

from tests.support.services import AMQP_URL
from tests.support.stack import Stack, running_stack
from workflow_orchestrator.messaging.broker import BrokerPool, OutMessage, Publisher
from workflow_orchestrator.messaging.directory import Resolver
from workflow_orchestrator.messaging.topology import error_queue_arguments, error_queue_name, queue_arguments

ROUTING = {
    "notifications_exchange_id": "1", "notifications_broker_id": "1",
    "workflow_orchestration_exchange_id": "1", "workflow_orchestration_broker_id": "1",
    "orchestration_queue_name": "workflow_orchestration",
}


def events(rec: dict[str, Any]) -> list[str]:
    """The orchestrator's events (prefix checked and stripped); workers' own entries left out."""
    prefix = f"[OA][{rec['id']}][{rec.get('deployment_repo') or 'Unknown'}] "
    return [e[len(prefix):] for e in rec.get("event_log") or [] if e.startswith(prefix)]


def assert_routing(req: dict[str, Any]) -> None:
    for k, v in ROUTING.items():
        assert str(req[k]) == v, (k, req[k])
    assert req["dispatch_id"]


async def chats(stack: Stack, wid: str) -> list[dict[str, Any]]:
    return [c for c in await stack.drain("1", "notifications_hipchat") if wid in c["prefix"]]


async def test_three_milestones_run_to_completion_with_echo_workers() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["build", "deploy", "deploy_oa"])
        await s.start(wid, etcd_token=s.deploy_token, extra_key={"kept": [1, 2]})
        build = await s.take("1", "builder", wid)
        assert build["current_step"] == "build"
        assert build["docker_build_etcd_token"] == s.build_token
        assert build["extra_key"] == {"kept": [1, 2]}, "unknown keys pass through"
        assert_routing(build)
        await s.echo(build, source_commit_hash="deadbeef", event_log=[*build["event_log"], "builder: image pushed"])
        deploy = await s.take("1", "deployer", wid)
        assert deploy["current_step"] == "deploy" and deploy["dispatch_id"] != build["dispatch_id"]
        assert deploy["source_commit_hash"] == "deadbeef", "fields set by the worker are kept"
        assert "builder: image pushed" in deploy["event_log"]
        await s.echo(deploy)
        oa = await s.take("1", "deploy_oa", wid)
        assert oa["current_step"] == "deploy_oa"
        assert_routing(oa)
        await s.echo(oa)
        rec = await s.wait_finished(wid)
        assert rec["workflow_error"] is False
        ev = events(rec)
        assert ev[0] == "Starting workflow..."
        assert "Starting Workflow Milestone: build" in ev
        assert f"Dispatching a build request to exchange 1, docker build cluster {s.build_token}..." in ev
        assert f"Dispatching a deploy request to exchange 1, deployment cluster {s.deploy_token}..." in ev
        assert "builder: image pushed" in rec["event_log"]
        assert ev[-1].startswith("Workflow completed in ")
        assert set(rec["workflow_step_durations"]) == {"build", "deploy", "deploy_oa"}
        assert rec["workflow_duration"].endswith("(s)")
        notes = await chats(s, wid)
        assert [n["message"] for n in notes] == ev, "every event is a chat notification, in order"
        assert all(n["is_success"] for n in notes)


async def test_completion_email_expands_groups() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["deploy"])
        cfg = {"email": {"events": {"on_workflow_completed": ["ops", "dev@x.io"]},
                         "groups": {"ops": ["a@x.io", "b@x.io"]}},
               "hipchat": {"room_names": ["room1"]}}
        await s.start(wid, etcd_token=s.deploy_token, notifications_config=cfg)
        await s.echo(await s.take("1", "deployer", wid))
        rec = await s.wait_finished(wid)
        assert ("Sending on_workflow_completed email notification to the following recipient(s): "
                "a@x.io, b@x.io, dev@x.io") in events(rec)
        mail = await s.take("1", "notifications_email", wid)
        assert mail["prefix"] == f"SUCCEEDED [OA][{wid}][acme/web-deploy]"
        assert mail["notifications"] == {"email_addresses": ["a@x.io", "b@x.io", "dev@x.io"]}
        assert mail["message"] == (f"Source Commit:\nacme/web/commit/abc123\n\nFor more information, please see:\n"
                                   f"https://ui.test/index.html#/oa/workflows/workflows/{wid}")
        assert all(n["room_names"] == ["room1"] for n in await chats(s, wid))


async def test_worker_failure_from_the_message_fails_the_workflow() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["build", "deploy"])
        await s.start(wid, etcd_token=s.deploy_token)
        build = await s.take("1", "builder", wid)
        await s.echo(build, workflow_completed=True, workflow_error=True,
                     event_log=[*build["event_log"], "[builder] docker build exited 1"])
        rec = await s.wait_finished(wid)
        assert rec["workflow_error"] is True
        ev = events(rec)
        assert "[builder] docker build exited 1" in rec["event_log"]
        text = "\n".join(ev)
        assert "Workflow Milestone Failed: build. Reason: Milestone worker has reported a failure" in text
        assert "Workflow has failed in " in text
        assert await s.drain("1", "deployer") == []
        failures = [n for n in await chats(s, wid) if not n["is_success"]]
        assert len(failures) == 2


async def test_deploy_override_routes_to_the_other_broker_exchange() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["deploy"])
        await s.start(wid, etcd_token=s.deploy_token, deploy_messaging_exchange_id=2)
        req = await s.take("2", "deployer", wid)
        assert req["current_step"] == "deploy"
        assert_routing(req)  # callbacks still come home to exchange 1
        await s.echo(req)
        rec = await s.wait_finished(wid)
        ev = events(rec)
        assert "The Workflow request has overriden the default deploy messaging_exchange_id to 2" in ev
        assert f"Dispatching a deploy request to exchange 2, deployment cluster {s.deploy_token}..." in ev


async def test_deploy_cluster_in_another_exchange_and_build_override() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["build", "deploy"])
        await s.start(wid, etcd_token=s.west_token, build_messaging_exchange_id="2")
        build = await s.take("2", "builder", wid)
        await s.echo(build)
        deploy = await s.take("2", "deployer", wid)
        await s.echo(deploy)
        ev = events(await s.wait_finished(wid))
        assert "The Workflow request has overriden the default build messaging_exchange_id to 2" in ev
        assert f"Dispatching a build request to exchange 2, docker build cluster {s.build_token}..." in ev
        assert f"Dispatching a deploy request to exchange 2, deployment cluster {s.west_token}..." in ev


async def test_build_cluster_falls_back_from_local_to_global() -> None:
    # An orchestrator serving exchange 2, which has no build cluster: the global one (exchange 1) is used.
    async with running_stack(start=False) as s:
        await s.start_orchestrator(exchange_id="2")
        wid = await s.workflow(["build"])
        rec = await s.record(wid)
        await s.publish("2", "workflow_orchestration", {**rec, "workflow_id": wid})
        build = await s.take("1", "builder", wid)
        assert build["docker_build_etcd_token"] == s.build_token
        assert build["workflow_orchestration_exchange_id"] == "2"
        await s.echo(build)
        ev = events(await s.wait_finished(wid))
        assert f"Dispatching a build request to exchange 1, docker build cluster {s.build_token}..." in ev


async def test_deploy_ecs_goes_to_the_local_deployer() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["deploy_ecs"])
        await s.start(wid)
        req = await s.take("1", "deployer", wid)
        assert req["current_step"] == "deploy_ecs"
        await s.echo(req)
        assert "Dispatching an ECS deploy request to exchange 1..." in events(await s.wait_finished(wid))


async def expect_failure(s: Stack, wid: str, reason: str, **request: Any) -> dict[str, Any]:
    await s.start(wid, **request)
    rec = await s.wait_finished(wid)
    assert rec["workflow_error"] is True
    text = "\n".join(events(rec))
    assert f"Reason: {reason}" in text, text
    return rec


async def test_failure_paths() -> None:
    async with running_stack(modules=False) as s:
        await expect_failure(s, await s.workflow(["build"]), "Unable to request build - no Builders are "
                             "currently accessible in exchange 1!")
        await expect_failure(s, await s.workflow(["deploy"]), "Unable to execute deployment - an invalid "
                             "deployment cluster was provided!")
        await expect_failure(s, await s.workflow(["deploy"]), f"Unable to request deploy to cluster "
                             f"{s.orphan_token} - cluster is not associated with an exchange!",
                             etcd_token=s.orphan_token)
        await expect_failure(s, await s.workflow(["deploy"]), "Unable to request deploy - no deploy clusters are "
                             "available in exchange 1!", etcd_token=s.deploy_token)
        await expect_failure(s, await s.workflow(["deploy_ecs"]), "Unable to request deploy to ECS - no deploy "
                             "clusters are available in exchange 1!")
        await expect_failure(s, await s.workflow(["config", "teleport"]), "Unable to request config - no Builders "
                             "are currently accessible in exchange 1!")
        await expect_failure(s, await s.workflow(["scheduled"]), "Unable to execute deployment - the scheduled "
                             "milestone was invoked, but no scheduled_start_time was set!")
        for q in ("builder", "deployer", "deploy_oa"):
            assert await s.drain("1", q) == []


async def test_unknown_milestone_fails_naming_it() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["build", "teleport"])
        await s.start(wid)
        await s.echo(await s.take("1", "builder", wid))
        rec = await s.wait_finished(wid)
        assert "Workflow Milestone Failed: teleport" in json.dumps(rec["event_log"])


async def test_one_get_and_one_put_per_step() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["build", "deploy"])
        await s.start(wid, etcd_token=s.deploy_token)
        await s.echo(await s.take("1", "builder", wid))
        await s.echo(await s.take("1", "deployer", wid))
        await s.wait_finished(wid)
        reg = s.services[0].metrics.registry
        count = "wo_manager_request_seconds_count"
        gets = reg.get_sample_value(count, {"endpoint": "/workflows/{id}", "status": "200"})
        puts = reg.get_sample_value(count, {"endpoint": "/workflows/{id}", "status": "204"})
        assert (gets, puts) == (3, 3), "three steps: start, build done, deploy done"


async def test_the_orchestrator_registers_itself_as_a_module_while_running() -> None:
    async with running_stack() as s:
        hostname = s.services[0].settings.hostname
        modules = await s.manager.get_modules("1", fresh=True)
        mine = [m for m in modules if m.get("hostname") == hostname]
        assert len(mine) == 1 and mine[0]["type"] == "workflow_orchestrator", modules
        assert mine[0]["workload"] == 0, "in-flight count"
        await s.stop_orchestrators()
        modules = await s.manager.get_modules("1", fresh=True)
        assert all(m.get("hostname") != hostname for m in modules), "deregistered on shutdown"


async def test_published_messages_carry_the_amqp_properties_of_the_contract() -> None:
    """SPEC §4.1: every message this project publishes is persistent JSON with message_id,
    correlation_id (the workflow id), type, app_id and timestamp."""
    async with running_stack() as s:
        wid = await s.workflow(["build"])
        await s.start(wid)
        request = await s.take_message("1", "builder", wid)
        chat = await s.take_message("1", "notifications_hipchat", wid)
        for msg, kind in ((request, "builder.request"), (chat, "notification.chat")):
            assert msg.type == kind
            assert msg.content_type == "application/json"
            assert msg.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
            assert msg.correlation_id == wid
            assert msg.message_id and uuid.UUID(msg.message_id)
            assert msg.app_id and msg.app_id.startswith("workflow-orchestrator@")
            assert msg.timestamp is not None and abs(msg.timestamp.timestamp() - time.time()) < 60
        assert request.message_id != chat.message_id
        assert json.loads(request.body)["dispatch_id"]


async def test_on_quorum_queues_a_workflow_runs_and_a_poison_message_is_parked() -> None:
    """QUEUE_TYPE=quorum (SPEC §4.2, §6): the orchestrator declares its queue and the queues it
    publishes to as quorum queues with its DELIVERY_LIMIT and a quorum error queue; a workflow runs
    through them; a request redelivered past the limit lands in the error queue, not nowhere."""
    async with running_stack(queues=False, queue_type="quorum", delivery_limit=3) as s:
        wid = await s.workflow(["build", "deploy"])
        await s.start(wid, etcd_token=s.deploy_token)
        await s.echo(await s.take("1", "builder", wid))
        await s.echo(await s.take("1", "deployer", wid))
        assert (await s.wait_finished(wid))["workflow_error"] is False

        for q in ("workflow_orchestration", "builder", "deployer", "notifications_hipchat"):
            name = s.queue("1", q)
            ch = await s.amqp.channel()
            # Re-declaring with the same arguments is accepted; with any other delivery limit or
            # queue type RabbitMQ refuses: so these are exactly the arguments the queues carry.
            await ch.declare_queue(name, durable=True, arguments=queue_arguments(name, "quorum", 3))
            await ch.declare_queue(error_queue_name(name), durable=True, arguments=error_queue_arguments("quorum"))
            for other in (queue_arguments(name, "quorum", 4), queue_arguments(name, "classic")):
                with pytest.raises(aiormq.exceptions.ChannelPreconditionFailed):
                    await ch.declare_queue(name, durable=True, arguments=other)
                ch = await s.amqp.channel()
            await ch.close()

        poison = await s.workflow(["build"])
        await s.start(poison)
        ch = await s.amqp.channel()
        queue = await ch.get_queue(s.queue("1", "builder"), ensure=False)
        deliveries = 0
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:  # a worker that fails the request every time
            msg = await queue.get(no_ack=False, fail=False)
            if msg is None:
                if deliveries > 3:
                    break
                await asyncio.sleep(0.05)
                continue
            assert json.loads(msg.body)["id"] == poison
            deliveries += 1
            await msg.nack(requeue=True)
        await ch.close()
        assert deliveries == 4, "delivered once, then redelivered up to the limit of 3"
        parked = await s.take("1", "builder_error", poison)
        assert parked["current_step"] == "build"


async def test_a_steps_messages_reach_the_broker_in_their_order() -> None:
    """publish_all writes in list order even when the routes are not yet known or declared (cold
    lookups and declarations wait), so chat notifications arrive in the order of the events."""
    async with running_stack(start=False) as s:
        wid = str(uuid.uuid4())
        queues = ["notifications_hipchat", "builder", "notifications_email"]
        messages = [OutMessage("1", queues[i % 3], {"id": wid, "n": i}, "test.order", str(uuid.uuid4()), wid)
                    for i in range(30)]
        pool = BrokerPool("order-test")
        try:
            await Publisher(Resolver(s.manager, "1", "1", AMQP_URL), pool).publish_all(messages)
        finally:
            await pool.close()
        for q in queues:
            got = [m["n"] for m in await s.drain("1", q) if m.get("id") == wid]
            assert got == [i for i in range(30) if queues[i % 3] == q], q
