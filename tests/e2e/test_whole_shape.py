"""The whole shape of one instance on many hosts (issue 22): an executor made of two API
replicas behind HAProxy and three workers, each with its own data dir (the same database,
Temporal namespace and master key), serving a requester that reaches it only through the
balancer. Under a load of runs, some of them long ones that edit files across a sleep, the
worker running a long run and one API replica are killed with SIGKILL: every run must end
`completed` once, on both sides alike, its commands each run once, and the resumed long runs'
diffs must hold the edits made on the dead worker's host.

`FEDAGENT_SHAPE_RUNS` sets how many runs (100 by default, 3 of them long ones)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import secrets
import signal
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client, WorkflowExecutionStatus

from api.liveness import polled_queues
from cli.devstack import DevStack, free_port_block
from federation.states import TERMINAL_STATES
from tests.conftest import Instance
from tests.e2e.helpers import (
    balancer_reaches,
    processes_in,
    spawn_body,
    start_api_replica,
    start_haproxy,
    start_worker_on_host,
    wait_ready,
)

pytestmark = pytest.mark.e2e
REQUESTER, EXECUTOR = "asker", "doer"
RUNS = int(os.environ.get("FEDAGENT_SHAPE_RUNS", "100"))
LONG_RUNS = 3
WORKERS = 3
IN_FLIGHT = 16  # spawn requests at once
LONG_SLEEP = 20
LONG_COMMANDS = ["echo one >> a.txt", f"sleep {LONG_SLEEP}", "echo two >> b.txt"]
# The executor runs every run of the load at once if its workers have the slots, and counts a
# worker lost after 5 s without a heartbeat (the default, 25 s, would only make the test longer).
EXECUTOR_ENV = {
    # One master key for every process of the instance, whatever its data dir.
    "FEDAGENT_SECRET_KEY": base64.b64encode(secrets.token_bytes(32)).decode(),
    "FEDAGENT_HEARTBEAT_INTERVAL": "1",
    "FEDAGENT_MAX_RUNNING_AGENTS": "1000",
    "FEDAGENT_PEER_MAX_RUNNING_AGENTS": "1000",
    "FEDAGENT_PEER_MAX_QUEUED_AGENTS": "1000",
}
T = TypeVar("T")


@dataclass
class Shape:
    """The requester (reached directly) and the executor as its peer reaches it: through the
    balancer (`executor`), with its two replicas and three workers."""

    stack: DevStack
    http: httpx.AsyncClient
    ports: dict[str, int]
    requester: Instance
    executor: Instance
    replicas: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    haproxy: subprocess.Popen[bytes] | None = None
    connection_id: str = ""
    clients: dict[str, Client] = field(default_factory=dict)
    hosts: dict[int, Path] = field(default_factory=dict)  # worker pid: its host's data dir

    @property
    def workers(self) -> list[subprocess.Popen[bytes]]:
        return self.stack.instances[EXECUTOR].workers

    async def temporal(self, name: str) -> Client:
        if name not in self.clients:
            self.clients[name] = await Client.connect(self.stack.temporal_address, namespace=name)
        return self.clients[name]


def _instance(stack: DevStack, http: httpx.AsyncClient, name: str, url: str) -> Instance:
    return Instance(
        {**stack.instances[name].info, "apiUrl": url, "dataDir": str(stack.data_dir)}, http
    )


async def _start(shape: Shape, directory: Path) -> None:
    """Both instances' processes: the requester's API and worker; the executor's two API
    replicas, HAProxy in front of them, and three workers on "hosts" of their own."""
    stack, ports = shape.stack, shape.ports
    stack.start_api(REQUESTER)
    stack.start_worker(REQUESTER)
    shape.replicas["a"] = stack.start_api(EXECUTOR)
    shape.replicas["b"] = start_api_replica(stack, EXECUTOR, ports["b"], "api-b")
    for n in range(1, WORKERS + 1):
        start_host_worker(shape, directory / f"host-{n}")
    servers = {"a": ports["a"], "b": ports["b"]}
    log = stack.log_path(EXECUTOR, "haproxy")
    shape.haproxy = start_haproxy(directory, log, ports["lb"], servers)
    await asyncio.gather(
        stack.wait_ready(REQUESTER),
        stack.wait_ready(EXECUTOR),
        wait_ready(shape.http, f"http://127.0.0.1:{ports['b']}"),
        stack.wait_polling(REQUESTER),
        _every_worker_polls(shape),
    )
    await balancer_reaches(shape.http, shape.executor.url, set(servers))


def start_host_worker(shape: Shape, data_dir: Path) -> subprocess.Popen[bytes]:
    """A worker of the executor on the "host" whose data dir this is."""
    log = shape.stack.log_path(EXECUTOR, f"{data_dir.name}-worker")
    worker = start_worker_on_host(shape.stack, EXECUTOR, data_dir, log)
    shape.workers.append(worker)  # stack.stop() ends it
    shape.hosts[worker.pid] = data_dir
    return worker


async def _every_worker_polls(shape: Shape) -> None:
    """Until each executor worker polls both of the instance's task queues."""
    client = await shape.temporal(EXECUTOR)
    queue = shape.stack.instances[EXECUTOR].info["taskQueue"]
    wanted = {str(w.pid) for w in shape.workers}
    deadline = time.monotonic() + shape.stack.startup_timeout
    while True:
        missing = set()
        for name, kind, _ in polled_queues(queue):
            described = await client.workflow_service.describe_task_queue(
                DescribeTaskQueueRequest(
                    namespace=EXECUTOR, task_queue=TaskQueue(name=name), task_queue_type=kind
                )
            )
            missing |= wanted - {p.identity.split("@")[0] for p in described.pollers}
        if not missing:
            return
        for worker in shape.workers:
            assert worker.poll() is None, f"executor worker {worker.pid} exited at start"
        assert time.monotonic() < deadline, f"workers {missing} do not poll"
        await asyncio.sleep(0.2)


