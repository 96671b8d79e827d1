"""Worker-side client library (SPEC §7): the request model, callbacks, and the Worker."""

from workflow_orchestrator.client.orchestration import OrchestrationClient, Outbound, failure_text
from workflow_orchestrator.client.request import OrchestrationRequest
from workflow_orchestrator.client.worker import Handler, StepFailed, Worker

__all__ = ["Handler", "OrchestrationClient", "OrchestrationRequest", "Outbound", "StepFailed", "Worker",
           "failure_text"]
