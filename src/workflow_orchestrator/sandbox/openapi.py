"""The OpenAPI 3.0 description of the sandbox Manager, served at `GET /openapi.json`."""

from __future__ import annotations

from typing import Any

_NSTR: dict[str, Any] = {"type": "string", "nullable": True}
_ID: dict[str, Any] = {"type": "integer", "format": "int64"}
_NID: dict[str, Any] = {"type": "integer", "format": "int64", "nullable": True}
_TIMESTAMP: dict[str, Any] = {"type": "string", "description": "ISO-8601 UTC, e.g. 2026-11-24T10:00:00.000000Z"}


_EXCHANGE_REF: dict[str, Any] = {
    "anyOf": [{"type": "integer", "format": "int64", "nullable": True},
              {"type": "string", "pattern": r"^-?[0-9]{1,18}$"}],
    "description": "a messaging exchange id; a string of digits is taken as that number",
}


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


_WORKFLOW_PROPERTIES: dict[str, Any] = {
    "deployment_repo": {"type": "string", "minLength": 1, "pattern": r"[A-Za-z0-9]",
                        "description": "e.g. acme/web-deploy; surrounding blanks and trailing / are trimmed"},
    "deployment_repo_git_ref": _NSTR,
    "source_repo": {**_NSTR, "description": "trailing / is trimmed"},
    "source_repo_git_ref": _NSTR,
    "source_commit_hash": _NSTR,
    "milestones": {"type": "array", "items": {"type": "string"}, "nullable": True,
                   "description": "on create, `config` is prepended when neither build nor config is listed"},
    "current_step": _NSTR,
    "elapsed_step_time": _NSTR,
    "elapsed_workflow_time": _NSTR,
    "workflow_duration": _NSTR,
    "workflow_step_durations": {"type": "object", "additionalProperties": {"type": "string"}, "nullable": True},
    "workflow_error": {"type": "boolean", "nullable": True},
    "workflow_completed": {"type": "boolean", "nullable": True},
    "event_log": {"type": "array", "items": {"type": "string"}, "nullable": True},
    "workflow_start_time": {**_NSTR, "description": "ISO-8601 UTC"},
    "step_time": {**_NSTR, "description": "ISO-8601 UTC"},
    "scheduled_start_time": {**_NSTR, "description": "RFC 1123, e.g. Tue, 24 Nov 2026 10:00:00 GMT"},
    "execute_options": {"type": "object", "nullable": True, "additionalProperties": True},
}

_SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string"},
            "fields": {"type": "object", "additionalProperties": {"type": "string"},
                       "description": "dotted field path -> what is wrong with it"},
        },
    },
    "OAuthError": {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {"type": "string", "enum": ["invalid_request", "invalid_client", "unsupported_grant_type"]},
            "error_description": {"type": "string"},
        },
    },
    "TokenRequest": {
        "type": "object",
        "required": ["grant_type"],
        "properties": {
            "grant_type": {"type": "string", "enum": ["client_credentials"]},
            "client_id": {"type": "string", "description": "or HTTP Basic authentication"},
            "client_secret": {"type": "string"},
            "scope": {"type": "string", "description": "ignored"},
        },
    },
    "Token": {
        "type": "object",
        "required": ["access_token", "token_type", "expires_in"],
        "properties": {
            "access_token": {"type": "string"},
            "token_type": {"type": "string", "enum": ["Bearer"]},
            "expires_in": {"type": "integer"},
        },
    },
    "Workflow": {
        "type": "object",
        "required": ["id", *_WORKFLOW_PROPERTIES, "inserted_at", "updated_at"],
        "properties": {
            "id": {"type": "string", "format": "uuid"},
            **_WORKFLOW_PROPERTIES,
            "deployment_repo": {"type": "string"},
            "inserted_at": _TIMESTAMP,
            "updated_at": _TIMESTAMP,
        },
    },
    "WorkflowCreate": {
        "type": "object",
        "required": ["deployment_repo"],
        "properties": {"id": {"type": "string", "format": "uuid", "nullable": True,
                              "description": "generated when absent or null"},
                       **_WORKFLOW_PROPERTIES},
        "additionalProperties": True,
        "description": "Unknown keys are ignored.",
    },
    "WorkflowUpdate": {
        "type": "object",
        "properties": _WORKFLOW_PROPERTIES,
        "additionalProperties": True,
        "description": "A partial update: fields not sent are kept, unknown keys (and id) are ignored.",
    },
    "ExecuteRequest": {
        "type": "object",
        "properties": {
            "force_build": {"type": "boolean", "nullable": True},
            "build_messaging_exchange_id": _EXCHANGE_REF,
            "deploy_messaging_exchange_id": _EXCHANGE_REF,
            "etcd_token": _NSTR,
            "docker_build_etcd_token": _NSTR,
            "deployable_units": {"type": "array", "items": {}, "nullable": True},
            "notifications_config": {"type": "object", "nullable": True, "additionalProperties": True},
            "fleet_config": {"type": "object", "nullable": True, "additionalProperties": True},
            "aws_config": {"type": "object", "nullable": True, "additionalProperties": True},
        },
        "additionalProperties": True,
        "description": "Stored as the workflow's execute_options; every key is copied into the start message.",
    },
    "Executed": {
        "type": "object",
        "required": ["id", "message_id"],
        "properties": {"id": {"type": "string", "format": "uuid"},
                       "message_id": {"type": "string", "description": "AMQP message_id of the start message"}},
    },
    "Exchange": {
        "type": "object",
        "required": ["id", "name", "routing_key", "root_exchange_name", "failover_exchange_id"],
        "properties": {"id": _ID, "name": {"type": "string"}, "routing_key": {"type": "string"},
                       "root_exchange_name": {"type": "string"}, "failover_exchange_id": _NID},
    },
    "ExchangeBroker": {
        "type": "object",
        "required": ["id", "messaging_exchange_id", "messaging_broker_id"],
        "properties": {"id": _ID, "messaging_exchange_id": _ID, "messaging_broker_id": _ID},
    },
    "Broker": {
        "type": "object",
        "required": ["id", "name", "failover_broker_id"],
        "properties": {"id": _ID, "name": {"type": "string"}, "failover_broker_id": _NID},
    },
    "Connection": {
        "type": "object",
        "required": ["id", "messaging_broker_id", "username", "password", "host", "port", "virtual_host"],
        "properties": {"id": _ID, "messaging_broker_id": _ID, "username": {"type": "string"},
                       "password": {"type": "string"}, "host": {"type": "string"},
                       "port": {"type": "integer"}, "virtual_host": {"type": "string"}},
    },
    "Cluster": {
        "type": "object",
        "required": ["id", "etcd_token", "messaging_exchange_id", "allow_docker_builds"],
        "properties": {"id": _ID, "etcd_token": {"type": "string"}, "name": _NSTR,
                       "messaging_exchange_id": _NID, "allow_docker_builds": {"type": "boolean"},
                       "hosting_provider_id": _NID},
    },
    "ModuleIn": {
        "type": "object",
        "required": ["hostname", "type"],
        "properties": {"hostname": {"type": "string", "minLength": 1, "maxLength": 255, "pattern": "^[^/]+$"},
                       "type": {"type": "string", "minLength": 1, "maxLength": 255,
                                "description": "builder, deployer, workflow_orchestrator, notifications, ..."},
                       "status": _NSTR,
                       "workload": {"nullable": True, "description": "any JSON"}},
    },
    "Module": {
        "type": "object",
        "required": ["id", "messaging_exchange_id", "hostname", "type", "status", "workload",
                     "inserted_at", "updated_at"],
        "properties": {"id": _ID, "messaging_exchange_id": _ID, "hostname": {"type": "string"},
                       "type": {"type": "string"}, "status": _NSTR, "workload": {"nullable": True},
                       "inserted_at": _TIMESTAMP, "updated_at": _TIMESTAMP},
    },
    "SystemEventIn": {
        "type": "object",
        "required": ["type", "message"],
        "properties": {"type": {"type": "string", "minLength": 1, "maxLength": 255}, "severity": _NSTR,
                       "message": {"type": "string"}, "data": {"nullable": True, "description": "any JSON"},
                       "unique": {"type": "boolean",
                                  "description": "skip if an event of this type with equal data exists "
                                                 "from the last hour (that one is answered, with 200)"}},
    },
    "SystemEvent": {
        "type": "object",
        "required": ["id", "type", "severity", "message", "data", "inserted_at"],
        "properties": {"id": _ID, "type": {"type": "string"}, "severity": _NSTR, "message": {"type": "string"},
                       "data": {"nullable": True}, "inserted_at": _TIMESTAMP},
    },
    "Stats": {
        "type": "object",
        "required": ["requests", "since"],
        "properties": {"requests": {"type": "object", "additionalProperties": {"type": "integer"},
                                    "description": "`METHOD /route/{template}` -> requests since start/reset"},
                       "since": _TIMESTAMP},
    },
}

