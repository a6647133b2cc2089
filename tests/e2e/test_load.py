"""Load: 300 short scripted agents from hub to spoke with many in flight.

Run alone with `pytest -m load -s`. Every agent must reach `completed` exactly once on both
sides, no report may be applied twice, and the workers' memory must stay bounded.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import pytest

from cli.devstack import DevStack
from tests.conftest import Instance
from tests.e2e.helpers import spawn_body

pytestmark = [pytest.mark.e2e, pytest.mark.load]
AGENTS = 300
IN_FLIGHT = 50
MEMORY_GROWTH_LIMIT_MB = 300


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def test_300_agents_complete_exactly_once(
    hub: Instance, spoke: Instance, hub_spoke: str, stack: DevStack
) -> None:
    task_id = f"load-{uuid.uuid4().hex[:8]}"
    workers = {
        name: [w.pid for w in stack.instances[name].workers if w.poll() is None]
        for name in ("hub", "spoke")
    }
    before = {name: sum(rss_mb(p) for p in pids) for name, pids in workers.items()}
    # A try's timeout counts from when it is scheduled, the wait for a worker slot included
    # (schedule-to-close): 300 at once wait their turn, so each gets time for the queue too.
    bodies = [spawn_body(hub_spoke, "$ true", task_id=task_id, timeout=900) for _ in range(AGENTS)]
    gate = asyncio.Semaphore(IN_FLIGHT)
    ack_ms: list[float] = []

    async def spawn(body: dict[str, object]) -> None:
        async with gate:
            started = time.perf_counter()
            response = await hub.call("POST", "/agents/spawn", json=body)
            ack_ms.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 202, response.text

    started = time.monotonic()
    await asyncio.gather(*(spawn(b) for b in bodies))
    peak = dict(before)
    deadline = time.monotonic() + 600
    while True:
        rows = await hub.fetch(
            "SELECT state, count(*) AS n FROM agents WHERE role = 'requester' AND task_id = $1"
            " GROUP BY state",
            task_id,
        )
        states = {r["state"]: r["n"] for r in rows}
        for name, pids in workers.items():
            peak[name] = max(peak[name], sum(rss_mb(p) for p in pids))
        if states.get("completed", 0) == AGENTS or time.monotonic() > deadline:
            break
        assert not set(states) & {"failed", "killed", "timed_out"}, states
        await asyncio.sleep(0.5)
    elapsed = time.monotonic() - started
    assert states == {"completed": AGENTS}, states

    executed = await spoke.fetch(
        "SELECT state, count(*) AS n FROM agents WHERE role = 'executor' AND task_id = $1"
        " GROUP BY state",
        task_id,
    )
    assert {r["state"]: r["n"] for r in executed} == {"completed": AGENTS}
    completions = await hub.fetch(
        "SELECT e.agent_id, count(*) FILTER (WHERE e.state = 'completed') AS done,"
        " count(*) AS reports, count(DISTINCT e.seq) AS distinct_seqs"
        " FROM agent_events e JOIN agents a ON a.agent_id = e.agent_id AND a.role = 'requester'"
        " WHERE a.task_id = $1 GROUP BY e.agent_id",
        task_id,
    )
    assert len(completions) == AGENTS
    assert all(r["done"] == 1 for r in completions), "an agent completed twice"
    # Every applied report has its own sequence number (0 is the requester's own spawning).
    assert all(r["reports"] == r["distinct_seqs"] for r in completions), "a report applied twice"
    for client_instance in (hub, spoke):
        assert await client_instance.count_workflows(f"TaskId = '{task_id}'") == AGENTS
    growth = {name: peak[name] - before[name] for name in before}
    for name, mb in growth.items():
        assert mb < MEMORY_GROWTH_LIMIT_MB, f"{name} workers grew by {mb:.0f} MB"

    ack_ms.sort()
    print(
        f"\nload: {AGENTS} agents, {IN_FLIGHT} in flight: all completed once on both sides in"
        f" {elapsed:.1f} s ({AGENTS / elapsed:.1f} agents/s); spawn ack p50"
        f" {ack_ms[len(ack_ms) // 2]:.1f} ms p99 {ack_ms[int(len(ack_ms) * 0.99)]:.1f} ms;"
        f" worker RSS before/peak MB: "
        + ", ".join(f"{n} {before[n]:.0f}/{peak[n]:.0f}" for n in before)
        + "; lost 0, duplicated 0"
    )
