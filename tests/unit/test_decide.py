"""decide(): the orchestration rules and exact texts of SPEC §5, as tables over plain data.

decide() is called the way the engine calls it: it may answer NeedFact, the test looks the fact
up in what the test provides (a fact the test did not provide fails the test, so each test also
pins which lookups a rule makes), and decide() is called again.
"""

from __future__ import annotations

import copy
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from workflow_orchestrator.domain.decide import decide
from workflow_orchestrator.domain.events import iso, parse_time
from workflow_orchestrator.domain.models import (
    Config,
    Decision,
    Delivery,
    NeedFact,
    Outgoing,
    Policy,
    Run,
    TimerFired,
    TimerSpec,
)

WID = "3f2c8a50-1d3e-4c61-9d7a-5b1f0c2e9a10"
REPO = "acme/shop-deploy"
PREFIX = f"[OA][{WID}][{REPO}]"
SOURCE_REPO = "https://github.com/acme/shop"
NOW = datetime(2026, 11, 24, 9, 0, tzinfo=UTC)  # a Tuesday
HERE = "1"  # EXCHANGE_ID of this instance
BROKER = "9"
UI = "https://oa.example.com"
ROOMS = ["ops", "shop-team"]
MILESTONE_QUEUES = {"builder", "deployer", "deploy_oa"}
ROUTING = {
    "notifications_exchange_id": HERE,
    "workflow_orchestration_exchange_id": HERE,
    "notifications_broker_id": BROKER,
    "workflow_orchestration_broker_id": BROKER,
    "orchestration_queue_name": "workflow_orchestration",
}

START = "Starting workflow..."
BUILD_DISPATCH = "Dispatching a build request to exchange 2, docker build cluster tok-build..."
DEPLOY_DISPATCH = "Dispatching a deploy request to exchange 3, deployment cluster tok-deploy..."
WORKER_FAILURE = "Milestone worker has reported a failure"


def make_config(**policies: Policy) -> Config:
    base = {
        "build": Policy(7200.0, 0, 30.0),
        "config": Policy(1800.0, 0, 30.0),
        "deploy": Policy(3600.0, 0, 30.0),
        "deploy_oa": Policy(3600.0, 0, 30.0),
        "deploy_ecs": Policy(3600.0, 0, 30.0),
    }
    base.update(policies)
    return Config(exchange_id=HERE, broker_id=BROKER, queue_name="workflow_orchestration", ui_url=UI,
                  policies=base)


CONFIG = make_config()
RETRY_CONFIG = make_config(build=Policy(7200.0, 1, 30.0))

BUILD_CLUSTER = {"etcd_token": "tok-build", "messaging_exchange_id": 2, "allow_docker_builds": True}
FACTS: dict[tuple[str, str], Any] = {
    ("build_clusters", HERE): [BUILD_CLUSTER],
    ("modules", "2"): [{"hostname": "b1", "type": "builder", "status": "active", "workload": 0}],
    ("cluster", "tok-deploy"): {"etcd_token": "tok-deploy", "messaging_exchange_id": 3},
    ("modules", "3"): [{"hostname": "d1", "type": "deployer"}],
    ("modules", HERE): [{"hostname": "d0", "type": "deployer"}, {"hostname": "wo", "type": "workflow_orchestrator"}],
}


def facts(**changes: Any) -> dict[tuple[str, str], Any]:
    """FACTS with some lookups replaced: `modules_2=[...]`, `build_clusters_1=[...]`, `cluster_tok=None`."""
    out = dict(FACTS)
    for name, value in changes.items():
        kind, _, key = name.rpartition("_")
        out[(kind, key)] = value
    return out


def record(**fields: Any) -> dict[str, Any]:
    """A Manager workflow record of a workflow that has not started."""
    rec: dict[str, Any] = {
        "id": WID,
        "deployment_repo": REPO,
        "deployment_repo_git_ref": "master",
        "source_repo": SOURCE_REPO,
        "source_repo_git_ref": "a1b2c3",
        "source_commit_hash": None,
        "milestones": ["build", "deploy"],
        "current_step": None,
        "workflow_completed": False,
        "workflow_error": False,
        "event_log": [],
        "workflow_step_durations": {},
        "execute_options": {},
    }
    rec.update(fields)
    return rec


def start_msg(**fields: Any) -> dict[str, Any]:
    """The start message the Manager publishes on execute: workflow id plus request fields."""
    msg: dict[str, Any] = {
        "id": WID,
        "etcd_token": "tok-deploy",
        "notifications_config": {"hipchat": {"room_names": ROOMS}},
        "custom_key": {"kept": True},  # unknown to the orchestrator
    }
    msg.update(fields)
    return msg


def step(trigger: Delivery | TimerFired, rec: Mapping[str, Any], run: Run | None = None,
         provided: Mapping[tuple[str, str], Any] = FACTS, now: datetime = NOW, config: Config = CONFIG,
         key: str = "msg:1") -> Decision:
    """decide() with the NeedFact loop of the engine; a fact the test did not provide fails the test."""
    given: dict[tuple[str, str], Any] = {}
    for _ in range(20):
        result = decide(trigger=trigger, record=rec, run=run, facts=given, now=now, config=config, key=key)
        if not isinstance(result, NeedFact):
            return result
        need = (result.kind, result.key)
        if need in given:
            pytest.fail(f"decide() asked again for {need}, which it was given")
        if need[0] == "fresh_modules" and need not in provided:
            need_cached = ("modules", need[1])  # the Manager answers the same list as the cache had
            if need_cached in provided:
                given[need] = provided[need_cached]
                continue
        if need not in provided:
            pytest.fail(f"decide() needed fact {need}, which this test does not provide")
        given[need] = provided[need]
    pytest.fail("decide() kept asking for facts")


def deliver(body: dict[str, Any], rec: Mapping[str, Any], **kw: Any) -> Decision:
    return step(Delivery(body), rec, **kw)


def dispatches(d: Decision) -> list[Outgoing]:
    return [m for m in d.messages if m.queue in MILESTONE_QUEUES]


