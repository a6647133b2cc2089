"""A newcomer's first hour with `fedagent`, against the real stack: a member spawns with the CLI,
an executor sees and kills what it hosts, narrowed grants reach the requester and refuse a spawn
at once, a scripted task with no command fails with the reason, the card tells the truth,
`status` shows changed files, links and names, failures are one line, and readiness means
workers poll."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cli.devstack import DevStack, free_port_block
from federation.settings import Settings
from tests.cli.test_cli import fedagent
from tests.conftest import Instance

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def data_dir(stack: DevStack) -> str:
    return str(stack.data_dir)


@pytest.fixture(scope="module")
async def edge_hub(edge: Instance, hub: Instance, data_dir: str) -> AsyncIterator[str]:
    """edge asks hub for a connection and hub accepts (`fedagent connect hub --accept`)."""
    made = await fedagent(
        "connect", "hub", "-i", "edge", "--data-dir", data_dir, "--accept", "--json"
    )
    assert made.code == 0, made.err
    connection = made.json()
    assert connection["status"] == "ACTIVE"
    yield connection["connectionId"]
    await edge.call("POST", f"/connections/{connection['connectionId']}/disconnect")


async def member_token(data_dir: str, instance: str) -> str:
    made = await fedagent(
        "token", "create", "-i", instance, "--data-dir", data_dir, "--role", "member"
    )
    assert made.code == 0, made.err
    return made.out.strip()


# --- point 2: members spawn with the CLI ---------------------------------------------------------


async def test_a_member_spawns_with_the_cli_and_sees_the_peers_it_may_use(
    edge: Instance, edge_hub: str, data_dir: str
) -> None:
    token = await member_token(data_dir, "edge")
    member = {"FEDAGENT_URL": edge.url, "FEDAGENT_TOKEN": token}
    peers = await fedagent("peers", "--json", env=member)
    assert peers.code == 0, peers.err
    [mine] = [p for p in peers.json() if p["connectionId"] == edge_hub]
    assert mine["peerName"] == "hub" and mine["status"] == "ACTIVE"
    assert mine["peerGrants"]["agentTypes"]  # what hub allows edge, as hub told it at accept

    by_id = await fedagent(
        "spawn", "--connection", edge_hub, "-m", "$ echo by-member", "--follow", env=member
    )
    assert by_id.code == 0, by_id.out + by_id.err
    assert "completed" in by_id.out and "by-member" in by_id.out
    by_name = await fedagent("spawn", "--peer", "hub", "-m", "$ true", "--json", env=member)
    assert by_name.code == 0, by_name.err
    assert by_name.json()["state"] == "spawning"


# --- point 3: an executor sees and kills what it hosts -------------------------------------------


async def test_an_executor_lists_and_kills_the_runs_peers_started_on_it(
    edge: Instance, hub: Instance, edge_hub: str, data_dir: str
) -> None:
    spawned = await fedagent(
        "spawn", "-i", "edge", "--data-dir", data_dir, "--peer", "hub", "-m", "$ sleep 300",
        "--task-id", "hosted-1", "--json",
    )  # fmt: skip
    assert spawned.code == 0, spawned.err
    agent_id = spawned.json()["agentId"]
    await edge.wait_agent(agent_id, {"running"})

    hosted = await fedagent(
        "agents", "-i", "hub", "--data-dir", data_dir, "--hosted", "--peer", "edge",
        "--state", "running", "--json",
    )  # fmt: skip
    assert hosted.code == 0, hosted.err
    [run] = [r for r in hosted.json() if r["agentId"] == agent_id]
    assert run["peerInstanceId"] == edge.id and run["taskId"] == "hosted-1"
    table = await fedagent("agents", "-i", "hub", "--data-dir", data_dir, "--hosted")
    assert agent_id in table.out and "edge" in table.out

    killed = await fedagent(
        "kill", agent_id, "-i", "hub", "--data-dir", data_dir, "--hosted", "--json"
    )
    assert killed.code == 0, killed.err
    assert killed.json() == {"agentId": agent_id, "state": "killed", "confirmed": True}
    assert (await edge.wait_agent(agent_id))["state"] == "killed"  # the requester hears it

    member = await member_token(data_dir, "hub")
    refused = await fedagent("agents", "--hosted", "--url", hub.url, "--token", member)
    assert refused.code == 1 and "forbidden" in refused.err


# --- point 10: narrowed grants reach the requester, which refuses at once ------------------------


async def test_narrowed_grants_reach_the_requester_and_a_spawn_they_refuse_fails_at_once(
    edge: Instance, hub: Instance, edge_hub: str, data_dir: str
) -> None:
    narrowed = await hub.call(
        "PATCH",
        f"/connections/{edge_hub}",
        json={"grants": {"agentTypes": ["reviewer"], "maxTimeout": 600}},
    )
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.json()["peerNotified"] is True
    try:
        shown = await fedagent("connections", "-i", "edge", "--data-dir", data_dir, "--json")
        [row] = [c for c in shown.json() if c["connectionId"] == edge_hub]
        assert row["peerGrants"]["agentTypes"] == ["reviewer"]
        assert row["peerGrants"]["maxTimeout"] == 600
        before = len((await edge.call("GET", "/agents", params={"limit": 500})).json())

        worker = await fedagent(
            "spawn", "-i", "edge", "--data-dir", data_dir, "--peer", "hub", "-m", "$ true"
        )
        assert worker.code == 1 and "grant_agent_type" in worker.err, worker.err
        default_timeout = await fedagent(
            "spawn", "-i", "edge", "--data-dir", data_dir, "--peer", "hub", "--type", "reviewer",
            "-m", "$ true",
        )  # fmt: skip
        assert default_timeout.code == 1, default_timeout.out
        assert "grant_timeout" in default_timeout.err and "600" in default_timeout.err
        after = len((await edge.call("GET", "/agents", params={"limit": 500})).json())
        assert after == before  # refused before anything was stored or sent

        fits = await fedagent(
            "spawn", "-i", "edge", "--data-dir", data_dir, "--peer", "hub", "--type", "reviewer",
            "--timeout", "60", "-m", "$ true", "--follow",
        )  # fmt: skip
        assert fits.code == 0, fits.out + fits.err
    finally:
        await hub.call(
            "PATCH",
            f"/connections/{edge_hub}",
            json={"grants": {"agentTypes": ["worker", "reviewer", "tester"], "maxTimeout": 86400}},
        )


# --- point 5: a scripted task with no command ----------------------------------------------------


async def test_a_scripted_task_without_a_command_line_fails_and_says_why(
    edge: Instance, edge_hub: str, data_dir: str
) -> None:
    prose = await fedagent(
        "spawn", "-i", "edge", "--data-dir", data_dir, "--peer", "hub", "-m", "Say hello.",
        "-m", "  $ echo indented", "--follow",
    )  # fmt: skip
    assert prose.code == 1, prose.out
    assert "failed" in prose.out and "'$ '" in prose.out
    assert "all commands succeeded" not in prose.out

    nothing = await fedagent("spawn", "-i", "edge", "--data-dir", data_dir, "--peer", "hub")
    assert nothing.code == 1 and "-m TEXT" in nothing.err and "-f FILE" in nothing.err


# --- point 6: the identity card ------------------------------------------------------------------


async def test_the_identity_card_says_which_sandbox_and_model_provider_runs_agents(
    hub: Instance,
) -> None:
    card = (await hub.http.get(f"{hub.url}/api/v1/federation/instance")).json()
    settings = Settings()  # the stack's processes run with this environment
    assert card["capabilities"]["sandboxes"] == [settings.sandbox]
    assert card["capabilities"]["modelProviders"] == [settings.model_provider]


# --- point 8: status -----------------------------------------------------------------------------


async def test_status_shows_the_peer_by_name_changed_files_and_both_temporal_links(
    edge: Instance, hub: Instance, edge_hub: str, data_dir: str
) -> None:
    run = await fedagent(
        "spawn", "-i", "edge", "--data-dir", data_dir, "--peer", "hub", "-m",
        "$ echo hi > hello.txt", "--json",
    )  # fmt: skip
    agent_id = run.json()["agentId"]
    await edge.wait_agent(agent_id)
    shown = await fedagent("status", agent_id, "-i", "edge", "--data-dir", data_dir)
    assert shown.code == 0, shown.err
    assert f"hub ({hub.id})" in shown.out
    assert "hello.txt" in shown.out
    assert "requester (edge):" in shown.out and "remote-agent%2F" in shown.out
    assert "executor (hub):" in shown.out and f"agent-run%2F{edge.id}%2F{agent_id}" in shown.out
    hosted = await fedagent("status", agent_id, "-i", "hub", "--data-dir", data_dir, "--hosted")
    assert hosted.code == 0 and f"edge ({edge.id})" in hosted.out


# --- point 7 and 12: one line, the right words ---------------------------------------------------


async def test_cli_failures_are_one_line_with_a_hint(data_dir: str, tmp_path: Path) -> None:
    closed = free_port_block(1)
    token = await fedagent(
        "token", "create", "--role", "member", "--workspace", "team-a",
        env={"FEDAGENT_DATABASE_URL": f"postgresql://nobody@127.0.0.1:{closed}/none"},
    )  # fmt: skip
    assert token.code == 1
    assert "Traceback" not in token.err
    assert "cannot reach the database" in token.err and "hint:" in token.err

    missing = await fedagent(
        "spawn", "-i", "edge", "--data-dir", data_dir, "-f", str(tmp_path / "nope.txt")
    )
    assert missing.code == 1 and "Traceback" not in missing.err
    assert "no file" in missing.err and "nope.txt" in missing.err

    bad_id = await fedagent("status", "not-an-id", "-i", "edge", "--data-dir", data_dir)
    assert bad_id.code == 1
    assert "AGENT_ID 'not-an-id'" in bad_id.err and "path." not in bad_id.err

    gone = await fedagent("agents", "--url", f"http://127.0.0.1:{closed}", "--token", "x")
    assert gone.err.count(f"127.0.0.1:{closed}") == 1  # the URL once, not twice


async def test_data_dir_comes_from_the_environment(data_dir: str) -> None:
    listed = await fedagent("agents", "-i", "edge", "--json", env={"FEDAGENT_DATA_DIR": data_dir})
    assert listed.code == 0, listed.err


# --- point 1: readiness means workers poll both task queues --------------------------------------


@pytest.fixture
async def api_without_workers(stack: DevStack, tmp_path: Path) -> AsyncIterator[str]:
    """One more API of hub whose task queue no worker polls."""
    port = free_port_block(1)
    log = tmp_path / "api.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "serve"],
            env={
                **os.environ,
                **stack.instances["hub"].env,
                "FEDAGENT_API_PORT": str(port),
                "FEDAGENT_TASK_QUEUE": "fedagent-nobody-polls",
            },
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient(timeout=5) as http:
            deadline = time.monotonic() + 180
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    if (await http.get(f"{url}/healthz")).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, log.read_text()
                await asyncio.sleep(0.2)
        yield url
    finally:
        DevStack.stop_process(proc)


async def test_readyz_and_doctor_say_not_ready_when_no_worker_polls(
    api_without_workers: str, hub: Instance, stack: DevStack
) -> None:
    ready = await hub.http.get(f"{api_without_workers}/readyz")
    assert ready.status_code == 503
    assert ready.headers["content-type"] == "application/problem+json"
    body = ready.json()
    assert body["code"] == "not_ready"
    assert body["checks"]["postgres"] == "ok" and body["checks"]["temporal"] == "ok"
    assert "fedagent-nobody-polls" in body["checks"]["workers"]

    env = {**stack.instances["hub"].env, "FEDAGENT_TASK_QUEUE": "fedagent-nobody-polls"}
    doctor = await fedagent("doctor", "--json", env=env)
    checks = {c["name"]: c for c in doctor.json()}
    assert checks["workers"]["status"] == "warn"
    assert "no worker polls fedagent-nobody-polls" in checks["workers"]["detail"]


async def test_doctor_checks_the_live_instance(hub: Instance, data_dir: str) -> None:
    run = await fedagent("doctor", "-i", "hub", "--data-dir", data_dir, "--json")
    checks = {c["name"]: c for c in run.json()}
    assert checks["api"]["status"] == "ok", checks["api"]
    assert checks["workers"]["status"] == "ok", checks
    assert "fedagent-hub-agents" in checks["workers"]["detail"]
