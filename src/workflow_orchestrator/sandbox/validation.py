"""Request bodies: strict JSON parsing and the models of what each route accepts.

Every rejection is a `BadRequest` carrying field errors, turned into a 400 by the app; input never
reaches Postgres unless it is storable (no NUL characters, no lone surrogates, finite numbers).
"""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

WORKFLOW_FIELDS = (
    "id", "deployment_repo", "deployment_repo_git_ref", "source_repo", "source_repo_git_ref",
    "source_commit_hash", "milestones", "current_step", "elapsed_step_time", "elapsed_workflow_time",
    "workflow_duration", "workflow_step_durations", "workflow_error", "workflow_completed", "event_log",
    "workflow_start_time", "step_time", "scheduled_start_time", "execute_options",
)


class BadRequest(Exception):
    """Input that cannot be accepted; `fields` maps a dotted field path to what is wrong."""

    def __init__(self, error: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.error = error
        self.fields = fields or {}


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


def parse_json(raw: bytes, *, empty: Any = ...) -> Any:
    """Decode a UTF-8 JSON body; `empty` is returned for a blank body when given."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("the body is not UTF-8") from None
    if not text.strip():
        if empty is ...:
            raise BadRequest("a JSON body is required")
        return empty
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise BadRequest("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError is a ValueError, as are the hooks' errors
        raise BadRequest(f"malformed JSON: {exc}") from None
    problems: dict[str, str] = {}
    _check_storable(value, "", problems)
    if problems:
        raise BadRequest("the body contains text that cannot be stored", problems)
    return value


def _check_storable(value: Any, path: str, problems: dict[str, str]) -> None:
    # Postgres text and jsonb cannot hold U+0000, and a lone surrogate has no UTF-8 encoding.
    if isinstance(value, str):
        if not storable_text(value):
            problems[path or "(body)"] = "contains a NUL character or an unpaired surrogate"
    elif isinstance(value, dict):
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            if not storable_text(k):
                problems[path or "(body)"] = "a key contains a NUL character or an unpaired surrogate"
            else:
                _check_storable(v, sub, problems)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _check_storable(v, f"{path}.{i}" if path else str(i), problems)


def storable_text(value: str) -> bool:
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def require_object(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise BadRequest("the body must be a JSON object")
    return value


M = TypeVar("M", bound=BaseModel)


def validate(model: type[M], data: dict[str, Any], what: str) -> M:
    """`model` from `data`, or BadRequest naming every bad field."""
    try:
        return model.model_validate(data, strict=True)
    except ValidationError as exc:
        fields: dict[str, str] = {}
        for err in exc.errors(include_url=False):
            path = _input_path(data, err["loc"], missing=err["type"] == "missing")
            fields.setdefault(path or "(body)", err["msg"])
        raise BadRequest(f"invalid {what}", fields) from None


def _input_path(data: Any, loc: tuple[int | str, ...], *, missing: bool) -> str:
    """The dotted path of `loc` in the input, without pydantic's union-member tags
    (`x.constrained-int` becomes `x`)."""
    parts: list[str] = []
    current = data
    for i, part in enumerate(loc):
        in_dict = isinstance(current, dict) and part in current
        in_list = isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current)
        if in_dict or in_list:
            current = current[part]
        elif not (missing and i == len(loc) - 1):
            continue
        parts.append(str(part))
    return ".".join(parts)


def trim_repo(value: str) -> str:
    """Repos are stored without surrounding blanks or trailing `/` (or `\\`), as the Manager does."""
    return value.strip().rstrip("/\\")


NonEmpty = Annotated[str, Field(min_length=1)]
_HAS_ALNUM = re.compile(r"[A-Za-z0-9]")


class WorkflowPatch(BaseModel):
    """The workflow fields a PUT may change (all optional); unknown keys are dropped."""

    model_config = ConfigDict(extra="ignore")

    deployment_repo: NonEmpty | None = None
    deployment_repo_git_ref: str | None = None
    source_repo: str | None = None
    source_repo_git_ref: str | None = None
    source_commit_hash: str | None = None
    milestones: list[str] | None = None
    current_step: str | None = None
    elapsed_step_time: str | None = None
    elapsed_workflow_time: str | None = None
    workflow_duration: str | None = None
    workflow_step_durations: dict[str, str] | None = None
    workflow_error: bool | None = None
    workflow_completed: bool | None = None
    event_log: list[str] | None = None
    workflow_start_time: str | None = None
    step_time: str | None = None
    scheduled_start_time: str | None = None
    execute_options: dict[str, Any] | None = None

    @field_validator("deployment_repo")
    @classmethod
    def _deployment_repo(cls, v: str | None) -> str:
        # Only runs when the field is sent: it may be changed, never cleared.
        if v is None or not _HAS_ALNUM.search(v):
            raise ValueError("must be a repository name (with at least one letter or digit)")
        return trim_repo(v)

    @field_validator("source_repo")
    @classmethod
    def _source_repo(cls, v: str | None) -> str | None:
        return None if v is None else trim_repo(v)

    def changes(self) -> dict[str, Any]:
        """The fields that were sent, as JSON-ready data."""
        return self.model_dump(mode="json", exclude_unset=True)


class WorkflowCreate(WorkflowPatch):
    """A new workflow: `deployment_repo` is required; `id` may be given (a UUID)."""

    id: str | None = None
    deployment_repo: NonEmpty

    @field_validator("id")
    @classmethod
    def _uuid(cls, v: str | None) -> str | None:
        if v is None:
            return None
        try:
            return str(uuid.UUID(v))
        except ValueError:
            raise ValueError("must be a UUID") from None

    def record(self) -> dict[str, Any]:
        """The full stored record: every workflow field, unset ones null."""
        data = dict.fromkeys(WORKFLOW_FIELDS)
        data.update(self.model_dump(mode="json", exclude_unset=True))
        data["id"] = data["id"] or str(uuid.uuid4())
        if data["workflow_completed"] is None:
            data["workflow_completed"] = False  # as the Manager does on create
        milestones = data["milestones"]
        if milestones is not None and "build" not in milestones and "config" not in milestones:
            data["milestones"] = ["config", *milestones]
        return data


_DIGITS = re.compile(r"^-?[0-9]{1,18}$")


def _digits_to_int(v: Any) -> Any:
    # Exchange ids are integers in the Manager; "2" is accepted as 2, as it did.
    return int(v) if isinstance(v, str) and _DIGITS.match(v) else v


ExchangeRef = Annotated[int, Field(ge=-(2**63), le=2**63 - 1), BeforeValidator(_digits_to_int)]


class ExecuteOptions(BaseModel):
    """Body of `POST /workflows/{id}/execute`; any other key is kept and passed on."""

    model_config = ConfigDict(extra="allow")

    force_build: bool | None = None
    build_messaging_exchange_id: ExchangeRef | None = None
    deploy_messaging_exchange_id: ExchangeRef | None = None
    etcd_token: str | None = None
    docker_build_etcd_token: str | None = None
    deployable_units: list[Any] | None = None
    notifications_config: dict[str, Any] | None = None
    fleet_config: dict[str, Any] | None = None
    aws_config: dict[str, Any] | None = None
    ecs_task_definition: dict[str, Any] | str | None = None

    def options(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_unset=True)


class ModuleIn(BaseModel):
    """Body of `POST /messaging/exchanges/{id}/modules`."""

    model_config = ConfigDict(extra="ignore")

    hostname: Annotated[str, Field(min_length=1, max_length=255, pattern=r"^[^/]+$")]
    type: Annotated[str, Field(min_length=1, max_length=255)]
    status: str | None = None
    workload: Any = None


class SystemEventIn(BaseModel):
    """Body of `POST /system_events`."""

    model_config = ConfigDict(extra="ignore")

    type: Annotated[str, Field(min_length=1, max_length=255)]
    severity: str | None = None
    message: str
    data: Any = None
    unique: bool = False
