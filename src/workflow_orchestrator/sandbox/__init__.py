"""The sandbox Manager: a Manager-API-compatible server (OAuth2, REST, Postgres) for development,
demos, tests and compose. Entry points are in `workflow_orchestrator.sandbox.server`."""
