"""The audit log (admin): configuration changes, key rotations, connection changes, spawns,
kills and every refused incoming message, newest first."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import AdminUser, ServicesDep
from federation.models import AuditPage, Line
from operations import audit

router = APIRouter(prefix="/api/v1/federation/audit", tags=["audit"])


@router.get("")
async def list_audit(
    user: AdminUser,
    services: ServicesDep,
    action: Annotated[Line | None, Query(max_length=200, description="exact, or prefix*")] = None,
    outcome: Annotated[Line | None, Query(max_length=50, description="ok or refused")] = None,
    actor: Annotated[Line | None, Query(max_length=300, description="user:N, peer:ID")] = None,
    since: Annotated[datetime | None, Query(description="at or after (RFC 3339)")] = None,
    until: Annotated[datetime | None, Query(description="before (RFC 3339)")] = None,
    before: Annotated[int | None, Query(ge=1, le=2**63 - 1, description="nextBefore")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditPage:
    return await audit.list_(
        services,
        user,
        action=action,
        outcome=outcome,
        actor=actor,
        since=since,
        until=until,
        before=before,
        limit=limit,
    )
