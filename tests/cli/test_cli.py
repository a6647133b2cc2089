"""`fedagent` as a user runs it, against the real stack: connect, accept, spawn --follow, agents,
status, kill, keys rotate, token create, doctor, and what it says when something is wrong."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from cli.devstack import DevStack
from tests.conftest import Instance
from tests.e2e.helpers import spawn_body

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


async def fedagent(*args: str, env: dict[str, str] | None = None, stdin: str = "") -> Run:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cli.main",
        *args,
        cwd=ROOT,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1", **(env or {})},
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: a hung command goes with its children
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), timeout=180)
    except TimeoutError:
        os.killpg(proc.pid, signal.SIGKILL)  # e.g. a stack that never stops, and its children
        await proc.wait()
        raise
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


@pytest.fixture(scope="module")
def data_dir(stack: DevStack) -> str:
    return str(stack.data_dir)  # holds the stack's instances.json


@pytest.fixture(scope="module")
async def hub_edge(hub: Instance, edge: Instance, data_dir: str) -> AsyncIterator[str]:
    """hub asks edge for a connection with `fedagent connect`, edge accepts with `accept`."""
    asked = await fedagent("connect", "edge", "-i", "hub", "--data-dir", data_dir, "--json")
    assert asked.code == 0, asked.err
    connection = asked.json()
    assert connection["status"] == "PENDING"
    assert connection["remoteName"] == "edge"
    accepted = await fedagent(
        "accept",
        connection["connectionId"],
        "-i",
        "edge",
        "--data-dir",
        data_dir,
        "--max-concurrent",
        "5",
        "--json",
    )
    assert accepted.code == 0, accepted.err
    assert accepted.json()["status"] == "ACTIVE"
    assert accepted.json()["grants"]["maxConcurrentAgents"] == 5
    yield connection["connectionId"]
    await hub.call("POST", f"/connections/{connection['connectionId']}/disconnect")


async def test_connections_lists_the_new_connection(hub_edge: str, data_dir: str) -> None:
    listed = await fedagent("connections", "-i", "hub", "--data-dir", data_dir, "--json")
    assert listed.code == 0, listed.err
    mine = [c for c in listed.json() if c["connectionId"] == hub_edge]
    assert mine and mine[0]["status"] == "ACTIVE"
    table = await fedagent("connections", "-i", "hub", "--data-dir", data_dir)
    assert hub_edge in table.out and "ACTIVE" in table.out and "edge" in table.out


async def test_spawn_follow_shows_states_then_the_result(hub_edge: str, data_dir: str) -> None:
    run = await fedagent(
        "spawn", "-i", "hub", "--data-dir", data_dir, "--peer", "edge", "--task-id", "cli-follow",
        "-m", "Say hello.", "-m", "$ echo hello-from-cli", "--follow",
    )  # fmt: skip
    assert run.code == 0, run.out + run.err
    lines = run.out.splitlines()
    states = [
        w for line in lines for w in line.split() if w in ("spawning", "running", "completed")
    ]
    assert states[0] in ("spawning", "running") and states[-1] == "completed"
    assert "$ echo hello-from-cli" in run.out  # progress line
    assert "hello-from-cli" in run.out.split("log tail", 1)[1]  # the result's log

    agents = await fedagent(
        "agents", "-i", "hub", "--data-dir", data_dir, "--task-id", "cli-follow", "--json"
    )
    assert agents.code == 0, agents.err
    [agent] = agents.json()
    assert agent["state"] == "completed"
    status = await fedagent("status", agent["agentId"], "-i", "hub", "--data-dir", data_dir)
    assert status.code == 0 and "completed" in status.out and "hello-from-cli" in status.out


async def test_spawn_here_runs_the_agent_on_this_instance(hub: Instance, data_dir: str) -> None:
    run = await fedagent(
        "spawn", "-i", "hub", "--data-dir", data_dir, "--here", "--task-id", "cli-here",
        "-m", "$ echo hello-from-here", "--follow",
    )  # fmt: skip
    assert run.code == 0, run.out + run.err
    assert "completed" in run.out and "hello-from-here" in run.out
    agents = await fedagent(
        "agents", "-i", "hub", "--data-dir", data_dir, "--task-id", "cli-here", "--json"
    )
    [agent] = agents.json()
    assert agent["state"] == "completed" and agent["peerInstanceId"] == "_local"
    both = await fedagent(
        "spawn", "-i", "hub", "--data-dir", data_dir, "--here", "--peer", "edge", "-m", "x"
    )
    assert both.code != 0 and "--here" in both.err


async def test_agents_table_fits_an_80_column_terminal_one_line_per_agent(
    hub: Instance, hub_edge: str, data_dir: str
) -> None:
    body = spawn_body(hub_edge, "$ echo one two three four five six", task_id="cli-narrow-table")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    await hub.wait_agent(body["agentId"])
    narrow = {"COLUMNS": "80"}
    for args in (("-i", "hub", "--task-id", "cli-narrow-table"), ("-i", "edge", "--hosted")):
        table = await fedagent("agents", *args, "--data-dir", data_dir, env=narrow)
        assert table.code == 0, table.err
        lines = [line for line in table.out.splitlines() if line.strip()]
        assert all(len(line) <= 80 for line in lines), table.out
        header, _rule, *rows = lines
        assert header.split()[:2] == ["agent", "state"] and "task" in header, table.out
        # each agent on one line, with its whole id to copy into `fedagent status`
        assert all(re.match(r"\s*[0-9a-f-]{36}\s", row) for row in rows), table.out
        [mine] = [row for row in rows if body["agentId"] in row]
        assert "completed" in mine and "cli-narr" in mine, table.out


async def test_spawn_from_a_file_then_kill(
    hub: Instance, hub_edge: str, data_dir: str, tmp_path: Path
) -> None:
    script = tmp_path / "task.txt"
    script.write_text("$ sleep 300\n")
    spawned = await fedagent(
        "spawn", "-i", "hub", "--data-dir", data_dir, "--connection", hub_edge, "-f", str(script),
        "--task-id", "cli-kill", "--json",
    )  # fmt: skip
    assert spawned.code == 0, spawned.err
    agent_id = spawned.json()["agentId"]
    await hub.wait_agent(agent_id, {"running"})
    killed = await fedagent("kill", agent_id, "-i", "hub", "--data-dir", data_dir, "--json")
    assert killed.code == 0, killed.err
    assert killed.json() == {"agentId": agent_id, "state": "killed", "confirmed": True}
    follow = await fedagent("status", agent_id, "-i", "hub", "--data-dir", data_dir, "--follow")
    assert follow.code == 0 and "killed" in follow.out


async def test_url_and_token_from_the_environment(hub: Instance, hub_edge: str) -> None:
    token = hub.auth["Authorization"].split(" ", 1)[1]
    ok = await fedagent("agents", "--json", env={"FEDAGENT_URL": hub.url, "FEDAGENT_TOKEN": token})
    assert ok.code == 0, ok.err
    assert isinstance(ok.json(), list)
    bad = await fedagent("agents", env={"FEDAGENT_URL": hub.url, "FEDAGENT_TOKEN": "nope"})
    assert bad.code == 1
    assert "unauthenticated" in bad.err and "hint:" in bad.err
    gone = await fedagent("agents", "--url", "http://127.0.0.1:9", "--token", "x")
    assert gone.code == 1
    assert "cannot reach" in gone.err and "fedagent doctor" in gone.err


async def test_which_instance_and_unknown_agent_are_explained(
    hub_edge: str, data_dir: str, tmp_path: Path
) -> None:
    ambiguous = await fedagent("agents", "--data-dir", data_dir, env={"FEDAGENT_URL": ""})
    assert ambiguous.code == 1
    assert "--instance" in ambiguous.err and "hub" in ambiguous.err
    unknown = await fedagent("agents", "-i", "nowhere", "--data-dir", data_dir)
    assert unknown.code == 1 and "no instance 'nowhere'" in unknown.err
    missing = await fedagent(
        "status", "00000000-0000-4000-8000-000000000000", "-i", "hub", "--data-dir", data_dir
    )
    assert missing.code == 1 and "agent_not_found" in missing.err
    no_stack = await fedagent("agents", "--data-dir", str(tmp_path), env={"FEDAGENT_URL": ""})
    assert no_stack.code == 1 and "fedagent dev" in no_stack.err


async def test_keys_rotate_and_token_create(edge: Instance, hub_edge: str, data_dir: str) -> None:
    card = (await edge.http.get(f"{edge.url}/api/v1/federation/instance")).json()
    rotated = await fedagent("keys", "rotate", "-i", "edge", "--data-dir", data_dir, "--json")
    assert rotated.code == 0, rotated.err
    new_key = rotated.json()["keyId"]
    statuses = {k["keyId"]: k["status"] for k in rotated.json()["keys"]}
    assert statuses[new_key] == "active"
    assert all(statuses[k["keyId"]] == "retiring" for k in card["keys"] if k["keyId"] != new_key)

    made = await fedagent(
        "token", "create", "--instance", "edge", "--data-dir", data_dir, "--role", "member"
    )
    assert made.code == 0, made.err
    token = made.out.strip()
    listed = await fedagent("agents", "--url", edge.url, "--token", token, "--json")
    assert listed.code == 0, listed.err
    refused = await fedagent("connections", "--url", edge.url, "--token", token)
    assert refused.code == 1 and "forbidden" in refused.err


async def test_doctor_on_a_running_instance(hub: Instance, data_dir: str) -> None:
    run = await fedagent("doctor", "-i", "hub", "--data-dir", data_dir, "--json")
    checks = {c["name"]: c for c in run.json()}
    assert run.code == 0, checks
    for name in ("temporal", "temporal namespace", "search attributes", "postgresql", "master key"):
        assert checks[name]["status"] == "ok", checks[name]
    assert "ok" in (checks["bubblewrap"]["status"], checks["docker"]["status"])
    table = await fedagent("doctor", "-i", "hub", "--data-dir", data_dir)
    assert "ready to run an instance" in table.out
