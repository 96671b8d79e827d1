"""The README's quick start, verbatim, in a fresh clone with a fresh virtualenv (as a new user)."""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def quickstart_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "the quick start has a bash block"
    commands = [line.split("#", 1)[0].strip() for line in block.group(1).splitlines() if line.strip()]
    assert len(commands) == 2, commands
    return commands


@pytest.mark.slow
def test_readme_quick_start_in_a_fresh_clone() -> None:
    demo, tests = quickstart_commands()
    with tempfile.TemporaryDirectory(prefix="wo-quickstart-") as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True, timeout=120)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VIRTUAL_ENV", "PYTEST"))}
        env["COLUMNS"] = "160"
        r = subprocess.run(demo, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert "demo passed" in r.stdout
        # The test command as written; PYTEST_ADDOPTS narrows it to the unit tests so this test
        # does not run the whole suite (and itself) again.
        env["PYTEST_ADDOPTS"] = "tests/unit -q -p no:cacheprovider"
        r = subprocess.run(tests, shell=True, cwd=clone, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert re.search(r"\d+ passed", r.stdout), r.stdout[-2000:]
