"""The ledger against the real Postgres: what the next holder of a workflow's lock sees, and the
shared connection (group commit) that carries the steps in flight."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import pytest

from tests.support.services import fresh_database
from workflow_orchestrator.domain.models import Decision, Outgoing, Run
from workflow_orchestrator.ledger.store import Ledger, LedgerRejected, _Op


@asynccontextmanager
async def replicas(n: int) -> AsyncIterator[list[Ledger]]:
    """`n` ledgers (replicas) on one fresh database."""
    async with fresh_database("wo_ledger_test") as url:
        ledgers = [Ledger(url) for _ in range(n)]
        try:
            for ledger in ledgers:
                await ledger.start()
            yield ledgers
        finally:
            for ledger in ledgers:
                await ledger.close()


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def decision(wid: str) -> Decision:
    return Decision(outcome="processed", workflow_id=wid, record={"id": wid, "event_log": []},
                    messages=[Outgoing("1", "builder", {"id": wid}, "builder.request", f"m-{wid}")])


async def step(ledger: Ledger, wid: str, key: str) -> None:
    """Enter, record a decision, mark its effects done, leave."""
    async with ledger.session(wid, key) as s:
        row = await s.record(decision(wid))
        s.mark_done(row.seq)


async def next_holder_sees_no_pending(replica: Ledger, wid: str, entered: asyncio.Event) -> bool:
    await entered.wait()
    async with replica.session(wid, f"second-{wid}") as s:  # blocks until the first holder leaves
        return not s.pending


async def test_the_next_holder_sees_the_effects_done_by_the_previous_one() -> None:
    async with replicas(2) as (first, second):
        for i in range(30):
            wid = f"wf-{i}"
            entered = asyncio.Event()
            waiter = asyncio.create_task(next_holder_sees_no_pending(second, wid, entered))
            async with first.session(wid, f"first-{wid}") as s:
                row = await s.record(decision(wid))
                s.mark_done(row.seq)
                entered.set()
                await asyncio.sleep(0.02)  # the other replica is now waiting for the lock
            assert await waiter, f"{wid}: the next holder saw finished effects as unfinished"


async def test_steps_in_flight_share_round_trips_and_commits() -> None:
    async with replicas(1) as (ledger,):
        await asyncio.gather(*(step(ledger, f"wf-{i}", f"k-wf-{i}") for i in range(60)))
        await until(lambda: ledger.lane.ops == 180)  # enter, record, leave (the last leaves linger)
        assert ledger.lane.batches <= 20, f"{ledger.lane.batches} round trips for 60 concurrent steps"
        async with ledger.session("wf-7", "k-wf-7") as s:  # a redelivery sees its decision done
            assert s.own is not None and s.own.done and not s.pending


async def test_a_leave_rides_the_next_round_trip() -> None:
    async with replicas(1) as (ledger,):
        for i in range(20):  # back to back, one at a time: nothing else to batch with
            await step(ledger, f"wf-{i}", f"k-{i}")
        await until(lambda: ledger.lane.ops == 60)
        assert ledger.lane.batches <= 42, f"{ledger.lane.batches} round trips: leaves did not ride"
        async with ledger.session("wf-19", "k-19") as s:  # the last leave was committed
            assert s.own is not None and s.own.done


async def test_a_refused_decision_fails_alone() -> None:
    async with replicas(1) as (ledger,):
        async def record(wid: str, request: dict[str, str]) -> int:
            async with ledger.session(wid, f"k-{wid}") as s:
                d = decision(wid)
                d.run = Run(workflow_id=wid, current_step="build", dispatch_id="d", attempt=1, phase="running",
                            workflow_start_time=None, step_time=None, dispatched_at=None, request=request)
                return (await s.record(d)).seq

        results = await asyncio.gather(record("good-1", {"a": "b"}), record("bad", {"a": "nul \u0000 here"}),
                                       record("good-2", {"a": "c"}), return_exceptions=True)
        assert isinstance(results[0], int) and isinstance(results[2], int), results
        assert isinstance(results[1], LedgerRejected), results
        assert "unsupported Unicode escape" in str(results[1]) or "\\u0000" in str(results[1]), results[1]


async def test_a_lost_lane_connection_fails_its_sessions_and_frees_their_locks() -> None:
    async with replicas(2) as (first, second):
        with pytest.raises(ConnectionError):
            async with first.session("wf-x", "k1") as s:
                assert first.lane.conn is not None
                await second._pool().execute("SELECT pg_terminate_backend($1)", first.lane.conn.get_server_pid())
                await s.record(decision("wf-x"))
        async with asyncio.timeout(10):  # the lock went with the connection
            async with second.session("wf-x", "k2") as s:
                assert s.own is None
        await step(first, "wf-y", "k3")  # the lane reconnects


async def test_an_abandoned_entry_gives_its_lock_back() -> None:
    async with replicas(2) as (first, second):
        entering = asyncio.create_task(first.lane.submit(_Op("enter", "wf-z", "k1")))
        await asyncio.sleep(0)  # queued: the round trip goes ahead without anyone to take the lock
        entering.cancel()
        async with asyncio.timeout(10):
            async with second.session("wf-z", "k2") as s:
                assert s.own is None
