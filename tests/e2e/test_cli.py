"""The installed `workflow-orchestrator` console script as a subprocess, configured by environment
variables alone, against a running sandbox Manager and an orchestrator service (in-process, so
the subprocesses run asynchronously), the real RabbitMQ and Postgres."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.stack import Stack, running_stack

_SCRIPT = Path(sys.executable).with_name("workflow-orchestrator")
COMMAND = ([str(_SCRIPT)] if _SCRIPT.exists()
           else [w] if (w := shutil.which("workflow-orchestrator"))
           else [sys.executable, "-m", "workflow_orchestrator"])
CONFIG_DIR = tempfile.mkdtemp(prefix="wo-cli-config-")  # empty: the environment is the whole configuration


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def base_env(**values: str) -> dict[str, str]:
    env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "SYSTEMROOT") if k in os.environ}
    env.update({"APP_ENV": "test", "CONFIG_DIR": CONFIG_DIR, "COLUMNS": "200"})
    env.update(values)
    return env


def env_of(s: Stack, **over: str) -> dict[str, str]:
    return base_env(
        EXCHANGE_ID="1", BROKER_ID="1", MANAGER_URL=s.sandbox.url, OAUTH_LOGIN_URL=f"{s.sandbox.url}/oauth/token",
        OAUTH_CLIENT_ID=s.sandbox.client_id, OAUTH_CLIENT_SECRET=s.sandbox.client_secret,
        DATABASE_URL=s.db_url, HOSTNAME=f"cli-{s.r}", **over)


async def cli(env: dict[str, str], *args: str, timeout: float = 60) -> Run:
    proc = await asyncio.create_subprocess_exec(
        *COMMAND, *args, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"workflow-orchestrator {' '.join(args)} did not finish in {timeout}s") from None
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


def one_error_line(run: Run, code: int = 1) -> str:
    assert run.code == code, (run.code, run.out, run.err)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    return lines[0]


async def count(s: Stack, name: str) -> int:
    ch = await s.amqp.channel()
    try:
        return int((await ch.declare_queue(name, passive=True)).declaration_result.message_count or 0)
    finally:
        await ch.close()


async def until_count(s: Stack, name: str, n: int, timeout: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if await count(s, name) == n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name} did not reach {n} message(s) in {timeout}s (has {await count(s, name)})")


# ---- help and configuration ------------------------------------------------------------------
@pytest.mark.parametrize("command", [["create"], ["execute"], ["status"], ["cancel"], ["dlq", "list"],
                                     ["dlq", "replay"], ["dlq", "purge"]])
async def test_every_command_has_help_with_an_example(command: list[str]) -> None:
    run = await cli(base_env(), *command, "--help")
    assert run.code == 0, run.err
    assert "Example: workflow-orchestrator " + command[0] in " ".join(run.out.split())


@pytest.mark.parametrize("command", ["run", "sandbox-manager", "demo", "demo-workers", "check-config"])
async def test_the_service_commands_have_help(command: str) -> None:
    run = await cli(base_env(), command, "--help")
    assert run.code == 0, run.err
    assert f"workflow-orchestrator {command}" in " ".join(run.out.split())


@pytest.mark.parametrize(("args", "says"), [
    (["cancel", "0b0c5a4e-0000-4000-8000-000000000000"], "Missing option '--reason'"),
    (["create"], "Missing option '--deployment-repo'"),
    (["nosuch"], "No such command 'nosuch'"),
    (["dlq", "replay", "--limit", "0"], "'--limit'"),
    (["status", "--bogus"], "No such option: --bogus"),
])
async def test_a_usage_error_is_one_line_and_exit_code_2(args: list[str], says: str) -> None:
    line = one_error_line(await cli(base_env(), *args), code=2)
    assert says in line and "--help)" in line


async def test_a_config_file_that_is_not_toml_is_one_line_and_exit_code_2(tmp_path: Path) -> None:
    (tmp_path / "test.toml").write_text("prefetch = [\n")
    env = {**base_env(), "CONFIG_DIR": str(tmp_path)}
    for command in (["status", "x"], ["run"]):
        line = one_error_line(await cli(env, *command), code=2)
        assert f"{tmp_path / 'test.toml'} is not valid TOML" in line


async def test_an_invalid_sandbox_setting_is_named_in_one_line() -> None:
    line = one_error_line(await cli(base_env(SANDBOX_PORT="abc", SANDBOX_POOL_SIZE="0"), "sandbox-manager"), code=2)
    assert "SANDBOX_PORT" in line and "SANDBOX_POOL_SIZE" in line


async def test_missing_configuration_is_one_line_and_exit_code_2() -> None:
    line = one_error_line(await cli(base_env(), "status"), code=2)
    assert "EXCHANGE_ID is required" in line and "MANAGER_URL is required" in line


async def test_an_unreachable_manager_is_one_readable_line() -> None:
    env = base_env(EXCHANGE_ID="1", BROKER_ID="1", MANAGER_URL="http://127.0.0.1:9",
                   OAUTH_LOGIN_URL="http://user:hunter2@127.0.0.1:9/oauth/token", OAUTH_CLIENT_ID="c",
                   OAUTH_CLIENT_SECRET="very-secret")
    line = one_error_line(await cli(env, "status", str(uuid.uuid4())))
    assert "not reachable" in line
    assert "hunter2" not in line and "very-secret" not in line


# ---- workflows -------------------------------------------------------------------------------
async def test_create_execute_status_cancel() -> None:
    async with running_stack() as s:
        env = env_of(s)
        created = await cli(env, "create", "--deployment-repo", "acme/web-deploy", "--source-repo", "acme/web",
                            "--source-ref", "v1.2", "--milestones", "build,deploy")
        assert created.code == 0, created.err
        wid = created.out.strip()
        assert str(uuid.UUID(wid)) == wid, "prints just the id"
        rec = await s.record(wid)
        assert (rec["deployment_repo"], rec["source_repo"], rec["source_repo_git_ref"], rec["milestones"]) == (
            "acme/web-deploy", "acme/web", "v1.2", ["build", "deploy"])

        as_json = await cli(env, "create", "--deployment-repo", "acme/other", "--json")
        assert as_json.code == 0 and as_json.json()["workflow"]["deployment_repo"] == "acme/other"

        line = one_error_line(await cli(env, "create", "--deployment-repo", "x/y", "--milestones", "build,bake"))
        assert "unknown milestone bake" in line

        fresh = await cli(env, "status", wid, "--json")
        assert fresh.code == 0 and fresh.json()["state"] == "not started"

        started = await cli(env, "execute", wid, "--etcd-token", s.deploy_token)
        assert started.code == 0, started.err
        assert f"workflow {wid} started" in started.out
        build = await s.take("1", "builder", wid)
        assert build["current_step"] == "build" and build["etcd_token"] == s.deploy_token

        again = one_error_line(await cli(env, "execute", wid))
        assert again == f"error: workflow {wid} has already been started (running)"

        one = (await cli(env, "status", wid, "--json")).json()
        assert one["state"] == "running" and one["current_step"] == "build"
        assert one["run"]["milestone"] == "build" and one["run"]["attempt"] == 1 and one["run"]["deadline"]
        assert any(e.endswith("Starting Workflow Milestone: build") for e in one["event_log"])

        listed = await cli(env, "status", "--json")
        assert listed.code == 0, listed.err
        row = next(r for r in listed.json() if r["workflow_id"] == wid)
        assert (row["milestone"], row["attempt"], row["phase"]) == ("build", 1, "dispatched")
        assert row["deadline"] and row["age"].endswith("(s)")
        table = await cli(env, "status")
        assert table.out.splitlines()[0].split() == ["WORKFLOW", "MILESTONE", "ATTEMPT", "PHASE", "AGE", "DEADLINE"]
        assert any(line.startswith(wid) and " build " in line for line in table.out.splitlines())

        cancelled = await cli(env, "cancel", wid, "--reason", "release postponed")
        assert cancelled.code == 0, cancelled.err
        rec = await s.wait_finished(wid)
        assert rec["workflow_error"] is True
        human = await cli(env, "status", wid)
        assert human.code == 0
        assert any(line.split() == ["state", "failed"] for line in human.out.splitlines())
        assert f"[OA][{wid}][acme/web-deploy] Workflow Milestone Failed: build. Reason: Workflow cancelled: " \
               "release postponed" in human.out

        late = one_error_line(await cli(env, "cancel", wid, "--reason", "again", "--via-queue"))
        assert "already finished (failed)" in late
        listed = (await cli(env, "status", "--json")).json()
        assert wid not in {r["workflow_id"] for r in listed}


async def test_execute_options_reach_the_milestone_request() -> None:
    async with running_stack() as s:
        env = env_of(s)
        wid = await s.workflow(["build", "deploy"])
        run = await cli(env, "execute", wid, "--force-build", "--build-exchange", "2", "--deploy-exchange", "2",
                        "--etcd-token", s.west_token, "--json")
        assert run.code == 0, run.err
        assert run.json() == {"id": wid, "executed": True, "via": "manager", "message_id": None}
        build = await s.take("2", "builder", wid)
        assert build["force_build"] is True
        assert str(build["build_messaging_exchange_id"]) == "2" and str(build["deploy_messaging_exchange_id"]) == "2"

        other = await s.workflow(["build"])
        queued = await cli(env, "execute", other, "--via-queue", "--json")
        assert queued.code == 0 and queued.json()["message_id"]
        assert (await s.take("1", "builder", other))["current_step"] == "build"

        missing = str(uuid.uuid4())
        assert one_error_line(await cli(env, "execute", missing)) == f"error: workflow {missing} not found"
        assert one_error_line(await cli(env, "status", missing)) == f"error: workflow {missing} not found"
        assert one_error_line(await cli(env, "cancel", missing, "--reason", "x")) == \
            f"error: workflow {missing} not found"
        fresh = await s.workflow(["build"])
        line = one_error_line(await cli(env, "execute", fresh, "--build-exchange", "99"))
        assert line == "error: build messaging exchange 99 not found"


# ---- dead letters ----------------------------------------------------------------------------
async def test_dlq_list_replay_purge() -> None:
    async with running_stack() as s:
        env = env_of(s)
        errq = f"{s.queue('1', 'workflow_orchestration')}_error"
        wid = str(uuid.uuid4())
        # One at a time, so the error queue holds them in this order (the orchestrator works in parallel).
        m_text = await s.publish("1", "workflow_orchestration", b"this is not json")
        await until_count(s, errq, 1)
        m_unknown = await s.publish("1", "workflow_orchestration", {"id": wid, "deployment_repo": "acme/late"},
                                    correlation_id=wid)
        await until_count(s, errq, 2)
        m_list = await s.publish("1", "workflow_orchestration", b"[1, 2, 3]")
        await until_count(s, errq, 3)

        listed = await cli(env, "dlq", "list", "--json")
        assert listed.code == 0, listed.err
        assert listed.json()["queue"] == errq
        by_id = {m["message_id"]: m for m in listed.json()["messages"]}
        assert set(by_id) == {m_text, m_unknown, m_list}
        assert by_id[m_text]["reason"].startswith("not JSON") and by_id[m_text]["size"] == len(b"this is not json")
        assert by_id[m_text]["preview"] == "this is not json" and by_id[m_text]["at"]
        assert by_id[m_unknown]["reason"] == f"unknown workflow {wid}" and by_id[m_unknown]["workflow_id"] == wid
        assert "not a JSON object" in by_id[m_list]["reason"]
        human = await cli(env, "dlq", "list")
        assert f"3 message(s) in {errq}" in human.out and f"reason: unknown workflow {wid}" in human.out
        assert await count(s, errq) == 3, "list leaves the messages in place"

        # Replayed with the orchestrator stopped: the message waits in the orchestration queue as it was
        # first sent, without the error headers.
        await s.stop_orchestrators()
        first = await cli(env, "dlq", "replay", "--limit", "1", "--json")
        assert first.code == 0, first.err
        assert [m["message_id"] for m in first.json()["replayed"]] == [m_text]
        back = await s.take_message("1", "workflow_orchestration")
        assert back.message_id == m_text and back.body == b"this is not json"
        assert not any(k.startswith("x-error") for k in back.headers or {})
        assert await count(s, errq) == 2

        # The workflow now exists: replaying its start message starts it.
        await s.start_orchestrator()
        await s.manager.create_workflow({"id": wid, "deployment_repo": "acme/late", "milestones": ["build"]})
        replay = await cli(env, "dlq", "replay", "--message-id", m_unknown)
        assert replay.code == 0, replay.err
        assert f"replayed 1 message(s) from {errq}" in replay.out
        assert (await s.take("1", "builder", wid))["current_step"] == "build"
        line = one_error_line(await cli(env, "dlq", "replay", "--message-id", "nope"))
        assert line == f"error: no message with message_id nope in {errq}"

        refused = one_error_line(await cli(env, "dlq", "purge"))
        assert refused == f"error: refusing to delete 1 message(s) from {errq} without --yes"
        purged = await cli(env, "dlq", "purge", "--yes", "--json")
        assert purged.code == 0 and purged.json() == {"queue": errq, "purged": 1}
        empty = await cli(env, "dlq", "list", "--json")
        assert empty.json()["messages"] == []
        assert (await cli(env, "dlq", "purge")).out.strip() == f"{errq} is empty"
