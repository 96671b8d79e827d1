"""The installed `workflow-orchestrator run` as a subprocess (for crash and replica tests), and
echo workers played from the test side."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractIncomingMessage

from tests.support.stack import Stack

LOG_DIR = Path(tempfile.gettempdir()) / "wo-test-logs"


def orchestrator_command() -> list[str]:
    exe = shutil.which("workflow-orchestrator", path=str(Path(sys.executable).parent))
    return [exe, "run"] if exe else [sys.executable, "-m", "workflow_orchestrator", "run"]


class OrchestratorProcess:
    """One replica; env from the stack's settings, started from an empty directory."""

    def __init__(self, stack: Stack, name: str, **env: str) -> None:
        self.stack = stack
        self.name = name
        sandbox = stack.sandbox
        self.env = {
            "PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), "APP_ENV": "production",
            "EXCHANGE_ID": "1", "BROKER_ID": "1", "MANAGER_URL": sandbox.url,
            "OAUTH_LOGIN_URL": f"{sandbox.url}/oauth/token", "OAUTH_CLIENT_ID": sandbox.client_id,
            "OAUTH_CLIENT_SECRET": sandbox.client_secret, "DATABASE_URL": stack.db_url, "HTTP_PORT": "0",
            "HOSTNAME": f"{name}-{stack.r}", "LOG_LEVEL": "info", "TIMER_POLL_INTERVAL": "100ms",
            "TRANSIENT_BACKOFF": "500ms", "SHUTDOWN_GRACE": "5s", "PREFETCH": "16",
        }
        self.env.update(env)
        LOG_DIR.mkdir(exist_ok=True)
        self.log_path = LOG_DIR / f"{name}-{stack.r}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cwd = tempfile.mkdtemp(prefix="wo-cwd-")
        stack.processes.append(self)

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(orchestrator_command(), env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.cwd, start_new_session=True)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    async def terminate(self, timeout: float = 20) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"


class EchoWorkers:
    """Consumes the builder/deployer/deploy_oa queues of exchange 1 and calls back at once,
    optionally twice (duplicates). Records every request received."""

    def __init__(self, stack: Stack, duplicate: bool = False, fail_steps: set[str] | None = None) -> None:
        self.stack = stack
        self.duplicate = duplicate
        self.fail_steps = fail_steps or set()
        self.received: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)  # (wid, step) -> ids
        self.handled_ids: set[str] = set()
        self.channel: aio_pika.abc.AbstractChannel | None = None

    async def start(self) -> None:
        self.channel = await self.stack.amqp.channel(publisher_confirms=True)
        await self.channel.set_qos(prefetch_count=64)
        for q in ("builder", "deployer", "deploy_oa"):
            queue = await self.channel.get_queue(self.stack.queue("1", q), ensure=False)
            await queue.consume(self._on)

    async def _on(self, msg: AbstractIncomingMessage) -> None:
        body = json.loads(msg.body)
        self.received[(body["id"], body["current_step"])].append((msg.message_id or "", body["dispatch_id"]))
        if msg.message_id in self.handled_ids:  # a re-sent request: the same dispatch, already handled
            await msg.ack()
            return
        self.handled_ids.add(msg.message_id or "")
        changes: dict[str, Any] = {}
        if body["current_step"] in self.fail_steps:
            changes = {"workflow_completed": True, "workflow_error": True}
        reply = {**body, **changes}
        await self.stack.echo(reply)
        if self.duplicate:
            await self.stack.echo(reply)
        await msg.ack()

    async def stop(self) -> None:
        if self.channel is not None:
            await self.channel.close()
