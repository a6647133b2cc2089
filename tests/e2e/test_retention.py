"""Nothing grows for ever, on a stack of its own with retention in seconds: an ended run's
workspace goes while its diff stays downloadable, one peer's runs share a disk budget, and
after a few hundred runs `fedagent gc` takes the store and the workspaces back to their size
at the start (its dry run deleting nothing and counting the same)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from cli.devstack import DevStack
from federation.store import retention
from tests.conftest import Instance, connect, free_port_block
from tests.e2e.helpers import spawn_body

pytestmark = pytest.mark.e2e
NAMES = ["asker", "doer"]
SOAK_RUNS = int(os.environ.get("FEDAGENT_SOAK_RUNS", "200"))
SOAK_AT_ONCE = 8
RETENTION_ENV = {
    # Everything of an ended run may go a second after it ended; the store's pass runs when
    # `fedagent gc` says so (the worker's own comes once an hour), workspaces every 10 s.
    "FEDAGENT_WORKSPACE_RETENTION": "0",
    "FEDAGENT_RUN_DATA_RETENTION": "1",
    "FEDAGENT_ARTIFACT_RETENTION": "1",
    "FEDAGENT_RUN_RETENTION": "1",
    "FEDAGENT_RETENTION_INTERVAL": "3600",
    "FEDAGENT_PEER_DISK_BUDGET_MB": "64",
    "FEDAGENT_SANDBOX_FILE_MB": "16",
    "FEDAGENT_STATUS_POLL_INTERVAL": "2",
    "FEDAGENT_LOG_LEVEL": "info",
}


class World:
    def __init__(self, stack: DevStack, asker: Instance, doer: Instance, connection: str) -> None:
        self.stack, self.asker, self.doer, self.connection = stack, asker, doer, connection

    @property
    def peer_dir(self) -> Path:
        """The doer's directory of the asker's workspaces."""
        return self.stack.data_dir / "workspaces" / "doer" / self.asker.id

    def run_files(self, agent_id: str) -> list[str]:
        if not self.peer_dir.is_dir():
            return []
        return [p.name for p in self.peer_dir.iterdir() if agent_id in p.name]

    async def gc(self, instance: Instance, *flags: str) -> dict[str, Any]:
        """`fedagent gc --json` of one instance of the stack, as an operator runs it."""
        out = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "cli.main", "gc", "-i", instance.name, "--data-dir"]
            + [str(self.stack.data_dir), "--json", *flags],
            capture_output=True,
            text=True,
            timeout=120,
            env={**os.environ, **RETENTION_ENV},
            check=False,
        )
        assert out.returncode == 0, out.stderr
        report: dict[str, Any] = json.loads(out.stdout)
        return report


@pytest.fixture(scope="module")
async def world(
    tmp_path_factory: pytest.TempPathFactory, http: httpx.AsyncClient
) -> AsyncIterator[World]:
    ports = free_port_block(len(NAMES))
    temporal = free_port_block(2)
    stack = DevStack(
        NAMES,
        tmp_path_factory.mktemp("retention"),
        base_port=ports,
        temporal_port=temporal,
        ui_port=temporal + 1,
        extra_env=RETENTION_ENV,
    )
    try:
        await stack.start()
        asker, doer = (
            Instance({**stack.instances[n].info, "dataDir": str(stack.data_dir)}, http)
            for n in NAMES
        )
        connection = await connect(asker, doer)
        yield World(stack, asker, doer, connection)
    finally:
        stack.stop()


async def wait_for(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.25)


async def spawn(world: World, instructions: str, **options: Any) -> str:
    body = spawn_body(world.connection, instructions, **options)
    response = await world.asker.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 202, response.text
    return str(body["agentId"])


async def test_an_ended_runs_workspace_is_removed_and_its_diff_stays_downloadable(
    world: World,
) -> None:
    agent_id = await spawn(world, "$ echo kept-in-the-store > result.txt")
    agent = await world.asker.wait_agent(agent_id, timeout=90)
    assert agent["state"] == "completed", agent
    # Its workspace, baseline repository, diff file and /tmp go once the run ended.
    await wait_for(lambda: not world.run_files(agent_id), 40, "the workspace to go")
    diff = await world.asker.call("GET", f"/agents/{agent_id}/diff")
    assert diff.status_code == 200, diff.text
    assert "+kept-in-the-store" in diff.text
    assert len(diff.content) == agent["result"]["diffBytes"]
    # What the store keeps, per kind, is in the metrics of each instance.
    page = (await world.doer.http.get(f"{world.doer.url}/metrics")).text
    kept = {
        line.split('"')[1]: float(line.rsplit(" ", 1)[1])
        for line in page.splitlines()
        if line.startswith("fedagent_stored_bytes{")
    }
    assert set(kept) == set(retention.KINDS)
    assert kept["artifact_content"] >= agent["result"]["diffBytes"] > 0
    assert 'fedagent_stored_rows{kind="runs"}' in page


async def test_a_second_run_taking_a_peer_past_its_disk_budget_is_stopped(world: World) -> None:
    """64 MiB for all of one peer's runs: the first holds 45 MiB and waits, the second passes
    the budget with its second file and is stopped; the first completes."""
    first = await spawn(
        world,
        "\n".join(f"$ head -c 15M /dev/zero > a{i}" for i in range(3)) + "\n$ sleep 8",
        timeout=120,
    )
    for _ in range(400):
        progress = (await world.asker.call("GET", f"/agents/{first}")).json().get("progress")
        if (progress or {}).get("command") == "sleep 8":
            break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("the first run never got to its sleep")
    second = await spawn(
        world,
        "\n".join(f"$ head -c 15M /dev/zero > b{i}" for i in range(3)) + "\n$ echo never",
        timeout=120,
    )
    stopped = await world.asker.wait_agent(second, timeout=90)
    assert stopped["state"] == "failed", stopped
    assert "peer_disk_budget" in (stopped["error"] or ""), stopped
    assert stopped["result"]["stopReason"] == "peer_disk_budget"
    done = await world.asker.wait_agent(first, timeout=90)
    assert done["state"] == "completed", done
    assert done["result"]["diffBytes"] > 0 and stopped["result"]["diffBytes"] > 0
    rows = await world.doer.fetch(
        "SELECT state, result->>'stopReason' AS reason FROM agents"
        " WHERE role = 'executor' AND agent_id = $1",
        uuid.UUID(second),
    )
    assert [(r["state"], r["reason"]) for r in rows] == [("failed", "peer_disk_budget")]
    # Swept once ended: the peer's budget is free again.
    await wait_for(lambda: not world.run_files(first) + world.run_files(second), 40, "the sweep")


async def stored(instance: Instance) -> dict[str, retention.Amount]:
    conn = await asyncpg.connect(instance.info["databaseUrl"])
    try:
        return await retention.stored(conn)
    finally:
        await conn.close()


def workspaces_held(world: World) -> tuple[list[str], int]:
    """What the workspaces directory holds: every path below it, and the bytes of its files
    (a directory keeps the blocks its listing once took, whatever it holds now)."""
    root = world.stack.data_dir / "workspaces"
    paths = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    return paths, sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


async def settle(world: World) -> None:
    """Nothing of an ended run left: workspaces swept, then gc of both instances."""
    await wait_for(lambda: not any(world.run_files("-")), 60, "the workspaces to go")
    await asyncio.sleep(1.5)  # past the 1 s retention
    for instance in (world.asker, world.doer):
        await world.gc(instance)


async def test_a_soak_of_short_runs_leaves_the_store_and_the_disk_as_they_were(
    world: World,
) -> None:
    # The runs before this one hold the peer's budget until they are swept.
    await wait_for(lambda: not any(world.run_files("-")), 60, "the workspaces to go")
    # The peer's directory of workspaces is made by its first run and stays (mode 0700).
    warm_up = await spawn(world, "$ true", task_id="soak-warm-up")
    assert (await world.asker.wait_agent(warm_up, timeout=90))["state"] == "completed"
    await settle(world)
    before = {i.name: await stored(i) for i in (world.asker, world.doer)}
    disk_before = workspaces_held(world)

    gate = asyncio.Semaphore(SOAK_AT_ONCE)
    started = time.monotonic()

    async def one(n: int) -> str:
        async with gate:
            agent_id = await spawn(world, "$ true", task_id=f"soak-{n}", timeout=600)
            return str((await world.asker.wait_agent(agent_id, timeout=600))["state"])

    states = await asyncio.gather(*(one(n) for n in range(SOAK_RUNS)))
    took = time.monotonic() - started
    assert states == ["completed"] * SOAK_RUNS
    grown = {i.name: await stored(i) for i in (world.asker, world.doer)}
    assert grown["doer"]["runs"].rows >= before["doer"]["runs"].rows + SOAK_RUNS

    await wait_for(lambda: not any(world.run_files("-")), 60, "the workspaces to go")
    await asyncio.sleep(1.5)
    for instance in (world.asker, world.doer):
        unchanged = await stored(instance)
        dry = await world.gc(instance, "--dry-run")
        assert dry["dryRun"] is True
        assert await stored(instance) == unchanged  # a dry run deletes nothing
        real = await world.gc(instance)
        assert real["kinds"] == dry["kinds"], instance.name
        assert real["kinds"]["runs"]["count"] >= SOAK_RUNS
    after = {i.name: await stored(i) for i in (world.asker, world.doer)}
    print(
        f"\nsoak: {SOAK_RUNS} runs in {took:.0f} s; store before {before}, grown {grown},"
        f" after {after}; workspaces {disk_before} -> {workspaces_held(world)}"
    )
    assert after == before
    assert workspaces_held(world) == disk_before
