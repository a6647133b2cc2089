"""Crafting signed messages as an instance would, from the test process, and checking that a
refused one left nothing behind.

An instance's private key is sealed at rest: `instance_key` opens it with the instance's master
key (the key file its API created in the stack's data dir)."""

from __future__ import annotations

import uuid
from typing import Any

from federation.envelope import MessageType, SigningKey, sign_envelope
from federation.identity import load_identity
from federation.keystore import KeyCipher, load_cipher
from federation.settings import Settings
from federation.store.db import create_pool
from tests.conftest import Instance
from tests.e2e.helpers import spawn_body


def instance_cipher(inst: Instance) -> KeyCipher:
    settings = Settings(instance_name=inst.name, data_dir=inst.info["dataDir"])
    return load_cipher(settings)


async def instance_key(inst: Instance) -> SigningKey:
    """The key `inst` signs with now."""
    pool = await create_pool(inst.info["databaseUrl"], max_size=1)
    try:
        return (await load_identity(pool, instance_cipher(inst))).signing_key
    finally:
        await pool.close()


WINDOW = 300  # the stack runs with the default FEDAGENT_TIMESTAMP_WINDOW


def spawn_payload(
    *,
    agent_type: str = "worker",
    repository: str = "example/repo",
    timeout: int = 60,
    instructions: str = "$ echo should-not-run",
) -> dict[str, Any]:
    body = spawn_body(str(uuid.uuid4()), instructions, agent_type=agent_type, timeout=timeout)
    body.pop("connectionId")
    body["context"]["repository"] = repository
    return body


def craft(
    key: SigningKey,
    sender: Instance,
    recipient: Instance,
    payload: dict[str, Any],
    *,
    command_type: str = "agent.spawn",
    **kw: Any,
) -> dict[str, Any]:
    return sign_envelope(
        key,
        type=MessageType.COMMAND,
        sender_id=kw.pop("sender_id", sender.id),
        recipient_id=kw.pop("recipient_id", recipient.id),
        command_type=command_type,
        payload=payload,
        **kw,
    ).to_wire()


async def post_command(recipient: Instance, envelope: dict[str, Any]) -> Any:
    return await recipient.http.post(
        f"{recipient.url}/api/v1/federation/incoming/command", json=envelope
    )


async def assert_nothing_started(executor: Instance, envelope: dict[str, Any]) -> None:
    agent_id = envelope["payload"].get("agentId")
    if agent_id is not None:
        key = uuid.UUID(agent_id)
        assert await executor.fetch("SELECT 1 FROM agents WHERE agent_id = $1", key) == []
        assert await executor.fetch("SELECT 1 FROM messages WHERE agent_id = $1", key) == []
        assert await executor.count_workflows(f"AgentId = '{agent_id}'") == 0
    rows = await executor.fetch(
        "SELECT 1 FROM messages WHERE message_id = $1", envelope["messageId"]
    )
    assert rows == []


async def refused_codes(executor: Instance, message_id: str) -> list[str]:
    rows = await executor.fetch(
        "SELECT details->>'code' AS code FROM audit_log WHERE outcome = 'refused'"
        " AND details->>'messageId' = $1",
        message_id,
    )
    return [r["code"] for r in rows]


async def assert_refused(
    executor: Instance, envelope: dict[str, Any], status: int, code: str
) -> dict[str, Any]:
    response = await post_command(executor, envelope)
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/problem+json"
    problem: dict[str, Any] = response.json()
    assert problem["code"] == code, problem
    assert await refused_codes(executor, envelope["messageId"]) == [code]
    await assert_nothing_started(executor, envelope)
    return problem


async def statuses(a: Instance, b: Instance, connection_id: str) -> tuple[str, str]:
    first = (await a.call("GET", f"/connections/{connection_id}")).json()
    second = (await b.call("GET", f"/connections/{connection_id}")).json()
    return first["status"], second["status"]
