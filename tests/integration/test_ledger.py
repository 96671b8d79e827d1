"""The ledger against the real Postgres: what the next holder of a workflow's lock sees."""

from __future__ import annotations

import asyncio

from tests.support.services import fresh_database
from workflow_orchestrator.domain.models import Decision, Outgoing
from workflow_orchestrator.ledger.store import Ledger


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
