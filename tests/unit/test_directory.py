"""Resolving an exchange and a logical queue to a broker connection (SPEC §2, §4.2)."""

from __future__ import annotations

from typing import Any

import pytest

from workflow_orchestrator.messaging.directory import Resolver


class Records:
    """The Manager's messaging records: exchange 1 (this instance's) is restricted to brokers 2 and 3,
    exchange 4 to broker 5, exchange 6 has no restriction; broker 1 fails over to broker 7."""

    def __init__(self) -> None:
        self.restrictions = {"1": ["2", "3"], "4": ["5"]}

    async def get_exchange(self, xid: str) -> dict[str, Any]:
        return {"id": xid, "routing_key": f"site{xid}", "root_exchange_name": f"root{xid}"}

    async def get_exchange_brokers(self, xid: str) -> list[dict[str, Any]]:
        return [{"id": 900, "messaging_exchange_id": xid, "messaging_broker_id": b}
                for b in self.restrictions.get(xid, [])]

    async def get_broker(self, bid: str) -> dict[str, Any]:
        return {"id": bid, "failover_broker_id": "7" if bid == "1" else None}

    async def get_broker_connections(self, bid: str) -> list[dict[str, Any]]:
        return [{"username": "u", "password": "p", "host": f"broker{bid}", "port": 5672, "virtual_host": "/"}]


def host(url: str) -> str:
    return url.split("@")[1].split(":")[0]


async def test_the_own_queue_is_consumed_on_broker_id_even_where_the_exchange_is_restricted() -> None:
    route = await Resolver(Records(), "1", "1").own_route("workflow_orchestration")
    assert (route.exchange_name, route.routing_key) == ("root1", "site1.workflow_orchestration")
    assert host(route.url) == "broker1"
    assert [host(u) for u in route.failover_urls] == ["broker7"], "the failover broker's connections"


@pytest.mark.parametrize(("exchange", "brokers"), [
    ("4", {"broker5"}),  # the target's restriction
    ("6", {"broker2", "broker3"}),  # none there: this exchange's restriction
    ("1", {"broker2", "broker3"}),  # publishing to this exchange follows its restriction
])
async def test_publishing_follows_the_restrictions(exchange: str, brokers: set[str]) -> None:
    resolver = Resolver(Records(), "1", "1")
    seen = {host((await resolver.route(exchange, "deployer")).url) for _ in range(40)}
    assert seen == brokers


async def test_without_restrictions_publishing_uses_broker_id_and_amqp_url_overrides_everything() -> None:
    records = Records()
    records.restrictions = {}
    assert host((await Resolver(records, "1", "1").route("6", "builder")).url) == "broker1"
    route = await Resolver(records, "1", "1", amqp_url="amqp://x:y@override:5672/").own_route("builder")
    assert route.url == "amqp://x:y@override:5672/" and route.routing_key == "site1.builder"
