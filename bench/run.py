"""Benchmark: the orchestrator against a bare relay, side by side in one run.

    python bench/run.py [--workflows N] [--runs 3] [--json out.json] [--markdown out.md] [--profile DIR]

Each run starts its own sandbox Manager, orchestrator and bare relay (bench/relay.py) as separate
processes on a fresh ledger database, sandbox schema and random AMQP names, with instant echo
workers in this process. For each system, in alternating order from run to run: a warm-up, a peak
phase (N workflows [build, deploy] started at once), then a paced phase (N more, started at 50%
of the workflows/s that system just reached). See bench/RESULTS.md for what is measured and how.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aio_pika
from aio_pika.abc import AbstractRobustConnection
from load import ORCHESTRATOR, RELAY, STEPS_PER_WORKFLOW, Load, Phase, System
from profiling import Spy, format_profile, read_profile
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from services import (
    POSTGRES,
    RABBITMQ,
    BenchError,
    Process,
    Services,
    cpu_delta,
    cpu_seconds,
    machine,
    machine_busy_seconds,
    peak_rss_mib,
    queue_depths,
    running_services,
    services_cpu,
    wait_for,
    wait_idle,
)

from workflow_orchestrator.manager.client import ManagerClient

WORKFLOW = {"deployment_repo": "acme/bench-deploy", "deployment_repo_git_ref": "master",
            "source_repo": "acme/bench", "source_repo_git_ref": "0123abc", "milestones": ["build", "deploy"]}
WORKFLOW_ROUTE = "/workflows/{id}"
console = Console(stderr=True)


# ---- statistics ----------------------------------------------------------------------------
def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class PhaseResult:
    system: str
    label: str
    workflows: int
    seconds: float
    cpu_s: float  # the system's process
    manager_cpu_s: float  # the sandbox Manager's process
    load_cpu_s: float  # this process
    machine_busy_s: float
    rabbitmq_cpu_s: float  # all of its processes (other users' work on it included)
    postgres_cpu_s: float  # all of its processes (other users' work on it included)
    foreign_cpu_s: float  # the rest of the machine's busy time: other work, kernel
    busy_before: float  # cores busy with other work just before the phase
    requests: dict[str, int]  # Manager requests by route during the phase
    messages_in: int
    duplicate_dispatches: int
    start_dispatch_ms: list[float]
    callback_dispatch_ms: list[float]
    callback_finish_ms: list[float]
    offered_wf_per_s: float | None
    samples: list[tuple[float, str, float]]  # (seconds into the phase, latency kind, ms)

    @property
    def steps(self) -> int:
        return self.workflows * STEPS_PER_WORKFLOW

    def per_step_ms(self, seconds: float) -> float:
        return 1000 * seconds / self.steps

    def calls(self, method: str) -> int:
        return self.requests.get(f"{method} {WORKFLOW_ROUTE}", 0)

    @property
    def other_calls(self) -> dict[str, int]:
        return {k: v for k, v in self.requests.items()
                if k not in (f"GET {WORKFLOW_ROUTE}", f"PUT {WORKFLOW_ROUTE}") and " /sandbox/" not in k}

    def raw(self) -> dict[str, Any]:
        lat = {name: {f"p{q}": round(percentile(v, q), 2) for q in (50, 90, 95, 99, 100)}
               for name, v in (("start_dispatch_ms", self.start_dispatch_ms),
                               ("callback_dispatch_ms", self.callback_dispatch_ms),
                               ("callback_finish_ms", self.callback_finish_ms))}
        return {"workflows": self.workflows, "seconds": round(self.seconds, 3), "cpu_s": round(self.cpu_s, 3),
                "manager_cpu_s": round(self.manager_cpu_s, 3), "load_cpu_s": round(self.load_cpu_s, 3),
                "machine_busy_s": round(self.machine_busy_s, 3), "rabbitmq_cpu_s": round(self.rabbitmq_cpu_s, 3),
                "postgres_cpu_s": round(self.postgres_cpu_s, 3),
                "foreign_cpu_s": round(self.foreign_cpu_s, 3), "busy_before": round(self.busy_before, 3),
                "requests": self.requests,
                "messages_in": self.messages_in, "duplicate_dispatches": self.duplicate_dispatches,
                "offered_wf_per_s": self.offered_wf_per_s, "latency": lat,
                "samples": [(round(t, 4), kind, round(ms, 2)) for t, kind, ms in self.samples]}


def metrics(peak: PhaseResult, paced: PhaseResult, rss_mib: float) -> dict[str, float]:
    """The figures of one system in one run."""
    out: dict[str, float] = {
        "steps_per_s": peak.steps / peak.seconds,
        "workflows_per_s": peak.workflows / peak.seconds,
        "cpu_ms_per_step": peak.per_step_ms(peak.cpu_s),
        "cpu_ms_per_step_paced": paced.per_step_ms(paced.cpu_s),
        "manager_cpu_ms_per_step": peak.per_step_ms(peak.manager_cpu_s),
        "load_cpu_ms_per_step": peak.per_step_ms(peak.load_cpu_s),
        "machine_busy_cores": peak.machine_busy_s / peak.seconds,
        "rabbitmq_cpu_ms_per_step": peak.per_step_ms(peak.rabbitmq_cpu_s),
        "postgres_cpu_ms_per_step": peak.per_step_ms(peak.postgres_cpu_s),
        "machine_cpu_ms_per_step": peak.per_step_ms(peak.machine_busy_s),
        "foreign_cores": max(peak.foreign_cpu_s / peak.seconds, paced.foreign_cpu_s / paced.seconds),
        "peak_rss_mib": rss_mib,
        "manager_get_per_step": peak.calls("GET") / peak.steps,
        "manager_put_per_step": peak.calls("PUT") / peak.steps,
        "manager_calls_per_step": (peak.calls("GET") + peak.calls("PUT")) / peak.steps,
        "manager_calls_per_step_paced": (paced.calls("GET") + paced.calls("PUT")) / paced.steps,
        "manager_other_calls": float(sum(peak.other_calls.values()) + sum(paced.other_calls.values())),
        "messages_per_step": peak.messages_in / peak.steps,
        "duplicate_dispatches": float(peak.duplicate_dispatches + paced.duplicate_dispatches),
        "paced_offered_wf_per_s": paced.offered_wf_per_s or 0.0,
        "paced_achieved_wf_per_s": paced.workflows / paced.seconds,
    }
    for name, values in (("start_dispatch", paced.start_dispatch_ms), ("callback_dispatch", paced.callback_dispatch_ms),
                         ("callback_finish", paced.callback_finish_ms)):
        for q in (50, 95, 99):
            out[f"{name}_p{q}_ms"] = percentile(values, q)
    for q in (50, 99):
        out[f"peak_callback_dispatch_p{q}_ms"] = percentile(peak.callback_dispatch_ms, q)
    return out


# ---- one run -------------------------------------------------------------------------------
async def create_workflows(manager: ManagerClient, count: int) -> list[dict[str, Any]]:
    """`count` workflows [build, deploy] in the Manager (nothing is prepended: build is there)."""
    limit = asyncio.Semaphore(16)

    async def one() -> dict[str, Any]:
        async with limit:
            record: dict[str, Any] = (await manager.request("POST", "/workflows", "/workflows", json=WORKFLOW)).json()
        if record.get("milestones") != WORKFLOW["milestones"]:
            raise BenchError(f"the Manager stored milestones {record.get('milestones')}")
        return record

    return list(await asyncio.gather(*(one() for _ in range(count))))


def start_message(record: dict[str, Any], system: System, svc: Services) -> dict[str, Any]:
    """A start message as the Manager's execute publishes it (routing fields, execute options)."""
    body = {k: v for k, v in record.items() if k not in ("inserted_at", "updated_at")}
    options = {"etcd_token": svc.names.deploy_token}
    return {**body, **options, "execute_options": options, "workflow_id": record["id"],
            "workflow_orchestration_exchange_id": 1, "workflow_orchestration_broker_id": 1,
            "orchestration_queue_name": system.inbound, "notifications_exchange_id": 1,
            "notifications_broker_id": 1}


