"""The ledger (SPEC §6): inbox of decisions and their effects, run state, durable timers, locks.

Postgres through asyncpg. Migrations are versioned and applied under an advisory lock.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from workflow_orchestrator.domain.models import Decision, Run

Conn = asyncpg.Connection | asyncpg.pool.PoolConnectionProxy
_MIGRATION_LOCK = 0x574F_4C45_4447  # "WOLEDG": serialises migrations of concurrent replicas

MIGRATIONS: list[str] = [
    # 1: inbox of decisions and their effects, run state, timers; and the three statements of the
    # hot path, so a step costs three round trips (it took ~12 as separate statements):
    # wo_enter (lock + state), wo_record (inbox + run + timers), CALL wo_exit (done marks + unlock).
    """
    CREATE TABLE runs (
        workflow_id text PRIMARY KEY,
        current_step text,
        dispatch_id text,
        attempt integer NOT NULL DEFAULT 1,
        phase text NOT NULL,
        workflow_start_time timestamptz,
        step_time timestamptz,
        dispatched_at timestamptz,
        request jsonb NOT NULL DEFAULT '{}',
        created_at timestamptz NOT NULL DEFAULT now(),
        updated_at timestamptz NOT NULL DEFAULT now()
    );
    CREATE INDEX runs_active ON runs (updated_at) WHERE phase <> 'finished';
    CREATE TABLE inbox (
        seq bigserial PRIMARY KEY,
        message_key text NOT NULL UNIQUE,
        workflow_id text NOT NULL,
        outcome text NOT NULL,
        effects json,  -- written once, read only to resume: json spares Postgres the jsonb conversion
        done boolean NOT NULL DEFAULT false,
        created_at timestamptz NOT NULL DEFAULT now(),
        done_at timestamptz
    );
    CREATE INDEX inbox_pending ON inbox (workflow_id, seq) WHERE NOT done;
    CREATE INDEX inbox_done_at ON inbox (done_at) WHERE done;
    CREATE TABLE timers (
        id bigserial PRIMARY KEY,
        workflow_id text NOT NULL,
        kind text NOT NULL,
        token text NOT NULL,
        due_at timestamptz NOT NULL,
        payload jsonb,
        locked_until timestamptz
    );
    CREATE INDEX timers_due ON timers (due_at);
    CREATE INDEX timers_workflow ON timers (workflow_id);
    CREATE FUNCTION wo_state(p_wid text, p_key text) RETURNS jsonb LANGUAGE sql STABLE AS $f$
        SELECT jsonb_build_object(
            'rows', coalesce((SELECT jsonb_agg(jsonb_build_object('seq', i.seq, 'message_key', i.message_key,
                                  'outcome', i.outcome, 'effects', i.effects, 'done', i.done) ORDER BY i.seq)
                              FROM inbox i WHERE i.message_key = p_key OR (i.workflow_id = p_wid AND NOT i.done)),
                             '[]'::jsonb),
            'run', (SELECT to_jsonb(r) FROM runs r WHERE r.workflow_id = p_wid))
    $f$;
    CREATE FUNCTION wo_enter(p_wid text, p_key text) RETURNS jsonb LANGUAGE plpgsql AS $f$
    BEGIN
        PERFORM pg_advisory_lock(hashtextextended(p_wid, 0));
        RETURN wo_state(p_wid, p_key);
    END
    $f$;
    -- A procedure, CALLed outside a transaction block, so the done marks are committed BEFORE the
    -- unlock: the next holder (waiting in wo_enter) must not take its snapshot before that commit,
    -- or it would see the effects as unfinished and carry them out again.
    CREATE PROCEDURE wo_exit(p_wid text, p_done bigint[]) LANGUAGE plpgsql AS $f$
    BEGIN
        IF cardinality(p_done) > 0 THEN
            UPDATE inbox SET done = true, done_at = now(), effects = NULL WHERE seq = ANY(p_done);
        END IF;
        COMMIT;
        PERFORM pg_advisory_unlock(hashtextextended(p_wid, 0));
    END
    $f$;
    CREATE FUNCTION wo_record(p_key text, p_wid text, p_outcome text, p_effects json, p_run jsonb,
                              p_cancel_timers boolean, p_timers jsonb) RETURNS bigint LANGUAGE plpgsql AS $f$
    DECLARE v_seq bigint;
    BEGIN
        INSERT INTO inbox (message_key, workflow_id, outcome, effects, done, done_at)
        VALUES (p_key, p_wid, p_outcome, p_effects, p_effects IS NULL, CASE WHEN p_effects IS NULL THEN now() END)
        RETURNING seq INTO v_seq;
        IF p_run IS NOT NULL THEN
            INSERT INTO runs (workflow_id, current_step, dispatch_id, attempt, phase, workflow_start_time,
                              step_time, dispatched_at, request)
            SELECT p_wid, r.current_step, r.dispatch_id, r.attempt, r.phase, r.workflow_start_time, r.step_time,
                   r.dispatched_at, coalesce(r.request, '{}'::jsonb)
              FROM jsonb_to_record(p_run) AS r(current_step text, dispatch_id text, attempt integer, phase text,
                   workflow_start_time timestamptz, step_time timestamptz, dispatched_at timestamptz, request jsonb)
            ON CONFLICT (workflow_id) DO UPDATE SET current_step = EXCLUDED.current_step,
                dispatch_id = EXCLUDED.dispatch_id, attempt = EXCLUDED.attempt, phase = EXCLUDED.phase,
                workflow_start_time = EXCLUDED.workflow_start_time, step_time = EXCLUDED.step_time,
                dispatched_at = EXCLUDED.dispatched_at, request = EXCLUDED.request, updated_at = now();
        END IF;
        IF p_cancel_timers THEN
            DELETE FROM timers WHERE workflow_id = p_wid AND kind IN ('scheduled', 'timeout', 'retry');
        END IF;
        IF jsonb_array_length(p_timers) > 0 THEN
            INSERT INTO timers (workflow_id, kind, token, due_at)
            SELECT p_wid, t.kind, t.token, t.due_at
              FROM jsonb_to_recordset(p_timers) AS t(kind text, token text, due_at timestamptz);
        END IF;
        RETURN v_seq;
    END
    $f$;
    """,
]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


async def _init_conn(conn: asyncpg.Connection) -> None:
    for name in ("jsonb", "json"):
        await conn.set_type_codec(name, encoder=_dumps, decoder=json.loads, schema="pg_catalog")


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Release without asyncpg's reset query, a round trip per step (asyncpg still rolls back an open
    transaction): the ledger sets no session state, and `Ledger.session` releases its advisory lock
    or closes the connection."""


