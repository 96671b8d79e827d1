"""Names and arguments of the AMQP topology (SPEC §4.2). Pure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

QueueType = Literal["classic", "quorum"]


def queue_name(routing_key: str | None, queue: str) -> str:
    """`{routing_key}.{queue}`, or just `queue` where the exchange has no routing key."""
    return f"{routing_key}.{queue}" if routing_key else queue


def error_queue_name(name: str) -> str:
    return f"{name}_error"


def queue_arguments(name: str, queue_type: QueueType = "classic", delivery_limit: int = 20) -> dict[str, Any]:
    """Dead-letter to `<name>_error`; quorum queues also get an explicit delivery limit so a
    poison message is parked in the error queue instead of being redelivered forever."""
    args: dict[str, Any] = {"x-dead-letter-exchange": "", "x-dead-letter-routing-key": error_queue_name(name)}
    if queue_type == "quorum":
        args["x-queue-type"] = "quorum"
        args["x-delivery-limit"] = delivery_limit
    return args


def error_queue_arguments(queue_type: QueueType = "classic") -> dict[str, Any] | None:
    """The error queue's: the same queue type, nothing else."""
    return {"x-queue-type": "quorum"} if queue_type == "quorum" else None


@dataclass(frozen=True)
class Route:
    """Where logical queue `queue` of one messaging exchange lives on its broker."""

    exchange_name: str  # the topic exchange: the messaging exchange's root_exchange_name
    routing_key: str  # also the queue name
    url: str  # AMQP URL of the broker connection
    failover_urls: tuple[str, ...] = ()
