"""The sandbox Manager over real HTTP, on the real Postgres and RabbitMQ: every route of SPEC §3
with its status codes and bodies, OAuth2, validation, and execute publishing the start message."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aio_pika
import asyncpg
import httpx
import pytest
from aio_pika.abc import AbstractIncomingMessage

from tests.support.sandbox import random_seed, running_sandbox, sandbox_schema, write_seed
from tests.support.services import AMQP_URL, DATABASE_URL
from workflow_orchestrator.sandbox.migrations import MIGRATIONS
from workflow_orchestrator.sandbox.seed import DEFAULT_SEED, load_seed
from workflow_orchestrator.sandbox.server import RunningSandbox, SandboxSettings, SandboxStartError, start_sandbox

REPO_ROOT = Path(__file__).resolve().parents[2]


class Api:
    """An HTTP client of one sandbox with a valid token."""

    def __init__(self, sandbox: RunningSandbox, http: httpx.AsyncClient, token: str) -> None:
        self.sandbox = sandbox
        self.http = http
        self.token = token
        self.auth = {"Authorization": f"Bearer {token}"}

    async def request(self, method: str, path: str, headers: dict[str, str] | None = None,
                      **kw: Any) -> httpx.Response:
        return await self.http.request(method, path, headers={**self.auth, **(headers or {})}, **kw)

    async def get(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("POST", path, **kw)

    async def put(self, path: str, **kw: Any) -> httpx.Response:
        return await self.request("PUT", path, **kw)

    async def delete(self, path: str) -> httpx.Response:
        return await self.request("DELETE", path)

    async def create(self, **fields: Any) -> dict[str, Any]:
        resp = await self.post("/workflows", json={"deployment_repo": "acme/web-deploy", **fields})
        assert resp.status_code == 201, resp.text
        body: dict[str, Any] = resp.json()
        return body


async def fetch_token(http: httpx.AsyncClient, sandbox: RunningSandbox) -> str:
    resp = await http.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": sandbox.client_id, "client_secret": sandbox.client_secret})
    assert resp.status_code == 200, resp.text
    return str(resp.json()["access_token"])


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with running_sandbox() as sandbox, httpx.AsyncClient(base_url=sandbox.url, timeout=10) as http:
        yield Api(sandbox, http, await fetch_token(http, sandbox))


def orchestration_queue(sandbox: RunningSandbox) -> str:
    seed = sandbox.seed
    return f"{seed.exchange(seed.orchestrator_exchange_id).routing_key}.{seed.orchestration_queue_name}"


async def take_message(queue: str, correlation_id: str, timeout: float = 10.0) -> AbstractIncomingMessage:
    """The message for `correlation_id` on `queue`, polling until the deadline."""
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            message = await q.get(no_ack=True, fail=False)
            if message is None:
                await asyncio.sleep(0.05)
            elif message.correlation_id == correlation_id:
                return message
        raise AssertionError(f"no message for {correlation_id} on {queue} within {timeout}s")
    finally:
        await connection.close()


async def message_count(queue: str) -> int:
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        q = await channel.declare_queue(queue, passive=True)
        return int(q.declaration_result.message_count or 0)
    finally:
        await connection.close()


# ---- OAuth2 ---------------------------------------------------------------------------------
async def test_token_with_form_credentials(api: Api) -> None:
    s = api.sandbox
    resp = await api.http.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": s.client_id, "client_secret": s.client_secret})
    assert resp.status_code == 200
    body = resp.json()
    assert body["token_type"] == "Bearer" and body["expires_in"] == 3600
    assert isinstance(body["access_token"], str) and len(body["access_token"]) >= 32
    assert resp.headers["Cache-Control"] == "no-store"
    assert (await api.http.get("/workflows", headers={"Authorization": f"Bearer {body['access_token']}"})
            ).status_code == 200


async def test_token_with_http_basic_and_json_body(api: Api) -> None:
    s = api.sandbox
    basic = base64.b64encode(f"{s.client_id}:{s.client_secret}".encode()).decode()
    resp = await api.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                               headers={"Authorization": f"Basic {basic}"})
    assert resp.status_code == 200, resp.text
    resp = await api.http.post("/oauth/token", json={
        "grant_type": "client_credentials", "client_id": s.client_id, "client_secret": s.client_secret})
    assert resp.status_code == 200, resp.text
    assert resp.json()["access_token"] != api.token


@pytest.mark.parametrize(("form", "status", "error"), [
    ({"grant_type": "client_credentials", "client_id": "CLIENT", "client_secret": "wrong"}, 401, "invalid_client"),
    ({"grant_type": "client_credentials", "client_id": "nobody", "client_secret": "SECRET"}, 401, "invalid_client"),
    ({"grant_type": "client_credentials"}, 401, "invalid_client"),
    ({"grant_type": "password", "client_id": "CLIENT", "client_secret": "SECRET"}, 400, "unsupported_grant_type"),
    ({"client_id": "CLIENT", "client_secret": "SECRET"}, 400, "invalid_request"),
])
async def test_token_errors(api: Api, form: dict[str, str], status: int, error: str) -> None:
    s = api.sandbox
    data = {k: v.replace("CLIENT", s.client_id).replace("SECRET", s.client_secret) for k, v in form.items()}
    resp = await api.http.post("/oauth/token", data=data)
    assert resp.status_code == status, resp.text
    assert resp.json()["error"] == error
    assert "access_token" not in resp.json()
    if status == 401:
        assert resp.headers["WWW-Authenticate"].startswith("Basic")


async def test_token_with_malformed_basic_header(api: Api) -> None:
    resp = await api.http.post("/oauth/token", data={"grant_type": "client_credentials"},
                               headers={"Authorization": "Basic not-base64!"})
    assert resp.status_code == 401 and resp.json()["error"] == "invalid_client"


# ---- authentication of the other routes -----------------------------------------------------
PROTECTED = [
    ("GET", "/workflows"), ("POST", "/workflows"), ("GET", "/workflows/{wid}"), ("PUT", "/workflows/{wid}"),
    ("DELETE", "/workflows/{wid}"), ("POST", "/workflows/{wid}/execute"), ("GET", "/messaging/exchanges/1"),
    ("GET", "/messaging/exchanges/1/brokers"), ("GET", "/messaging/exchanges/1/clusters"),
    ("GET", "/messaging/exchanges/1/modules"), ("POST", "/messaging/exchanges/1/modules"),
    ("GET", "/messaging/exchanges/1/modules/h"), ("DELETE", "/messaging/exchanges/1/modules/h"),
    ("GET", "/messaging/brokers/1"), ("GET", "/messaging/brokers/1/connections"), ("GET", "/clusters"),
    ("GET", "/clusters/x"), ("GET", "/system_events"), ("POST", "/system_events"), ("GET", "/sandbox/stats"),
    ("POST", "/sandbox/stats/reset"), ("GET", "/no/such/route"),
]


async def test_every_route_needs_a_valid_bearer_token(api: Api) -> None:
    wf = await api.create()
    bad_headers: list[dict[str, str]] = [
        {}, {"Authorization": "Bearer"}, {"Authorization": "Bearer wrong-token"},
        {"Authorization": f"Basic {api.token}"}, {"Authorization": f"Token {api.token}"},
        {"Authorization": f"Bearer {api.token}x"},
    ]
    for method, path in PROTECTED:
        url = path.format(wid=wf["id"])
        for headers in bad_headers:
            resp = await api.http.request(method, url, headers=headers, json={"deployment_repo": "a/b"})
            assert resp.status_code == 401, (method, url, headers, resp.text)
            assert resp.json()["error"].startswith("unauthorized")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    # nothing was changed by the refused calls
    assert (await api.get(f"/workflows/{wf['id']}")).json()["execute_options"] is None
    assert len((await api.get("/workflows")).json()) == 1


async def test_both_bearer_forms_are_accepted(api: Api) -> None:
    for header in (f"Bearer {api.token}", f"Bearer access_token={api.token}", f"bearer  {api.token}"):
        resp = await api.http.get("/clusters", headers={"Authorization": header})
        assert resp.status_code == 200, header


async def test_public_routes_need_no_token(api: Api) -> None:
    resp = await api.http.get("/openapi.json")
    assert resp.status_code == 200 and resp.json()["openapi"].startswith("3.0")
    resp = await api.http.get("/healthz")
    assert resp.status_code == 200 and resp.json() == {"status": "ok"}


async def test_expired_token_is_refused() -> None:
    async with running_sandbox(token_ttl_seconds=1) as sandbox, \
            httpx.AsyncClient(base_url=sandbox.url) as http:
        token = await fetch_token(http, sandbox)
        headers = {"Authorization": f"Bearer {token}"}
        assert (await http.get("/clusters", headers=headers)).status_code == 200
        deadline = time.monotonic() + 10
        while (status := (await http.get("/clusters", headers=headers)).status_code) == 200:
            assert time.monotonic() < deadline, "token still accepted long after its expiry"
            await asyncio.sleep(0.1)
        assert status == 401
        resp = await http.get("/clusters", headers=headers)
        assert 'error="invalid_token"' in resp.headers["WWW-Authenticate"]


async def test_tokens_and_workflows_survive_a_restart_and_reset_wipes_them() -> None:
    with_seed = write_seed(Path(f"/tmp/sandbox-restart-{uuid.uuid4().hex[:8]}.toml"), random_seed())
    try:
        async with sandbox_schema() as schema:
            async with running_sandbox(seed_file=with_seed, db_schema=schema) as first, \
                    httpx.AsyncClient(base_url=first.url) as http:
                token = await fetch_token(http, first)
                created = await Api(first, http, token).create()
            async with running_sandbox(seed_file=with_seed, db_schema=schema) as second, \
                    httpx.AsyncClient(base_url=second.url) as http:
                api = Api(second, http, token)  # the token issued before the restart
                resp = await api.get(f"/workflows/{created['id']}")
                assert resp.status_code == 200 and resp.json() == created
            async with running_sandbox(seed_file=with_seed, db_schema=schema, reset=True) as third, \
                    httpx.AsyncClient(base_url=third.url) as http:
                assert (await http.get("/workflows", headers={"Authorization": f"Bearer {token}"})
                        ).status_code == 401
                api = Api(third, http, await fetch_token(http, third))
                assert (await api.get(f"/workflows/{created['id']}")).status_code == 404
                assert len((await api.get("/clusters")).json()) == 3  # re-seeded
    finally:
        with_seed.unlink(missing_ok=True)


# ---- workflows ------------------------------------------------------------------------------
WORKFLOW_KEYS = {
    "id", "deployment_repo", "deployment_repo_git_ref", "source_repo", "source_repo_git_ref",
    "source_commit_hash", "milestones", "current_step", "elapsed_step_time", "elapsed_workflow_time",
    "workflow_duration", "workflow_step_durations", "workflow_error", "workflow_completed", "event_log",
    "workflow_start_time", "step_time", "scheduled_start_time", "execute_options", "inserted_at", "updated_at",
}


async def test_create_answers_201_with_location_and_the_record(api: Api) -> None:
    resp = await api.post("/workflows", json={
        "deployment_repo": "acme/web-deploy/", "source_repo": "https://github.com/acme/web/",
        "source_repo_git_ref": "abc123", "milestones": ["build", "deploy"], "unknown_key": 1})
    assert resp.status_code == 201, resp.text
    body = resp.json()
    assert set(body) == WORKFLOW_KEYS
    assert resp.headers["Location"] == f"/workflows/{body['id']}"
    assert uuid.UUID(body["id"]).version == 4
    assert body["deployment_repo"] == "acme/web-deploy"  # trailing / trimmed
    assert body["source_repo"] == "https://github.com/acme/web"
    assert body["milestones"] == ["build", "deploy"]
    assert body["workflow_completed"] is False
    for key in WORKFLOW_KEYS - {"id", "deployment_repo", "source_repo", "source_repo_git_ref", "milestones",
                                "workflow_completed", "inserted_at", "updated_at"}:
        assert body[key] is None, key
    datetime.fromisoformat(body["inserted_at"])
    shown = await api.get(resp.headers["Location"])
    assert shown.status_code == 200 and shown.json() == body


@pytest.mark.parametrize(("given", "stored"), [
    (["deploy"], ["config", "deploy"]),
    (["deploy", "deploy_oa"], ["config", "deploy", "deploy_oa"]),
    ([], ["config"]),
    (["build", "deploy"], ["build", "deploy"]),
    (["config", "deploy"], ["config", "deploy"]),
    (["deploy", "build"], ["deploy", "build"]),
    (None, None),
])
async def test_create_prepends_config_to_milestones_without_build_or_config(
        api: Api, given: list[str] | None, stored: list[str] | None) -> None:
    body = await api.create(milestones=given)
    assert body["milestones"] == stored
    assert (await api.get(f"/workflows/{body['id']}")).json()["milestones"] == stored


async def test_create_with_a_given_id_and_a_duplicate(api: Api) -> None:
    wid = str(uuid.uuid4())
    assert (await api.create(id=wid))["id"] == wid
    resp = await api.post("/workflows", json={"id": wid, "deployment_repo": "other/repo"})
    assert resp.status_code == 409
    assert (await api.get(f"/workflows/{wid}")).json()["deployment_repo"] == "acme/web-deploy"


@pytest.mark.parametrize(("body", "fields"), [
    ({}, {"deployment_repo"}),
    ({"deployment_repo": ""}, {"deployment_repo"}),
    ({"deployment_repo": "/"}, {"deployment_repo"}),
    ({"deployment_repo": 42}, {"deployment_repo"}),
    ({"deployment_repo": "a/b", "id": "not-a-uuid"}, {"id"}),
    ({"deployment_repo": "a/b", "milestones": "build"}, {"milestones"}),
    ({"deployment_repo": "a/b", "milestones": ["build", 7]}, {"milestones.1"}),
    ({"deployment_repo": "a/b", "workflow_completed": "true"}, {"workflow_completed"}),
    ({"deployment_repo": "a/b", "event_log": [None]}, {"event_log.0"}),
    ({"deployment_repo": "a/b", "workflow_step_durations": {"build": 5}}, {"workflow_step_durations.build"}),
    ({"deployment_repo": "a/b", "execute_options": []}, {"execute_options"}),
    ({"deployment_repo": "a/b\u0000"}, {"deployment_repo"}),
    ({"deployment_repo": 1, "source_repo": 2, "current_step": 3}, {"deployment_repo", "source_repo", "current_step"}),
])
async def test_create_rejects_wrong_types_with_field_errors(api: Api, body: dict[str, Any], fields: set[str]) -> None:
    resp = await api.post("/workflows", json=body)
    assert resp.status_code == 400, resp.text
    assert set(resp.json()["fields"]) == fields
    assert (await api.get("/workflows", params={"lookback": 0})).json() == []  # nothing half-written


@pytest.mark.parametrize("raw", [b"{", b"[1, 2]", b"\"text\"", b"", b"{\"deployment_repo\": NaN}",
                                 b"\xff\xfe", b"{\"deployment_repo\": 1e999}", b"[" * 100_000])
async def test_create_rejects_malformed_json(api: Api, raw: bytes) -> None:
    resp = await api.post("/workflows", content=raw, headers={"Content-Type": "application/json"})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"]


async def test_show_unknown_and_non_uuid_ids_are_404(api: Api) -> None:
    for wid in (str(uuid.uuid4()), "not-a-uuid", "1", "%00"):
        resp = await api.get(f"/workflows/{wid}")
        assert resp.status_code == 404, wid
        assert "error" in resp.json()


async def test_update_is_partial_keeps_unsent_fields_and_drops_unknown_keys(api: Api) -> None:
    wf = await api.create(source_repo="acme/web", milestones=["build"])
    resp = await api.put(f"/workflows/{wf['id']}", json={
        "id": str(uuid.uuid4()), "workflow_id": "ignored", "current_step": "build", "event_log": ["a", "b"],
        "workflow_step_durations": {"build": "2 minute(s)"}, "workflow_completed": False,
        "workflow_error": False, "step_time": "2026-11-24T10:00:00Z", "dispatch_id": "d-1", "nested": {"x": 1}})
    assert resp.status_code == 204, resp.text
    assert resp.content == b""
    rec = (await api.get(f"/workflows/{wf['id']}")).json()
    assert set(rec) == WORKFLOW_KEYS
    assert rec["id"] == wf["id"]
    assert rec["current_step"] == "build" and rec["event_log"] == ["a", "b"]
    assert rec["workflow_step_durations"] == {"build": "2 minute(s)"}
    assert rec["source_repo"] == "acme/web" and rec["milestones"] == ["build"]  # kept
    assert rec["inserted_at"] == wf["inserted_at"] and rec["updated_at"] > wf["updated_at"]
    # null clears a field; a repo may change and is trimmed
    resp = await api.put(f"/workflows/{wf['id']}", json={"current_step": None, "deployment_repo": "acme/new/"})
    assert resp.status_code == 204
    rec = (await api.get(f"/workflows/{wf['id']}")).json()
    assert rec["current_step"] is None and rec["deployment_repo"] == "acme/new"
    listed = (await api.get("/workflows", params={"deployment_repo": "acme/new"})).json()
    assert [w["id"] for w in listed] == [wf["id"]]


@pytest.mark.parametrize(("body", "fields"), [
    ({"workflow_completed": "yes"}, {"workflow_completed"}),
    ({"current_step": "build", "milestones": [1]}, {"milestones.0"}),
    ({"deployment_repo": None}, {"deployment_repo"}),
    ({"event_log": "text"}, {"event_log"}),
    ({"workflow_error": 1}, {"workflow_error"}),
])
async def test_update_rejects_wrong_types_and_changes_nothing(
        api: Api, body: dict[str, Any], fields: set[str]) -> None:
    wf = await api.create()
    resp = await api.put(f"/workflows/{wf['id']}", json=body)
    assert resp.status_code == 400, resp.text
    assert set(resp.json()["fields"]) == fields
    assert (await api.get(f"/workflows/{wf['id']}")).json() == wf


async def test_update_errors(api: Api) -> None:
    wf = await api.create()
    assert (await api.put(f"/workflows/{uuid.uuid4()}", json={"current_step": "x"})).status_code == 404
    assert (await api.put("/workflows/nope", json={"current_step": "x"})).status_code == 404
    for raw in (b"{", b"[]", b"", b"null"):
        resp = await api.put(f"/workflows/{wf['id']}", content=raw)
        assert resp.status_code == 400, raw


async def test_delete(api: Api) -> None:
    wf = await api.create()
    assert (await api.delete(f"/workflows/{wf['id']}")).status_code == 204
    assert (await api.get(f"/workflows/{wf['id']}")).status_code == 404
    assert (await api.delete(f"/workflows/{wf['id']}")).status_code == 404
    assert (await api.delete("/workflows/not-a-uuid")).status_code == 404


async def test_list_filters_by_lookback_and_repos(api: Api) -> None:
    old = await api.create(deployment_repo="acme/old", source_repo="acme/old-src")
    a = await api.create(deployment_repo="acme/a", source_repo="acme/src")
    b = await api.create(deployment_repo="acme/b", source_repo="acme/src")
    await api.sandbox.store.backdate_workflow(uuid.UUID(old["id"]), datetime.now(UTC) - timedelta(hours=30))

    async def ids(**params: Any) -> list[str]:
        resp = await api.get("/workflows", params=params)
        assert resp.status_code == 200, resp.text
        return [w["id"] for w in resp.json()]

    assert await ids() == [b["id"], a["id"]]  # the last 24 hours by default, newest first
    assert await ids(lookback=24) == [b["id"], a["id"]]
    assert await ids(lookback=48) == [b["id"], a["id"], old["id"]]
    assert await ids(lookback=0) == [b["id"], a["id"], old["id"]]
    assert await ids(lookback=-1) == [b["id"], a["id"], old["id"]]
    assert await ids(deployment_repo="acme/a") == [a["id"]]
    assert await ids(deployment_repo="acme/a/") == [a["id"]]
    assert await ids(deployment_repo="acme/old") == []
    assert await ids(deployment_repo="acme/old", lookback=0) == [old["id"]]
    assert await ids(source_repo="acme/src") == [b["id"], a["id"]]
    assert await ids(source_repo="acme/src", deployment_repo="acme/b") == [b["id"]]
    assert await ids(source_repo="nope") == []
    full = (await api.get("/workflows")).json()
    assert set(full[0]) == WORKFLOW_KEYS
    assert await ids(lookback=10**30) == [b["id"], a["id"], old["id"]]  # beyond any date: all
    for bad in ("abc", "1.5", "", "1e3", "٣"):
        resp = await api.get("/workflows", params={"lookback": bad})
        assert resp.status_code == 400, bad
        assert "lookback" in resp.json()["fields"]


# ---- execute ---------------------------------------------------------------------------------
async def test_execute_publishes_the_start_message_on_the_orchestration_queue(api: Api) -> None:
    wf = await api.create(milestones=["build", "deploy"], source_repo="acme/web")
    options = {"force_build": True, "build_messaging_exchange_id": "2", "deploy_messaging_exchange_id": 1,
               "etcd_token": "deploy-east", "notifications_config": {"hipchat": {"room_names": ["ops"]}},
               "deployable_units": [{"name": "web"}], "custom": {"kept": [1, 2]}}
    resp = await api.post(f"/workflows/{wf['id']}/execute", json=options)
    assert resp.status_code == 202, resp.text
    assert resp.headers["Location"] == f"/workflows/{wf['id']}"
    message_id = resp.json()["message_id"]

    message = await take_message(orchestration_queue(api.sandbox), wf["id"])
    assert message.message_id == message_id
    assert message.correlation_id == wf["id"]
    assert message.type == "workflow.start" and message.app_id == "sandbox-manager"
    assert message.content_type == "application/json"
    assert message.delivery_mode == aio_pika.DeliveryMode.PERSISTENT
    assert message.timestamp is not None and abs(message.timestamp.timestamp() - time.time()) < 60
    body = json.loads(message.body)
    stored_options = {**options, "build_messaging_exchange_id": 2}
    assert body["id"] == body["workflow_id"] == wf["id"]
    assert body["milestones"] == ["build", "deploy"] and body["deployment_repo"] == "acme/web-deploy"
    assert body["current_step"] is None and body["workflow_completed"] is False
    for key, value in stored_options.items():
        assert body[key] == value, key
    assert body["execute_options"] == stored_options
    assert body["workflow_orchestration_exchange_id"] == 1 == body["notifications_exchange_id"]
    assert body["workflow_orchestration_broker_id"] == 1 == body["notifications_broker_id"]
    assert body["orchestration_queue_name"] == "workflow_orchestration"

    rec = (await api.get(f"/workflows/{wf['id']}")).json()
    assert rec["execute_options"] == stored_options

    # the queue is declared as the orchestrator declares it: dead-lettering into <name>_error
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.declare_queue(f"{orchestration_queue(api.sandbox)}_error", passive=True)
        queue = orchestration_queue(api.sandbox)
        await channel.declare_queue(queue, durable=True, arguments={
            "x-dead-letter-exchange": "", "x-dead-letter-routing-key": f"{queue}_error"})
    finally:
        await connection.close()


async def test_execute_with_no_body(api: Api) -> None:
    wf = await api.create(milestones=["deploy"])
    resp = await api.http.post(f"/workflows/{wf['id']}/execute", headers=api.auth)
    assert resp.status_code == 202, resp.text
    body = json.loads((await take_message(orchestration_queue(api.sandbox), wf["id"])).body)
    assert body["milestones"] == ["config", "deploy"] and body["execute_options"] == {}
    assert (await api.get(f"/workflows/{wf['id']}")).json()["execute_options"] == {}


async def test_execute_conflicts_and_errors(api: Api) -> None:
    queue = orchestration_queue(api.sandbox)
    executed = await api.create()
    assert (await api.post(f"/workflows/{executed['id']}/execute", json={})).status_code == 202
    await take_message(queue, executed["id"])
    started = await api.create(current_step="build", milestones=["build"])
    completed = await api.create(workflow_completed=True)
    for wf, why in ((executed, "executed"), (started, "started"), (completed, "completed")):
        resp = await api.post(f"/workflows/{wf['id']}/execute", json={"force_build": True})
        assert resp.status_code == 409, resp.text
        assert why in resp.json()["error"]
    assert (await api.get(f"/workflows/{started['id']}")).json()["execute_options"] is None
    assert (await api.post(f"/workflows/{uuid.uuid4()}/execute", json={})).status_code == 404
    assert (await api.post("/workflows/xyz/execute", json={})).status_code == 404
    fresh = await api.create()
    for body in ({"force_build": "yes"}, {"build_messaging_exchange_id": "east"}, {"etcd_token": 5}, [1]):
        resp = await api.post(f"/workflows/{fresh['id']}/execute", json=body)
        assert resp.status_code == 400, body
    assert (await api.get(f"/workflows/{fresh['id']}")).json()["execute_options"] is None
    assert await message_count(queue) == 0


async def test_concurrent_executes_publish_once(api: Api) -> None:
    wf = await api.create()
    statuses = sorted([r.status_code for r in await asyncio.gather(
        *(api.post(f"/workflows/{wf['id']}/execute", json={}) for _ in range(5)))])
    assert statuses == [202, 409, 409, 409, 409]
    await take_message(orchestration_queue(api.sandbox), wf["id"])
    assert await message_count(orchestration_queue(api.sandbox)) == 0


async def test_execute_with_an_unreachable_broker_is_503_and_changes_nothing() -> None:
    async with running_sandbox(amqp_url="amqp://guest:guest@127.0.0.1:1/", publish_timeout_seconds=3) as sandbox, \
            httpx.AsyncClient(base_url=sandbox.url, timeout=10) as http:
        api = Api(sandbox, http, await fetch_token(http, sandbox))
        wf = await api.create()
        resp = await api.post(f"/workflows/{wf['id']}/execute", json={"force_build": True})
        assert resp.status_code == 503, resp.text
        assert "guest:guest" not in resp.text  # no credentials in errors
        assert (await api.get(f"/workflows/{wf['id']}")).json() == wf


async def test_execute_resolves_the_broker_from_the_seeded_connection() -> None:
    async with running_sandbox(amqp_url="") as sandbox, httpx.AsyncClient(base_url=sandbox.url) as http:
        api = Api(sandbox, http, await fetch_token(http, sandbox))
        wf = await api.create()
        assert (await api.post(f"/workflows/{wf['id']}/execute", json={})).status_code == 202
        await take_message(orchestration_queue(sandbox), wf["id"])


# ---- messaging records ----------------------------------------------------------------------
@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Api]:
    """A sandbox whose exchange 2 is restricted to broker 2, with a second connection."""
    seed = random_seed(
        brokers=[{"id": 1, "name": "east-broker"}, {"id": 2, "name": "west-broker", "failover_broker_id": 1}],
        connections=[*random_seed()["connections"],
                     {"id": 7, "broker_id": 2, "username": "u", "password": "p", "host": "rabbit-west",
                      "port": 5671, "virtual_host": "west"}],
        exchange_brokers=[{"id": 90, "messaging_exchange_id": 2, "messaging_broker_id": 2}],
        modules=[{"messaging_exchange_id": 1, "hostname": "seeded-builder", "type": "builder",
                  "status": "active", "workload": [1, 2]}],
    )
    seed["exchanges"][1]["failover_exchange_id"] = 1
    async with running_sandbox(seed_file=write_seed(tmp_path / "seed.toml", seed)) as sandbox, \
            httpx.AsyncClient(base_url=sandbox.url) as http:
        yield Api(sandbox, http, await fetch_token(http, sandbox))


async def test_exchanges(site: Api) -> None:
    seed = site.sandbox.seed
    resp = await site.get("/messaging/exchanges/2")
    assert resp.status_code == 200
    assert resp.json() == {"id": 2, "name": "west", "routing_key": seed.exchange(2).routing_key,
                           "root_exchange_name": seed.exchange(2).root_exchange_name, "failover_exchange_id": 1}
    assert (await site.get("/messaging/exchanges/1")).json()["failover_exchange_id"] is None
    for bad in ("99", "x", "-1", "--5", "-", "1.0", "99999999999999999999999", "9223372036854775808"):
        assert (await site.get(f"/messaging/exchanges/{bad}")).status_code == 404, bad


async def test_exchange_broker_restrictions(site: Api) -> None:
    assert (await site.get("/messaging/exchanges/2/brokers")).json() == [
        {"id": 90, "messaging_exchange_id": 2, "messaging_broker_id": 2}]
    assert (await site.get("/messaging/exchanges/1/brokers")).json() == []
    assert (await site.get("/messaging/exchanges/99/brokers")).status_code == 404


async def test_exchange_clusters(site: Api) -> None:
    r = site.sandbox.seed.clusters[0].etcd_token.removeprefix("build-")

    async def tokens(xid: int, **params: Any) -> list[str]:
        resp = await site.get(f"/messaging/exchanges/{xid}/clusters", params=params)
        assert resp.status_code == 200, resp.text
        return [c["etcd_token"] for c in resp.json()]

    assert await tokens(1, allow_docker_builds="true") == [f"build-{r}"]
    assert await tokens(1) == [f"build-{r}", f"deploy-east-{r}"]
    assert await tokens(1, allow_docker_builds="false") == [f"deploy-east-{r}"]
    assert await tokens(2, allow_docker_builds="true") == []
    cluster = (await site.get("/messaging/exchanges/1/clusters")).json()[0]
    assert cluster == {"id": 1, "etcd_token": f"build-{r}", "name": None, "messaging_exchange_id": 1,
                       "allow_docker_builds": True, "hosting_provider_id": None}
    assert (await site.get("/messaging/exchanges/99/clusters")).status_code == 404
    resp = await site.get("/messaging/exchanges/1/clusters", params={"allow_docker_builds": "maybe"})
    assert resp.status_code == 400 and "allow_docker_builds" in resp.json()["fields"]


async def test_brokers_and_connections(site: Api) -> None:
    assert (await site.get("/messaging/brokers/2")).json() == {"id": 2, "name": "west-broker",
                                                               "failover_broker_id": 1}
    assert (await site.get("/messaging/brokers/2/connections")).json() == [
        {"id": 7, "messaging_broker_id": 2, "username": "u", "password": "p", "host": "rabbit-west",
         "port": 5671, "virtual_host": "west"}]
    assert len((await site.get("/messaging/brokers/1/connections")).json()) == 1
    for path in ("/messaging/brokers/3", "/messaging/brokers/3/connections", "/messaging/brokers/x"):
        assert (await site.get(path)).status_code == 404, path


async def test_clusters(site: Api) -> None:
    r = site.sandbox.seed.clusters[0].etcd_token.removeprefix("build-")
    all_ = (await site.get("/clusters")).json()
    assert [c["etcd_token"] for c in all_] == [f"build-{r}", f"deploy-east-{r}", f"deploy-west-{r}"]
    builds = (await site.get("/clusters", params={"allow_docker_builds": "true"})).json()
    assert [c["etcd_token"] for c in builds] == [f"build-{r}"]
    resp = await site.get(f"/clusters/deploy-west-{r}")
    assert resp.status_code == 200 and resp.json()["messaging_exchange_id"] == 2
    assert (await site.get("/clusters/no-such-cluster")).status_code == 404
    assert (await site.get("/clusters", params={"allow_docker_builds": "x"})).status_code == 400


async def test_modules_register_list_show_delete(site: Api) -> None:
    listed = (await site.get("/messaging/exchanges/1/modules")).json()
    assert [m["hostname"] for m in listed] == ["seeded-builder"] and listed[0]["workload"] == [1, 2]
    assert (await site.get("/messaging/exchanges/2/modules")).json() == []

    resp = await site.post("/messaging/exchanges/2/modules",
                           json={"hostname": "deployer-1", "type": "deployer", "status": "active", "workload": []})
    assert resp.status_code == 201, resp.text
    module = resp.json()
    assert resp.headers["Location"] == "/messaging/exchanges/2/modules/deployer-1"
    assert {k: module[k] for k in ("hostname", "type", "status", "workload", "messaging_exchange_id")} == {
        "hostname": "deployer-1", "type": "deployer", "status": "active", "workload": [],
        "messaging_exchange_id": 2}
    # re-registering the same hostname refreshes it (upsert), it does not add a second one
    resp = await site.post("/messaging/exchanges/2/modules",
                           json={"hostname": "deployer-1", "type": "deployer", "status": "active",
                                 "workload": {"in_flight": 3}})
    assert resp.status_code == 201 and resp.json()["id"] == module["id"]
    listed = (await site.get("/messaging/exchanges/2/modules")).json()
    assert len(listed) == 1 and listed[0]["workload"] == {"in_flight": 3}
    assert (await site.get("/messaging/exchanges/2/modules/deployer-1")).json()["workload"] == {"in_flight": 3}

    assert (await site.delete("/messaging/exchanges/2/modules/deployer-1")).status_code == 204
    assert (await site.get("/messaging/exchanges/2/modules")).json() == []
    assert (await site.delete("/messaging/exchanges/2/modules/deployer-1")).status_code == 404
    assert (await site.get("/messaging/exchanges/2/modules/deployer-1")).status_code == 404
    assert (await site.delete("/messaging/exchanges/99/modules/deployer-1")).status_code == 404


async def test_module_errors(site: Api) -> None:
    ok = {"hostname": "h", "type": "builder", "status": "active", "workload": []}
    assert (await site.post("/messaging/exchanges/99/modules", json=ok)).status_code == 404
    assert (await site.get("/messaging/exchanges/99/modules")).status_code == 404
    for body, field in (({**ok, "hostname": ""}, "hostname"), ({"type": "builder"}, "hostname"),
                        ({**ok, "type": 3}, "type"), ({**ok, "status": False}, "status"),
                        ({**ok, "hostname": "a/b"}, "hostname")):
        resp = await site.post("/messaging/exchanges/1/modules", json=body)
        assert resp.status_code == 400, body
        assert field in resp.json()["fields"]
    resp = await site.post("/messaging/exchanges/1/modules", content=b"{")
    assert resp.status_code == 400
    assert len((await site.get("/messaging/exchanges/1/modules")).json()) == 1


# ---- system events, stats -------------------------------------------------------------------
async def test_system_events(api: Api) -> None:
    first = await api.post("/system_events", json={
        "type": "unhandled_exception", "severity": "error", "message": "boom", "data": {"component": "x"}})
    assert first.status_code == 201, first.text
    assert isinstance(first.json()["id"], int)
    second = await api.post("/system_events", json={"type": "bad_message", "severity": "warning",
                                                    "message": "not JSON", "data": None, "unique": True})
    assert second.status_code == 201
    dup = await api.post("/system_events", json={"type": "bad_message", "severity": "warning",
                                                 "message": "not JSON again", "data": None, "unique": True})
    assert dup.status_code == 200 and dup.json()["id"] == second.json()["id"]
    listed = (await api.get("/system_events")).json()
    assert [e["id"] for e in listed] == [second.json()["id"], first.json()["id"]]  # newest first
    assert listed[1] == {**first.json()}
    assert set(listed[1]) == {"id", "type", "severity", "message", "data", "inserted_at"}
    assert listed[1]["data"] == {"component": "x"}
    bodies: list[Any] = [{"message": "no type"}, {"type": "t"}, {"type": "t", "message": "m", "unique": "yes"}, []]
    for body in bodies:
        assert (await api.post("/system_events", json=body)).status_code == 400, body
    assert len((await api.get("/system_events", params={"lookback": 0})).json()) == 2


async def test_stats_count_requests_per_route_template(api: Api) -> None:
    assert (await api.post("/sandbox/stats/reset")).status_code == 204
    wf = await api.create()
    for _ in range(3):
        await api.get(f"/workflows/{wf['id']}")
    await api.put(f"/workflows/{wf['id']}", json={"current_step": "build"})
    await api.get(f"/workflows/{uuid.uuid4()}")
    stats = (await api.get("/sandbox/stats")).json()
    assert stats["requests"] == {"POST /workflows": 1, "GET /workflows/{id}": 4, "PUT /workflows/{id}": 1,
                                 "GET /sandbox/stats": 1}
    await api.post("/sandbox/stats/reset")
    assert (await api.get("/sandbox/stats")).json()["requests"] == {"GET /sandbox/stats": 1}


# ---- start-up: migrations and seed ----------------------------------------------------------
async def test_replicas_starting_together_migrate_once(tmp_path: Path) -> None:
    seed_file = write_seed(tmp_path / "seed.toml", random_seed())
    async with sandbox_schema() as schema:
        settings = SandboxSettings(database_url=DATABASE_URL, db_schema=schema, port=0, seed_file=seed_file,
                                   amqp_url=AMQP_URL)
        sandboxes = await asyncio.gather(*(start_sandbox(settings) for _ in range(4)))
        try:
            conn = await asyncpg.connect(DATABASE_URL)
            try:
                rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_migrations ORDER BY version')
                assert [r["version"] for r in rows] == [m.version for m in MIGRATIONS]
                assert await conn.fetchval(f'SELECT count(*) FROM "{schema}".clusters') == 3
            finally:
                await conn.close()
        finally:
            for sandbox in sandboxes:
                await sandbox.stop()


def test_the_config_seed_and_the_packaged_default_agree() -> None:
    config, _ = load_seed(REPO_ROOT / "config" / "sandbox.toml")
    packaged, path = load_seed(None)
    assert path == DEFAULT_SEED
    assert config == packaged
    assert packaged.clients[0].client_id == "sandbox-client"
    assert [(x.name, x.routing_key, x.root_exchange_name) for x in packaged.exchanges] == [
        ("east", "sandbox.east", "openaperture.sandbox"), ("west", "sandbox.west", "openaperture.sandbox")]
    assert [(c.etcd_token, c.messaging_exchange_id, c.allow_docker_builds) for c in packaged.clusters] == [
        ("sandbox-build", 1, True), ("sandbox-deploy-east", 1, False), ("sandbox-deploy-west", 2, False)]
    assert packaged.modules == []


async def test_serve_runs_from_the_environment_until_sigterm(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with sandbox_schema() as schema:
        env = {**os.environ, "SANDBOX_DATABASE_URL": DATABASE_URL, "SANDBOX_DB_SCHEMA": schema,
               "SANDBOX_PORT": str(port), "SANDBOX_SEED_FILE": str(write_seed(tmp_path / "s.toml", random_seed())),
               "SANDBOX_AMQP_URL": AMQP_URL}
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import asyncio\nfrom workflow_orchestrator.sandbox.server import "
            "SandboxSettings, serve\nasyncio.run(serve(SandboxSettings()))",
            env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as http:
                deadline = time.monotonic() + 20
                while True:
                    try:
                        if (await http.get("/healthz")).status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                    assert proc.returncode is None and time.monotonic() < deadline, "sandbox did not come up"
                    await asyncio.sleep(0.1)
            proc.send_signal(signal.SIGTERM)
            out, _ = await asyncio.wait_for(proc.communicate(), 20)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.returncode == 0, out.decode()
        text = out.decode()
        assert f"127.0.0.1:{port}" in text and "sandbox.stopping" in text
        assert "secret-" not in text  # the client secret is never logged


async def test_start_errors_are_one_readable_line(tmp_path: Path) -> None:
    bad_ref = random_seed()
    bad_ref["clusters"][0]["messaging_exchange_id"] = 99
    cases: list[tuple[dict[str, Any], str]] = [
        ({"seed_file": tmp_path / "missing.toml"}, "cannot read seed file"),
        ({"seed_file": write_seed(tmp_path / "bad.toml", bad_ref)}, "names no such record"),
        ({"database_url": "postgresql://postgres:hunter2@127.0.0.1:1/postgres"}, "cannot prepare the database"),
    ]
    (tmp_path / "broken.toml").write_text("clients = [")
    cases.append(({"seed_file": tmp_path / "broken.toml"}, "not valid TOML"))
    for overrides, expected in cases:
        settings: dict[str, Any] = {"database_url": DATABASE_URL, "port": 0, "amqp_url": AMQP_URL,
                                    "db_schema": "sandbox_never_created", **overrides}
        with pytest.raises(SandboxStartError) as info:
            await start_sandbox(SandboxSettings(**settings))
        assert expected in str(info.value)
        assert "\n" not in str(info.value) and "hunter2" not in str(info.value)
    async with running_sandbox() as sandbox:
        port = int(sandbox.url.rsplit(":", 1)[1])
        with pytest.raises(SandboxStartError, match="cannot listen"):
            await start_sandbox(sandbox.settings.model_copy(update={"port": port}))


async def test_execute_redeclares_topology_deleted_while_running(api: Api) -> None:
    queue = orchestration_queue(api.sandbox)
    first = await api.create()
    assert (await api.post(f"/workflows/{first['id']}/execute", json={})).status_code == 202
    await take_message(queue, first["id"])
    connection = await aio_pika.connect(AMQP_URL)
    try:
        channel = await connection.channel()
        await channel.queue_delete(queue)
        await channel.exchange_delete(api.sandbox.seed.exchange(1).root_exchange_name)
    finally:
        await connection.close()
    second = await api.create()
    resp = await api.post(f"/workflows/{second['id']}/execute", json={})
    assert resp.status_code == 202, resp.text
    await take_message(queue, second["id"])
