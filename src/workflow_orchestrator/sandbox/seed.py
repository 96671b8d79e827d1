"""The sandbox's fixed records (clients, exchanges, brokers, clusters, modules) from a TOML file."""

from __future__ import annotations

import json
import tomllib
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator

DEFAULT_SEED = Path(__file__).with_name("default_seed.toml")

_Name = Field(min_length=1, max_length=255)


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ClientSeed(_Record):
    client_id: str = _Name
    client_secret: SecretStr = Field(min_length=1)


class ExchangeSeed(_Record):
    id: int
    name: str = _Name
    routing_key: str = ""
    root_exchange_name: str = _Name
    failover_exchange_id: int | None = None


class BrokerSeed(_Record):
    id: int
    name: str = _Name
    failover_broker_id: int | None = None


class ConnectionSeed(_Record):
    id: int
    broker_id: int
    username: str
    password: SecretStr
    host: str = _Name
    port: int = Field(default=5672, ge=1, le=65535)
    virtual_host: str = "/"


class ExchangeBrokerSeed(_Record):
    id: int
    messaging_exchange_id: int
    messaging_broker_id: int


class ClusterSeed(_Record):
    id: int
    etcd_token: str = _Name
    name: str | None = None
    messaging_exchange_id: int | None = None
    allow_docker_builds: bool = False
    hosting_provider_id: int | None = None


class ModuleSeed(_Record):
    messaging_exchange_id: int
    hostname: str = _Name
    type: str = _Name
    status: str | None = "active"
    workload: Any = None


class Seed(_Record):
    """Everything `config/sandbox.toml` holds; references between records are checked."""

    clients: list[ClientSeed] = Field(min_length=1)
    orchestrator_exchange_id: int
    orchestrator_broker_id: int
    orchestration_queue_name: str = Field(default="workflow_orchestration", min_length=1)
    exchanges: list[ExchangeSeed] = Field(min_length=1)
    brokers: list[BrokerSeed] = Field(min_length=1)
    connections: list[ConnectionSeed] = []
    exchange_brokers: list[ExchangeBrokerSeed] = []
    clusters: list[ClusterSeed] = []
    modules: list[ModuleSeed] = []

    @model_validator(mode="after")
    def _references(self) -> Seed:
        problems: list[str] = []
        for what, keys in (
            ("clients.client_id", [c.client_id for c in self.clients]),
            ("exchanges.id", [x.id for x in self.exchanges]),
            ("brokers.id", [b.id for b in self.brokers]),
            ("connections.id", [c.id for c in self.connections]),
            ("exchange_brokers.id", [r.id for r in self.exchange_brokers]),
            ("clusters.id", [c.id for c in self.clusters]),
            ("clusters.etcd_token", [c.etcd_token for c in self.clusters]),
            ("modules.hostname", [(m.messaging_exchange_id, m.hostname) for m in self.modules]),
        ):
            dupes = [k for k, n in Counter(keys).items() if n > 1]
            if dupes:
                problems.append(f"duplicate {what}: {dupes}")
        exchanges = {x.id for x in self.exchanges}
        brokers = {b.id for b in self.brokers}

        def need(ids: set[int], value: int | None, where: str) -> None:
            if value is not None and value not in ids:
                problems.append(f"{where} = {value} names no such record")

        need(exchanges, self.orchestrator_exchange_id, "orchestrator_exchange_id")
        need(brokers, self.orchestrator_broker_id, "orchestrator_broker_id")
        for x in self.exchanges:
            need(exchanges, x.failover_exchange_id, f"exchanges[id={x.id}].failover_exchange_id")
        for b in self.brokers:
            need(brokers, b.failover_broker_id, f"brokers[id={b.id}].failover_broker_id")
        for c in self.connections:
            need(brokers, c.broker_id, f"connections[id={c.id}].broker_id")
        for r in self.exchange_brokers:
            need(exchanges, r.messaging_exchange_id, f"exchange_brokers[id={r.id}].messaging_exchange_id")
            need(brokers, r.messaging_broker_id, f"exchange_brokers[id={r.id}].messaging_broker_id")
        for cl in self.clusters:
            need(exchanges, cl.messaging_exchange_id, f"clusters[id={cl.id}].messaging_exchange_id")
        for m in self.modules:
            need(exchanges, m.messaging_exchange_id, f"modules[{m.hostname}].messaging_exchange_id")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def exchange(self, xid: int) -> ExchangeSeed:
        return next(x for x in self.exchanges if x.id == xid)


class SeedError(Exception):
    """The seed file is missing, not TOML, or inconsistent; the message says where."""


def load_seed(path: Path | None, *, fallback: bool = False) -> tuple[Seed, Path]:
    """Parse the seed file; the packaged default when `path` is None, or missing and `fallback`."""
    chosen = path if path is not None else DEFAULT_SEED
    if fallback and not chosen.is_file():
        chosen = DEFAULT_SEED
    try:
        data = tomllib.loads(chosen.read_text(encoding="utf-8"))
        return Seed.model_validate(data), chosen
    except OSError as exc:
        raise SeedError(f"cannot read seed file {chosen}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SeedError(f"seed file {chosen} is not valid TOML: {exc}") from None
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(file)'}: {err['msg']}" for err in exc.errors()
        )
        raise SeedError(f"seed file {chosen} is invalid: {problems}") from None


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a valid TOML basic string
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def dump_seed(seed: Mapping[str, Any]) -> str:
    """A seed (the shape of `Seed`, as plain data) as seed-file TOML; None values are left out."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in seed.items() if not isinstance(v, list) and v is not None]
    for table, rows in seed.items():
        if isinstance(rows, list):
            for row in rows:
                lines += ["", f"[[{table}]]"]
                lines += [f"{k} = {_toml_value(v)}" for k, v in row.items() if v is not None]
    return "\n".join(lines) + "\n"


def connection_seed(amqp_url: str, *, id: int = 1, broker_id: int = 1) -> dict[str, Any]:
    """A `[[connections]]` row reaching the broker of an AMQP URL."""
    u = urlsplit(amqp_url)
    return {"id": id, "broker_id": broker_id, "username": unquote(u.username or "guest"),
            "password": unquote(u.password or "guest"), "host": u.hostname or "127.0.0.1", "port": u.port or 5672,
            "virtual_host": unquote(u.path[1:]) if len(u.path) > 1 else "/"}
