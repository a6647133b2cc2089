"""The audit log (admin): one page of entries, newest first, with its filters."""

from __future__ import annotations

from datetime import datetime

from federation.models import AuditEntryPublic, AuditPage
from federation.store import repos
from federation.users import User
from operations import Services


async def list_(
    services: Services,
    user: User,
    *,
    action: str | None = None,
    outcome: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
    before: int | None = None,
    limit: int = 100,
) -> AuditPage:
    """`action` is exact or a prefix ending in '*'; pass `nextBefore` as `before` for the
    next (older) page."""
    rows = await repos.list_audit(
        services.pool,
        action=action,
        outcome=outcome,
        actor=actor,
        since=since,
        until=until,
        before=before,
        limit=limit + 1,
    )
    items = [AuditEntryPublic.model_validate(r) for r in rows[:limit]]
    return AuditPage(items=items, nextBefore=items[-1].id if len(rows) > limit else None)
