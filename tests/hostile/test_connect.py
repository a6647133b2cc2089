"""Connection requests from strangers: verified before anything is fetched (issue 12, holes a
and b, points 3 and 4)."""

from __future__ import annotations

import uuid

from tests.conftest import Instance
from tests.hostile.conftest import RogueFactory, connection_rows
from tests.hostile.rogue import Rogue, RogueKey


async def test_badly_signed_connection_request_makes_the_spoke_fetch_nothing(
    spoke: Instance, rogue: Rogue, make_rogue: RogueFactory
) -> None:
    target = await make_rogue()  # what an SSRF would reach: it records every request
    forged = RogueKey()
    # The request of the report, then the same with a URL of a proper shape.
    for url in (f"http://127.0.0.1:{target.port}/x?", f"http://127.0.0.1:{target.port}"):
        request = rogue.connection_request(spoke.id, url=url, sign_with=forged)
        response = await rogue.post(spoke.url, "connect", request)
        assert response.status_code in (401, 422), response.text
        assert str(target.port) not in response.json()["detail"]
    assert response.status_code == 401
    assert response.json()["code"] == "signature_invalid"
    assert target.requests == []
    assert rogue.requests == []
    assert await connection_rows(spoke, rogue.instance_id) == []


async def test_connection_request_without_its_keys_is_refused_unfetched(
    spoke: Instance, rogue: Rogue
) -> None:
    payload = {"connectionId": str(uuid.uuid4()), "url": rogue.url, "name": "rogue"}
    request = rogue.envelope("CONNECT", spoke.id, payload, command_type="connection.request")
    response = await rogue.post(spoke.url, "connect", request)
    assert response.status_code == 422, response.text
    assert response.json()["code"] == "payload_invalid"
    assert rogue.requests == []
    assert await connection_rows(spoke, rogue.instance_id) == []


async def test_card_that_does_not_list_the_signing_key_is_refused(
    spoke: Instance, rogue: Rogue
) -> None:
    rogue.card_overrides = {"keys": [RogueKey().card_entry()]}
    response = await rogue.post(spoke.url, "connect", rogue.connection_request(spoke.id))
    assert response.status_code == 401, response.text
    assert response.json()["code"] == "key_unknown"
    assert await connection_rows(spoke, rogue.instance_id) == []


async def test_card_that_names_another_url_is_refused(spoke: Instance, rogue: Rogue) -> None:
    rogue.card_overrides = {"url": "http://127.0.0.1:9/elsewhere"}
    response = await rogue.post(spoke.url, "connect", rogue.connection_request(spoke.id))
    assert response.status_code == 401, response.text
    problem = response.json()
    assert problem["code"] == "sender_unknown"
    assert await connection_rows(spoke, rogue.instance_id) == []


async def test_refusal_of_a_card_does_not_tell_the_sender_what_answered(
    spoke: Instance, rogue: Rogue
) -> None:
    request = rogue.connection_request(spoke.id, url=f"{rogue.url}/nothing-here")
    response = await rogue.post(spoke.url, "connect", request)
    assert response.status_code == 502, response.text
    problem = response.json()
    assert problem["code"] == "peer_unreachable"
    assert "404" not in problem["detail"] and "nothing-here" not in problem["detail"]
    assert await connection_rows(spoke, rogue.instance_id) == []


async def test_card_with_a_path_as_instance_id_is_refused(
    spoke: Instance, make_rogue: RogueFactory
) -> None:
    rogue = await make_rogue(instance_id="../../../../tmp/escape")
    response = await rogue.post(spoke.url, "connect", rogue.connection_request(spoke.id))
    assert response.status_code in (400, 422), response.text
    assert response.json()["code"] in ("envelope_malformed",)
    assert await connection_rows(spoke, rogue.instance_id) == []
    assert rogue.requests == []


async def test_card_naming_another_unsafe_instance_id_is_refused(
    spoke: Instance, rogue: Rogue
) -> None:
    # The envelope's senderId is safe, the card says otherwise: the card must agree.
    rogue.card_overrides = {"instanceId": "a/../../b"}
    response = await rogue.post(spoke.url, "connect", rogue.connection_request(spoke.id))
    assert response.status_code == 401, response.text
    assert (
        await spoke.fetch("SELECT 1 FROM connections WHERE remote_instance_id = 'a/../../b'") == []
    )


async def test_connection_request_from_a_non_public_address_is_refused_outside_dev(
    spoke: Instance, make_rogue: RogueFactory
) -> None:
    # The test stack allows 127.0.0.1 only (FEDAGENT_OUTBOUND_ALLOWLIST): 127.0.0.2 is loopback.
    rogue = await make_rogue(host="127.0.0.2")
    response = await rogue.post(spoke.url, "connect", rogue.connection_request(spoke.id))
    assert response.status_code == 403, response.text
    assert response.json()["code"] == "address_not_allowed"
    assert rogue.requests == []
    assert await connection_rows(spoke, rogue.instance_id) == []


async def test_a_well_behaved_stranger_still_gets_a_pending_request(
    spoke: Instance, rogue: Rogue
) -> None:
    request = rogue.connection_request(spoke.id)
    response = await rogue.post(spoke.url, "connect", request)
    assert response.status_code == 200, response.text
    rows = await connection_rows(spoke, rogue.instance_id)
    assert [r["status"] for r in rows] == ["PENDING"]
    assert rows[0]["connection_id"] == uuid.UUID(request["payload"]["connectionId"])
    await spoke.call("POST", f"/connections/{request['payload']['connectionId']}/reject")
