"""Starting, continuing and cancelling workflows, and chat notifications (SPEC §7).

Every message goes through the Publisher: persistent, `mandatory`, publisher-confirmed, with
message_id / correlation_id / type / app_id / timestamp. A callback is routed by the request's own
routing fields (`workflow_orchestration_exchange_id` / `_broker_id`, `orchestration_queue_name`),
a notification by `notifications_exchange_id` / `_broker_id`; the client's defaults only fill gaps.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

import structlog

from workflow_orchestrator.client.request import OrchestrationRequest
from workflow_orchestrator.domain.models import WORKFLOW_FIELDS
from workflow_orchestrator.manager.client import ManagerClient, ManagerError
from workflow_orchestrator.messaging.broker import BrokerPool, OutMessage, Publisher, PublishFailed
from workflow_orchestrator.messaging.directory import Resolver
from workflow_orchestrator.messaging.topology import QueueType

log = structlog.get_logger(__name__)

# Callback message ids are derived from the dispatch, so a worker that handles the same dispatch
# twice (redelivery after a crash) sends the same message_id and the orchestrator's inbox sees a
# duplicate instead of a second, stale callback.
_CALLBACK_NS = uuid.UUID("0c7a3f3e-8d0b-4a53-9a43-5b7f3f1f2a10")
ORCHESTRATION_QUEUE = "workflow_orchestration"
CHAT_QUEUE = "notifications_hipchat"


def callback_message_id(request: OrchestrationRequest) -> str:
    """uuid5 of the dispatch_id when the request has one, else a random UUID."""
    if request.dispatch_id:
        return str(uuid.uuid5(_CALLBACK_NS, f"callback:{request.dispatch_id}"))
    return str(uuid.uuid4())


def failure_text(message: str, reason: str | None) -> str:
    """`{message}. Reason: {reason}` (no doubled full stop), or just the message."""
    text = message.strip() or "Milestone failed"
    if reason:
        sep = " " if text[-1] in ".!?" else ". "
        text = f"{text}{sep}Reason: {reason}"
    return text


def _text(value: Any) -> str | None:
    return None if value is None or value == "" else str(value)


@dataclass(frozen=True)
class Outbound:
    """A prepared message and the broker through which its exchange is reached."""

    broker_id: str
    message: OutMessage


class OrchestrationClient:
    """Publishes to the orchestrator and the notifications queues, and saves to the Manager.

    `broker_id` / `exchange_id` / `queue_name` are defaults for messages whose request does not say
    where to go (starts and cancels, or requests without routing fields). `amqp_url`, when set, is
    used for every broker (as AMQP_URL is for the service).
    """

    def __init__(self, manager: ManagerClient, pool: BrokerPool, *, broker_id: str, exchange_id: str | None = None,
                 queue_name: str = ORCHESTRATION_QUEUE, amqp_url: str | None = None,
                 queue_type: QueueType = "classic", delivery_limit: int = 20, confirm_timeout: float = 10.0) -> None:
        self.manager = manager
        self.pool = pool
        self.broker_id = broker_id
        self.exchange_id = exchange_id
        self.queue_name = queue_name
        self.amqp_url = amqp_url
        self.queue_type: QueueType = queue_type
        self.delivery_limit = delivery_limit
        self.confirm_timeout = confirm_timeout
        self._publishers: dict[tuple[str, str], Publisher] = {}

    @classmethod
    @asynccontextmanager
    async def connect(cls, *, manager_url: str, token_url: str, client_id: str, client_secret: str,
                      broker_id: str, app_id: str = "workflow-orchestrator-client",
                      **options: Any) -> AsyncIterator[OrchestrationClient]:
        """A client that owns its Manager client and broker connections (closed on exit)."""
        manager = ManagerClient(manager_url, token_url, client_id, client_secret)
        pool = BrokerPool(app_id=app_id)
        try:
            await manager.start()
            yield cls(manager, pool, broker_id=broker_id, **options)
        finally:
            await pool.close()
            await manager.close()

    # ---- starting ------------------------------------------------------------------------
    async def start(self, workflow_id: str, *, via: Literal["manager", "queue"] = "manager",
                    force_build: bool = False, build_exchange: str | int | None = None,
                    deploy_exchange: str | int | None = None, exchange_id: str | None = None,
                    **extra: Any) -> str | None:
        """Start a workflow: through the Manager's execute (202, or Conflict when it already ran),
        or by publishing the start message to the orchestration queue of `exchange_id` (default:
        the client's). `extra` are further execute options (`etcd_token`, ...). Returns the
        message_id when published here."""
        options: dict[str, Any] = dict(extra)
        if force_build:
            options["force_build"] = True
        if build_exchange is not None:
            options["build_messaging_exchange_id"] = build_exchange
        if deploy_exchange is not None:
            options["deploy_messaging_exchange_id"] = deploy_exchange
        if via == "manager":
            await self.manager.execute_workflow(workflow_id, options)
            return None
        xid = self._exchange(exchange_id)
        record = await self.manager.get_workflow(workflow_id)
        body = {**record, **options, "id": str(record.get("id") or workflow_id), "workflow_id": workflow_id,
                **self._routing(xid)}
        out = OutMessage(xid, self.queue_name, body, "workflow.start", str(uuid.uuid4()), workflow_id)
        return await self.send(Outbound(self.broker_id, out))

    def _routing(self, xid: str) -> dict[str, Any]:
        return {
            "workflow_orchestration_exchange_id": xid, "workflow_orchestration_broker_id": self.broker_id,
            "orchestration_queue_name": self.queue_name,
            "notifications_exchange_id": xid, "notifications_broker_id": self.broker_id,
        }

    def _exchange(self, exchange_id: str | None) -> str:
        xid = exchange_id or self.exchange_id
        if not xid:
            raise ValueError("no messaging exchange given (and the client has no default exchange_id)")
        return xid

    # ---- callbacks -----------------------------------------------------------------------
    def callback(self, request: OrchestrationRequest) -> Outbound:
        """The request as a continue message to its orchestration queue (not yet sent)."""
        xid = _text(request.workflow_orchestration_exchange_id) or self._exchange(None)
        broker = _text(request.workflow_orchestration_broker_id) or self.broker_id
        queue = request.orchestration_queue_name or self.queue_name
        out = OutMessage(xid, queue, request.to_payload(), "workflow.continue", callback_message_id(request),
                         request.workflow_ref)
        return Outbound(broker, out)

    async def step_completed(self, request: OrchestrationRequest) -> str:
        """Report the milestone done: publish the request (with its dispatch_id) back to the
        orchestrator. Returns the message_id."""
        return await self.send(self.callback(request))

    def mark_failed(self, request: OrchestrationRequest, message: str, reason: str | None) -> str:
        """Record a failure in the request (event-log entry, workflow_completed and
        workflow_error true); returns the text. The worker's reason lives only in the message."""
        text = failure_text(message, reason)
        request.add_event(text)
        request.workflow_completed = True
        request.workflow_error = True
        return text

    async def step_failed(self, request: OrchestrationRequest, message: str, reason: str | None = None, *,
                          notify: bool = True) -> str:
        """Report the milestone failed: the request is updated in place (see mark_failed) and
        published; with `notify`, a failure chat notification is sent too (best effort).
        Returns the message_id of the callback."""
        text = self.mark_failed(request, message, reason)
        message_id = await self.send(self.callback(request))
        if notify:
            await self.try_send(self.chat(request, text, success=False))
        return message_id

    # ---- notifications -------------------------------------------------------------------
    def chat(self, request: OrchestrationRequest, message: str, success: bool = True) -> Outbound:
        """A chat notification for the request's notifications exchange (not yet sent)."""
        xid = (_text(request.notifications_exchange_id) or _text(request.workflow_orchestration_exchange_id)
               or self._exchange(None))
        broker = (_text(request.notifications_broker_id) or _text(request.workflow_orchestration_broker_id)
                  or self.broker_id)
        body = {"is_success": success, "prefix": request.prefix, "message": message,
                "room_names": request.room_names}
        wid = request.id or request.workflow_id or ""
        return Outbound(broker, OutMessage(xid, CHAT_QUEUE, body, "notification.chat", str(uuid.uuid4()), wid))

    async def notify(self, request: OrchestrationRequest, message: str, success: bool = True) -> str:
        """Send a chat notification, then add `"{prefix} {message}"` to request.event_log."""
        message_id = await self.send(self.chat(request, message, success))
        request.add_event(message)
        return message_id

    # ---- Manager -------------------------------------------------------------------------
    async def save(self, request: OrchestrationRequest) -> None:
        """PUT the request's workflow fields to the Manager (a partial update: absent fields are
        kept; workflow_completed and workflow_error are always sent)."""
        payload = request.to_payload()
        fields = {k: payload[k] for k in WORKFLOW_FIELDS if k in payload and k != "id"}
        fields["workflow_completed"] = bool(payload.get("workflow_completed"))
        fields["workflow_error"] = bool(payload.get("workflow_error"))
        await self.manager.put_workflow(request.workflow_ref, fields)

    # ---- control -------------------------------------------------------------------------
    async def cancel(self, workflow_id: str, reason: str, *, exchange_id: str | None = None,
                     broker_id: str | None = None, queue_name: str | None = None) -> str:
        """Ask the orchestrator of `exchange_id` (default: the client's) to fail the workflow
        with `Workflow cancelled: {reason}`. Returns the message_id."""
        body = {"id": workflow_id, "action": "cancel", "reason": reason}
        out = OutMessage(self._exchange(exchange_id), queue_name or self.queue_name, body, "workflow.cancel",
                         str(uuid.uuid4()), workflow_id)
        return await self.send(Outbound(broker_id or self.broker_id, out))

    # ---- sending -------------------------------------------------------------------------
    async def send(self, out: Outbound) -> str:
        """Publish and wait for the broker's confirm (raises PublishFailed); returns the message_id."""
        await self._publisher(out.message.exchange_id, out.broker_id).publish(out.message)
        return out.message.message_id

    async def try_send(self, out: Outbound) -> bool:
        """send(), logging instead of raising when the message is not confirmed."""
        try:
            await self.send(out)
            return True
        except (PublishFailed, ManagerError) as exc:
            log.warning("message not sent", type=out.message.type, error=str(exc))
            return False

    def _publisher(self, exchange_id: str, broker_id: str) -> Publisher:
        # The resolver's "own exchange" is the target itself: an exchange without broker
        # restrictions is then reached through the broker the request names, never through the
        # restrictions of some other exchange.
        key = (exchange_id, broker_id)
        pub = self._publishers.get(key)
        if pub is None:
            resolver = Resolver(self.manager, exchange_id, broker_id, self.amqp_url)
            pub = self._publishers[key] = Publisher(resolver, self.pool, queue_type=self.queue_type,
                                                    delivery_limit=self.delivery_limit,
                                                    confirm_timeout=self.confirm_timeout)
        return pub
