"""Any A2A agent as a peer (issue 23, point 3), on the real stack over loopback.

The foreign agent is built with the official a2a-sdk server (tests/e2e/a2a_agent.py); lying
agents are written from the wire contract. hub adds them by their card URL (the stack's
FEDAGENT_OUTBOUND_ALLOWLIST lets 127.0.0.1 through, as for every loopback peer)."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from cli.devstack import DevStack
from federation.envelope import generate_signing_key
from tests.conftest import Instance
from tests.e2e.a2a_agent import DIFF, HonestAgent, LyingAgent
from tests.e2e.helpers import run_cli, spawn_body
from tests.e2e.signing import assert_refused, craft, spawn_payload
from tests.e2e.test_local_runs import local_body
from tests.workflows.peer import save_history

pytestmark = pytest.mark.e2e
TOKEN = "foreign-secret-token"


@pytest.fixture(scope="module")
async def honest() -> AsyncIterator[HonestAgent]:
    agent = HonestAgent()
    async with agent.serve():
        yield agent


@pytest.fixture(scope="module")
async def liar() -> AsyncIterator[LyingAgent]:
    agent = LyingAgent()
    async with agent.serve():
        yield agent


async def add_a2a(hub: Instance, url: str, token: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"kind": "a2a", "remoteUrl": url}
    if token:
        body["token"] = token
    answer = await hub.call("POST", "/connections", json=body)
    assert answer.status_code == 201, answer.text
    return dict(answer.json())


@pytest.fixture(scope="module")
async def honest_connection(hub: Instance, honest: HonestAgent) -> AsyncIterator[str]:
    connection = await add_a2a(hub, honest.url, TOKEN)
    yield str(connection["connectionId"])
    await hub.call("POST", f"/connections/{connection['connectionId']}/disconnect")


async def spawn(hub: Instance, connection_id: str, instructions: str) -> str:
    body = spawn_body(connection_id, instructions, timeout=60)
    answer = await hub.call("POST", "/agents/spawn", json=body)
    assert answer.status_code == 202, answer.text
    return str(body["agentId"])


async def keep_history(hub: Instance, agent_id: str, name: str) -> None:
    """With FEDAGENT_RECORD_HISTORIES: the A2A path's history, for the replay test."""
    client = await hub.temporal()
    handle = client.get_workflow_handle(f"remote-agent/{agent_id}")
    with contextlib.suppress(Exception):
        await handle.result()
    await save_history(client, handle, name)


async def states_of(hub: Instance, agent_id: str) -> list[str]:
    rows = await hub.fetch(
        "SELECT state FROM agent_events WHERE agent_id = $1 ORDER BY id", uuid.UUID(agent_id)
    )
    return [r["state"] for r in rows]


async def test_an_a2a_agent_is_added_by_its_card_active_at_once_with_its_kind_shown(
    stack: DevStack, hub: Instance, honest: HonestAgent, honest_connection: str
) -> None:
    connection = (await hub.call("GET", f"/connections/{honest_connection}")).json()
    assert connection["kind"] == "a2a" and connection["status"] == "ACTIVE"
    assert connection["remoteName"] == "sdk-agent"
    assert connection["a2aEndpoint"] == f"{honest.url}/a2a"
    assert connection["hasCredentials"] is True and TOKEN not in json.dumps(connection)
    # The credentials are kept sealed, never in plain text.
    (row,) = await hub.fetch(
        "SELECT credentials_sealed FROM connections WHERE connection_id = $1",
        uuid.UUID(honest_connection),
    )
    assert row["credentials_sealed"].startswith("aesgcm1:") and TOKEN not in row[0]
    peers = (await hub.call("GET", "/peers")).json()
    assert {"kind": "a2a", "peerName": "sdk-agent"}.items() <= next(
        p for p in peers if p["connectionId"] == honest_connection
    ).items()
    listed = await run_cli(stack.data_dir, "connections", "--instance", "hub")
    assert "sdk-agent" in listed and "a2a" in listed
    listed = await run_cli(stack.data_dir, "peers", "--instance", "hub")
    assert "sdk-agent" in listed and "a2a" in listed


