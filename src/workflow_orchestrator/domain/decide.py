"""decide(): every orchestration rule of SPEC §5 as one pure function.

It takes the Manager record, the trigger (a delivery or a fired timer), the run state from the
ledger, the looked-up facts and `now`, and returns a Decision. When it needs a lookup it was not
given it returns NeedFact; the shell fetches it and calls again (decide is cheap and
deterministic: ids are uuid5 of the trigger's key, the cluster pick is seeded by it).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from workflow_orchestrator.domain.events import (
    elapsed_since,
    format_elapsed,
    iso,
    parse_time,
    prefix,
    rfc1123,
    round_half_away,
)
from workflow_orchestrator.domain.models import (
    MILESTONE_QUEUES,
    PROTECTED_FIELDS,
    TRANSIENT_FIELDS,
    WORKFLOW_FIELDS,
    Config,
    Decision,
    NeedFact,
    Outgoing,
    Phase,
    Run,
    TimerFired,
    TimerSpec,
    Trigger,
)

Facts = Mapping[tuple[str, str], Any]
_NS = uuid.UUID("6b1f0d4e-3c55-4f7e-9a51-2a8f7e0c9b11")
WORKER_FAILURE = "Milestone worker has reported a failure"


class _Need(Exception):
    def __init__(self, need: NeedFact) -> None:
        self.need = need


def decide(
    *,
    trigger: Trigger,
    record: Mapping[str, Any],
    run: Run | None,
    facts: Facts,
    now: datetime,
    config: Config,
    key: str,
) -> Decision | NeedFact:
    """The decision for one trigger; see the module docstring."""
    try:
        return _Step(trigger, record, run, facts, now, config, key).decide()
    except _Need as need:
        return need.need


CONTROL_ACTIONS: tuple[str, ...] = ("cancel", "pause", "resume", "retry", "heartbeat")


def is_start(body: Mapping[str, Any]) -> bool:
    """A message that names no dispatch and no current step asks to start the workflow."""
    return not body.get("dispatch_id") and not body.get("current_step") and not body.get("action")


def trigger_name(trigger: Trigger) -> str:
    """The history's name of a trigger (SPEC §13)."""
    if isinstance(trigger, TimerFired):
        return f"timer:{trigger.kind}"
    action = trigger.body.get("action")
    if action == "heartbeat":
        return "heartbeat"
    if action:
        return f"control:{action}"
    return "start" if is_start(trigger.body) else "callback"


def _who(body: Mapping[str, Any]) -> str:
    return str(body.get("requested_by") or "unknown")


def _because(body: Mapping[str, Any]) -> str:
    reason = body.get("reason")
    return f": {reason}" if reason else ""


