"""fedagent benchmark: a federated spawn next to a bare Temporal workflow, on the embedded stack.

    .venv/bin/python bench/run.py                       # default sizes, ~2-3 minutes
    .venv/bin/python bench/run.py --sequential 50 --total 200 --in-flight 20 --json out.json

In one run, on one Temporal dev server and PostgreSQL (cli.devstack.DevStack, free loopback
ports, a temporary data dir, two instances hub and spoke, one worker process each):

- bare: a workflow with one activity (start -> result), its worker in this process;
- federated: REST spawn on hub of a scripted agent on spoke that runs one trivial command,
  until hub's REST API shows it `completed`;
  each sequentially (p50/p99) and as throughput with many in flight;
- REST spawn ack latency (POST /agents/spawn -> 202);
- kill latency (POST /agents/{id}/kill -> answer, which comes once the sandbox is gone; the
  script checks that the sandboxed process is gone by then);
- sandbox start cost of each sandbox agents.sandbox offers (start + first command + kill).

Then it compares against the goals and, for what misses, shows where the time goes from the
workflow histories (workflow tasks and activity round trips per spawn, and a timeline).
No timing here is asserted by the tests: this is a measurement, not a check.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import asyncpg  # noqa: E402
import httpx  # noqa: E402
from bare import BenchBareWorkflow, bench_echo  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from temporalio.api.enums.v1 import EventType  # noqa: E402
from temporalio.client import Client, WorkflowFailureError  # noqa: E402
from temporalio.service import RPCError, RPCStatusCode  # noqa: E402
from temporalio.worker import Worker  # noqa: E402

from cli.devstack import DevStack, free_port_block  # noqa: E402

TERMINAL = {"completed", "failed", "killed", "timed_out"}
API = "/api/v1/federation"
console = Console(highlight=False)


# --- figures -------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Series:
    name: str
    ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float]:
        if not self.ms:
            return {}
        return {
            "n": len(self.ms),
            "p50": percentile(self.ms, 50),
            "p99": percentile(self.ms, 99),
            "mean": statistics.fmean(self.ms),
            "min": min(self.ms),
            "max": max(self.ms),
        }


@dataclass
class Throughput:
    name: str
    count: int
    in_flight: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.count / self.seconds if self.seconds else 0.0


@dataclass
class Results:
    series: dict[str, Series] = field(default_factory=dict)
    throughput: dict[str, Throughput] = field(default_factory=dict)
    sandboxes: dict[str, dict[str, Any]] = field(default_factory=dict)
    breakdown: dict[str, Any] = field(default_factory=dict)
    environment: dict[str, Any] = field(default_factory=dict)

    def add(self, name: str, ms: float) -> None:
        self.series.setdefault(name, Series(name)).ms.append(ms)


def fmt_ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f} ms"


# --- stack ---------------------------------------------------------------------------------------


class Peer:
    def __init__(self, info: dict[str, Any], http: httpx.AsyncClient) -> None:
        self.info = info
        self.url = info["apiUrl"]
        self.http = http
        self.auth = {"Authorization": f"Bearer {info['adminToken']}"}

    async def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return await self.http.request(
            method, f"{self.url}{API}{path}", headers=self.auth, **kwargs
        )

    async def temporal(self) -> Client:
        return await Client.connect(self.info["temporalAddress"], namespace=self.info["namespace"])


async def connect(hub: Peer, spoke: Peer) -> str:
    response = await hub.call("POST", "/connections", json={"remoteUrl": spoke.url})
    response.raise_for_status()
    connection_id = str(response.json()["connectionId"])
    response = await spoke.call("POST", f"/connections/{connection_id}/accept")
    response.raise_for_status()
    return connection_id


def spawn_body(connection_id: str, instructions: str, task_id: str) -> dict[str, Any]:
    return {
        "agentId": str(uuid.uuid4()),
        "connectionId": connection_id,
        "taskId": task_id,
        "agentType": "worker",
        "context": {"repository": None, "workItems": [], "instructions": instructions},
        "options": {"timeout": 120, "maxRetries": 0},
    }


# --- bare Temporal -------------------------------------------------------------------------------


async def bare_once(client: Client, task_queue: str, value: int) -> float:
    started = time.perf_counter()
    result = await client.execute_workflow(
        BenchBareWorkflow.run, value, id=f"bench-bare/{uuid.uuid4()}", task_queue=task_queue
    )
    assert result == value
    return (time.perf_counter() - started) * 1000


async def run_limited(total: int, in_flight: int, one: Callable[[int], Awaitable[None]]) -> float:
    gate = asyncio.Semaphore(in_flight)

    async def slot(i: int) -> None:
        async with gate:
            await one(i)

    started = time.perf_counter()
    await asyncio.gather(*(slot(i) for i in range(total)))
    return time.perf_counter() - started


# --- federated -----------------------------------------------------------------------------------


async def spawn_and_wait(
    hub: Peer, body: dict[str, Any], results: Results, *, poll: float = 0.02
) -> tuple[float, float, dict[str, Any]]:
    """REST spawn -> completed on hub (polling GET); returns (ack ms, total ms, agent)."""
    started = time.perf_counter()
    response = await hub.call("POST", "/agents/spawn", json=body)
    ack = (time.perf_counter() - started) * 1000
    if response.status_code != 202:
        raise RuntimeError(f"spawn refused: {response.status_code} {response.text}")
    while True:
        agent = (await hub.call("GET", f"/agents/{body['agentId']}")).json()
        if agent["state"] in TERMINAL:
            total = (time.perf_counter() - started) * 1000
            if agent["state"] != "completed":
                raise RuntimeError(f"agent ended {agent['state']}: {agent.get('error')}")
            return ack, total, agent
        await asyncio.sleep(poll)


async def wait_running_command(hub: Peer, agent_id: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        agent = (await hub.call("GET", f"/agents/{agent_id}")).json()
        progress = agent.get("progress") or {}
        if agent["state"] == "running" and progress.get("command"):
            return
        if agent["state"] in TERMINAL or time.monotonic() > deadline:
            raise RuntimeError(f"agent {agent_id} never ran its command: {agent}")
        await asyncio.sleep(0.02)


async def wait_workflow_closed(client: Client, workflow_id: str, timeout: float = 300) -> None:
    """Wait for a workflow to close; the spawn outbox may not have started it yet."""
    deadline = time.monotonic() + timeout
    handle = client.get_workflow_handle(workflow_id)
    while True:
        try:
            await asyncio.wait_for(handle.result(), timeout=max(0.1, deadline - time.monotonic()))
            return
        except WorkflowFailureError:
            return  # closed: a failed agent ends its workflow Failed
        except RPCError as exc:
            if exc.status != RPCStatusCode.NOT_FOUND or time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.02)


async def requester_lag(hub: Peer, spoke: Peer, task_prefix: str) -> list[float]:
    """ms from the executor recording a run's final state to the requester's projection
    showing it (both clocks are this machine's)."""
    rows: dict[str, dict[str, Any]] = {}
    for who, peer in (("requester", hub), ("executor", spoke)):
        conn = await asyncpg.connect(peer.info["databaseUrl"])
        try:
            for r in await conn.fetch(
                "SELECT agent_id, finished_at FROM agents WHERE role = $1 AND task_id LIKE $2"
                " AND finished_at IS NOT NULL",
                who,
                f"{task_prefix}%",
            ):
                rows.setdefault(str(r["agent_id"]), {})[who] = r["finished_at"]
        finally:
            await conn.close()
    return [
        max(0.0, (r["requester"] - r["executor"]).total_seconds() * 1000)
        for r in rows.values()
        if "requester" in r and "executor" in r
    ]


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if marker in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(int(entry.name))
    return found


class CpuMeter:
    """CPU seconds used by each process of the stack (and this one), so a throughput phase
    can say how much CPU one run costs and where."""

    TICK = os.sysconf("SC_CLK_TCK")

    def __init__(self, stack: DevStack) -> None:
        self.data_dir = str(stack.data_dir)
        self.pids: dict[str, int] = {"bench (this process)": os.getpid()}
        temporal = getattr(stack, "_temporal", None)
        if temporal is not None:
            self.pids["temporal server"] = temporal.pid
        for name, inst in stack.instances.items():
            if inst.api is not None:
                self.pids[f"{name} api"] = inst.api.pid
            for i, worker in enumerate(inst.workers, 1):
                self.pids[f"{name} worker{'' if len(inst.workers) == 1 else i}"] = worker.pid

    def _postgres_pids(self) -> list[int]:
        """This stack's PostgreSQL: its postmaster (whose -D is in the data dir) and its live
        backends; backends that ended are in the postmaster's children CPU."""
        postmaster = None
        parents: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() != "postgres":
                    continue
                pid = int(entry.name)
                parents[pid] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if self.data_dir in (entry / "cmdline").read_bytes().decode(errors="replace"):
                    postmaster = pid
        if postmaster is None:
            return []
        return [postmaster, *(pid for pid, parent in parents.items() if parent == postmaster)]

    def _cpu(self, pid: int) -> float:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return 0.0
        # utime, stime, and the waited-for children (sandboxes, git) cutime, cstime
        return sum(int(fields[i]) for i in (11, 12, 13, 14)) / self.TICK

    def snapshot(self) -> dict[str, float]:
        taken = {name: self._cpu(pid) for name, pid in self.pids.items()}
        postgres = self._postgres_pids()
        # Live backends are counted on their own; the postmaster's own time plus what it reaped.
        taken["postgresql"] = sum(self._cpu(pid) for pid in postgres)
        return taken

    @staticmethod
    def per_run(before: dict[str, float], after: dict[str, float], runs: int) -> dict[str, float]:
        return {
            name: (after[name] - before.get(name, 0.0)) * 1000 / runs
            for name in after
            if after[name] - before.get(name, 0.0) > 0
        }


def metric_counts(text: str, name: str, label: str) -> dict[str, float]:
    """Sum of one Prometheus counter by one label, from a /metrics page."""
    from prometheus_client.parser import text_string_to_metric_families

    found: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                key = sample.labels.get(label, "")
                found[key] = found.get(key, 0.0) + sample.value
    return found


# --- sandboxes -----------------------------------------------------------------------------------


async def measure_sandboxes(runs: int, results: Results, workdir: Path) -> None:
    try:
        from agents.runtime import SANDBOXES, RuntimeConfig, make_sandbox
    except ImportError as exc:
        results.sandboxes["all"] = {"skipped": f"agents.runtime unavailable: {exc}"}
        return
    from agents.sandbox.base import SandboxError

    for kind in SANDBOXES:
        starts: list[float] = []
        firsts: list[float] = []
        kills: list[float] = []
        try:
            for i in range(runs):
                sandbox = make_sandbox(RuntimeConfig(sandbox=kind), workdir / f"{kind}-{i}")
                t0 = time.perf_counter()
                await sandbox.start()
                t1 = time.perf_counter()
                probe = await sandbox.run("true", timeout=30)
                t2 = time.perf_counter()
                await sandbox.kill()
                t3 = time.perf_counter()
                if probe.exit_code != 0:
                    raise SandboxError(f"`true` exited {probe.exit_code}: {probe.output}")
                starts.append((t1 - t0) * 1000)
                firsts.append((t2 - t1) * 1000)
                kills.append((t3 - t2) * 1000)
        except (SandboxError, OSError) as exc:
            reason = str(exc).split(". ")[0]
            results.sandboxes[kind] = {"skipped": reason}
            console.print(f"  sandbox {kind}: [yellow]skipped[/] ({reason})")
            continue
        figures = {
            "runs": runs,
            "startP50": percentile(starts, 50),
            "firstCommandP50": percentile(firsts, 50),
            "killP50": percentile(kills, 50),
            "startPlusFirstP50": percentile(
                [a + b for a, b in zip(starts, firsts, strict=True)], 50
            ),
        }
        results.sandboxes[kind] = figures
        console.print(
            f"  sandbox {kind}: start {fmt_ms(figures['startP50'])}, first command "
            f"{fmt_ms(figures['firstCommandP50'])}, kill {fmt_ms(figures['killP50'])} "
            f"(p50 of {runs})"
        )


async def measure_runtime(doc: dict[str, Any], results: Results) -> float | None:
    """The agent runtime alone (workspace, sandbox, scripted loop, diff) for `$ true`, no
    Temporal and no network: the floor of the run_agent activity."""
    try:
        from agents.runtime import RuntimeConfig, run_agent_task
    except ImportError:
        return None
    workdir = Path(tempfile.mkdtemp(prefix="fedagent-bench-runtime-"))
    times = []
    try:
        for i in range(5):
            started = time.perf_counter()
            report = await run_agent_task(
                workspace=workdir / str(i),
                agent_type="worker",
                context={"instructions": "$ true", "workItems": []},
                config=RuntimeConfig(),
            )
            times.append((time.perf_counter() - started) * 1000)
            if not report.success:
                return None
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return percentile(times, 50)


# --- held load -----------------------------------------------------------------------------------

HELD_SLEEP = 20_000  # seconds a held agent sleeps unless --held-sleep says otherwise


def _children() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    return children


def _pss_kb(pid: int) -> int:
    """Proportional set size: shared pages split among the processes that map them."""
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def stack_memory_mb(cpu: CpuMeter) -> dict[str, float]:
    """PSS of each process of the stack with everything it started (sandboxes, backends)."""
    children = _children()
    roots = {name: pid for name, pid in cpu.pids.items() if not name.startswith("bench")}
    postgres = cpu._postgres_pids()
    if postgres:
        roots["postgresql"] = postgres[0]
    found: dict[str, float] = {}
    for name, root in roots.items():
        todo, total = [root], 0
        while todo:
            pid = todo.pop()
            total += _pss_kb(pid)
            todo.extend(children.get(pid, []))
        found[name] = total / 1024
    return found


async def temporal_actions(stack: DevStack, http: httpx.AsyncClient) -> float | None:
    """The dev server's `action` counter (what Temporal Cloud bills: workflow and activity
    starts, signals, timers, heartbeats...), summed over namespaces."""
    port = getattr(stack, "_temporal_extra_ports", None)
    if port is None:
        return None
    try:
        page = (await http.get(f"http://127.0.0.1:{port + 1}/metrics")).text
    except httpx.HTTPError:
        return None
    counts = metric_counts(page, "action_total", "namespace") or metric_counts(
        page, "action", "namespace"
    )
    return sum(counts.values()) if counts else None


async def peer_messages(peers: tuple[Peer, ...]) -> float:
    """Signed peer requests both instances received so far (from their /metrics)."""
    total = 0.0
    for peer in peers:
        page = (await peer.http.get(f"{peer.url}/metrics")).text
        counts = metric_counts(page, "fedagent_http_request_duration_seconds_count", "route")
        total += sum(v for route, v in counts.items() if "/incoming/" in route)
    return total


async def count_running(hub: Peer, spoke: Peer, task: str) -> int:
    """Held agents whose command runs on spoke; raises when one ended already."""
    conn = await asyncpg.connect(spoke.info["databaseUrl"])
    try:
        running = int(
            await conn.fetchval(
                "SELECT count(*) FROM agents WHERE role = 'executor' AND task_id = $1"
                " AND state = 'running' AND progress ->> 'command' IS NOT NULL",
                task,
            )
        )
    finally:
        await conn.close()
    conn = await asyncpg.connect(hub.info["databaseUrl"])
    try:
        ended = await conn.fetchrow(
            "SELECT state, error FROM agents WHERE role = 'requester' AND task_id = $1"
            " AND state = ANY($2::text[])",
            task,
            list(TERMINAL),
        )
    finally:
        await conn.close()
    if ended is not None:
        raise RuntimeError(f"a held agent ended {ended['state']}: {ended['error']}")
    return running


async def spawn_held(hub: Peer, connection_id: str, task: str, count: int, sleep: int) -> list[str]:
    """Spawn `count` agents that each run `$ sleep`; answers their ids."""
    ids: list[str] = []
    gate = asyncio.Semaphore(20)

    async def one(_: int) -> None:
        async with gate:
            body = spawn_body(connection_id, f"$ sleep {sleep}", task)
            body["options"]["timeout"] = sleep + 300
            response = await hub.call("POST", "/agents/spawn", json=body)
            if response.status_code != 202:
                raise RuntimeError(f"spawn refused: {response.status_code} {response.text}")
            ids.append(body["agentId"])

    await asyncio.gather(*(one(i) for i in range(count)))
    return ids


async def end_held(hub: Peer, ids: list[str], *, kill: bool) -> Counter[str]:
    """Kill the held agents (or wait for them to complete); answers their final states."""
    gate = asyncio.Semaphore(20)
    states: Counter[str] = Counter()

    async def one(agent_id: str) -> None:
        async with gate:
            if kill:
                await hub.call("POST", f"/agents/{agent_id}/kill")
            while True:
                agent = (await hub.call("GET", f"/agents/{agent_id}")).json()
                if agent["state"] in TERMINAL:
                    states[agent["state"]] += 1
                    return
                await asyncio.sleep(1.0)

    await asyncio.gather(*(one(i) for i in ids))
    return states


async def short_spawns(hub: Peer, connection_id: str, results: Results, name: str) -> None:
    task = f"bench-short-{uuid.uuid4().hex[:6]}"
    for _ in range(3):
        _, total, _ = await spawn_and_wait(
            hub, spawn_body(connection_id, "$ true", task), results, poll=0.05
        )
        results.add(name, total)


async def bench_held(
    stack: DevStack,
    hub: Peer,
    spoke: Peer,
    connection_id: str,
    args: argparse.Namespace,
    results: Results,
    cpu: CpuMeter,
) -> None:
    n, window = args.held, args.held_window
    console.print(f"\n[bold]held load[/] ({n} agents running `$ sleep` at once, {window} s window)")
    await short_spawns(hub, connection_id, results, "shortUnloaded")
    memory_before = stack_memory_mb(cpu)
    task = f"bench-held-{uuid.uuid4().hex[:6]}"
    sleep = args.held_sleep or HELD_SLEEP
    started = time.monotonic()
    ids = await spawn_held(hub, connection_id, task, n, sleep)
    deadline = time.monotonic() + 120 + n
    while (running := await count_running(hub, spoke, task)) < n:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {running} of {n} held agents running")
        await asyncio.sleep(1.0)
    ramp = time.monotonic() - started
    console.print(f"  {n} running after {ramp:.0f} s; settling 5 s, then measuring {window} s")
    await asyncio.sleep(5)
    before = (
        cpu.snapshot(),
        await temporal_actions(stack, hub.http),
        await peer_messages((hub, spoke)),
    )
    await asyncio.sleep(window)
    after = (
        cpu.snapshot(),
        await temporal_actions(stack, hub.http),
        await peer_messages((hub, spoke)),
    )
    memory_held = stack_memory_mb(cpu)
    await short_spawns(hub, connection_id, results, "shortHeld")
    states = await end_held(hub, ids, kill=not args.held_sleep)
    agent_seconds = n * window
    held: dict[str, Any] = {
        "agents": n,
        "windowSeconds": window,
        "rampSeconds": ramp,
        "cpuMsPerAgentSecond": {
            k: v * 1000 / agent_seconds for k, v in _delta(before[0], after[0]).items()
        },
        "coresAtRest": sum(_delta(before[0], after[0]).values()) / window,
        "memoryMbPerAgent": {
            k: (memory_held.get(k, 0.0) - memory_before.get(k, 0.0)) / n for k in memory_held
        },
        "temporalActionsPerAgentMinute": (
            None
            if before[1] is None or after[1] is None
            else (after[1] - before[1]) * 60 / agent_seconds
        ),
        "peerMessagesPerAgentMinute": (after[2] - before[2]) * 60 / agent_seconds,
        "finalStates": dict(states),
    }
    results.breakdown["held"] = held
    report_held(held, results)


def _delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {
        name: after[name] - before.get(name, 0.0)
        for name in after
        if not name.startswith("bench") and after[name] - before.get(name, 0.0) > 0
    }


def report_held(held: dict[str, Any], results: Results) -> None:
    table = Table(title=f"held load: {held['agents']} agents running", header_style="bold")
    for column in ("process", "CPU ms per agent-second", "MB per agent"):
        table.add_column(column, justify="left" if column == "process" else "right")
    cpu, memory = held["cpuMsPerAgentSecond"], held["memoryMbPerAgent"]
    for name in sorted(set(cpu) | set(memory)):
        table.add_row(name, f"{cpu.get(name, 0.0):.3f}", f"{memory.get(name, 0.0):.2f}")
    table.add_row("total", f"{sum(cpu.values()):.3f}", f"{sum(memory.values()):.2f}")
    console.print(table)
    actions = held["temporalActionsPerAgentMinute"]
    short = {k: results.series[k].summary() for k in ("shortUnloaded", "shortHeld")}
    console.print(
        f"  at rest: {held['coresAtRest']:.2f} cores over all processes; Temporal actions "
        f"{'—' if actions is None else f'{actions:.1f}'} and peer messages "
        f"{held['peerMessagesPerAgentMinute']:.2f} per agent-minute"
    )
    console.print(
        f"  a short `$ true` spawn -> completed: p50 {fmt_ms(short['shortHeld']['p50'])} while "
        f"they run, {fmt_ms(short['shortUnloaded']['p50'])} before "
        f"({short['shortHeld']['p50'] / short['shortUnloaded']['p50']:.2f}x)"
    )
    console.print(f"  final states: {held['finalStates']}")


# --- where the time goes -------------------------------------------------------------------------


def _event_name(event: Any) -> str:
    return EventType.Name(event.event_type).removeprefix("EVENT_TYPE_")


def _activity_names(events: list[Any]) -> dict[int, str]:
    names = {}
    for event in events:
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            names[event.event_id] = (
                event.activity_task_scheduled_event_attributes.activity_type.name
            )
    return names


async def history_report(client: Client, workflow_id: str) -> dict[str, Any]:
    handle = client.get_workflow_handle(workflow_id)
    with contextlib.suppress(Exception):  # the whole run, up to its last event
        await wait_workflow_closed(client, workflow_id, timeout=60)
    history = await handle.fetch_history()
    events = list(history.events)
    history_bytes = sum(e.ByteSize() for e in events)
    counts = Counter(_event_name(e) for e in events)
    start = events[0].event_time.ToDatetime()
    names = _activity_names(events)
    timeline: list[dict[str, Any]] = []
    for event in events:
        name = _event_name(event)
        detail = ""
        if name.startswith("ACTIVITY_TASK_"):
            attrs = event.WhichOneof("attributes") or ""
            scheduled = (
                event.event_id
                if name == "ACTIVITY_TASK_SCHEDULED"
                else getattr(getattr(event, attrs), "scheduled_event_id", 0)
            )
            detail = names.get(scheduled, "")
        elif name == "WORKFLOW_EXECUTION_SIGNALED":
            detail = event.workflow_execution_signaled_event_attributes.signal_name
        elif name.startswith("WORKFLOW_EXECUTION_UPDATE"):
            detail = "update"
        at = (event.event_time.ToDatetime() - start).total_seconds() * 1000
        timeline.append({"ms": round(at, 1), "event": name, "detail": detail})
    # Events are numbered when written: a started activity is written with its completion.
    timeline.sort(key=lambda row: row["ms"])
    return {
        "workflowId": workflow_id,
        "events": len(events),
        "historyBytes": history_bytes,
        "workflowTasks": counts["WORKFLOW_TASK_COMPLETED"],
        "activities": counts["ACTIVITY_TASK_SCHEDULED"],
        "signals": counts["WORKFLOW_EXECUTION_SIGNALED"],
        "updates": counts["WORKFLOW_EXECUTION_UPDATE_ACCEPTED"],
        "durationMs": timeline[-1]["ms"] if timeline else 0.0,
        "timeline": timeline,
    }


def _activity_ms(report: dict[str, Any], name: str) -> float | None:
    """Scheduled -> completed of the first activity called `name` in a timeline."""
    scheduled = completed = None
    for row in report["timeline"]:
        if row["detail"] != name:
            continue
        if row["event"] == "ACTIVITY_TASK_SCHEDULED" and scheduled is None:
            scheduled = row["ms"]
        elif row["event"] == "ACTIVITY_TASK_COMPLETED" and completed is None:
            completed = row["ms"]
    if scheduled is None or completed is None:
        return None
    return float(completed - scheduled)


def print_timeline(title: str, report: dict[str, Any]) -> None:
    console.print(
        f"\n[bold]{title}[/] {report['workflowId']}: {report['workflowTasks']} workflow tasks, "
        f"{report['activities']} activities, {report['signals']} signals, "
        f"{report['updates']} updates, {report['events']} events, "
        f"{report['durationMs']:.0f} ms first to last event"
    )
    previous = 0.0
    for row in report["timeline"]:
        if row["event"].startswith("WORKFLOW_TASK_SCHEDULED") or row["event"] == "MARKER_RECORDED":
            continue
        gap = row["ms"] - previous
        previous = row["ms"]
        console.print(
            f"  {row['ms']:8.1f} ms  (+{gap:6.1f})  {row['event'].lower()}"
            + (f"  [dim]{row['detail']}[/]" if row["detail"] else "")
        )


# --- the run -------------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> Results:
    results = Results()
    data_dir = Path(tempfile.mkdtemp(prefix="fedagent-bench-"))
    base = free_port_block(2)
    temporal_port = free_port_block(2)
    in_flight = args.in_flight
    stack = DevStack(
        ["hub", "spoke"],
        data_dir,
        base_port=base,
        temporal_port=temporal_port,
        ui_port=temporal_port + 1,
        workers_per_instance=args.workers,
        extra_env={
            "FEDAGENT_LOG_LEVEL": "warning",
            # Measure orchestration, not the capacity limits: every spawn in flight may run.
            "FEDAGENT_MAX_CONCURRENT_AGENTS": str(max(8, in_flight) + args.held),
            "FEDAGENT_MAX_RUNNING_AGENTS": str(max(64, in_flight * 2) + args.held),
            "FEDAGENT_PEER_MAX_RUNNING_AGENTS": str(max(8, in_flight) + args.held),
            # A held `$ sleep` outlives the default command timeout.
            "FEDAGENT_COMMAND_TIMEOUT": str((args.held_sleep or HELD_SLEEP) + 60),
            **({"FEDAGENT_SANDBOX": args.sandbox} if args.sandbox else {}),
            **dict(item.split("=", 1) for item in args.env),
        },
    )
    results.environment = {
        "cpus": os.cpu_count(),
        "loadAverageAtStart": os.getloadavg()[0],
        "python": sys.version.split()[0],
        "workersPerInstance": args.workers,
        "sandbox": args.sandbox or os.environ.get("FEDAGENT_SANDBOX") or "default (bwrap)",
        "env": args.env,
    }
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        console.print(
            f"[yellow]load average {load:.1f} on {os.cpu_count()} CPUs: other work competes "
            "with the benchmark; its figures will be noisy[/]"
        )
    console.print(f"starting the embedded stack in {data_dir} ...")
    started = time.monotonic()
    try:
        doc = await stack.start()
        console.print(f"stack up in {time.monotonic() - started:.1f} s")
        async with httpx.AsyncClient(timeout=120.0) as http:
            hub = Peer(doc["instances"]["hub"], http)
            spoke = Peer(doc["instances"]["spoke"], http)
            connection_id = await connect(hub, spoke)
            hub_client = await hub.temporal()
            spoke_client = await spoke.temporal()
            bare_queue = f"bench-bare-{uuid.uuid4().hex[:8]}"
            cpu = CpuMeter(stack)
            async with Worker(
                hub_client,
                task_queue=bare_queue,
                workflows=[BenchBareWorkflow],
                activities=[bench_echo],
                max_concurrent_workflow_tasks=100,
                max_concurrent_activities=100,
            ):
                if not args.held_only:
                    await bench_bare(hub_client, bare_queue, args, results, cpu)
                    await bench_federated(hub, spoke, connection_id, args, results, cpu)
                    await bench_kill(hub, connection_id, args, results, spoke_client, doc)
                    await explain(
                        hub_client, spoke_client, doc, connection_id, bare_queue, hub, results
                    )
                if args.held:
                    await bench_held(stack, hub, spoke, connection_id, args, results, cpu)
        if not args.held_only:
            console.print("\n[bold]sandbox start cost[/]")
            await measure_sandboxes(args.sandbox_runs, results, data_dir / "sandbox-bench")
    finally:
        stack.stop()
        if args.keep:
            console.print(f"kept {data_dir}")
        else:
            shutil.rmtree(data_dir, ignore_errors=True)
    return results


async def bench_bare(
    client: Client, queue: str, args: argparse.Namespace, results: Results, cpu: CpuMeter
) -> None:
    console.print("\n[bold]bare Temporal workflow[/] (one activity, start -> result)")
    for i in range(args.warmup):
        await bare_once(client, queue, -i)
    for i in range(args.sequential):
        results.add("bare", await bare_once(client, queue, i))
        started = time.perf_counter()
        handle = await client.start_workflow(
            BenchBareWorkflow.run, i, id=f"bench-bare/{uuid.uuid4()}", task_queue=queue
        )
        results.add("temporalStart", (time.perf_counter() - started) * 1000)
        await handle.result()
    console.print(f"  sequential: p50 {fmt_ms(results.series['bare'].summary()['p50'])}")

    async def one(i: int) -> None:
        await bare_once(client, queue, i)

    before = cpu.snapshot()
    seconds = await run_limited(args.total, args.in_flight, one)
    results.breakdown["cpuPerRunBare"] = cpu.per_run(before, cpu.snapshot(), args.total)
    results.throughput["bare"] = Throughput("bare", args.total, args.in_flight, seconds)
    console.print(
        f"  throughput: {args.total / seconds:,.1f}/s "
        f"({args.total} with {args.in_flight} in flight)"
    )


async def bench_federated(
    hub: Peer,
    spoke: Peer,
    connection_id: str,
    args: argparse.Namespace,
    results: Results,
    cpu: CpuMeter,
) -> None:
    console.print(
        "\n[bold]federated spawn[/] (REST spawn on hub -> completed on hub, `$ true` on spoke)"
    )
    task = f"bench-seq-{uuid.uuid4().hex[:6]}"
    for _ in range(args.warmup):
        await spawn_and_wait(hub, spawn_body(connection_id, "$ true", task), results)
    for _ in range(args.sequential):
        ack, total, _ = await spawn_and_wait(
            hub, spawn_body(connection_id, "$ true", task), results
        )
        results.add("spawnAck", ack)
        results.add("federated", total)
    console.print(
        f"  sequential: p50 {fmt_ms(results.series['federated'].summary()['p50'])}, "
        f"ack p50 {fmt_ms(results.series['spawnAck'].summary()['p50'])}"
    )
    task = f"bench-tput-{uuid.uuid4().hex[:6]}"
    pages_before = [(await p.http.get(f"{p.url}/metrics")).text for p in (hub, spoke)]
    cpu_before = cpu.snapshot()
    hub_client = await hub.temporal()

    async def one(i: int) -> None:
        body = spawn_body(connection_id, "$ true", task)
        started = time.perf_counter()
        response = await hub.call("POST", "/agents/spawn", json=body)
        results.add("spawnAckLoaded", (time.perf_counter() - started) * 1000)
        if response.status_code != 202:
            raise RuntimeError(f"spawn refused: {response.status_code} {response.text}")
        # Many in flight: wait on the requester's workflow (a long poll, no API load), which
        # ends right after it applied the final event; then read the state once.
        await wait_workflow_closed(hub_client, f"remote-agent/{body['agentId']}")
        agent = (await hub.call("GET", f"/agents/{body['agentId']}")).json()
        if agent["state"] != "completed":
            raise RuntimeError(f"agent ended {agent['state']}: {agent.get('error')}")

    seconds = await run_limited(args.total, args.in_flight, one)
    results.breakdown["cpuPerRunFederated"] = cpu.per_run(cpu_before, cpu.snapshot(), args.total)
    pages_after = [(await p.http.get(f"{p.url}/metrics")).text for p in (hub, spoke)]
    requests: dict[str, float] = {}
    for who, before, after in zip(("hub", "spoke"), pages_before, pages_after, strict=True):
        name = "fedagent_http_request_duration_seconds_count"
        old = metric_counts(before, name, "route")
        for route, count in metric_counts(after, name, "route").items():
            if route.startswith("/api/v1/federation/incoming/"):
                per = (count - old.get(route, 0.0)) / args.total
                requests[f"{who} {route.removeprefix('/api/v1/federation')}"] = per
    results.breakdown["peerRequestsPerSpawn"] = requests
    results.throughput["federated"] = Throughput("federated", args.total, args.in_flight, seconds)
    for ms in await requester_lag(hub, spoke, "bench-seq-"):
        results.add("requesterLag", ms)
    for ms in await requester_lag(hub, spoke, "bench-tput-"):
        results.add("requesterLagLoaded", ms)
    console.print(
        f"  throughput: {args.total / seconds:,.1f}/s "
        f"({args.total} with {args.in_flight} in flight)"
    )


async def bench_kill(
    hub: Peer,
    connection_id: str,
    args: argparse.Namespace,
    results: Results,
    spoke_client: Client,
    doc: dict[str, Any],
) -> None:
    console.print(
        "\n[bold]kill[/] (POST kill -> answer; the sandboxed `sleep` must be gone by then)"
    )
    task = f"bench-kill-{uuid.uuid4().hex[:6]}"
    survivors = 0
    last_agent = ""
    for i in range(args.kills):
        marker = f"{300 + i}.{random.randint(1000, 9999)}"
        body = spawn_body(connection_id, f"$ sleep {marker}", task)
        response = await hub.call("POST", "/agents/spawn", json=body)
        response.raise_for_status()
        await wait_running_command(hub, body["agentId"])
        for _ in range(100):  # the command is reported before its process exists
            if processes_with(f"sleep {marker}"):
                break
            await asyncio.sleep(0.01)
        started = time.perf_counter()
        answer = await hub.call("POST", f"/agents/{body['agentId']}/kill")
        elapsed = (time.perf_counter() - started) * 1000
        answer.raise_for_status()
        if processes_with(f"sleep {marker}"):
            survivors += 1
        if answer.json()["state"] != "killed":
            raise RuntimeError(f"kill answered {answer.json()}")
        results.add("kill", elapsed)
        last_agent = body["agentId"]
    summary = results.series["kill"].summary()
    console.print(
        f"  p50 {fmt_ms(summary['p50'])}, p99 {fmt_ms(summary['p99'])}; sandbox still there "
        f"after the answer: {survivors} of {args.kills}"
    )
    results.breakdown["killSurvivors"] = survivors
    hub_id = doc["instances"]["hub"]["instanceId"]
    results.breakdown["kill"] = {
        "requester": await history_report(await hub.temporal(), f"remote-agent/{last_agent}"),
        "executor": await history_report(spoke_client, f"agent-run/{hub_id}/{last_agent}"),
    }


async def explain(
    hub_client: Client,
    spoke_client: Client,
    doc: dict[str, Any],
    connection_id: str,
    bare_queue: str,
    hub: Peer,
    results: Results,
) -> None:
    """One more spawn on a quiet stack, and its two workflow histories."""
    body = spawn_body(connection_id, "$ true", f"bench-explain-{uuid.uuid4().hex[:6]}")
    _, total, _ = await spawn_and_wait(hub, body, results)
    hub_id = doc["instances"]["hub"]["instanceId"]
    results.breakdown["spawnMs"] = total
    results.breakdown["requester"] = await history_report(
        hub_client, f"remote-agent/{body['agentId']}"
    )
    results.breakdown["executor"] = await history_report(
        spoke_client, f"agent-run/{hub_id}/{body['agentId']}"
    )
    bare_id = f"bench-bare/explain-{uuid.uuid4()}"
    await hub_client.execute_workflow(BenchBareWorkflow.run, 1, id=bare_id, task_queue=bare_queue)
    results.breakdown["bare"] = await history_report(hub_client, bare_id)
    runtime = await measure_runtime(doc, results)
    if runtime is not None:
        results.breakdown["agentRuntimeMs"] = runtime


# --- report --------------------------------------------------------------------------------------


def report(results: Results) -> list[str]:
    """Print figures, ratios and goals; return the goals missed."""
    s = {name: series.summary() for name, series in results.series.items()}
    bare, fed = s.get("bare", {}), s.get("federated", {})
    table = Table(title="fedagent benchmark", header_style="bold")
    for column in ("figure", "n", "p50", "p99", "mean"):
        table.add_column(column, justify="right" if column != "figure" else "left")
    labels = {
        "bare": "bare workflow, start -> result",
        "federated": "federated spawn -> completed",
        "spawnAck": "REST spawn ack (sequential)",
        "spawnAckLoaded": "REST spawn ack (in flight)",
        "temporalStart": "Temporal start_workflow RPC",
        "kill": "kill -> answer (sandbox gone)",
        "requesterLag": "requester lag after the executor finished (seq.)",
        "requesterLagLoaded": "requester lag after the executor finished (in flight)",
    }
    for name, label in labels.items():
        if name in s:
            row = s[name]
            table.add_row(
                label, str(row["n"]), fmt_ms(row["p50"]), fmt_ms(row["p99"]), fmt_ms(row["mean"])
            )
    console.print()
    console.print(table)
    tput = results.throughput
    if "bare" in tput and "federated" in tput:
        console.print(
            f"throughput: bare {tput['bare'].per_second:,.1f}/s, federated "
            f"{tput['federated'].per_second:,.1f}/s with {tput['bare'].in_flight} in flight"
        )
    ratios: dict[str, float] = {}
    if bare and fed:
        ratios["p50"] = fed["p50"] / bare["p50"]
        ratios["p99"] = fed["p99"] / bare["p99"]
    if "bare" in tput and "federated" in tput and tput["bare"].per_second:
        ratios["throughput"] = tput["federated"].per_second / tput["bare"].per_second
    if ratios:
        console.print("federated / bare: " + ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()))
    goals: list[tuple[str, float | None, Callable[[float], bool], str]] = [
        ("federated p50 <= 2x bare", ratios.get("p50"), lambda v: v <= 2.0, "{:.2f}x"),
        ("federated p99 <= 3x bare", ratios.get("p99"), lambda v: v <= 3.0, "{:.2f}x"),
        ("throughput >= 0.5x bare", ratios.get("throughput"), lambda v: v >= 0.5, "{:.2f}x"),
        (
            "REST spawn ack p50 <= 10 ms",
            s.get("spawnAck", {}).get("p50"),
            lambda v: v <= 10,
            "{:.1f} ms",
        ),
        ("kill p50 <= 250 ms", s.get("kill", {}).get("p50"), lambda v: v <= 250, "{:.0f} ms"),
        ("kill p99 <= 1 s", s.get("kill", {}).get("p99"), lambda v: v <= 1000, "{:.0f} ms"),
    ]
    missed = []
    goal_table = Table(title="goals", header_style="bold")
    for column in ("goal", "measured", ""):
        goal_table.add_column(column)
    for label, value, ok, fmt in goals:
        if value is None:
            goal_table.add_row(label, "not measured", "[yellow]?[/]")
            continue
        good = ok(value)
        goal_table.add_row(label, fmt.format(value), "[green]met[/]" if good else "[red]missed[/]")
        if not good:
            missed.append(label)
    console.print(goal_table)
    results.breakdown["ratios"] = ratios
    results.breakdown["missed"] = missed
    return missed