async def test_a_spawn_on_an_a2a_agent_completes_with_its_summary_and_diff(
    stack: DevStack, hub: Instance, honest: HonestAgent, honest_connection: str
) -> None:
    agent_id = await spawn(hub, honest_connection, "complete the work")
    agent = await hub.wait_agent(agent_id)
    assert agent["state"] == "completed", agent
    result = agent["result"]
    assert result["summary"] == "done: complete the work"
    assert result["changedFiles"] == ["hello.txt"]
    diff = await hub.call("GET", f"/agents/{agent_id}/diff")
    assert diff.status_code == 200 and diff.content == DIFF
    # The message: messageId = agentId, sent with the connection's credentials.
    assert agent_id in honest.handler.message_ids
    assert f"Bearer {TOKEN}" in honest.authorizations
    shown = await run_cli(stack.data_dir, "status", agent_id, "--instance", "hub")
    assert "completed" in shown and "done: complete the work" in shown
    assert (await states_of(hub, agent_id))[-1] == "completed"
    await keep_history(hub, agent_id, "requester-a2a-completed")


async def test_the_agent_views_show_the_peers_kind(
    stack: DevStack, hub: Instance, hub_spoke: str, honest_connection: str
) -> None:
    """REST (one agent, the list), the CLI (the table, status) say whether the agent runs on
    an A2A agent, another fedagent instance or this instance (a local run)."""
    on_a2a = await spawn(hub, honest_connection, "complete for the views")
    on_fedagent = await spawn(hub, hub_spoke, "$ echo kinds")
    local = local_body("$ echo local kinds")
    assert (await hub.call("POST", "/agents/spawn", json=local)).status_code == 202
    expected = {on_a2a: "a2a", on_fedagent: "fedagent", str(local["agentId"]): "local"}
    for agent_id, kind in expected.items():
        agent = await hub.wait_agent(agent_id)
        assert agent["peerKind"] == kind, agent
    listed = (await hub.call("GET", "/agents", params={"limit": 500})).json()
    assert {a["agentId"]: a["peerKind"] for a in listed if a["agentId"] in expected} == expected
    table = await run_cli(stack.data_dir, "agents", "--instance", "hub", "-n", "500")
    [line] = [row for row in table.splitlines() if on_a2a in row]
    assert "sdk-agent (a2a)" in line, table
    [line] = [row for row in table.splitlines() if on_fedagent in row]
    assert "(fedagent)" in line, table
    shown = await run_cli(stack.data_dir, "status", on_a2a, "--instance", "hub")
    assert re.search(r"peer kind\s+a2a", shown), shown


async def test_a_kill_of_a_run_on_an_a2a_agent_cancels_its_task(
    hub: Instance, honest: HonestAgent, honest_connection: str
) -> None:
    agent_id = await spawn(hub, honest_connection, "work forever")
    await hub.wait_agent(agent_id, ("running",))
    (row,) = await hub.fetch(
        "SELECT remote_task_id FROM agents WHERE agent_id = $1", uuid.UUID(agent_id)
    )
    killed = await hub.call("POST", f"/agents/{agent_id}/kill")
    assert killed.status_code == 200, killed.text
    assert killed.json()["state"] == "killed" and killed.json()["confirmed"] is True
    assert row["remote_task_id"] in honest.executor.cancelled
    await keep_history(hub, agent_id, "requester-a2a-killed")


async def test_a_lost_answer_to_the_send_makes_no_second_task(
    hub: Instance, honest: HonestAgent, honest_connection: str
) -> None:
    before = len(honest.executor.tasks)
    honest.lose.lose_next = True  # the task is made, its answer lost: the send is retried
    agent_id = await spawn(hub, honest_connection, "complete after a lost answer")
    agent = await hub.wait_agent(agent_id)
    assert agent["state"] == "completed", agent
    assert len(honest.executor.tasks) == before + 1  # one task
    assert honest.handler.message_ids.count(agent_id) == 2  # sent twice, the same messageId


async def test_an_agent_that_asks_for_input_ends_the_run_failed_saying_why(
    hub: Instance, honest_connection: str
) -> None:
    agent_id = await spawn(hub, honest_connection, "ask for input")
    agent = await hub.wait_agent(agent_id)
    assert agent["state"] == "failed"
    assert "asks for more input" in agent["error"]


async def test_a_card_that_is_too_large_or_names_a_refused_interface_is_refused(
    hub: Instance, liar: LyingAgent
) -> None:
    before = await hub.fetch("SELECT count(*) FROM connections WHERE kind = 'a2a'")
    answer = await hub.call(
        "POST", "/connections", json={"kind": "a2a", "remoteUrl": f"{liar.url}/huge-card"}
    )
    assert answer.status_code == 502, answer.text
    assert "larger than 65536 bytes" in answer.json()["detail"]
    answer = await hub.call(
        "POST", "/connections", json={"kind": "a2a", "remoteUrl": f"{liar.url}/far-interface"}
    )
    assert answer.status_code == 403 and answer.json()["code"] == "address_not_allowed"
    answer = await hub.call(
        "POST", "/connections", json={"kind": "a2a", "remoteUrl": "http://10.0.0.1/agent"}
    )
    assert answer.status_code == 403 and answer.json()["code"] == "address_not_allowed"
    answer = await hub.call(
        "POST", "/connections", json={"remoteUrl": f"{liar.url}/x", "token": "t"}
    )
    assert answer.status_code == 422
    assert await hub.fetch("SELECT count(*) FROM connections WHERE kind = 'a2a'") == before


