"""Keys a peer publishes: only ones that are cheap to verify, and only continuing the ones a
connection trusts (issue 18, points 9 and 13). Keys are built with `cryptography` directly."""

from __future__ import annotations

import json
import uuid

import httpx
import pytest

from tests.conftest import Instance
from tests.hostile.conftest import connected, connection_rows
from tests.hostile.rogue import Rogue, RogueKey, RogueRsaKey, endorse, huge_exponent

EXPENSIVE = {
    "a 1024-bit exponent": lambda: RogueRsaKey(2048, huge_exponent()),
    "the exponent 3": lambda: RogueRsaKey(2048, 3),
    "a 1024-bit modulus": lambda: RogueRsaKey(1024),
}


@pytest.mark.parametrize("shape", sorted(EXPENSIVE))
async def test_a_connection_request_signed_with_an_unacceptable_rsa_key_is_refused_unfetched(
    spoke: Instance, rogue: Rogue, shape: str
) -> None:
    rogue.key = EXPENSIVE[shape]()
    response = await rogue.post(spoke.url, "connect", rogue.connection_request(spoke.id))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "key_unacceptable"
    assert rogue.requests == []  # its card was never read
    assert await connection_rows(spoke, rogue.instance_id) == []


async def test_a_card_listing_an_expensive_key_beside_the_signing_one_is_refused(
    spoke: Instance, rogue: Rogue
) -> None:
    expensive = RogueRsaKey(2048, huge_exponent())
    rogue.card_overrides = {"keys": [rogue.key.card_entry(), expensive.card_entry()]}
    response = await rogue.post(spoke.url, "connect", rogue.connection_request(spoke.id))
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "key_unacceptable"
    assert await connection_rows(spoke, rogue.instance_id) == []


async def test_a_stranger_with_a_2048_bit_rsa_key_of_exponent_65537_gets_its_request(
    spoke: Instance, rogue: Rogue
) -> None:
    rogue.key = RogueRsaKey(2048)
    request = rogue.connection_request(spoke.id)
    response = await rogue.post(spoke.url, "connect", request)
    assert response.status_code == 200, response.text
    rows = await connection_rows(spoke, rogue.instance_id)
    assert [r["status"] for r in rows] == ["PENDING"]
    await spoke.call("POST", f"/connections/{request['payload']['connectionId']}/reject")


async def test_an_instance_refuses_to_ask_a_peer_whose_card_lists_an_expensive_key(
    spoke: Instance, rogue: Rogue
) -> None:
    rogue.card_overrides = {
        "keys": [RogueKey().card_entry(), RogueRsaKey(2048, huge_exponent()).card_entry()]
    }
    response = await spoke.call("POST", "/connections", json={"remoteUrl": rogue.url})
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "key_unacceptable"
    assert [r.method for r in rogue.requests] == ["GET"]  # the card only: nothing was sent
    assert await connection_rows(spoke, rogue.instance_id) == []


async def _keys_changed(rogue: Rogue, spoke: Instance, cid: str, key: RogueKey) -> httpx.Response:
    """The nudge a peer sends after rotating, signed with `key`."""
    notice = rogue.envelope(
        "CONNECT",
        spoke.id,
        {"connectionId": cid},
        command_type="connection.keys_changed",
        sign_with=key,
        keyId=key.key_id,
    )
    return await rogue.post(spoke.url, "connect", notice)


async def _stored_key_ids(spoke: Instance, cid: str) -> list[str]:
    rows = await spoke.fetch(
        "SELECT remote_keys FROM connections WHERE connection_id = $1", uuid.UUID(cid)
    )
    return [k["keyId"] for k in json.loads(rows[0]["remote_keys"])]


TAKEOVERS = ("bare", "endorsed by a stranger's key", "endorsement forged for the trusted key")


@pytest.mark.parametrize("takeover", TAKEOVERS)
async def test_whoever_takes_over_a_peers_url_cannot_replace_its_keys(
    spoke: Instance, rogue: Rogue, takeover: str
) -> None:
    cid = await connected(rogue, spoke)
    trusted = rogue.key
    try:
        before = await _stored_key_ids(spoke, cid)
        usurper, stranger = RogueKey(), RogueKey()
        entry = usurper.card_entry()
        if takeover != "bare":
            entry["endorsement"] = endorse(stranger, rogue.instance_id, usurper)
        if takeover == "endorsement forged for the trusted key":
            entry["endorsement"]["keyId"] = trusted.key_id
        # The URL now serves a card with the usurper's key.
        rogue.card_overrides = {"keys": [entry, stranger.card_entry()]}
        response = await _keys_changed(rogue, spoke, cid, usurper)
        assert response.status_code == 401, response.text
        assert response.json()["code"] == "key_not_endorsed"
        # The usurper's key is refused for commands as well; the trusted key still works.
        status = rogue.envelope(
            "COMMAND",
            spoke.id,
            {"agentId": str(uuid.uuid4())},
            command_type="agent.status",
            sign_with=usurper,
            keyId=usurper.key_id,
        )
        response = await rogue.post(spoke.url, "command", status)
        assert response.json()["code"] == "key_not_endorsed", response.text
        assert (await _keys_changed(rogue, spoke, cid, trusted)).status_code == 200
        assert await _stored_key_ids(spoke, cid) == before
        refreshed = await spoke.fetch(
            "SELECT 1 FROM audit_log WHERE action = 'connection.keys_refreshed'"
            " AND details->>'connectionId' = $1",
            cid,
        )
        assert refreshed == []
    finally:
        await spoke.call("POST", f"/connections/{cid}/disconnect")


async def test_a_rotation_endorsed_by_the_trusted_key_is_picked_up_even_through_a_chain(
    spoke: Instance, rogue: Rogue
) -> None:
    cid = await connected(rogue, spoke)
    first = rogue.key
    try:
        second, third = RogueKey(), RogueRsaKey(2048)
        # Two rotations while spoke heard of none: the first key is already gone from the card.
        rogue.card_overrides = {
            "keys": [
                {**second.card_entry(), "endorsement": endorse(first, rogue.instance_id, second)},
                {**third.card_entry(), "endorsement": endorse(second, rogue.instance_id, third)},
            ]
        }
        response = await _keys_changed(rogue, spoke, cid, third)
        assert response.status_code == 200, response.text
        assert await _stored_key_ids(spoke, cid) == [second.key_id, third.key_id]
    finally:
        rogue.key = third  # spoke's disconnect notice is answered with a key it trusts
        await spoke.call("POST", f"/connections/{cid}/disconnect")


async def test_a_rotation_to_an_expensive_key_is_refused_though_endorsed(
    spoke: Instance, rogue: Rogue
) -> None:
    cid = await connected(rogue, spoke)
    try:
        before = await _stored_key_ids(spoke, cid)
        costly = RogueRsaKey(2048, huge_exponent())
        endorsement = endorse(rogue.key, rogue.instance_id, costly)
        rogue.card_overrides = {
            "keys": [rogue.key.card_entry(), {**costly.card_entry(), "endorsement": endorsement}]
        }
        response = await _keys_changed(rogue, spoke, cid, costly)
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "key_unacceptable"
        assert await _stored_key_ids(spoke, cid) == before
    finally:
        await spoke.call("POST", f"/connections/{cid}/disconnect")