_UNAUTHORIZED = _error("missing, unknown or expired bearer token")
_NOT_FOUND = _error("no such record")
_BAD = _error("malformed JSON, wrong types or bad parameters; `fields` names them")


def _p(name: str, schema: dict[str, Any], where: str = "path", description: str = "") -> dict[str, Any]:
    param: dict[str, Any] = {"name": name, "in": where, "required": where == "path", "schema": schema}
    if description:
        param["description"] = description
    return param


_WORKFLOW_ID = _p("id", {"type": "string", "format": "uuid"}, description="a workflow id; non-UUIDs are 404")
_EXCHANGE_ID = _p("id", {"type": "integer", "format": "int64"}, description="messaging exchange id")
_BROKER_ID = _p("id", {"type": "integer", "format": "int64"}, description="broker id")
_HOSTNAME = _p("hostname", {"type": "string", "minLength": 1, "pattern": "^[^/]+$"})
_ALLOW_BUILDS = _p("allow_docker_builds", {"type": "boolean"}, "query", "only clusters with (true) or without "
                   "(false) docker builds")
_LOOKBACK = _p("lookback", {"type": "integer", "default": 24}, "query", "hours back by inserted_at; 0 or less: all")


def _op(summary: str, responses: dict[str, Any], *, params: list[dict[str, Any]] | None = None,
        body: str | None = None, body_required: bool = True, public: bool = False) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    op["operationId"] = "".join(w.capitalize() if i else w for i, w in enumerate(summary.lower().split()[:5]))
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": body_required, "content": {"application/json": {"schema": _ref(body)}}}
    if public:
        op["security"] = []
    else:
        op["responses"] = {**responses, "401": _UNAUTHORIZED}
    return op


def _list(name: str) -> dict[str, Any]:
    return {"type": "array", "items": _ref(name)}


