"""The service layer: one trigger (a delivery or a fired timer) -> lock, ledger, load, decide,
record, effects. The only place that joins the Manager, the ledger and the broker."""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import structlog
from pydantic import ValidationError

from workflow_orchestrator import jsonio
from workflow_orchestrator.domain.decide import decide, trigger_name
from workflow_orchestrator.domain.models import (
    WORKFLOW_FIELDS,
    Config,
    Decision,
    Delivery,
    HistoryEntry,
    IncomingMessage,
    NeedFact,
    Policy,
    Run,
    TimerFired,
    Trigger,
)
from workflow_orchestrator.ledger.store import InboxRow, Ledger, LedgerRejected, Session, TimerRow
from workflow_orchestrator.manager.client import ManagerClient, ManagerError, NotFound, TransientManagerError
from workflow_orchestrator.messaging.broker import OutMessage, Publisher, PublishFailed
from workflow_orchestrator.messaging.consumer import ACK, Outcome
from workflow_orchestrator.metrics import Metrics
from workflow_orchestrator.settings import Settings

log = structlog.get_logger("workflow_orchestrator.engine")

Clock = Callable[[], datetime]
DeadLetter = Callable[[bytes, str | None, str], Awaitable[None]]  # body, message_id, reason


HEARTBEAT_DETAILS_MAX = 4096  # bytes of a heartbeat's `details` as JSON (SPEC §12)


class BadInput(Exception):
    """The message can never be processed: dead-letter it at once."""


class Transient(Exception):
    """Worth trying again later (Manager, broker or ledger unavailable)."""


def utcnow() -> datetime:
    return datetime.now(UTC)


def config_from(settings: Settings) -> Config:
    return Config(
        exchange_id=settings.exchange_id,
        broker_id=settings.broker_id,
        queue_name=settings.queue_name,
        ui_url=settings.ui_url,
        policies={
            name: Policy(p.timeout.total_seconds(), p.retries, p.retry_backoff.total_seconds(),
                         p.heartbeat_timeout.total_seconds() if p.heartbeat_timeout is not None else None)
            for name, p in settings.milestones.items()
        },
    )


def parse_body(raw: bytes, max_bytes: int) -> tuple[dict[str, Any], IncomingMessage]:
    """Bytes -> (payload, validated view) or BadInput with a reason a human can act on."""
    if len(raw) > max_bytes:
        raise BadInput(f"message is {len(raw)} bytes, over the {max_bytes}-byte limit")
    try:
        payload = jsonio.loads(raw)
    except ValueError as exc:  # also UnicodeDecodeError and json.JSONDecodeError
        raise BadInput(f"not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise BadInput(f"not a JSON object but {type(payload).__name__}")
    try:
        return payload, IncomingMessage.model_validate(payload)
    except ValidationError as exc:
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
        raise BadInput(f"invalid fields: {fields}") from None


def message_key(raw: bytes, message_id: str | None) -> str:
    return f"msg:{message_id}" if message_id else "sha256:" + hashlib.sha256(raw).hexdigest()


class _Facts(Mapping[tuple[str, str], Any]):
    """decide()'s lookups: those fetched for this message, then the Manager client's fresh caches,
    so at steady state decide runs once per message instead of once per missing fact."""

    def __init__(self, manager: ManagerClient) -> None:
        self.manager = manager
        self.local: dict[tuple[str, str], Any] = {}

    def __contains__(self, key: object) -> bool:
        if key in self.local:
            return True
        if not isinstance(key, tuple) or len(key) != 2:
            return False
        hit, value = self.manager.cached_fact(key[0], key[1])
        if hit:
            self.local[key] = value  # pinned: the cache entry may expire before it is read
        return hit

    def __getitem__(self, key: tuple[str, str]) -> Any:
        if key in self:
            return self.local[key]
        raise KeyError(key)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.local)

    def __len__(self) -> int:
        return len(self.local)


