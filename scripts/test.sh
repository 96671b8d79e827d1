#!/usr/bin/env bash
# Quick start, command 2: set up (virtualenv .venv, dev extras) and run the whole test suite
# against the local RabbitMQ and Postgres. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
wo_services_up
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q '.[dev]'
exec .venv/bin/pytest "$@"
