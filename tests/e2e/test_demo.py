"""The demo, as a user runs it: the console script, exit code 0 only when every workflow ended as
expected."""

from __future__ import annotations

import os
import subprocess

from tests.support.proc import orchestrator_command


def test_demo_runs_every_kind_of_workflow_to_its_expected_end() -> None:
    cmd = [*orchestrator_command()[:-1], "demo", "--workflows", "2", "--speed", "0.1"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    out = r.stdout
    assert "demo passed" in out
    for label in ("release-1", "release-2", "broken-build", "scheduled", "cancelled"):
        assert label in out
    assert "Workflow is now scheduled to start" in out
    assert "Workflow cancelled: release postponed" in out
