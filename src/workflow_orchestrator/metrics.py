"""Prometheus series of SPEC §10, on a registry of our own (no module-level singletons)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_FAST = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_SLOW = (1, 5, 15, 30, 60, 300, 900, 1800, 3600, 7200, 21600, 86400)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.messages = Counter("wo_messages_total", "Messages handled, by outcome", ["outcome"], registry=r)
        self.dispatches = Counter("wo_dispatches_total", "Milestone requests dispatched", ["milestone"], registry=r)
        self.active = Gauge("wo_active_workflows", "Workflows in progress (ledger)", registry=r)
        self.in_flight = Gauge("wo_in_flight_messages", "Deliveries and timers being processed", registry=r)
        self.workflow_seconds = Histogram("wo_workflow_duration_seconds", "Workflow durations", ["result"],
                                          buckets=_SLOW, registry=r)
        self.milestone_seconds = Histogram("wo_milestone_duration_seconds", "Milestone durations", ["milestone"],
                                           buckets=_SLOW, registry=r)
        self.manager_seconds = Histogram("wo_manager_request_seconds", "Manager API latency",
                                         ["endpoint", "status"], buckets=_FAST, registry=r)
        self.confirm_seconds = Histogram("wo_publish_confirm_seconds", "Publish-to-confirm latency",
                                         buckets=_FAST, registry=r)
        self.step_seconds = Histogram("wo_step_seconds", "Processing time of one message or timer",
                                      buckets=_FAST, registry=r)
        self.dead_lettered = Counter("wo_dead_lettered_total", "Messages parked in the error queue", ["reason"],
                                     registry=r)
        self.stale = Counter("wo_stale_total", "Stale callbacks and timers ignored", registry=r)
        self.duplicates = Counter("wo_duplicates_total", "Duplicate messages ignored", registry=r)
        self.deferred = Counter("wo_deferred_total", "Messages deferred after transient failures", registry=r)
        self.timers_fired = Counter("wo_timers_fired_total", "Durable timers fired", ["kind"], registry=r)
        self.ready = Gauge("wo_ready", "1 when consuming with Manager and ledger reachable", registry=r)
        self.ledger_round_trips = Counter("wo_ledger_round_trips_total",
                                          "Round trips of the ledger's shared connection (group commit)", registry=r)
        self.ledger_operations = Counter("wo_ledger_operations_total",
                                         "Ledger operations (enter, record, leave) carried by those round trips",
                                         registry=r)

        self.control = Counter("wo_control_messages_total", "Control messages (SPEC §12), by action and outcome",
                               ["action", "outcome"], registry=r)
        self.heartbeats = Counter("wo_heartbeats_total", "Worker heartbeats, by outcome (current, stale)",
                                  ["outcome"], registry=r)

    def observe_manager(self, endpoint: str, status: str, seconds: float) -> None:
        self.manager_seconds.labels(endpoint, status).observe(seconds)

    def observe_confirm(self, seconds: float) -> None:
        self.confirm_seconds.observe(seconds)

    def observe_ledger_round_trip(self, operations: int) -> None:
        self.ledger_round_trips.inc()
        self.ledger_operations.inc(operations)

    def render(self) -> bytes:
        return generate_latest(self.registry)
