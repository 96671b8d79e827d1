"""Time and control with real services: durable scheduled starts, timeouts, retries, cancel."""

from __future__ import annotations

import asyncio
import re
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

from tests.integration.test_orchestrator import events
from tests.support.stack import running_stack


def rfc1123_in(seconds: float) -> str:
    return format_datetime(datetime.now(UTC) + timedelta(seconds=seconds), usegmt=True)


async def test_scheduled_workflows_wait_without_blocking_the_consumer() -> None:
    async with running_stack() as s:
        scheduled = await asyncio.gather(*(s.workflow(["scheduled", "deploy_ecs"]) for _ in range(100)))
        at = rfc1123_in(3)  # set only now, so creating 100 workflows does not eat into the 3 s
        await asyncio.gather(*(s.manager.put_workflow(w, {"scheduled_start_time": at}) for w in scheduled))
        await asyncio.gather(*(s.start(w) for w in scheduled))
        # Meanwhile another workflow is dispatched at once.
        started = time.monotonic()
        other = await s.workflow(["deploy_ecs"])
        await s.start(other)
        await s.take("1", "deployer", other, timeout=10)
        assert time.monotonic() - started < 2.5, "the consumer is not blocked by scheduled workflows"
        rec = await s.record(scheduled[0])
        assert rec["current_step"] == "scheduled"
        assert any("Workflow is not scheduled to start until" in e and "seconds remain)" in e
                   for e in events(rec))
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while len(seen) < len(scheduled) and time.monotonic() < deadline:
            for req in await s.drain("1", "deployer"):
                assert req["current_step"] == "deploy_ecs"
                assert req["id"] not in seen, "each scheduled workflow is dispatched once"
                seen.add(req["id"])
            await asyncio.sleep(0.1)
        assert seen == set(scheduled)
        rec = await s.record(scheduled[0])
        ev = events(rec)
        assert ev.index("Workflow is now scheduled to start") < ev.index("Starting Workflow Milestone: deploy_ecs")


async def test_moved_schedule_rearms_the_timer() -> None:
    async with running_stack() as s:
        # 3 s: the move below must land before the first schedule is due, even on a loaded machine
        wid = await s.workflow(["scheduled", "deploy_ecs"], scheduled_start_time=rfc1123_in(3))
        await s.start(wid)
        await s.wait_record(wid, lambda r: r.get("current_step") == "scheduled")
        later = rfc1123_in(5)
        await s.manager.put_workflow(wid, {"scheduled_start_time": later})
        await s.wait_record(wid, lambda r: sum("not scheduled to start until" in e for e in r["event_log"]) == 2,
                            timeout=10, what="re-armed")
        assert await s.drain("1", "deployer") == []
        await s.take("1", "deployer", wid, timeout=10)


async def test_milestone_timeout_fails_the_workflow_and_late_callback_is_stale() -> None:
    async with running_stack(milestones={"build": {"timeout": "1s"}}) as s:
        wid = await s.workflow(["build", "deploy"])
        await s.start(wid)
        build = await s.take("1", "builder", wid)
        rec = await s.wait_finished(wid, timeout=15)
        text = "\n".join(events(rec))
        # 1 s timeout; the exact figure depends on how soon the timer is claimed on a loaded machine
        assert re.search(r"Workflow Milestone Failed: build\. Reason: Milestone build timed out after [12] second\(s\)",
                         text), text
        await s.echo(build)  # the worker comes back too late
        await asyncio.sleep(0.5)
        stale = s.services[0].metrics.registry.get_sample_value("wo_stale_total")
        deadline = time.monotonic() + 10
        while (stale or 0) < 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
            stale = s.services[0].metrics.registry.get_sample_value("wo_stale_total")
        assert stale == 1
        assert (await s.record(wid))["event_log"] == rec["event_log"]
        assert await s.drain("1", "deployer") == []


async def test_retry_succeeds_on_the_second_attempt() -> None:
    async with running_stack(milestones={"build": {"retries": 1, "retry_backoff": "1s"}}) as s:
        wid = await s.workflow(["build"])
        await s.start(wid)
        first = await s.take("1", "builder", wid)
        await s.echo(first, workflow_completed=True, workflow_error=True)
        second = await s.take("1", "builder", wid, timeout=10)
        assert second["dispatch_id"] != first["dispatch_id"]
        assert second["workflow_completed"] is False and second["workflow_error"] is False
        await s.echo(first, workflow_completed=True, workflow_error=True)  # duplicate of the old failure: stale
        await s.echo(second)
        rec = await s.wait_finished(wid)
        assert rec["workflow_error"] is False
        assert ("Milestone build failed (attempt 1 of 2): Milestone worker has reported a failure; "
                "retrying in 1 second(s)") in events(rec)


async def test_cancel_during_a_milestone_and_the_late_callback_is_ignored() -> None:
    async with running_stack() as s:
        wid = await s.workflow(["build", "deploy"])
        await s.start(wid, etcd_token=s.deploy_token)
        build = await s.take("1", "builder", wid)
        await s.publish("1", "workflow_orchestration", {"id": wid, "action": "cancel", "reason": "bad commit"})
        rec = await s.wait_finished(wid)
        assert rec["workflow_error"] is True
        assert "Workflow Milestone Failed: build. Reason: Workflow cancelled: bad commit" in events(rec)
        await s.echo(build)
        await asyncio.sleep(1.0)  # give a wrong dispatch the chance to happen; then prove it did not
        assert await s.drain("1", "deployer") == []
        assert (await s.record(wid))["event_log"] == rec["event_log"]


async def test_two_replicas_fire_each_timer_once_and_timers_survive_a_restart() -> None:
    async with running_stack() as s:
        await s.start_orchestrator()
        wids = [await s.workflow(["scheduled", "deploy_ecs"], scheduled_start_time=rfc1123_in(3))
                for _ in range(20)]
        for wid in wids:
            await s.start(wid)
        for wid in wids:
            await s.wait_record(wid, lambda r: r.get("current_step") == "scheduled")
        await s.stop_orchestrators()  # every replica down while the timers are pending
        await s.start_orchestrator()
        await s.start_orchestrator()
        got: list[str] = []
        deadline = time.monotonic() + 30
        while len(got) < len(wids) and time.monotonic() < deadline:
            got += [r["id"] for r in await s.drain("1", "deployer")]
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)
        got += [r["id"] for r in await s.drain("1", "deployer")]
        assert sorted(got) == sorted(wids), "each timer fired exactly once"
