"""The sandbox Manager: a Manager-API-compatible HTTP server on Postgres (SPEC §8).

`await start_sandbox(SandboxSettings())` starts it inside the running event loop (tests, demo);
`await serve(settings)` is the `workflow-orchestrator sandbox-manager` command.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import asyncpg
import structlog
from aiohttp import web
from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from workflow_orchestrator.sandbox.auth import Tokens
from workflow_orchestrator.sandbox.migrations import MigrationError, check_schema_name
from workflow_orchestrator.sandbox.publisher import StartPublisher
from workflow_orchestrator.sandbox.routes import Api, RequestStats, auth_middleware, error_middleware
from workflow_orchestrator.sandbox.seed import Seed, SeedError, load_seed
from workflow_orchestrator.sandbox.store import Store
from workflow_orchestrator.settings import mask_url

log = structlog.get_logger(__name__)

DEFAULT_SEED_FILE = Path("config/sandbox.toml")
# Workflow records carry their event log and pass-through keys; messages may be 1 MiB (SPEC §6),
# so the record saved after one must fit too.
_MAX_BODY = 16 * 1024 * 1024


class SandboxSettings(BaseSettings):
    """Configuration of the sandbox Manager, from `SANDBOX_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="SANDBOX_", extra="forbid", case_sensitive=False)

    database_url: SecretStr = SecretStr("postgresql://postgres@127.0.0.1:5432/postgres")
    db_schema: str = "sandbox"
    host: str = "127.0.0.1"
    port: int = Field(default=4000, ge=0, le=65535, description="0 picks a free port")
    seed_file: Path = DEFAULT_SEED_FILE
    amqp_url: SecretStr | None = Field(
        default=None, description="broker for start messages; unset: the orchestrator exchange's "
                                  "broker connection from the seeded records")
    token_ttl_seconds: int = Field(default=3600, ge=1)
    reset: bool = Field(default=False, description="empty every table and re-seed at start")
    pool_size: int = Field(default=10, ge=1, le=200)
    publish_timeout_seconds: float = Field(default=10.0, gt=0)
    queue_type: Literal["classic", "quorum"] = "classic"
    delivery_limit: int = Field(default=20, ge=1)

    @field_validator("db_schema")
    @classmethod
    def _schema(cls, v: str) -> str:
        return check_schema_name(v)

    @field_validator("amqp_url", mode="before")
    @classmethod
    def _blank_is_unset(cls, v: object) -> object:
        # SANDBOX_AMQP_URL= (empty, as compose files write it) means: resolve from the records.
        return None if isinstance(v, str) and not v.strip() else v


@dataclass
class RunningSandbox:
    """A started sandbox Manager; `await stop()` when done."""

    url: str
    client_id: str
    client_secret: str
    settings: SandboxSettings
    seed: Seed
    store: Store
    _runner: web.AppRunner = field(repr=False)
    _publisher: StartPublisher = field(repr=False)

    @property
    def token_url(self) -> str:
        return f"{self.url}/oauth/token"

    @property
    def app(self) -> web.Application:
        return self._runner.app

    async def stop(self) -> None:
        """Stop serving, then close the broker connection and the database pool."""
        await self._runner.cleanup()
        await self._publisher.close()
        await self.store.close()


class SandboxStartError(Exception):
    """The sandbox cannot start (seed, database, port); the message is one readable line."""


async def start_sandbox(settings: SandboxSettings) -> RunningSandbox:
    """Migrate and seed the database, then serve on `settings.host:settings.port`.
    Raises SandboxStartError."""
    dsn = settings.database_url.get_secret_value()
    try:
        seed, _ = load_seed(settings.seed_file, fallback=settings.seed_file == DEFAULT_SEED_FILE)
        store = await Store.open(dsn, settings.db_schema, seed, reset=settings.reset,
                                 pool_size=settings.pool_size)
    except (SeedError, MigrationError) as exc:
        raise SandboxStartError(str(exc)) from None
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise SandboxStartError(f"cannot prepare the database {mask_url(dsn)}: "
                                f"{type(exc).__name__}: {mask_url(str(exc))}") from None
    try:
        # Broker records cannot change while running (only the seed writes them), so the
        # connection is resolved once; a connection is picked at random as the orchestrator does.
        amqp_url = settings.amqp_url.get_secret_value() if settings.amqp_url is not None else \
            await store.broker_url(seed.orchestrator_exchange_id, seed.orchestrator_broker_id)
        publisher = StartPublisher(amqp_url, timeout=settings.publish_timeout_seconds,
                                   queue_type=settings.queue_type, delivery_limit=settings.delivery_limit)
        stats = RequestStats()
        tokens = Tokens(store, settings.token_ttl_seconds)
        app = web.Application(client_max_size=_MAX_BODY,
                              middlewares=[stats.middleware, error_middleware, auth_middleware(tokens)])
        Api(store, tokens, publisher, seed, stats).install(app)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=5.0)
        await runner.setup()
        try:
            site = web.TCPSite(runner, settings.host, settings.port)
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise SandboxStartError(f"cannot listen on {settings.host}:{settings.port}: "
                                    f"{exc.strerror or exc}") from None
        except BaseException:
            await runner.cleanup()
            raise
    except BaseException:
        await store.close()
        raise
    host, port = runner.addresses[0][:2]
    if settings.host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"  # listening everywhere: the loopback URL works from this machine
    url = f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
    client = seed.clients[0]
    return RunningSandbox(url=url, client_id=client.client_id,
                          client_secret=client.client_secret.get_secret_value(), settings=settings,
                          seed=seed, store=store, _runner=runner, _publisher=publisher)


async def serve(settings: SandboxSettings) -> None:
    """Run until SIGTERM/SIGINT (or cancellation), then stop cleanly. Raises SandboxStartError."""
    sandbox = await start_sandbox(settings)
    log.info("sandbox.started", url=sandbox.url, client_id=sandbox.client_id,
             oauth_login_url=sandbox.token_url, schema=settings.db_schema,
             database=mask_url(settings.database_url.get_secret_value()))
    gc.collect()
    gc.freeze()  # start-up objects are long-lived: full GC passes over them stalled requests ~45 ms
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    installed = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # not on this platform / thread
            loop.add_signal_handler(sig, stop.set)
            installed.append(sig)
    try:
        await stop.wait()
        log.info("sandbox.stopping")
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)
        await sandbox.stop()
