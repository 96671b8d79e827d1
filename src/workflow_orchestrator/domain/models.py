"""Plain data the core decides over: payload field sets, run state, triggers, decisions."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, StrictBool, field_validator

# SPEC §4.1: the fields the Manager stores for a workflow.
WORKFLOW_FIELDS: tuple[str, ...] = (
    "id", "deployment_repo", "deployment_repo_git_ref", "source_repo", "source_repo_git_ref",
    "source_commit_hash", "milestones", "current_step", "elapsed_step_time", "elapsed_workflow_time",
    "workflow_duration", "workflow_step_durations", "workflow_error", "workflow_completed", "event_log",
    "workflow_start_time", "step_time", "scheduled_start_time", "execute_options",
)
# Payload keys that belong to one message only and are never carried into the next one.
TRANSIENT_FIELDS: frozenset[str] = frozenset({"dispatch_id", "action", "reason", "workflow_id", "requested_by",
                                             "from_step", "details"})
# Taken from the record and the run, never from a message (SPEC §5.0).
PROTECTED_FIELDS: frozenset[str] = frozenset({"id", "milestones", "current_step"})

# Logical queue of each dispatching milestone (SPEC §5.3).
MILESTONE_QUEUES: dict[str, str] = {
    "build": "builder", "config": "builder", "deploy": "deployer", "deploy_oa": "deploy_oa",
    "deploy_ecs": "deployer",
}
KNOWN_MILESTONES: frozenset[str] = frozenset({*MILESTONE_QUEUES, "scheduled"})

# dispatched: a milestone is in flight; waiting: a scheduled start; backoff: a retry is due later;
# held: a pause holds the milestone that would have started (SPEC §12); finished.
Phase = Literal["dispatched", "waiting", "backoff", "held", "finished"]
TimerKind = Literal["scheduled", "timeout", "retry", "heartbeat"]


class IncomingMessage(BaseModel):
    """Validates the known fields of an incoming payload; unknown keys are kept as they are."""

    model_config = ConfigDict(extra="allow", strict=False)

    id: str
    workflow_id: str | None = None
    milestones: list[str] | None = None
    current_step: str | None = None
    event_log: list[str] | None = None
    workflow_completed: StrictBool | None = None
    workflow_error: StrictBool | None = None
    workflow_step_durations: dict[str, Any] | None = None
    execute_options: dict[str, Any] | None = None
    notifications_config: dict[str, Any] | None = None
    deployable_units: list[Any] | None = None
    dispatch_id: str | None = None
    action: Literal["cancel", "pause", "resume", "retry", "heartbeat"] | None = None
    reason: str | None = None
    requested_by: str | None = None
    from_step: str | None = None
    force_build: StrictBool | None = None

    @field_validator("id")
    @classmethod
    def _id_not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be empty")
        return v

    @field_validator("id", "workflow_id", "dispatch_id", mode="before")
    @classmethod
    def _ids_are_text(cls, v: Any) -> Any:
        if isinstance(v, bool) or not isinstance(v, str | int | None):
            raise ValueError("must be a string")
        return str(v) if isinstance(v, int) else v


@dataclass(frozen=True)
class Run:
    """The orchestrator's own memory of one workflow run (the ledger row)."""

    workflow_id: str
    current_step: str | None
    dispatch_id: str | None
    attempt: int
    phase: Phase
    workflow_start_time: datetime | None
    step_time: datetime | None
    dispatched_at: datetime | None
    request: dict[str, Any] = field(default_factory=dict)
    # What a list of runs shows without asking the Manager (the console's read model).
    deployment_repo: str | None = None
    milestones: tuple[str, ...] = ()
    result: Literal["succeeded", "failed"] | None = None
    # Operator control (SPEC §12).
    paused: bool = False
    held_step: str | None = None  # the milestone a pause holds; it starts on resume
    deadline: datetime | None = None  # the current dispatch's timeout
    heartbeat_timeout: float | None = None  # seconds, of the current dispatch's milestone
    heartbeat_at: datetime | None = None  # the last heartbeat of the current dispatch (written by heartbeats)


@dataclass(frozen=True)
class Delivery:
    """A message from the orchestration queue (start, callback or control)."""

    body: dict[str, Any]


@dataclass(frozen=True)
class TimerFired:
    """A durable timer came due. `token` is the run's dispatch_id when it was armed."""

    kind: TimerKind
    token: str


Trigger = Delivery | TimerFired


@dataclass(frozen=True)
class Outgoing:
    """One message to publish: logical queue `queue` in messaging exchange `exchange_id`."""

    exchange_id: str
    queue: str
    body: dict[str, Any]
    type: str
    message_id: str


@dataclass(frozen=True)
class TimerSpec:
    kind: TimerKind
    due_at: datetime
    token: str


@dataclass(frozen=True)
class Policy:
    timeout_seconds: float
    retries: int
    retry_backoff_seconds: float
    heartbeat_timeout_seconds: float | None = None


@dataclass(frozen=True)
class Config:
    """What decide needs to know about this instance."""

    exchange_id: str
    broker_id: str
    queue_name: str
    ui_url: str
    policies: dict[str, Policy]

    def policy(self, milestone: str) -> Policy:
        return self.policies.get(milestone, Policy(3600.0, 0, 30.0))


@dataclass(frozen=True)
class NeedFact:
    """decide() needs a lookup it was not given; the shell fetches it and calls again."""

    kind: Literal["build_clusters", "global_build_clusters", "modules", "fresh_modules", "cluster"]
    key: str


Outcome = Literal["processed", "stale", "duplicate"]


@dataclass
class Decision:
    """Everything a message or timer causes. Recorded in the ledger before any effect."""

    outcome: Outcome
    workflow_id: str
    record: dict[str, Any] | None = None  # workflow fields to PUT; None: the record is not touched
    messages: list[Outgoing] = field(default_factory=list)
    run: Run | None = None  # the new run state; None: unchanged
    timers: list[TimerSpec] = field(default_factory=list)
    cancel_timers: bool = False
    note: str = ""
    events: list[str] = field(default_factory=list)
    dispatched: list[str] = field(default_factory=list)  # milestones dispatched (metrics)
    finished: Literal["completed", "failed"] | None = None
    completed_steps: list[tuple[str, float]] = field(default_factory=list)  # (milestone, seconds)
    retry_timer_at: datetime | None = None  # a stale timer that is not due yet goes back for then


@dataclass(frozen=True)
class HistoryEntry:
    """One line of a workflow's history (SPEC §13): what came, and what became of it."""

    trigger: str  # start, callback, control:{action}, timer:{kind}, heartbeat
    outcome: Literal["decided", "stale", "duplicate", "deferred", "dead-lettered"]
    message_id: str | None = None
    dispatch_id: str | None = None
    requested_by: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)
