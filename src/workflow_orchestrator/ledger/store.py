"""The ledger (SPEC §6): inbox of decisions and their effects, run state, durable timers, locks.

Postgres through asyncpg. Migrations are versioned and applied under an advisory lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import structlog

from workflow_orchestrator import jsonio
from workflow_orchestrator.domain.models import Decision, HistoryEntry, Run
from workflow_orchestrator.ledger.schema import _MIGRATION_LOCK, MIGRATIONS, VERSION_TABLE, Conn, check_schema, migrate

log = structlog.get_logger(__name__)



_dumps = jsonio.dumps_str


async def _init_conn(conn: asyncpg.Connection) -> None:
    for name in ("jsonb", "json"):
        await conn.set_type_codec(name, encoder=_dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query, a round trip per step (asyncpg still rolls back an open
    transaction): the ledger sets no session state, and `Ledger.session` releases its advisory lock
    or closes the connection."""


@dataclass(frozen=True)
class InboxRow:
    seq: int
    message_key: str
    outcome: str
    effects: dict[str, Any] | None
    done: bool


@dataclass(frozen=True)
class TimerRow:
    id: int
    workflow_id: str
    kind: str
    token: str
    due_at: datetime
    payload: dict[str, Any] | None


def effects_of(decision: Decision) -> dict[str, Any] | None:
    """The effects to carry out for a decision, as JSON-able data."""
    if decision.record is None and not decision.messages:
        return None
    return {
        "record": decision.record,
        "messages": [
            {"exchange_id": m.exchange_id, "queue": m.queue, "body": m.body, "type": m.type,
             "message_id": m.message_id}
            for m in decision.messages
        ],
    }


class LedgerRejected(Exception):
    """Postgres refused to store a decision (its data, e.g. a NUL character): retrying cannot help."""


class LockLost(ConnectionError):
    """The ledger connection that held the workflow's lock failed: the step must be tried again."""


@dataclass
class _Op:
    """One request to the shared connection (see `_Lane`)."""

    kind: str  # "enter" (try the lock, then read the state), "state", "record", "note", "leave"
    wid: str
    key: str = ""
    args: tuple[Any, ...] = ()  # record: outcome, effects, run, cancel_timers, timers, history; note: history
    done: list[int] = field(default_factory=list)
    generation: int | None = None  # record/leave: the connection that holds the lock
    future: asyncio.Future[Any] | None = None


LANE_APPLICATION_NAME = "workflow-orchestrator ledger lane"  # in pg_stat_activity


