#!/usr/bin/env bash
# Quick start, command 1: set up (virtualenv .venv) and run the demo: sandbox Manager,
# orchestrator and simulated workers driving real workflows. Extra arguments go to `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/services.sh
wo_services_up
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/pip install -q .
exec .venv/bin/workflow-orchestrator demo "$@"
