"""The processes under test — the sandbox Manager, the orchestrator and the bare relay — on a fresh
ledger database, a fresh sandbox schema and random AMQP names; their CPU and memory from /proc."""

from __future__ import annotations

import asyncio
import contextlib
import os
import platform
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import aio_pika
import asyncpg
import httpx
from aio_pika.abc import AbstractRobustConnection

from workflow_orchestrator.manager.client import ManagerClient
from workflow_orchestrator.messaging.topology import error_queue_name, queue_arguments
from workflow_orchestrator.sandbox.seed import connection_seed, dump_seed

BENCH_DIR = Path(__file__).resolve().parent
CLK_TCK = os.sysconf("SC_CLK_TCK")

# Logical queues. The orchestrator's are the product's; the relay's are its own, on the same
# exchange and broker, so one set of echo workers serves both.
ORCHESTRATION = "workflow_orchestration"
BUILDER, DEPLOYER = "builder", "deployer"
CHAT, EMAIL = "notifications_hipchat", "notifications_email"
RELAY_IN, RELAY_BUILDER, RELAY_DEPLOYER, RELAY_DONE = "relay_orchestration", "relay_builder", "relay_deployer", \
    "relay_done"
ALL_QUEUES = (ORCHESTRATION, BUILDER, DEPLOYER, CHAT, EMAIL, RELAY_IN, RELAY_BUILDER, RELAY_DEPLOYER, RELAY_DONE)


class BenchError(Exception):
    """The benchmark cannot go on; the message says why (and where the logs are)."""


@dataclass(frozen=True)
class Names:
    """Everything random in one run, so runs never see each other's queues or records."""

    r: str
    root: str
    routing_key: str
    client_id: str
    client_secret: str
    build_token: str
    deploy_token: str
    schema: str
    ledger_db: str
    orchestrator_host: str

    @classmethod
    def random(cls) -> Names:
        r = uuid.uuid4().hex[:8]
        return cls(r=r, root=f"bench-{r}", routing_key=f"bench.{r}.east", client_id=f"bench-{r}",
                   client_secret=uuid.uuid4().hex, build_token=f"build-{r}", deploy_token=f"deploy-{r}",
                   schema=f"bench_sandbox_{r}", ledger_db=f"bench_ledger_{r}", orchestrator_host=f"bench-orch-{r}")

    def queue(self, logical: str) -> str:
        return f"{self.routing_key}.{logical}"


def seed_toml(n: Names, amqp_url: str) -> str:
    """One exchange, one broker, a build and a deploy cluster, a builder and a deployer module."""
    return dump_seed({
        "orchestrator_exchange_id": 1, "orchestrator_broker_id": 1, "orchestration_queue_name": ORCHESTRATION,
        "clients": [{"client_id": n.client_id, "client_secret": n.client_secret}],
        "exchanges": [{"id": 1, "name": "east", "routing_key": n.routing_key, "root_exchange_name": n.root}],
        "brokers": [{"id": 1, "name": "local"}],
        "connections": [connection_seed(amqp_url)],
        "clusters": [
            {"id": 1, "etcd_token": n.build_token, "messaging_exchange_id": 1, "allow_docker_builds": True},
            {"id": 2, "etcd_token": n.deploy_token, "messaging_exchange_id": 1},
        ],
        "modules": [{"messaging_exchange_id": 1, "hostname": f"bench-{kind}-{n.r}", "type": kind}
                    for kind in ("builder", "deployer")],
    })


# ---- /proc -------------------------------------------------------------------------------
def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def peak_rss_mib(pid: int) -> float:
    """High-water mark of the resident set (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmHWM for pid {pid}")


def machine_busy_seconds() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine, all cores, since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    total = sum(values[:8])  # user..steal; guest time is already inside user
    return (total - idle) / CLK_TCK, total / CLK_TCK


RABBITMQ = frozenset({"beam.smp", "epmd", "erl_child_setup", "inet_gethost"})
POSTGRES = frozenset({"postgres"})


def services_cpu(commands: frozenset[str]) -> dict[int, float]:
    """CPU seconds so far of the processes with these command names (RabbitMQ's, Postgres's), by pid."""
    out: dict[int, float] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # gone meanwhile
            continue
        comm = stat[stat.find("(") + 1:stat.rfind(")")]
        if comm in commands:
            fields = stat[stat.rfind(")") + 2:].split()
            out[int(entry.name)] = (int(fields[11]) + int(fields[12])) / CLK_TCK
    return out


def cpu_delta(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU used between two snapshots by the processes of the second (new ones entirely)."""
    return sum(cpu - before.get(pid, 0.0) for pid, cpu in after.items())


