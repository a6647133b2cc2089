"""Keys: sealed at rest, rotated mid-traffic (old key valid for its grace period, then refused),
picked up by peers from the identity card, RSA-PSS as well as Ed25519."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest

from cli.devstack import DevStack
from federation.envelope import Algorithm, generate_signing_key
from federation.identity import (
    IdentityConflict,
    adopt_identity,
    ensure_identity,
    load_identity,
    rotate_key,
    update_instance,
)
from federation.keystore import KeyCipher, KeystoreError
from federation.store.db import create_pool, migrate
from tests.conftest import Instance
from tests.e2e.helpers import scratch_database, spawn_body
from tests.e2e.signing import (
    assert_refused,
    craft,
    instance_key,
    post_command,
    spawn_payload,
)

pytestmark = pytest.mark.e2e
GRACE = 8  # seconds: long enough for the in-grace checks, short enough to wait out


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def _spawn_and_finish(requester: Instance, connection_id: str, word: str) -> str:
    body = spawn_body(connection_id, f"$ echo {word}", task_id=f"rotation-{word}")
    response = await requester.call("POST", "/agents/spawn", json=body)
    assert response.status_code == 202, response.text
    agent = await requester.wait_agent(body["agentId"])
    assert agent["state"] == "completed", agent
    agent_id: str = body["agentId"]
    return agent_id


async def test_rotation_mid_traffic_keeps_the_old_key_for_its_grace_period_only(
    edge: Instance, spoke: Instance, edge_spoke_request: str
) -> None:
    cid = edge_spoke_request
    assert (await spoke.call("POST", f"/connections/{cid}/accept")).status_code == 200
    started = datetime.now(UTC)
    first = await _spawn_and_finish(edge, cid, "before")
    old_key = await instance_key(edge)
    signed_before = craft(old_key, edge, spoke, {"agentId": first}, command_type="agent.status")

    rotated = await edge.call(
        "POST",
        "/instance/keys/rotate",
        json={"algorithm": "RSA-PSS-SHA256", "graceSeconds": GRACE},
    )
    assert rotated.status_code == 200, rotated.text
    result = rotated.json()
    assert result["algorithm"] == "RSA-PSS-SHA256" and result["keyId"] != old_key.key_id
    [retired] = result["retired"]
    assert retired["keyId"] == old_key.key_id
    valid_until = _at(retired["validUntil"])

    # The card lists both, each with its validity; the new one signs from now on.
    card = (await edge.http.get(f"{edge.url}/api/v1/federation/instance")).json()
    listed = {k["keyId"]: k for k in card["keys"]}
    assert listed[result["keyId"]]["status"] == "active"
    assert listed[result["keyId"]]["validUntil"] is None
    assert listed[old_key.key_id]["status"] == "retiring"
    assert _at(listed[old_key.key_id]["validUntil"]) == valid_until
    new_key = await instance_key(edge)
    assert (new_key.key_id, new_key.algorithm) == (result["keyId"], Algorithm.RSA_PSS_SHA256)

    # spoke was told at once: it already holds the new key, read from edge's card.
    rows = await spoke.fetch(
        "SELECT remote_keys FROM connections WHERE connection_id = $1", uuid.UUID(cid)
    )
    assert result["keyId"] in {k["keyId"] for k in json.loads(rows[0]["remote_keys"])}

    # During the grace period both keys are accepted, in any order.
    response = await post_command(spoke, signed_before)
    assert response.status_code == 200, response.text
    with_new = craft(new_key, edge, spoke, {"agentId": first}, command_type="agent.status")
    assert (await post_command(spoke, with_new)).status_code == 200
    second = await _spawn_and_finish(edge, cid, "after")
    old_again = craft(old_key, edge, spoke, {"agentId": second}, command_type="agent.status")
    assert datetime.now(UTC) < valid_until, "the grace period ended before the test could use it"
    response = await post_command(spoke, old_again)
    assert response.status_code == 200, response.text

    # After it, the old key is refused and nothing it asks for happens.
    await asyncio.sleep(max(0.0, (valid_until - datetime.now(UTC)).total_seconds()) + 0.5)
    expired = craft(old_key, edge, spoke, spawn_payload())
    await assert_refused(spoke, expired, 401, "key_expired")
    card = (await edge.http.get(f"{edge.url}/api/v1/federation/instance")).json()
    statuses = {k["keyId"]: k["status"] for k in card["keys"]}
    assert old_key.key_id not in statuses and statuses[result["keyId"]] == "active"
    await _spawn_and_finish(edge, cid, "later")

    # No message of edge was refused but the one signed with the expired key.
    refused = await spoke.fetch(
        "SELECT details->>'code' AS code FROM audit_log WHERE outcome = 'refused'"
        " AND actor = $1 AND at >= $2",
        f"peer:{edge.id}",
        started,
    )
    assert [r["code"] for r in refused] == ["key_expired"]
    audit = await edge.fetch(
        "SELECT details FROM audit_log WHERE action = 'instance.keys.rotate' AND at >= $1",
        started,
    )
    details = json.loads(audit[0]["details"])
    assert details["keyId"] == result["keyId"] and details["graceSeconds"] == GRACE
    assert details["peersNotified"] == {cid: True}
    refreshed = await spoke.fetch(
        "SELECT details FROM audit_log WHERE action = 'connection.keys_refreshed' AND at >= $1",
        started,
    )
    assert result["keyId"] in json.loads(refreshed[0]["details"])["added"]


async def test_peers_that_were_not_told_pick_the_new_key_from_the_card(
    edge: Instance, spoke: Instance, edge_spoke_request: str
) -> None:
    """spoke forgets edge's new key (as if the rotation notice was lost): the first messages
    signed with it make spoke read edge's card once, and they are all accepted."""
    cid = edge_spoke_request
    assert (await spoke.call("POST", f"/connections/{cid}/accept")).status_code == 200
    first = await _spawn_and_finish(edge, cid, "told")
    old_keys = (
        await spoke.fetch(
            "SELECT remote_keys FROM connections WHERE connection_id = $1", uuid.UUID(cid)
        )
    )[0]["remote_keys"]
    rotated = await edge.call("POST", "/instance/keys/rotate", json={"graceSeconds": 60})
    assert rotated.status_code == 200, rotated.text
    conn = await spoke.db()
    try:
        await conn.execute(
            "UPDATE connections SET remote_keys = $2::jsonb, keys_refreshed_at = NULL"
            " WHERE connection_id = $1",
            uuid.UUID(cid),
            old_keys,
        )
    finally:
        await conn.close()
    new_key = await instance_key(edge)
    # A burst (more than spoke's pool has connections): one card fetch, every message accepted.
    burst = [
        craft(new_key, edge, spoke, {"agentId": first}, command_type="agent.status")
        for _ in range(25)
    ]
    responses = await asyncio.gather(*(post_command(spoke, e) for e in burst))
    assert [r.status_code for r in responses] == [200] * len(burst), [
        r.text for r in responses if r.status_code != 200
    ]
    await _spawn_and_finish(edge, cid, "untold")