def where_time_goes(results: Results, missed: list[str]) -> None:
    b = results.breakdown
    if not b.get("requester"):
        return
    console.print("\n[bold]where the time goes[/] (one spawn on a quiet stack, from the histories)")
    req, ex, bare = b["requester"], b["executor"], b.get("bare")
    if bare:
        console.print(
            f"bare workflow: {bare['workflowTasks']} workflow tasks, {bare['activities']} "
            f"activity, {bare['durationMs']:.0f} ms first to last event"
        )
    console.print(
        f"federated spawn: {req['workflowTasks'] + ex['workflowTasks']} workflow tasks and "
        f"{req['activities'] + ex['activities']} activity round trips in two workflows "
        f"(requester {req['workflowTasks']} + {req['activities']}, executor "
        f"{ex['workflowTasks']} + {ex['activities']}), {req['signals']} signals; "
        f"REST spawn -> completed {b['spawnMs']:.0f} ms"
    )
    run_agent = _activity_ms(ex, "run_agent")
    if run_agent is not None and b.get("agentRuntimeMs") is not None:
        console.print(
            f"run_agent activity {run_agent:.0f} ms, of which the agent runtime alone "
            f"(workspace, sandbox, scripted loop, diff; no Temporal) takes "
            f"{b['agentRuntimeMs']:.0f} ms"
        )
    ack = results.series.get("spawnAck")
    start = results.series.get("temporalStart")
    if ack and start and ack.ms and start.ms:
        console.print(
            f"REST spawn ack p50 {percentile(ack.ms, 50):.1f} ms, of which Temporal's "
            f"start_workflow RPC p50 {percentile(start.ms, 50):.1f} ms (the handler also reads "
            "the connection and writes the agent, its first event and the audit row)"
        )
    if b.get("peerRequestsPerSpawn"):
        console.print(
            "signed peer requests per spawn: "
            + ", ".join(f"{k} {v:.2f}" for k, v in sorted(b["peerRequestsPerSpawn"].items()))
        )
    if b.get("cpuPerRunBare") and b.get("cpuPerRunFederated"):
        table = Table(title="CPU per run during the throughput phase", header_style="bold")
        for column in ("process", "bare", "federated"):
            table.add_column(column, justify="left" if column == "process" else "right")
        bare_cpu, fed_cpu = b["cpuPerRunBare"], b["cpuPerRunFederated"]
        for name in sorted(set(bare_cpu) | set(fed_cpu)):
            table.add_row(
                name, f"{bare_cpu.get(name, 0.0):.1f} ms", f"{fed_cpu.get(name, 0.0):.1f} ms"
            )
        table.add_row(
            "total", f"{sum(bare_cpu.values()):.1f} ms", f"{sum(fed_cpu.values()):.1f} ms"
        )
        console.print(table)
    console.print(
        f"history per run: requester {req['events']} events / {req['historyBytes']:,} bytes, "
        f"executor {ex['events']} events / {ex['historyBytes']:,} bytes"
    )
    print_timeline("requester", req)
    print_timeline("executor", ex)
    if any(m.startswith("kill") for m in missed) and "kill" in b:
        print_timeline("kill, requester", b["kill"]["requester"])
        print_timeline("kill, executor", b["kill"]["executor"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sequential", type=int, default=20, help="runs of each, one at a time")
    parser.add_argument("--total", type=int, default=60, help="runs of each for throughput")
    parser.add_argument("--in-flight", type=int, default=10, help="concurrent runs for throughput")
    parser.add_argument("--kills", type=int, default=8)
    parser.add_argument("--sandbox-runs", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--workers", type=int, default=1, help="worker processes per instance")
    parser.add_argument("--sandbox", help="FEDAGENT_SANDBOX for the executor (default: its own)")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a setting for every instance process, e.g. FEDAGENT_HEARTBEAT_INTERVAL=0.2",
    )
    parser.add_argument(
        "--held", type=int, default=0, help="held load: agents running `$ sleep` at once (0: none)"
    )
    parser.add_argument(
        "--held-window", type=float, default=30.0, help="seconds of steady state measured"
    )
    parser.add_argument(
        "--held-sleep",
        type=int,
        default=0,
        help="held agents sleep this long and are waited for (0: a day, killed after the window)",
    )
    parser.add_argument("--held-only", action="store_true", help="only the held-load scenario")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    parser.add_argument("--keep", action="store_true", help="keep the data dir (logs)")
    args = parser.parse_args()
    started = time.monotonic()
    results = asyncio.run(run(args))
    missed = report(results) if not args.held_only else []
    where_time_goes(results, missed)
    console.print(
        f"\nbenchmark took {time.monotonic() - started:.0f} s; load average now "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    if args.json:
        doc = {
            "series": {k: v.summary() for k, v in results.series.items()},
            "throughput": {
                k: {**asdict(v), "perSecond": v.per_second} for k, v in results.throughput.items()
            },
            "sandboxes": results.sandboxes,
            "breakdown": results.breakdown,
            "environment": results.environment,
        }
        args.json.write_text(json.dumps(doc, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
