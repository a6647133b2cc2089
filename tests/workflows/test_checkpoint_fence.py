"""A worker Temporal gave up on (it stopped heartbeating but still runs: a long pause, a cut-off
network) cannot overwrite the checkpoint of the attempt that took its try over (real
PostgreSQL, the activity's own checkpoint sink)."""

from __future__ import annotations

import uuid

import asyncpg
import pytest

from activities.conversation import StoreSink
from agents.conversation import ConversationState
from federation.store import conversations


def sink(pool: asyncpg.Pool, agent_id: uuid.UUID, writer: int) -> StoreSink:
    return StoreSink(
        pool,
        requester_id="hub",
        agent_id=agent_id,
        attempt=1,
        transcript_limit=1_000_000,
        writer=writer,
    )


async def test_a_lost_attempt_still_running_cannot_overwrite_the_resumed_conversation(
    pool: asyncpg.Pool,
) -> None:
    agent_id = uuid.uuid4()
    lost, resumed = sink(pool, agent_id, 1), sink(pool, agent_id, 2)
    await lost.save(ConversationState(turn_count=3), [{"kind": "assistant", "turn": 3}])

    # Temporal retried the try on another worker: it resumes from turn 3.
    saved = await conversations.claim_checkpoint(pool, "hub", agent_id, 1, writer=2)
    assert saved is not None
    assert ConversationState.from_json(saved["state"]).turn_count == 3

    # The lost worker goes on a little before it hears it was given up on.
    with pytest.raises(conversations.CheckpointSuperseded):
        await lost.save(ConversationState(turn_count=4), [{"kind": "assistant", "turn": 4}])
    await resumed.save(ConversationState(turn_count=4), [{"kind": "assistant", "turn": 4}])

    row = await conversations.load_checkpoint(pool, "hub", agent_id, 1)
    assert row is not None and row["turn_count"] == 4 and row["state"]["writer"] == 2
    entries = await conversations.transcript_after(pool, "hub", agent_id, 0)
    assert [e["turn"] for e in entries] == [3, 4]  # the lost worker's step left no entry
