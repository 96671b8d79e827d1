"""Versioned schema migrations of the sandbox Manager, applied at start-up.

All of them run in one transaction that first takes a transaction-level advisory lock keyed by
the schema name, so replicas starting together apply each migration exactly once: the second one
waits, then finds the versions recorded and has nothing to do.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeAlias

import asyncpg

if TYPE_CHECKING:
    from asyncpg.pool import PoolConnectionProxy

# asyncpg classes are generic only in the stubs.
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"
_SCHEMA_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial", """
        CREATE TABLE clients (
            client_id text PRIMARY KEY,
            secret_sha256 text NOT NULL,
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        -- Tokens are stored as their SHA-256, so a database dump does not hand out credentials.
        CREATE TABLE tokens (
            token_sha256 text PRIMARY KEY,
            client_id text NOT NULL,
            expires_at timestamptz NOT NULL,
            inserted_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX tokens_expires_at ON tokens (expires_at);

        CREATE TABLE exchanges (
            id bigint PRIMARY KEY,
            name text NOT NULL,
            routing_key text NOT NULL DEFAULT '',
            root_exchange_name text NOT NULL,
            failover_exchange_id bigint
        );
        CREATE TABLE brokers (
            id bigint PRIMARY KEY,
            name text NOT NULL,
            failover_broker_id bigint
        );
        CREATE TABLE broker_connections (
            id bigint PRIMARY KEY,
            messaging_broker_id bigint NOT NULL REFERENCES brokers (id) ON DELETE CASCADE,
            username text NOT NULL,
            password text NOT NULL,
            host text NOT NULL,
            port integer NOT NULL,
            virtual_host text NOT NULL
        );
        CREATE INDEX broker_connections_broker ON broker_connections (messaging_broker_id);
        CREATE TABLE exchange_brokers (
            id bigint PRIMARY KEY,
            messaging_exchange_id bigint NOT NULL REFERENCES exchanges (id) ON DELETE CASCADE,
            messaging_broker_id bigint NOT NULL REFERENCES brokers (id) ON DELETE CASCADE
        );
        CREATE INDEX exchange_brokers_exchange ON exchange_brokers (messaging_exchange_id);
        CREATE TABLE clusters (
            id bigint PRIMARY KEY,
            etcd_token text NOT NULL UNIQUE,
            name text,
            messaging_exchange_id bigint REFERENCES exchanges (id) ON DELETE SET NULL,
            allow_docker_builds boolean NOT NULL DEFAULT false,
            hosting_provider_id bigint
        );
        CREATE INDEX clusters_exchange ON clusters (messaging_exchange_id);
        CREATE TABLE modules (
            id bigserial PRIMARY KEY,
            messaging_exchange_id bigint NOT NULL REFERENCES exchanges (id) ON DELETE CASCADE,
            hostname text NOT NULL,
            type text NOT NULL,
            status text,
            workload jsonb,
            inserted_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now(),
            UNIQUE (messaging_exchange_id, hostname)
        );

        -- The record is the JSON document; the columns beside it exist for the list filters and
        -- the execute guard, and are kept in step by the statements that write `data`.
        CREATE TABLE workflows (
            id uuid PRIMARY KEY,
            data jsonb NOT NULL,
            deployment_repo text NOT NULL,
            source_repo text,
            executed_at timestamptz,
            inserted_at timestamptz NOT NULL DEFAULT now(),
            updated_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX workflows_inserted_at ON workflows (inserted_at);
        CREATE INDEX workflows_deployment_repo ON workflows (deployment_repo, inserted_at);
        CREATE INDEX workflows_source_repo ON workflows (source_repo, inserted_at);

        CREATE TABLE system_events (
            id bigserial PRIMARY KEY,
            type text NOT NULL,
            severity text,
            message text NOT NULL,
            data jsonb,
            inserted_at timestamptz NOT NULL DEFAULT now()
        );
        CREATE INDEX system_events_inserted_at ON system_events (inserted_at);
        CREATE INDEX system_events_type ON system_events (type, inserted_at);
    """),
)

# Everything a reset empties; schema_migrations stays.
TABLES = ("tokens", "clients", "modules", "clusters", "exchange_brokers", "broker_connections",
          "brokers", "exchanges", "workflows", "system_events")


class MigrationError(Exception):
    """The database is in a state this version cannot work with."""


def check_schema_name(name: str) -> str:
    """Return `name` if it is a plain lower-case SQL identifier, else raise ValueError."""
    if not _SCHEMA_NAME.match(name):
        raise ValueError("must be a lower-case SQL identifier: letters, digits and _, at most 63 characters")
    return name


def lock_key(schema: str) -> int:
    """A stable signed 64-bit advisory-lock key for this schema's migrations."""
    digest = hashlib.sha256(f"workflow_orchestrator.sandbox:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def migrate(conn: Conn, schema: str) -> list[int]:
    """Create the schema and apply missing migrations; call inside a transaction. Returns the
    versions applied now. The caller may do more (seeding) in the same transaction, under the lock."""
    schema = check_schema_name(schema)
    await conn.execute("SELECT pg_advisory_xact_lock($1)", lock_key(schema))
    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    await conn.execute(f'SET LOCAL search_path TO "{schema}"')
    await conn.execute("""
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version integer PRIMARY KEY,
            name text NOT NULL,
            applied_at timestamptz NOT NULL DEFAULT now()
        )""")
    done = {int(r["version"]) for r in await conn.fetch("SELECT version FROM schema_migrations")}
    known = {m.version for m in MIGRATIONS}
    if unknown := sorted(done - known):
        raise MigrationError(
            f"schema {schema!r} has migrations {unknown} that this version does not know; "
            "it was written by a newer sandbox Manager")
    applied = []
    for m in sorted(MIGRATIONS, key=lambda m: m.version):
        if m.version in done:
            continue
        await conn.execute(m.sql)
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", m.version, m.name)
        applied.append(m.version)
    return applied
