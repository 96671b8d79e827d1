"""Real services for integration tests: URLs from the environment (TEST_AMQP_URL,
TEST_DATABASE_URL), defaulting to the local RabbitMQ and Postgres. A missing service fails
loudly with what to start; tests never skip."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

import asyncpg

AMQP_URL = os.environ.get("TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/")
DATABASE_URL = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

_HINTS = {
    "amqp": "start RabbitMQ: rabbitmq-server -detached (or set TEST_AMQP_URL)",
    "postgresql": "start Postgres: pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start"
    " (or set TEST_DATABASE_URL)",
}


def require(url: str) -> str:
    """Return url if its host:port answers, else fail with what to start."""
    parts = urlsplit(url)
    port = parts.port or (5672 if parts.scheme.startswith("amqp") else 5432)
    try:
        socket.create_connection((parts.hostname or "127.0.0.1", port), timeout=3).close()
    except OSError as exc:
        raise RuntimeError(f"{parts.scheme} service at {parts.hostname}:{port} is not reachable ({exc}); "
                           f"{_HINTS.get(parts.scheme.rstrip('s'), '')}") from exc
    return url


@asynccontextmanager
async def fresh_database(prefix: str = "wo_test") -> AsyncIterator[str]:
    """Create a uniquely named database, yield its URL, drop it afterwards."""
    admin_url = require(DATABASE_URL)
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()