def the_dispatch(d: Decision) -> Outgoing:
    found = dispatches(d)
    assert len(found) == 1, f"expected one milestone request, got {[m.queue for m in found]}"
    return found[0]


def chats(d: Decision) -> list[Outgoing]:
    return [m for m in d.messages if m.queue == "notifications_hipchat"]


def emails(d: Decision) -> list[Outgoing]:
    return [m for m in d.messages if m.queue == "notifications_email"]


def logged(*events: str, prefix: str = PREFIX) -> list[str]:
    return [f"{prefix} {e}" for e in events]


def failure_events(step_name: str, reason: str, elapsed: str, step_elapsed: str | None = None) -> list[str]:
    """SPEC §5.4, in order."""
    return [
        f"Workflow Milestone Failed: {step_name}. Reason: {reason}",
        f"Workflow has failed in {elapsed}",
        f"Completed Workflow Milestone: {step_name}, in {step_elapsed or elapsed}",
    ]


def assert_ignored(d: Decision, outcome: str) -> None:
    """Stale / duplicate: acknowledged with no effect (SPEC §5.6)."""
    assert d.outcome == outcome
    assert d.record is None
    assert d.messages == []
    assert d.timers == []
    assert d.run is None
    assert d.events == []
    assert d.finished is None


def assert_failed(d: Decision) -> None:
    assert d.outcome == "processed"
    assert d.finished == "failed"
    assert d.record is not None
    assert d.record["workflow_completed"] is True
    assert d.record["workflow_error"] is True
    assert dispatches(d) == []
    assert d.timers == []


@dataclass
class Flow:
    """A workflow driven through several decisions: each processed decision is PUT (a partial
    update of the record) and becomes the run state, as the engine does."""

    rec: dict[str, Any]
    provided: dict[tuple[str, str], Any] = field(default_factory=lambda: dict(FACTS))
    config: Config = CONFIG
    run: Run | None = None
    n: int = 0

    def send(self, body: dict[str, Any], at: datetime = NOW) -> Decision:
        return self._apply(Delivery(copy.deepcopy(body)), at)

    def fire(self, kind: str, token: str, at: datetime) -> Decision:
        return self._apply(TimerFired(kind, token), at)  # type: ignore[arg-type]

    def _apply(self, trigger: Delivery | TimerFired, at: datetime) -> Decision:
        self.n += 1
        d = step(trigger, self.rec, self.run, self.provided, at, self.config, key=f"msg:{self.n}")
        if d.outcome == "processed":
            assert d.record is not None
            self.rec = {**self.rec, **copy.deepcopy(d.record)}
            self.run = d.run
        return d


def started(rec: dict[str, Any] | None = None, msg: dict[str, Any] | None = None,
            config: Config = CONFIG, provided: dict[tuple[str, str], Any] | None = None) -> tuple[Flow, Outgoing]:
    """A flow whose first milestone has been dispatched at NOW, and that dispatch."""
    flow = Flow(rec or record(), provided=dict(provided or FACTS), config=config)
    d = flow.send(msg or start_msg(), NOW)
    return flow, the_dispatch(d)


def callback(request: Outgoing, **changes: Any) -> dict[str, Any]:
    """What a worker publishes back: the request it got, possibly with fields changed."""
    body = copy.deepcopy(request.body)
    body.update(changes)
    return body


def failed_callback(request: Outgoing, **changes: Any) -> dict[str, Any]:
    return callback(request, workflow_completed=True, workflow_error=True, **changes)


# ---- start ------------------------------------------------------------------------------------

def test_start_records_events_and_dispatches_the_first_milestone() -> None:
    d = deliver(start_msg(), record())

    assert d.outcome == "processed"
    assert d.events == [START, "Starting Workflow Milestone: build", BUILD_DISPATCH]
    assert d.record is not None
    assert d.record["event_log"] == logged(*d.events)
    assert d.record["current_step"] == "build"
    assert parse_time(d.record["step_time"]) == NOW
    assert parse_time(d.record["workflow_start_time"]) == NOW
    assert d.record["workflow_completed"] is False
    assert d.record["workflow_error"] is False
    assert d.finished is None
    assert d.dispatched == ["build"]
    assert d.run is not None and d.run.current_step == "build" and d.run.attempt == 1


def test_defaults_for_missing_fields() -> None:
    d = deliver({"id": WID}, {"id": WID, "milestones": ["deploy_ecs"]})

    assert d.record is not None
    assert parse_time(d.record["workflow_start_time"]) == NOW
    assert d.record["workflow_completed"] is False
    assert d.record["workflow_error"] is False
    assert d.record["event_log"] == logged(START, "Starting Workflow Milestone: deploy_ecs",
                                           "Dispatching an ECS deploy request to exchange 1...",
                                           prefix=f"[OA][{WID}][Unknown]")


def test_existing_event_log_is_kept_and_appended_to() -> None:
    d = deliver(start_msg(), record(event_log=["created by alice"]))

    assert d.record is not None
    assert d.record["event_log"] == ["created by alice", *logged(*d.events)]


@pytest.mark.parametrize("repo", [None, ""])
def test_prefix_says_unknown_without_deployment_repo(repo: str | None) -> None:
    d = deliver(start_msg(), record(deployment_repo=repo))

    unknown = f"[OA][{WID}][Unknown]"
    assert d.record is not None
    assert d.record["event_log"][0] == f"{unknown} {START}"
    assert {c.body["prefix"] for c in chats(d)} == {unknown}


def test_every_event_is_published_as_a_chat_notification() -> None:
    d = deliver(start_msg(), record())

    assert [(c.exchange_id, c.type) for c in chats(d)] == [(HERE, "notification.chat")] * len(d.events)
    assert [c.body for c in chats(d)] == [
        {"is_success": True, "prefix": PREFIX, "message": e, "room_names": ROOMS} for e in d.events
    ]


def test_chat_room_names_are_null_without_hipchat_config() -> None:
    d = deliver({"id": WID, "etcd_token": "tok-deploy"}, record())

    assert d.events
    assert [c.body["room_names"] for c in chats(d)] == [None] * len(d.events)