async def wait_idle(max_cores: float, timeout: float, report: Callable[[str], None]) -> float:
    """Wait until the machine is nearly idle (other sessions' builds or tests would skew every
    figure): busy < `max_cores` over one second. Returns the last load seen; after `timeout`
    the caller goes on and flags its figures as taken on a busy machine."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        b0, _ = machine_busy_seconds()
        await asyncio.sleep(1.0)
        b1, _ = machine_busy_seconds()
        load = b1 - b0
        if load < max_cores or time.monotonic() > deadline:
            return load
        if not said:
            report(f"waiting for the machine to be idle: {load:.2f} cores busy with other work (up to {timeout:.0f}s)")
            said = True


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "?")
    mem_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal:"))
    return {"nproc": os.cpu_count(), "cpu": model, "ram_gib": round(mem_kib / 2**20, 1),
            "kernel": platform.release(), "python": platform.python_version()}


# ---- processes ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli() -> list[str]:
    """`workflow-orchestrator` of this interpreter's environment (or `python -m` without it)."""
    script = Path(sys.executable).parent / "workflow-orchestrator"
    return [str(script)] if script.exists() else [sys.executable, "-m", "workflow_orchestrator"]


def base_env() -> dict[str, str]:
    """Only what a process needs from ours: no stray setting leaks into the service."""
    return {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "VIRTUAL_ENV")}


class Process:
    """A child process with its output in a log file."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], workdir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.workdir = workdir
        self.log_path = workdir / f"{name}.log"
        self.proc: asyncio.subprocess.Process | None = None
        self._log: IO[bytes] | None = None

    async def start(self) -> None:
        self._log = self.log_path.open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv, env=self.env, cwd=self.workdir, stdin=asyncio.subprocess.DEVNULL,
            stdout=self._log, stderr=asyncio.subprocess.STDOUT)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def exited(self) -> bool:
        return self.proc is None or self.proc.returncode is not None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return "\n".join(f"    {line}" for line in text)

    async def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL after `timeout`."""
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


async def wait_for(check: Callable[[], Awaitable[bool]], what: str, timeout: float,
                   watch: tuple[Process, ...] = ()) -> None:
    """Poll `check` until it is true; fail at the deadline or as soon as a watched process dies."""
    deadline = time.monotonic() + timeout
    while True:
        for p in watch:
            if p.exited():
                raise BenchError(f"{p.name} exited (code {p.proc.returncode if p.proc else '?'}) while waiting "
                                 f"for {what}; last lines of {p.log_path}:\n{p.log_tail()}")
        with contextlib.suppress(Exception):
            if await check():
                return
        if time.monotonic() > deadline:
            tails = "".join(f"\n  {p.log_path}:\n{p.log_tail()}" for p in watch)
            raise BenchError(f"{what}: not reached within {timeout:.0f}s{tails}")
        await asyncio.sleep(0.05)


@dataclass
class Services:
    names: Names
    manager_url: str
    manager: ManagerClient
    sandbox: Process
    orchestrator: Process
    relay: Process
    workdir: Path

    @property
    def processes(self) -> tuple[Process, ...]:
        return self.sandbox, self.orchestrator, self.relay


async def declare_topology(conn: AbstractRobustConnection, n: Names) -> None:
    """Every queue of both systems, with the arguments the orchestrator declares them with."""
    channel = await conn.channel()
    try:
        exchange = await channel.declare_exchange(n.root, aio_pika.ExchangeType.TOPIC, durable=True)
        for logical in ALL_QUEUES:
            name = n.queue(logical)
            queue = await channel.declare_queue(name, durable=True, arguments=queue_arguments(name))
            await queue.bind(exchange, name)
            await channel.declare_queue(error_queue_name(name), durable=True)
    finally:
        await channel.close()


async def delete_topology(conn: AbstractRobustConnection, n: Names) -> None:
    channel = await conn.channel()
    try:
        for logical in ALL_QUEUES:
            for name in (n.queue(logical), error_queue_name(n.queue(logical))):
                await channel.queue_delete(name)
        await channel.exchange_delete(n.root)
    finally:
        await channel.close()


async def queue_depths(conn: AbstractRobustConnection, n: Names) -> dict[str, tuple[int, int]]:
    """(messages ready, consumers) per logical queue, error queues included."""
    channel = await conn.channel()
    out: dict[str, tuple[int, int]] = {}
    try:
        for logical in ALL_QUEUES:
            for name in (n.queue(logical), error_queue_name(n.queue(logical))):
                q = await channel.declare_queue(name, passive=True)
                result = q.declaration_result
                out[name[len(n.routing_key) + 1:]] = (result.message_count or 0, result.consumer_count or 0)
    finally:
        await channel.close()
    return out


