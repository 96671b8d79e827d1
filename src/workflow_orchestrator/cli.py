"""`workflow-orchestrator` command line: argument parsing only; the work lives in the package."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn, TypeVar, cast

import typer
from pydantic import ValidationError

from workflow_orchestrator.settings import ConfigError, Settings, describe, load_settings

T = TypeVar("T")

app = typer.Typer(
    name="workflow-orchestrator",
    help="Drives build/deploy workflows one milestone at a time over RabbitMQ.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def fail(message: str, code: int = 1) -> NoReturn:
    """One readable line on stderr and a non-zero exit."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def settings_or_exit(**overrides: Any) -> Settings:
    try:
        return load_settings(**overrides)
    except ConfigError as exc:
        fail(str(exc), 2)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def emit(data: Any, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(data, indent=2, default=str))
    else:
        typer.echo(data if isinstance(data, str) else json.dumps(data, indent=2, default=str))


@app.command()
def run() -> None:
    """Run the orchestrator service (configured by environment variables; see README).

    Example: EXCHANGE_ID=1 BROKER_ID=1 MANAGER_URL=http://localhost:4000 ... workflow-orchestrator run
    """
    from workflow_orchestrator.app import StartupError, run_service
    from workflow_orchestrator.logging import configure

    settings = settings_or_exit()
    configure(settings.log_level, settings.log_format, cache=True)
    try:
        code = run_async(run_service(settings))
    except StartupError as exc:
        fail(str(exc), 1)
    raise typer.Exit(code)


@app.command("check-config")
def check_config(
    live: bool = typer.Option(True, "--live/--no-live", help="Also check Manager auth, AMQP and Postgres."),
    as_json: bool = typer.Option(False, "--json", help="Machine-readable output."),
) -> None:
    """Print the effective settings (secrets masked) and check the live dependencies.

    Example: workflow-orchestrator check-config --no-live --json
    """
    settings = settings_or_exit()
    result: dict[str, Any] = {"settings": settings.masked()}
    ok = True
    if live:
        from workflow_orchestrator.checks import live_checks

        result["checks"] = run_async(live_checks(settings))
        ok = all(c["ok"] for c in result["checks"].values())
    if as_json:
        emit(result, True)
    else:
        for key, value in result["settings"].items():
            typer.echo(f"{key.upper():24} {value}")
        for name, check in result.get("checks", {}).items():
            typer.echo(f"check {name:10} {'ok' if check['ok'] else 'FAILED'}  {check['detail']}")
    if not ok:
        raise typer.Exit(1)


@app.command("sandbox-manager")
def sandbox_manager() -> None:
    """Serve the sandbox Manager API (OAuth2 + REST on Postgres), seeded from config/sandbox.toml.

    Example: SANDBOX_PORT=4000 workflow-orchestrator sandbox-manager
    """
    from workflow_orchestrator.logging import configure
    from workflow_orchestrator.sandbox.server import SandboxSettings, SandboxStartError, serve

    configure("info", "console")
    try:
        sandbox_settings = SandboxSettings()
    except ValidationError as exc:
        fail(f"invalid sandbox configuration: {describe(exc, 'SANDBOX_')}", 2)
    try:
        run_async(serve(sandbox_settings))
    except SandboxStartError as exc:
        fail(str(exc), 1)