class Engine:
    def __init__(self, settings: Settings, manager: ManagerClient, publisher: Publisher, ledger: Ledger,
                 metrics: Metrics, *, clock: Clock = utcnow) -> None:
        self.settings = settings
        self.manager = manager
        self.publisher = publisher
        self.ledger = ledger
        self.metrics = metrics
        self.clock = clock
        self.config = config_from(settings)
        self.dead_letter: DeadLetter | None = None
        self.in_flight = 0

    # ---- deliveries ----------------------------------------------------------------------
    async def on_delivery(self, raw: bytes, message_id: str | None, attempt: int = 1) -> Outcome:
        """Handle one message body; the returned Outcome says how to settle it."""
        self.in_flight += 1
        self.metrics.in_flight.inc()
        started = time.perf_counter()
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(message_id=message_id)
        try:
            return await self._delivery(raw, message_id, attempt)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()
            self.metrics.step_seconds.observe(time.perf_counter() - started)
            structlog.contextvars.clear_contextvars()

    async def _delivery(self, raw: bytes, message_id: str | None, attempt: int) -> Outcome:
        key = message_key(raw, message_id)
        try:
            payload, msg = parse_body(raw, self.settings.max_message_bytes)
            structlog.contextvars.bind_contextvars(workflow_id=msg.id, dispatch_id=msg.dispatch_id,
                                                   milestone=msg.current_step)
            if msg.action == "heartbeat":
                await self._heartbeat(payload, msg, message_id)
            else:
                await self._process(Delivery(payload), msg.id, key, message_id=message_id)
            return ACK
        except BadInput as exc:
            return await self._bad_input(raw, message_id, str(exc))
        except Transient as exc:
            return await self._defer(raw, message_id, attempt, str(exc))

    async def _heartbeat(self, payload: dict[str, Any], msg: IncomingMessage, message_id: str | None) -> None:
        """A worker's heartbeat (SPEC §12): one ledger round trip; no Manager call, event or notification."""
        if not msg.dispatch_id:
            raise BadInput("a heartbeat needs the dispatch_id of the milestone it is about")
        details = payload.get("details")
        size = len(jsonio.dumps(details))
        if size > HEARTBEAT_DETAILS_MAX:
            raise BadInput(f"heartbeat details are {size} bytes, over the {HEARTBEAT_DETAILS_MAX}-byte limit")
        try:
            why = await self.ledger.heartbeat(msg.id, msg.dispatch_id, details, message_id)
        except LedgerRejected as exc:
            raise BadInput(str(exc)) from None
        except (TimeoutError, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise Transient(f"ledger unavailable: {type(exc).__name__}: {exc}") from None
        except asyncpg.DataError as exc:
            raise BadInput(f"the ledger refused the heartbeat: {exc}") from None
        outcome = "current" if why is None else "stale"
        self.metrics.heartbeats.labels(outcome).inc()
        self._count("heartbeat" if why is None else "stale")
        if why is not None:
            log.info("stale heartbeat ignored", why=why)

    async def _bad_input(self, raw: bytes, message_id: str | None, reason: str) -> Outcome:
        log.warning("bad input dead-lettered", reason=reason, size=len(raw))
        self.metrics.messages.labels("dead_lettered").inc()
        self.metrics.dead_lettered.labels("bad_input").inc()
        await self._system_event("Invalid message dead-lettered", reason, message_id, len(raw))
        return Outcome("dead_letter", reason)

    async def _system_event(self, title: str, reason: str, message_id: str | None, size: int) -> None:
        try:
            await self.manager.post_system_event(
                "workflow_orchestrator_dead_letter", "error", f"{title}: {reason}",
                {"reason": reason, "message_id": message_id, "size": size, "hostname": self.settings.hostname,
                 "exchange_id": self.settings.exchange_id, "queue": self.settings.queue_name})
        except ManagerError as exc:
            log.warning("system event not posted", error=str(exc))

    async def _defer(self, raw: bytes, message_id: str | None, attempt: int, reason: str) -> Outcome:
        """Transient failure after in-process retries: park the message in a ledger timer with
        backoff; dead-letter it after `transient_max_attempts`."""
        if attempt >= self.settings.transient_max_attempts:
            log.error("giving up after transient failures", attempts=attempt, reason=reason)
            self.metrics.messages.labels("dead_lettered").inc()
            self.metrics.dead_lettered.labels("transient_exhausted").inc()
            final = f"gave up after {attempt} attempts: {reason}"
            await self._system_event("Message dead-lettered after repeated failures", final, message_id, len(raw))
            return Outcome("dead_letter", final)
        backoff = min(self.settings.transient_backoff.total_seconds() * 2 ** (attempt - 1), 60.0)
        due = self.clock() + timedelta(seconds=backoff)
        try:
            await self.ledger.add_timer("", "redeliver", message_id or "", due, {
                "body": raw.decode("utf-8", "replace"), "message_id": message_id, "attempt": attempt + 1})
        except (TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cannot defer (ledger unavailable); requeueing", error=type(exc).__name__, reason=reason)
            await asyncio.sleep(1.0)  # no hot redelivery loop while everything is down
            return Outcome("requeue", reason)
        log.warning("deferred after transient failure", reason=reason, attempt=attempt, retry_in=backoff)
        self.metrics.messages.labels("deferred").inc()
        self.metrics.deferred.inc()
        return ACK

    # ---- timers --------------------------------------------------------------------------
    async def on_timer(self, timer: TimerRow) -> None:
        """A claimed timer came due: a deferred delivery, or a workflow timer."""
        self.metrics.timers_fired.labels(timer.kind).inc()
        if timer.kind == "redeliver":
            data = timer.payload or {}
            raw = str(data.get("body", "")).encode()
            outcome = await self.on_delivery(raw, data.get("message_id"), int(data.get("attempt", 1)))
            if outcome.kind == "requeue":
                await self.ledger.release_timer(timer.id, self.clock() + timedelta(seconds=5))
                return
            if outcome.kind == "dead_letter" and self.dead_letter is not None:
                await self.dead_letter(raw, data.get("message_id"), outcome.reason)
            await self.ledger.delete_timer(timer.id)
            return
        self.in_flight += 1
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(workflow_id=timer.workflow_id, timer=timer.kind)
        try:
            trigger = TimerFired(timer.kind, timer.token)  # type: ignore[arg-type]
            await self._process(trigger, timer.workflow_id, f"timer:{timer.id}", timer_id=timer.id)
        except (Transient, BadInput) as exc:
            log.warning("timer not processed; will retry", error=str(exc))
            await self.ledger.release_timer(timer.id, self.clock() + timedelta(seconds=5))
        finally:
            self.in_flight -= 1
            structlog.contextvars.clear_contextvars()

    # ---- the step ------------------------------------------------------------------------
    async def _process(self, trigger: Trigger, wid: str, key: str, timer_id: int | None = None,
                       message_id: str | None = None) -> None:
        try:
            async with self.ledger.session(wid, key) as s:
                if s.own is not None and s.own.done:
                    self._count("duplicate", trigger)
                    log.info("duplicate message ignored")
                    await s.note(_history(trigger, "duplicate", message_id,
                                          {"why": f"message {message_id or key} was already processed"}))
                    return
                pending = s.pending
                for row in pending:  # earlier decisions of this workflow first (SPEC §6)
                    await self._apply(s, wid, row)
                if s.own is not None:
                    self._count("resumed")
                    log.info("resumed unfinished effects")
                    return
                if pending:
                    await s.refresh()
                run = s.run
                try:
                    record = await self.manager.get_workflow(wid)
                except NotFound:
                    if timer_id is not None:
                        await self.ledger.delete_timer(timer_id)
                    raise BadInput(f"unknown workflow {wid}") from None
                decision = await self._decide(trigger, record, run, key)
                if decision.outcome != "processed":
                    self._count(decision.outcome, trigger)
                    if timer_id is not None and decision.retry_timer_at is not None:
                        await self.ledger.release_timer(timer_id, decision.retry_timer_at)
                    elif timer_id is not None:
                        await self.ledger.delete_timer(timer_id)
                    log.info("ignored", outcome=decision.outcome, why=decision.note)
                    await s.note(_history(trigger, decision.outcome, message_id, {"why": decision.note}))
                    return
                row = await s.record(decision, _history(trigger, "decided", message_id, decided_detail(decision)))
                await self._apply(s, wid, row)
                self._observe(decision, run)
                self._count_control(trigger, "applied")
        except (TransientManagerError, PublishFailed) as exc:
            raise Transient(str(exc)) from None
        except ManagerError as exc:
            raise BadInput(f"Manager refused: {exc}") from None
        except LedgerRejected as exc:
            raise BadInput(str(exc)) from None
        except (TimeoutError, OSError, asyncpg.PostgresConnectionError, asyncpg.InterfaceError) as exc:
            raise Transient(f"ledger unavailable: {type(exc).__name__}: {exc}") from None

    async def _decide(self, trigger: Trigger, record: dict[str, Any], run: Run | None, key: str) -> Decision:
        now = self.clock()
        facts = _Facts(self.manager)
        for _ in range(16):
            result = decide(trigger=trigger, record=record, run=run, facts=facts, now=now,
                            config=self.config, key=key)
            if isinstance(result, NeedFact):
                facts.local[(result.kind, result.key)] = await self._fetch(result)
                continue
            return result
        raise RuntimeError("decide asked for too many facts")

    async def _fetch(self, need: NeedFact) -> Any:
        m = self.manager
        if need.kind == "build_clusters":
            return await m.get_exchange_build_clusters(need.key)
        if need.kind == "global_build_clusters":
            return await m.get_build_clusters()
        if need.kind == "modules":
            return await m.get_modules(need.key)
        if need.kind == "fresh_modules":
            return await m.get_modules(need.key, fresh=True)
        return await m.get_cluster(need.key)

    async def _apply(self, s: Session, wid: str, row: InboxRow) -> None:
        """Carry out a recorded decision: one PUT, then every publish confirmed, then mark done."""
        effects = row.effects or {}
        record = effects.get("record")
        if record is not None:
            await self.manager.put_workflow(wid, {k: record.get(k) for k in WORKFLOW_FIELDS if k != "id"})
        messages = [OutMessage(m["exchange_id"], m["queue"], m["body"], m["type"], m["message_id"], wid)
                    for m in effects.get("messages", [])]
        await self.publisher.publish_all(messages, attempts=3)
        s.mark_done(row.seq)

    def _count(self, outcome: str, trigger: Trigger | None = None) -> None:
        if trigger is not None:
            self._count_control(trigger, outcome)
        self.metrics.messages.labels(outcome).inc()
        if outcome == "stale":
            self.metrics.stale.inc()
        elif outcome == "duplicate":
            self.metrics.duplicates.inc()

    def _count_control(self, trigger: Trigger, outcome: str) -> None:
        if isinstance(trigger, Delivery) and trigger.body.get("action"):
            self.metrics.control.labels(str(trigger.body["action"]), outcome).inc()

    def _observe(self, decision: Decision, before: Run | None) -> None:
        self.metrics.messages.labels("processed").inc()
        for step in decision.dispatched:
            self.metrics.dispatches.labels(step).inc()
        for step, seconds in decision.completed_steps:
            self.metrics.milestone_seconds.labels(step).observe(seconds)
        run = decision.run
        if decision.finished and run is not None and run.workflow_start_time is not None:
            self.metrics.workflow_seconds.labels(decision.finished).observe(
                (self.clock() - run.workflow_start_time).total_seconds())
        log.info("processed", events=len(decision.events), dispatched=decision.dispatched,
                 finished=decision.finished, step=run.current_step if run else None,
                 previous_step=before.current_step if before else None)


def _history(trigger: Trigger, outcome: str, message_id: str | None, detail: dict[str, Any]) -> HistoryEntry:
    dispatch_id: Any
    by: Any
    if isinstance(trigger, TimerFired):
        dispatch_id, by = trigger.token, None
    else:
        dispatch_id, by = trigger.body.get("dispatch_id"), trigger.body.get("requested_by")
    return HistoryEntry(trigger_name(trigger), outcome, message_id,  # type: ignore[arg-type]
                        None if dispatch_id is None else str(dispatch_id), None if by is None else str(by), detail)


def decided_detail(decision: Decision) -> dict[str, Any]:
    """What a decision did, for the history (SPEC §13): events, messages, timers, the run after it."""
    run = decision.run
    return {
        "events": decision.events,
        "messages": [{"queue": m.queue, "type": m.type, "exchange_id": m.exchange_id,
                      "dispatch_id": m.body.get("dispatch_id") if m.type.endswith(".request") else None}
                     for m in decision.messages],
        "timers_set": [{"kind": t.kind, "due_at": t.due_at.isoformat()} for t in decision.timers],
        "timers_cleared": decision.cancel_timers,
        "dispatched": decision.dispatched,
        "completed_steps": [[step, seconds] for step, seconds in decision.completed_steps],
        "finished": decision.finished,
        "step": run.current_step if run else None,
        "phase": run.phase if run else None,
        "attempt": run.attempt if run else None,
        "paused": run.paused if run else None,
        "held_step": run.held_step if run else None,
    }