async def test_a_card_that_never_ends_is_given_up_on(hub: Instance, liar: LyingAgent) -> None:
    answer = await hub.call(
        "POST", "/connections", json={"kind": "a2a", "remoteUrl": f"{liar.url}/slow-card"}
    )
    assert answer.status_code == 502 and answer.json()["code"] == "peer_unreachable"
    assert "timeout" in answer.json()["detail"]


async def run_on_liar(
    hub: Instance, liar: LyingAgent, scenario: str, token: str | None = None
) -> dict[str, Any]:
    connection = await add_a2a(hub, f"{liar.url}/{scenario}", token)
    try:
        agent_id = await spawn(hub, str(connection["connectionId"]), f"lie: {scenario}")
        agent = await hub.wait_agent(agent_id, timeout=60)
        agent["states"] = await states_of(hub, agent_id)
        return agent
    finally:
        await hub.call("POST", f"/connections/{connection['connectionId']}/disconnect")


async def test_states_going_backwards_are_ignored(hub: Instance, liar: LyingAgent) -> None:
    agent = await run_on_liar(hub, liar, "backwards")
    assert agent["state"] == "completed"
    assert agent["states"] == ["spawning", "running", "completed"]
    assert liar.calls["backwards"].count("GetTask") >= 3  # it did say SUBMITTED after WORKING


@pytest.mark.parametrize(
    ("scenario", "reason"),
    [
        ("other-id", "answered about task"),
        ("malformed", "a2a_answer_invalid"),
        ("not-json", "is not JSON"),
        ("huge-artifact", "larger than"),
    ],
)
async def test_a_lying_agent_ends_the_run_failed_with_a_clear_reason(
    hub: Instance, liar: LyingAgent, scenario: str, reason: str
) -> None:
    agent = await run_on_liar(hub, liar, scenario)
    assert agent["state"] == "failed", agent
    assert reason in agent["error"], agent["error"]
    assert "CancelTask" in liar.calls[scenario]  # the task was asked to stop


async def test_the_cli_adds_an_a2a_agent(stack: DevStack, hub: Instance, liar: LyingAgent) -> None:
    out = await run_cli(
        stack.data_dir,
        "connect",
        "--a2a",
        f"{liar.url}/cli-card",
        "--a2a-token",
        "cli-secret",
        "--instance",
        "hub",
        "--json",
    )
    connection = json.loads(out)
    assert connection["kind"] == "a2a" and connection["status"] == "ACTIVE"
    assert connection["remoteName"] == "liar cli-card" and connection["hasCredentials"]
    grants = await hub.call(
        "PATCH", f"/connections/{connection['connectionId']}", json={"grants": {"agentTypes": []}}
    )
    assert grants.status_code == 409  # an A2A agent may ask nothing of this instance
    suspended = await hub.call("POST", f"/connections/{connection['connectionId']}/suspend")
    assert suspended.status_code == 200 and suspended.json()["status"] == "SUSPENDED"
    resumed = await hub.call("POST", f"/connections/{connection['connectionId']}/resume")
    assert resumed.status_code == 200 and resumed.json()["status"] == "ACTIVE"
    ended = await hub.call("POST", f"/connections/{connection['connectionId']}/disconnect")
    assert ended.json()["status"] == "DISCONNECTED"


async def test_another_instance_is_an_a2a_peer_through_its_a2a_face(
    hub: Instance, spoke: Instance
) -> None:
    """Interoperability both ways: hub's A2A client face spawns on spoke's A2A server face
    (a local run there), with spoke's API token as the connection's credentials."""
    connection = await add_a2a(hub, spoke.url, spoke.info["adminToken"])
    try:
        assert connection["remoteName"] == spoke.name
        agent_id = await spawn(hub, str(connection["connectionId"]), "$ echo a2a > peer.txt")
        agent = await hub.wait_agent(agent_id, timeout=90)
        assert agent["state"] == "completed", agent
        assert "peer.txt" in agent["result"]["changedFiles"]
        diff = await hub.call("GET", f"/agents/{agent_id}/diff")
        assert diff.status_code == 200 and b"+a2a" in diff.content
        (row,) = await hub.fetch(
            "SELECT remote_task_id FROM agents WHERE agent_id = $1", uuid.UUID(agent_id)
        )
        there = await spoke.call("GET", f"/agents/{row['remote_task_id']}")
        assert there.json()["state"] == "completed" and there.json()["peerInstanceId"] == "_local"
    finally:
        await hub.call("POST", f"/connections/{connection['connectionId']}/disconnect")