# ---- operator commands: create, execute, status, cancel, dlq -------------------------------------
@app.command()
def demo(
    workflows: int = typer.Option(3, "--workflows", "-n", min=0, max=200,
                                  help="How many successful releases, besides a failing build, a scheduled "
                                       "workflow and a cancelled one."),
    speed: float = typer.Option(0.5, "--speed", min=0.05, max=20.0,
                                help="Multiplier of the simulated workers' durations (smaller is faster)."),
    keep: bool = typer.Option(False, "--keep", help="Keep the demo database and queues afterwards."),
    database_url: str = typer.Option("postgresql://postgres@127.0.0.1:5432/postgres", "--database-url",
                                     envvar="DEMO_DATABASE_URL", help="Postgres to create the demo database in."),
    amqp_url: str = typer.Option("amqp://guest:guest@127.0.0.1:5672/", "--amqp-url", envvar="DEMO_AMQP_URL",
                                 help="RabbitMQ to use."),
) -> None:
    """Run the showcase: sandbox Manager + orchestrator + simulated workers, real workflows end to end.

    Exits 0 only if every workflow ended as expected.

    Example: workflow-orchestrator demo --workflows 5 --speed 0.3
    """
    import asyncpg

    from workflow_orchestrator.demo import run_demo
    from workflow_orchestrator.logging import configure

    configure("warning", "console")
    try:
        code = run_async(run_demo(workflows, speed, keep, database_url, amqp_url))
    except (OSError, RuntimeError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        from workflow_orchestrator.logging import redact_text

        fail(f"demo could not run: {redact_text(str(exc))}")
    raise typer.Exit(code)


@app.command("demo-workers")
def demo_workers(
    speed: float = typer.Option(1.0, "--speed", min=0.05, max=20.0, help="Multiplier of the simulated durations."),
) -> None:
    """Run the demo's simulated builder and deployer against a running site (compose), until SIGTERM.

    Reads the same environment as `run` (EXCHANGE_ID, BROKER_ID, MANAGER_URL, OAUTH_*, AMQP_URL).

    Example: workflow-orchestrator demo-workers --speed 0.5
    """
    from workflow_orchestrator.demo import run_workers
    from workflow_orchestrator.logging import configure

    s = settings_or_exit()
    configure(s.log_level, s.log_format)
    amqp = s.amqp_url.get_secret_value() if s.amqp_url else None
    run_async(run_workers(s.manager_url, s.oauth_login_url, s.oauth_client_id,
                          s.oauth_client_secret.get_secret_value(), s.exchange_id, s.broker_id, amqp, s.hostname,
                          speed))


def _operator_settings() -> Settings:
    """The service's settings for an operator command; library warnings go to stderr."""
    import warnings

    from workflow_orchestrator.logging import configure

    try:  # authlib announces its own deprecations on every start: noise on an operator's stderr
        from authlib.deprecate import AuthlibDeprecationWarning

        warnings.filterwarnings("ignore", category=AuthlibDeprecationWarning)
    except ImportError:
        pass
    settings = settings_or_exit()
    configure("warning", "console")  # never into --json output on stdout
    return settings


def _operate(coro: Coroutine[Any, Any, T]) -> T:
    """Run an operator coroutine; its OperatorError becomes one line on stderr and exit code 1."""
    from workflow_orchestrator.operator import OperatorError

    try:
        return run_async(coro)
    except OperatorError as exc:
        fail(str(exc))


def _show(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
    return str(value)


JSON_OPTION = typer.Option(False, "--json", help="Machine-readable JSON output.")


@app.command()
def create(
    deployment_repo: str = typer.Option(..., "--deployment-repo", help="Deployment repository, e.g. acme/web-deploy."),
    deployment_ref: str | None = typer.Option(None, "--deployment-ref", help="Git ref of the deployment repo."),
    source_repo: str | None = typer.Option(None, "--source-repo", help="Source repository, e.g. acme/web."),
    source_ref: str | None = typer.Option(None, "--source-ref", help="Git ref (branch, tag, commit) to build."),
    milestones: str | None = typer.Option(None, "--milestones", help="Comma-separated, e.g. build,deploy."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Create a workflow in the Manager and print its id.

    Example: workflow-orchestrator create --deployment-repo acme/deploy --source-repo acme/web --milestones build,deploy
    """
    from workflow_orchestrator.domain.models import KNOWN_MILESTONES

    steps: list[str] | None = None
    if milestones is not None:
        steps = [m.strip() for m in milestones.split(",") if m.strip()]
        unknown = [m for m in steps if m not in KNOWN_MILESTONES]
        if not steps or unknown:
            fail(f"--milestones: unknown milestone {', '.join(unknown) or '(none given)'} "
                 f"(known: {', '.join(sorted(KNOWN_MILESTONES))})")
    settings = _operator_settings()
    from workflow_orchestrator import operator

    result = _operate(operator.create(settings, deployment_repo=deployment_repo, deployment_ref=deployment_ref,
                                      source_repo=source_repo, source_ref=source_ref, milestones=steps))
    emit(result if as_json else result["id"], as_json)


@app.command()
def execute(
    workflow_id: str = typer.Argument(..., metavar="ID", help="Workflow id."),
    force_build: bool = typer.Option(False, "--force-build", help="Build even if the image exists."),
    build_exchange: str | None = typer.Option(None, "--build-exchange", help="Messaging exchange id for the build."),
    deploy_exchange: str | None = typer.Option(None, "--deploy-exchange", help="Messaging exchange id for deploys."),
    etcd_token: str | None = typer.Option(None, "--etcd-token", help="Deployment cluster (its etcd token)."),
    via_queue: bool = typer.Option(False, "--via-queue",
                                   help="Publish the start message to this instance's orchestration queue "
                                        "instead of asking the Manager to."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Start a workflow (through the Manager's execute).

    Example: workflow-orchestrator execute 3f2a... --etcd-token prod-east --deploy-exchange 2
    """
    settings = _operator_settings()
    from workflow_orchestrator import operator

    result = _operate(operator.execute(settings, workflow_id, force_build=force_build, build_exchange=build_exchange,
                                       deploy_exchange=deploy_exchange, etcd_token=etcd_token, via_queue=via_queue))
    if as_json:
        emit(result, True)
    elif via_queue:
        typer.echo(f"workflow {workflow_id} started: start message {result['message_id']} published")
    else:
        typer.echo(f"workflow {workflow_id} started: the Manager published the start message")


@app.command()
def status(
    workflow_id: str | None = typer.Argument(None, metavar="[ID]", help="Workflow id; omit to list runs in flight."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Show one workflow (key fields and event log), or every workflow in flight.

    Example: workflow-orchestrator status 3f2a...    |    workflow-orchestrator status --json
    """
    settings = _operator_settings()
    from workflow_orchestrator import operator

    if workflow_id is None:
        runs = _operate(operator.in_flight(settings))
        if as_json:
            emit(runs, True)
            return
        if not runs:
            typer.echo("no workflows in flight")
            return
        header = ("WORKFLOW", "MILESTONE", "ATTEMPT", "PHASE", "AGE", "DEADLINE")
        rows = [header, *[(r["workflow_id"], _show(r["milestone"]), _show(r["attempt"]), _show(r["phase"]),
                           r["age"], _show(r["deadline"])) for r in runs]]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        for row in rows:
            typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
        return
    result = _operate(operator.status(settings, workflow_id))
    if as_json:
        emit(result, True)
        return
    typer.echo(f"{'state':26} {result['state']}")
    for key in operator.STATUS_FIELDS:
        typer.echo(f"{key:26} {_show(result.get(key))}")
    run = result.get("run")
    if run:
        typer.echo(f"{'run':26} milestone {_show(run['milestone'])}, attempt {run['attempt']}, {run['phase']}, "
                   f"deadline {_show(run['deadline'])}")
    typer.echo(f"event log ({len(result['event_log'])}):")
    for entry in result["event_log"]:
        typer.echo(f"  {entry}")


@app.command()
def cancel(
    workflow_id: str = typer.Argument(..., metavar="ID", help="Workflow id."),
    reason: str = typer.Option(..., "--reason", help="Why; recorded as `Workflow cancelled: {reason}`."),
    via_queue: bool = typer.Option(True, "--via-queue", hidden=True,
                                   help="Cancel always goes through the orchestration queue."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Cancel a workflow: publishes the cancel control message to this instance's orchestration queue.

    Example: workflow-orchestrator cancel 3f2a... --reason "release postponed"
    """
    del via_queue  # accepted for scripts; there is no other way to cancel
    settings = _operator_settings()
    from workflow_orchestrator import operator

    result = _operate(operator.cancel(settings, workflow_id, reason))
    if as_json:
        emit(result, True)
    else:
        typer.echo(f"cancel of workflow {workflow_id} requested (message {result['message_id']})")


dlq_app = typer.Typer(help="Inspect, replay or purge the orchestration error queue (dead letters).",
                      no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")


@dlq_app.command("list")
def dlq_list(
    limit: int = typer.Option(100, "--limit", min=1, help="Show at most this many messages."),
    as_json: bool = JSON_OPTION,
) -> None:
    """List dead-lettered messages: message_id, reason, time, size and a body preview.

    Example: workflow-orchestrator dlq list --json
    """
    settings = _operator_settings()
    from workflow_orchestrator import operator

    result = _operate(operator.dlq_list(settings, limit))
    if as_json:
        emit(result, True)
        return
    messages = result["messages"]
    typer.echo(f"{len(messages)} message(s) in {result['queue']}")
    for m in messages:
        typer.echo(f"- {_show(m['message_id'])}  at {_show(m['at'])}  {m['size']} bytes  workflow "
                   f"{_show(m['workflow_id'])}\n  reason: {_show(m['reason'])}\n  body: {m['preview']}")


@dlq_app.command("replay")
def dlq_replay(
    message_id: str | None = typer.Option(None, "--message-id", help="Replay only the message(s) with this id."),
    limit: int | None = typer.Option(None, "--limit", min=1, help="Replay at most this many messages."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Move dead-lettered messages (all by default) back to the orchestration queue.

    Each is confirmed by the broker before it leaves the error queue; the x-error-* headers are
    removed.

    Example: workflow-orchestrator dlq replay --message-id 7c1e...
    """
    settings = _operator_settings()
    from workflow_orchestrator import operator

    result = _operate(operator.dlq_replay(settings, message_id=message_id, limit=limit))
    if as_json:
        emit(result, True)
        return
    typer.echo(f"replayed {len(result['replayed'])} message(s) from {result['queue']} to {result['target']}")
    for m in result["replayed"]:
        typer.echo(f"- {_show(m['message_id'])}  workflow {_show(m['workflow_id'])}")


@dlq_app.command("purge")
def dlq_purge(
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask; required when not on a terminal."),
    as_json: bool = JSON_OPTION,
) -> None:
    """Delete every message in the error queue (asks first unless --yes).

    Example: workflow-orchestrator dlq purge --yes
    """
    settings = _operator_settings()
    from workflow_orchestrator import operator

    if not yes:
        found = _operate(operator.dlq_count(settings))
        if found["count"] == 0:
            emit({"queue": found["queue"], "purged": 0} if as_json else f"{found['queue']} is empty", as_json)
            return
        question = f"Delete {found['count']} message(s) from {found['queue']}?"
        if not sys.stdin.isatty():
            fail(f"refusing to delete {found['count']} message(s) from {found['queue']} without --yes")
        if not typer.confirm(question, err=True):
            fail("purge cancelled")
    result = _operate(operator.dlq_purge(settings))
    emit(result if as_json else f"purged {result['purged']} message(s) from {result['queue']}", as_json)


# typer vendors click: its usage errors are reached through the public typer.BadParameter's bases.
_UsageError = cast(type[Exception], typer.BadParameter.__mro__[1])
_ClickException = cast(type[Exception], _UsageError.__mro__[1])


def main(argv: list[str] | None = None) -> None:
    """The console script. Usage errors (an unknown command or option, a missing or invalid
    argument) are one line on stderr and exit code 2, as every other error (SPEC §9), instead of
    click's usage block and panel; no arguments at all print the help (exit 2)."""
    try:
        code = app(args=argv, standalone_mode=False)
    except _ClickException as exc:
        message: str = exc.format_message()  # type: ignore[attr-defined]
        exit_code: int = exc.exit_code  # type: ignore[attr-defined]
        if type(exc).__name__ == "NoArgsIsHelpError":  # the message is the help
            typer.echo(message, err=True)
        else:
            ctx = getattr(exc, "ctx", None) if isinstance(exc, _UsageError) else None
            where = f" (see: {ctx.command_path} --help)" if ctx is not None else ""
            typer.echo(f"error: {' '.join(message.split())}{where}", err=True)
        sys.exit(exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)