def _db_url(admin_url: str, db: str) -> str:
    return admin_url.rsplit("/", 1)[0] + "/" + db


@asynccontextmanager
async def running_services(conn: AbstractRobustConnection, *, amqp_url: str, database_url: str, prefetch: int,
                           workdir: Path, sandbox_pool: int, orchestrator_src: Path | None = None,
                           log_level: str = "warning") -> AsyncIterator[Services]:
    """Fresh names, database, schema and topology; the three processes started and consuming.
    Everything is stopped and dropped on the way out. `orchestrator_src`: run the orchestrator from
    that source tree (its `src` folder) instead of the installed one, to measure a candidate patch."""
    n = Names.random()
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{n.ledger_db}"')
    finally:
        await admin.close()
    seed = workdir / "seed.toml"
    seed.write_text(seed_toml(n, amqp_url))
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = base_env()
    sandbox = Process("sandbox", [*cli(), "sandbox-manager"], {
        **env, "SANDBOX_DATABASE_URL": database_url, "SANDBOX_DB_SCHEMA": n.schema, "SANDBOX_HOST": "127.0.0.1",
        "SANDBOX_PORT": str(port), "SANDBOX_SEED_FILE": str(seed), "SANDBOX_AMQP_URL": amqp_url,
        "SANDBOX_POOL_SIZE": str(sandbox_pool)}, workdir)
    argv = [*cli(), "run"]
    if orchestrator_src is not None:
        env_orch = {**env, "PYTHONPATH": str(orchestrator_src)}
        argv = [sys.executable, "-m", "workflow_orchestrator", "run"]
    else:
        env_orch = env
    orchestrator = Process("orchestrator", argv, {
        **env_orch, "EXCHANGE_ID": "1", "BROKER_ID": "1", "MANAGER_URL": url, "OAUTH_LOGIN_URL": f"{url}/oauth/token",
        "OAUTH_CLIENT_ID": n.client_id, "OAUTH_CLIENT_SECRET": n.client_secret,
        "DATABASE_URL": _db_url(database_url, n.ledger_db), "APP_ENV": "production", "LOG_LEVEL": log_level,
        "HTTP_PORT": "0", "PREFETCH": str(prefetch), "HOSTNAME": n.orchestrator_host}, workdir)
    relay = Process("relay", [sys.executable, str(BENCH_DIR / "relay.py")], {
        **env, "RELAY_AMQP_URL": amqp_url, "RELAY_MANAGER_URL": url, "RELAY_TOKEN_URL": f"{url}/oauth/token",
        "RELAY_CLIENT_ID": n.client_id, "RELAY_CLIENT_SECRET": n.client_secret, "RELAY_EXCHANGE": n.root,
        "RELAY_ROUTING_KEY": n.routing_key, "RELAY_QUEUE": RELAY_IN, "PREFETCH": str(prefetch)}, workdir)
    manager = ManagerClient(url, f"{url}/oauth/token", n.client_id, n.client_secret, concurrency=16)
    try:
        await declare_topology(conn, n)
        await sandbox.start()
        async with httpx.AsyncClient() as http:
            async def healthy() -> bool:
                return (await http.get(f"{url}/healthz")).status_code == 200

            await wait_for(healthy, "sandbox Manager healthy", 60, (sandbox,))
        await manager.start()
        await orchestrator.start()
        await relay.start()
        running = (sandbox, orchestrator, relay)

        def consuming(logical: str) -> Callable[[], Awaitable[bool]]:
            async def check() -> bool:
                return (await queue_depths(conn, n))[logical][1] > 0
            return check

        await wait_for(consuming(ORCHESTRATION), "orchestrator consuming", 60, running)
        await wait_for(consuming(RELAY_IN), "relay consuming", 60, running)
        yield Services(n, url, manager, sandbox, orchestrator, relay, workdir)
    finally:
        for p in (relay, orchestrator, sandbox):
            await p.stop()
        await manager.close()
        with contextlib.suppress(Exception):
            await delete_topology(conn, n)
        admin = await asyncpg.connect(database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{n.ledger_db}" WITH (FORCE)')
            await admin.execute(f'DROP SCHEMA IF EXISTS "{n.schema}" CASCADE')
        finally:
            await admin.close()