class _Step:
    def __init__(self, trigger: Trigger, record: Mapping[str, Any], run: Run | None, facts: Facts,
                 now: datetime, config: Config, key: str) -> None:
        self.trigger = trigger
        self.record = record
        self.run = run
        self.facts = facts
        self.now = now
        self.config = config
        self.key = key
        self.wid = str(record["id"])
        self.n = 0
        self.wf: dict[str, Any] = {}
        self.request: dict[str, Any] = {}
        self.outgoing: list[Outgoing] = []
        self.timers: list[TimerSpec] = []
        self.events: list[str] = []
        self.dispatched: list[str] = []
        self.pending_dispatch: tuple[str, str, str] | None = None  # exchange, queue, dispatch_id
        self.phase: Phase = run.phase if run else "dispatched"
        self.dispatch_id: str | None = run.dispatch_id if run else None
        self.attempt = run.attempt if run else 1
        self.dispatched_at = run.dispatched_at if run else None
        self.paused = run.paused if run else False
        self.held_step = run.held_step if run else None
        self.deadline = run.deadline if run else None
        self.heartbeat_timeout = run.heartbeat_timeout if run else None
        self.cancel_timers = True  # a pause or a resume with nothing held leaves the timers as they are
        self.retry_timer_at: datetime | None = None
        self.step_time: datetime | None = None
        self.start_time: datetime = now
        self.finished: str | None = None
        self.completed_steps: list[tuple[str, float]] = []

    # ---- entry ---------------------------------------------------------------------------
    def decide(self) -> Decision:
        t = self.trigger
        if isinstance(t, TimerFired):
            return self._timer(t)
        body = t.body
        action = body.get("action")
        if action:
            return self._control(str(action), body)
        if is_start(body):
            if self.run is not None or self.record.get("current_step") or self.record.get("workflow_completed"):
                return self._ignore("duplicate", "start of a workflow that has already started")
        elif (why := self._callback_staleness(body)) is not None:
            return self._ignore("stale", why)
        self._begin(body)
        if self.wf["workflow_completed"]:
            if self.wf["workflow_error"]:
                self._fail_or_retry(WORKER_FAILURE)
            else:
                self._finish()
        else:
            self._advance()
        return self._result()

    # ---- operator control (SPEC §12) -----------------------------------------------------
    def _control(self, action: str, body: Mapping[str, Any]) -> Decision:
        if action == "cancel":
            if self._finished():
                return self._ignore("stale", "cancel of a finished workflow")
            self._begin(None)
            reason = body.get("reason") or "no reason given"
            by = body.get("requested_by")
            self._fail(f"Workflow cancelled by {by}: {reason}" if by else f"Workflow cancelled: {reason}")
            return self._result()
        if action == "pause":
            if (why := self._not_running()) is not None:
                return self._ignore("stale", f"pause of a workflow that {why}")
            if self.paused:
                return self._ignore("stale", "pause of a workflow that is already paused")
            self._begin(None)
            self.paused = True
            self.cancel_timers = False
            self._event(f"Workflow paused by {_who(body)}{_because(body)}")
            return self._result()
        if action == "resume":
            if self._finished():
                return self._ignore("stale", "resume of a finished workflow")
            if not self.paused:
                return self._ignore("stale", "resume of a workflow that is not paused")
            self._begin(None)
            self.paused = False
            self._event(f"Workflow resumed by {_who(body)}{_because(body)}")
            held, self.held_step = self.held_step, None
            if self.phase == "held" and held:
                self._start(held)
            else:
                self.cancel_timers = False
            return self._result()
        if action == "retry":
            return self._retry(body)
        return self._ignore("stale", f"unknown action {action}")

    def _not_running(self) -> str | None:
        if self._finished():
            return "has finished"
        if self.run is None and not self.record.get("current_step"):
            return "has not started"
        return None

    def _retry(self, body: Mapping[str, Any]) -> Decision:
        """Retry a failed workflow from its failed milestone, or re-run a finished one from `from_step`."""
        if not self._finished():
            return self._ignore("stale", "retry of a workflow that has not finished")
        milestones = [str(m) for m in self.record.get("milestones") or []]
        from_step = body.get("from_step")
        if from_step:
            if from_step not in milestones:
                return self._ignore("stale", f"from_step {from_step} is not one of the workflow's milestones "
                                             f"({', '.join(milestones) or 'none'})")
            step = str(from_step)
        else:
            failed = self.run.result == "failed" if self.run is not None else bool(self.record.get("workflow_error"))
            if not failed:
                return self._ignore("stale", "retry of a workflow that succeeded (name a milestone with from_step "
                                             "to re-run it)")
            if not milestones:
                return self._ignore("stale", "retry of a workflow without milestones")
            current = (self.run.current_step if self.run is not None else None) or self.record.get("current_step")
            step = str(current) if current in milestones else milestones[0]
        self._begin(None)
        wf = self.wf
        wf["workflow_completed"] = False
        wf["workflow_error"] = False
        wf["workflow_duration"] = None
        self.paused, self.held_step, self.attempt = False, None, 1
        self._event(f"Workflow retried from milestone {step} by {_who(body)}{_because(body)}")
        self._start(step)
        return self._result()

    def _finished(self) -> bool:
        if self.run is not None:
            return self.run.phase == "finished"
        return bool(self.record.get("workflow_completed"))

    def _callback_staleness(self, body: Mapping[str, Any]) -> str | None:
        if self._finished():
            return "callback for a finished workflow"
        run = self.run
        if run is not None and run.phase == "held":
            return f"no milestone is in flight: the workflow is paused and holds milestone {run.held_step}"
        if body.get("dispatch_id") and run is not None and run.dispatch_id:
            if body["dispatch_id"] != run.dispatch_id or run.phase != "dispatched":
                return f"dispatch {body['dispatch_id']} is not the current dispatch {run.dispatch_id}"
            return None
        current = run.current_step if run else self.record.get("current_step")
        if body.get("current_step") != current:
            return f"callback for step {body.get('current_step')} but the current step is {current}"
        return None

    def _timer(self, t: TimerFired) -> Decision:
        run = self.run
        expected: dict[str, Phase] = {"scheduled": "waiting", "timeout": "dispatched", "retry": "backoff",
                                      "heartbeat": "dispatched"}
        if run is None or run.dispatch_id != t.token or run.phase != expected[t.kind]:
            return self._ignore("stale", f"{t.kind} timer is no longer current")
        if t.kind == "heartbeat":
            last = run.heartbeat_at or run.dispatched_at
            if run.heartbeat_timeout is None or last is None:
                return self._ignore("stale", "the milestone has no heartbeat timeout")
            due = last + timedelta(seconds=run.heartbeat_timeout)
            if due > self.now:  # a heartbeat came since the timer was armed: not due yet
                decision = self._ignore("stale", "a heartbeat came since; the timer is re-armed")
                decision.retry_timer_at = due
                return decision
        self._begin(None)
        step = str(self.wf["current_step"])
        if t.kind == "scheduled":
            self._scheduled()
        elif t.kind == "timeout":
            self._fail_or_retry(f"Milestone {step} timed out after {elapsed_since(run.dispatched_at, self.now)}")
        elif t.kind == "heartbeat":
            last = run.heartbeat_at or run.dispatched_at
            self._fail_or_retry(f"Milestone {step} sent no heartbeat for {elapsed_since(last, self.now)}")
        else:
            self._start(step)  # the retry's re-dispatch starts the milestone like any other (SPEC §5.6)
        return self._result()

    # ---- state ---------------------------------------------------------------------------
    def _begin(self, body: Mapping[str, Any] | None) -> None:
        """Overlay the message on the record (SPEC §5.0) and apply the defaults (§5.2.1)."""
        rec = self.record
        wf = {k: rec.get(k) for k in WORKFLOW_FIELDS}
        wf["id"] = self.wid
        log = list(rec.get("event_log") or [])
        if body is not None:
            for k, v in body.items():
                if k in WORKFLOW_FIELDS and k not in PROTECTED_FIELDS and k != "event_log" and v is not None:
                    wf[k] = v
            seen = set(log)
            for entry in body.get("event_log") or []:
                if entry not in seen:
                    log.append(entry)
                    seen.add(entry)
            self.request = {k: v for k, v in body.items() if k not in WORKFLOW_FIELDS and k not in TRANSIENT_FIELDS}
        elif self.run is not None:
            self.request = dict(self.run.request)
        wf["event_log"] = log
        run = self.run
        wf["current_step"] = run.current_step if run else rec.get("current_step")
        start = (run.workflow_start_time if run else None) or parse_time(wf.get("workflow_start_time")) or self.now
        self.start_time = start
        wf["workflow_start_time"] = iso(start)
        self.step_time = (run.step_time if run else None) or parse_time(wf.get("step_time"))
        wf["workflow_completed"] = bool(wf.get("workflow_completed"))
        wf["workflow_error"] = bool(wf.get("workflow_error"))
        wf["workflow_step_durations"] = dict(wf.get("workflow_step_durations") or {})
        self.wf = wf

    def _new_id(self) -> str:
        self.n += 1
        return str(uuid.uuid5(_NS, f"{self.key}:{self.n}"))

    def _fact(self, kind: str, key: str) -> Any:
        k = (kind, key)
        if k not in self.facts:
            raise _Need(NeedFact(kind, key))  # type: ignore[arg-type]
        return self.facts[k]

    def _event(self, message: str, success: bool = True) -> None:
        pre = prefix(self.wid, self.wf.get("deployment_repo"))
        self.wf["event_log"].append(f"{pre} {message}")
        self.events.append(message)
        rooms = _dig(self.request, "notifications_config", "hipchat", "room_names")
        body = {"is_success": success, "prefix": pre, "message": message, "room_names": rooms}
        self.outgoing.append(Outgoing(self.config.exchange_id, "notifications_hipchat", body,
                                      "notification.chat", self._new_id()))

    # ---- milestones ----------------------------------------------------------------------
    def _advance(self) -> None:
        """Complete the current step and start the next one (SPEC §5.2.3)."""
        wf = self.wf
        step = wf["current_step"]
        milestones = [str(m) for m in wf.get("milestones") or []]
        if not step:
            self._event("Starting workflow...")
            nxt_index = 0
        else:
            if step not in milestones:
                self._fail(f"The current step {step} is not one of the workflow's milestones "
                           f"({', '.join(milestones) or 'none'})")
                return
            self._complete_step(step)
            nxt_index = milestones.index(step) + 1
        if nxt_index >= len(milestones):
            wf["workflow_completed"] = True
            wf["workflow_duration"] = elapsed_since(self.start_time, self.now)
            self._event(f"Workflow completed in {wf['workflow_duration']}")
            self._finish()
            return
        self.attempt = 1
        self._start(milestones[nxt_index])

    def _start(self, step: str) -> None:
        """Start a milestone, or hold it while the workflow is paused (SPEC §12): `current_step`
        then stays the last completed (or, for a retry, the failed) milestone."""
        if self.paused:
            self._event(f"Workflow is paused; milestone {step} will start when it is resumed")
            self.phase, self.held_step = "held", step
            return
        self.step_time = self.now
        self.wf["step_time"] = iso(self.now)
        self._event(f"Starting Workflow Milestone: {step}")
        self.wf["current_step"] = step
        self._run_milestone(step)

    def _complete_step(self, step: str) -> None:
        took = elapsed_since(self.step_time, self.now)
        if self.step_time is not None:
            self.completed_steps.append((step, (self.now - self.step_time).total_seconds()))
        self.wf["workflow_step_durations"][step] = took
        self._event(f"Completed Workflow Milestone: {step}, in {took}")

    def _run_milestone(self, step: str) -> None:
        if step == "scheduled":
            self._scheduled()
        elif step in ("build", "config"):
            self._build(step)
        elif step in ("deploy", "deploy_oa"):
            self._deploy(step)
        elif step == "deploy_ecs":
            self._deploy_ecs()
        else:
            self._fail(f"Unknown milestone {step}: expected one of build, config, deploy, deploy_oa, "
                       "deploy_ecs, scheduled")

    def _has_module(self, exchange_id: str, kind: str) -> bool:
        """A module of `kind` in the exchange. The module list may be cached (30 s); before failing
        a workflow for want of a worker, ask once for a fresh list (one that just registered)."""
        if any(m.get("type") == kind for m in self._fact("modules", exchange_id) or []):
            return True
        return any(m.get("type") == kind for m in self._fact("fresh_modules", exchange_id) or [])

    def _build(self, step: str) -> None:
        clusters = self._fact("build_clusters", self.config.exchange_id) or self._fact("global_build_clusters", "")
        if not clusters:
            self._fail(f"Unable to request {step} - no build clusters are available!")
            return
        ordered = sorted(clusters, key=lambda c: str(c.get("etcd_token")))
        cluster = random.Random(self.key).choice(ordered)
        token = cluster.get("etcd_token")
        exchange = _text(cluster.get("messaging_exchange_id"))
        override = _text(self.request.get("build_messaging_exchange_id"))
        if override:
            exchange = override
            self._event(f"The Workflow request has overriden the default build messaging_exchange_id to {override}")
        if not exchange or not self._has_module(exchange, "builder"):
            self._fail(f"Unable to request {step} - no Builders are currently accessible in exchange {exchange}!")
            return
        self._event(f"Dispatching a {step} request to exchange {exchange}, docker build cluster {token}...")
        self.request["docker_build_etcd_token"] = token
        self._dispatch(exchange, "builder", step)

    def _deploy(self, step: str) -> None:
        token = self.request.get("etcd_token")
        if not token:
            self._fail("Unable to execute deployment - an invalid deployment cluster was provided!")
            return
        override = _text(self.request.get("deploy_messaging_exchange_id"))
        if override:
            exchange = override
            self._event(f"The Workflow request has overriden the default deploy messaging_exchange_id to {override}")
        else:
            cluster = self._fact("cluster", str(token))
            exchange = _text((cluster or {}).get("messaging_exchange_id"))
            if not exchange:
                self._fail(f"Unable to request deploy to cluster {token} - cluster is not associated with an exchange!")
                return
        if not self._has_module(exchange, "deployer"):
            self._fail(f"Unable to request deploy - no deploy clusters are available in exchange {exchange}!")
            return
        self._event(f"Dispatching a deploy request to exchange {exchange}, deployment cluster {token}...")
        self._dispatch(exchange, MILESTONE_QUEUES[step], step)

    def _deploy_ecs(self) -> None:
        exchange = self.config.exchange_id
        if not self._has_module(exchange, "deployer"):
            self._fail(f"Unable to request deploy to ECS - no deploy clusters are available in exchange {exchange}!")
            return
        self._event(f"Dispatching an ECS deploy request to exchange {exchange}...")
        self._dispatch(exchange, "deployer", "deploy_ecs")

    def _scheduled(self) -> None:
        at = parse_time(self.wf.get("scheduled_start_time"))
        if at is None:
            self._fail("Unable to execute deployment - the scheduled milestone was invoked, "
                       "but no scheduled_start_time was set!")
            return
        if at > self.now:
            remain = round_half_away((at - self.now).total_seconds())
            self._event(f"Workflow is not scheduled to start until {rfc1123(at)} ({remain} seconds remain)")
            token = self._new_id()
            self.timers.append(TimerSpec("scheduled", at, token))
            self.phase, self.dispatch_id = "waiting", token
            return
        self._event("Workflow is now scheduled to start")
        self._advance()

    def _dispatch(self, exchange: str, queue: str, step: str) -> None:
        dispatch_id = self._new_id()
        self.pending_dispatch = (exchange, queue, dispatch_id)
        self.dispatched.append(step)
        self.phase, self.dispatch_id, self.dispatched_at = "dispatched", dispatch_id, self.now
        policy = self.config.policy(step)
        self.deadline = self.now + timedelta(seconds=policy.timeout_seconds)
        self.timers.append(TimerSpec("timeout", self.deadline, dispatch_id))
        self.heartbeat_timeout = policy.heartbeat_timeout_seconds
        if self.heartbeat_timeout is not None:
            self.timers.append(TimerSpec("heartbeat", self.now + timedelta(seconds=self.heartbeat_timeout),
                                         dispatch_id))

    # ---- failure and finish --------------------------------------------------------------
    def _fail_or_retry(self, reason: str) -> None:
        step = self.wf.get("current_step")
        policy = self.config.policy(str(step))
        if step and self.attempt <= policy.retries:
            backoff = policy.retry_backoff_seconds
            self._event(f"Milestone {step} failed (attempt {self.attempt} of {policy.retries + 1}): {reason}; "
                        f"retrying in {format_elapsed(backoff)}", success=False)
            self.wf["workflow_completed"] = False
            self.wf["workflow_error"] = False
            token = self._new_id()
            self.timers.append(TimerSpec("retry", self.now + timedelta(seconds=backoff), token))
            self.phase, self.dispatch_id = "backoff", token
            self.attempt += 1
            return
        self._fail(reason)

    def _fail(self, reason: str) -> None:
        wf = self.wf
        started = True
        if self.phase == "held" and self.held_step:  # the held milestone fails without having started
            wf["current_step"], self.held_step, started = self.held_step, None, False
        step = wf.get("current_step")
        self._event(f"Workflow Milestone Failed: {step or '(not started)'}. Reason: {reason}", success=False)
        wf["workflow_completed"] = True
        wf["workflow_error"] = True
        wf["workflow_duration"] = elapsed_since(self.start_time, self.now)
        self._event(f"Workflow has failed in {wf['workflow_duration']}", success=False)
        if step and started:
            self._complete_step(str(step))
        self.pending_dispatch = None
        self._finish()

    def _finish(self) -> None:
        wf = self.wf
        self.finished = "failed" if wf["workflow_error"] else "completed"
        self.phase = "finished"
        self.paused, self.held_step = False, None
        recipients = self._email_recipients()
        if recipients:
            self._event("Sending on_workflow_completed email notification to the following recipient(s): "
                        + ", ".join(recipients))
            pre = prefix(self.wid, wf.get("deployment_repo"))
            subject = f"FAILED - {pre}" if wf["workflow_error"] else f"SUCCEEDED {pre}"
            if wf.get("source_repo") and wf.get("source_repo_git_ref"):
                head = f"Source Commit:\n{wf['source_repo']}/commit/{wf['source_repo_git_ref']}"
            elif wf.get("source_repo"):
                head = f"Source Repo:\n{wf['source_repo']}"
            else:
                head = f"Deployment Repo:\nhttps://github.com/{wf.get('deployment_repo')}"
            body = (f"{head}\n\nFor more information, please see:\n"
                    f"{self.config.ui_url}/index.html#/oa/workflows/workflows/{self.wid}")
            email = {"prefix": subject, "message": body, "notifications": {"email_addresses": recipients}}
            self.outgoing.append(Outgoing(self.config.exchange_id, "notifications_email", email,
                                          "notification.email", self._new_id()))

    def _email_recipients(self) -> list[str]:
        email = _dig(self.request, "notifications_config", "email") or {}
        if not isinstance(email, dict):
            return []
        wanted = _dig(email, "events", "on_workflow_completed") or []
        groups = email.get("groups") or {}
        out: list[str] = []
        for name in wanted if isinstance(wanted, list) else [wanted]:
            members = groups.get(name) if isinstance(groups, dict) else None
            for addr in members if isinstance(members, list) else [name]:
                if isinstance(addr, str) and addr and addr not in out:
                    out.append(addr)
        return out

    # ---- result --------------------------------------------------------------------------
    def _ignore(self, outcome: str, why: str) -> Decision:
        return Decision(outcome=outcome, workflow_id=self.wid, note=why)  # type: ignore[arg-type]

    def _result(self) -> Decision:
        wf = self.wf
        if self.pending_dispatch is not None:
            exchange, queue, dispatch_id = self.pending_dispatch
            body = {**wf, "workflow_id": self.wid, **self.request, **self._routing(), "dispatch_id": dispatch_id}
            self.outgoing.append(Outgoing(exchange, queue, body, f"{queue}.request", self._new_id()))
        run = Run(
            workflow_id=self.wid,
            current_step=wf.get("current_step"),
            dispatch_id=self.dispatch_id,
            attempt=self.attempt,
            phase=self.phase,
            workflow_start_time=self.start_time,
            step_time=self.step_time,
            dispatched_at=self.dispatched_at,
            request=self.request,
            deployment_repo=_text(wf.get("deployment_repo")) or None,
            milestones=tuple(str(m) for m in wf.get("milestones") or []),
            result=None if self.phase != "finished" else "failed" if wf["workflow_error"] else "succeeded",
            paused=self.paused,
            held_step=self.held_step,
            deadline=self.deadline if self.phase == "dispatched" else None,
            heartbeat_timeout=self.heartbeat_timeout if self.phase == "dispatched" else None,
        )
        return Decision(
            outcome="processed",
            workflow_id=self.wid,
            record=dict(wf),
            messages=self.outgoing,
            run=run,
            timers=[] if self.phase == "finished" else self.timers,
            cancel_timers=self.cancel_timers,
            events=self.events,
            dispatched=self.dispatched,
            finished=self.finished,  # type: ignore[arg-type]
            completed_steps=self.completed_steps,
        )

    def _routing(self) -> dict[str, Any]:
        c = self.config
        return {
            "notifications_exchange_id": c.exchange_id,
            "notifications_broker_id": c.broker_id,
            "workflow_orchestration_exchange_id": c.exchange_id,
            "workflow_orchestration_broker_id": c.broker_id,
            "orchestration_queue_name": c.queue_name,
        }


def _dig(data: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(data, dict):
            return None
        data = data.get(p)
    return data


def _text(value: Any) -> str:
    return "" if value is None or value == "" else str(value)