async def quiet(conn: AbstractRobustConnection, svc: Services) -> None:
    """Wait until no queue of the run holds a message (the previous phase's tail has drained);
    error queues are `verify`'s business."""
    async def empty() -> bool:
        depths = await queue_depths(conn, svc.names)
        return all(ready == 0 for q, (ready, _) in depths.items() if not q.endswith("_error"))

    await wait_for(empty, "all queues drained", 60, svc.processes)


Snapshot = tuple[dict[str, float], dict[int, float], dict[int, float]]


def snapshot(pids: dict[str, int]) -> Snapshot:
    """CPU seconds so far: of our processes (and the machine's busy time), of RabbitMQ's, of Postgres's."""
    ours = {k: cpu_seconds(p) for k, p in pids.items()}
    ours["machine"] = machine_busy_seconds()[0]
    return ours, services_cpu(RABBITMQ), services_cpu(POSTGRES)


def used(before: Snapshot, after: Snapshot) -> dict[str, float]:
    """CPU seconds between two snapshots, by process name, plus `rabbitmq`, `postgres`, `machine`."""
    out = {k: after[0][k] - before[0][k] for k in after[0]}
    out["rabbitmq"] = cpu_delta(before[1], after[1])
    out["postgres"] = cpu_delta(before[2], after[2])
    return out