_PATHS: dict[str, Any] = {
    "/oauth/token": {"post": {
        "summary": "OAuth2 client-credentials token",
        "operationId": "token",
        "security": [],
        "description": "RFC 6749 §4.4. Client authentication by HTTP Basic or by client_id/client_secret "
                       "in the body; form-encoded (RFC 6749) or JSON.",
        "requestBody": {"required": True, "content": {
            "application/x-www-form-urlencoded": {"schema": _ref("TokenRequest")},
            "application/json": {"schema": _ref("TokenRequest")},
        }},
        "responses": {
            "200": _json(_ref("Token"), "a bearer token"),
            "400": _json(_ref("OAuthError"), "invalid_request or unsupported_grant_type"),
            "401": _json(_ref("OAuthError"), "invalid_client"),
        },
    }},
    "/workflows": {
        "get": _op("List workflows", {"200": _json(_list("Workflow"), "newest first"), "400": _BAD}, params=[
            _LOOKBACK,
            _p("deployment_repo", {"type": "string"}, "query", "exact deployment repo"),
            _p("source_repo", {"type": "string"}, "query", "exact source repo"),
        ]),
        "post": _op("Create a workflow", {
            "201": {**_json(_ref("Workflow"), "created"),
                    "headers": {"Location": {"schema": {"type": "string"}, "description": "/workflows/{id}"}}},
            "400": _BAD, "409": _error("a workflow with this id exists"),
        }, body="WorkflowCreate"),
    },
    "/workflows/{id}": {
        "get": _op("Show a workflow", {"200": _json(_ref("Workflow"), "the workflow"), "404": _NOT_FOUND},
                   params=[_WORKFLOW_ID]),
        "put": _op("Update a workflow", {"204": {"description": "saved"}, "400": _BAD, "404": _NOT_FOUND},
                   params=[_WORKFLOW_ID], body="WorkflowUpdate"),
        "delete": _op("Delete a workflow", {"204": {"description": "deleted"}, "404": _NOT_FOUND},
                      params=[_WORKFLOW_ID]),
    },
    "/workflows/{id}/execute": {
        "post": _op("Execute a workflow", {
            "202": {**_json(_ref("Executed"), "the start message is on the orchestration queue"),
                    "headers": {"Location": {"schema": {"type": "string"}}}},
            "400": _BAD, "404": _NOT_FOUND,
            "409": _error("already started, executed or completed"),
            "503": _error("the broker could not take the start message; nothing was changed"),
        }, params=[_WORKFLOW_ID], body="ExecuteRequest", body_required=False),
    },
    "/messaging/exchanges/{id}": {
        "get": _op("Show an exchange", {"200": _json(_ref("Exchange"), "the exchange"), "404": _NOT_FOUND},
                   params=[_EXCHANGE_ID]),
    },
    "/messaging/exchanges/{id}/brokers": {
        "get": _op("List exchange broker restrictions", {
            "200": _json(_list("ExchangeBroker"), "the broker is messaging_broker_id"), "404": _NOT_FOUND,
        }, params=[_EXCHANGE_ID]),
    },
    "/messaging/exchanges/{id}/clusters": {
        "get": _op("List exchange clusters", {"200": _json(_list("Cluster"), "clusters of the exchange"),
                                              "400": _BAD, "404": _NOT_FOUND},
                   params=[_EXCHANGE_ID, _ALLOW_BUILDS]),
    },
    "/messaging/exchanges/{id}/modules": {
        "get": _op("List exchange modules", {"200": _json(_list("Module"), "registered modules"),
                                             "404": _NOT_FOUND}, params=[_EXCHANGE_ID]),
        "post": _op("Register a module", {
            "201": {**_json(_ref("Module"), "registered (or refreshed: upsert by hostname)"),
                    "headers": {"Location": {"schema": {"type": "string"}}}},
            "400": _BAD, "404": _NOT_FOUND,
        }, params=[_EXCHANGE_ID], body="ModuleIn"),
    },
    "/messaging/exchanges/{id}/modules/{hostname}": {
        "get": _op("Show a module", {"200": _json(_ref("Module"), "the module"), "404": _NOT_FOUND},
                   params=[_EXCHANGE_ID, _HOSTNAME]),
        "delete": _op("Deregister a module", {"204": {"description": "removed"}, "404": _NOT_FOUND},
                      params=[_EXCHANGE_ID, _HOSTNAME]),
    },
    "/messaging/brokers/{id}": {
        "get": _op("Show a broker", {"200": _json(_ref("Broker"), "the broker"), "404": _NOT_FOUND},
                   params=[_BROKER_ID]),
    },
    "/messaging/brokers/{id}/connections": {
        "get": _op("List broker connections", {"200": _json(_list("Connection"), "connections"),
                                               "404": _NOT_FOUND}, params=[_BROKER_ID]),
    },
    "/clusters": {
        "get": _op("List clusters", {"200": _json(_list("Cluster"), "all clusters"), "400": _BAD},
                   params=[_ALLOW_BUILDS]),
    },
    "/clusters/{etcd_token}": {
        "get": _op("Show a cluster", {"200": _json(_ref("Cluster"), "the cluster"), "404": _NOT_FOUND},
                   params=[_p("etcd_token", {"type": "string", "minLength": 1})]),
    },
    "/system_events": {
        "get": _op("List system events", {"200": _json(_list("SystemEvent"), "newest first"), "400": _BAD},
                   params=[_LOOKBACK]),
        "post": _op("Report a system event", {
            "201": _json(_ref("SystemEvent"), "stored"),
            "200": _json(_ref("SystemEvent"), "`unique` and an equal event exists: that one"),
            "400": _BAD,
        }, body="SystemEventIn"),
    },
    "/sandbox/stats": {
        "get": _op("Request counts", {"200": _json(_ref("Stats"), "requests per route since start or reset")}),
    },
    "/sandbox/stats/reset": {
        "post": _op("Reset request counts", {"204": {"description": "zeroed"}}),
    },
    "/healthz": {
        "get": _op("Liveness", {"200": _json({"type": "object"}, "serving; the database answers"),
                                "503": _json({"type": "object"}, "the database does not answer")}, public=True),
    },
    "/openapi.json": {
        "get": _op("This document", {"200": _json({"type": "object"}, "OpenAPI 3.0")}, public=True),
    },
}

OPENAPI: dict[str, Any] = {
    "openapi": "3.0.3",
    "info": {
        "title": "Sandbox Manager",
        "version": "1.0.0",
        "description": "A Manager-API-compatible server for development, demos, tests and compose "
                       "(SPEC §3, §8). Every route except the token endpoint, /healthz and this document "
                       "needs `Authorization: Bearer <token>`. Text anywhere in a body must not contain U+0000 "
                       "or unpaired surrogates (Postgres cannot store them): such input is answered 400.",
    },
    "paths": _PATHS,
    "components": {
        "schemas": _SCHEMAS,
        "securitySchemes": {
            "oauth2": {"type": "oauth2", "flows": {"clientCredentials": {"tokenUrl": "/oauth/token",
                                                                         "scopes": {}}}},
        },
    },
    "security": [{"oauth2": []}],
}
