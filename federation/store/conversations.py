"""Agent conversations: the executor's checkpoints and transcript, the requester's copy of it.

Checkpoints (`agent_conversations`) are one row per try of a run, rewritten after every model
answer and tool result. The transcript (`agent_transcript`) is numbered from 1 per run across
its tries; entries are appended under a per-run lock in the checkpoint's transaction, so a
checkpoint and the entries of its step are saved together or not at all. Past the per-run byte
limit one `truncated` entry is written and later entries are dropped.

The requester keeps a gapless prefix of the executor's transcript (`requested_transcript`):
entries that would leave a hole are refused, and the caller pulls the missing ones.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg

from federation.store.repos import Executor


def _size(entry: dict[str, Any]) -> int:
    return len(json.dumps(entry, separators=(",", ":")).encode())


async def save_checkpoint(
    pool: asyncpg.Pool,
    *,
    requester_id: str,
    agent_id: uuid.UUID,
    attempt: int,
    state: dict[str, Any],
    turn_count: int,
    usage: dict[str, Any],
    tokens: int,
    entries: list[dict[str, Any]],
    transcript_limit: int,
) -> dict[str, Any] | None:
    """Save the try's conversation and append `entries` to the run's transcript, atomically.
    Returns the transcript's summary (entries, bytes, truncated), or None when there were no
    entries (the transcript is as it was: nothing is locked or counted for it).

    `state["writer"]` (the activity attempt saving it) fences the row: a worker whose attempt
    Temporal already gave up on (it stopped heartbeating but still runs) cannot overwrite the
    checkpoint of the attempt that took over; it gets `CheckpointSuperseded` instead."""
    async with pool.acquire() as conn, conn.transaction():
        saved = await conn.fetchval(
            "INSERT INTO agent_conversations"
            " (requester_id, agent_id, attempt, state, turn_count, usage, tokens, checkpoints)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, 1)"
            " ON CONFLICT (requester_id, agent_id, attempt) DO UPDATE SET"
            " state = EXCLUDED.state, turn_count = EXCLUDED.turn_count,"
            " usage = EXCLUDED.usage, tokens = EXCLUDED.tokens,"
            " checkpoints = agent_conversations.checkpoints + 1, updated_at = now()"
            " WHERE coalesce((agent_conversations.state->>'writer')::int, 0)"
            "    <= coalesce((EXCLUDED.state->>'writer')::int, 0)"
            " RETURNING 1",
            requester_id,
            agent_id,
            attempt,
            state,
            turn_count,
            usage,
            tokens,
        )
        if saved is None:
            raise CheckpointSuperseded(
                f"checkpoint of try {attempt} of agent {agent_id} belongs to a later attempt"
            )
        if not entries:
            return None
        return await append_transcript(
            conn, requester_id, agent_id, attempt, entries, transcript_limit
        )


async def append_transcript(
    conn: asyncpg.Connection,
    requester_id: str,
    agent_id: uuid.UUID,
    attempt: int,
    entries: list[dict[str, Any]],
    limit: int,
) -> dict[str, Any]:
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('fedagent:transcript:' || $1 || ':' || $2))",
        requester_id,
        str(agent_id),
    )
    summary = await transcript_summary(conn, requester_id, agent_id)
    if not entries or summary["truncated"]:
        return summary
    at = datetime.now(UTC).isoformat()
    seq, total = summary["entries"], summary["bytes"]
    rows: list[tuple[Any, ...]] = []
    for entry in entries:
        seq += 1
        full = {"seq": seq, "attempt": attempt, "at": at, **entry}
        size = _size(full)
        if total + size > limit:
            full = {
                "seq": seq,
                "attempt": attempt,
                "at": at,
                "kind": "truncated",
                "text": f"the transcript reached its limit of {limit} bytes; later entries are"
                " not kept (the run goes on)",
            }
            size = _size(full)
            rows.append((requester_id, agent_id, seq, attempt, full, size))
            total += size
            summary["truncated"] = True
            break
        rows.append((requester_id, agent_id, seq, attempt, full, size))
        total += size
    await conn.executemany(
        "INSERT INTO agent_transcript (requester_id, agent_id, seq, attempt, entry, bytes)"
        " VALUES ($1, $2, $3, $4, $5, $6)",
        rows,
    )
    summary["entries"], summary["bytes"] = seq, total
    return summary


class CheckpointSuperseded(RuntimeError):
    """A later activity attempt of the same try owns its checkpoint now."""


async def claim_checkpoint(
    db: Executor, requester_id: str, agent_id: uuid.UUID, attempt: int, *, writer: int
) -> dict[str, Any] | None:
    """Make activity attempt `writer` the only one that may save try `attempt`'s checkpoint
    from now on, and return the checkpoint as it is (None: nothing saved yet)."""
    row = await db.fetchrow(
        "INSERT INTO agent_conversations (requester_id, agent_id, attempt, state)"
        " VALUES ($1, $2, $3, jsonb_build_object('writer', $4::int))"
        " ON CONFLICT (requester_id, agent_id, attempt) DO UPDATE SET"
        " state = agent_conversations.state || jsonb_build_object('writer', $4::int),"
        " updated_at = now()"
        " WHERE coalesce((agent_conversations.state->>'writer')::int, 0) <= $4"
        " RETURNING state, turn_count, usage, tokens, checkpoints, outcome, updated_at",
        requester_id,
        agent_id,
        attempt,
        writer,
    )
    if row is None:
        raise CheckpointSuperseded(
            f"checkpoint of try {attempt} of agent {agent_id} belongs to a later attempt"
        )
    return dict(row) if row["state"].get("messages") is not None else None


async def load_checkpoint(
    db: Executor, requester_id: str, agent_id: uuid.UUID, attempt: int
) -> dict[str, Any] | None:
    row = await db.fetchrow(
        "SELECT state, turn_count, usage, tokens, checkpoints, outcome, updated_at"
        " FROM agent_conversations WHERE requester_id = $1 AND agent_id = $2 AND attempt = $3",
        requester_id,
        agent_id,
        attempt,
    )
    return dict(row) if row is not None else None


async def set_outcome(
    db: Executor, requester_id: str, agent_id: uuid.UUID, attempt: int, outcome: dict[str, Any]
) -> None:
    """How a try ended; a try that never reached a checkpoint gets a row of its own."""
    await db.execute(
        "INSERT INTO agent_conversations (requester_id, agent_id, attempt, state, outcome)"
        " VALUES ($1, $2, $3, '{}'::jsonb, $4)"
        " ON CONFLICT (requester_id, agent_id, attempt) DO UPDATE SET"
        " outcome = EXCLUDED.outcome, updated_at = now()",
        requester_id,
        agent_id,
        attempt,
        outcome,
    )


async def transcript_summary(
    db: Executor, requester_id: str, agent_id: uuid.UUID
) -> dict[str, Any]:
    row = await db.fetchrow(
        "SELECT coalesce(max(seq), 0) AS entries, coalesce(sum(bytes), 0) AS bytes,"
        " coalesce(bool_or(entry->>'kind' = 'truncated'), false) AS truncated"
        " FROM agent_transcript WHERE requester_id = $1 AND agent_id = $2",
        requester_id,
        agent_id,
    )
    assert row is not None
    return {
        "entries": int(row["entries"]),
        "bytes": int(row["bytes"]),
        "truncated": bool(row["truncated"]),
    }


async def transcript_after(
    db: Executor,
    requester_id: str,
    agent_id: uuid.UUID,
    after: int,
    *,
    limit: int = 200,
    max_bytes: int = 256 * 1024,
) -> list[dict[str, Any]]:
    """Entries numbered above `after`, in order, at most `limit` of them and about `max_bytes`
    (always at least one, so a reader makes progress)."""
    rows = await db.fetch(
        "SELECT entry, bytes FROM agent_transcript WHERE requester_id = $1 AND agent_id = $2"
        " AND seq > $3 ORDER BY seq LIMIT $4",
        requester_id,
        agent_id,
        after,
        limit,
    )
    out: list[dict[str, Any]] = []
    total = 0
    for row in rows:
        if out and total + row["bytes"] > max_bytes:
            break
        out.append(row["entry"])
        total += row["bytes"]
    return out


# --- the requester's copy ------------------------------------------------------------------


@dataclass(frozen=True)
class Received:
    """What the requester's copy of a transcript holds after a store."""

    stored: int  # entries kept, numbered 1..stored
    gap: bool  # some entries were not kept because earlier ones are missing
    full: bool  # the copy ends with a `truncated` entry: nothing more is kept


