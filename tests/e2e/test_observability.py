"""Observability (SPEC §10): metrics that move, readiness that follows the dependencies, and logs
that never carry a secret."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import time
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.support.faulty import FaultyProxy
from tests.support.proc import EchoWorkers, OrchestratorProcess, orchestrator_command
from tests.support.stack import running_stack
from tests.support.tcpproxy import TcpProxy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    async with httpx.AsyncClient() as c:
        text = (await c.get(f"http://127.0.0.1:{port}/metrics")).text
    out = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(m: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return m.get((name, tuple(sorted(labels.items()))), 0.0)


async def until_metric(port: int, name: str, expected: float, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while (seen := value(await scrape(port), name)) != expected:
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} is {seen}, not {expected}, after {timeout}s")
        await asyncio.sleep(0.1)


async def test_metrics_move_with_a_workflow() -> None:
    port = free_port()
    async with running_stack(http_port=port) as s:
        before = await scrape(port)
        wid = await s.workflow(["build", "deploy"])
        await s.start(wid, etcd_token=s.deploy_token)
        build = await s.take("1", "builder", wid)
        await until_metric(port, "wo_active_workflows", 1)
        await s.echo(build)
        await s.echo(await s.take("1", "deployer", wid))
        await s.wait_finished(wid)
        await until_metric(port, "wo_active_workflows", 0)
        await s.echo({"id": wid, "current_step": "deploy", "dispatch_id": "stale-one",
                      "workflow_orchestration_exchange_id": "1"})
        deadline = time.monotonic() + 10
        after = await scrape(port)
        ops = value(before, "wo_ledger_operations_total") + 3 * 3 + 2  # the last leave may still linger
        while ((value(after, "wo_stale_total") < 1 or value(after, "wo_ledger_operations_total") < ops)
               and time.monotonic() < deadline):
            await asyncio.sleep(0.1)
            after = await scrape(port)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("wo_messages_total", outcome="processed") == 3
        assert delta("wo_dispatches_total", milestone="build") == 1
        assert delta("wo_dispatches_total", milestone="deploy") == 1
        assert delta("wo_workflow_duration_seconds_count", result="completed") == 1
        assert delta("wo_milestone_duration_seconds_count", milestone="build") == 1
        assert delta("wo_manager_request_seconds_count", endpoint="/workflows/{id}", status="200") == 4
        assert delta("wo_manager_request_seconds_count", endpoint="/workflows/{id}", status="204") == 3
        assert delta("wo_publish_confirm_seconds_count") >= 2 + 8, "two dispatches and eight chat events"
        assert delta("wo_stale_total") == 1
        # three steps (enter, record, leave) and the stale callback (enter, its history note, leave)
        assert delta("wo_ledger_operations_total") == 3 * 3 + 3
        assert 1 <= delta("wo_ledger_round_trips_total") <= 12


async def readyz(port: int) -> tuple[int, dict[str, object]]:
    async with httpx.AsyncClient() as c:
        r = await c.get(f"http://127.0.0.1:{port}/readyz")
        return r.status_code, r.json()


async def wait_ready(port: int, code: int, timeout: float = 30) -> dict[str, object]:
    """Until /readyz answers `code` (a process still starting up does not listen yet)."""
    deadline = time.monotonic() + timeout
    status, body = 0, {}
    while time.monotonic() < deadline:
        try:
            status, body = await readyz(port)
        except httpx.TransportError as exc:
            status, body = 0, {"error": str(exc)}
        if status == code:
            return body
        await asyncio.sleep(0.2)
    raise AssertionError(f"/readyz did not answer {code} within {timeout}s: {status} {body}")


async def test_readyz_follows_postgres_and_the_manager() -> None:
    port = free_port()
    async with running_stack(start=False) as s, FaultyProxy(s.sandbox.url) as manager:
        db = urlsplit(s.db_url)
        pg = TcpProxy(db.hostname or "127.0.0.1", db.port or 5432)
        await pg.start()
        proxied_db = s.db_url.replace(f"{db.hostname}:{db.port or 5432}", f"127.0.0.1:{pg.port}")
        await s.start_orchestrator(http_port=port, database_url=proxied_db, manager_url=manager.url,
                                   oauth_login_url=f"{manager.url}/oauth/token")
        assert (await wait_ready(port, 200))["status"] == "ready"
        async with httpx.AsyncClient() as c:
            assert (await c.get(f"http://127.0.0.1:{port}/healthz")).status_code == 200

        await pg.cut()
        body = await wait_ready(port, 503)
        assert "ledger" in str(body["failing"])
        await pg.restore()
        await wait_ready(port, 200)

        await manager.stop()
        body = await wait_ready(port, 503)
        assert "manager" in str(body["failing"])
        await manager.restart()
        await wait_ready(port, 200)
        # and it still works
        wid = await s.workflow(["deploy_ecs"])
        await s.start(wid)
        await s.take("1", "deployer", wid)
        await pg.cut()


async def test_no_secret_in_any_log_line() -> None:
    async with running_stack(start=False) as s:
        db = urlsplit(s.db_url)
        pg_secret = "Pg-S3cret-" + s.r
        db_with_password = s.db_url.replace(f"{db.username}@", f"{db.username}:{pg_secret}@")
        amqp_secret = "Amqp-S3cret-" + s.r
        # 1. a wrong OAuth client secret: start-up fails on authentication
        bad = OrchestratorProcess(s, "authfail", OAUTH_CLIENT_SECRET="Wrong-Client-S3cret", LOG_LEVEL="debug",
                                  DATABASE_URL=db_with_password)
        bad.start()
        assert bad.proc is not None
        code = await asyncio.to_thread(bad.proc.wait, 30)
        assert code == 1, bad.log_tail()
        # 2. an AMQP override with a wrong password: connection errors
        amqp = OrchestratorProcess(s, "amqpfail", AMQP_URL=f"amqp://guest:{amqp_secret}@127.0.0.1:5672/",
                                   LOG_LEVEL="debug", DATABASE_URL=db_with_password)
        amqp.start()
        assert amqp.proc is not None
        code = await asyncio.to_thread(amqp.proc.wait, 60)
        assert code != 0
        # 3. a good run at debug level, with a token revoked mid-run (401, refresh)
        good = OrchestratorProcess(s, "good", LOG_LEVEL="debug", DATABASE_URL=db_with_password)
        good.start()
        workers = EchoWorkers(s)
        await workers.start()
        wid = await s.workflow(["build", "deploy"])
        await s.start(wid, etcd_token=s.deploy_token)
        await s.wait_finished(wid, timeout=30)
        assert await good.terminate() == 0
        await workers.stop()
        logs = "\n".join(p.log_path.read_text(errors="replace") for p in (bad, amqp, good))
        assert "authfail" in logs or "token" in logs.lower()
        for secret in (s.sandbox.client_secret, "Wrong-Client-S3cret", pg_secret, amqp_secret):
            assert secret not in logs, f"secret {secret[:6]}... leaked into the logs"
        assert not re.search(r"Bearer\s+[A-Za-z0-9_\-.~+/]{12,}", logs), "a bearer token leaked"


def test_config_error_exits_2_naming_every_bad_variable() -> None:
    env = {"PATH": "/usr/bin:/bin", "APP_ENV": "production", "PREFETCH": "lots", "EXCHANGE_ID": "1",
           "OAUTH_CLIENT_SECRET": "TopS3cret-value"}
    r = subprocess.run(orchestrator_command(), env=env, capture_output=True, text=True, timeout=60, cwd="/")
    assert r.returncode == 2
    err = r.stderr
    for name in ("BROKER_ID", "MANAGER_URL", "OAUTH_LOGIN_URL", "OAUTH_CLIENT_ID", "PREFETCH"):
        assert name in err, err
    assert "TopS3cret-value" not in err + r.stdout
    assert len(err.strip().splitlines()) == 1, "one readable line"


async def test_broker_down_at_start_up_waits_not_ready_then_consumes() -> None:
    port = free_port()
    async with running_stack(start=False) as s:
        amqp = TcpProxy("127.0.0.1", 5672)
        await amqp.start()
        await amqp.cut()  # the broker is "down" before the service starts
        orch = OrchestratorProcess(s, "nobroker", AMQP_URL=f"amqp://guest:guest@127.0.0.1:{amqp.port}/",
                                   HTTP_PORT=str(port))
        orch.start()
        body = await wait_ready(port, 503)
        assert "consuming" in str(body["failing"])
        assert orch.alive()
        await amqp.restore()
        await wait_ready(port, 200, timeout=40)
        wid = await s.workflow(["deploy_ecs"])
        await s.start(wid)
        await s.take("1", "deployer", wid)
        assert await orch.terminate() == 0