async def test_a_diff_by_url_is_kept_and_credentials_go_only_to_the_agents_own_origin(
    hub: Instance, liar: LyingAgent
) -> None:
    for scenario in ("diff-url-same", "diff-url-other"):
        agent = await run_on_liar(hub, liar, scenario, token="liar-token")
        assert agent["state"] == "completed", agent
        assert agent["result"]["changedFiles"] == ["hello.txt"]  # read from the diff
        diff = await hub.call("GET", f"/agents/{agent['agentId']}/diff")
        assert diff.status_code == 200 and diff.content == DIFF
    assert liar.diff_auth == {"same": "Bearer liar-token", "other": None}


async def test_a_signed_message_in_an_a2a_peers_name_is_a_strangers(
    hub: Instance, liar: LyingAgent
) -> None:
    """An A2A agent signs nothing: fedagent/1 in its name is refused as from no known sender
    (its card is never read for keys)."""
    connection = await add_a2a(hub, f"{liar.url}/signs-nothing")
    try:
        envelope = craft(
            generate_signing_key(),
            hub,
            hub,
            spawn_payload(),
            sender_id=str(connection["remoteInstanceId"]),
        )
        await assert_refused(hub, envelope, 401, "sender_unknown")
    finally:
        await hub.call("POST", f"/connections/{connection['connectionId']}/disconnect")


async def test_suspending_an_a2a_connection_ends_its_runs_with_a_cancel(
    hub: Instance, honest: HonestAgent, honest_connection: str
) -> None:
    agent_id = await spawn(hub, honest_connection, "work forever until suspended")
    await hub.wait_agent(agent_id, ("running",))
    (row,) = await hub.fetch(
        "SELECT remote_task_id FROM agents WHERE agent_id = $1", uuid.UUID(agent_id)
    )
    suspended = await hub.call("POST", f"/connections/{honest_connection}/suspend")
    assert suspended.status_code == 200 and suspended.json()["peerNotified"] is False
    try:
        agent = await hub.wait_agent(agent_id, timeout=60)
        assert agent["state"] == "killed", agent
        assert row["remote_task_id"] in honest.executor.cancelled
    finally:
        resumed = await hub.call("POST", f"/connections/{honest_connection}/resume")
        assert resumed.json()["status"] == "ACTIVE"


async def test_a_kill_answered_task_not_cancelable_ends_the_run_as_the_task_says(
    hub: Instance, liar: LyingAgent
) -> None:
    connection = await add_a2a(hub, f"{liar.url}/not-cancelable")
    try:
        agent_id = await spawn(hub, str(connection["connectionId"]), "finish as killed")
        await hub.wait_agent(agent_id, ("running",))
        killed = await hub.call("POST", f"/agents/{agent_id}/kill")
        assert killed.status_code == 200, killed.text
        assert killed.json()["state"] == "completed" and killed.json()["confirmed"] is True
    finally:
        await hub.call("POST", f"/connections/{connection['connectionId']}/disconnect")


async def test_redirects_are_never_followed_for_a_card_or_a_diff(
    hub: Instance, liar: LyingAgent
) -> None:
    """A redirect is an answer, never followed (it could lead anywhere, a private address
    or another origin that would get the connection's credentials)."""
    before = await hub.fetch("SELECT count(*) FROM connections WHERE kind = 'a2a'")
    answer = await hub.call(
        "POST", "/connections", json={"kind": "a2a", "remoteUrl": f"{liar.url}/redirect-card"}
    )
    assert answer.status_code == 502 and "status 302" in answer.json()["detail"], answer.text
    assert await hub.fetch("SELECT count(*) FROM connections WHERE kind = 'a2a'") == before
    agent = await run_on_liar(hub, liar, "diff-url-redirect", token="liar-token")
    assert agent["state"] == "completed", agent
    assert agent["result"]["artifactsRefused"] == ["diff: the diff's URL answered HTTP 302"]
    assert "diffSha256" not in agent["result"]
    assert "/diff-url-redirect/changes.diff" not in liar.diff_paths  # never asked for
