"""The peers any local user may spawn on (members too): connection id, the peer's name and id,
its status and what it allows this instance. Admins manage connections under /connections."""

from __future__ import annotations

import uuid

from fastapi import APIRouter

from api.deps import CurrentUser, ServicesDep
from federation.models import PeerPublic
from operations import connections

router = APIRouter(prefix="/api/v1/federation/peers", tags=["peers"])


@router.get("")
async def list_peers(user: CurrentUser, services: ServicesDep) -> list[PeerPublic]:
    """ACTIVE and SUSPENDED connections, with what each peer allows this instance."""
    return await connections.peers(services)


@router.get("/{connection_id}")
async def get_peer(
    connection_id: uuid.UUID, user: CurrentUser, services: ServicesDep
) -> PeerPublic:
    return await connections.peer(services, connection_id)