def test_failure_events_are_chat_notifications_with_is_success_false() -> None:
    d = deliver(start_msg(), record(), provided=facts(build_clusters_1=[], global_build_clusters_=[]))

    success = {c.body["message"]: c.body["is_success"] for c in chats(d)}
    assert success[START] is True
    assert success["Starting Workflow Milestone: build"] is True
    assert success["Workflow Milestone Failed: build. Reason: Unable to request build - no build clusters "
                   "are available!"] is False
    assert success["Workflow has failed in 0 second(s)"] is False


def test_same_inputs_give_the_same_decision() -> None:
    first = deliver(start_msg(), record(), key="msg:abc")
    second = deliver(start_msg(), record(), key="msg:abc")
    other = deliver(start_msg(), record(), key="msg:other")

    assert first == second
    ids = [m.message_id for m in first.messages]
    assert len(set(ids)) == len(ids)
    assert all(uuid.UUID(i) for i in ids)
    assert the_dispatch(other).body["dispatch_id"] != the_dispatch(first).body["dispatch_id"]


# ---- dispatch (SPEC §5.3) --------------------------------------------------------------------

def test_dispatched_request_is_payload_plus_routing_fields() -> None:
    d = deliver(start_msg(), record(source_commit_hash="f00d"))
    req = the_dispatch(d)

    assert (req.exchange_id, req.queue, req.type) == ("2", "builder", "builder.request")
    body = req.body
    assert {k: body[k] for k in ROUTING} == ROUTING
    assert d.run is not None
    assert body["dispatch_id"] == d.run.dispatch_id
    uuid.UUID(body["dispatch_id"])
    assert body["docker_build_etcd_token"] == "tok-build"
    assert body["id"] == WID
    assert body["current_step"] == "build"
    assert body["milestones"] == ["build", "deploy"]
    assert body["source_repo"] == SOURCE_REPO
    assert body["source_commit_hash"] == "f00d"
    assert body["etcd_token"] == "tok-deploy"  # request field
    assert body["custom_key"] == {"kept": True}  # unknown key passes through
    assert body["notifications_config"] == {"hipchat": {"room_names": ROOMS}}
    assert d.record is not None
    assert body["event_log"] == d.record["event_log"]
    assert body["workflow_completed"] is False and body["workflow_error"] is False


@pytest.mark.parametrize(
    ("milestone", "exchange", "queue", "event", "timeout"),
    [
        ("build", "2", "builder", BUILD_DISPATCH, timedelta(hours=2)),
        ("config", "2", "builder",
         "Dispatching a config request to exchange 2, docker build cluster tok-build...", timedelta(minutes=30)),
        ("deploy", "3", "deployer", DEPLOY_DISPATCH, timedelta(hours=1)),
        ("deploy_oa", "3", "deploy_oa", DEPLOY_DISPATCH, timedelta(hours=1)),
        ("deploy_ecs", "1", "deployer", "Dispatching an ECS deploy request to exchange 1...", timedelta(hours=1)),
    ],
)
def test_each_milestone_goes_to_its_queue_with_a_timeout(milestone: str, exchange: str, queue: str, event: str,
                                                          timeout: timedelta) -> None:
    d = deliver(start_msg(), record(milestones=[milestone]))

    assert d.events == [START, f"Starting Workflow Milestone: {milestone}", event]
    req = the_dispatch(d)
    assert (req.exchange_id, req.queue) == (exchange, queue)
    assert req.body["current_step"] == milestone
    assert d.dispatched == [milestone]
    assert d.timers == [TimerSpec("timeout", NOW + timeout, req.body["dispatch_id"])]


def test_build_uses_local_clusters_without_asking_for_global_ones() -> None:
    # FACTS has no ("global_build_clusters", "") entry: step() fails if decide asks for it
    d = deliver(start_msg(), record())
    assert the_dispatch(d).body["docker_build_etcd_token"] == "tok-build"


@pytest.mark.parametrize("local", [[], None])
def test_build_falls_back_to_global_clusters(local: list[Any] | None) -> None:
    provided = facts(build_clusters_1=local,
                     global_build_clusters_=[{"etcd_token": "tok-global", "messaging_exchange_id": "4"}],
                     modules_4=[{"type": "builder"}])
    d = deliver(start_msg(), record(), provided=provided)

    assert d.events[-1] == "Dispatching a build request to exchange 4, docker build cluster tok-global..."
    req = the_dispatch(d)
    assert req.exchange_id == "4"
    assert req.body["docker_build_etcd_token"] == "tok-global"


def test_build_cluster_is_picked_at_random_among_the_candidates() -> None:
    clusters = [{"etcd_token": f"tok-{i}", "messaging_exchange_id": i} for i in (5, 6, 7)]
    provided = facts(build_clusters_1=clusters, modules_5=[{"type": "builder"}], modules_6=[{"type": "builder"}],
                     modules_7=[{"type": "builder"}])
    picked = {the_dispatch(deliver(start_msg(), record(), provided=provided, key=f"msg:{i}")).exchange_id
              for i in range(30)}

    assert picked <= {"5", "6", "7"}
    assert len(picked) > 1


@pytest.mark.parametrize("override", ["5", 5])
def test_build_messaging_exchange_id_overrides_the_cluster_exchange(override: str | int) -> None:
    d = deliver(start_msg(build_messaging_exchange_id=override), record(),
                provided=facts(modules_5=[{"type": "builder"}]))

    assert d.events[2:] == [
        "The Workflow request has overriden the default build messaging_exchange_id to 5",
        "Dispatching a build request to exchange 5, docker build cluster tok-build...",
    ]
    assert the_dispatch(d).exchange_id == "5"


@pytest.mark.parametrize("milestone", ["build", "config"])
def test_no_build_clusters_fails_the_workflow(milestone: str) -> None:
    d = deliver(start_msg(), record(milestones=[milestone, "deploy"]),
                provided=facts(build_clusters_1=[], global_build_clusters_=[]))

    assert_failed(d)
    assert d.events == [START, f"Starting Workflow Milestone: {milestone}",
                        *failure_events(milestone, f"Unable to request {milestone} - no build clusters are available!",
                                        "0 second(s)")]