class Runner:
    """Phases of one run against one set of services."""

    def __init__(self, conn: AbstractRobustConnection, svc: Services, load: Load, progress: Progress,
                 args: argparse.Namespace) -> None:
        self.conn = conn
        self.svc = svc
        self.load = load
        self.progress = progress
        self.args = args

    def process(self, system: System) -> Process:
        return self.svc.orchestrator if system is ORCHESTRATOR else self.svc.relay

    async def phase(self, system: System, label: str, records: list[dict[str, Any]], rate: float | None,
                    title: str) -> PhaseResult:
        svc, m = self.svc, self.svc.manager
        await quiet(self.conn, svc)
        busy_before = await wait_idle(self.args.idle_cores, self.args.idle_wait, console.print)
        bodies = [start_message(r, system, svc) for r in records]
        # The load generator timestamps arrivals: a full GC pass over what earlier phases left would
        # add its pause to the latencies of whichever system is measured.
        gc.collect()
        gc.freeze()
        task = self.progress.add_task(title, total=len(bodies), rate="")
        started = time.perf_counter()

        def advance() -> None:
            done = len(phase.finished)
            self.progress.update(task, completed=done,
                                 rate=f"{done * STEPS_PER_WORKFLOW / (time.perf_counter() - started):7.1f} steps/s")

        phase = Phase(system, label, [str(r["id"]) for r in records], on_finished=advance)
        await m.request("POST", "/sandbox/stats/reset", "/sandbox/stats/reset")
        pids = {"system": self.process(system).pid, "manager": svc.sandbox.pid, "load": os.getpid(),
                **{p.name: p.pid for p in svc.processes}}
        before = snapshot(pids)
        await self.load.drive(phase, bodies, rate, self.args.phase_timeout)
        cpu = used(before, snapshot(pids))
        ours = sum(cpu[p.name] for p in svc.processes) + cpu["load"]
        requests: dict[str, int] = (await m.request("GET", "/sandbox/stats", "/sandbox/stats")).json()["requests"]
        if phase.failed or phase.errors:
            raise BenchError(f"{system.name} {label}: {len(phase.failed)} workflows failed, errors: "
                             f"{(phase.failed + phase.errors)[:3]}")
        if phase.duplicate_dispatches:
            console.print(f"[yellow]{system.name} {label}: {phase.duplicate_dispatches} milestone requests were "
                          "dispatched twice[/yellow]")
        return PhaseResult(
            system=system.name, label=label, workflows=len(records), seconds=phase.seconds, cpu_s=cpu["system"],
            manager_cpu_s=cpu["manager"], load_cpu_s=cpu["load"], machine_busy_s=cpu["machine"],
            rabbitmq_cpu_s=cpu["rabbitmq"], postgres_cpu_s=cpu["postgres"], busy_before=busy_before,
            foreign_cpu_s=max(0.0, cpu["machine"] - ours - cpu["rabbitmq"] - cpu["postgres"]),
            requests=requests,
            messages_in=phase.messages_in, duplicate_dispatches=phase.duplicate_dispatches,
            start_dispatch_ms=[1000 * x for x in phase.start_dispatch],
            callback_dispatch_ms=[1000 * x for x in phase.callback_dispatch],
            callback_finish_ms=[1000 * x for x in phase.callback_finish], offered_wf_per_s=rate,
            samples=[(t, kind, 1000 * x) for t, kind, x in phase.samples])


async def verify(svc: Services, conn: AbstractRobustConnection, expected: dict[str, str]) -> None:
    """Every measured workflow completed without error; nothing was dead-lettered."""
    listed = (await svc.manager.request("GET", "/workflows", "/workflows", params={"lookback": "0"})).json()
    records = {str(r["id"]): r for r in listed}
    bad = [f"{wid} ({system})" for wid, system in expected.items()
           if not records.get(wid, {}).get("workflow_completed") or records.get(wid, {}).get("workflow_error")]
    if bad:
        raise BenchError(f"{len(bad)} workflows are not completed successfully in the Manager: {bad[:3]}")
    dead = {q: n for q, (n, _) in (await queue_depths(conn, svc.names)).items() if q.endswith("_error") and n}
    if dead:
        raise BenchError(f"messages were dead-lettered: {dead}")