async def test_private_keys_are_sealed_and_never_shown(stack: DevStack, hub: Instance) -> None:
    for name, inst in stack.instances.items():
        rows = await hub.http.get(f"{inst.info['apiUrl']}/api/v1/federation/instance")
        assert "PRIVATE" not in rows.text, name
        conn_rows = await Instance({**inst.info, "dataDir": str(stack.data_dir)}, hub.http).fetch(
            "SELECT private_pem, private_sealed FROM instance_keys WHERE retired_at IS NULL"
        )
        assert conn_rows, name
        for row in conn_rows:
            assert row["private_pem"] is None
            assert row["private_sealed"].startswith("aesgcm1:")
            assert "PRIVATE" not in row["private_sealed"]
        key_file = stack.data_dir / "secrets" / f"{name}.key"
        assert key_file.stat().st_mode & 0o777 == 0o600
    for log in stack.logs.glob("*.log"):
        assert "PRIVATE KEY" not in log.read_text(errors="replace"), log.name


@pytest.fixture
async def scratch_db(hub: Instance) -> AsyncIterator[str]:
    """A database of its own in the stack's PostgreSQL, dropped afterwards."""
    async with scratch_database(hub.info["databaseUrl"], "scratch") as url:
        yield url


async def test_plain_keys_of_an_older_store_are_sealed_on_start_and_rotation_erases_them(
    scratch_db: str,
) -> None:
    pool = await create_pool(scratch_db, max_size=2)
    try:
        await migrate(pool)
        # A process without the master key (the dev stack preparing a database) makes no key.
        identity = await ensure_identity(pool, name="old", public_url="http://127.0.0.1:9")
        assert identity.keys == ()
        # A key stored in plain form, as the walking skeleton did.
        legacy = generate_signing_key()
        await pool.execute(
            "INSERT INTO instance_keys (key_id, algorithm, public_pem, private_pem)"
            " VALUES ($1, $2, $3, $4)",
            legacy.key_id,
            legacy.algorithm.value,
            legacy.public().public_pem,
            legacy.private_pem,
        )
        cipher = KeyCipher(secrets.token_bytes(32))
        identity = await ensure_identity(
            pool, name="old", public_url="http://127.0.0.1:9", cipher=cipher
        )
        row = await pool.fetchrow("SELECT private_pem, private_sealed FROM instance_keys")
        assert row["private_pem"] is None and row["private_sealed"].startswith("aesgcm1:")
        assert identity.signing_key.private_pem == legacy.private_pem  # the same key, kept
        assert "PRIVATE" not in repr(identity)
        wrong = await load_identity(pool, KeyCipher(secrets.token_bytes(32)))
        with pytest.raises(KeystoreError):
            _ = wrong.signing_key

        rotation = await rotate_key(pool, cipher, grace_seconds=3600)
        [(retired_id, _until)] = rotation.retired
        assert retired_id == legacy.key_id
        rows = await pool.fetch(
            "SELECT key_id, private_pem, private_sealed, retired_at FROM instance_keys"
            " ORDER BY created_at"
        )
        assert [(r["key_id"], r["private_sealed"] is None) for r in rows] == [
            (legacy.key_id, True),  # a retired key keeps no private half
            (rotation.new_key.key_id, False),
        ]
        identity = await load_identity(pool, cipher)
        assert identity.signing_key.key_id == rotation.new_key.key_id
        assert [k.key_id for k in identity.keys] == [legacy.key_id, rotation.new_key.key_id]

        # Grace 0: the key it replaces is gone from the card at once; the legacy key keeps the
        # grace it was given.
        again = await rotate_key(pool, cipher, grace_seconds=0)
        identity = await load_identity(pool, cipher)
        assert [k.key_id for k in identity.keys] == [legacy.key_id, again.new_key.key_id]

        # A PATCHed name survives a restart; a changed FEDAGENT_INSTANCE_NAME is refused at
        # start until the admin adopts it (`fedagent set-identity`), and then wins over it.
        await update_instance(pool, name="renamed")
        url = "http://127.0.0.1:9"
        identity = await ensure_identity(pool, name="old", public_url=url, cipher=cipher)
        assert identity.name == "renamed"
        with pytest.raises(IdentityConflict):
            await ensure_identity(pool, name="new", public_url=url, cipher=cipher)
        await adopt_identity(pool, name="new", public_url=url)
        identity = await ensure_identity(pool, name="new", public_url=url, cipher=cipher)
        assert identity.name == "new"
    finally:
        await pool.close()
