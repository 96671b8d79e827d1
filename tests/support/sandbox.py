"""A real sandbox Manager for tests: its own Postgres schema, a free port, and (by default) a
seed with random exchange names, so tests can run in parallel on one RabbitMQ and Postgres.

    async with running_sandbox() as sandbox:
        sandbox.url, sandbox.client_id, sandbox.client_secret, sandbox.seed.exchange(1).routing_key
"""

from __future__ import annotations

import contextlib
import tempfile
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg

from tests.support.services import AMQP_URL, DATABASE_URL, require
from workflow_orchestrator.sandbox.seed import Seed, connection_seed, dump_seed
from workflow_orchestrator.sandbox.server import RunningSandbox, SandboxSettings, start_sandbox

__all__ = ["RunningSandbox", "random_seed", "running_sandbox", "sandbox_schema", "write_seed"]


def random_seed(amqp_url: str = AMQP_URL, **changes: Any) -> dict[str, Any]:
    """The default seed's shape with names unique to this call: exchanges 1 (`east`) and 2
    (`west`) under one random root exchange, broker 1 reaching `amqp_url`, build cluster
    `build-<r>` in exchange 1, deploy clusters `deploy-east-<r>` (1) and `deploy-west-<r>` (2).
    `changes` replace top-level keys (e.g. `modules=[...]`, `exchange_brokers=[...]`)."""
    r = uuid.uuid4().hex[:8]
    seed: dict[str, Any] = {
        "orchestrator_exchange_id": 1,
        "orchestrator_broker_id": 1,
        "orchestration_queue_name": "workflow_orchestration",
        "clients": [{"client_id": f"client-{r}", "client_secret": f"secret-{uuid.uuid4().hex}"}],
        "exchanges": [
            {"id": 1, "name": "east", "routing_key": f"test.{r}.east", "root_exchange_name": f"test-{r}"},
            {"id": 2, "name": "west", "routing_key": f"test.{r}.west", "root_exchange_name": f"test-{r}"},
        ],
        "brokers": [{"id": 1, "name": "test-broker"}],
        "connections": [connection_seed(amqp_url)],
        "exchange_brokers": [],
        "clusters": [
            {"id": 1, "etcd_token": f"build-{r}", "messaging_exchange_id": 1, "allow_docker_builds": True},
            {"id": 2, "etcd_token": f"deploy-east-{r}", "messaging_exchange_id": 1, "allow_docker_builds": False},
            {"id": 3, "etcd_token": f"deploy-west-{r}", "messaging_exchange_id": 2, "allow_docker_builds": False},
        ],
        "modules": [],
    }
    seed.update(changes)
    return seed


def write_seed(path: Path, seed: dict[str, Any]) -> Path:
    """Write `seed` (as from `random_seed`) as a TOML seed file; None values are left out."""
    path.write_text(dump_seed(seed), encoding="utf-8")
    return path


@asynccontextmanager
async def sandbox_schema() -> AsyncIterator[str]:
    """A fresh schema name, dropped afterwards: for tests that start several sandboxes on one
    database (restarts, replicas) via `running_sandbox(db_schema=...)`."""
    name = f"sandbox_test_{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        conn = await asyncpg.connect(DATABASE_URL)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
        finally:
            await conn.close()


@asynccontextmanager
async def running_sandbox(amqp_url: str | None = None, seed_file: Path | None = None,
                          **overrides: Any) -> AsyncIterator[RunningSandbox]:
    """Start a sandbox Manager on a free port in a schema of its own; stop and clean up after.

    amqp_url: broker for start messages; None: TEST_AMQP_URL; "": resolved from the seed's
        broker connections, as in production.
    seed_file: None writes `random_seed()` to a temporary file (random exchange names; their
        queues and exchange are deleted afterwards); otherwise that file is used as it is.
    overrides: any other SandboxSettings field (token_ttl_seconds=1, reset=True, db_schema=...).
        With db_schema given, the schema is the caller's (see `sandbox_schema`) and is kept.
    """
    require(DATABASE_URL)
    settings: dict[str, Any] = {
        "database_url": DATABASE_URL, "port": 0, "host": "127.0.0.1",
        "amqp_url": require(AMQP_URL) if amqp_url is None else amqp_url,
    }
    settings.update(overrides)
    async with contextlib.AsyncExitStack() as stack:
        if "db_schema" not in overrides:
            settings["db_schema"] = await stack.enter_async_context(sandbox_schema())
        generated = seed_file is None
        if seed_file is None:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sandbox-seed-")))
            seed_file = write_seed(tmp / "sandbox.toml", random_seed())
        sandbox = await start_sandbox(SandboxSettings(seed_file=seed_file, **settings))
        try:
            yield sandbox
        finally:
            await sandbox.stop()
            if generated:
                await _delete_topology(sandbox.seed)


async def _delete_topology(seed: Seed) -> None:
    """Remove the orchestration queues and exchange a test's random seed may have created."""
    if not seed.exchanges:
        return
    try:
        connection = await aio_pika.connect(AMQP_URL, timeout=5)
    except (OSError, aio_pika.exceptions.AMQPException):
        return
    try:
        channel = await connection.channel()
        for x in seed.exchanges:
            name = f"{x.routing_key}.{seed.orchestration_queue_name}" if x.routing_key \
                else seed.orchestration_queue_name
            for queue in (name, f"{name}_error"):
                await channel.queue_delete(queue)
        for root in {x.root_exchange_name for x in seed.exchanges}:
            await channel.exchange_delete(root)
    finally:
        await connection.close()