async def one_run(index: int, args: argparse.Namespace, conn: AbstractRobustConnection, progress: Progress,
                  spy_dir: Path | None = None) -> dict[str, Any]:
    """One run: fresh services, both systems measured; or, with spy_dir, one profiled peak each."""
    workdir = Path(tempfile.mkdtemp(prefix="wo-bench-"))
    n = args.workflows
    async with running_services(conn, amqp_url=args.amqp_url, database_url=args.database_url,
                                prefetch=args.prefetch, workdir=workdir, sandbox_pool=args.sandbox_pool,
                                orchestrator_src=args.orchestrator_src, log_level=args.log_level) as svc:
        load = Load(conn, svc.names)
        await load.start()
        try:
            runner = Runner(conn, svc, load, progress, args)
            order = [ORCHESTRATOR, RELAY] if index % 2 == 0 else [RELAY, ORCHESTRATOR]
            phases = 1 if spy_dir else 2
            records = await create_workflows(svc.manager, len(order) * (args.warmup + phases * n))

            def pool(k: int) -> list[dict[str, Any]]:
                return [records.pop() for _ in range(k)]

            expected: dict[str, str] = {}
            out: dict[str, Any] = {}
            tag = "profile" if spy_dir else f"run {index + 1}/{args.runs}"
            for system in order:
                warm = pool(args.warmup)
                await runner.phase(system, "warm-up", warm, None, f"{tag} {system.name:12} warm-up")
                batch = pool(n)
                if spy_dir is not None:
                    spy = Spy(runner.process(system).pid, spy_dir / f"{system.name}.folded")
                    await spy.start()
                    try:
                        peak = await runner.phase(system, "peak", batch, None, f"{tag} {system.name:12} peak")
                    finally:
                        profile = read_profile(await spy.stop())
                    text = format_profile(f"{system.name}, peak phase of {n} workflows", profile)
                    (spy_dir / f"{system.name}.txt").write_text(text)
                    out[system.name] = {"peak": peak.raw(), "profile": str(spy_dir / f"{system.name}.txt")}
                    continue
                peak = await runner.phase(system, "peak", batch, None, f"{tag} {system.name:12} peak")
                rate = 0.5 * peak.workflows / peak.seconds
                paced_batch = pool(n)
                paced = await runner.phase(system, "paced", paced_batch, rate,
                                           f"{tag} {system.name:12} paced {rate:5.1f} wf/s")
                expected.update({str(r["id"]): system.name for r in batch + paced_batch})
                rss = peak_rss_mib(runner.process(system).pid)
                out[system.name] = {"metrics": metrics(peak, paced, rss), "peak": peak.raw(), "paced": paced.raw()}
            await verify(svc, conn, expected)
        except BaseException:
            console.print(f"[red]run failed; logs kept in {workdir}[/red]")
            raise
        finally:
            await load.close()
    if args.keep_logs:
        console.print(f"logs of run {index + 1}: {workdir}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# ---- report ----------------------------------------------------------------------------------
ROWS: list[tuple[str, str, str, str]] = [
    # key, label, unit/format, target on the orchestrator (or its ratio)
    ("steps_per_s", "orchestration steps/s (peak)", "{:.0f}", "ratio ≥ 0.7"),
    ("workflows_per_s", "workflows/s end to end (peak)", "{:.1f}", ""),
    ("callback_dispatch_p50_ms", "callback→dispatch p50 @50% peak, ms", "{:.1f}", ""),
    ("callback_dispatch_p95_ms", "callback→dispatch p95 @50% peak, ms", "{:.1f}", ""),
    ("callback_dispatch_p99_ms", "callback→dispatch p99 @50% peak, ms", "{:.1f}", "< 50 ms"),
    ("start_dispatch_p99_ms", "start→dispatch p99 @50% peak, ms", "{:.1f}", ""),
    ("cpu_ms_per_step", "CPU ms/step, service process (peak)", "{:.2f}", "ratio ≤ 2"),
    ("cpu_ms_per_step_paced", "CPU ms/step, service process (@50%)", "{:.2f}", ""),
    ("manager_cpu_ms_per_step", "CPU ms/step, sandbox Manager (peak)", "{:.2f}", ""),
    ("rabbitmq_cpu_ms_per_step", "CPU ms/step, RabbitMQ (peak)", "{:.2f}", ""),
    ("postgres_cpu_ms_per_step", "CPU ms/step, Postgres (peak)", "{:.2f}", ""),
    ("load_cpu_ms_per_step", "CPU ms/step, load generator and workers (peak)", "{:.2f}", ""),
    ("machine_cpu_ms_per_step", "CPU ms/step, whole machine (peak)", "{:.2f}", ""),
    ("peak_rss_mib", "peak RSS, MiB", "{:.0f}", ""),
    ("manager_calls_per_step", "Manager GET+PUT /workflows/{id} per step", "{:.3f}", "= 2"),
    ("manager_calls_per_step_paced", "Manager GET+PUT /workflows/{id} per step (@50%)", "{:.3f}", "= 2"),
    ("manager_other_calls", "other Manager calls (both phases)", "{:.0f}", "≈ 0"),
    ("duplicate_dispatches", "milestone requests dispatched twice (both phases)", "{:.0f}", "= 0"),
    ("messages_per_step", "messages out per step", "{:.2f}", ""),
    ("machine_busy_cores", "machine CPU busy (of 2 cores, peak)", "{:.2f}", ""),
    ("foreign_cores", "other work on the machine, cores (max)", "{:.2f}", "≈ 0"),
]
RATIO_KEYS = ("steps_per_s", "workflows_per_s", "cpu_ms_per_step", "cpu_ms_per_step_paced", "peak_rss_mib",
              "callback_dispatch_p99_ms", "machine_cpu_ms_per_step")


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over runs of every figure, and of every per-run ratio orchestrator / relay."""
    systems = ("orchestrator", "relay")
    med = {s: {k: statistics.median(r[s]["metrics"][k] for r in runs) for k in runs[0][s]["metrics"]}
           for s in systems}
    ratios = {k: statistics.median(r["orchestrator"]["metrics"][k] / r["relay"]["metrics"][k] for r in runs)
              for k in RATIO_KEYS}
    o = med["orchestrator"]
    verdicts = {
        "manager_calls_per_step": abs(o["manager_calls_per_step"] - 2) < 1e-9,
        "manager_calls_per_step_paced": abs(o["manager_calls_per_step_paced"] - 2) < 1e-9,
        "duplicate_dispatches": o["duplicate_dispatches"] == 0,
        "steps_per_s": ratios["steps_per_s"] >= 0.7,
        "cpu_ms_per_step": ratios["cpu_ms_per_step"] <= 2,
        "callback_dispatch_p99_ms": o["callback_dispatch_p99_ms"] < 50,
    }
    return {"median": med, "ratio": ratios, "targets_met": verdicts}


def rows(summary: dict[str, Any]) -> list[list[str]]:
    med, ratios, ok = summary["median"], summary["ratio"], summary["targets_met"]
    out = []
    for key, label, fmt, target in ROWS:
        ratio = f"{ratios[key]:.2f}x" if key in ratios else ""
        verdict = ("met" if ok[key] else "NOT met") if key in ok else ""
        out.append([label, fmt.format(med["orchestrator"][key]), fmt.format(med["relay"][key]), ratio,
                    f"{target} {verdict}".strip()])
    return out


def print_table(summary: dict[str, Any], runs: int) -> None:
    table = Table(title=f"median of {runs} run(s)")
    for col in ("metric", "orchestrator", "bare relay", "ratio", "target"):
        table.add_column(col, justify="left" if col in ("metric", "target") else "right")
    for row in rows(summary):
        table.add_row(*row)
    Console().print(table)


def markdown(summary: dict[str, Any], info: dict[str, Any]) -> str:
    lines = ["| metric | orchestrator | bare relay | ratio | target |", "|---|---:|---:|---:|---|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(summary)]
    m = info["machine"]
    lines += ["", f"{info['runs']} runs x {info['workflows']} workflows per phase, prefetch {info['prefetch']}; "
              f"{m['nproc']} x {m['cpu']}, {m['ram_gib']} GiB RAM, Linux {m['kernel']}, Python {m['python']}, "
              f"RabbitMQ {info['rabbitmq']}, PostgreSQL {info['postgres']}."]
    return "\n".join(lines) + "\n"


# ---- main ------------------------------------------------------------------------------------
async def versions(conn: AbstractRobustConnection, database_url: str) -> tuple[str, str]:
    import asyncpg

    props = conn.transport.connection.server_properties if conn.transport else {}
    rabbit = props.get("version", "?")
    pg = await asyncpg.connect(database_url)
    try:
        postgres = str(await pg.fetchval("SHOW server_version")).split()[0]
    finally:
        await pg.close()
    return (rabbit.decode() if isinstance(rabbit, bytes) else str(rabbit)), postgres


async def amain(args: argparse.Namespace) -> int:
    conn = await aio_pika.connect_robust(args.amqp_url, client_properties={"connection_name": "bench-load"})
    try:
        rabbit, postgres = await versions(conn, args.database_url)
        info = {"machine": machine(), "rabbitmq": rabbit, "postgres": postgres, "runs": args.runs,
                "workflows": args.workflows, "prefetch": args.prefetch, "warmup": args.warmup,
                "orchestrator_src": str(args.orchestrator_src) if args.orchestrator_src else "installed"}
        console.print(f"[bold]workflow-orchestrator benchmark[/bold]: {info}")
        results: list[dict[str, Any]] = []
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("{task.fields[rate]}"), TimeElapsedColumn())
        with Progress(*columns, console=console, refresh_per_second=4) as progress:
            for i in range(args.runs):
                results.append(await one_run(i, args, conn, progress))
            profiled = None
            if args.profile is not None:
                args.profile.mkdir(parents=True, exist_ok=True)
                profiled = await one_run(0, args, conn, progress, spy_dir=args.profile)
        output: dict[str, Any] = {"info": info, "runs": results}
        if results:
            output["summary"] = summary = summarise(results)
            print_table(summary, len(results))
            if args.markdown:
                args.markdown.write_text(markdown(summary, info))
        if profiled is not None:
            output["profile"] = profiled
            for system in ("orchestrator", "relay"):
                console.print(f"profile of the {system}: {profiled[system]['profile']} "
                              f"(collapsed stacks: {args.profile / (system + '.folded')})")
        if args.json:
            args.json.write_text(json.dumps(output, indent=2))
    finally:
        await conn.close()
    return 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workflows", type=int, default=400, help="workflows per measured phase (default 400)")
    p.add_argument("--runs", type=int, default=3, help="runs; the report is the median (default 3)")
    p.add_argument("--json", type=Path, help="write every figure of every run here")
    p.add_argument("--markdown", type=Path, help="write the results table here (Markdown)")
    p.add_argument("--profile", type=Path, metavar="DIR",
                   help="after the runs, profile each system's peak phase with py-spy into DIR")
    p.add_argument("--prefetch", type=int, default=32, help="PREFETCH of the orchestrator and the relay")
    p.add_argument("--warmup", type=int, default=20, help="unmeasured workflows before each system's phases")
    p.add_argument("--phase-timeout", type=float, default=300.0, help="seconds a phase may take")
    p.add_argument("--idle-cores", type=float, default=0.3,
                   help="before each phase, wait until other work uses fewer cores than this")
    p.add_argument("--idle-wait", type=float, default=300.0, help="seconds to wait for that at most")
    p.add_argument("--sandbox-pool", type=int, default=10, help="SANDBOX_POOL_SIZE of the sandbox Manager")
    p.add_argument("--keep-logs", action="store_true", help="keep each run's folder (process logs, seed)")
    p.add_argument("--log-level", default="warning", choices=("debug", "info", "warning", "error"),
                   help="LOG_LEVEL of the orchestrator (info logs every message: slower)")
    p.add_argument("--orchestrator-src", type=Path, metavar="DIR",
                   help="run the orchestrator from this source folder (e.g. a patched copy of src/) instead of "
                        "the installed package")
    p.add_argument("--amqp-url", default=os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672/"),
                   help="RabbitMQ (env BENCH_AMQP_URL)")
    p.add_argument("--database-url",
                   default=os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres"),
                   help="Postgres admin URL: a database per run is created and dropped (env BENCH_DATABASE_URL)")
    args = p.parse_args()
    if args.orchestrator_src is not None:
        args.orchestrator_src = args.orchestrator_src.resolve()
    if args.workflows < 1 or args.runs < 0 or (args.runs == 0 and args.profile is None):
        p.error("--workflows must be ≥ 1, and --runs ≥ 1 unless --profile is given")
    try:
        return asyncio.run(amain(args))
    except (BenchError, TimeoutError) as exc:
        console.print(f"[red]error:[/red] {exc}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
