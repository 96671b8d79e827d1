"""Configuration (SPEC §2): environment > config/<APP_ENV>.toml > defaults; one readable error."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest

from workflow_orchestrator.settings import ConfigError, Settings, load_settings, mask_url, parse_duration

REQUIRED = {
    "EXCHANGE_ID": "1",
    "BROKER_ID": "2",
    "MANAGER_URL": "http://manager.test",
    "OAUTH_LOGIN_URL": "http://manager.test/oauth/token",
    "OAUTH_CLIENT_ID": "orchestrator",
    "OAUTH_CLIENT_SECRET": "client-s3cret",
}


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> pytest.MonkeyPatch:
    """An environment holding none of the service's variables, and an empty CONFIG_DIR."""
    names = {n.upper() for n in Settings.model_fields} | {"APP_ENV", "CONFIG_DIR"}
    for key in list(os.environ):
        if key.upper() in names or key.upper().startswith("MILESTONES__"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("CONFIG_DIR", str(tmp_path))
    return monkeypatch


@pytest.fixture
def required(env: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for key, value in REQUIRED.items():
        env.setenv(key, value)
    return env


def write_config(env_name: str, text: str) -> None:
    Path(os.environ["CONFIG_DIR"], f"{env_name}.toml").write_text(text)


def test_defaults_without_a_config_file(required: pytest.MonkeyPatch) -> None:
    s = load_settings()

    assert (s.exchange_id, s.broker_id) == ("1", "2")
    assert s.queue_name == "workflow_orchestration"
    assert s.ui_url == ""
    assert s.amqp_url is None
    assert s.database_url.get_secret_value() == "postgresql://localhost/workflow_orchestrator"
    assert s.app_env == "development"
    assert s.prefetch == 32
    assert s.http_port == 8080
    assert (s.log_level, s.log_format) == ("info", "json")
    assert s.hostname


@pytest.mark.parametrize(
    ("milestone", "timeout"),
    [("build", timedelta(hours=2)), ("config", timedelta(minutes=30)), ("deploy", timedelta(hours=1)),
     ("deploy_oa", timedelta(hours=1)), ("deploy_ecs", timedelta(hours=1))],
)
def test_default_milestone_policies(required: pytest.MonkeyPatch, milestone: str, timeout: timedelta) -> None:
    policy = load_settings().policy(milestone)
    assert policy.timeout == timeout
    assert policy.retries == 0


def test_every_missing_required_variable_is_named(env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as exc:
        load_settings()
    for name in REQUIRED:
        assert f"{name} is required" in str(exc.value)


def test_every_invalid_variable_is_named_in_one_message(required: pytest.MonkeyPatch) -> None:
    required.setenv("PREFETCH", "lots")
    required.setenv("HTTP_PORT", "99999")
    required.setenv("LOG_FORMAT", "xml")
    required.setenv("MILESTONES__DEPLOY__TIMEOUT", "soon")
    required.delenv("BROKER_ID")

    with pytest.raises(ConfigError) as exc:
        load_settings()
    message = str(exc.value)
    for name in ("PREFETCH", "HTTP_PORT", "LOG_FORMAT", "MILESTONES__DEPLOY__TIMEOUT", "BROKER_ID is required"):
        assert name in message
    assert "\n" not in message


def test_secrets_are_never_printed(required: pytest.MonkeyPatch) -> None:
    required.setenv("AMQP_URL", "amqp://svc:amqp-pa55@rabbit:5672/")
    required.setenv("DATABASE_URL", "postgresql://svc:db-pa55@db/orchestrator")
    s = load_settings()

    assert s.oauth_client_secret.get_secret_value() == "client-s3cret"
    for text in (repr(s), str(s), str(s.masked())):
        for secret in ("client-s3cret", "amqp-pa55", "db-pa55"):
            assert secret not in text
    assert s.masked()["database_url"] == "postgresql://svc:***@db/orchestrator"

    required.setenv("PREFETCH", "0")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "client-s3cret" not in str(exc.value)


def test_mask_url() -> None:
    assert mask_url("amqps://user:pw@host:5671/vh") == "amqps://user:***@host:5671/vh"
    assert mask_url("postgresql://localhost/db") == "postgresql://localhost/db"


def test_config_file_of_app_env_is_read(required: pytest.MonkeyPatch) -> None:
    write_config("staging", 'prefetch = 5\nui_url = "https://oa.staging"\n')
    write_config("development", "prefetch = 6\n")
    required.setenv("APP_ENV", "staging")

    s = load_settings()
    assert (s.app_env, s.prefetch, s.ui_url) == ("staging", 5, "https://oa.staging")


def test_environment_wins_over_the_config_file(required: pytest.MonkeyPatch) -> None:
    write_config("development", "prefetch = 5\nhttp_port = 9000\n")
    required.setenv("PREFETCH", "7")

    s = load_settings()
    assert s.prefetch == 7  # environment
    assert s.http_port == 9000  # file
    assert s.queue_name == "workflow_orchestration"  # default


def test_config_file_alone_can_supply_everything(env: pytest.MonkeyPatch) -> None:
    write_config("development", "".join(f'{k.lower()} = "{v}"\n' for k, v in REQUIRED.items()))
    assert load_settings().exchange_id == "1"


def test_unknown_key_in_the_config_file_is_an_error(required: pytest.MonkeyPatch) -> None:
    write_config("development", "prefetsh = 5\n")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "PREFETSH is not a known setting" in str(exc.value)


def test_unknown_app_env_is_an_error(required: pytest.MonkeyPatch) -> None:
    required.setenv("APP_ENV", "qa")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "APP_ENV" in str(exc.value)


def test_milestone_env_override_keeps_the_other_defaults(required: pytest.MonkeyPatch) -> None:
    required.setenv("MILESTONES__BUILD__RETRIES", "2")
    required.setenv("MILESTONES__CONFIG__TIMEOUT", "45m")

    s = load_settings()
    assert s.policy("build").retries == 2
    assert s.policy("build").timeout == timedelta(hours=2)
    assert s.policy("build").retry_backoff == timedelta(seconds=30)
    assert s.policy("config").timeout == timedelta(minutes=45)
    assert s.policy("deploy").timeout == timedelta(hours=1)


def test_milestone_policies_from_file_and_environment_merge(required: pytest.MonkeyPatch) -> None:
    write_config("development", '[milestones.build]\nretries = 1\nretry_backoff = "1m"\n'
                                '[milestones.deploy]\ntimeout = "20m"\n')
    required.setenv("MILESTONES__BUILD__TIMEOUT", "3h")

    s = load_settings()
    assert s.policy("build").timeout == timedelta(hours=3)  # environment
    assert s.policy("build").retries == 1  # file
    assert s.policy("build").retry_backoff == timedelta(minutes=1)  # file
    assert s.policy("deploy").timeout == timedelta(minutes=20)  # file
    assert s.policy("config").timeout == timedelta(minutes=30)  # default


def test_unknown_milestone_policy_field_is_an_error(required: pytest.MonkeyPatch) -> None:
    required.setenv("MILESTONES__BUILD__RETRYS", "2")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "MILESTONES__BUILD__RETRYS is not a known setting" in str(exc.value)


def test_negative_retries_are_an_error(required: pytest.MonkeyPatch) -> None:
    required.setenv("MILESTONES__BUILD__RETRIES", "-1")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "MILESTONES__BUILD__RETRIES" in str(exc.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", timedelta(seconds=90)),
        ("90s", timedelta(seconds=90)),
        ("500ms", timedelta(milliseconds=500)),
        ("30m", timedelta(minutes=30)),
        ("2h", timedelta(hours=2)),
        ("1.5h", timedelta(minutes=90)),
        (" 2h ", timedelta(hours=2)),
        ("1d", timedelta(days=1)),
        ("1w", timedelta(weeks=1)),
        (45, timedelta(seconds=45)),
        (timedelta(minutes=3), timedelta(minutes=3)),
    ],
)
def test_parse_duration(text: str | int | timedelta, expected: timedelta) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["soon", "", "-5m", "2 hours", "h", "5y"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)