@pytest.fixture(scope="module")
async def shape(
    tmp_path_factory: pytest.TempPathFactory, http: httpx.AsyncClient
) -> AsyncIterator[Shape]:
    base = free_port_block(4)
    ports = {"requester": base, "a": base + 1, "b": base + 2, "lb": base + 3}
    temporal = free_port_block(2)
    directory = tmp_path_factory.mktemp("shape")
    lb_url = f"http://127.0.0.1:{ports['lb']}"
    stack = DevStack(
        [REQUESTER, EXECUTOR],
        directory,
        base_port=base,
        temporal_port=temporal,
        ui_port=temporal + 1,
        extra_env={"FEDAGENT_STATUS_POLL_INTERVAL": "2"},
        instance_env={EXECUTOR: EXECUTOR_ENV},
        public_urls={EXECUTOR: lb_url},
    )
    made: Shape | None = None
    try:
        await stack.prepare()
        requester_url = stack.instances[REQUESTER].info["apiUrl"]
        made = Shape(
            stack,
            http,
            ports,
            requester=_instance(stack, http, REQUESTER, requester_url),
            executor=_instance(stack, http, EXECUTOR, lb_url),
        )
        await _start(made, directory)
        made.connection_id = await _connect(made)
        yield made
    finally:
        if made is not None:
            for proc in (made.haproxy, made.replicas.get("b")):
                DevStack.stop_process(proc, grace=10)
        stack.stop()


async def _connect(shape: Shape) -> str:
    """The requester asks the executor (through the balancer) for a connection; accepted."""
    asked = await shape.requester.call(
        "POST", "/connections", json={"remoteUrl": shape.executor.url}
    )
    assert asked.status_code == 201, asked.text
    connection_id: str = asked.json()["connectionId"]
    accepted = await shape.executor.call("POST", f"/connections/{connection_id}/accept")
    assert accepted.status_code == 200, accepted.text
    path = f"/connections/{connection_id}"
    await _until(lambda: _status_is(shape.requester, path, "ACTIVE"), 60, "an active connection")
    return connection_id


async def _status_is(inst: Instance, path: str, status: str) -> bool:
    return bool((await inst.call("GET", path)).json().get("status") == status)


async def _until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)


