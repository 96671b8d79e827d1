"""Sampling a running service with py-spy, and reading its collapsed stacks back as tables."""

from __future__ import annotations

import asyncio
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from services import BenchError


def py_spy() -> str:
    beside = Path(sys.executable).parent / "py-spy"
    found = str(beside) if beside.exists() else shutil.which("py-spy")
    if not found:
        raise BenchError("py-spy is not installed: pip install py-spy (into the environment that runs the bench)")
    return found


class Spy:
    """`py-spy record --pid` from start() to stop(): on-CPU samples only (idle threads are left out),
    collapsed stacks aggregated by function."""

    def __init__(self, pid: int, out: Path, rate: int = 100) -> None:
        self.pid = pid
        self.out = out
        self.rate = rate
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        log = self.out.with_suffix(".log").open("wb")
        self.proc = await asyncio.create_subprocess_exec(
            py_spy(), "record", "--pid", str(self.pid), "--rate", str(self.rate), "--function", "--format", "raw",
            "--output", str(self.out), stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=asyncio.subprocess.STDOUT)
        log.close()

    async def stop(self) -> Path:
        """Stop sampling (SIGINT makes py-spy write its output) and return the output file."""
        assert self.proc is not None
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGINT)
            await asyncio.wait_for(self.proc.wait(), 60)
        if not self.out.exists():
            raise BenchError(f"py-spy wrote no profile; see {self.out.with_suffix('.log')}")
        return self.out


# Where a step's time goes: each stack counts for the first layer one of whose patterns it holds.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("Manager HTTP calls (GET + PUT)", ("ManagerClient.request", "AsyncClient.get (", "AsyncClient.put (")),
    ("ledger (asyncpg)", ("Ledger.session", "Session.", "asyncpg/")),
    ("publishing with confirms", ("Publisher.publish", "Exchange.publish", "Channel.basic_publish (aiormq")),
    ("decide (the pure core)", ("decide (workflow_orchestrator",)),
    ("parsing the delivery", ("parse_body", "loads (json")),
    ("metrics and logs", ("prometheus_client/", "structlog/", "Engine._observe")),
    ("ack", ("IncomingMessage.ack",)),
]
OTHER_LAYER = "event loop, socket reads, AMQP frames, the rest"


@dataclass(frozen=True)
class Profile:
    samples: int
    by_layer: list[tuple[str, int]]
    self_by_package: list[tuple[str, int]]
    self_by_function: list[tuple[str, int]]
    inclusive_by_function: list[tuple[str, int]]  # the service's own functions (the hot path)
    inclusive_by_library_call: list[tuple[str, int]]  # library entry points called from the service


def _package(frame: str) -> str:
    """`JSONEncoder.encode (json/encoder.py:183)` -> `json`; the project's modules by module."""
    location = frame[frame.rfind("(") + 1:].rstrip(")")
    path = location.rsplit(":", 1)[0]
    parts = path.split("/")
    if parts[0] == "workflow_orchestrator" and len(parts) > 1:
        return "workflow_orchestrator." + parts[1].removesuffix(".py")
    return parts[0].removesuffix(".py") if len(parts) > 1 else f"({parts[0]})"


def _own(frame: str) -> bool:
    return "(workflow_orchestrator/" in frame or "(relay.py:" in frame


def read_profile(folded: Path, top: int = 25) -> Profile:
    """Self samples by package and by function; inclusive samples of the service's own functions
    and of the first library function each of them calls."""
    self_fn: Counter[str] = Counter()
    self_pkg: Counter[str] = Counter()
    own: Counter[str] = Counter()
    calls: Counter[str] = Counter()
    layers: Counter[str] = Counter()
    total = 0
    for line in folded.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        total += count
        layers[next((name for name, pats in LAYERS if any(p in stack for p in pats)), OTHER_LAYER)] += count
        self_fn[frames[-1]] += count
        self_pkg[_package(frames[-1])] += count
        for frame in set(frames):
            if _own(frame):
                own[frame] += count
        below = [i for i, f in enumerate(frames) if _own(f)]
        if below and below[-1] + 1 < len(frames):
            calls[f"{frames[below[-1]].split(' ')[0]} -> {frames[below[-1] + 1]}"] += count
    # Frames on (nearly) every sample, such as the CLI's main, say nothing.
    hot = [(k, n) for k, n in own.most_common() if n < 0.99 * total][:top]
    return Profile(total, layers.most_common(), self_pkg.most_common(top), self_fn.most_common(top), hot,
                   calls.most_common(top))


def format_profile(name: str, p: Profile) -> str:
    """Plain-text tables (percent of on-CPU samples)."""
    def pct(n: int) -> str:
        return f"{100 * n / max(p.samples, 1):5.1f}%"

    out = [f"{name}: {p.samples} on-CPU samples", "", "by layer:"]
    out += [f"  {pct(n)}  {k}" for k, n in p.by_layer]
    out += ["", "self time by package:"]
    out += [f"  {pct(n)}  {k}" for k, n in p.self_by_package]
    out += ["", "self time by function:"]
    out += [f"  {pct(n)}  {k}" for k, n in p.self_by_function]
    out += ["", "inclusive time of the service's own functions:"]
    out += [f"  {pct(n)}  {k}" for k, n in p.inclusive_by_function]
    out += ["", "inclusive time of library calls made by the service's own functions (caller -> callee):"]
    out += [f"  {pct(n)}  {k}" for k, n in p.inclusive_by_library_call]
    return "\n".join(out) + "\n"
