"""The load: start messages, instant echo workers, completion watchers, and what they time.

Everything is timed in this process with one clock (perf_counter):
- start→dispatch: a start message published → its build request arrives at the builder;
- callback→dispatch: the builder's callback published → the deploy request arrives at the deployer;
- callback→finish: the deployer's callback published → the workflow is seen finished (the
  orchestrator's "Workflow completed" chat notification; the relay's `relay_done` message).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import aio_pika
from aio_pika.abc import AbstractChannel, AbstractExchange, AbstractIncomingMessage, AbstractRobustConnection
from aiormq.abc import DeliveredMessage
from services import (
    BUILDER,
    CHAT,
    DEPLOYER,
    EMAIL,
    ORCHESTRATION,
    RELAY_BUILDER,
    RELAY_DEPLOYER,
    RELAY_DONE,
    RELAY_IN,
    Names,
)

Stage = Literal["build", "deploy"]
STEPS_PER_WORKFLOW = 3  # start, build done, deploy done


@dataclass(frozen=True)
class System:
    """One system under test, as the load sees it."""

    name: str  # "orchestrator" | "relay"
    inbound: str  # logical queue its start messages and callbacks go to


ORCHESTRATOR = System("orchestrator", ORCHESTRATION)
RELAY = System("relay", RELAY_IN)


@dataclass
class Phase:
    """One batch of workflows driven through one system, and what was seen of them."""

    system: System
    label: str
    workflow_ids: list[str]
    on_finished: Callable[[], None] = lambda: None
    started_at: dict[str, float] = field(default_factory=dict)
    callback_at: dict[tuple[str, Stage], float] = field(default_factory=dict)
    finished: set[str] = field(default_factory=set)
    failed: list[str] = field(default_factory=list)
    start_dispatch: list[float] = field(default_factory=list)
    callback_dispatch: list[float] = field(default_factory=list)
    callback_finish: list[float] = field(default_factory=list)
    samples: list[tuple[float, str, float]] = field(default_factory=list)  # (at, kind, seconds) for a timeline
    requested: set[tuple[str, Stage]] = field(default_factory=set)
    duplicate_dispatches: int = 0  # a milestone request for a workflow and stage seen before
    messages_in: int = 0  # messages this process received for the phase (requests, notifications)
    first_start: float = 0.0
    last_finish: float = 0.0
    errors: list[str] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def request_arrived(self, wid: str, stage: Stage, now: float) -> None:
        self.messages_in += 1
        if (wid, stage) in self.requested:
            self.duplicate_dispatches += 1
            return
        self.requested.add((wid, stage))
        if stage == "build":
            if wid in self.started_at:
                self.start_dispatch.append(now - self.started_at[wid])
                self.samples.append((now - self.first_start, "start_dispatch", self.start_dispatch[-1]))
        elif (wid, "build") in self.callback_at:
            self.callback_dispatch.append(now - self.callback_at[(wid, "build")])
            self.samples.append((now - self.first_start, "callback_dispatch", self.callback_dispatch[-1]))

    def workflow_finished(self, wid: str, ok: bool, now: float, why: str = "") -> None:
        if wid in self.finished:
            return
        self.finished.add(wid)
        if not ok:
            self.failed.append(f"{wid}: {why}")
        if (wid, "deploy") in self.callback_at:
            self.callback_finish.append(now - self.callback_at[(wid, "deploy")])
            self.samples.append((now - self.first_start, "callback_finish", self.callback_finish[-1]))
        self.last_finish = now
        self.on_finished()
        if len(self.finished) == len(self.workflow_ids):
            self.done.set()

    @property
    def seconds(self) -> float:
        return self.last_finish - self.first_start


_FINAL_CHAT = (b"Workflow completed in", b"Workflow has failed in", b"Workflow Milestone Failed")


def _wid_from_chat(body: bytes) -> str | None:
    """The workflow id of a chat notification, from its prefix `[OA][{id}][{deployment_repo}]`
    (SPEC §5.1), without parsing the JSON."""
    start = body.find(b"[OA][")
    if start < 0:
        return None
    end = body.find(b"]", start + 5)
    return body[start + 5:end].decode() if end > 0 else None


class Load:
    """Echo workers and watchers for both systems on one connection; drives phases."""

    def __init__(self, conn: AbstractRobustConnection, names: Names, worker_prefetch: int = 256) -> None:
        self.conn = conn
        self.names = names
        self.worker_prefetch = worker_prefetch
        self.owner: dict[str, Phase] = {}
        self.exchange: AbstractExchange | None = None
        self.channels: list[AbstractChannel] = []

    async def start(self) -> None:
        publish = await self.conn.channel(publisher_confirms=True, on_return_raises=True)
        self.exchange = await publish.get_exchange(self.names.root, ensure=False)
        workers = await self.conn.channel()
        await workers.set_qos(prefetch_count=self.worker_prefetch)
        watchers = await self.conn.channel()
        self.channels = [publish, workers, watchers]
        for logical, stage in ((BUILDER, "build"), (DEPLOYER, "deploy"), (RELAY_BUILDER, "build"),
                               (RELAY_DEPLOYER, "deploy")):
            queue = await workers.get_queue(self.names.queue(logical), ensure=False)
            await queue.consume(self._worker(stage))  # type: ignore[arg-type]
        # The watchers stand in for the notifications service, which in production runs elsewhere:
        # they consume through aiormq directly (no aio_pika.IncomingMessage per delivery) and parse a
        # chat notification only when its bytes say it ends a workflow, so the load generator's own
        # CPU — which shares the cores with both systems — stays small for every message it drains.
        raw = await watchers.get_underlay_channel()
        for logical, handler in ((CHAT, self._on_chat), (EMAIL, self._drain), (RELAY_DONE, self._on_relay_done)):
            await raw.basic_consume(self.names.queue(logical), handler, no_ack=True)

    async def close(self) -> None:
        for channel in self.channels:
            if not channel.is_closed:
                await channel.close()

    # ---- workers -----------------------------------------------------------------------------
    def _worker(self, stage: Stage) -> Callable[[AbstractIncomingMessage], Any]:
        async def handle(message: AbstractIncomingMessage) -> None:
            now = time.perf_counter()
            phase: Phase | None = None
            try:
                body = json.loads(message.body)
                wid = str(body["id"])
                phase = self.owner.get(wid)
                if phase is not None:
                    phase.request_arrived(wid, stage, now)
                # An instant worker: the request, unchanged, back to the queue it names.
                key = self.names.queue(str(body.get("orchestration_queue_name") or ORCHESTRATION))
                callback = aio_pika.Message(
                    message.body, content_type="application/json", delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                    message_id=str(uuid.uuid4()), correlation_id=wid, type=f"{stage}.completed")
                if phase is not None:
                    phase.callback_at[(wid, stage)] = time.perf_counter()
                assert self.exchange is not None
                await self.exchange.publish(callback, key, mandatory=True, timeout=30)
                await message.ack()
            except Exception as exc:
                if phase is not None:
                    phase.errors.append(f"{stage} worker: {type(exc).__name__}: {exc}")
                await message.nack(requeue=True)

        return handle

    # ---- watchers ----------------------------------------------------------------------------
    async def _on_chat(self, message: DeliveredMessage) -> None:
        now = time.perf_counter()
        body = message.body
        wid = _wid_from_chat(body)
        phase = self.owner.get(wid or "")
        if phase is None or wid is None:
            return
        phase.messages_in += 1
        if not any(marker in body for marker in _FINAL_CHAT):
            return
        text = str(json.loads(body).get("message", ""))
        if text.startswith("Workflow completed in"):
            phase.workflow_finished(wid, True, now)
        elif text.startswith("Workflow has failed in"):
            phase.workflow_finished(wid, False, now, "the orchestrator failed the workflow")
        elif text.startswith("Workflow Milestone Failed"):
            phase.errors.append(f"{wid}: {text}")

    async def _drain(self, message: DeliveredMessage) -> None:
        """E-mail notifications: none are configured in the bench; drained should one appear."""

    async def _on_relay_done(self, message: DeliveredMessage) -> None:
        now = time.perf_counter()
        wid = str(json.loads(message.body)["id"])
        phase = self.owner.get(wid)
        if phase is not None:
            phase.messages_in += 1
            phase.workflow_finished(wid, True, now)

    # ---- driving -----------------------------------------------------------------------------
    async def publish_start(self, phase: Phase, body: dict[str, Any]) -> None:
        wid = str(body["id"])
        message = aio_pika.Message(
            json.dumps(body, separators=(",", ":")).encode(), content_type="application/json",
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT, message_id=str(uuid.uuid4()), correlation_id=wid,
            type="workflow.start")
        phase.started_at[wid] = time.perf_counter()
        assert self.exchange is not None
        await self.exchange.publish(message, self.names.queue(phase.system.inbound), mandatory=True, timeout=30)

    async def drive(self, phase: Phase, starts: list[dict[str, Any]], rate: float | None, timeout: float) -> None:
        """Publish the start messages — all at once (rate None) or `rate` per second — and wait
        until every workflow of the phase has finished, or fail at `timeout`."""
        for body in starts:
            self.owner[str(body["id"])] = phase
        phase.first_start = time.perf_counter()
        publishing: asyncio.Future[Any]
        if rate is None:
            limit = asyncio.Semaphore(64)

            async def one(body: dict[str, Any]) -> None:
                async with limit:
                    await self.publish_start(phase, body)

            publishing = asyncio.gather(*(one(b) for b in starts))
        else:
            publishing = asyncio.ensure_future(self._paced(phase, starts, rate))
        try:
            await asyncio.wait_for(asyncio.shield(phase.done.wait()), timeout)
        except TimeoutError:
            publishing.cancel()
            raise TimeoutError(f"{phase.system.name} {phase.label}: {len(phase.finished)} of "
                               f"{len(phase.workflow_ids)} workflows finished within {timeout:.0f}s; "
                               f"errors: {phase.errors[:3]}") from None
        await publishing
        for body in starts:
            self.owner.pop(str(body["id"]), None)

    async def _paced(self, phase: Phase, starts: list[dict[str, Any]], rate: float) -> None:
        """Open-loop pacing: start i is due at t0 + i/rate whatever happened to the others."""
        t0 = time.perf_counter()
        sending: list[asyncio.Task[None]] = []
        for i, body in enumerate(starts):
            delay = t0 + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sending.append(asyncio.create_task(self.publish_start(phase, body)))
        await asyncio.gather(*sending)
