"""A slow or lying card cannot stall the API or make it write (issue 12, point 6)."""

from __future__ import annotations

import asyncio
import uuid

from tests.conftest import Instance
from tests.hostile.conftest import connected
from tests.hostile.rogue import Rogue, RogueKey


async def test_messages_with_an_unknown_key_wait_for_one_card_fetch_and_write_nothing(
    spoke: Instance, rogue: Rogue
) -> None:
    connection_id = await connected(rogue, spoke)
    try:
        before = await spoke.fetch(
            "SELECT remote_keys, keys_refreshed_at FROM connections WHERE connection_id = $1",
            uuid.UUID(connection_id),
        )
        rogue.card_gate = asyncio.Event()  # the card server hangs until released
        fetches_before = rogue.card_fetches()
        stranger = RogueKey()  # a key the card will never list

        async def forged() -> int:
            envelope = rogue.envelope(
                "COMMAND",
                spoke.id,
                {"agentId": str(uuid.uuid4())},
                command_type="agent.status",
                sign_with=stranger,
                keyId=stranger.key_id,
            )
            return (await rogue.post(spoke.url, "command", envelope)).status_code

        # More messages than the API's database pool has connections.
        pending = [asyncio.create_task(forged()) for _ in range(30)]
        deadline = asyncio.get_running_loop().time() + 120
        while rogue.card_fetches() == fetches_before:
            assert asyncio.get_running_loop().time() < deadline, "the card was never fetched"
            await asyncio.sleep(0.1)
        # While the card is being fetched, the API still answers its users.
        listed = await asyncio.wait_for(spoke.call("GET", "/connections"), timeout=60)
        assert listed.status_code == 200
        rogue.card_gate.set()
        codes = await asyncio.gather(*pending)
        assert set(codes) == {401}, codes
        assert rogue.card_fetches() - fetches_before == 1
        after = await spoke.fetch(
            "SELECT remote_keys, keys_refreshed_at FROM connections WHERE connection_id = $1",
            uuid.UUID(connection_id),
        )
        assert [tuple(r) for r in after] == [tuple(r) for r in before]
        refreshed = await spoke.fetch(
            "SELECT 1 FROM audit_log WHERE action = 'connection.keys_refreshed'"
            " AND details->>'connectionId' = $1",
            connection_id,
        )
        assert refreshed == []
    finally:
        rogue.card_gate = None
        await spoke.call("POST", f"/connections/{connection_id}/disconnect")
