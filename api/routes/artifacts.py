"""A run's whole artifacts on the requester: `GET /agents/{agentId}/diff` (and `/log`).

The REST face of `operations.artifacts`: the first read fetches the artifact from the executor
and keeps it, later reads stream it from this instance's store.
"""

from __future__ import annotations

import base64
import uuid

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from api.deps import CurrentUser, ServicesDep
from federation.store import artifacts
from federation.users import User
from operations import Services
from operations import artifacts as artifact_ops

router = APIRouter(prefix="/api/v1/federation/agents", tags=["agents"])

MEDIA_TYPES = {"diff": "text/x-diff", "log": "text/plain; charset=utf-8"}


async def _serve(
    kind: str, agent_id: uuid.UUID, user: User, services: Services
) -> StreamingResponse:
    artifact = await artifact_ops.of_agent(services, user, agent_id, kind)
    digest = base64.b64encode(bytes.fromhex(artifact.sha256)).decode()
    return StreamingResponse(
        artifacts.iter_chunks(services.pool, artifact),
        media_type=MEDIA_TYPES[kind],
        headers={
            "Content-Length": str(artifact.bytes),
            "ETag": f'"{artifact.sha256}"',
            "Repr-Digest": f"sha-256=:{digest}:",
            "X-Artifact-Sha256": artifact.sha256,
        },
    )


@router.get(
    "/{agent_id}/diff",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/x-diff": {}}, "description": "the whole diff"}},
)
async def agent_diff(
    agent_id: uuid.UUID, user: CurrentUser, services: ServicesDep
) -> StreamingResponse:
    """The run's whole diff (`git apply` takes it); its sha256 and length are the result's
    `diffSha256` and `diffBytes`. 409 `artifact_not_ready` while the run has none."""
    return await _serve("diff", agent_id, user, services)


@router.get(
    "/{agent_id}/log",
    response_class=StreamingResponse,
    responses={200: {"content": {"text/plain": {}}, "description": "the whole log"}},
)
async def agent_log(
    agent_id: uuid.UUID, user: CurrentUser, services: ServicesDep
) -> StreamingResponse:
    """The run's whole log (`logTail` is its end); sha256 and length: `logSha256`, `logBytes`."""
    return await _serve("log", agent_id, user, services)
