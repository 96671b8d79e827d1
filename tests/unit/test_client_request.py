"""OrchestrationRequest round-trips and the client's message building (no network)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from workflow_orchestrator.client import OrchestrationClient, OrchestrationRequest, failure_text
from workflow_orchestrator.manager.client import ManagerClient
from workflow_orchestrator.messaging.broker import BrokerPool

DISPATCHED = {
    "id": "0b9f5d4c-2f55-4c8e-9d61-7f4f0a3c1e22", "workflow_id": "0b9f5d4c-2f55-4c8e-9d61-7f4f0a3c1e22",
    "deployment_repo": "acme/web-deploy", "deployment_repo_git_ref": "master", "source_repo": "acme/web",
    "source_repo_git_ref": "abc123", "source_commit_hash": None, "milestones": ["build", "deploy"],
    "current_step": "build", "elapsed_step_time": None, "elapsed_workflow_time": None, "workflow_duration": None,
    "workflow_step_durations": {}, "workflow_error": False, "workflow_completed": False,
    "event_log": ["[OA][0b9f5d4c-2f55-4c8e-9d61-7f4f0a3c1e22][acme/web-deploy] Starting workflow..."],
    "workflow_start_time": "2026-11-24T10:00:00.000000Z", "step_time": "2026-11-24T10:00:00.000000Z",
    "scheduled_start_time": None, "execute_options": {"etcd_token": "x"}, "etcd_token": "deploy-1",
    "docker_build_etcd_token": "build-1", "notifications_config": {"hipchat": {"room_names": ["ops"]}},
    "workflow_orchestration_exchange_id": 1, "workflow_orchestration_broker_id": 1,
    "orchestration_queue_name": "workflow_orchestration", "notifications_exchange_id": 1,
    "notifications_broker_id": 1, "dispatch_id": "d-1",
    "x_custom": {"nested": [1, 2.5, None, True, "s"]}, "deployable_units": [{"name": "web"}],
}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
unknown_keys = st.text(min_size=1, max_size=12).filter(lambda k: k not in OrchestrationRequest.model_fields)


def test_a_dispatched_request_round_trips() -> None:
    request = OrchestrationRequest.from_payload(json.loads(json.dumps(DISPATCHED)))
    assert request.to_payload() == DISPATCHED
    assert json.loads(json.dumps(request.to_payload())) == DISPATCHED


@given(st.dictionaries(unknown_keys, json_values, max_size=6))
def test_unknown_keys_round_trip(extra: dict[str, Any]) -> None:
    payload = {"id": "w-1", "current_step": "build", **extra}
    assert OrchestrationRequest.from_payload(payload).to_payload() == payload


def test_absent_keys_stay_absent_and_nulls_stay_null() -> None:
    payload = {"id": "w-1", "current_step": None}
    out = OrchestrationRequest.from_payload(payload).to_payload()
    assert out == {"id": "w-1", "current_step": None}


def test_keys_that_shadow_model_attributes_are_kept() -> None:
    payload = {"id": "w-1", "json": 1, "copy": [2], "model_config": {"a": 1}, "schema": "s"}
    assert OrchestrationRequest.from_payload(payload).to_payload() == payload


def test_values_are_not_converted() -> None:
    # Exchange ids are integers in the Manager and may be strings elsewhere: each keeps its type.
    out = OrchestrationRequest.from_payload({"id": "w", "notifications_exchange_id": 1,
                                             "workflow_orchestration_exchange_id": "2"}).to_payload()
    assert out["notifications_exchange_id"] == 1
    assert out["workflow_orchestration_exchange_id"] == "2"


@pytest.mark.parametrize("payload", [{"id": 5}, {"id": "w", "force_build": "yes"}, {"id": "w", "milestones": "build"},
                                     {"id": "w", "event_log": [1]}])
def test_wrong_types_are_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        OrchestrationRequest.from_payload(payload)


@pytest.mark.parametrize("raw", [b"not json", b"[1, 2]", b"\xff\xfe"])
def test_from_json_rejects_non_objects(raw: bytes) -> None:
    with pytest.raises(ValueError):
        OrchestrationRequest.from_json(raw)


def test_set_fields_and_events_are_sent() -> None:
    request = OrchestrationRequest.from_payload({"id": "w-1", "deployment_repo": "acme/d"})
    request.source_commit_hash = "f00"
    request.add_event("Built image")
    request.set("build_log", "https://logs/1")  # an unknown key a worker adds
    assert request.to_payload() == {"id": "w-1", "deployment_repo": "acme/d", "source_commit_hash": "f00",
                                    "event_log": ["[OA][w-1][acme/d] Built image"], "build_log": "https://logs/1"}


def test_prefix_room_names_and_workflow_ref() -> None:
    request = OrchestrationRequest.from_payload(DISPATCHED)
    assert request.prefix == "[OA][0b9f5d4c-2f55-4c8e-9d61-7f4f0a3c1e22][acme/web-deploy]"
    assert request.room_names == ["ops"]
    assert OrchestrationRequest(workflow_id="w-2").prefix == "[OA][w-2][Unknown]"
    assert OrchestrationRequest(workflow_id="w-2").workflow_ref == "w-2"
    with pytest.raises(ValueError):
        _ = OrchestrationRequest().workflow_ref


def test_copy_is_deep() -> None:
    request = OrchestrationRequest.from_payload({"id": "w", "event_log": ["a"]})
    copy = request.copy_request()
    copy.add_event("b")
    assert request.event_log == ["a"]
    assert copy.to_payload()["event_log"] == ["a", "[OA][w][Unknown] b"]


@pytest.mark.parametrize(("message", "reason", "text"), [
    ("Build failed", "exit 2", "Build failed. Reason: exit 2"),
    ("Build failed.", "exit 2", "Build failed. Reason: exit 2"),
    ("Build failed", None, "Build failed"),
    ("  ", "boom", "Milestone failed. Reason: boom"),
])
def test_failure_text(message: str, reason: str | None, text: str) -> None:
    assert failure_text(message, reason) == text


def _client(**kw: Any) -> OrchestrationClient:
    manager = ManagerClient("http://manager.invalid", "http://manager.invalid/oauth/token", "c", "s")
    return OrchestrationClient(manager, BrokerPool("test"), broker_id="9", exchange_id="7", **kw)


def test_callback_follows_the_requests_routing_fields() -> None:
    client = _client()
    request = OrchestrationRequest.from_payload({**DISPATCHED, "workflow_orchestration_exchange_id": 3,
                                                 "workflow_orchestration_broker_id": 4,
                                                 "orchestration_queue_name": "wo_custom"})
    out = client.callback(request)
    assert (out.broker_id, out.message.exchange_id, out.message.queue) == ("4", "3", "wo_custom")
    assert out.message.type == "workflow.continue"
    assert out.message.correlation_id == DISPATCHED["id"]
    assert out.message.body["dispatch_id"] == "d-1"
    # The same dispatch always yields the same message_id (the orchestrator's inbox dedupes it).
    assert client.callback(request.copy_request()).message.message_id == out.message.message_id


def test_callback_without_routing_fields_uses_the_clients_defaults() -> None:
    out = _client(queue_name="wo").callback(OrchestrationRequest(id="w"))
    assert (out.broker_id, out.message.exchange_id, out.message.queue) == ("9", "7", "wo")


def test_mark_failed_and_chat() -> None:
    client = _client()
    request = OrchestrationRequest.from_payload({**DISPATCHED, "notifications_exchange_id": 5,
                                                 "notifications_broker_id": 6})
    text = client.mark_failed(request, "Build failed", "exit 2")
    payload = client.callback(request).message.body
    assert payload["workflow_completed"] is True and payload["workflow_error"] is True
    assert payload["event_log"][-1] == f"{request.prefix} Build failed. Reason: exit 2"
    chat = client.chat(request, text, success=False)
    assert (chat.broker_id, chat.message.exchange_id, chat.message.queue) == ("6", "5", "notifications_hipchat")
    assert chat.message.body == {"is_success": False, "prefix": request.prefix,
                                 "message": "Build failed. Reason: exit 2", "room_names": ["ops"]}
    assert chat.message.type == "notification.chat"


def test_get_and_set_reach_known_and_unknown_keys() -> None:
    request = OrchestrationRequest.from_payload({"id": "w", "ticket": "OPS-1"})
    assert (request.get("ticket"), request.get("id"), request.get("etcd_token", "none")) == ("OPS-1", "w", "none")
    request.set("etcd_token", "t")
    with pytest.raises(ValidationError):
        request.set("milestones", "build")  # known keys are validated on assignment
    assert request.to_payload() == {"id": "w", "ticket": "OPS-1", "etcd_token": "t"}
