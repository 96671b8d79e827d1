"""parse_body(): bad input is refused with a reason a human can act on (SPEC §6)."""

from __future__ import annotations

import json

import pytest

from workflow_orchestrator import jsonio
from workflow_orchestrator.engine import BadInput, parse_body

LIMIT = 1024 * 1024


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"not json", "not JSON"),
        (b'{"id": "a"', "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        (b"", "not JSON"),
        (b'{"id": "a", "x": NaN}', "not JSON: NaN is not valid JSON"),
        (b'{"id": "a", "x": -Infinity}', "not JSON: -Infinity is not valid JSON"),
        (b"[1, 2]", "not a JSON object but list"),
        (b'"text"', "not a JSON object but str"),
        (b"42", "not a JSON object but int"),
        (b"null", "not a JSON object but NoneType"),
        (b"{}", "invalid fields: id: Field required"),
        (b'{"workflow_id": "a"}', "invalid fields: id: Field required"),
        (b'{"id": ""}', "invalid fields: id: Value error, must not be empty"),
        (b'{"id": "   "}', "invalid fields: id: Value error, must not be empty"),
        (b'{"id": null}', "invalid fields: id:"),
        (b'{"id": true}', "invalid fields: id: Value error, must be a string"),
        (b'{"id": ["a"]}', "invalid fields: id: Value error, must be a string"),
        (b'{"id": {"a": 1}}', "invalid fields: id: Value error, must be a string"),
        (b'{"id": "a", "workflow_completed": "yes"}', "invalid fields: workflow_completed:"),
        (b'{"id": "a", "workflow_error": 1}', "invalid fields: workflow_error:"),
        (b'{"id": "a", "force_build": "true"}', "invalid fields: force_build:"),
        (b'{"id": "a", "milestones": "build"}', "invalid fields: milestones:"),
        (b'{"id": "a", "milestones": ["build", 3]}', "invalid fields: milestones.1:"),
        (b'{"id": "a", "event_log": [1]}', "invalid fields: event_log.0:"),
        (b'{"id": "a", "action": "stop"}', "invalid fields: action:"),
        (b'{"id": "a", "dispatch_id": false}', "invalid fields: dispatch_id:"),
        (b'{"id": "a", "notifications_config": "rooms"}', "invalid fields: notifications_config:"),
    ],
)
def test_bad_input_reasons(raw: bytes, reason: str) -> None:
    with pytest.raises(BadInput) as exc:
        parse_body(raw, LIMIT)
    assert str(exc.value).startswith(reason)


def test_every_bad_field_is_named() -> None:
    with pytest.raises(BadInput) as exc:
        parse_body(b'{"id": "", "workflow_completed": "no", "milestones": 5}', LIMIT)
    reason = str(exc.value)
    for name in ("id:", "workflow_completed:", "milestones:"):
        assert name in reason


def test_over_the_size_limit() -> None:
    raw = json.dumps({"id": "a", "pad": "x" * 100}).encode()
    with pytest.raises(BadInput) as exc:
        parse_body(raw, len(raw) - 1)
    assert str(exc.value) == f"message is {len(raw)} bytes, over the {len(raw) - 1}-byte limit"


def test_exactly_at_the_size_limit_is_accepted() -> None:
    raw = json.dumps({"id": "a", "pad": "x" * 100}).encode()
    payload, _ = parse_body(raw, len(raw))
    assert payload["id"] == "a"


def test_valid_message_keeps_unknown_keys_unchanged() -> None:
    body = {
        "id": "wf-1", "current_step": "build", "dispatch_id": "d-1", "workflow_completed": False,
        "event_log": ["[OA][wf-1][Unknown] Starting workflow..."], "builder_metadata": {"image": "shop:42"},
        "deployable_units": [{"name": "web"}], "workflow_step_durations": {"build": "2 minute(s)"},
    }
    payload, msg = parse_body(json.dumps(body).encode(), LIMIT)

    assert payload == body
    assert msg.id == "wf-1"
    assert msg.dispatch_id == "d-1"
    assert msg.current_step == "build"
    assert msg.workflow_completed is False
    assert msg.model_extra == {"builder_metadata": {"image": "shop:42"}}


def test_cancel_message() -> None:
    _, msg = parse_body(b'{"id": "wf-1", "action": "cancel", "reason": "superseded"}', LIMIT)
    assert (msg.action, msg.reason) == ("cancel", "superseded")


def test_numeric_id_is_read_as_text() -> None:
    _, msg = parse_body(b'{"id": 17}', LIMIT)
    assert msg.id == "17"


def test_unknown_fields_pass_through_exactly() -> None:
    raw = b'{"id": "a", "big": 123456789012345678901234567890, "f": 0.1, "s": "\\u00e9\\u2603", "n": {"1": [null]}}'
    payload, _ = parse_body(raw, LIMIT)
    assert payload["big"] == 123456789012345678901234567890  # not a float
    assert json.loads(jsonio.dumps(payload)) == payload
    assert jsonio.dumps({1: "a"}) == b'{"1":"a"}'
