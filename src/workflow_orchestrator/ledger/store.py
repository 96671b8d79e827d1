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
    # 1: inbox, runs, timers
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
        effects jsonb,
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
    """,
]


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), default=str)


async def _init_conn(conn: asyncpg.Connection) -> None:
    await conn.set_type_codec("jsonb", encoder=_dumps, decoder=json.loads, schema="pg_catalog")


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

    def __init__(self, conn: Conn, workflow_id: str) -> None:
        self.conn = conn
        self.workflow_id = workflow_id

    async def state(self, message_key: str) -> tuple[InboxRow | None, list[InboxRow], Run | None]:
        """The inbox row of this message, the workflow's unfinished decisions, and its run."""
        rows = await self.conn.fetch(
            """
            SELECT 'inbox' AS src, seq, message_key, outcome, effects, done, NULL::jsonb AS run
              FROM inbox WHERE message_key = $1 OR (workflow_id = $2 AND NOT done)
            UNION ALL
            SELECT 'run', NULL, NULL, NULL, NULL, NULL, to_jsonb(r) FROM runs r WHERE workflow_id = $2
            """,
            message_key, self.workflow_id,
        )
        own: InboxRow | None = None
        pending: list[InboxRow] = []
        run: Run | None = None
        for r in rows:
            if r["src"] == "run":
                run = _run_from_json(r["run"])
                continue
            row = InboxRow(r["seq"], r["message_key"], r["outcome"], r["effects"], r["done"])
            if row.message_key == message_key:
                own = row
            if not row.done:
                pending.append(row)
        pending.sort(key=lambda x: x.seq)
        return own, pending, run

    async def record(self, message_key: str, decision: Decision) -> InboxRow:
        """Write the decision, the new run state and the timers in one transaction."""
        effects = effects_of(decision)
        async with self.conn.transaction():
            seq = await self.conn.fetchval(
                "INSERT INTO inbox (message_key, workflow_id, outcome, effects, done, done_at) "
                "VALUES ($1, $2, $3, $4, $5, CASE WHEN $5 THEN now() END) RETURNING seq",
                message_key, decision.workflow_id, decision.outcome, effects, effects is None,
            )
            run = decision.run
            if run is not None:
                await self.conn.execute(
                    """
                    INSERT INTO runs (workflow_id, current_step, dispatch_id, attempt, phase,
                                      workflow_start_time, step_time, dispatched_at, request)
                    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)
                    ON CONFLICT (workflow_id) DO UPDATE SET current_step = $2, dispatch_id = $3, attempt = $4,
                        phase = $5, workflow_start_time = $6, step_time = $7, dispatched_at = $8,
                        request = $9, updated_at = now()
                    """,
                    run.workflow_id, run.current_step, run.dispatch_id, run.attempt, run.phase,
                    run.workflow_start_time, run.step_time, run.dispatched_at, run.request,
                )
            if decision.cancel_timers:
                await self.conn.execute(
                    "DELETE FROM timers WHERE workflow_id = $1 AND kind IN ('scheduled', 'timeout', 'retry')",
                    decision.workflow_id)
            if decision.timers:
                await self.conn.executemany(
                    "INSERT INTO timers (workflow_id, kind, token, due_at) VALUES ($1, $2, $3, $4)",
                    [(decision.workflow_id, t.kind, t.token, t.due_at) for t in decision.timers],
                )
        return InboxRow(seq, message_key, decision.outcome, effects, effects is None)

    async def mark_done(self, seq: int) -> None:
        await self.conn.execute("UPDATE inbox SET done = true, done_at = now(), effects = NULL WHERE seq = $1", seq)

    async def delete_timer(self, timer_id: int) -> None:
        await self.conn.execute("DELETE FROM timers WHERE id = $1", timer_id)


def _run_from_json(data: dict[str, Any]) -> Run:
    def ts(v: Any) -> datetime | None:
        return None if v is None else datetime.fromisoformat(v)

    return Run(
        workflow_id=data["workflow_id"], current_step=data["current_step"], dispatch_id=data["dispatch_id"],
        attempt=data["attempt"], phase=data["phase"], workflow_start_time=ts(data["workflow_start_time"]),
        step_time=ts(data["step_time"]), dispatched_at=ts(data["dispatched_at"]), request=data["request"] or {},
    )


class Ledger:
    """The pool, migrations, per-workflow locks and timer claims."""

    def __init__(self, dsn: str, *, max_size: int = 40) -> None:
        self.dsn = dsn
        self.max_size = max_size
        self.pool: asyncpg.Pool | None = None
        self._local_locks: dict[str, asyncio.Lock] = {}

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self.dsn, min_size=2, max_size=self.max_size, init=_init_conn,
                                              command_timeout=30)
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
    async def session(self, workflow_id: str) -> AsyncIterator[Session]:
        """Hold the workflow's lock: in-process first (no pooled connection waits on it), then the
        Postgres advisory lock that excludes other replicas."""
        local = self._local_locks.setdefault(workflow_id, asyncio.Lock())
        try:
            async with local, self._pool().acquire() as conn:
                key = await conn.fetchval("SELECT hashtextextended($1, 0)", workflow_id)
                await conn.execute("SELECT pg_advisory_lock($1)", key)
                try:
                    yield Session(conn, workflow_id)
                finally:
                    await conn.execute("SELECT pg_advisory_unlock($1)", key)
        finally:
            if not local.locked() and self._local_locks.get(workflow_id) is local:
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
