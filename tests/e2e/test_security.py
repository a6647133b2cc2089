"""Signed messages an executor must refuse, one by one: each gets its status and its own code,
an audit entry with that code, and leaves no agent row, message or workflow behind.

Envelopes are crafted in the test process with the sender's real key (opened from its sealed
form with the sender's master key), then changed or sent where they do not belong.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cli.devstack import DevStack
from federation.envelope import (
    MessageType,
    SigningKey,
    generate_signing_key,
    sign_envelope,
)
from federation.store import repos
from federation.store.db import create_pool
from tests.conftest import Instance
from tests.e2e.helpers import spawn_body
from tests.e2e.signing import (
    WINDOW,
    assert_nothing_started,
    assert_refused,
    craft,
    instance_key,
    post_command,
    refused_codes,
    spawn_payload,
    statuses,
)

pytestmark = pytest.mark.e2e

# --- the envelope itself, on the shared ACTIVE hub -> spoke connection -----------------------


def _tamper_payload(env: dict[str, Any], *_: Instance) -> None:
    env["payload"]["context"]["instructions"] = "$ rm -rf /"


def _tamper_header(env: dict[str, Any], *_: Instance) -> None:
    env["commandType"] = "agent.kill"


def _tamper_agent_type(env: dict[str, Any], *_: Instance) -> None:
    env["payload"]["agentType"] = "reviewer"


def _foreign_key(env: dict[str, Any], *_: Instance) -> None:
    # Same keyId, signed by a key the sender never published.
    impostor = generate_signing_key()
    forged = SigningKey(env["keyId"], impostor.algorithm, impostor.private_pem)
    fields = {k: v for k, v in env.items() if k not in ("signature",)}
    env["signature"] = sign_envelope(
        forged,
        type=MessageType(fields["type"]),
        sender_id=fields["senderId"],
        recipient_id=fields["recipientId"],
        payload=fields["payload"],
        command_type=fields["commandType"],
        message_id=fields["messageId"],
        now=datetime.fromisoformat(fields["timestamp"].replace("Z", "+00:00")),
    ).signature


Mutation = Callable[[dict[str, Any], Instance, Instance], None] | None
NOW = datetime.now(UTC)
ENVELOPE_CASES: dict[str, tuple[Mutation, dict[str, Any], int, str]] = {
    "tampered payload": (_tamper_payload, {}, 401, "signature_invalid"),
    "tampered nested payload field": (_tamper_agent_type, {}, 401, "signature_invalid"),
    "tampered header field": (_tamper_header, {}, 401, "signature_invalid"),
    "signed by another key under a known keyId": (_foreign_key, {}, 401, "signature_invalid"),
    "timestamp too old": (None, {"age": WINDOW + 5}, 401, "timestamp_out_of_window"),
    "timestamp too far in the future": (None, {"age": -WINDOW - 5}, 401, "timestamp_out_of_window"),
}


@pytest.mark.parametrize("case", sorted(ENVELOPE_CASES))
async def test_tampered_or_stale_envelopes_are_refused(
    case: str, stack: DevStack, hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    mutate, options, status, code = ENVELOPE_CASES[case]
    kw: dict[str, Any] = {}
    if "age" in options:
        kw["now"] = datetime.now(UTC) - timedelta(seconds=options["age"])
    envelope = craft(await instance_key(hub), hub, spoke, spawn_payload(), **kw)
    if mutate is not None:
        mutate(envelope, hub, spoke)
    await assert_refused(spoke, envelope, status, code)


async def test_timestamp_inside_the_window_is_accepted(
    stack: DevStack, hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    # Just inside the window, and remembered for at least twice the window.
    agent = await _spawned_agent(hub, hub_spoke)
    envelope = craft(
        await instance_key(hub),
        hub,
        spoke,
        {"agentId": agent},
        command_type="agent.status",
        now=datetime.now(UTC) - timedelta(seconds=WINDOW - 20),
    )
    response = await post_command(spoke, envelope)
    assert response.status_code == 200, response.text
    rows = await spoke.fetch(
        "SELECT EXTRACT(EPOCH FROM expires_at - seen_at) AS keep FROM seen_messages"
        " WHERE sender_id = $1 AND message_id = $2",
        hub.id,
        envelope["messageId"],
    )
    assert len(rows) == 1 and rows[0]["keep"] >= 2 * WINDOW - 1


async def test_unknown_key_is_refused(
    stack: DevStack, hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    # A keyId hub never published: spoke reads hub's card once, does not find it, refuses.
    envelope = craft(generate_signing_key(), hub, spoke, spawn_payload())
    await assert_refused(spoke, envelope, 401, "key_unknown")


async def test_unknown_sender_is_refused(stack: DevStack, hub: Instance, spoke: Instance) -> None:
    envelope = craft(
        generate_signing_key(), hub, spoke, spawn_payload(), sender_id=str(uuid.uuid4())
    )
    await assert_refused(spoke, envelope, 401, "sender_unknown")


async def test_wrong_recipient_is_refused(
    stack: DevStack, hub: Instance, spoke: Instance, edge: Instance, hub_spoke: str
) -> None:
    envelope = craft(await instance_key(hub), hub, spoke, spawn_payload(), recipient_id=edge.id)
    await assert_refused(spoke, envelope, 401, "recipient_mismatch")


async def test_replayed_message_id_is_refused(
    stack: DevStack, hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    agent = await _spawned_agent(hub, hub_spoke)
    envelope = craft(
        await instance_key(hub), hub, spoke, {"agentId": agent}, command_type="agent.status"
    )
    first = await post_command(spoke, envelope)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["type"] == "RESPONSE" and reply["correlationId"] == envelope["messageId"]

    replay = await post_command(spoke, envelope)
    assert (replay.status_code, replay.json()["code"]) == (401, "message_replayed")
    assert await refused_codes(spoke, envelope["messageId"]) == ["message_replayed"]
    rows = await spoke.fetch(
        "SELECT count(*) AS n FROM messages WHERE message_id = $1", envelope["messageId"]
    )
    assert rows[0]["n"] == 1


async def test_malformed_and_unknown_fields_are_refused(
    stack: DevStack, spoke: Instance, hub: Instance, hub_spoke: str
) -> None:
    response = await spoke.http.post(
        f"{spoke.url}/api/v1/federation/incoming/command",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, response.json()["code"]) == (422, "envelope_malformed")
    envelope = craft(await instance_key(hub), hub, spoke, spawn_payload())
    envelope["extra"] = "field"
    response = await post_command(spoke, envelope)
    assert (response.status_code, response.json()["code"]) == (422, "envelope_malformed")
    assert "extra" in response.json()["detail"]
    await assert_nothing_started(spoke, envelope)


async def _spawned_agent(hub: Instance, connection_id: str) -> str:
    body = spawn_body(connection_id, "$ echo status-target", task_id="security-status")
    response = await hub.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 202, response.text
    await hub.wait_agent(body["agentId"])
    agent_id: str = body["agentId"]
    return agent_id


async def test_a_message_sent_to_the_endpoint_of_another_type_is_refused(
    stack: DevStack, spoke: Instance, hub: Instance, hub_spoke: str
) -> None:
    # A validly signed COMMAND posted to the EVENT endpoint: refused and audited, and its
    # messageId is not kept (the refusal rolls the verification back).
    envelope = craft(await instance_key(hub), hub, spoke, spawn_payload())
    response = await spoke.http.post(f"{spoke.url}/api/v1/federation/incoming/event", json=envelope)
    assert (response.status_code, response.json()["code"]) == (422, "envelope_malformed")
    assert "EVENT" in response.json()["detail"]
    assert await refused_codes(spoke, envelope["messageId"]) == ["envelope_malformed"]
    await assert_nothing_started(spoke, envelope)
    seen = await spoke.fetch(
        "SELECT 1 FROM seen_messages WHERE message_id = $1", envelope["messageId"]
    )
    assert seen == []


# --- connection states, on a fresh edge -> spoke connection ---------------------------------


async def test_messages_on_a_connection_that_is_not_active_are_refused(
    stack: DevStack, edge: Instance, spoke: Instance, edge_spoke_request: str
) -> None:
    cid = edge_spoke_request
    key = await instance_key(edge)

    async def refused_while(state: str) -> None:
        envelope = craft(key, edge, spoke, spawn_payload())
        problem = await assert_refused(spoke, envelope, 403, "connection_not_active")
        assert problem["connectionStatus"] == state

    assert await statuses(edge, spoke, cid) == ("PENDING", "PENDING")
    await refused_while("PENDING")

    accepted = await spoke.call("POST", f"/connections/{cid}/accept")
    assert accepted.status_code == 200, accepted.text
    assert await statuses(edge, spoke, cid) == ("ACTIVE", "ACTIVE")

    # The executor suspends: both sides SUSPENDED, traffic refused, the peer cannot resume it.
    suspended = await spoke.call("POST", f"/connections/{cid}/suspend")
    assert suspended.status_code == 200, suspended.text
    assert suspended.json()["peerNotified"] is True
    assert suspended.json()["suspendedBy"] == "local"
    assert await statuses(edge, spoke, cid) == ("SUSPENDED", "SUSPENDED")
    assert (await edge.call("GET", f"/connections/{cid}")).json()["suspendedBy"] == "remote"
    await refused_while("SUSPENDED")
    spawn = await edge.call("POST", "/agents/spawn", json=spawn_body(cid, "$ echo no"))
    assert (spawn.status_code, spawn.json()["code"]) == (409, "connection_not_active")
    not_theirs = await edge.call("POST", f"/connections/{cid}/resume")
    assert (not_theirs.status_code, not_theirs.json()["code"]) == (
        409,
        "connection_state_conflict",
    )

    # Both suspend; it is ACTIVE again only once both have resumed.
    assert (await edge.call("POST", f"/connections/{cid}/suspend")).status_code == 200
    assert (await spoke.call("GET", f"/connections/{cid}")).json()["suspendedBy"] == "both"
    resumed = await spoke.call("POST", f"/connections/{cid}/resume")
    assert resumed.status_code == 200, resumed.text
    assert await statuses(edge, spoke, cid) == ("SUSPENDED", "SUSPENDED")
    assert (await edge.call("POST", f"/connections/{cid}/resume")).status_code == 200
    assert await statuses(edge, spoke, cid) == ("ACTIVE", "ACTIVE")

    # Accepted now: an actual spawn over the resumed connection completes.
    body = spawn_body(cid, "$ echo resumed", task_id="resumed")
    assert (await edge.call("POST", "/agents/spawn", json=body)).status_code == 202
    assert (await edge.wait_agent(body["agentId"]))["state"] == "completed"

    ended = await edge.call("POST", f"/connections/{cid}/disconnect")
    assert ended.json()["peerNotified"] is True
    assert await statuses(edge, spoke, cid) == ("DISCONNECTED", "DISCONNECTED")
    await refused_while("DISCONNECTED")

    actions = [
        r["action"]
        for r in await spoke.fetch(
            "SELECT action FROM audit_log WHERE outcome = 'ok'"
            " AND details->>'connectionId' = $1 ORDER BY id",
            cid,
        )
    ]
    assert actions == [
        "connection.request",
        "connection.accept",
        "connection.suspend",
        "connection.suspend",
        "connection.resume",
        "connection.resume",
        "connection.disconnect",
    ]


# --- grants, on a fresh edge -> spoke connection accepted with narrow grants -----------------

GRANTS = {
    "agentTypes": ["worker"],
    "repositories": ["example/*", "github.com/acme/*"],
    "maxTimeout": 120,
    "maxConcurrentAgents": 1,
}
GRANT_CASES: dict[str, tuple[dict[str, Any], str]] = {
    "agent type not granted": ({"agent_type": "reviewer"}, "grant_agent_type"),
    "repository not allowed": ({"repository": "other/repo"}, "grant_repository"),
    "timeout above the grant": ({"timeout": 600}, "grant_timeout"),
}


async def test_commands_outside_the_grants_are_refused(
    stack: DevStack, edge: Instance, spoke: Instance, edge_spoke_request: str
) -> None:
    cid = edge_spoke_request
    accepted = await spoke.call("POST", f"/connections/{cid}/accept", json={"grants": GRANTS})
    assert accepted.status_code == 200, accepted.text
    grants = accepted.json()["grants"]
    assert grants == {
        **GRANTS,
        "commandTypes": ["agent.spawn", "agent.status", "agent.kill", "agent.artifact"],
    }
    key = await instance_key(edge)

    for case, (kw, code) in GRANT_CASES.items():
        envelope = craft(key, edge, spoke, spawn_payload(**kw))
        problem = await assert_refused(spoke, envelope, 403, code)
        assert problem["code"] == code, case

    # Command types: narrowed by PATCH, then widened again.
    narrowed = await spoke.call(
        "PATCH", f"/connections/{cid}", json={"grants": {"commandTypes": ["agent.spawn"]}}
    )
    assert narrowed.status_code == 200, narrowed.text
    assert narrowed.json()["grants"]["maxTimeout"] == 120  # the rest stays
    envelope = craft(key, edge, spoke, {"agentId": str(uuid.uuid4())}, command_type="agent.status")
    await assert_refused(spoke, envelope, 403, "grant_command_type")
    widened = await spoke.call(
        "PATCH",
        f"/connections/{cid}",
        json={"grants": {"commandTypes": ["agent.spawn", "agent.status", "agent.kill"]}},
    )
    assert widened.status_code == 200, widened.text

    # Concurrency: one agent of edge runs on spoke; a second spawn gets 429 until it ends.
    body = spawn_body(cid, "$ sleep 30", task_id="grant-busy", timeout=60)
    assert (await edge.call("POST", "/agents/spawn", json=body)).status_code == 202
    await edge.wait_agent(body["agentId"], {"running"})
    envelope = craft(key, edge, spoke, spawn_payload())
    problem = await assert_refused(spoke, envelope, 429, "grant_concurrency")
    assert (problem["running"], problem["limit"]) == (1, 1)
    # A retry of the running agent's own spawn is not a second agent.
    again = {**spawn_payload(instructions="$ sleep 30"), "agentId": body["agentId"]}
    retry = await post_command(spoke, craft(key, edge, spoke, again))
    assert retry.status_code == 200, retry.text
    rows = await spoke.fetch(
        "SELECT count(*) AS n FROM agents WHERE agent_id = $1", uuid.UUID(body["agentId"])
    )
    assert rows[0]["n"] == 1
    killed = await edge.call("POST", f"/agents/{body['agentId']}/kill")
    assert killed.json()["state"] == "killed"

    # Bad grants are refused with the field named.
    bad = await spoke.call(
        "PATCH", f"/connections/{cid}", json={"grants": {"agentTypes": ["wizard"]}}
    )
    assert (bad.status_code, bad.json()["code"]) == (422, "validation_error")
    assert "grants.agentTypes.0" in bad.json()["detail"]

    audit = await spoke.fetch(
        "SELECT action, details FROM audit_log WHERE details->>'connectionId' = $1"
        " AND action IN ('connection.accept', 'connection.grants') ORDER BY id",
        cid,
    )
    assert [r["action"] for r in audit] == [
        "connection.accept",
        "connection.grants",
        "connection.grants",
    ]
    assert json.loads(audit[0]["details"])["grants"]["maxConcurrentAgents"] == 1
    assert json.loads(audit[1]["details"])["after"]["commandTypes"] == ["agent.spawn"]


# --- refusals of bad input on the REST side ------------------------------------------------


async def test_bodies_over_the_limit_get_413_before_parsing(spoke: Instance, hub: Instance) -> None:
    started = datetime.now(UTC)
    big = b'{"x": "' + b"a" * (1024 * 1024 + 10) + b'"}'
    for path in ("/incoming/command", "/agents/spawn"):
        response = await spoke.http.post(
            f"{spoke.url}/api/v1/federation{path}",
            content=big,
            headers={"content-type": "application/json", **spoke.auth},
        )
        assert response.status_code == 413, response.text
        assert response.headers["content-type"] == "application/problem+json"
        assert response.json()["code"] == "body_too_large"

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for _ in range(20):
            yield b"a" * (128 * 1024)

    response = await spoke.http.post(
        f"{spoke.url}/api/v1/federation/incoming/event",
        content=chunks(),
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, response.json()["code"]) == (413, "body_too_large")
    # Just under the limit is parsed as usual (and refused for what it says).
    near = b'{"x": "' + b"a" * (1024 * 1000) + b'"}'
    response = await spoke.http.post(
        f"{spoke.url}/api/v1/federation/incoming/command",
        content=near,
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, response.json()["code"]) == (422, "envelope_malformed")
    # Refused peer messages are audited even when they were never parsed.
    rows = await spoke.fetch(
        "SELECT action, details->>'code' AS code FROM audit_log WHERE outcome = 'refused'"
        " AND details->>'code' IN ('body_too_large', 'envelope_malformed') AND at >= $1"
        " ORDER BY id",
        started,
    )
    assert [(r["action"], r["code"]) for r in rows] == [
        ("incoming.command", "body_too_large"),
        ("incoming.event", "body_too_large"),
        ("incoming.command", "envelope_malformed"),
    ]


async def test_schema_violations_name_the_field(hub: Instance, hub_spoke: str) -> None:
    body = spawn_body(hub_spoke, "$ echo x")
    body["options"]["timeout"] = "soon"
    response = await hub.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 422
    problem = response.json()
    assert problem["code"] == "validation_error"
    assert [e["field"] for e in problem["errors"]] == ["options.timeout"]
    response = await hub.call(
        "POST",
        "/agents/spawn",
        content=b'{"connectionId": ',
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, response.json()["code"]) == (422, "validation_error")
    assert (
        await hub.fetch("SELECT 1 FROM agents WHERE agent_id = $1", uuid.UUID(body["agentId"]))
        == []
    )


async def test_a_suspension_the_peer_did_not_hear_can_still_be_lifted(
    edge: Instance, spoke: Instance, edge_spoke_request: str
) -> None:
    cid = edge_spoke_request
    assert (await spoke.call("POST", f"/connections/{cid}/accept")).status_code == 200
    conn = await spoke.db()
    try:
        url = await conn.fetchval(
            "UPDATE connections SET remote_url = 'http://127.0.0.1:9' WHERE connection_id = $1"
            " RETURNING (SELECT remote_url FROM connections WHERE connection_id = $1)",
            uuid.UUID(cid),
        )
        suspended = await spoke.call("POST", f"/connections/{cid}/suspend")
        assert suspended.status_code == 200, suspended.text
        # Stopped here at once, though edge could not be told.
        assert (suspended.json()["status"], suspended.json()["peerNotified"]) == (
            "SUSPENDED",
            False,
        )
        assert await statuses(edge, spoke, cid) == ("ACTIVE", "SUSPENDED")
        # While the peer cannot hear it, a resume is refused and changes nothing.
        refused = await spoke.call("POST", f"/connections/{cid}/resume")
        assert (refused.status_code, refused.json()["code"]) == (502, "peer_unreachable")
        assert await statuses(edge, spoke, cid) == ("ACTIVE", "SUSPENDED")
        await conn.execute(
            "UPDATE connections SET remote_url = $2 WHERE connection_id = $1", uuid.UUID(cid), url
        )
    finally:
        await conn.close()
    resumed = await spoke.call("POST", f"/connections/{cid}/resume")
    assert resumed.status_code == 200, resumed.text
    assert await statuses(edge, spoke, cid) == ("ACTIVE", "ACTIVE")


async def test_seen_message_ids_expire_only_after_their_time(spoke: Instance) -> None:
    """What the API's background task runs every half window: drop ids past their expiry."""
    sender = f"expiry-{uuid.uuid4()}"
    conn = await spoke.db()
    try:
        await conn.execute(
            "INSERT INTO seen_messages (sender_id, message_id, expires_at) VALUES"
            " ($1, 'old', now() - interval '1 second'), ($1, 'young', now() + interval '1 hour')",
            sender,
        )
    finally:
        await conn.close()
    pool = await create_pool(spoke.info["databaseUrl"], max_size=1)
    try:
        assert await repos.expire_message_ids(pool) >= 1
    finally:
        await pool.close()
    rows = await spoke.fetch("SELECT message_id FROM seen_messages WHERE sender_id = $1", sender)
    assert [r["message_id"] for r in rows] == ["young"]