@pytest.mark.parametrize("modules", [[], None, [{"type": "deployer"}, {"type": "notifications"}]])
def test_no_builder_module_in_the_target_exchange_fails_the_workflow(modules: list[Any] | None) -> None:
    d = deliver(start_msg(), record(), provided=facts(modules_2=modules))

    assert_failed(d)
    assert d.events[2] == ("Workflow Milestone Failed: build. Reason: Unable to request build - no Builders are "
                           "currently accessible in exchange 2!")


def test_no_builder_module_in_the_override_exchange_fails_the_workflow() -> None:
    d = deliver(start_msg(build_messaging_exchange_id="5"), record(), provided=facts(modules_5=[]))

    assert_failed(d)
    assert d.events[2:4] == [
        "The Workflow request has overriden the default build messaging_exchange_id to 5",
        "Workflow Milestone Failed: build. Reason: Unable to request build - no Builders are currently "
        "accessible in exchange 5!",
    ]


@pytest.mark.parametrize("milestone", ["deploy", "deploy_oa"])
@pytest.mark.parametrize("token", [None, ""])
def test_deploy_without_etcd_token_fails(milestone: str, token: str | None) -> None:
    d = deliver(start_msg(etcd_token=token), record(milestones=[milestone]))

    assert_failed(d)
    assert d.events == [START, f"Starting Workflow Milestone: {milestone}",
                        *failure_events(milestone, "Unable to execute deployment - an invalid deployment cluster "
                                                   "was provided!", "0 second(s)")]


@pytest.mark.parametrize(("milestone", "queue"), [("deploy", "deployer"), ("deploy_oa", "deploy_oa")])
def test_deploy_messaging_exchange_id_overrides_the_cluster_exchange(milestone: str, queue: str) -> None:
    d = deliver(start_msg(deploy_messaging_exchange_id="6"), record(milestones=[milestone]),
                provided=facts(modules_6=[{"type": "deployer"}]))

    assert d.events[2:] == [
        "The Workflow request has overriden the default deploy messaging_exchange_id to 6",
        "Dispatching a deploy request to exchange 6, deployment cluster tok-deploy...",
    ]
    req = the_dispatch(d)
    assert (req.exchange_id, req.queue) == ("6", queue)


@pytest.mark.parametrize("cluster", [None, {"etcd_token": "tok-deploy", "messaging_exchange_id": None},
                                     {"etcd_token": "tok-deploy"}])
def test_deploy_cluster_without_exchange_fails(cluster: dict[str, Any] | None) -> None:
    d = deliver(start_msg(), record(milestones=["deploy"]), provided={**FACTS, ("cluster", "tok-deploy"): cluster})

    assert_failed(d)
    assert d.events[2] == ("Workflow Milestone Failed: deploy. Reason: Unable to request deploy to cluster "
                           "tok-deploy - cluster is not associated with an exchange!")


@pytest.mark.parametrize("milestone", ["deploy", "deploy_oa"])
def test_deploy_without_deployer_module_fails(milestone: str) -> None:
    d = deliver(start_msg(), record(milestones=[milestone]), provided=facts(modules_3=[{"type": "builder"}]))

    assert_failed(d)
    assert d.events[2] == (f"Workflow Milestone Failed: {milestone}. Reason: Unable to request deploy - no deploy "
                           "clusters are available in exchange 3!")


def test_deploy_ecs_without_deployer_module_here_fails() -> None:
    d = deliver(start_msg(), record(milestones=["deploy_ecs"]), provided=facts(modules_1=[{"type": "builder"}]))

    assert_failed(d)
    assert d.events[2] == ("Workflow Milestone Failed: deploy_ecs. Reason: Unable to request deploy to ECS - no "
                           "deploy clusters are available in exchange 1!")


# ---- scheduled ------------------------------------------------------------------------------

SCHEDULED_AT = "Tue, 24 Nov 2026 10:00:00 GMT"  # NOW + 1 h


def test_scheduled_in_the_future_arms_a_timer_and_dispatches_nothing() -> None:
    d = deliver(start_msg(), record(milestones=["scheduled", "build"], scheduled_start_time=SCHEDULED_AT))

    assert d.events == [START, "Starting Workflow Milestone: scheduled",
                        f"Workflow is not scheduled to start until {SCHEDULED_AT} (3600 seconds remain)"]
    assert dispatches(d) == []
    assert d.dispatched == []
    assert d.finished is None
    assert d.run is not None
    assert d.timers == [TimerSpec("scheduled", NOW + timedelta(hours=1), d.run.dispatch_id or "")]
    assert d.record is not None and d.record["current_step"] == "scheduled"


@pytest.mark.parametrize("when", [SCHEDULED_AT, "Tue, 24 Nov 2026 08:00:00 GMT"])
def test_scheduled_when_due_starts_the_next_milestone_in_the_same_decision(when: str) -> None:
    d = deliver(start_msg(), record(milestones=["scheduled", "build"], scheduled_start_time=when),
                now=NOW + timedelta(hours=1))

    assert d.events[:3] == [START, "Starting Workflow Milestone: scheduled", "Workflow is now scheduled to start"]
    assert d.events[-2:] == ["Starting Workflow Milestone: build", BUILD_DISPATCH]
    assert the_dispatch(d).body["current_step"] == "build"
    assert d.record is not None and d.record["current_step"] == "build"
    assert [t.kind for t in d.timers] == ["timeout"]


@pytest.mark.parametrize("when", [None, ""])
def test_scheduled_without_start_time_fails(when: str | None) -> None:
    d = deliver(start_msg(), record(milestones=["scheduled", "build"], scheduled_start_time=when))

    assert_failed(d)
    assert d.events == [START, "Starting Workflow Milestone: scheduled",
                        *failure_events("scheduled", "Unable to execute deployment - the scheduled milestone was "
                                                     "invoked, but no scheduled_start_time was set!", "0 second(s)")]


