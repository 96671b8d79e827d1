"""The ledger against the real Postgres: what the next holder of a workflow's lock sees."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.services import fresh_database
from workflow_orchestrator.domain.models import Decision, Outgoing, Run
from workflow_orchestrator.ledger.store import Ledger, LedgerRejected, _Op


def decision(wid: str) -> Decision:
    return Decision(outcome="processed", workflow_id=wid, record={"id": wid, "event_log": []},
                    messages=[Outgoing("1", "builder", {"id": wid}, "builder.request", f"m-{wid}")])


async def next_holder_sees_no_pending(replica: Ledger, wid: str, entered: asyncio.Event) -> bool:
    await entered.wait()
    async with replica.session(wid, f"second-{wid}") as s:  # blocks until the first holder leaves
        return not s.pending


async def test_the_next_holder_sees_the_effects_done_by_the_previous_one() -> None:
    async with fresh_database("wo_ledger_test") as url:
        first, second = Ledger(url), Ledger(url)  # two replicas
        await first.start()
        await second.start()
        try:
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
        finally:
            await first.close()
            await second.close()


async def test_steps_in_flight_share_round_trips_and_commits() -> None:
    async with fresh_database("wo_ledger_test") as url:
        ledger = Ledger(url)
        await ledger.start()
        try:
            async def step(wid: str) -> None:
                async with ledger.session(wid, f"k-{wid}") as s:
                    row = await s.record(decision(wid))
                    s.mark_done(row.seq)

            await asyncio.gather(*(step(f"wf-{i}") for i in range(60)))
            assert ledger.lane.ops == 180  # enter, record, leave
            assert ledger.lane.batches <= 20, f"{ledger.lane.batches} round trips for 60 concurrent steps"
            async with ledger.session("wf-7", "k-wf-7") as s:  # a redelivery sees its decision done
                assert s.own is not None and s.own.done and not s.pending
        finally:
            await ledger.close()


async def test_a_refused_decision_fails_alone() -> None:
    async with fresh_database("wo_ledger_test") as url:
        ledger = Ledger(url)
        await ledger.start()
        try:
            async def step(wid: str, request: dict[str, str]) -> int:
                async with ledger.session(wid, f"k-{wid}") as s:
                    d = decision(wid)
                    d.run = Run(workflow_id=wid, current_step="build", dispatch_id="d", attempt=1, phase="running",
                                workflow_start_time=None, step_time=None, dispatched_at=None, request=request)
                    return (await s.record(d)).seq

            results = await asyncio.gather(step("good-1", {"a": "b"}), step("bad", {"a": "nul \u0000 here"}),
                                           step("good-2", {"a": "c"}), return_exceptions=True)
            assert isinstance(results[0], int) and isinstance(results[2], int), results
            assert isinstance(results[1], LedgerRejected), results
            assert "unsupported Unicode escape" in str(results[1]) or "\\u0000" in str(results[1]), results[1]
        finally:
            await ledger.close()


async def test_a_lost_lane_connection_fails_its_sessions_and_frees_their_locks() -> None:
    async with fresh_database("wo_ledger_test") as url:
        first, second = Ledger(url), Ledger(url)
        await first.start()
        await second.start()
        try:
            with pytest.raises(ConnectionError):
                async with first.session("wf-x", "k1") as s:
                    assert first.lane.conn is not None
                    pid = first.lane.conn.get_server_pid()
                    await second._pool().execute("SELECT pg_terminate_backend($1)", pid)
                    await s.record(decision("wf-x"))
            async with asyncio.timeout(10):  # the lock went with the connection
                async with second.session("wf-x", "k2") as s:
                    assert s.own is None
            async with first.session("wf-y", "k3") as s:  # the lane reconnects
                row = await s.record(decision("wf-y"))
                s.mark_done(row.seq)
        finally:
            await first.close()
            await second.close()


async def test_an_abandoned_entry_gives_its_lock_back() -> None:
    async with fresh_database("wo_ledger_test") as url:
        first, second = Ledger(url), Ledger(url)
        await first.start()
        await second.start()
        try:
            entering = asyncio.create_task(first.lane.submit(_Op("enter", "wf-z", "k1")))
            await asyncio.sleep(0)  # queued: the round trip goes ahead without anyone to take the lock
            entering.cancel()
            async with asyncio.timeout(10):
                async with second.session("wf-z", "k2") as s:
                    assert s.own is None
        finally:
            await first.close()
            await second.close()
