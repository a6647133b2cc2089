"""Agent conversations: the executor's checkpoints and transcript, the requester's copy of it.

Checkpoints (`agent_conversations`) are one row per try of a run, saved after every model
answer and tool result; the lists that grow with the conversation (its messages and commands)
are kept item by item (`agent_checkpoint_items`), so a save writes what its step added. The
transcript (`agent_transcript`) is numbered from 1 per run across its tries; entries are
appended under a per-run lock in the checkpoint's transaction, so a checkpoint and the entries
of its step are saved together or not at all; each entry keeps the running byte total. Past
the per-run byte limit one `truncated` entry is written and later entries are dropped.

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


# The lists of a checkpoint's state that grow with the conversation, kept item by item; and
# the log's tail, kept as the pieces each save added (`{"text": ...}`), oldest dropped.
ITEM_LISTS = ("messages", "commands")
LOG = "log"


@dataclass(frozen=True, kw_only=True)
class ListChanges:
    """What a save changes in one of a checkpoint's lists: the items it now holds are those
    numbered `first` to `length - 1`; `changed` are the items (by number) that are new or
    differ from what was saved before."""

    length: int
    changed: list[tuple[int, Any]]
    first: int = 0


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
    entries_before: int | None = None,
    workspace: dict[str, Any] | None = None,
    lists: dict[str, ListChanges] | None = None,
) -> dict[str, Any] | None:
    """Save the try's conversation and append `entries` to the run's transcript, atomically.
    Returns the transcript's summary (entries, bytes, truncated), or None when there were no
    entries (the transcript is as it was: nothing is locked or counted for it).

    `state` holds the conversation but for its growing lists (ITEM_LISTS), of which `lists`
    brings only what changed: a save writes what its step added, not the conversation again.

    `state["writer"]` (the activity attempt saving it) fences the row: a worker whose attempt
    Temporal already gave up on (it stopped heartbeating but still runs) cannot overwrite the
    checkpoint of the attempt that took over; it gets `CheckpointSuperseded` instead.

    `entries_before`: how many entries the saver knows the transcript had; a transcript that
    has more already took these entries (a save cut off after its commit, made again)."""
    async with pool.acquire() as conn, conn.transaction():
        saved = await conn.fetchval(
            "INSERT INTO agent_conversations"
            " (requester_id, agent_id, attempt, state, turn_count, usage, tokens, checkpoints,"
            " workspace)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, 1, $8)"
            " ON CONFLICT (requester_id, agent_id, attempt) DO UPDATE SET"
            " state = EXCLUDED.state, turn_count = EXCLUDED.turn_count,"
            " usage = EXCLUDED.usage, tokens = EXCLUDED.tokens,"
            " workspace = coalesce(EXCLUDED.workspace, agent_conversations.workspace),"
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
            workspace,
        )
        if saved is None:
            raise CheckpointSuperseded(
                f"checkpoint of try {attempt} of agent {agent_id} belongs to a later attempt"
            )
        for name, change in (lists or {}).items():
            await _save_items(conn, (requester_id, agent_id, attempt), name, change)
        if not entries:
            return None
        return await append_transcript(
            conn, requester_id, agent_id, attempt, entries, transcript_limit, entries_before
        )


async def _save_items(
    conn: asyncpg.Connection, key: tuple[str, uuid.UUID, int], name: str, change: ListChanges
) -> None:
    await conn.execute(
        "DELETE FROM agent_checkpoint_items WHERE requester_id = $1 AND agent_id = $2"
        " AND attempt = $3 AND list = $4 AND (idx >= $5 OR idx < $6)",
        *key,
        name,
        change.length,
        change.first,
    )
    if change.changed:
        await conn.executemany(
            "INSERT INTO agent_checkpoint_items (requester_id, agent_id, attempt, list, idx, item)"
            " VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (requester_id, agent_id, attempt,"
            " list, idx) DO UPDATE SET item = EXCLUDED.item",
            [(*key, name, idx, item) for idx, item in change.changed],
        )


async def _with_items(
    db: Executor, requester_id: str, agent_id: uuid.UUID, attempt: int, row: Any
) -> dict[str, Any]:
    """A checkpoint row with its lists put back into its state."""
    out = dict(row)
    items = await db.fetch(
        "SELECT list, item FROM agent_checkpoint_items WHERE requester_id = $1"
        " AND agent_id = $2 AND attempt = $3 ORDER BY list, idx",
        requester_id,
        agent_id,
        attempt,
    )
    state = dict(out["state"])
    for name in ITEM_LISTS:
        if name in state or any(r["list"] == name for r in items):
            state[name] = [r["item"] for r in items if r["list"] == name]
    if "logTailChars" in state:
        log = "".join(str(r["item"]["text"]) for r in items if r["list"] == LOG)
        state["logTail"] = log[len(log) - int(state.pop("logTailChars")) :]
    out["state"] = state
    return out


async def append_transcript(
    conn: asyncpg.Connection,
    requester_id: str,
    agent_id: uuid.UUID,
    attempt: int,
    entries: list[dict[str, Any]],
    limit: int,
    entries_before: int | None = None,
) -> dict[str, Any]:
    await conn.execute(
        "SELECT pg_advisory_xact_lock(hashtext('fedagent:transcript:' || $1 || ':' || $2))",
        requester_id,
        str(agent_id),
    )
    summary = await transcript_summary(conn, requester_id, agent_id)
    if not entries or summary["truncated"]:
        return summary
    if entries_before is not None and summary["entries"] > entries_before:
        return summary  # appended by the same save, whose answer was lost
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
            total += size
            rows.append((requester_id, agent_id, seq, attempt, full, size, total))
            summary["truncated"] = True
            break
        total += size
        rows.append((requester_id, agent_id, seq, attempt, full, size, total))
    await conn.executemany(
        "INSERT INTO agent_transcript"
        " (requester_id, agent_id, seq, attempt, entry, bytes, total_bytes)"
        " VALUES ($1, $2, $3, $4, $5, $6, $7)",
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
    if row["checkpoints"] == 0:
        return None  # claimed before any save: nothing to resume
    return await _with_items(db, requester_id, agent_id, attempt, row)


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
    return await _with_items(db, requester_id, agent_id, attempt, row) if row else None


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
    """Entries, bytes and whether the transcript was cut, read from its last entry (which
    keeps the running total): one index lookup, however long the transcript."""
    row = await db.fetchrow(
        "SELECT seq, total_bytes, entry->>'kind' = 'truncated' AS truncated"
        " FROM agent_transcript WHERE requester_id = $1 AND agent_id = $2"
        " ORDER BY seq DESC LIMIT 1",
        requester_id,
        agent_id,
    )
    if row is None:
        return {"entries": 0, "bytes": 0, "truncated": False}
    return {
        "entries": int(row["seq"]),
        "bytes": int(row["total_bytes"]),
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
