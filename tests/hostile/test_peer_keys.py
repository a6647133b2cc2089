"""Keys a peer publishes: only ones that are cheap to verify, and only continuing the ones a
connection trusts (issue 18, points 9 and 13). Keys are built with `cryptography` directly."""

from __future__ import annotations

import pytest

from tests.conftest import Instance
from tests.hostile.conftest import connection_rows
from tests.hostile.rogue import Rogue, RogueKey, RogueRsaKey, huge_exponent

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
