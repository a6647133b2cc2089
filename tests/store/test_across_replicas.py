"""What API replicas on several hosts share only through PostgreSQL: a peer's keys refreshed by
two replicas at once (each process has its own lock, so nothing in-process keeps them apart),
and the message ids that keep a replay out whichever replica it reaches (their clocks differ)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import asyncpg
import pytest

from federation import peer
from federation.envelope import (
    MessageType,
    SigningKey,
    endorse,
    generate_signing_key,
    sign_envelope,
)
from federation.peer import CardKeyRefresher
from federation.states import ConnectionStatus
from federation.store import repos
from federation.trust import verify_incoming

if TYPE_CHECKING:
    from tests.store.conftest import NewDatabase

PEER = "peer-instance"


@pytest.fixture
async def pool(server: Any, new_database: NewDatabase) -> AsyncIterator[asyncpg.Pool]:
    async with new_database(server, "keys") as pool:
        yield pool


def _entry(key: SigningKey, endorsed_by: SigningKey | None = None) -> dict[str, Any]:
    public = key.public()
    entry: dict[str, Any] = {
        "keyId": key.key_id,
        "algorithm": key.algorithm.value,
        "publicKey": public.public_pem,
    }
    if endorsed_by is not None:
        entry["endorsement"] = endorse(endorsed_by, PEER, public)
    return entry


def _message(key: SigningKey) -> Any:
    return sign_envelope(
        key,
        type=MessageType.COMMAND,
        sender_id=PEER,
        recipient_id="me",
        command_type="agent.status",
        payload={"agentId": str(uuid.uuid4())},
    )


class _EachProcessItsOwnLock(dict[str, asyncio.Lock]):
    """The per-process locks of two processes: a lock nobody else waits on."""

    def setdefault(self, key: str, default: Any = None) -> asyncio.Lock:
        return asyncio.Lock()


async def test_a_stale_card_read_on_one_replica_does_not_undo_anothers_refresh(
    pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch
) -> None:
    k1, k2, k3 = (generate_signing_key() for _ in range(3))
    connection = await repos.insert_connection(
        pool,
        connection_id=uuid.uuid4(),
        remote_instance_id=PEER,
        remote_name="peer",
        remote_url="http://peer",
        remote_keys=[_entry(k1)],
        direction="outbound",
        status=ConnectionStatus.ACTIVE,
    )
    # The card replica A reads (k2 added), then the one replica B reads after the peer rotated
    # again (k3 added, k1 retired and gone from the card).
    old_card = [_entry(k1), _entry(k2, endorsed_by=k1)]
    new_card = [_entry(k2, endorsed_by=k1), _entry(k3, endorsed_by=k2)]
    a_fetched, a_may_answer = asyncio.Event(), asyncio.Event()
    http_a, http_b = object(), object()

    async def card_keys(http: Any, url: str, instance_id: str) -> list[dict[str, Any]]:
        if http is http_a:
            a_fetched.set()
            await a_may_answer.wait()  # the old card's answer arrives late
            return old_card
        return new_card

    monkeypatch.setattr(peer, "_card_keys", card_keys)
    monkeypatch.setattr(peer, "_refresh_locks", _EachProcessItsOwnLock())
    monkeypatch.setattr(peer, "_last_fetch", {})
    replica_a = CardKeyRefresher(pool, http_a, min_interval=0)  # type: ignore[arg-type]
    replica_b = CardKeyRefresher(pool, http_b, min_interval=0)  # type: ignore[arg-type]

    on_a = asyncio.create_task(replica_a(connection, _message(k2)))
    await a_fetched.wait()
    on_b = await replica_b(connection, _message(k3))
    assert on_b is not None and {k["keyId"] for k in on_b} == {k2.key_id, k3.key_id}
    a_may_answer.set()
    on_a_keys = await on_a
    # A's message (signed with k2) verifies with what is stored; nothing goes back.
    assert on_a_keys is not None and k2.key_id in {k["keyId"] for k in on_a_keys}
    stored = await pool.fetchval(
        "SELECT remote_keys FROM connections WHERE connection_id = $1",
        connection["connection_id"],
    )
    assert {k["keyId"] for k in stored} == {k2.key_id, k3.key_id}


async def test_a_message_id_is_kept_until_no_replica_may_accept_the_message(
    pool: asyncpg.Pool,
) -> None:
    """A message stamped ahead of the replica that takes it (its clock behind the sender's,
    within the window) stays acceptable to a replica up to the window past its own timestamp:
    its id is kept for twice the window past that timestamp, not past the taker's clock."""
    window = 300
    key = generate_signing_key()
    await repos.insert_connection(
        pool,
        connection_id=uuid.uuid4(),
        remote_instance_id=PEER,
        remote_name="peer",
        remote_url="http://peer",
        remote_keys=[_entry(key)],
        direction="outbound",
        status=ConnectionStatus.ACTIVE,
    )
    stamped = datetime.now(UTC) + timedelta(seconds=window - 5)  # at the window's future edge
    envelope = sign_envelope(
        key,
        type=MessageType.COMMAND,
        sender_id=PEER,
        recipient_id="me",
        command_type="agent.status",
        payload={"agentId": str(uuid.uuid4())},
        now=stamped,
    )
    await verify_incoming(pool, envelope.to_wire(), instance_id="me", window_seconds=window)
    expires = await pool.fetchval(
        "SELECT expires_at FROM seen_messages WHERE sender_id = $1 AND message_id = $2",
        PEER,
        envelope.messageId,
    )
    # Another replica accepts a replay until `stamped + window` by its own clock: the id must
    # outlive that by the skew tolerated between hosts (a window).
    assert expires >= stamped + timedelta(seconds=2 * window - 1)
