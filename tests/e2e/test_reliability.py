"""Reliability (SPEC §6) with the service as subprocesses against real RabbitMQ, Postgres and the
sandbox Manager: kill -9 mid-run, duplicates, replicas, Manager faults, broker restart."""

from __future__ import annotations

import asyncio
import random
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest

from tests.integration.test_orchestrator import events
from tests.support.faulty import FaultyProxy
from tests.support.proc import EchoWorkers, OrchestratorProcess
from tests.support.stack import Stack, running_stack
from workflow_orchestrator.ledger.store import LANE_APPLICATION_NAME

EXPECTED = [
    "Starting workflow...",
    "Starting Workflow Milestone: build",
    "Dispatching a build request to exchange 1, docker build cluster {build}...",
    "Completed Workflow Milestone: build, in",
    "Starting Workflow Milestone: deploy",
    "Dispatching a deploy request to exchange 1, deployment cluster {deploy}...",
    "Completed Workflow Milestone: deploy, in",
    "Workflow completed in",
]


async def start_many(s: Stack, n: int) -> list[str]:
    wids = list(await asyncio.gather(*(s.workflow(["build", "deploy"]) for _ in range(n))))
    await asyncio.gather(*(s.start(w, etcd_token=s.deploy_token) for w in wids))
    return wids


async def wait_all_finished(s: Stack, wids: list[str], timeout: float, procs: list[OrchestratorProcess]) -> None:
    deadline = time.monotonic() + timeout
    pending = set(wids)
    while pending and time.monotonic() < deadline:
        listed = await s.manager.list_workflows(lookback="0")
        done = {w["id"] for w in listed if w.get("workflow_completed") is True}
        pending -= done
        if pending:
            await asyncio.sleep(0.3)
    logs = "\n".join(p.log_tail() for p in procs)
    assert not pending, f"{len(pending)} workflows did not finish; e.g. {sorted(pending)[:3]}\n{logs}"


async def assert_exactly_once_and_complete(s: Stack, wids: list[str], workers: EchoWorkers) -> None:
    listed = {w["id"]: w for w in await s.manager.list_workflows(lookback="0")}
    for wid in wids:
        rec = listed[wid]
        assert rec["workflow_error"] is False, events(rec)
        ev = events(rec)
        expected = [e.format(build=s.build_token, deploy=s.deploy_token) for e in EXPECTED]
        assert len(ev) == len(expected), f"{wid}: lost or repeated events:\n" + "\n".join(ev)
        for got, want in zip(ev, expected, strict=True):
            assert got.startswith(want), (got, want)
        for step in ("build", "deploy"):
            received = workers.received[(wid, step)]
            assert len({d for _, d in received}) == 1, f"{wid} {step} dispatched as {received}"
            # A re-sent request after a crash is the same message: same message_id and dispatch_id.
            assert len(set(received)) == 1, f"{wid} {step}: {received}"


async def error_queue(s: Stack) -> list[Any]:
    return await s.drain("1", "workflow_orchestration_error")


async def finishes_cleanly(s: Stack, wids: list[str], workers: EchoWorkers, procs: list[OrchestratorProcess],
                           timeout: float, running: list[OrchestratorProcess] | None = None) -> None:
    """Every workflow completes with each milestone dispatched once, nothing is dead-lettered, and
    the replicas still `running` stop with exit 0."""
    await wait_all_finished(s, wids, timeout, procs)
    await assert_exactly_once_and_complete(s, wids, workers)
    assert await error_queue(s) == [], "nothing dead-lettered"
    for p in procs if running is None else running:
        assert await p.terminate() == 0, p.log_tail()
    await workers.stop()


@pytest.mark.slow
async def test_kill_9_at_random_points_loses_nothing_and_dispatches_once() -> None:
    async with running_stack(start=False) as s:
        workers = EchoWorkers(s)
        await workers.start()
        orch = OrchestratorProcess(s, "crashy")
        orch.start()
        wids = await start_many(s, 200)
        rnd = random.Random(7)
        for _ in range(4):
            await asyncio.sleep(rnd.uniform(0.3, 1.5))
            orch.kill()
            orch.start()
        await finishes_cleanly(s, wids, workers, [orch], 120)


async def test_losing_the_ledger_lane_mid_run_loses_nothing_and_dispatches_once() -> None:
    """The shared ledger connection holds the locks of every step in flight: cut it (as a Postgres
    restart or a network fault would) three times during 100 workflows."""
    async with running_stack(start=False) as s:
        workers = EchoWorkers(s)
        await workers.start()
        orch = OrchestratorProcess(s, "lane-cut", TRANSIENT_BACKOFF="200ms")
        orch.start()
        wids = await start_many(s, 100)
        admin = await asyncpg.connect(s.db_url)
        try:
            cut = 0
            deadline = time.monotonic() + 30
            while cut < 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.3)
                cut += await admin.fetchval(
                    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                    "WHERE application_name = $1 AND datname = current_database()", LANE_APPLICATION_NAME)
            assert cut == 3, f"only {cut} lane connections seen to cut"
        finally:
            await admin.close()
        await finishes_cleanly(s, wids, workers, [orch], 90)


