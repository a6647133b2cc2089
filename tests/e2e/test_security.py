"""Signed commands that spoke must refuse: each with 401, its own code, an audit entry, and
no agent row, message or workflow left behind."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from federation.envelope import (
    Algorithm,
    MessageType,
    SigningKey,
    generate_signing_key,
    sign_envelope,
)
from tests.conftest import Instance
from tests.e2e.helpers import spawn_body

pytestmark = pytest.mark.e2e


async def hub_key(hub: Instance) -> SigningKey:
    rows = await hub.fetch(
        "SELECT key_id, algorithm, private_pem FROM instance_keys WHERE retired_at IS NULL"
    )
    return SigningKey(rows[0]["key_id"], Algorithm(rows[0]["algorithm"]), rows[0]["private_pem"])


def spawn_payload(connection_id: str) -> dict[str, Any]:
    body = spawn_body(connection_id, "$ echo should-not-run")
    body.pop("connectionId")
    return body


def command(
    key: SigningKey, hub: Instance, spoke: Instance, payload: dict[str, Any], **kw: Any
) -> dict[str, Any]:
    return sign_envelope(
        key,
        type=MessageType.COMMAND,
        sender_id=kw.pop("sender_id", hub.id),
        recipient_id=kw.pop("recipient_id", spoke.id),
        command_type="agent.spawn",
        payload=payload,
        **kw,
    ).to_wire()


async def post(spoke: Instance, envelope: dict[str, Any]) -> Any:
    return await spoke.http.post(f"{spoke.url}/api/v1/federation/incoming/command", json=envelope)


async def assert_nothing_started(spoke: Instance, agent_id: str) -> None:
    key = uuid.UUID(agent_id)
    assert await spoke.fetch("SELECT 1 FROM agents WHERE agent_id = $1", key) == []
    assert await spoke.fetch("SELECT 1 FROM messages WHERE agent_id = $1", key) == []
    assert await spoke.count_workflows(f"AgentId = '{agent_id}'") == 0


async def refused_audit(spoke: Instance, message_id: str) -> list[str]:
    rows = await spoke.fetch(
        "SELECT details->>'code' AS code FROM audit_log WHERE outcome = 'refused'"
        " AND details->>'messageId' = $1",
        message_id,
    )
    return [r["code"] for r in rows]


def tamper_payload(env: dict[str, Any], hub: Instance, spoke: Instance) -> dict[str, Any]:
    env["payload"]["context"]["instructions"] = "$ rm -rf /"
    return env


def tamper_header(env: dict[str, Any], hub: Instance, spoke: Instance) -> dict[str, Any]:
    env["commandType"] = "agent.kill"
    return env


STALE = "timestamp_out_of_window"
CASES = {
    "tampered payload": (tamper_payload, {}, "signature_invalid"),
    "tampered header field": (tamper_header, {}, "signature_invalid"),
    "old timestamp": (None, {"now": datetime.now(UTC) - timedelta(seconds=301)}, STALE),
    "timestamp in the future": (None, {"now": datetime.now(UTC) + timedelta(seconds=400)}, STALE),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_tampered_or_stale_commands_are_refused(
    case: str, hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    mutate, sign_kw, code = CASES[case]
    payload = spawn_payload(hub_spoke)
    envelope = command(await hub_key(hub), hub, spoke, payload, **sign_kw)
    if mutate is not None:
        envelope = mutate(envelope, hub, spoke)
    response = await post(spoke, envelope)
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert await refused_audit(spoke, envelope["messageId"]) == [code]
    await assert_nothing_started(spoke, payload["agentId"])


async def test_wrong_key_is_refused(hub: Instance, spoke: Instance, hub_spoke: str) -> None:
    real = await hub_key(hub)
    impostor = generate_signing_key()
    # Claims hub's key id but is signed by another key.
    forged = SigningKey(real.key_id, impostor.algorithm, impostor.private_pem)
    payload = spawn_payload(hub_spoke)
    envelope = command(forged, hub, spoke, payload)
    response = await post(spoke, envelope)
    assert (response.status_code, response.json()["code"]) == (401, "signature_invalid")
    await assert_nothing_started(spoke, payload["agentId"])

    payload = spawn_payload(hub_spoke)
    envelope = command(impostor, hub, spoke, payload)  # a key id hub never published
    response = await post(spoke, envelope)
    assert (response.status_code, response.json()["code"]) == (401, "key_unknown")
    assert await refused_audit(spoke, envelope["messageId"]) == ["key_unknown"]
    await assert_nothing_started(spoke, payload["agentId"])


async def test_unknown_sender_is_refused(hub: Instance, spoke: Instance, hub_spoke: str) -> None:
    payload = spawn_payload(hub_spoke)
    envelope = command(generate_signing_key(), hub, spoke, payload, sender_id=str(uuid.uuid4()))
    response = await post(spoke, envelope)
    assert (response.status_code, response.json()["code"]) == (401, "sender_unknown")
    await assert_nothing_started(spoke, payload["agentId"])


async def test_wrong_recipient_is_refused(
    hub: Instance, spoke: Instance, edge: Instance, hub_spoke: str
) -> None:
    payload = spawn_payload(hub_spoke)
    envelope = command(await hub_key(hub), hub, spoke, payload, recipient_id=edge.id)
    response = await post(spoke, envelope)
    assert (response.status_code, response.json()["code"]) == (401, "recipient_mismatch")
    assert await refused_audit(spoke, envelope["messageId"]) == ["recipient_mismatch"]
    await assert_nothing_started(spoke, payload["agentId"])


async def test_replayed_message_id_is_refused(
    hub: Instance, spoke: Instance, hub_spoke: str
) -> None:
    payload = spawn_payload(hub_spoke)
    payload["context"]["instructions"] = "$ echo once >> runs.txt"
    envelope = command(await hub_key(hub), hub, spoke, payload)
    first = await post(spoke, envelope)
    assert first.status_code == 200, first.text
    reply = first.json()
    assert reply["type"] == "RESPONSE" and reply["correlationId"] == envelope["messageId"]

    replay = await post(spoke, envelope)
    assert (replay.status_code, replay.json()["code"]) == (401, "message_replayed")
    assert await refused_audit(spoke, envelope["messageId"]) == ["message_replayed"]
    assert await spoke.count_workflows(f"AgentId = '{payload['agentId']}'") == 1
    rows = await spoke.fetch(
        "SELECT count(*) AS n FROM messages WHERE message_id = $1", envelope["messageId"]
    )
    assert rows[0]["n"] == 1


async def test_malformed_and_unknown_fields_are_refused(spoke: Instance, hub: Instance) -> None:
    response = await spoke.http.post(
        f"{spoke.url}/api/v1/federation/incoming/command",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert (response.status_code, response.json()["code"]) == (422, "envelope_malformed")
    envelope = command(await hub_key(hub), hub, spoke, {"agentId": str(uuid.uuid4())})
    envelope["extra"] = "field"
    response = await post(spoke, envelope)
    assert (response.status_code, response.json()["code"]) == (422, "envelope_malformed")