async def store_received(
    pool: asyncpg.Pool,
    agent_id: uuid.UUID,
    entries: list[dict[str, Any]],
    *,
    max_entries: int,
    max_bytes: int,
    upto: int | None = None,
) -> Received:
    """Keep the entries that continue the stored prefix (validated entries, in order).

    The copy holds at most `max_entries` entries and `max_bytes` bytes: the entry that would
    pass either limit is replaced by one `truncated` entry of this instance, and nothing is
    kept after it (nor after the executor's own `truncated` entry). Entries numbered above
    `upto` (the count the run's final state reported) are not kept."""
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(
            "SELECT pg_advisory_xact_lock(hashtext('fedagent:received-transcript:' || $1))",
            str(agent_id),
        )
        last = await conn.fetchrow(
            "SELECT seq, total_bytes, entry->>'kind' AS kind FROM requested_transcript"
            " WHERE agent_id = $1 ORDER BY seq DESC LIMIT 1",
            agent_id,
        )
        have = int(last["seq"]) if last else 0
        total = int(last["total_bytes"]) if last else 0
        full = last is not None and last["kind"] == "truncated"
        rows: list[tuple[Any, ...]] = []
        gap = False
        for entry in sorted(entries, key=lambda e: int(e["seq"])):
            seq = int(entry["seq"])
            if full or seq <= have or (upto is not None and seq > upto):
                continue
            if seq != have + 1:
                gap = True
                break
            size = _size(entry)
            if seq > max_entries or total + size > max_bytes:
                entry = _received_limit_entry(seq, max_entries, max_bytes)
                size, full = _size(entry), True
            total += size
            rows.append((agent_id, seq, entry, total))
            have = seq
            full = full or entry.get("kind") == "truncated"
        if rows:
            await conn.executemany(
                "INSERT INTO requested_transcript (agent_id, seq, entry, total_bytes)"
                " VALUES ($1, $2, $3, $4)",
                rows,
            )
        return Received(stored=have, gap=gap, full=full)