class _Lane:
    """Group commit: one connection carries the ledger work of every step in flight. Operations
    submitted while a round trip is under way go together in the next `CALL wo_batch`, so at load a
    step costs a fraction of a round trip and of a commit; alone, a step waits for nothing.

    The connection holds the advisory locks of the workflows entered through it. If it fails, Postgres
    drops them all: the generation changes and every operation of the old one fails with LockLost."""

    MAX_OPS = 64  # decisions are subtransactions: stay under Postgres' 64 cached subtransaction ids
    LINGER = 0.005  # how long a leave waits for a round trip to ride before it goes alone

    def __init__(self, dsn: str, observe: Callable[[int], None] | None = None) -> None:
        self.dsn = dsn
        self.observe = observe  # called with the number of operations of each round trip
        self.conn: asyncpg.Connection | None = None
        self.generation = 0
        self.queue: list[_Op] = []
        self.task: asyncio.Task[None] | None = None
        self.wake = asyncio.Event()  # an operation that starts a round trip was queued
        self.batches = 0
        self.ops = 0

    async def submit(self, op: _Op) -> Any:
        future = self._queue(op)
        self.wake.set()
        return await future

    def leave_later(self, op: _Op) -> None:
        """Queue a leave without waiting for it: it rides the next round trip, whatever starts it,
        or goes alone after LINGER. Its done marks are committed and its lock released before any
        entry queued after it (wo_batch unlocks before it enters), so the next step of the same
        workflow on this replica sees its effects done; another replica waits for the unlock."""
        self._queue(op)

    def _queue(self, op: _Op) -> asyncio.Future[Any]:
        future = op.future = asyncio.get_running_loop().create_future()
        self.queue.append(op)
        if self.task is None or self.task.done():
            self.task = asyncio.create_task(self._run())
        return future

    async def close(self) -> None:
        if self.task is not None:
            self.wake.set()  # send the leaves still waiting for a ride
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.task), 5)
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        if self.conn is not None:
            conn, self.conn = self.conn, None
            await conn.close(timeout=5)

    async def _run(self) -> None:
        while self.queue:
            if not self.wake.is_set():  # only leaves are waiting: give them a round trip to ride
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), self.LINGER)
            self.wake.clear()
            batch, self.queue = self.queue[:self.MAX_OPS], self.queue[self.MAX_OPS:]
            try:
                await self._send(batch)
            except BaseException as exc:
                log.warning("ledger lane round trip failed; its connection and locks are dropped",
                            error=f"{type(exc).__name__}: {exc}", operations=len(batch))
                self._drop()
                for op in batch:
                    _fail(op, LockLost(f"ledger round trip failed: {type(exc).__name__}: {exc}"))
                if not isinstance(exc, Exception):
                    raise

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn.terminate()
            self.conn = None
        self.generation += 1

    async def _send(self, batch: list[_Op]) -> None:
        if self.conn is None or self.conn.is_closed():
            self.conn = await asyncpg.connect(self.dsn, command_timeout=30,
                                              server_settings={"application_name": LANE_APPLICATION_NAME})
            await _init_conn(self.conn)
            self.generation += 1
        live: list[_Op] = []
        for op in batch:
            if op.generation is not None and op.generation != self.generation:
                _fail(op, LockLost("the ledger connection holding this workflow's lock was lost"))
            elif "\x00" in op.wid or "\x00" in op.key:  # text cannot hold it; would fail the round trip
                _fail(op, LedgerRejected("the ledger refused the message: NUL character in its id or key"))
            else:
                live.append(op)
        records = [op for op in live if op.kind == "record"]
        notes = [op for op in live if op.kind == "note"]
        leaving = [op for op in live if op.kind == "leave"]
        entering = [op for op in live if op.kind in ("enter", "state")]
        # The run and the timers go as text, cast inside the decision's subtransaction: a value that
        # Postgres refuses (jsonb has no \u0000) then fails that decision, not the whole round trip.
        columns = [[op.args[0] for op in records], [op.args[1] for op in records],
                   [None if op.args[2] is None else _dumps(op.args[2]) for op in records],
                   [op.args[3] for op in records], [_dumps(op.args[4]) for op in records],
                   [None if op.args[5] is None else _dumps(op.args[5]) for op in records],
                   [op.wid for op in notes], [_dumps(op.args[0]) for op in notes]]
        result = await self.conn.fetchval(
            "CALL wo_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, NULL)",
            [op.key for op in records], [op.wid for op in records], *columns,
            [seq for op in leaving for seq in op.done], [op.wid for op in leaving],
            [op.wid for op in entering], [op.key for op in entering], [op.kind == "enter" for op in entering])
        self.batches += 1
        self.ops += len(live)
        if self.observe is not None:
            self.observe(len(live))
        for op, seq in zip(records, result["seqs"], strict=True):
            if isinstance(seq, dict):
                _fail(op, LedgerRejected(f"the ledger refused the decision: {seq['error']} ({seq['sqlstate']})"))
            else:
                _settle(op, seq)
        for op in (*notes, *leaving):
            _settle(op, None)
        for op, state in zip(entering, result["states"], strict=True):
            if op.kind == "enter" and state is not None and not _settle(op, (self.generation, state)):
                # Nobody waits for this lock any more (the caller was cancelled): give it back.
                self.queue.append(_Op("leave", op.wid, generation=self.generation,
                                      future=asyncio.get_running_loop().create_future()))
            elif op.kind != "enter" or state is None:
                _settle(op, state)


def _settle(op: _Op, value: Any) -> bool:
    if op.future is None or op.future.done():
        return False
    op.future.set_result(value)
    return True


def _fail(op: _Op, exc: BaseException) -> None:
    if op.future is not None and not op.future.done():
        op.future.set_exception(exc)
        op.future.add_done_callback(lambda f: f.exception())  # retrieved even if nobody awaits it


class _Channel:
    """How a session talks to the ledger while it holds the workflow's lock: through the shared lane
    (the lock was taken there), or on a pooled connection of its own (it had to wait for the lock)."""

    async def state(self, wid: str, key: str) -> dict[str, Any]:
        raise NotImplementedError

    async def record(self, key: str, wid: str, args: tuple[Any, ...]) -> Any:
        raise NotImplementedError

    async def note(self, wid: str, history: dict[str, Any]) -> None:
        raise NotImplementedError

    async def leave(self, wid: str, done: list[int]) -> None:
        raise NotImplementedError