async def _bounded(calls: list[Awaitable[T]], at_once: int = IN_FLIGHT) -> list[T]:
    """The calls' results in order, at most `at_once` of them in flight."""
    gate = asyncio.Semaphore(at_once)

    async def one(call: Awaitable[T]) -> T:
        async with gate:
            return await call

    return list(await asyncio.gather(*(one(c) for c in calls)))


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One run of the load: its spawn, its commands, and the line each file must end with."""

    body: dict[str, Any]
    commands: list[str]
    edits: dict[str, str]

    @property
    def agent_id(self) -> str:
        return str(self.body["agentId"])


def _plan(connection_id: str, task_id: str) -> tuple[list[Run], list[Run]]:
    """LONG_RUNS long runs (a file edited before a sleep, another after it) and short ones."""

    def run(commands: list[str], edits: dict[str, str]) -> Run:
        script = "\n".join(f"$ {c}" for c in commands)
        body = spawn_body(connection_id, script, task_id=task_id, timeout=300)
        return Run(body, commands, edits)

    longs = [run(LONG_COMMANDS, {"a.txt": "one", "b.txt": "two"}) for _ in range(LONG_RUNS)]
    shorts = [
        run([f"echo {n} >> marks.txt"], {"marks.txt": str(n)}) for n in range(RUNS - LONG_RUNS)
    ]
    return longs, shorts


async def _spawn(shape: Shape, run: Run) -> None:
    answer = await shape.requester.call("POST", "/agents/spawn", json=run.body)
    assert answer.status_code == 202, answer.text


async def _sleeping(shape: Shape, run: Run) -> bool:
    """Whether the run sleeps, as the executor tells it (its first edit is made then)."""
    answer = await shape.executor.call("GET", f"/hosted/{run.agent_id}")
    if answer.status_code == 404:  # the spawn has not reached the executor yet
        return False
    agent = answer.json()
    assert agent["state"] not in TERMINAL_STATES, agent
    return bool((agent.get("progress") or {}).get("command") == LONG_COMMANDS[1])


async def _worker_pid(client: Client, workflow_id: str) -> int | None:
    """The pid of the worker running the run's agent (its activity's worker identity)."""
    described = await client.get_workflow_handle(workflow_id).describe()
    for activity in described.raw_description.pending_activities:
        if activity.activity_type.name == "run_agent" and activity.last_worker_identity:
            return int(activity.last_worker_identity.split("@")[0])
    return None


def _executor_workflow(shape: Shape, run: Run) -> str:
    return f"agent-run/{shape.requester.id}/{run.agent_id}"


async def _kill_a_long_runs_worker(shape: Shape, longs: list[Run]) -> list[Run]:
    """Once a long run sleeps (its first edit made), SIGKILL its worker. Returns the long runs
    that were sleeping on that worker."""
    client = await shape.temporal(EXECUTOR)
    deadline = time.monotonic() + 120
    # A run's progress may still name the sleep after it ended (progress is sent at a bounded
    # pace): only a run first seen sleeping less than half the sleep ago still sleeps surely.
    first_seen: dict[str, float] = {}
    while True:
        pids: dict[str, int] = {}
        for run in longs:
            if await _sleeping(shape, run):
                seen = first_seen.setdefault(run.agent_id, time.monotonic())
                if time.monotonic() - seen > LONG_SLEEP / 2:
                    continue
                pid = await _worker_pid(client, _executor_workflow(shape, run))
                if pid is not None:
                    pids[run.agent_id] = pid
        if pids:
            break
        assert time.monotonic() < deadline, "no long run reached its sleep"
        await asyncio.sleep(0.2)
    [victim] = [w for w in shape.workers if w.pid == next(iter(pids.values()))]
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    shape.workers.remove(victim)
    # Its host's supervisor starts it again (the new worker sweeps what the dead one left).
    start_host_worker(shape, shape.hosts[victim.pid])
    return [run for run in longs if pids.get(run.agent_id) == victim.pid]


async def _ended(shape: Shape, task_id: str, timeout: float) -> dict[str, int]:
    """Until every run of the task has a final state on the requester: {state: count}."""
    deadline = time.monotonic() + timeout
    while True:
        rows = await shape.requester.fetch(
            "SELECT state, count(*) AS n FROM agents WHERE role = 'requester' AND task_id = $1"
            " GROUP BY state",
            task_id,
        )
        states = {r["state"]: r["n"] for r in rows}
        if sum(n for s, n in states.items() if s in TERMINAL_STATES) == RUNS:
            return states
        assert time.monotonic() < deadline, f"not every run ended: {states}"
        await asyncio.sleep(0.5)


async def test_the_whole_shape_loses_no_run_and_runs_nothing_twice(shape: Shape) -> None:
    task_id = f"shape-{uuid.uuid4().hex[:8]}"
    longs, shorts = _plan(shape.connection_id, task_id)
    started = time.monotonic()
    # The long runs first, so they hold worker slots before the short ones queue.
    await _bounded([_spawn(shape, run) for run in longs + shorts[: len(shorts) // 2]])
    held = await _kill_a_long_runs_worker(shape, longs)
    # The second half is spawned through the balancer while a replica dies under it.
    second = asyncio.create_task(_bounded([_spawn(shape, r) for r in shorts[len(shorts) // 2 :]]))
    await asyncio.sleep(0.3)
    shape.replicas["a"].send_signal(signal.SIGKILL)
    shape.replicas["a"].wait()
    await second
    states = await _ended(shape, task_id, timeout=600)
    elapsed = time.monotonic() - started
    assert states == {"completed": RUNS}, states

    await _no_sandbox_is_left(shape)
    runs = longs + shorts
    results = await _bounded([_both_sides_agree(shape, run) for run in runs])
    await _bounded(
        [_each_command_ran_once(shape, run, r) for run, r in zip(runs, results, strict=True)]
    )
    await _one_workflow_and_row_each(shape, task_id, runs)
    for run in held:
        result = results[runs.index(run)]
        # Resumed on another host: its first host's edit came back with its workspace.
        # At least once: on a loaded machine a surviving worker can miss heartbeats too.
        assert result["resumes"] >= 1, result
        interrupted = [c["command"] for c in result["commands"] if c.get("interrupted")]
        assert LONG_COMMANDS[1] in interrupted, result["commands"]
        assert "restored" in result["workspace"]["note"], result["workspace"]
    resumed = sum(1 for r in results if r["resumes"])
    print(
        f"\nwhole shape: {RUNS} runs ({LONG_RUNS} long), worker and replica killed: all"
        f" completed once on both sides in {elapsed:.1f} s; {len(held)} long run(s) and"
        f" {resumed - len(held)} short run(s) resumed on another host"
    )


# --- what must hold ---------------------------------------------------------------------------


async def _no_sandbox_is_left(shape: Shape) -> None:
    """No process of any run is left on any host, the dead worker's included: every run has
    ended, and a sandbox its worker died starting was ended by the worker started after it."""
    roots = [data_dir / "workspaces" for data_dir in set(shape.hosts.values())]
    deadline = time.monotonic() + 60  # past a reconcile pass (30 s), which sweeps too
    while left := {str(root): processes_in(root) for root in roots if processes_in(root)}:
        assert time.monotonic() < deadline, f"sandbox processes left: {left}"
        await asyncio.sleep(0.5)


async def _both_sides_agree(shape: Shape, run: Run) -> dict[str, Any]:
    """The run as each side's REST API tells it (the executor's through the balancer), and as
    each side's workflow ended in Temporal: completed alike. Returns the result."""
    mine = (await shape.requester.call("GET", f"/agents/{run.agent_id}")).json()
    hosted = await shape.executor.call("GET", f"/hosted/{run.agent_id}")
    assert hosted.status_code == 200, hosted.text
    theirs = hosted.json()
    assert (mine["state"], theirs["state"]) == ("completed", "completed"), (mine, theirs)
    assert mine["result"] == theirs["result"], (mine["result"], theirs["result"])
    assert mine["attempt"] == theirs["attempt"] == 1  # no try failed and was tried again
    for name, workflow_id in ((REQUESTER, mine["workflowId"]), (EXECUTOR, theirs["workflowId"])):
        client = await shape.temporal(name)
        # A workflow closes after its record: the executor's tells the requester first (which
        # may have heard the end by a status check already), on a worker that may have died.
        deadline = time.monotonic() + 120
        while True:
            described = await client.get_workflow_handle(workflow_id).describe()
            if described.status != WorkflowExecutionStatus.RUNNING:
                break
            assert time.monotonic() < deadline, (name, workflow_id, "still running")
            await asyncio.sleep(0.5)
        assert described.status == WorkflowExecutionStatus.COMPLETED, (name, workflow_id)
    result: dict[str, Any] = mine["result"]
    return result


