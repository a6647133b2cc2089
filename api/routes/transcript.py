"""The transcript of an agent spawned on a peer (the requester's copy), page by page."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import CurrentUser, ServicesDep
from federation.models import TranscriptPage
from operations import transcripts

router = APIRouter(prefix="/api/v1/federation/agents", tags=["agents"])


@router.get("/{agent_id}/transcript")
async def get_transcript(
    agent_id: uuid.UUID,
    user: CurrentUser,
    services: ServicesDep,
    after: Annotated[int, Query(ge=0, description="entries numbered above this")] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
) -> TranscriptPage:
    """Entries in order: the agent's text and usage per turn, each tool call, each tool
    result (bounded, head and tail, exit code for commands). `complete` once the run has
    ended and every entry the executor reported is here."""
    return await transcripts.page(services, user, agent_id, after=after, limit=limit)
