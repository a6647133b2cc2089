"""The transcript of an agent spawned on a peer (the requester's copy), page by page."""

from __future__ import annotations

import uuid
from typing import Any

from federation.models import TranscriptPage
from federation.states import LOCAL_REQUESTER, TERMINAL_STATES
from federation.store import conversations
from federation.transcripts import reported_total
from federation.users import User
from operations import Services, agents


async def page(
    services: Services, user: User, agent_id: uuid.UUID, *, after: int, limit: int
) -> TranscriptPage:
    """Entries numbered above `after`; `complete` once the run has ended and every entry the
    executor reported is here (what is missing is pulled first)."""
    row = await agents.get(services, user, agent_id)
    if row["role"] == "executor":
        return await _local_page(services, row, after=after, limit=limit)
    terminal = row["state"] in TERMINAL_STATES
    total = reported_total(row)
    complete = False
    if terminal:
        complete = await services.transcripts.complete(agent_id, row)
    elif total:
        services.transcripts.kick_if_behind(agent_id, total)
    pool = services.pool
    entries = await conversations.received_after(pool, agent_id, after, limit)
    stored = await conversations.received_count(pool, agent_id)
    result = row.get("result") or {}
    summary = result.get("transcript") if isinstance(result, dict) else None
    return TranscriptPage(
        agentId=agent_id,
        entries=entries,
        next=int(entries[-1]["seq"]) if entries else after,
        stored=stored,
        total=total,
        truncated=bool(isinstance(summary, dict) and summary.get("truncated"))
        or await conversations.received_full(pool, agent_id),
        complete=complete,
    )


async def _local_page(
    services: Services, row: dict[str, Any], *, after: int, limit: int
) -> TranscriptPage:
    """A local run's transcript: the executor's own, whole as soon as the run has ended."""
    agent_id = row["agent_id"]
    entries = await conversations.entries_of(services.pool, row, after, limit)
    summary = await conversations.transcript_summary(services.pool, LOCAL_REQUESTER, agent_id)
    return TranscriptPage(
        agentId=agent_id,
        entries=entries,
        next=int(entries[-1]["seq"]) if entries else after,
        stored=summary["entries"],
        total=summary["entries"],
        truncated=summary["truncated"],
        complete=row["state"] in TERMINAL_STATES,
    )