async def _each_command_ran_once(shape: Shape, run: Run, result: dict[str, Any]) -> None:
    """Each command ran once (a command running when its worker died is run again by the
    resumed try: its effect may show twice, nothing else's may), as the result, the diff and
    both sides' transcripts tell."""
    assert [c["command"] for c in result["commands"]] == run.commands, result["commands"]
    interrupted = {c["command"] for c in result["commands"] if c.get("interrupted")}
    diff = await shape.requester.call("GET", f"/agents/{run.agent_id}/diff")
    assert diff.status_code == 200, diff.text
    lines = diff.text.splitlines()
    assert sorted(result["changedFiles"]) == sorted(run.edits), result["changedFiles"]
    for path, line in run.edits.items():
        writer = next(c for c in run.commands if c.endswith(f">> {path}"))
        seen = lines.count(f"+{line}")
        assert seen in ((1, 2) if writer in interrupted else (1,)), (path, diff.text)
    entries = await _requester_transcript(shape, run)
    assert entries == await _executor_transcript(shape, run)
    calls = [
        e["input"]["command"]
        for e in entries
        if e["kind"] == "tool_call" and e["name"] == "run_command"
    ]
    assert calls == run.commands, entries
    answered = [e["callId"] for e in entries if e["kind"] == "tool_result"]
    assert len(answered) == len(set(answered)) == len(run.commands), entries
    assert [e["kind"] for e in entries].count("resumed") == result["resumes"], entries