def test_scheduled_timer_firing_starts_the_next_milestone() -> None:
    flow = Flow(record(milestones=["scheduled", "build"], scheduled_start_time=SCHEDULED_AT))
    armed = flow.send(start_msg())
    (timer,) = armed.timers

    d = flow.fire("scheduled", timer.token, timer.due_at)

    assert d.outcome == "processed"
    assert d.events[0] == "Workflow is now scheduled to start"
    assert d.events[-2:] == ["Starting Workflow Milestone: build", BUILD_DISPATCH]
    req = the_dispatch(d)
    assert req.body["etcd_token"] == "tok-deploy"  # request fields survive the payload-less timer
    assert req.body["custom_key"] == {"kept": True}
    assert req.body["notifications_config"] == {"hipchat": {"room_names": ROOMS}}


def test_scheduled_timer_rearms_when_the_start_time_moved_later() -> None:
    flow = Flow(record(milestones=["scheduled", "build"], scheduled_start_time=SCHEDULED_AT))
    (first,) = flow.send(start_msg()).timers
    flow.rec["scheduled_start_time"] = "Tue, 24 Nov 2026 11:00:00 GMT"  # edited in the Manager

    d = flow.fire("scheduled", first.token, first.due_at)

    assert d.events == ["Workflow is not scheduled to start until Tue, 24 Nov 2026 11:00:00 GMT "
                        "(3600 seconds remain)"]
    assert dispatches(d) == []
    (second,) = d.timers
    assert (second.kind, second.due_at) == ("scheduled", NOW + timedelta(hours=2))
    assert second.token != first.token
    assert_ignored(flow.fire("scheduled", first.token, NOW + timedelta(hours=2)), "stale")
    assert the_dispatch(flow.fire("scheduled", second.token, second.due_at)).queue == "builder"


def test_scheduled_after_a_milestone_continues_with_the_next_one() -> None:
    later = "Tue, 24 Nov 2026 10:00:00 GMT"
    flow, build = started(record(milestones=["build", "scheduled", "deploy"], scheduled_start_time=later))

    d = flow.send(callback(build), NOW + timedelta(minutes=10))
    assert d.events == ["Completed Workflow Milestone: build, in 10 minute(s)",
                        "Starting Workflow Milestone: scheduled",
                        f"Workflow is not scheduled to start until {later} (3000 seconds remain)"]
    (timer,) = d.timers

    d = flow.fire("scheduled", timer.token, timer.due_at)
    assert d.events[0] == "Workflow is now scheduled to start"
    assert d.events[-2:] == ["Starting Workflow Milestone: deploy", DEPLOY_DISPATCH]
    assert the_dispatch(d).queue == "deployer"


# ---- completion (SPEC §5.2.3) ---------------------------------------------------------------

def test_callbacks_complete_milestones_and_then_the_workflow() -> None:
    flow, build = started()

    d = flow.send(callback(build), NOW + timedelta(minutes=10))
    assert d.outcome == "processed"
    assert d.events == ["Completed Workflow Milestone: build, in 10 minute(s)", "Starting Workflow Milestone: deploy",
                        DEPLOY_DISPATCH]
    assert d.record is not None
    assert d.record["workflow_step_durations"] == {"build": "10 minute(s)"}
    assert d.record["current_step"] == "deploy"
    assert parse_time(d.record["step_time"]) == NOW + timedelta(minutes=10)
    assert parse_time(d.record["workflow_start_time"]) == NOW
    assert d.completed_steps == [("build", 600.0)]
    deploy = the_dispatch(d)
    assert (deploy.exchange_id, deploy.queue) == ("3", "deployer")
    assert deploy.body["dispatch_id"] != build.body["dispatch_id"]
    assert deploy.body["current_step"] == "deploy"

    d = flow.send(callback(deploy), NOW + timedelta(minutes=90))
    assert d.events == ["Completed Workflow Milestone: deploy, in 1 hour(s)", "Workflow completed in 2 hour(s)"]
    assert d.record is not None
    assert d.record["workflow_completed"] is True
    assert d.record["workflow_error"] is False
    assert d.record["workflow_duration"] == "2 hour(s)"
    assert d.record["workflow_step_durations"] == {"build": "10 minute(s)", "deploy": "1 hour(s)"}
    assert d.finished == "completed"
    assert dispatches(d) == []
    assert d.timers == []
    assert d.cancel_timers is True
    assert flow.rec["event_log"] == logged(
        START, "Starting Workflow Milestone: build", BUILD_DISPATCH,
        "Completed Workflow Milestone: build, in 10 minute(s)", "Starting Workflow Milestone: deploy", DEPLOY_DISPATCH,
        "Completed Workflow Milestone: deploy, in 1 hour(s)", "Workflow completed in 2 hour(s)",
    )


def test_workflow_without_milestones_completes_at_once() -> None:
    d = deliver(start_msg(), record(milestones=[]))

    assert d.events == [START, "Workflow completed in 0 second(s)"]
    assert d.finished == "completed"
    assert d.record is not None and d.record["workflow_completed"] is True
    assert d.record["workflow_duration"] == "0 second(s)"
    assert dispatches(d) == []


def test_step_duration_is_unknown_without_step_time() -> None:
    rec = record(current_step="build", step_time=None, workflow_start_time="2026-11-24T08:00:00Z")
    d = deliver({**start_msg(), "current_step": "build"}, rec)

    assert d.events[0] == "Completed Workflow Milestone: build, in <unknown>"
    assert d.record is not None and d.record["workflow_step_durations"] == {"build": "<unknown>"}


def test_worker_reporting_completion_without_error_finishes_the_workflow() -> None:
    flow, build = started()

    d = flow.send(callback(build, workflow_completed=True, workflow_error=False), NOW + timedelta(minutes=5))

    assert d.outcome == "processed"
    assert d.finished == "completed"
    assert d.record is not None
    assert d.record["workflow_completed"] is True
    assert d.record["workflow_error"] is False
    assert dispatches(d) == []
    assert d.timers == []


# ---- the message overlay (SPEC §5.0) ---------------------------------------------------------