async def test_every_message_twice_gives_the_same_end_state() -> None:
    async with running_stack(start=False) as s:
        workers = EchoWorkers(s, duplicate=True)
        await workers.start()
        orch = OrchestratorProcess(s, "dups")
        orch.start()
        wids = list(await asyncio.gather(*(s.workflow(["build", "deploy"]) for _ in range(30))))
        for w in wids:  # each start twice, the second after the first may already have been handled
            await s.start(w, etcd_token=s.deploy_token)
        for w in reversed(wids):
            await s.start(w, etcd_token=s.deploy_token)
        await wait_all_finished(s, wids, 60, [orch])
        await asyncio.sleep(0.5)
        await assert_exactly_once_and_complete(s, wids, workers)
        assert await orch.terminate() == 0
        await workers.stop()


@pytest.mark.slow
async def test_three_replicas_one_killed_mid_run() -> None:
    async with running_stack(start=False) as s:
        workers = EchoWorkers(s)
        await workers.start()
        procs = [OrchestratorProcess(s, f"replica{i}") for i in range(3)]
        for p in procs:
            p.start()
        wids = await start_many(s, 150)
        await asyncio.sleep(1.0)
        procs[0].kill()
        await finishes_cleanly(s, wids, workers, procs, 120, running=procs[1:])


async def test_manager_errors_and_timeouts_for_a_while_then_recovery_loses_nothing() -> None:
    async with running_stack(start=False) as s, FaultyProxy(s.sandbox.url) as proxy:
        workers = EchoWorkers(s)
        await workers.start()
        orch = OrchestratorProcess(s, "faulty", MANAGER_URL=proxy.url, OAUTH_LOGIN_URL=f"{proxy.url}/oauth/token",
                                   MANAGER_TIMEOUT="1s")
        orch.start()
        wids = await start_many(s, 20)
        await asyncio.sleep(0.3)
        proxy.fail_workflow_calls = True  # 500 on every /workflows call
        await asyncio.sleep(4)
        proxy.fail_workflow_calls = False
        proxy.stall_workflow_calls = 3.0  # then every call times out
        await asyncio.sleep(4)
        proxy.stall_workflow_calls = 0.0
        assert proxy.failed > 0, "the fault was really injected"
        await finishes_cleanly(s, wids, workers, [orch], 90)


def rabbitmqctl(*args: str) -> str:
    return subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, text=True, timeout=120).stdout


def close_connections_of(hostname: str) -> int:
    """Cut the broker connections of one process (as a network cut does)."""
    out = rabbitmqctl("-q", "list_connections", "pid", "client_properties")
    pids = [line.split("\t", 1)[0] for line in out.splitlines() if hostname in line]
    for pid in pids:
        rabbitmqctl("close_connection", pid, "test: connection cut")
    return len(pids)


async def survives_broker_outage(name: str, outage: Callable[[OrchestratorProcess], Awaitable[None]]) -> None:
    """Workflows run, the broker goes away for the orchestrator, it consumes again and the next
    workflows run too, in the same process."""
    async with running_stack(start=False) as s:
        workers = EchoWorkers(s)
        await workers.start()
        orch = OrchestratorProcess(s, name)
        orch.start()
        before = await start_many(s, 5)
        await wait_all_finished(s, before, 30, [orch])
        await workers.stop()
        await outage(orch)
        await s.wait_consuming(timeout=60)
        workers = EchoWorkers(s)
        await workers.start()
        after = await start_many(s, 5)
        await wait_all_finished(s, after, 60, [orch])
        assert orch.alive()
        assert await orch.terminate() == 0
        await workers.stop()


async def test_broker_connection_loss_consumer_resumes() -> None:
    async def cut(orch: OrchestratorProcess) -> None:
        cut_count = await asyncio.to_thread(close_connections_of, orch.env["HOSTNAME"])
        assert cut_count >= 2, "consumer and publisher connections were cut"

    await survives_broker_outage("rmq", cut)


@pytest.mark.slow
async def test_broker_restart_consumer_resumes() -> None:
    async def restart(_: OrchestratorProcess) -> None:
        try:
            await asyncio.to_thread(rabbitmqctl, "stop_app")
        finally:
            await asyncio.to_thread(rabbitmqctl, "start_app")

    await survives_broker_outage("restart", restart)
