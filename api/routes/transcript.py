"""The transcript of an agent spawned on a peer (the requester's copy), page by page."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query, Request

from api.deps import CurrentUser, PoolDep
from federation.errors import AgentNotFound
from federation.models import TranscriptPage
from federation.store import conversations, repos
from federation.transcripts import TranscriptPuller, reported_total

router = APIRouter(prefix="/api/v1/federation/agents", tags=["agents"])


def puller(request: Request) -> TranscriptPuller:
    transcripts: TranscriptPuller = request.app.state.transcripts
    return transcripts


@router.get("/{agent_id}/transcript")
async def get_transcript(
    agent_id: uuid.UUID,
    request: Request,
    user: CurrentUser,
    pool: PoolDep,
    after: Annotated[int, Query(ge=0, description="entries numbered above this")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> TranscriptPage:
    """Entries in order: the agent's text and usage per turn, each tool call, each tool
    result (bounded, head and tail, exit code for commands). `complete` once the run has
    ended and every entry the executor reported is here."""
    row = user.visible(await repos.get_requested_agent(pool, agent_id))
    if row is None:
        raise AgentNotFound(f"no agent {agent_id}")
    terminal = row["state"] in repos.TERMINAL_STATES
    total = reported_total(row)
    complete = False
    if terminal:
        complete = await puller(request).complete(agent_id, row)
    elif total:
        puller(request).kick_if_behind(agent_id, total)
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
        or any(e.get("kind") == "truncated" for e in entries),
        complete=terminal and complete,
    )