def test_worker_failure_fails_the_workflow() -> None:
    flow, build = started()
    worker_entry = f"{PREFIX} docker build failed: exit status 1"

    d = flow.send(failed_callback(build, event_log=[*build.body["event_log"], worker_entry]),
                  NOW + timedelta(minutes=5))

    assert_failed(d)
    assert d.events == failure_events("build", WORKER_FAILURE, "5 minute(s)")
    assert d.record is not None
    assert d.record["workflow_duration"] == "5 minute(s)"
    assert d.record["workflow_step_durations"] == {"build": "5 minute(s)"}
    assert d.record["event_log"] == [*build.body["event_log"], worker_entry, *logged(*d.events)]
    success = [c.body["is_success"] for c in chats(d)]
    assert success[:2] == [False, False]


def test_worker_log_entries_are_merged_after_the_records_without_duplicates() -> None:
    flow, build = started()
    flow.rec["event_log"] = ["A", "B"]  # what the Manager holds now
    d = flow.send(callback(build, event_log=["A", "C", "B", "D"]), NOW + timedelta(minutes=1))

    assert d.record is not None
    assert d.record["event_log"] == ["A", "B", "C", "D", *logged(*d.events)]


def test_fields_set_by_the_worker_are_kept_and_passed_on() -> None:
    flow, build = started()

    d = flow.send(callback(build, source_commit_hash="deadbeef", build_artifact="registry/shop:42"),
                  NOW + timedelta(minutes=10))

    assert d.record is not None
    assert d.record["source_commit_hash"] == "deadbeef"
    deploy = the_dispatch(d).body
    assert deploy["source_commit_hash"] == "deadbeef"
    assert deploy["build_artifact"] == "registry/shop:42"
    assert deploy["custom_key"] == {"kept": True}
    assert deploy["docker_build_etcd_token"] == "tok-build"


def test_id_milestones_and_current_step_come_from_record_and_run_not_the_message() -> None:
    flow, build = started()

    d = flow.send(callback(build, milestones=["build"], current_step="config"), NOW + timedelta(minutes=10))

    assert d.events[0] == "Completed Workflow Milestone: build, in 10 minute(s)"
    assert d.record is not None
    assert d.record["id"] == WID
    assert d.record["milestones"] == ["build", "deploy"]
    assert d.record["current_step"] == "deploy"
    assert the_dispatch(d).body["milestones"] == ["build", "deploy"]


# ---- e-mail (SPEC §5.5) ----------------------------------------------------------------------

EMAIL_CONFIG = {
    "hipchat": {"room_names": ROOMS},
    "email": {
        "events": {"on_workflow_completed": ["devs", "lead@acme.io"]},
        "groups": {"devs": ["ann@acme.io", "bob@acme.io"]},
    },
}
RECIPIENTS = ["ann@acme.io", "bob@acme.io", "lead@acme.io"]
MORE_INFO = f"\n\nFor more information, please see:\n{UI}/index.html#/oa/workflows/workflows/{WID}"


@pytest.mark.parametrize(
    ("source_repo", "ref", "head"),
    [
        (SOURCE_REPO, "a1b2c3", f"Source Commit:\n{SOURCE_REPO}/commit/a1b2c3"),
        (SOURCE_REPO, None, f"Source Repo:\n{SOURCE_REPO}"),
        (None, None, f"Deployment Repo:\nhttps://github.com/{REPO}"),
    ],
)
def test_completion_email(source_repo: str | None, ref: str | None, head: str) -> None:
    flow, build = started(record(milestones=["build"], source_repo=source_repo, source_repo_git_ref=ref),
                          start_msg(notifications_config=EMAIL_CONFIG))

    d = flow.send(callback(build), NOW + timedelta(minutes=10))

    assert d.events == [
        "Completed Workflow Milestone: build, in 10 minute(s)",
        "Workflow completed in 10 minute(s)",
        "Sending on_workflow_completed email notification to the following recipient(s): "
        "ann@acme.io, bob@acme.io, lead@acme.io",
    ]
    (mail,) = emails(d)
    assert mail.exchange_id == HERE
    assert mail.body == {
        "prefix": f"SUCCEEDED {PREFIX}",
        "message": head + MORE_INFO,
        "notifications": {"email_addresses": RECIPIENTS},
    }


def test_failure_email_subject() -> None:
    flow, build = started(msg=start_msg(notifications_config=EMAIL_CONFIG))

    d = flow.send(failed_callback(build), NOW + timedelta(minutes=5))

    assert d.events[-1] == ("Sending on_workflow_completed email notification to the following recipient(s): "
                            "ann@acme.io, bob@acme.io, lead@acme.io")
    (mail,) = emails(d)
    assert mail.body["prefix"] == f"FAILED - {PREFIX}"
    assert mail.body["message"] == f"Source Commit:\n{SOURCE_REPO}/commit/a1b2c3" + MORE_INFO


@pytest.mark.parametrize("config", [
    {"hipchat": {"room_names": ROOMS}},
    {"email": {"events": {"on_workflow_completed": []}}},
    {"email": {"events": {}, "groups": {"devs": ["ann@acme.io"]}}},
])
def test_no_email_without_recipients(config: dict[str, Any]) -> None:
    flow, build = started(record(milestones=["build"]), start_msg(notifications_config=config))

    d = flow.send(callback(build), NOW + timedelta(minutes=10))

    assert d.finished == "completed"
    assert emails(d) == []
    assert not any(e.startswith("Sending on_workflow_completed") for e in d.events)


# ---- invalid milestones ----------------------------------------------------------------------

def test_unknown_milestone_fails_naming_it() -> None:
    d = deliver(start_msg(), record(milestones=["bogus_step"]))

    assert_failed(d)
    assert d.events[:2] == [START, "Starting Workflow Milestone: bogus_step"]
    failed = "Workflow Milestone Failed: bogus_step. Reason: "
    assert d.events[2].startswith(failed)
    assert "bogus_step" in d.events[2].removeprefix(failed)
    assert d.events[3] == "Workflow has failed in 0 second(s)"


