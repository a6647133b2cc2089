"""Results by reference: a run's whole diff is an artifact on the executor, fetched once by the
requester over a signed agent.artifact and served to its users; workflows and events carry only
hashes, sizes and bounded previews, so a big result neither fails a run nor bloats a history."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from temporalio.client import WorkflowExecutionStatus

from cli.devstack import DevStack
from tests.conftest import Instance
from tests.e2e.helpers import spawn_body
from tests.e2e.test_users import bearer, cli_token

pytestmark = pytest.mark.e2e

BIG_FILE = "$ head -c 3000000 /dev/urandom | base64 > big.txt"
HISTORY_LIMIT = 256 * 1024
PREVIEW_LIMIT = 16 * 1024


async def closed_history_size(instance: Instance, workflow_id: str) -> tuple[Any, int]:
    """Wait for the workflow to close; its status and the serialized size of its history."""
    client = await instance.temporal()
    handle = client.get_workflow_handle(workflow_id)
    deadline = time.monotonic() + 60
    while (description := await handle.describe()).status == WorkflowExecutionStatus.RUNNING:
        assert time.monotonic() < deadline, f"{workflow_id} is still running"
        await asyncio.sleep(0.2)
    history = await handle.fetch_history()
    return description.status, sum(event.ByteSize() for event in history.events)


async def artifact_requests(instance: Instance, agent_id: str, direction: str) -> int:
    rows = await instance.fetch(
        "SELECT count(*) AS n FROM messages WHERE command_type = 'agent.artifact'"
        " AND direction = $1 AND agent_id = $2",
        direction,
        uuid.UUID(agent_id),
    )
    return int(rows[0]["n"])


@pytest.fixture(scope="module")
async def big_run(hub: Instance, hub_spoke: str) -> dict[str, Any]:
    body = spawn_body(hub_spoke, BIG_FILE, task_id="big-diff", timeout=180)
    response = await hub.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 202, response.text
    agent = await hub.wait_agent(body["agentId"], timeout=180)
    return agent


async def test_an_agent_writing_a_4_mb_file_completes_on_both_sides_with_small_histories(
    hub: Instance, spoke: Instance, big_run: dict[str, Any]
) -> None:
    agent_id = big_run["agentId"]
    assert big_run["state"] == "completed", big_run
    result = big_run["result"]
    # The result names the whole diff by reference and carries only a bounded preview of it.
    assert result["diffBytes"] > 4_000_000 and not result["diffTruncated"]
    assert result["artifacts"]["diff"] == {
        "sha256": result["diffSha256"],
        "bytes": result["diffBytes"],
    }
    assert result["artifacts"]["log"] == {
        "sha256": result["logSha256"],
        "bytes": result["logBytes"],
    }
    assert "diff" not in result
    assert 0 < len(result["diffPreview"].encode()) <= PREVIEW_LIMIT
    assert result["diffPreview"].startswith("diff --git a/big.txt b/big.txt")
    assert result["changedFiles"] == ["big.txt"] and result["diffOmittedFiles"] == []

    rows = await spoke.fetch(
        "SELECT state FROM agents WHERE role = 'executor' AND agent_id = $1", uuid.UUID(agent_id)
    )
    assert [r["state"] for r in rows] == ["completed"]
    status, size = await closed_history_size(spoke, f"agent-run/{hub.id}/{agent_id}")
    assert status == WorkflowExecutionStatus.COMPLETED
    assert size < HISTORY_LIMIT, f"executor history is {size} bytes"
    status, size = await closed_history_size(hub, f"remote-agent/{agent_id}")
    assert status == WorkflowExecutionStatus.COMPLETED
    assert size < HISTORY_LIMIT, f"requester history is {size} bytes"


async def test_the_requester_serves_the_whole_diff_fetched_once_from_the_executor(
    hub: Instance, spoke: Instance, big_run: dict[str, Any], stack: DevStack, tmp_path: Path
) -> None:
    agent_id = big_run["agentId"]
    result = big_run["result"]
    response = await hub.call("GET", f"/agents/{agent_id}/diff")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/x-diff")
    assert len(response.content) == result["diffBytes"]
    assert hashlib.sha256(response.content).hexdigest() == result["diffSha256"]
    asked = await artifact_requests(hub, agent_id, "out")
    assert asked >= 2  # the answers are bounded: a 4 MB diff comes in pieces
    assert await artifact_requests(spoke, agent_id, "in") == asked

    # The patch recreates exactly what the agent wrote.
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    subprocess.run(["git", "apply", "-"], input=response.content, cwd=tmp_path, check=True)
    workspace = stack.data_dir / "workspaces" / "spoke" / hub.id / agent_id
    assert (tmp_path / "big.txt").read_bytes() == (workspace / "big.txt").read_bytes()

    # Kept on the requester: a second read asks the executor nothing.
    again = await hub.call("GET", f"/agents/{agent_id}/diff")
    assert again.content == response.content
    assert await artifact_requests(hub, agent_id, "out") == asked

    log = await hub.call("GET", f"/agents/{agent_id}/log")
    assert log.status_code == 200
    assert hashlib.sha256(log.content).hexdigest() == result["logSha256"]
    assert log.content.decode().startswith("$ head -c 3000000")


async def test_fedagent_diff_writes_the_whole_diff_checked_against_the_result(
    hub: Instance, big_run: dict[str, Any], stack: DevStack, tmp_path: Path
) -> None:
    from tests.cli.test_cli import fedagent

    agent_id = big_run["agentId"]
    for args in (["diff", agent_id], ["status", agent_id, "--diff"]):
        patch = tmp_path / "x.patch"
        process = await asyncio.create_subprocess_shell(
            " ".join(
                [
                    f"{sys.executable} -m cli.main",
                    *args,
                    "--instance hub",
                    f"--data-dir {stack.data_dir}",
                    f"> {patch}",
                ]
            ),
            cwd=Path(__file__).resolve().parents[2],
            stderr=asyncio.subprocess.PIPE,
        )
        _, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        data = patch.read_bytes()
        assert len(data) == big_run["result"]["diffBytes"]
        assert hashlib.sha256(data).hexdigest() == big_run["result"]["diffSha256"]
    missing = await fedagent(
        "diff", str(uuid.uuid4()), "--instance", "hub", "--data-dir", str(stack.data_dir)
    )
    assert missing.code == 1 and "agent_not_found" in missing.err + missing.out


async def test_a_member_sees_the_diff_of_its_workspace_only(
    hub: Instance, hub_spoke: str, stack: DevStack
) -> None:
    carol = bearer(await cli_token(stack, "hub", "member", "ws-diff-a", "carol"))
    dave = bearer(await cli_token(stack, "hub", "member", "ws-diff-b", "dave"))
    body = spawn_body(hub_spoke, "$ echo mine > mine.txt", task_id="ws-diff")
    spawned = await hub.call("POST", "/agents/spawn", json=body, headers=carol)
    assert spawned.status_code == 202, spawned.text
    agent = await hub.wait_agent(body["agentId"])
    assert agent["state"] == "completed", agent

    other = await hub.call("GET", f"/agents/{body['agentId']}/diff", headers=dave)
    assert (other.status_code, other.json()["code"]) == (404, "agent_not_found")
    assert other.headers["content-type"].startswith("application/problem+json")
    # Nothing was fetched for him.
    assert await artifact_requests(hub, body["agentId"], "out") == 0
    own = await hub.call("GET", f"/agents/{body['agentId']}/diff", headers=carol)
    assert own.status_code == 200
    assert "+mine" in own.text
    assert hashlib.sha256(own.content).hexdigest() == agent["result"]["diffSha256"]


async def test_a_run_without_a_diff_yet_answers_409(hub: Instance, hub_spoke: str) -> None:
    body = spawn_body(hub_spoke, "$ sleep 60", task_id="no-diff-yet", timeout=120)
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    await hub.wait_agent(body["agentId"], {"running"})
    try:
        early = await hub.call("GET", f"/agents/{body['agentId']}/diff")
        assert (early.status_code, early.json()["code"]) == (409, "artifact_not_ready")
        unknown = await hub.call("GET", f"/agents/{uuid.uuid4()}/diff")
        assert (unknown.status_code, unknown.json()["code"]) == (404, "agent_not_found")
    finally:
        await hub.call("POST", f"/agents/{body['agentId']}/kill")


async def test_an_executor_that_does_not_grant_agent_artifact_gives_no_diff(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    body = spawn_body(hub_spoke, "$ echo granted > g.txt", task_id="artifact-grant")
    assert (await hub.call("POST", "/agents/spawn", json=body)).status_code == 202
    agent = await hub.wait_agent(body["agentId"])
    assert agent["state"] == "completed", agent
    before = (await spoke.call("GET", f"/connections/{hub_spoke}")).json()["grants"]
    assert "agent.artifact" in before["commandTypes"]
    without = [c for c in before["commandTypes"] if c != "agent.artifact"]
    patched = await spoke.call(
        "PATCH", f"/connections/{hub_spoke}", json={"grants": {"commandTypes": without}}
    )
    assert patched.status_code == 200, patched.text
    try:
        refused = await hub.call("GET", f"/agents/{body['agentId']}/diff")
        assert refused.status_code == 502, refused.text
        problem = refused.json()
        assert (problem["code"], problem["peerCode"]) == (
            "artifact_unavailable",
            "grant_command_type",
        )
    finally:
        restored = await spoke.call(
            "PATCH",
            f"/connections/{hub_spoke}",
            json={"grants": {"commandTypes": before["commandTypes"]}},
        )
        assert restored.status_code == 200, restored.text
    granted = await hub.call("GET", f"/agents/{body['agentId']}/diff")
    assert granted.status_code == 200 and "+granted" in granted.text