async def migrate(conn: Conn, migrations: list[str], lock_key: int, table: str) -> int:
    """Apply pending migrations in one transaction under an advisory lock; returns the version."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key)
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {table} (version integer PRIMARY KEY, "
                           "applied_at timestamptz NOT NULL DEFAULT now())")
        current = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}")
        for version, sql in enumerate(migrations, start=1):
            if version > current:
                await conn.execute(sql)
                await conn.execute(f"INSERT INTO {table} (version) VALUES ($1)", version)
        return len(migrations)


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


class Session:
    """Ledger operations for one workflow while its lock is held (one pooled connection)."""

    def __init__(self, conn: Conn, workflow_id: str, message_key: str, state: dict[str, Any]) -> None:
        self.conn = conn
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
        self._load(await self.conn.fetchval("SELECT wo_state($1, $2)", self.workflow_id, self.message_key))

    async def record(self, decision: Decision) -> InboxRow:
        """Write the decision, the new run state and the timers in one transaction (one statement)."""
        effects = effects_of(decision)
        run = decision.run
        run_json = None if run is None else {
            "current_step": run.current_step, "dispatch_id": run.dispatch_id, "attempt": run.attempt,
            "phase": run.phase, "workflow_start_time": _ts(run.workflow_start_time), "step_time": _ts(run.step_time),
            "dispatched_at": _ts(run.dispatched_at), "request": run.request}
        timers = [{"kind": t.kind, "token": t.token, "due_at": _ts(t.due_at)} for t in decision.timers]
        seq = await self.conn.fetchval("SELECT wo_record($1, $2, $3, $4, $5, $6, $7)", self.message_key,
                                       decision.workflow_id, decision.outcome, effects, run_json,
                                       decision.cancel_timers, timers)
        return InboxRow(seq, self.message_key, decision.outcome, effects, effects is None)

    def mark_done(self, seq: int) -> None:
        self.done.append(seq)

    async def delete_timer(self, timer_id: int) -> None:
        await self.conn.execute("DELETE FROM timers WHERE id = $1", timer_id)


def _ts(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def _run_from_json(data: dict[str, Any]) -> Run:
    def ts(v: Any) -> datetime | None:
        return None if v is None else datetime.fromisoformat(v)

    return Run(
        workflow_id=data["workflow_id"], current_step=data["current_step"], dispatch_id=data["dispatch_id"],
        attempt=data["attempt"], phase=data["phase"], workflow_start_time=ts(data["workflow_start_time"]),
        step_time=ts(data["step_time"]), dispatched_at=ts(data["dispatched_at"]), request=data["request"] or {},
    )


class _WorkflowLock:
    """The in-process lock of one workflow and how many sessions hold or wait for it."""

    def __init__(self) -> None:
        self.lock = asyncio.Lock()
        self.users = 0


class Ledger:
    """The pool, migrations, per-workflow locks and timer claims."""

    def __init__(self, dsn: str, *, max_size: int = 40) -> None:
        self.dsn = dsn
        self.max_size = max_size
        self.pool: asyncpg.Pool | None = None
        self._local_locks: dict[str, _WorkflowLock] = {}

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=2, max_size=self.max_size, init=_init_conn,
                                              reset=_keep_session, command_timeout=30)
        async with self.pool.acquire() as conn:
            await migrate(conn, MIGRATIONS, _MIGRATION_LOCK, "ledger_schema_version")

    async def close(self) -> None:
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
        """Hold the workflow's lock: in-process first (no pooled connection waits on it), then the
        Postgres advisory lock that excludes other replicas. Entering loads the state; leaving
        marks completed effects done and unlocks, each in one round trip."""
        local = self._local_locks.get(workflow_id)
        if local is None:
            local = self._local_locks[workflow_id] = _WorkflowLock()
        local.users += 1
        try:
            async with local.lock, self._pool().acquire() as conn:
                state = await conn.fetchval("SELECT wo_enter($1, $2)", workflow_id, message_key)
                session = Session(conn, workflow_id, message_key, state)
                left = False
                try:
                    yield session
                finally:
                    try:
                        # CALL: outside a transaction block, so wo_exit can commit before it unlocks.
                        await conn.execute("CALL wo_exit($1, $2::bigint[])", workflow_id, session.done)
                        left = True
                    finally:
                        if not left:
                            # The pool does not reset sessions (_keep_session): a connection that may
                            # still hold the workflow's lock is closed, never handed to another one.
                            conn.terminate()
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
        return int(a.split()[-1]) + int(b.split()[-1])

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