def test_current_step_not_in_milestones_fails_naming_it() -> None:
    run = Run(workflow_id=WID, current_step="ghost", dispatch_id="d-1", attempt=1, phase="dispatched",
              workflow_start_time=NOW - timedelta(hours=1), step_time=NOW - timedelta(minutes=10),
              dispatched_at=NOW - timedelta(minutes=10), request={})
    d = deliver({"id": WID, "current_step": "ghost", "dispatch_id": "d-1"},
                record(milestones=["build"], current_step="ghost"), run=run)

    assert_failed(d)
    failed = "Workflow Milestone Failed: ghost. Reason: "
    assert d.events[0].startswith(failed)
    assert "ghost" in d.events[0].removeprefix(failed)
    assert d.events[1] == "Workflow has failed in 1 hour(s)"


# ---- stale and duplicate (SPEC §5.6) ---------------------------------------------------------

def test_callback_with_another_dispatch_id_is_stale() -> None:
    flow, build = started()
    assert_ignored(flow.send(callback(build, dispatch_id="not-the-current-one"), NOW), "stale")


def test_callback_without_dispatch_id_for_another_step_is_stale() -> None:
    flow, build = started()
    body = callback(build, current_step="deploy")
    del body["dispatch_id"]
    assert_ignored(flow.send(body, NOW), "stale")


def test_callback_without_dispatch_id_for_the_current_step_is_processed() -> None:
    flow, build = started()
    body = callback(build)
    del body["dispatch_id"]

    d = flow.send(body, NOW + timedelta(minutes=10))

    assert d.outcome == "processed"
    assert d.events[0] == "Completed Workflow Milestone: build, in 10 minute(s)"


def test_callback_after_the_workflow_finished_is_stale() -> None:
    flow, build = started(record(milestones=["build"]))
    assert flow.send(callback(build), NOW + timedelta(minutes=1)).finished == "completed"

    assert_ignored(flow.send(callback(build), NOW + timedelta(minutes=2)), "stale")
    assert_ignored(flow.send(failed_callback(build), NOW + timedelta(minutes=2)), "stale")


def test_repeated_callback_of_a_completed_milestone_is_stale() -> None:
    flow, build = started()
    flow.send(callback(build), NOW + timedelta(minutes=10))

    assert_ignored(flow.send(callback(build), NOW + timedelta(minutes=11)), "stale")


def test_second_start_of_a_running_workflow_is_a_duplicate() -> None:
    flow, _ = started()
    d = flow.send(start_msg(), NOW + timedelta(seconds=1))

    assert d.outcome != "processed"
    assert_ignored(d, "duplicate")


def test_second_start_is_a_duplicate_when_only_the_ledger_knows_the_run() -> None:
    flow, _ = started()
    d = deliver(start_msg(), record(), run=flow.run)  # the Manager record is not updated yet

    assert_ignored(d, "duplicate")


def test_start_of_a_workflow_whose_record_has_a_current_step_is_a_duplicate() -> None:
    d = deliver(start_msg(), record(current_step="build"))

    assert d.outcome != "processed"
    assert_ignored(d, "duplicate")


# ---- timeout (SPEC §5.6) ---------------------------------------------------------------------

def test_timeout_fails_the_milestone() -> None:
    flow = Flow(record())
    (timer,) = flow.send(start_msg()).timers
    assert (timer.kind, timer.due_at) == ("timeout", NOW + timedelta(hours=2))

    d = flow.fire("timeout", timer.token, timer.due_at)

    assert_failed(d)
    assert d.events == failure_events("build", "Milestone build timed out after 2 hour(s)", "2 hour(s)")


def test_timeout_of_a_retried_dispatch_counts_from_that_dispatch() -> None:
    flow, first = started(config=make_config(build=Policy(600.0, 1, 300.0)))
    (retry,) = flow.send(failed_callback(first), NOW + timedelta(minutes=1)).timers
    assert retry.due_at == NOW + timedelta(minutes=6)
    d = flow.fire("retry", retry.token, retry.due_at)
    (timeout,) = d.timers
    assert timeout.due_at == NOW + timedelta(minutes=16)

    d = flow.fire("timeout", timeout.token, timeout.due_at)

    assert_failed(d)
    # The retry started the milestone again (SPEC §5.6), so its duration counts from the re-dispatch.
    assert d.events == failure_events("build", "Milestone build timed out after 10 minute(s)", "16 minute(s)",
                                      "10 minute(s)")


def test_callback_after_the_timeout_is_stale() -> None:
    flow, build = started()
    flow.fire("timeout", build.body["dispatch_id"], NOW + timedelta(hours=2))

    assert_ignored(flow.send(callback(build), NOW + timedelta(hours=2, minutes=1)), "stale")


@pytest.mark.parametrize("kind", ["timeout", "retry", "scheduled"])
def test_timer_with_a_token_that_is_not_current_is_stale(kind: str) -> None:
    flow, _ = started()
    assert_ignored(flow.fire(kind, "some-old-token", NOW + timedelta(hours=3)), "stale")


def test_timeout_of_a_completed_milestone_is_stale() -> None:
    flow, build = started()
    flow.send(callback(build), NOW + timedelta(minutes=10))

    assert_ignored(flow.fire("timeout", build.body["dispatch_id"], NOW + timedelta(hours=2)), "stale")


# ---- retries (SPEC §5.6) ---------------------------------------------------------------------

def test_failed_milestone_with_retries_left_is_dispatched_again() -> None:
    flow, first = started(config=RETRY_CONFIG)
    worker_entry = f"{PREFIX} docker daemon not reachable"

    d = flow.send(failed_callback(first, event_log=[*first.body["event_log"], worker_entry]),
                  NOW + timedelta(minutes=5))
    assert d.outcome == "processed"
    assert d.events == [f"Milestone build failed (attempt 1 of 2): {WORKER_FAILURE}; retrying in 30 second(s)"]
    assert d.finished is None
    assert dispatches(d) == []
    assert d.record is not None
    assert d.record["workflow_completed"] is False
    assert d.record["workflow_error"] is False
    assert d.record["current_step"] == "build"
    assert worker_entry in d.record["event_log"]
    (retry,) = d.timers
    assert (retry.kind, retry.due_at) == ("retry", NOW + timedelta(minutes=5, seconds=30))

    d = flow.fire("retry", retry.token, retry.due_at)
    assert d.outcome == "processed"
    # The re-dispatch starts the milestone like any other (SPEC §5.6).
    assert d.events == ["Starting Workflow Milestone: build", BUILD_DISPATCH]
    assert d.record is not None and d.record["step_time"] == iso(retry.due_at)
    second = the_dispatch(d)
    assert (second.exchange_id, second.queue) == ("2", "builder")
    assert second.body["dispatch_id"] != first.body["dispatch_id"]
    assert second.body["etcd_token"] == "tok-deploy"
    assert second.body["custom_key"] == {"kept": True}
    assert d.dispatched == ["build"]
    assert d.timers == [TimerSpec("timeout", retry.due_at + timedelta(hours=2), second.body["dispatch_id"])]

    assert_ignored(flow.send(callback(first), NOW + timedelta(minutes=6)), "stale")

    d = flow.send(callback(second), NOW + timedelta(minutes=15))
    assert d.events == ["Completed Workflow Milestone: build, in 10 minute(s)", "Starting Workflow Milestone: deploy",
                        DEPLOY_DISPATCH]


