"""The payload a worker receives and sends back (SPEC §4.1), as a pydantic model.

Unknown keys are kept, and only keys that were present (or that the worker set) are sent back, so
a request round-trips unchanged in meaning. Validation is strict: a value of the wrong type is
rejected rather than converted, because a conversion (1 -> "1") would change what is echoed.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from workflow_orchestrator.domain.events import prefix as event_prefix

Id = str | int  # the Manager's exchange and broker ids are integers; strings are accepted too


class OrchestrationRequest(BaseModel):
    """A start/continue request: workflow fields + request fields + any unknown keys."""

    model_config = ConfigDict(extra="allow", strict=True, validate_assignment=True)

    # workflow fields
    id: str | None = None
    workflow_id: str | None = None
    deployment_repo: str | None = None
    deployment_repo_git_ref: str | None = None
    source_repo: str | None = None
    source_repo_git_ref: str | None = None
    source_commit_hash: str | None = None
    milestones: list[str] | None = None
    current_step: str | None = None
    elapsed_step_time: Any = None
    elapsed_workflow_time: Any = None
    workflow_duration: Any = None
    workflow_step_durations: dict[str, Any] | None = None
    workflow_error: bool | None = None
    workflow_completed: bool | None = None
    event_log: list[str] | None = None
    workflow_start_time: str | None = None
    step_time: str | None = None
    scheduled_start_time: str | None = None
    execute_options: dict[str, Any] | None = None
    # request fields
    force_build: bool | None = None
    build_messaging_exchange_id: Id | None = None
    deploy_messaging_exchange_id: Id | None = None
    orchestration_queue_name: str | None = None
    workflow_orchestration_exchange_id: Id | None = None
    workflow_orchestration_broker_id: Id | None = None
    notifications_exchange_id: Id | None = None
    notifications_broker_id: Id | None = None
    docker_build_etcd_token: str | None = None
    etcd_token: str | None = None
    deployable_units: list[Any] | None = None
    notifications_config: dict[str, Any] | None = None
    fleet_config: dict[str, Any] | None = None
    aws_config: dict[str, Any] | None = None
    ecs_task_definition: dict[str, Any] | str | None = None
    dispatch_id: str | None = None
    action: str | None = None
    reason: str | None = None

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> OrchestrationRequest:
        """Validate a decoded JSON object (raises pydantic.ValidationError on wrong types)."""
        return cls.model_validate(payload)

    @classmethod
    def from_json(cls, raw: bytes | str) -> OrchestrationRequest:
        """Parse a message body; ValueError if it is not a JSON object."""
        data = json.loads(raw)
        if not isinstance(data, dict):
            raise ValueError(f"not a JSON object but {type(data).__name__}")
        return cls.from_payload(data)

    def to_payload(self) -> dict[str, Any]:
        """The payload: present and set keys only, unknown keys intact."""
        return self.model_dump(mode="json", exclude_unset=True)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of any key, known or unknown (`default` when absent)."""
        if key in type(self).model_fields:
            return getattr(self, key) if key in self.model_fields_set else default
        return (self.__pydantic_extra__ or {}).get(key, default)

    def set(self, key: str, value: Any) -> None:
        """Set any key, known (validated) or unknown; it is then sent."""
        setattr(self, key, value)

    def copy_request(self) -> OrchestrationRequest:
        """A deep copy that keeps which keys were present."""
        return self.model_copy(deep=True)

    @property
    def workflow_ref(self) -> str:
        """The workflow's id (`id`, else `workflow_id`); ValueError when neither is set."""
        wid = self.id or self.workflow_id
        if not wid:
            raise ValueError("the request names no workflow (neither id nor workflow_id is set)")
        return wid

    @property
    def prefix(self) -> str:
        """The event-log prefix `[OA][{id}][{deployment_repo or "Unknown"}]` (SPEC §5.1)."""
        return event_prefix(self.id or self.workflow_id or "", self.deployment_repo)

    def add_event(self, message: str) -> str:
        """Append `"{prefix} {message}"` to the event log; returns the entry."""
        entry = f"{self.prefix} {message}"
        self.event_log = [*(self.event_log or []), entry]
        return entry

    @property
    def room_names(self) -> Any:
        """`notifications_config.hipchat.room_names`, or None."""
        hipchat = (self.notifications_config or {}).get("hipchat")
        return hipchat.get("room_names") if isinstance(hipchat, dict) else None
