"""Bad input (SPEC §6): every malformed body is parked in the error queue with a reason and a
system event, and the consumer keeps processing good messages."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.stack import running_stack

json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=20))
not_an_id = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=5), st.integers(),
                      max_size=2), st.booleans(), st.just(""), st.just("   "))
wrong_types = st.fixed_dictionaries({"id": st.uuids().map(str)}, optional={
    "milestones": st.one_of(st.integers(), st.text(max_size=5)),
    "event_log": st.one_of(st.integers(), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)),
    "workflow_completed": st.one_of(st.text(min_size=1, max_size=5), st.integers(min_value=2)),
    "current_step": st.one_of(st.integers(), st.lists(st.text(max_size=3), max_size=2)),
}).filter(lambda d: len(d) > 1)

bad_bodies = st.one_of(
    st.binary(min_size=1, max_size=40).filter(lambda b: not _is_json(b)),  # not JSON
    st.one_of(json_scalars, st.lists(json_scalars, max_size=3)).map(lambda v: json.dumps(v).encode()),  # not an object
    st.dictionaries(st.sampled_from(["milestones", "current_step", "x"]), json_scalars, max_size=3)
      .map(lambda d: json.dumps(d).encode()),  # no id
    not_an_id.map(lambda i: json.dumps({"id": i}).encode()),  # id of the wrong type
    wrong_types.map(lambda d: json.dumps(d).encode()),  # known fields with wrong types
    st.uuids().map(lambda u: json.dumps({"id": str(u), "current_step": None}).encode()),  # unknown workflow
)


def _is_json(raw: bytes) -> bool:
    try:
        json.loads(raw)
        return True
    except ValueError:
        return False


def sample(n: int) -> list[bytes]:
    """n bodies drawn by hypothesis, reproducibly."""
    out: list[bytes] = []

    @settings(max_examples=n, database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(bad_bodies)
    def collect(body: bytes) -> None:
        out.append(body)

    collect()
    return out


async def test_malformed_bodies_are_dead_lettered_with_a_reason_and_good_ones_still_flow() -> None:
    bodies = sample(60)
    bodies.append(b'{"id": "' + b"x" * (1024 * 1024) + b'"}')  # over 1 MiB
    async with running_stack() as s:
        good: list[str] = []
        for i, body in enumerate(bodies):
            await s.publish("1", "workflow_orchestration", body, message_id=f"bad-{i}")
            if i % 15 == 0:
                wid = await s.workflow(["deploy_ecs"])
                await s.start(wid)
                good.append(wid)
        for wid in good:
            await s.echo(await s.take("1", "deployer", wid))
        for wid in good:
            assert (await s.wait_finished(wid))["workflow_error"] is False
        parked: dict[str, Any] = {}
        deadline_msgs = await _collect_errors(s, len(bodies))
        for msg in deadline_msgs:
            parked[msg.message_id or ""] = msg
        assert set(parked) == {f"bad-{i}" for i in range(len(bodies))}, "every bad body is parked, once"
        for i, body in enumerate(bodies):
            msg = parked[f"bad-{i}"]
            assert msg.body == body, "the body is kept as it was"
            assert msg.headers and msg.headers.get("x-error-reason"), msg.headers
            assert msg.headers.get("x-error-at")
        reasons = " | ".join(str(m.headers["x-error-reason"]) for m in parked.values())
        for expected in ("not JSON", "not a JSON object", "invalid fields", "unknown workflow", "over the"):
            assert expected in reasons, expected
        events = (await s.manager.request("GET", "/system_events", "/system_events")).json()
        assert len([e for e in events if e.get("type") == "workflow_orchestrator_dead_letter"]) >= len(bodies)


async def _collect_errors(s: Any, n: int) -> list[Any]:
    ch = await s.amqp.channel()
    q = await ch.get_queue(s.queue("1", "workflow_orchestration_error"), ensure=False)
    out = []
    deadline = time.monotonic() + 30
    while len(out) < n and time.monotonic() < deadline:
        msg = await q.get(no_ack=True, fail=False)
        if msg is None:
            await asyncio.sleep(0.05)
            continue
        out.append(msg)
    await ch.close()
    return out


async def test_dlq_replay_restores_a_fixed_message() -> None:
    from workflow_orchestrator import operator

    async with running_stack() as s:
        wid = str(uuid.uuid4())
        start = {"id": wid, "workflow_id": wid, "deployment_repo": "acme/late", "milestones": ["deploy_ecs"]}
        await s.publish("1", "workflow_orchestration", start, message_id="early-start")
        settings = s.settings()
        deadline = time.monotonic() + 20
        listed = await operator.dlq_list(settings)
        while not listed["messages"] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            listed = await operator.dlq_list(settings)
        [parked] = listed["messages"]
        assert parked["message_id"] == "early-start"
        assert f"unknown workflow {wid}" in parked["reason"]
        # The fix: the workflow now exists in the Manager. Replay sends the same message back.
        created = await s.manager.create_workflow({"id": wid, "deployment_repo": "acme/late",
                                                  "milestones": ["deploy_ecs"]})
        assert created == wid
        await s.manager.put_workflow(wid, {"milestones": ["deploy_ecs"]})
        replayed = await operator.dlq_replay(settings, message_id="early-start")
        assert [m["message_id"] for m in replayed["replayed"]] == ["early-start"]
        req = await s.take("1", "deployer", wid)
        assert req["current_step"] == "deploy_ecs"
        assert (await operator.dlq_list(settings))["messages"] == []


async def test_a_value_the_ledger_refuses_is_dead_lettered_and_others_flow() -> None:
    async with running_stack() as s:
        bad = await s.workflow(["deploy_ecs"])
        await s.start(bad, note="a NUL \u0000 in an unknown field")  # jsonb (the run's request) refuses it
        good = await s.workflow(["deploy_ecs"])
        await s.start(good)
        await s.echo(await s.take("1", "deployer", good))
        assert (await s.wait_finished(good))["workflow_error"] is False
        [parked] = await _collect_errors(s, 1)
        assert json.loads(parked.body)["id"] == bad, "the body is kept as it was"
        assert "the ledger refused the decision" in str(parked.headers["x-error-reason"]), parked.headers
        assert (await s.record(bad)).get("current_step") is None, "nothing was carried out"