def test_failure_after_the_last_retry_fails_the_workflow() -> None:
    flow, first = started(config=RETRY_CONFIG)
    (retry,) = flow.send(failed_callback(first), NOW + timedelta(minutes=5)).timers
    second = the_dispatch(flow.fire("retry", retry.token, retry.due_at))

    d = flow.send(failed_callback(second), NOW + timedelta(minutes=10))

    assert_failed(d)
    # The step's duration counts from the retry's start at 5 min 30 s.
    assert d.events == failure_events("build", WORKER_FAILURE, "10 minute(s)", "5 minute(s)")


def test_attempt_count_and_backoff_text() -> None:
    flow, first = started(config=make_config(build=Policy(7200.0, 2, 90.0)))

    d = flow.send(failed_callback(first), NOW + timedelta(minutes=5))
    assert d.events == [f"Milestone build failed (attempt 1 of 3): {WORKER_FAILURE}; retrying in 2 minute(s)"]
    (retry,) = d.timers
    assert retry.due_at == NOW + timedelta(minutes=6, seconds=30)
    second = the_dispatch(flow.fire("retry", retry.token, retry.due_at))

    d = flow.send(failed_callback(second), NOW + timedelta(minutes=10))
    assert d.events == [f"Milestone build failed (attempt 2 of 3): {WORKER_FAILURE}; retrying in 2 minute(s)"]


def test_attempts_are_counted_per_milestone() -> None:
    config = make_config(build=Policy(7200.0, 1, 30.0), deploy=Policy(3600.0, 1, 30.0))
    flow, first = started(config=config)
    (retry,) = flow.send(failed_callback(first), NOW + timedelta(minutes=5)).timers
    second = the_dispatch(flow.fire("retry", retry.token, retry.due_at))
    deploy = the_dispatch(flow.send(callback(second), NOW + timedelta(minutes=10)))

    d = flow.send(failed_callback(deploy), NOW + timedelta(minutes=20))

    assert d.events == [f"Milestone deploy failed (attempt 1 of 2): {WORKER_FAILURE}; retrying in 30 second(s)"]


def test_timeout_with_retries_left_is_retried() -> None:
    flow, first = started(config=RETRY_CONFIG)

    d = flow.fire("timeout", first.body["dispatch_id"], NOW + timedelta(hours=2))

    assert d.finished is None
    assert d.events == ["Milestone build failed (attempt 1 of 2): Milestone build timed out after 2 hour(s); "
                        "retrying in 30 second(s)"]
    assert [t.kind for t in d.timers] == ["retry"]


def test_retry_timer_fires_once() -> None:
    flow, first = started(config=RETRY_CONFIG)
    (retry,) = flow.send(failed_callback(first), NOW + timedelta(minutes=5)).timers
    flow.fire("retry", retry.token, retry.due_at)

    assert_ignored(flow.fire("retry", retry.token, retry.due_at + timedelta(seconds=1)), "stale")


# ---- cancel (SPEC §5.6) ----------------------------------------------------------------------

def test_cancel_fails_the_workflow_and_clears_its_timers() -> None:
    flow, build = started()

    d = flow.send({"id": WID, "action": "cancel", "reason": "superseded by v2"}, NOW + timedelta(minutes=3))

    assert_failed(d)
    assert d.events == failure_events("build", "Workflow cancelled: superseded by v2", "3 minute(s)")
    assert d.timers == []
    assert d.cancel_timers is True
    assert [c.body["room_names"] for c in chats(d)] == [ROOMS] * len(d.events)  # from the run's request
    assert_ignored(flow.send(callback(build), NOW + timedelta(minutes=4)), "stale")


def test_cancel_while_waiting_for_a_scheduled_start() -> None:
    flow = Flow(record(milestones=["scheduled", "build"], scheduled_start_time=SCHEDULED_AT))
    (timer,) = flow.send(start_msg()).timers

    d = flow.send({"id": WID, "action": "cancel", "reason": "release postponed"}, NOW + timedelta(minutes=1))

    assert_failed(d)
    assert d.events[0] == "Workflow Milestone Failed: scheduled. Reason: Workflow cancelled: release postponed"
    assert d.cancel_timers is True
    assert_ignored(flow.fire("scheduled", timer.token, timer.due_at), "stale")


def test_cancel_of_a_finished_workflow_has_no_effect() -> None:
    flow, build = started(record(milestones=["build"]))
    flow.send(callback(build), NOW + timedelta(minutes=1))

    d = flow.send({"id": WID, "action": "cancel", "reason": "too late"}, NOW + timedelta(minutes=2))

    assert d.outcome != "processed"
    assert d.record is None and d.messages == []


def test_a_worker_that_registered_since_the_module_list_was_cached_is_found() -> None:
    rec = {"id": WID, "deployment_repo": REPO, "milestones": ["build"], "current_step": None}
    provided = {**FACTS, ("modules", "1"): [], ("fresh_modules", "1"): [{"type": "builder"}]}
    d = step(Delivery({"id": WID}), rec, provided=provided)
    assert d.dispatched == ["build"]
    assert [m.queue for m in d.messages if m.queue == "builder"] == ["builder"]
