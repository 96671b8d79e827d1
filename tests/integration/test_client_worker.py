"""Worker-based builders and deployers drive workflows through the real orchestrator (RabbitMQ,
Postgres, the sandbox Manager over HTTP): completion, worker failure, crashes, retries, cancel,
module registration and drain on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from tests.support.services import AMQP_URL
from tests.support.stack import Stack, running_stack
from workflow_orchestrator.client import OrchestrationClient, OrchestrationRequest, StepFailed, Worker
from workflow_orchestrator.messaging.broker import BrokerPool

Handler = Callable[[OrchestrationRequest], Awaitable[OrchestrationRequest | None]]


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{what} not reached within {timeout}s")


async def settled(*workers: Worker) -> None:
    """Each worker handled one request. The orchestrator can finish the workflow before a worker's
    ack path (chat notification, counters) has run, so this waits rather than asserts."""
    async def check() -> bool:
        return all(w.handled == 1 for w in workers)

    await eventually(check, "one request handled by each worker")


def make_worker(s: Stack, queue: str, handler: Handler, exchange: str = "1", **kw: Any) -> Worker:
    kw.setdefault("amqp_url", AMQP_URL)
    return Worker(queue, exchange, handler, manager=s.manager, broker_id="1",
                  hostname=f"{queue}-{exchange}-{s.r}-{uuid.uuid4().hex[:6]}", shutdown_grace=5, **kw)


@asynccontextmanager
async def client_of(s: Stack) -> AsyncIterator[OrchestrationClient]:
    pool = BrokerPool("client-test")
    try:
        yield OrchestrationClient(s.manager, pool, broker_id="1", exchange_id="1", amqp_url=AMQP_URL)
    finally:
        await pool.close()


async def modules(s: Stack, exchange: str) -> list[dict[str, Any]]:
    # Uncached: the Manager client caches module lists for 30 s.
    resp = await s.manager.request("GET", f"/messaging/exchanges/{exchange}/modules", "modules")
    return list(resp.json())


def entries(rec: dict[str, Any]) -> list[str]:
    prefix = f"[OA][{rec['id']}][{rec.get('deployment_repo') or 'Unknown'}] "
    return [e[len(prefix):] if e.startswith(prefix) else e for e in rec.get("event_log") or []]


async def test_builder_and_deployer_workers_complete_a_workflow() -> None:
    seen: dict[str, OrchestrationRequest] = {}

    async def build(request: OrchestrationRequest) -> OrchestrationRequest:
        seen["build"] = request.copy_request()
        await builder.client.notify(request, "Image acme/web:abc123 pushed")
        request.source_commit_hash = "abc123def"
        await builder.client.save(request)  # a worker may save fields mid-step
        return request

    async def deploy(request: OrchestrationRequest) -> None:
        seen["deploy"] = request.copy_request()

    async with running_stack(modules=False) as s, client_of(s) as client:
        # The builder resolves its broker from the Manager's broker records (no AMQP_URL override).
        builder = make_worker(s, "builder", build, amqp_url=None)
        deployer = make_worker(s, "deployer", deploy)
        async with builder, deployer:
            registered = {(m["hostname"], m["type"]) for m in await modules(s, "1")}
            assert {(builder.hostname, "builder"), (deployer.hostname, "deployer")} <= registered
            wid = await s.workflow(["build", "deploy"])
            assert await client.start(wid, etcd_token=s.deploy_token) is None  # via the Manager's execute
            rec = await s.wait_finished(wid)
            await settled(builder, deployer)
        assert rec["workflow_error"] is False, entries(rec)
        assert rec["source_commit_hash"] == "abc123def"
        log = entries(rec)
        assert "Image acme/web:abc123 pushed" in log, "notify() adds the entry and it reaches the record"
        assert log.index("Image acme/web:abc123 pushed") < log.index("Completed Workflow Milestone: build, in "
                                                                     + rec["workflow_step_durations"]["build"])
        assert log[-1].startswith("Workflow completed in ")
        assert seen["build"].current_step == "build" and seen["deploy"].current_step == "deploy"
        assert seen["build"].dispatch_id and seen["deploy"].dispatch_id != seen["build"].dispatch_id
        assert seen["deploy"].source_commit_hash == "abc123def"
        chat = [c for c in await s.drain("1", "notifications_hipchat") if wid in c["prefix"]]
        assert {"is_success": True, "prefix": f"[OA][{wid}][acme/web-deploy]",
                "message": "Image acme/web:abc123 pushed", "room_names": None} in chat
        hosts = {m["hostname"] for m in await modules(s, "1")}
        assert builder.hostname not in hosts and deployer.hostname not in hosts, "deregistered on stop"


async def test_step_failed_fails_the_workflow_and_its_texts_land_in_the_event_log() -> None:
    calls: list[str] = []

    async def build(request: OrchestrationRequest) -> None:
        calls.append("build")

    async def deploy(request: OrchestrationRequest) -> None:
        calls.append("deploy")
        raise StepFailed("Deployment to the cluster failed", "fleetctl exited with status 2")

    async with running_stack(modules=False) as s, client_of(s) as client:
        async with make_worker(s, "builder", build), make_worker(s, "deployer", deploy) as deployer:
            wid = await s.workflow(["build", "deploy"])
            await client.start(wid, etcd_token=s.deploy_token)
            rec = await s.wait_finished(wid)
            await settled(deployer)
        assert calls == ["build", "deploy"]
        assert rec["workflow_error"] is True
        log = entries(rec)
        assert "Deployment to the cluster failed. Reason: fleetctl exited with status 2" in log
        assert "Workflow Milestone Failed: deploy. Reason: Milestone worker has reported a failure" in log
        assert any(e.startswith("Workflow has failed in ") for e in log)
        chat = [c for c in await s.drain("1", "notifications_hipchat") if wid in c["prefix"]]
        assert {"is_success": False, "prefix": f"[OA][{wid}][acme/web-deploy]",
                "message": "Deployment to the cluster failed. Reason: fleetctl exited with status 2",
                "room_names": None} in chat


async def test_a_crashing_handler_reports_the_exception() -> None:
    async def build(request: OrchestrationRequest) -> None:
        raise RuntimeError("disk full")

    async with running_stack(modules=False) as s, client_of(s) as client:
        async with make_worker(s, "builder", build) as builder:
            wid = await s.workflow(["build"])
            await client.start(wid, via="queue")
            rec = await s.wait_finished(wid)
        assert rec["workflow_error"] is True
        expected = (f"The builder on {builder.hostname} failed while processing milestone build. "
                    "Reason: RuntimeError: disk full")
        assert expected in entries(rec)


async def test_a_retried_milestone_is_handled_again() -> None:
    attempts: list[str] = []

    async def deploy(request: OrchestrationRequest) -> None:
        attempts.append(str(request.dispatch_id))
        if len(attempts) == 1:
            raise StepFailed("Deploy timed out waiting for health checks", "unhealthy")

    async def build(request: OrchestrationRequest) -> None:
        return None

    policy = {"deploy": {"retries": 1, "retry_backoff": "200ms"}}
    async with running_stack(modules=False, milestones=policy) as s, client_of(s) as client:
        async with make_worker(s, "builder", build), make_worker(s, "deployer", deploy):
            wid = await s.workflow(["build", "deploy"])
            await client.start(wid, etcd_token=s.deploy_token)
            rec = await s.wait_finished(wid)
        assert rec["workflow_error"] is False, entries(rec)
        assert len(attempts) == 2 and attempts[0] != attempts[1], "a retry is a new dispatch, not a duplicate"
        assert any(e.startswith("Milestone deploy failed (attempt 1 of 2)") for e in entries(rec))


async def test_unknown_fields_travel_through_the_orchestrator_and_workers() -> None:
    received: dict[str, dict[str, Any]] = {}

    async def build(request: OrchestrationRequest) -> OrchestrationRequest:
        received["build"] = request.to_payload()
        request.set("image_digest", "sha256:0123")  # a worker adds a field of its own
        return request

    async def deploy(request: OrchestrationRequest) -> None:
        received["deploy"] = request.to_payload()

    custom = {"ticket": "OPS-42", "matrix": [{"os": "linux", "archs": ["amd64", "arm64"]}], "n": 1.5, "z": None}
    async with running_stack(modules=False) as s, client_of(s) as client:
        async with make_worker(s, "builder", build), make_worker(s, "deployer", deploy):
            wid = await s.workflow(["build", "deploy"])
            message_id = await client.start(wid, via="queue", etcd_token=s.deploy_token, release_meta=custom)
            assert message_id
            await s.wait_finished(wid)
        assert received["build"]["release_meta"] == custom
        assert received["deploy"]["release_meta"] == custom
        assert received["deploy"]["image_digest"] == "sha256:0123"


async def test_cancel_fails_a_running_workflow_and_the_late_callback_is_ignored() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def build(request: OrchestrationRequest) -> None:
        started.set()
        await release.wait()

    async with running_stack(modules=False) as s, client_of(s) as client:
        async with make_worker(s, "builder", build) as builder:
            wid = await s.workflow(["build", "deploy"])
            await client.start(wid)
            await asyncio.wait_for(started.wait(), 20)
            await client.cancel(wid, "release postponed")
            rec = await s.wait_finished(wid)
            release.set()

            await settled(builder)

            async def ignored() -> bool:
                return (s.services[0].metrics.registry.get_sample_value("wo_stale_total") or 0) >= 1

            await eventually(ignored, "the late callback counted as stale by the orchestrator")
            after = await s.record(wid)
        assert rec["workflow_error"] is True
        assert "Workflow Milestone Failed: build. Reason: Workflow cancelled: release postponed" in entries(rec)
        assert after["event_log"] == rec["event_log"], "the stale callback changed nothing"


async def test_sigterm_drains_the_request_in_flight() -> None:
    started, release = asyncio.Event(), asyncio.Event()

    async def build(request: OrchestrationRequest) -> None:
        started.set()
        await release.wait()

    async with running_stack(modules=False) as s, client_of(s) as client:
        builder = make_worker(s, "builder", build)
        running = asyncio.create_task(builder.run())

        async def registered() -> bool:
            return any(m["hostname"] == builder.hostname for m in await modules(s, "1"))

        await eventually(registered, "module registered")
        wid = await s.workflow(["build"])
        await client.start(wid)
        await asyncio.wait_for(started.wait(), 20)
        os.kill(os.getpid(), signal.SIGTERM)
        await eventually(lambda: _true(builder.stopping.is_set()), "SIGTERM noticed")
        assert not running.done(), "waits for the request in flight"
        release.set()
        await asyncio.wait_for(running, 20)
        rec = await s.wait_finished(wid)
        assert rec["workflow_error"] is False and builder.handled == 1
        assert not await registered(), "deregistered after the drain"


async def _true(value: bool) -> bool:
    return value


async def test_a_deploy_oa_worker_registers_as_a_deployer_and_completes_its_milestone() -> None:
    """The orchestrator dispatches deploy_oa where a `deployer` module is registered (SPEC §5.3):
    a worker of the deploy_oa queue registers as one, so it is enough on its own."""
    async def deploy_oa(request: OrchestrationRequest) -> None:
        return None

    async with running_stack(modules=False) as s:
        worker = make_worker(s, "deploy_oa", deploy_oa)
        async with worker:
            registered = {(m["hostname"], m["type"]) for m in await modules(s, "1")}
            assert (worker.hostname, "deployer") in registered
            wid = await s.workflow(["deploy_oa"])
            await s.start(wid, etcd_token=s.deploy_token)
            rec = await s.wait_finished(wid)
            await settled(worker)
        assert rec["workflow_error"] is False, entries(rec)