async def _requester_transcript(shape: Shape, run: Run) -> list[dict[str, Any]]:
    """The requester's copy (REST), once it holds everything the executor reported."""
    deadline = time.monotonic() + 60
    while True:
        entries: list[dict[str, Any]] = []
        after, complete = 0, False
        while True:
            answer = await shape.requester.call(
                "GET", f"/agents/{run.agent_id}/transcript", params={"after": after}
            )
            assert answer.status_code == 200, answer.text
            page = answer.json()
            entries += page["entries"]
            complete = page["complete"]
            if not page["entries"]:
                break
            after = page["next"]
        if complete:
            return entries
        assert time.monotonic() < deadline, f"{run.agent_id}'s transcript is not complete"
        await asyncio.sleep(0.5)


async def _executor_transcript(shape: Shape, run: Run) -> list[dict[str, Any]]:
    rows = await shape.executor.fetch(
        "SELECT entry FROM agent_transcript WHERE agent_id = $1 ORDER BY seq",
        uuid.UUID(run.agent_id),
    )
    return [json.loads(r["entry"]) for r in rows]


async def _one_workflow_and_row_each(shape: Shape, task_id: str, runs: list[Run]) -> None:
    """One workflow per run in each namespace, one row per run on each side."""
    for name in (REQUESTER, EXECUTOR):
        client = await shape.temporal(name)
        assert (await client.count_workflows(f"TaskId = '{task_id}'")).count == len(runs), name
    ids = [uuid.UUID(run.agent_id) for run in runs]
    for inst, role in ((shape.requester, "requester"), (shape.executor, "executor")):
        rows = await inst.fetch(
            "SELECT agent_id, count(*) AS n FROM agents WHERE role = $1"
            " AND agent_id = ANY($2::uuid[]) GROUP BY agent_id",
            role,
            ids,
        )
        assert sorted((r["agent_id"], r["n"]) for r in rows) == sorted((i, 1) for i in ids)