class _LaneChannel(_Channel):
    def __init__(self, lane: _Lane, generation: int) -> None:
        self.lane = lane
        self.generation = generation

    async def state(self, wid: str, key: str) -> dict[str, Any]:
        state: dict[str, Any] = await self.lane.submit(_Op("state", wid, key))
        return state

    async def record(self, key: str, wid: str, args: tuple[Any, ...]) -> Any:
        return await self.lane.submit(_Op("record", wid, key, args, generation=self.generation))

    async def note(self, wid: str, history: dict[str, Any]) -> None:
        self.lane.leave_later(_Op("note", wid, args=(history,)))

    async def leave(self, wid: str, done: list[int]) -> None:
        self.lane.leave_later(_Op("leave", wid, done=done, generation=self.generation))


class _OwnChannel(_Channel):
    def __init__(self, conn: Conn) -> None:
        self.conn = conn

    async def state(self, wid: str, key: str) -> dict[str, Any]:
        state: dict[str, Any] = await self.conn.fetchval("SELECT wo_state($1, $2)", wid, key)
        return state

    async def record(self, key: str, wid: str, args: tuple[Any, ...]) -> Any:
        try:
            return await self.conn.fetchval("SELECT wo_record($1, $2, $3, $4, $5, $6, $7, $8)", key, wid, *args)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            raise LedgerRejected(f"the ledger refused the decision: {exc}") from None

    async def note(self, wid: str, history: dict[str, Any]) -> None:
        try:
            await self.conn.execute("SELECT wo_note($1, $2)", wid, history)
        except (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError) as exc:
            log.warning("history note not kept", error=str(exc))

    async def leave(self, wid: str, done: list[int]) -> None:
        left = False
        try:
            # CALL: outside a transaction block, so wo_exit can commit before it unlocks.
            await self.conn.execute("CALL wo_exit($1, $2::bigint[])", wid, done)
            left = True
        finally:
            if not left:
                # The pool does not reset sessions (_keep_session): a connection that may still
                # hold the workflow's lock is closed, never handed to another one.
                self.conn.terminate()


class Session:
    """Ledger operations for one workflow while its lock is held."""

    def __init__(self, channel: _Channel, workflow_id: str, message_key: str, state: dict[str, Any],
                 replica: str = "") -> None:
        self.channel = channel
        self.replica = replica
        self.workflow_id = workflow_id
        self.message_key = message_key
        self.done: list[int] = []  # decisions whose effects completed; marked when the lock is released
        self.own: InboxRow | None = None
        self.pending: list[InboxRow] = []
        self.run: Run | None = None
        self._load(state)

    def _load(self, state: dict[str, Any]) -> None:
        """This message's inbox row, the workflow's unfinished decisions (in order), its run."""
        self.own, self.pending = None, []
        for r in state["rows"]:
            row = InboxRow(r["seq"], r["message_key"], r["outcome"], r["effects"], r["done"] or r["seq"] in self.done)
            if row.message_key == self.message_key:
                self.own = row
            if not row.done:
                self.pending.append(row)
        self.run = _run_from_json(state["run"]) if state["run"] else None

    async def refresh(self) -> None:
        self._load(await self.channel.state(self.workflow_id, self.message_key))

    async def record(self, decision: Decision, history: HistoryEntry | None = None) -> InboxRow:
        """Write the decision, the new run state, the timers and its history in one transaction."""
        effects = effects_of(decision)
        run = decision.run
        run_json = None if run is None else run_to_json(run)
        timers = [{"kind": t.kind, "token": t.token, "due_at": _ts(t.due_at)} for t in decision.timers]
        hist = None if history is None else history_json(history, self.replica)
        seq = await self.channel.record(self.message_key, decision.workflow_id,
                                        (decision.outcome, effects, run_json, decision.cancel_timers, timers, hist))
        return InboxRow(seq, self.message_key, decision.outcome, effects, effects is None)

    async def note(self, history: HistoryEntry) -> None:
        """Keep a history entry that comes with no decision (stale, duplicate); never fails the step."""
        await self.channel.note(self.workflow_id, history_json(history, self.replica))

    def mark_done(self, seq: int) -> None:
        self.done.append(seq)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def run_to_json(run: Run) -> dict[str, Any]:
    return {
        "current_step": run.current_step, "dispatch_id": run.dispatch_id, "attempt": run.attempt,
        "phase": run.phase, "workflow_start_time": _ts(run.workflow_start_time), "step_time": _ts(run.step_time),
        "dispatched_at": _ts(run.dispatched_at), "request": run.request, "deployment_repo": run.deployment_repo,
        "milestones": list(run.milestones), "paused": run.paused, "held_step": run.held_step, "result": run.result,
        "deadline": _ts(run.deadline), "heartbeat_timeout": run.heartbeat_timeout}


