"""Postgres storage of the sandbox Manager (asyncpg).

Reads build their JSON in SQL and return it as text, so a hot `GET /workflows/{id}` costs one
query and no Python-side decoding; each write is one statement or one transaction.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal
from urllib.parse import quote

import asyncpg

from workflow_orchestrator.sandbox.migrations import TABLES, Conn, check_schema_name, migrate
from workflow_orchestrator.sandbox.seed import Seed, SeedError


def _ts(column: str) -> str:
    return f"""to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""


_WORKFLOW_JSON = f"(data || jsonb_build_object('inserted_at', {_ts('inserted_at')}, " \
                 f"'updated_at', {_ts('updated_at')}))"
_EXCHANGE_JSON = "jsonb_build_object('id', id, 'name', name, 'routing_key', routing_key, " \
                 "'root_exchange_name', root_exchange_name, 'failover_exchange_id', failover_exchange_id)"
_BROKER_JSON = "jsonb_build_object('id', id, 'name', name, 'failover_broker_id', failover_broker_id)"
_CONNECTION_JSON = "jsonb_build_object('id', id, 'messaging_broker_id', messaging_broker_id, " \
                   "'username', username, 'password', password, 'host', host, 'port', port, " \
                   "'virtual_host', virtual_host)"
_EXCHANGE_BROKER_JSON = "jsonb_build_object('id', id, 'messaging_exchange_id', messaging_exchange_id, " \
                        "'messaging_broker_id', messaging_broker_id)"
_CLUSTER_JSON = "jsonb_build_object('id', id, 'etcd_token', etcd_token, 'name', name, " \
                "'messaging_exchange_id', messaging_exchange_id, 'allow_docker_builds', allow_docker_builds, " \
                "'hosting_provider_id', hosting_provider_id)"
_MODULE_JSON = "jsonb_build_object('id', id, 'messaging_exchange_id', messaging_exchange_id, " \
               "'hostname', hostname, 'type', type, 'status', status, 'workload', workload, " \
               f"'inserted_at', {_ts('inserted_at')}, 'updated_at', {_ts('updated_at')})"
_EVENT_JSON = "jsonb_build_object('id', id, 'type', type, 'severity', severity, 'message', message, " \
              f"'data', data, 'inserted_at', {_ts('inserted_at')})"


def _agg(obj: str, order: str) -> str:
    return f"coalesce(jsonb_agg({obj} ORDER BY {order}), '[]'::jsonb)::text"


