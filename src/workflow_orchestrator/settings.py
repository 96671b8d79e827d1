"""Service configuration (SPEC §2): environment > config/<APP_ENV>.toml > built-in defaults.

Nothing here reads the environment at import time; call `load_settings()`.
"""

from __future__ import annotations

import os
import re
import socket
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, None: 1}


def parse_duration(value: Any) -> timedelta:
    """`90`, `90s`, `30m`, `2h`, `1d`, or a timedelta -> timedelta."""
    if isinstance(value, timedelta):
        return value
    if isinstance(value, int | float):
        return timedelta(seconds=value)
    m = _DURATION.match(str(value))
    if not m:
        raise ValueError(f"not a duration: {value!r} (use e.g. 45s, 30m, 2h, 1d)")
    return timedelta(seconds=float(m.group(1)) * _UNIT_SECONDS[m.group(2)])


Duration = Annotated[timedelta, BeforeValidator(parse_duration)]


class MilestonePolicy(BaseModel):
    """Per-milestone timeout and retry policy (SPEC §5.6)."""

    model_config = {"extra": "forbid"}

    timeout: Duration = timedelta(hours=1)
    retries: int = Field(default=0, ge=0)
    retry_backoff: Duration = timedelta(seconds=30)
    heartbeat_timeout: Duration | None = None  # SPEC §12: no heartbeat or callback for this long fails it


def _default_milestones() -> dict[str, MilestonePolicy]:
    hour = timedelta(hours=1)
    return {
        "build": MilestonePolicy(timeout=timedelta(hours=2)),
        "config": MilestonePolicy(timeout=timedelta(minutes=30)),
        "deploy": MilestonePolicy(timeout=hour),
        "deploy_oa": MilestonePolicy(timeout=hour),
        "deploy_ecs": MilestonePolicy(timeout=hour),
    }


class Settings(BaseSettings):
    """Everything the service reads from its environment."""

    model_config = SettingsConfigDict(
        env_nested_delimiter="__",
        extra="forbid",
        case_sensitive=False,
        validate_default=True,
    )

    exchange_id: str
    broker_id: str
    queue_name: str = "workflow_orchestration"
    manager_url: str
    oauth_login_url: str
    oauth_client_id: str
    oauth_client_secret: SecretStr
    ui_url: str = ""
    amqp_url: SecretStr | None = None
    database_url: SecretStr = SecretStr("postgresql://localhost/workflow_orchestrator")
    app_env: Literal["development", "test", "staging", "production"] = "development"
    prefetch: int = Field(default=32, ge=1, le=10000)
    http_port: int = Field(default=8080, ge=0, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "console"] = "json"
    hostname: str = Field(default_factory=socket.gethostname)
    config_dir: str = "./config"

    milestones: dict[str, MilestonePolicy] = Field(default_factory=_default_milestones)
    queue_type: Literal["classic", "quorum"] = "classic"
    delivery_limit: int = Field(default=20, ge=1)
    manager_concurrency: int = Field(default=32, ge=1)
    manager_timeout: Duration = timedelta(seconds=10)
    publish_timeout: Duration = timedelta(seconds=10)
    shutdown_grace: Duration = timedelta(seconds=15)
    transient_max_attempts: int = Field(default=8, ge=1)
    transient_backoff: Duration = timedelta(seconds=2)
    timer_poll_interval: Duration = timedelta(milliseconds=500)
    ledger_retention: Duration = timedelta(days=7)
    max_message_bytes: int = 1024 * 1024

    @field_validator("app_env", "log_level", "log_format", "queue_type", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.lower() if isinstance(v, str) else v

    @field_validator("milestones", mode="before")
    @classmethod
    def _merge_milestone_defaults(cls, v: Any) -> Any:
        # An override of one field (MILESTONES__BUILD__RETRIES=2) keeps the other defaults.
        if not isinstance(v, dict):
            return v
        merged: dict[str, Any] = {k: p.model_dump() for k, p in _default_milestones().items()}
        for name, policy in v.items():
            base = merged.get(str(name).lower(), {})
            merged[str(name).lower()] = {**base, **policy} if isinstance(policy, dict) else policy
        return merged

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml = TomlConfigSettingsSource(settings_cls, toml_file=config_file())
        return (init_settings, env_settings, toml)

    def policy(self, milestone: str) -> MilestonePolicy:
        return self.milestones.get(milestone, MilestonePolicy())

    def masked(self) -> dict[str, Any]:
        """The settings as plain data with secrets masked (for `check-config` and logs)."""
        data = self.model_dump(mode="json")
        for key in ("oauth_client_secret", "amqp_url", "database_url"):
            raw = getattr(self, key)
            data[key] = None if raw is None else mask_url(raw.get_secret_value())
        data["oauth_client_secret"] = "**********"
        return data


_URL_PASSWORD = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)(?P<user>[^:/@]*):(?P<pw>[^@/]*)@", re.I)


def mask_url(url: str) -> str:
    """Replace the password of a URL with `***`."""
    return _URL_PASSWORD.sub(lambda m: f"{m['scheme']}{m['user']}:***@", url)


def config_file() -> Path:
    """`$CONFIG_DIR/$APP_ENV.toml` (default ./config/development.toml); missing is not an error."""
    app_env = os.environ.get("APP_ENV", "development").lower()
    return Path(os.environ.get("CONFIG_DIR", "./config")) / f"{app_env}.toml"


class ConfigError(Exception):
    """Invalid configuration; the message names every bad variable."""


def load_settings(**overrides: Any) -> Settings:
    """Build Settings or raise ConfigError with one readable message."""
    try:
        return Settings(**overrides)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid configuration: {config_file()} is not valid TOML ({exc})") from None
    except OSError as exc:  # e.g. the config file exists but cannot be read
        raise ConfigError(f"invalid configuration: {exc.strerror or exc}: {exc.filename}") from None
    except ValidationError as exc:
        raise ConfigError(f"invalid configuration: {describe(exc)}") from None


def describe(exc: ValidationError, prefix: str = "") -> str:
    """Every bad setting of a pydantic-settings error, named as its environment variable
    (`prefix` + the field path joined by `__`, upper case), on one line."""
    problems = []
    for err in exc.errors():
        loc = prefix + "__".join(str(p) for p in err["loc"]).upper() or "?"
        msg = err["msg"]
        if err["type"] == "missing":
            msg = "is required"
        elif err["type"] == "extra_forbidden":
            msg = "is not a known setting"
        problems.append(f"{loc} {msg}")
    return "; ".join(problems)