def history_json(entry: HistoryEntry, replica: str) -> dict[str, Any]:
    return {"replica": replica, "trigger": entry.trigger, "message_id": entry.message_id,
            "dispatch_id": entry.dispatch_id, "outcome": entry.outcome, "requested_by": entry.requested_by,
            "detail": entry.detail}


def _run_from_json(data: dict[str, Any]) -> Run:
    def ts(v: Any) -> datetime | None:
        return None if v is None else datetime.fromisoformat(v)

    return Run(
        workflow_id=data["workflow_id"], current_step=data["current_step"], dispatch_id=data["dispatch_id"],
        attempt=data["attempt"], phase=data["phase"], workflow_start_time=ts(data["workflow_start_time"]),
        step_time=ts(data["step_time"]), dispatched_at=ts(data["dispatched_at"]), request=data["request"] or {},
        deployment_repo=data.get("deployment_repo"), milestones=tuple(data.get("milestones") or ()),
        paused=bool(data.get("paused")), held_step=data.get("held_step"), result=data.get("result"),
        deadline=ts(data.get("deadline")), heartbeat_timeout=data.get("heartbeat_timeout"),
        heartbeat_at=ts(data.get("heartbeat_at")),
    )


class _WorkflowLock:
    """The in-process lock of one workflow and how many sessions hold or wait for it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Ledger:
    """The pool, the shared lane, migrations, per-workflow locks and timer claims."""

    def __init__(self, dsn: str, *, max_size: int = 40, observe: Callable[[int], None] | None = None,
                 replica: str = "") -> None:
        self.dsn = dsn
        self.replica = replica  # HOSTNAME, written into the history
        self.max_size = max_size
        self.pool: asyncpg.Pool | None = None
        # One lane, not several: measured with two, batches were half as big and the ledger's
        # Postgres CPU per step went up by half, with no better latency.
        self.lane = _Lane(dsn, observe)
        self._local_locks: dict[str, _WorkflowLock] = {}

    async def start(self, *, read_only: bool = False) -> None:
        """Connect; migrate (the service), or only check the schema version (read-only users)."""
        self.pool = await asyncpg.create_pool(self.dsn, min_size=1, max_size=self.max_size, init=_init_conn,
                                              reset=_keep_session, command_timeout=30)
        try:
            async with self.pool.acquire() as conn:
                if read_only:
                    await check_schema(conn)
                else:
                    await migrate(conn, MIGRATIONS, _MIGRATION_LOCK, VERSION_TABLE)
        except BaseException:
            await self.pool.close()
            self.pool = None
            raise

    async def close(self) -> None:
        await self.lane.close()
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    def _pool(self) -> asyncpg.Pool:
        if self.pool is None:
            raise RuntimeError("ledger is not started")
        return self.pool

    async def ping(self) -> None:
        async with self._pool().acquire(timeout=5) as conn:
            await conn.fetchval("SELECT 1")

    @asynccontextmanager
    async def session(self, workflow_id: str, message_key: str) -> AsyncIterator[Session]:
        """Hold the workflow's lock: in-process first (one step per workflow per process), then the
        Postgres advisory lock that excludes other replicas — tried on the shared lane, else waited
        for on a pooled connection. Entering loads the state; leaving marks completed effects done,
        commits, then unlocks."""
        local = self._local_locks.get(workflow_id)
        if local is None:
            local = self._local_locks[workflow_id] = _WorkflowLock()
        local.users += 1
        try:
            async with local.lock:
                entered = await self.lane.submit(_Op("enter", workflow_id, message_key))
                if entered is not None:
                    generation, state = entered
                    channel: _Channel = _LaneChannel(self.lane, generation)
                    async with _held(channel, Session(channel, workflow_id, message_key, state,
                                                      self.replica)) as session:
                        yield session
                    return
                async with self._pool().acquire() as conn:  # another replica holds it: wait on our own
                    state = await conn.fetchval("SELECT wo_enter($1, $2)", workflow_id, message_key)
                    channel = _OwnChannel(conn)
                    async with _held(channel, Session(channel, workflow_id, message_key, state,
                                                      self.replica)) as session:
                        yield session
        finally:
            # Counted, not `locked()`: a released lock whose waiter has not run yet looks free, and
            # dropping it then let a third delivery take a new lock and a pooled connection early.
            local.users -= 1
            if local.users == 0:
                self._local_locks.pop(workflow_id, None)

    # ---- timers --------------------------------------------------------------------------
    async def claim_due(self, limit: int, lease: timedelta) -> list[TimerRow]:
        """Claim due timers for `lease`; SKIP LOCKED so each is claimed by one replica."""
        rows = await self._pool().fetch(
            """
            UPDATE timers SET locked_until = now() + $2
             WHERE id IN (SELECT id FROM timers
                           WHERE due_at <= now() AND (locked_until IS NULL OR locked_until < now())
                           ORDER BY due_at LIMIT $1 FOR UPDATE SKIP LOCKED)
            RETURNING id, workflow_id, kind, token, due_at, payload
            """,
            limit, lease,
        )
        return [TimerRow(r["id"], r["workflow_id"], r["kind"], r["token"], r["due_at"], r["payload"]) for r in rows]

    async def add_timer(self, workflow_id: str, kind: str, token: str, due_at: datetime,
                        payload: dict[str, Any] | None = None) -> None:
        await self._pool().execute(
            "INSERT INTO timers (workflow_id, kind, token, due_at, payload) VALUES ($1, $2, $3, $4, $5)",
            workflow_id, kind, token, due_at, payload)

    async def delete_timer(self, timer_id: int) -> None:
        await self._pool().execute("DELETE FROM timers WHERE id = $1", timer_id)

    async def release_timer(self, timer_id: int, retry_at: datetime) -> None:
        await self._pool().execute("UPDATE timers SET locked_until = NULL, due_at = $2 WHERE id = $1",
                                   timer_id, retry_at)

    async def purge(self, older_than: timedelta) -> int:
        """Retention: forget finished decisions and finished runs older than `older_than`."""
        pool = self._pool()
        a = await pool.execute("DELETE FROM inbox WHERE done AND done_at < now() - $1::interval", older_than)
        b = await pool.execute("DELETE FROM runs WHERE phase = 'finished' AND updated_at < now() - $1::interval",
                               older_than)
        c = await pool.execute("DELETE FROM history WHERE at < now() - $1::interval", older_than)
        return int(a.split()[-1]) + int(b.split()[-1]) + int(c.split()[-1])

    # ---- outside a session ---------------------------------------------------------------
    async def heartbeat(self, workflow_id: str, dispatch_id: str, details: Any, message_id: str | None) -> str | None:
        """Record a worker's heartbeat (one round trip): None when current, else why it is stale."""
        why: str | None = await self._pool().fetchval("SELECT wo_heartbeat($1, $2, $3, $4, $5)", workflow_id,
                                                     dispatch_id, details, self.replica, message_id)
        return why

    async def note(self, workflow_id: str, history: HistoryEntry) -> None:
        """A history entry outside a step (a deferral, a dead letter); best effort."""
        try:
            await self._pool().execute("SELECT wo_note($1, $2)", workflow_id, history_json(history, self.replica))
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as exc:
            log.warning("history note not kept", error=f"{type(exc).__name__}: {exc}")

    # ---- observation ---------------------------------------------------------------------
    async def active_runs(self) -> list[dict[str, Any]]:
        rows = await self._pool().fetch(
            """
            SELECT r.workflow_id, r.current_step, r.attempt, r.phase, r.workflow_start_time, r.step_time,
                   r.dispatched_at, (SELECT min(due_at) FROM timers t WHERE t.workflow_id = r.workflow_id
                                      AND t.kind IN ('timeout', 'scheduled', 'retry')) AS next_timer
              FROM runs r WHERE r.phase <> 'finished' ORDER BY r.workflow_start_time NULLS LAST
            """)
        return [dict(r) for r in rows]

    async def count_active(self) -> int:
        return int(await self._pool().fetchval("SELECT count(*) FROM runs WHERE phase <> 'finished'"))


@asynccontextmanager
async def _held(channel: _Channel, session: Session) -> AsyncIterator[Session]:
    try:
        yield session
    finally:
        await channel.leave(session.workflow_id, session.done)
