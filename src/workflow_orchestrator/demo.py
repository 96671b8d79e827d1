"""The showcase: sandbox Manager and orchestrator as child processes, simulated builder, deployer
and notification workers (the client library) in this process, a mix of workflows driven end to
end with live progress, their event logs, and a verdict (exit 0 only if all ended as expected)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from workflow_orchestrator.client import OrchestrationClient, OrchestrationRequest, StepFailed, Worker
from workflow_orchestrator.manager.client import ManagerClient
from workflow_orchestrator.messaging.broker import BrokerPool
from workflow_orchestrator.sandbox.seed import connection_seed, dump_seed

CLIENT_ID, CLIENT_SECRET = "demo-client", "demo-secret"


@dataclass
class Case:
    label: str
    milestones: list[str]
    expect: str  # "completed" or "failed"
    must_log: str  # a text its event log must contain
    outcome: str = "ok"  # what the simulated workers do: ok, fail_build, slow_build
    scheduled_in: float | None = None
    wid: str = ""
    cancel_sent: bool = False
    record: dict[str, Any] = field(default_factory=dict)


def cases(successes: int, speed: float) -> list[Case]:
    out = [Case(f"release-{i + 1}", ["build", "deploy"], "completed", "Workflow completed in")
           for i in range(successes)]
    out.append(Case("broken-build", ["build", "deploy"], "failed",
                    "Reason: Milestone worker has reported a failure", outcome="fail_build"))
    out.append(Case("scheduled", ["scheduled", "build", "deploy"], "completed", "Workflow is now scheduled to start",
                    scheduled_in=4 * speed + 2))
    out.append(Case("cancelled", ["build", "deploy"], "failed", "Reason: Workflow cancelled: release postponed",
                    outcome="slow_build"))
    return out


def seed(r: str, amqp_url: str) -> str:
    """The demo site: one exchange, its broker, a build and a deploy cluster (workers register)."""
    return dump_seed({
        "orchestrator_exchange_id": 1, "orchestrator_broker_id": 1,
        "clients": [{"client_id": CLIENT_ID, "client_secret": CLIENT_SECRET}],
        "exchanges": [{"id": 1, "name": "demo-east", "routing_key": f"demo.{r}.east",
                       "root_exchange_name": f"openaperture.demo.{r}"}],
        "brokers": [{"id": 1, "name": "local"}],
        "connections": [connection_seed(amqp_url)],
        "clusters": [
            {"id": 1, "etcd_token": f"demo-build-{r}", "messaging_exchange_id": 1, "allow_docker_builds": True},
            {"id": 2, "etcd_token": f"demo-deploy-{r}", "messaging_exchange_id": 1},
        ],
    })


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(*args: str) -> list[str]:
    exe = shutil.which("workflow-orchestrator", path=str(Path(sys.executable).parent))
    return [exe, *args] if exe else [sys.executable, "-m", "workflow_orchestrator", *args]


class Children:
    """Child processes, stopped with SIGTERM (then SIGKILL) in reverse order."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, args: list[str], env: dict[str, str]) -> Path:
        log = self.workdir / f"{name}.log"
        with open(log, "ab") as out:
            proc = subprocess.Popen(args, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                    cwd=self.workdir, start_new_session=True)
        self.procs.append((name, proc))
        return log

    def check(self) -> None:
        for name, proc in self.procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.workdir / (name + '.log')}")

    async def stop(self) -> None:
        for _, proc in reversed(self.procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.to_thread(proc.wait, 20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)


async def wait_http(url: str, children: Children, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient() as c:
        while time.monotonic() < deadline:
            children.check()
            with contextlib.suppress(httpx.HTTPError):
                if (await c.get(url, timeout=2)).status_code == 200:
                    return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f}s")


@contextlib.asynccontextmanager
async def demo_database(admin_url: str, keep: bool) -> AsyncIterator[str]:
    name = f"wo_demo_{uuid.uuid4().hex[:8]}"
    conn = await asyncpg.connect(admin_url)
    await conn.execute(f'CREATE DATABASE "{name}"')
    await conn.close()
    try:
        yield admin_url.rsplit("/", 1)[0] + "/" + name
    finally:
        if not keep:
            conn = await asyncpg.connect(admin_url)
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await conn.close()


# ---- simulated workers ---------------------------------------------------------------------
def builder(speed: float, client_box: list[OrchestrationClient]) -> Any:
    async def handle(req: OrchestrationRequest) -> OrchestrationRequest:
        outcome = req.get("demo_outcome", "ok")
        await asyncio.sleep(random.uniform(0.5, 1.5) * speed * (6 if outcome == "slow_build" else 1))
        if outcome == "fail_build":
            raise StepFailed("docker build failed: step 4/9 RUN make test exited 2", "unit tests failed")
        req.set("source_commit_hash", uuid.uuid4().hex[:12])
        if client_box:
            await client_box[0].notify(req, f"Build finished: image {req.get('deployment_repo')}:"
                                            f"{req.get('source_commit_hash')}")
        return req

    return handle


def deployer(speed: float) -> Any:
    async def handle(req: OrchestrationRequest) -> OrchestrationRequest:
        await asyncio.sleep(random.uniform(0.5, 1.5) * speed)
        return req

    return handle


class Notifications:
    """Plays the notifications service: consumes chat and e-mail requests, remembers the last."""

    def __init__(self) -> None:
        self.chats = 0
        self.emails = 0
        self.last = ""

    async def start(self, conn: aio_pika.abc.AbstractRobustConnection, rk: str, root: str) -> None:
        ch = await conn.channel()
        ex = await ch.declare_exchange(root, aio_pika.ExchangeType.TOPIC, durable=True)
        for q in ("notifications_hipchat", "notifications_email"):
            name = f"{rk}.{q}"
            queue = await ch.declare_queue(name, durable=True, arguments={
                "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{name}_error"})
            await queue.bind(ex, name)
            await ch.declare_queue(f"{name}_error", durable=True)
            await queue.consume(self._chat if q.endswith("hipchat") else self._email)

    async def _chat(self, msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with msg.process():
            body = json.loads(msg.body)
            self.chats += 1
            self.last = ("" if body.get("is_success", True) else "[red]") + str(body.get("message"))[:90]

    async def _email(self, msg: aio_pika.abc.AbstractIncomingMessage) -> None:
        async with msg.process():
            self.emails += 1


# ---- the run -------------------------------------------------------------------------------
def view(cs: list[Case], progress: Progress, notes: Notifications, started: float) -> Group:
    table = Table(title="workflows", expand=False)
    for col in ("workflow", "id", "milestone", "state", "events"):
        table.add_column(col)
    for c in cs:
        rec = c.record
        if rec.get("workflow_completed"):
            state = "[red]failed" if rec.get("workflow_error") else "[green]completed"
        elif rec.get("current_step"):
            state = "[yellow]running"
        else:
            state = "queued"
        table.add_row(c.label, c.wid[:8], str(rec.get("current_step") or "-"), state,
                      str(len(rec.get("event_log") or [])))
    info = f"chat notifications: {notes.chats}   e-mails: {notes.emails}   last: {notes.last}"
    return Group(table, progress, info)


def strip(rec: dict[str, Any]) -> list[str]:
    prefix = f"[OA][{rec.get('id')}][{rec.get('deployment_repo') or 'Unknown'}] "
    return [e[len(prefix):] if e.startswith(prefix) else f"  (worker) {e}" for e in rec.get("event_log") or []]


async def run_demo(workflows: int = 3, speed: float = 0.5, keep: bool = False,
                   database_url: str = "postgresql://postgres@127.0.0.1:5432/postgres",
                   amqp_url: str = "amqp://guest:guest@127.0.0.1:5672/", console: Console | None = None) -> int:
    """Run the demo; 0 when every workflow ended as expected."""
    console = console or Console()
    r = uuid.uuid4().hex[:8]
    workdir = Path(tempfile.mkdtemp(prefix="wo-demo-"))
    (workdir / "sandbox.toml").write_text(seed(r, amqp_url))
    rk, root = f"demo.{r}.east", f"openaperture.demo.{r}"
    children = Children(workdir)
    cs = cases(workflows, speed)
    console.print(f"[bold]workflow-orchestrator demo[/bold]: {len(cs)} workflows, logs in {workdir}")
    async with demo_database(database_url, keep) as db:
        try:
            sandbox_port, http_port = free_port(), free_port()
            manager_url = f"http://127.0.0.1:{sandbox_port}"
            children.start("sandbox-manager", command("sandbox-manager"), {
                "SANDBOX_DATABASE_URL": db, "SANDBOX_PORT": str(sandbox_port), "SANDBOX_AMQP_URL": amqp_url,
                "SANDBOX_SEED_FILE": str(workdir / "sandbox.toml")})
            await wait_http(f"{manager_url}/healthz", children)
            console.print(f"sandbox Manager   {manager_url}")
            env = {"APP_ENV": "production", "EXCHANGE_ID": "1", "BROKER_ID": "1", "MANAGER_URL": manager_url,
                   "OAUTH_LOGIN_URL": f"{manager_url}/oauth/token", "OAUTH_CLIENT_ID": CLIENT_ID,
                   "OAUTH_CLIENT_SECRET": CLIENT_SECRET, "DATABASE_URL": db, "HTTP_PORT": str(http_port),
                   "UI_URL": manager_url, "HOSTNAME": f"demo-orchestrator-{r}", "TIMER_POLL_INTERVAL": "200ms"}
            children.start("orchestrator", command("run"), env)
            await wait_http(f"http://127.0.0.1:{http_port}/readyz", children)
            console.print(f"orchestrator      ready; metrics at http://127.0.0.1:{http_port}/metrics")
            return await _drive(cs, speed, manager_url, amqp_url, rk, root, children, console)
        finally:
            await children.stop()
            if not keep:
                await _cleanup_queues(amqp_url, rk, root)


async def _drive(cs: list[Case], speed: float, manager_url: str, amqp_url: str, rk: str, root: str,
                 children: Children, console: Console) -> int:
    manager = ManagerClient(manager_url, f"{manager_url}/oauth/token", CLIENT_ID, CLIENT_SECRET)
    pool = BrokerPool(app_id="demo")
    conn = await aio_pika.connect_robust(amqp_url)
    client = OrchestrationClient(manager, pool, broker_id="1", exchange_id="1", amqp_url=amqp_url)
    notes = Notifications()
    box = [client]
    workers = [Worker("builder", "1", builder(speed, box), manager=manager, broker_id="1", amqp_url=amqp_url,
                      hostname="demo-builder", prefetch=16, shutdown_grace=2),
               Worker("deployer", "1", deployer(speed), manager=manager, broker_id="1", amqp_url=amqp_url,
                      hostname="demo-deployer", prefetch=16, shutdown_grace=2)]
    try:
        await manager.start()
        await notes.start(conn, rk, root)
        for w in workers:
            await w.start()
        token = f"demo-deploy-{rk.split('.')[1]}"
        for c in cs:
            fields: dict[str, Any] = {"deployment_repo": f"acme/{c.label}-deploy", "source_repo": f"acme/{c.label}",
                                      "source_repo_git_ref": "main", "milestones": c.milestones}
            if c.scheduled_in is not None:
                at = datetime.now(UTC) + timedelta(seconds=c.scheduled_in)
                fields["scheduled_start_time"] = format_datetime(at, usegmt=True)
            c.wid = await manager.create_workflow(fields)
            await client.start(c.wid, etcd_token=token, demo_outcome=c.outcome, notifications_config={
                "email": {"events": {"on_workflow_completed": ["release-managers"]},
                          "groups": {"release-managers": ["ops@example.com", "lead@example.com"]}}})
        progress = Progress(TextColumn("finished"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        task = progress.add_task("workflows", total=len(cs))
        started = time.monotonic()
        deadline = started + 60 + 30 * speed
        with Live(view(cs, progress, notes, started), console=console, refresh_per_second=8,
                  transient=not console.is_terminal) as live:
            while True:
                children.check()
                listed = {w["id"]: w for w in await manager.list_workflows(lookback="0")}
                for c in cs:
                    c.record = listed.get(c.wid, c.record)
                    if (c.outcome == "slow_build" and not c.cancel_sent and c.record.get("current_step") == "build"
                            and not c.record.get("workflow_completed")):
                        await client.cancel(c.wid, "release postponed")
                        c.cancel_sent = True
                done = sum(1 for c in cs if c.record.get("workflow_completed"))
                progress.update(task, completed=done)
                live.update(view(cs, progress, notes, started))
                if done == len(cs) or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.25)
        return report(cs, console)
    finally:
        for w in workers:
            with contextlib.suppress(Exception):
                await w.stop(grace=2)
        await pool.close()
        await conn.close()
        await manager.close()


def report(cs: list[Case], console: Console) -> int:
    for c in cs:
        console.print(Panel("\n".join(strip(c.record)) or "(no events)", title=f"{c.label}  {c.wid}",
                            expand=False))
    summary = Table(title="summary")
    for col in ("workflow", "expected", "ended", "duration", "verdict"):
        summary.add_column(col)
    ok_all = True
    for c in cs:
        rec = c.record
        ended = ("failed" if rec.get("workflow_error") else "completed") if rec.get("workflow_completed") \
            else "unfinished"
        ok = ended == c.expect and any(c.must_log in e for e in rec.get("event_log") or [])
        ok_all &= ok
        summary.add_row(c.label, c.expect, ended, str(rec.get("workflow_duration") or "-"),
                        "[green]as expected" if ok else f"[red]NOT as expected (wanted '{c.must_log}')")
    console.print(summary)
    console.print("[bold green]demo passed[/]" if ok_all else "[bold red]demo failed[/]")
    return 0 if ok_all else 1


async def _cleanup_queues(amqp_url: str, rk: str, root: str) -> None:
    with contextlib.suppress(Exception):
        conn = await aio_pika.connect(amqp_url, timeout=5)
        ch = await conn.channel()
        for q in ("workflow_orchestration", "builder", "deployer", "deploy_oa", "notifications_hipchat",
                  "notifications_email"):
            for name in (f"{rk}.{q}", f"{rk}.{q}_error"):
                await ch.queue_delete(name)
        await ch.exchange_delete(root)
        await conn.close()


async def run_workers(manager_url: str, token_url: str, client_id: str, client_secret: str, exchange_id: str,
                      broker_id: str, amqp_url: str | None, hostname: str, speed: float) -> None:
    """The demo's simulated builder and deployer against a running site, until SIGTERM."""
    manager = ManagerClient(manager_url, token_url, client_id, client_secret)
    pool = BrokerPool(app_id=f"demo-workers@{hostname}")
    client = OrchestrationClient(manager, pool, broker_id=broker_id, exchange_id=exchange_id, amqp_url=amqp_url)
    workers = [Worker("builder", exchange_id, builder(speed, [client]), manager=manager, broker_id=broker_id,
                      amqp_url=amqp_url, hostname=f"{hostname}-builder"),
               Worker("deployer", exchange_id, deployer(speed), manager=manager, broker_id=broker_id,
                      amqp_url=amqp_url, hostname=f"{hostname}-deployer")]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await manager.start()
        for w in workers:
            await w.start()
        await stop.wait()
    finally:
        for w in workers:
            await w.stop()
        await pool.close()
        await manager.close()