def _received_limit_entry(seq: int, max_entries: int, max_bytes: int) -> dict[str, Any]:
    return {
        "seq": seq,
        "kind": "truncated",
        "at": datetime.now(UTC).isoformat(),
        "text": f"this instance keeps at most {max_entries} entries and {max_bytes} bytes of"
        " a peer's transcript per run; later entries are not kept (the run goes on)",
    }


async def received_full(db: Executor, agent_id: uuid.UUID) -> bool:
    """Whether the copy ends with a `truncated` entry (nothing more will be kept)."""
    kind = await db.fetchval(
        "SELECT entry->>'kind' FROM requested_transcript WHERE agent_id = $1"
        " ORDER BY seq DESC LIMIT 1",
        agent_id,
    )
    return bool(kind == "truncated")


async def received_count(db: Executor, agent_id: uuid.UUID) -> int:
    value = await db.fetchval(
        "SELECT coalesce(max(seq), 0) FROM requested_transcript WHERE agent_id = $1", agent_id
    )
    return int(value or 0)


async def received_after(
    db: Executor,
    agent_id: uuid.UUID,
    after: int,
    limit: int = 500,
    *,
    max_bytes: int = 1024 * 1024,
) -> list[dict[str, Any]]:
    """Entries numbered above `after`, in order: at most `limit` of them and about
    `max_bytes` (always at least one, so a reader makes progress)."""
    rows = await db.fetch(
        "SELECT entry FROM requested_transcript WHERE agent_id = $1 AND seq > $2"
        " AND (seq = $2 + 1 OR total_bytes <= $4 + coalesce((SELECT total_bytes"
        "  FROM requested_transcript WHERE agent_id = $1 AND seq = $2), 0))"
        " ORDER BY seq LIMIT $3",
        agent_id,
        after,
        limit,
        max_bytes,
    )
    return [r["entry"] for r in rows]


async def entries_of(
    db: Executor, row: dict[str, Any], after: int, limit: int, *, max_bytes: int = 1024 * 1024
) -> list[dict[str, Any]]:
    """The transcript entries of an agent of this instance's users, numbered above `after`:
    a local run's (role executor, requester '_local') are the run's own, an agent spawned on
    a peer has the requester's copy."""
    if row["role"] == "executor":
        return await transcript_after(
            db, row["peer_instance_id"], row["agent_id"], after, limit=limit, max_bytes=max_bytes
        )
    return await received_after(db, row["agent_id"], after, limit, max_bytes=max_bytes)
