"""The sandbox Manager's OpenAPI document: it is valid, it describes exactly the routes served,
and a property-based run of schemathesis against the live server finds no server error and no
response that contradicts the document."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path
from typing import Any

import httpx
from openapi_spec_validator import validate

from tests.support.sandbox import running_sandbox
from workflow_orchestrator.sandbox.openapi import OPENAPI

# Per operation; the whole run stays well under a minute.
MAX_EXAMPLES = 25


async def test_the_served_document_is_valid_openapi_3() -> None:
    async with running_sandbox() as sandbox, httpx.AsyncClient(base_url=sandbox.url) as http:
        resp = await http.get("/openapi.json")
    assert resp.status_code == 200
    assert resp.headers["Content-Type"].startswith("application/json")
    document: dict[str, Any] = resp.json()
    assert document == OPENAPI
    validate(document)  # raises with the reason when invalid


async def test_the_document_describes_exactly_the_served_routes() -> None:
    async with running_sandbox() as sandbox:
        served = {(route.method.lower(), route.resource.canonical)
                  for route in sandbox.app.router.routes() if route.resource is not None}
    documented = {(method, path) for path, ops in OPENAPI["paths"].items() for method in ops}
    assert served == documented


async def test_every_secured_operation_documents_401_and_every_path_parameter_404() -> None:
    for path, ops in OPENAPI["paths"].items():
        for method, op in ops.items():
            if op.get("security") != []:
                assert "401" in op["responses"], (method, path)
            if "{" in path:
                assert "404" in op["responses"], (method, path)


async def test_schemathesis_finds_no_server_errors_or_contract_violations(tmp_path: Path) -> None:
    async with running_sandbox() as sandbox, httpx.AsyncClient(base_url=sandbox.url) as http:
        resp = await http.post("/oauth/token", data={"grant_type": "client_credentials",
                                                     "client_id": sandbox.client_id,
                                                     "client_secret": sandbox.client_secret})
        token = resp.json()["access_token"]
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "schemathesis.cli", "run", f"{sandbox.url}/openapi.json",
            "--header", f"Authorization: Bearer {token}",
            # Every check: no 5xx, status codes / content types / bodies as documented, invalid
            # input rejected, valid input accepted, auth enforced.
            "--checks", "all",
            "--max-examples", str(MAX_EXAMPLES),
            # Postgres cannot store U+0000 or unpaired surrogates: the document says so and such
            # input is a documented 400, but a JSON Schema cannot express it.
            "--generation-allow-x00", "false", "--generation-codec", "utf-8",
            "--request-timeout", "10",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=tmp_path,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=180)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise
        stats = (await http.get("/sandbox/stats", headers={"Authorization": f"Bearer {token}"})).json()
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report
    cases = re.search(r"(\d+) generated, (\d+) passed", report)
    assert cases and cases.group(1) == cases.group(2), report
    # The one warning allowed: random client credentials are rightly refused by the token
    # endpoint, so some runs see it answer nothing but 401 ("Authentication failed").
    for warning in re.findall(r"⚠️ +(.+)", report):
        assert warning.startswith("Authentication failed: 1 operation"), report
        assert "- POST /oauth/token" in report, report
    # the run really exercised the API, including the hot workflow routes
    assert stats["requests"].get("GET /workflows/{id}", 0) >= MAX_EXAMPLES, stats
    assert stats["requests"].get("POST /workflows", 0) >= MAX_EXAMPLES, stats