def _dumps(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Skip asyncpg's per-release RESET ALL round trip: nothing here changes session state (no
    LISTEN, session locks or SET outside a transaction), and the reset doubled the queries."""


def sha256(text: str) -> str:
    # surrogatepass: header values may carry undecodable bytes as surrogates; hash, don't crash.
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


ExecuteRefusal = Literal["not_found", "completed", "started", "executed"]


class Store:
    """All queries of the sandbox; `await Store.open(...)`, then `await close()`."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    @classmethod
    async def open(cls, dsn: str, schema: str, seed: Seed, *, reset: bool = False,
                   pool_size: int = 10) -> Store:
        """Connect, migrate, optionally empty, and seed, all in one transaction under the lock."""
        schema = check_schema_name(schema)
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=pool_size, reset=_keep_session,
            server_settings={"search_path": f'"{schema}"', "application_name": "sandbox-manager"},
        )
        try:
            async with pool.acquire() as conn, conn.transaction():
                await migrate(conn, schema)
                if reset:
                    await conn.execute(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE")
                try:
                    await _apply_seed(conn, seed)
                except asyncpg.PostgresError as exc:
                    raise SeedError(f"the seed could not be applied: {exc}") from None
        except BaseException:
            await pool.close()
            raise
        return cls(pool)

    async def close(self) -> None:
        await self.pool.close()

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # ---- OAuth2 --------------------------------------------------------------------------
    async def client_secret_sha256(self, client_id: str) -> str | None:
        value = await self.pool.fetchval("SELECT secret_sha256 FROM clients WHERE client_id = $1", client_id)
        return None if value is None else str(value)

    async def insert_token(self, token_sha256: str, client_id: str, expires_at: datetime) -> None:
        # Expired tokens are dropped on the way, so the table stays small without a janitor.
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute("DELETE FROM tokens WHERE expires_at < now()")
            await conn.execute("INSERT INTO tokens (token_sha256, client_id, expires_at) VALUES ($1, $2, $3)",
                               token_sha256, client_id, expires_at)

    async def token_expiry(self, token_sha256: str) -> float | None:
        """Expiry (Unix time) of a stored token, or None."""
        value = await self.pool.fetchval(
            "SELECT extract(epoch FROM expires_at)::float8 FROM tokens WHERE token_sha256 = $1", token_sha256)
        return None if value is None else float(value)

    # ---- workflows -----------------------------------------------------------------------
    async def workflow_json(self, wid: uuid.UUID) -> str | None:
        value = await self.pool.fetchval(f"SELECT {_WORKFLOW_JSON}::text FROM workflows WHERE id = $1", wid)
        return None if value is None else str(value)

    async def workflows_json(self, since: datetime | None, deployment_repo: str | None,
                             source_repo: str | None) -> str:
        return str(await self.pool.fetchval(
            f"""SELECT {_agg(_WORKFLOW_JSON, 'inserted_at DESC, id')} FROM workflows
                WHERE ($1::timestamptz IS NULL OR inserted_at >= $1)
                  AND ($2::text IS NULL OR deployment_repo = $2)
                  AND ($3::text IS NULL OR source_repo = $3)""",
            since, deployment_repo, source_repo))

    async def create_workflow(self, record: dict[str, Any]) -> str | None:
        """Insert; the stored workflow JSON, or None when the id is taken."""
        value = await self.pool.fetchval(
            f"""INSERT INTO workflows (id, data, deployment_repo, source_repo) VALUES ($1, $2::jsonb, $3, $4)
                ON CONFLICT (id) DO NOTHING RETURNING {_WORKFLOW_JSON}::text""",
            uuid.UUID(record["id"]), _dumps(record), record["deployment_repo"], record["source_repo"])
        return None if value is None else str(value)

    async def update_workflow(self, wid: uuid.UUID, changes: dict[str, Any]) -> bool:
        """Merge `changes` into the record; False when there is no such workflow."""
        done = await self.pool.fetchval(
            """UPDATE workflows SET data = data || $2::jsonb,
                   deployment_repo = (data || $2::jsonb) ->> 'deployment_repo',
                   source_repo = (data || $2::jsonb) ->> 'source_repo',
                   updated_at = now()
               WHERE id = $1 RETURNING true""",
            wid, _dumps(changes))
        return bool(done)

    async def delete_workflow(self, wid: uuid.UUID) -> bool:
        return bool(await self.pool.fetchval("DELETE FROM workflows WHERE id = $1 RETURNING true", wid))

    async def execute_workflow(
        self, wid: uuid.UUID, options: dict[str, Any], publish: Callable[[dict[str, Any]], Awaitable[None]],
    ) -> ExecuteRefusal | None:
        """Mark the workflow executed and run `publish(record)` before committing, so a failed
        publish leaves the workflow as it was. None on success, else why it was refused."""
        async with self.pool.acquire() as conn, conn.transaction():
            # The row lock taken here serialises concurrent executes of one workflow: the second
            # re-checks the guard after the first commits and is refused.
            data = await conn.fetchval(
                """UPDATE workflows SET data = jsonb_set(data, '{execute_options}', $2::jsonb),
                       executed_at = now(), updated_at = now()
                   WHERE id = $1 AND executed_at IS NULL
                     AND coalesce(data ->> 'current_step', '') = ''
                     AND data -> 'workflow_completed' IS DISTINCT FROM 'true'::jsonb
                   RETURNING data::text""",
                wid, _dumps(options))
            if data is None:
                row = await conn.fetchrow(
                    """SELECT executed_at IS NOT NULL AS executed,
                              coalesce(data ->> 'current_step', '') <> '' AS started,
                              data -> 'workflow_completed' = 'true'::jsonb AS completed
                       FROM workflows WHERE id = $1""", wid)
                if row is None:
                    return "not_found"
                if row["completed"]:
                    return "completed"
                return "started" if row["started"] else "executed"
            await publish(json.loads(data))
        return None

    async def backdate_workflow(self, wid: uuid.UUID, inserted_at: datetime) -> None:
        """Test hook: pretend the workflow was created at `inserted_at`."""
        await self.pool.execute("UPDATE workflows SET inserted_at = $2 WHERE id = $1", wid, inserted_at)

    # ---- exchanges, brokers, clusters ----------------------------------------------------
    async def exchange_json(self, xid: int) -> str | None:
        value = await self.pool.fetchval(f"SELECT {_EXCHANGE_JSON}::text FROM exchanges WHERE id = $1", xid)
        return None if value is None else str(value)

    async def _children(self, parent: str, child_sql: str, *args: Any) -> str | None:
        # One round trip answers both "does the parent exist" (404) and the list itself.
        row = await self.pool.fetchrow(f"SELECT EXISTS ({parent}) AS found, ({child_sql}) AS items", *args)
        assert row is not None
        return str(row["items"]) if row["found"] else None

    async def exchange_brokers_json(self, xid: int) -> str | None:
        return await self._children(
            "SELECT 1 FROM exchanges WHERE id = $1",
            f"SELECT {_agg(_EXCHANGE_BROKER_JSON, 'id')} FROM exchange_brokers WHERE messaging_exchange_id = $1",
            xid)

    async def exchange_clusters_json(self, xid: int, allow_docker_builds: bool | None) -> str | None:
        return await self._children(
            "SELECT 1 FROM exchanges WHERE id = $1",
            f"""SELECT {_agg(_CLUSTER_JSON, 'id')} FROM clusters WHERE messaging_exchange_id = $1
                AND ($2::boolean IS NULL OR allow_docker_builds = $2)""",
            xid, allow_docker_builds)

    async def clusters_json(self, allow_docker_builds: bool | None) -> str:
        return str(await self.pool.fetchval(
            f"SELECT {_agg(_CLUSTER_JSON, 'id')} FROM clusters "
            "WHERE ($1::boolean IS NULL OR allow_docker_builds = $1)", allow_docker_builds))

    async def cluster_json(self, etcd_token: str) -> str | None:
        value = await self.pool.fetchval(f"SELECT {_CLUSTER_JSON}::text FROM clusters WHERE etcd_token = $1",
                                         etcd_token)
        return None if value is None else str(value)

    async def broker_json(self, bid: int) -> str | None:
        value = await self.pool.fetchval(f"SELECT {_BROKER_JSON}::text FROM brokers WHERE id = $1", bid)
        return None if value is None else str(value)

    async def broker_connections_json(self, bid: int) -> str | None:
        return await self._children(
            "SELECT 1 FROM brokers WHERE id = $1",
            f"SELECT {_agg(_CONNECTION_JSON, 'id')} FROM broker_connections WHERE messaging_broker_id = $1",
            bid)

    async def broker_url(self, xid: int, default_broker_id: int) -> str | None:
        """An AMQP URL for exchange `xid`: a connection of one of its restricted brokers, else of
        `default_broker_id`, picked at random (SPEC §4.2)."""
        row = await self.pool.fetchrow(
            """SELECT username, password, host, port, virtual_host FROM broker_connections
               WHERE messaging_broker_id = coalesce(
                   (SELECT messaging_broker_id FROM exchange_brokers WHERE messaging_exchange_id = $1
                    ORDER BY random() LIMIT 1), $2)
               ORDER BY random() LIMIT 1""", xid, default_broker_id)
        if row is None:
            return None
        scheme = "amqps" if row["port"] == 5671 else "amqp"
        return (f"{scheme}://{quote(row['username'], safe='')}:{quote(row['password'], safe='')}"
                f"@{row['host']}:{row['port']}/{quote(row['virtual_host'], safe='')}")

    # ---- modules -------------------------------------------------------------------------
    async def modules_json(self, xid: int) -> str | None:
        return await self._children(
            "SELECT 1 FROM exchanges WHERE id = $1",
            f"SELECT {_agg(_MODULE_JSON, 'hostname')} FROM modules WHERE messaging_exchange_id = $1", xid)

    async def module_json(self, xid: int, hostname: str) -> str | None:
        value = await self.pool.fetchval(
            f"SELECT {_MODULE_JSON}::text FROM modules WHERE messaging_exchange_id = $1 AND hostname = $2",
            xid, hostname)
        return None if value is None else str(value)

    async def upsert_module(self, xid: int, hostname: str, type_: str, status: str | None,
                            workload: Any) -> str | None:
        """Register (or refresh) a module; None when the exchange does not exist."""
        try:
            value = await self.pool.fetchval(
                f"""INSERT INTO modules (messaging_exchange_id, hostname, type, status, workload)
                    VALUES ($1, $2, $3, $4, $5::jsonb)
                    ON CONFLICT (messaging_exchange_id, hostname) DO UPDATE SET type = EXCLUDED.type,
                        status = EXCLUDED.status, workload = EXCLUDED.workload, updated_at = now()
                    RETURNING {_MODULE_JSON}::text""",
                xid, hostname, type_, status, _dumps(workload))
        except asyncpg.ForeignKeyViolationError:
            return None
        return str(value)

    async def delete_module(self, xid: int, hostname: str) -> bool:
        return bool(await self.pool.fetchval(
            "DELETE FROM modules WHERE messaging_exchange_id = $1 AND hostname = $2 RETURNING true",
            xid, hostname))

    # ---- system events -------------------------------------------------------------------
    async def create_system_event(self, type_: str, severity: str | None, message: str, data: Any,
                                  unique: bool) -> tuple[str, bool]:
        """Store an event; with `unique`, an event of the same type and data in the last hour is
        answered instead of storing a duplicate. Returns (event JSON, created)."""
        row = await self.pool.fetchrow(
            f"""WITH dup AS (
                    SELECT * FROM system_events
                    WHERE $5 AND type = $1 AND data IS NOT DISTINCT FROM $4::jsonb
                      AND inserted_at > now() - interval '1 hour'
                    ORDER BY id DESC LIMIT 1),
                ins AS (
                    INSERT INTO system_events (type, severity, message, data)
                    SELECT $1, $2, $3, $4::jsonb WHERE NOT EXISTS (SELECT 1 FROM dup)
                    RETURNING *)
                SELECT {_EVENT_JSON}::text AS event, true AS created FROM ins
                UNION ALL SELECT {_EVENT_JSON}::text, false FROM dup""",
            type_, severity, message, _dumps(data), unique)
        assert row is not None
        return str(row["event"]), bool(row["created"])

    async def system_events_json(self, since: datetime | None) -> str:
        return str(await self.pool.fetchval(
            f"SELECT {_agg(_EVENT_JSON, 'id DESC')} FROM system_events "
            "WHERE ($1::timestamptz IS NULL OR inserted_at >= $1)", since))


async def _apply_seed(conn: Conn, seed: Seed) -> None:
    """Upsert every seeded record by its key; records not in the seed are left alone."""
    await conn.executemany(
        """INSERT INTO clients (client_id, secret_sha256) VALUES ($1, $2)
           ON CONFLICT (client_id) DO UPDATE SET secret_sha256 = EXCLUDED.secret_sha256, updated_at = now()""",
        [(c.client_id, sha256(c.client_secret.get_secret_value())) for c in seed.clients])
    await conn.executemany(
        """INSERT INTO exchanges (id, name, routing_key, root_exchange_name, failover_exchange_id)
           VALUES ($1, $2, $3, $4, $5)
           ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, routing_key = EXCLUDED.routing_key,
               root_exchange_name = EXCLUDED.root_exchange_name,
               failover_exchange_id = EXCLUDED.failover_exchange_id""",
        [(x.id, x.name, x.routing_key, x.root_exchange_name, x.failover_exchange_id) for x in seed.exchanges])
    await conn.executemany(
        """INSERT INTO brokers (id, name, failover_broker_id) VALUES ($1, $2, $3)
           ON CONFLICT (id) DO UPDATE SET name = EXCLUDED.name, failover_broker_id = EXCLUDED.failover_broker_id""",
        [(b.id, b.name, b.failover_broker_id) for b in seed.brokers])
    await conn.executemany(
        """INSERT INTO broker_connections (id, messaging_broker_id, username, password, host, port, virtual_host)
           VALUES ($1, $2, $3, $4, $5, $6, $7)
           ON CONFLICT (id) DO UPDATE SET messaging_broker_id = EXCLUDED.messaging_broker_id,
               username = EXCLUDED.username, password = EXCLUDED.password, host = EXCLUDED.host,
               port = EXCLUDED.port, virtual_host = EXCLUDED.virtual_host""",
        [(c.id, c.broker_id, c.username, c.password.get_secret_value(), c.host, c.port, c.virtual_host)
         for c in seed.connections])
    await conn.executemany(
        """INSERT INTO exchange_brokers (id, messaging_exchange_id, messaging_broker_id) VALUES ($1, $2, $3)
           ON CONFLICT (id) DO UPDATE SET messaging_exchange_id = EXCLUDED.messaging_exchange_id,
               messaging_broker_id = EXCLUDED.messaging_broker_id""",
        [(r.id, r.messaging_exchange_id, r.messaging_broker_id) for r in seed.exchange_brokers])
    await conn.executemany(
        """INSERT INTO clusters (id, etcd_token, name, messaging_exchange_id, allow_docker_builds,
               hosting_provider_id) VALUES ($1, $2, $3, $4, $5, $6)
           ON CONFLICT (id) DO UPDATE SET etcd_token = EXCLUDED.etcd_token, name = EXCLUDED.name,
               messaging_exchange_id = EXCLUDED.messaging_exchange_id,
               allow_docker_builds = EXCLUDED.allow_docker_builds,
               hosting_provider_id = EXCLUDED.hosting_provider_id""",
        [(c.id, c.etcd_token, c.name, c.messaging_exchange_id, c.allow_docker_builds, c.hosting_provider_id)
         for c in seed.clusters])
    await conn.executemany(
        """INSERT INTO modules (messaging_exchange_id, hostname, type, status, workload)
           VALUES ($1, $2, $3, $4, $5::jsonb)
           ON CONFLICT (messaging_exchange_id, hostname) DO UPDATE SET type = EXCLUDED.type,
               status = EXCLUDED.status, workload = EXCLUDED.workload, updated_at = now()""",
        [(m.messaging_exchange_id, m.hostname, m.type, m.status, _dumps(m.workload)) for m in seed.modules])
