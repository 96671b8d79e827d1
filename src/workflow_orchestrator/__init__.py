"""workflow-orchestrator: drives build/deploy workflows one milestone at a time over RabbitMQ."""

__version__ = "0.1.0"
