"""Test layers: tests/unit needs nothing; tests/integration and tests/e2e need the real
RabbitMQ and Postgres (TEST_AMQP_URL / TEST_DATABASE_URL, default: the local services) and fail,
never skip, when they are missing."""

import os

# Settings files: config/test.toml (short timers, quiet HTTP); tests pass connection settings.
os.environ.setdefault("APP_ENV", "test")
